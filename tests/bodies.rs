//! Bodies stream through the gateway in both directions: a 20 MiB chunked upload reaches the
//! backend whole, an upload is forwarded while the client is still sending it, and a 20 MiB
//! download reaches the client while the backend is still producing it.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
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
    let c = Cluster::start().await;
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
    let r = c.send(upload("/upload", key, body)).await;
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
    Cluster::start_with(Options {
        extra_pools: vec![("bulk".into(), addr)],
        extra_toml: r#"
[sets.bulk]
priority = 1

[[routes]]
name = "bulk"
path_prefix = "/bulk"
set = "bulk"
key = ["header:x-user-id"]
timeout_ms = 30000
retries = 0
"#
        .into(),
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
