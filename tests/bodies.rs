//! Bodies stream through the gateway in both directions: a 20 MiB chunked upload reaches the
//! backend whole, an upload is forwarded while the client is still sending it, and a 20 MiB
//! download reaches the client while the backend is still producing it; answers of every
//! framing (sized, chunked, empty, to HEAD) leave the upstream connection in its pool.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use shardgate::control::topology::Shard;
use support::{
    channel_body, eventually, open, pattern_chunk, within, ClientBody, Cluster, Options,
    POLL_DEADLINE, REQUEST_DEADLINE,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const CHUNK: usize = 64 * 1024;
const MIB: u64 = 1024 * 1024;
/// 20 MiB in 64 KiB chunks.
const CHUNKS: usize = 320;

fn upload(path: &str, key: &str, body: ClientBody) -> Request<ClientBody> {
    Request::post(path)
        .header("x-user-id", key)
        .body(body)
        .expect("a valid request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_chunked_upload_reaches_the_backend_whole() {
    // A route of its own with a long timeout (the harness's `upload` allows 2 s): the route's
    // timeout covers the whole upload, and 20 MiB through a debug build on a loaded 2-core
    // machine took past 2 s (a 504 `upstream_timeout` instead of the backend's answer).
    let c = Cluster::start_with(Options {
        extra_toml: support::route_toml(
            "bigupload",
            "core",
            "methods = [\"POST\"]\ntimeout_ms = 30000\nretries = 0",
        ),
        ..Options::default()
    })
    .await;
    let key = "bulk-uploader";
    let (tx, body) = channel_body();
    let producer = tokio::spawn(async move {
        let mut crc = crc32fast::Hasher::new();
        for i in 0..CHUNKS {
            let chunk = pattern_chunk(i, CHUNK);
            crc.update(&chunk);
            if tx.send(chunk).await.is_err() {
                panic!("the request body was dropped after {i} chunks");
            }
        }
        crc.finalize()
    });
    let r = c.send(upload("/bigupload", key, body)).await;
    let crc = within(POLL_DEADLINE, "the body producer", producer)
        .await
        .expect("the producer finished");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["body_bytes"], 20 * MIB, "bytes the backend received");
    assert_eq!(v["body_crc32"], crc, "CRC-32 of what the backend received");
    assert_eq!(v["method"], "POST");
    assert_eq!(r.idc(), c.serving_idc_of(key));
    assert_eq!(r.shard(), Some(Shard::of_key(key.as_bytes(), 1024).0));
    c.stop().await;
}

/// What the streaming backend shares with the test.
#[derive(Default)]
struct Bulk {
    /// Upload bytes the backend has read so far.
    received: AtomicU64,
}

/// A backend for the `bulk` set: `/bulk/up` counts what it reads as it reads it and answers
/// with the total and CRC; `/bulk/down` streams 20 MiB and holds the second half until `go`.
async fn start_bulk_backend(state: Arc<Bulk>, go: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the bulk backend");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            let go = go.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let go = go.clone();
                async move { Ok::<_, Infallible>(bulk_answer(req, state, go).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

async fn bulk_answer(
    req: Request<Incoming>,
    state: Arc<Bulk>,
    mut go: watch::Receiver<bool>,
) -> Response<ClientBody> {
    if req.uri().path().starts_with("/bulk/down") {
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            for i in 0..CHUNKS {
                if i == CHUNKS / 2 {
                    // Held until the client has the head and the first bytes: a gateway that
                    // buffered the response whole would never deliver them.
                    let released = tokio::time::timeout(POLL_DEADLINE, go.wait_for(|v| *v)).await;
                    if !matches!(released, Ok(Ok(_))) {
                        return; // the body ends short; the test sees it
                    }
                }
                if tx.send(pattern_chunk(i, CHUNK)).await.is_err() {
                    return;
                }
            }
        });
        return Response::new(body);
    }
    let mut body = req.into_body();
    let mut crc = crc32fast::Hasher::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            total += d.len() as u64;
            crc.update(d);
            state.received.fetch_add(d.len() as u64, Ordering::SeqCst);
        }
    }
    let answer = serde_json::json!({"bytes": total, "crc32": crc.finalize()}).to_string();
    Response::new(
        Full::new(Bytes::from(answer))
            .map_err(|e| match e {})
            .boxed(),
    )
}

async fn bulk_cluster(state: Arc<Bulk>, go: watch::Receiver<bool>) -> Cluster {
    let addr = start_bulk_backend(state, go).await;
    cluster_over(addr, "bulk", "timeout_ms = 30000\nretries = 0").await
}

/// A cluster whose set `bulk` is the backend at `addr`, with a route `name` under `/name`
/// keyed by `x-user-id` (and `extra` lines).
async fn cluster_over(addr: SocketAddr, name: &str, extra: &str) -> Cluster {
    Cluster::start_with(Options {
        extra_pools: vec![("bulk".into(), addr)],
        extra_toml: format!(
            "\n[sets.bulk]\npriority = 1\n{}",
            support::route_toml(name, "bulk", extra)
        ),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_forwarded_while_the_client_is_still_sending() {
    let state = Arc::new(Bulk::default());
    let (_go, go_rx) = watch::channel(false);
    let c = bulk_cluster(state.clone(), go_rx).await;

    let (tx, body) = channel_body();
    let reply = tokio::spawn(support::send(c.proxy(), upload("/bulk/up", "u", body)));
    let mut crc = crc32fast::Hasher::new();
    let send = |tx: &mpsc::Sender<Bytes>, i: usize, crc: &mut crc32fast::Hasher| {
        let chunk = pattern_chunk(i, CHUNK);
        crc.update(&chunk);
        let tx = tx.clone();
        async move { tx.send(chunk).await.is_ok() }
    };
    for i in 0..CHUNKS / 2 {
        assert!(send(&tx, i, &mut crc).await, "the upload was cut short");
    }
    // Half is sent and the rest held back: the backend must already be reading it.
    eventually(
        "the backend to receive the first MiB before the upload ends",
        || {
            let received = state.received.load(Ordering::SeqCst);
            async move { (received >= MIB).then_some(()) }
        },
    )
    .await;
    for i in CHUNKS / 2..CHUNKS {
        assert!(send(&tx, i, &mut crc).await, "the upload was cut short");
    }
    drop(tx);
    let r = within(REQUEST_DEADLINE, "the upload's answer", reply)
        .await
        .expect("the upload task");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["bytes"], 20 * MIB);
    assert_eq!(r.json()["crc32"], crc.finalize());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_download_streams_to_the_client() {
    let state = Arc::new(Bulk::default());
    let (go, go_rx) = watch::channel(false);
    let c = bulk_cluster(state, go_rx).await;

    let resp = within(
        REQUEST_DEADLINE,
        "the download's response head while the backend holds the rest",
        open(
            c.proxy(),
            support::get("/bulk/down", &[("x-user-id", "reader")]),
        ),
    )
    .await
    .expect("the download starts");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-shardgate-idc"],
        c.serving_idc_of("reader")
    );

    let mut expected = crc32fast::Hasher::new();
    for i in 0..CHUNKS {
        expected.update(&pattern_chunk(i, CHUNK));
    }
    let mut body = resp.into_body();
    let mut got = crc32fast::Hasher::new();
    let mut total = 0u64;
    within(Duration::from_secs(30), "the whole download", async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the download body is not cut");
            if let Some(d) = frame.data_ref() {
                total += d.len() as u64;
                got.update(d);
            }
            if total >= MIB && !*go.borrow() {
                let _ = go.send(true);
            }
        }
    })
    .await;
    assert!(
        *go.borrow(),
        "the first MiB arrived before the backend finished"
    );
    assert_eq!(total, 20 * MIB, "bytes the client received");
    assert_eq!(
        got.finalize(),
        expected.finalize(),
        "CRC-32 of the download"
    );
    c.stop().await;
}

/// A backend noting which of its connections served `/reuse` requests (health probes come on
/// connections of their own): `/reuse/sized` answers with a length, `/reuse/chunked` in two
/// chunks without one, `/reuse/empty` with 204, anything else with its request body's size.
async fn counting_backend(
    served_on: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the counting backend");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            next_id += 1;
            let id = next_id;
            let served_on = served_on.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let served_on = served_on.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    if path.starts_with("/reuse") {
                        served_on.lock().expect("the connection set").insert(id);
                    }
                    let answer = match path.as_str() {
                        "/reuse/sized" => Response::new(
                            Full::new(Bytes::from_static(b"sized"))
                                .map_err(|e| match e {})
                                .boxed(),
                        ),
                        "/reuse/chunked" => {
                            let (tx, body) = channel_body();
                            tokio::spawn(async move {
                                let _ = tx.send(Bytes::from_static(b"first ")).await;
                                let _ = tx.send(Bytes::from_static(b"second")).await;
                            });
                            Response::new(body)
                        }
                        "/reuse/empty" => {
                            let mut r = Response::new(
                                Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
                            );
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            r
                        }
                        _ => {
                            let n = req
                                .into_body()
                                .collect()
                                .await
                                .map_or(0, |b| b.to_bytes().len());
                            Response::new(
                                Full::new(Bytes::from(n.to_string()))
                                    .map_err(|e| match e {})
                                    .boxed(),
                            )
                        }
                    };
                    Ok::<_, Infallible>(answer)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_every_framing_leave_the_upstream_connection_pooled() {
    let served_on = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let addr = counting_backend(served_on.clone()).await;
    let c = cluster_over(addr, "reuse", "").await;
    let expected: [(Method, &str, StatusCode, &str); 5] = [
        (Method::GET, "/reuse/sized", StatusCode::OK, "sized"),
        (
            Method::GET,
            "/reuse/chunked",
            StatusCode::OK,
            "first second",
        ),
        (Method::GET, "/reuse/empty", StatusCode::NO_CONTENT, ""),
        (Method::HEAD, "/reuse/sized", StatusCode::OK, ""),
        (Method::POST, "/reuse/echo", StatusCode::OK, "7"),
    ];
    // Sequential requests, each answered whole before the next: one connection carries all.
    for round in 0..3 {
        for (method, path, status, body) in expected.clone() {
            let payload = if method == Method::POST {
                "payload"
            } else {
                ""
            };
            let r = c
                .send(support::request(
                    method.clone(),
                    path,
                    &[("x-user-id", "u")],
                    payload,
                ))
                .await;
            assert_eq!(
                r.status,
                status,
                "round {round}: {method} {path}: {}",
                r.text()
            );
            assert_eq!(r.text(), body, "round {round}: {method} {path}");
        }
    }
    let connections = served_on.lock().expect("the connection set").len();
    assert_eq!(
        connections, 1,
        "15 sequential exchanges of every framing went over one upstream connection"
    );
    c.stop().await;
}
