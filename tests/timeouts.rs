//! The deadlines of DESIGN.md §10 that only a misbehaving peer reaches, on real sockets: a
//! client whose request body stalls, a backend whose response body stalls, and a backend
//! that never completes a TCP handshake (its SYNs dropped). In each case every other
//! deadline is set far away (a minute), so the exchange can only end through the one under
//! test, and the test's own bounded waits show that it did.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Probes that cannot call a backend unhealthy within a test (one every ten minutes, three
/// failures needed), so the deadline under test is the only thing that acts.
const NO_PROBES: &str = "health.interval_ms = 600000\n";

/// A route on the `extra` set, with a one-minute exchange deadline.
fn extra_route(name: &str, timeout_ms: u64) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nset = \"extra\"\nsharded = false\ntimeout_ms = {timeout_ms}\nretries = 0\n"
    )
}

/// Writes `head` (and `body`) on a raw connection and reads until the peer closes or the
/// bounded wait ends: what came back.
async fn raw_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write the head");
    s.write_all(body).await.expect("write the body");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer (or the close) comes within the deadline under test, not the minute.
    within(REQUEST_DEADLINE, "an answer or a close", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // A complete small answer is enough; the connection may stay open.
                    let text = String::from_utf8_lossy(&got);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        if length.is_some_and(|n| got.len() >= end + 4 + n) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    (s, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_by_the_body_idle_timeout() {
    let c = Cluster::start_with(Options {
        idc_toml: NO_PROBES.into(),
        tweak: ConfigTweak::new(|config| {
            config.timeouts.request_body = Duration::from_millis(300);
            config.timeouts.idle = Duration::from_secs(60);
        }),
        ..Options::default()
    })
    .await;
    let key = "stalled-upload";
    let idc = c.serving_idc_of(key);
    let backend = c.sim(&idc, "core");
    // `upload` waits for its answer; the body promises 100,000 bytes and sends 10. (Past the
    // 64 KiB a write keeps for a misroute re-forward, so it streams to the backend at once.)
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: gw.test\r\nx-user-id: {key}\r\ncontent-length: 100000\r\n\r\n"
    );
    let (_conn, got) = raw_exchange(c.proxy(), &head, b"0123456789").await;
    let text = String::from_utf8_lossy(&got);
    // The backend got the request and its partial body, then the body failed: it never
    // answered 200 with the whole body.
    assert_eq!(backend.hits(), 1, "the request reached its backend: {text}");
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a stalled body was answered as complete: {text}"
    );
    // The client's failure, answered as one (not a 502 blamed on the backend).
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "a stalled body is the client's failure: {text}"
    );
    c.stop().await;
}

/// A backend that answers every request with a 200 promising 100 bytes, sends 10, then
/// stalls; reports when the gateway closes the connection.
async fn stalling_backend() -> (SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (closed_tx, closed) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                // Nothing more, until the peer goes (bounded: a test never lasts this long).
                let _ = tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf)).await;
                let _ = closed_tx.send(()).await;
            });
        }
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_by_the_route_timeout_between_chunks() {
    let (backend, mut closed) = stalling_backend().await;
    // The response body's idle deadline is the route's timeout_ms (300 ms here).
    let c = Cluster::start_with(Options {
        idc_toml: NO_PROBES.into(),
        extra_sets: "[sets.extra]\npriority = 1\n".into(),
        extra_pools: vec![("extra".into(), backend)],
        extra_toml: extra_route("stall", 300),
        tweak: ConfigTweak::new(|config| {
            config.timeouts.idle = Duration::from_secs(60);
        }),
        ..Options::default()
    })
    .await;
    let resp = within(
        REQUEST_DEADLINE,
        "the response head",
        open(c.proxy(), get("/stall", &[])),
    )
    .await
    .expect("the head of the stalled answer");
    assert_eq!(resp.status(), 200, "the head passed through");
    // The body ends in an error, short of its 100 bytes, within the bounded wait.
    let body = within(REQUEST_DEADLINE, "the stalled body to end", async {
        http_body_util::BodyExt::collect(resp.into_body()).await
    })
    .await;
    assert!(body.is_err(), "a body cut short must not end cleanly");
    // And the gateway let go of the backend's connection.
    within(
        REQUEST_DEADLINE,
        "the gateway to close the backend connection",
        closed.recv(),
    )
    .await
    .expect("the backend reports the close");
    c.stop().await;
}

/// A loopback listener whose accept queue is full and never drained: further SYNs to it are
/// dropped by the kernel, as by a black-holing firewall. The returned values keep it so.
async fn black_hole() -> (SocketAddr, Vec<TcpStream>, TcpListener) {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("loopback"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen with the smallest backlog");
    let addr = listener.local_addr().expect("address");
    let mut queued = Vec::new();
    // Fill the queue until a handshake no longer completes.
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("connect to the black hole: {e}"),
            Err(_) => return (addr, queued, listener),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_backend_gets_502_after_the_connect_timeout() {
    let (hole, _queued, _listener) = black_hole().await;
    let c = Cluster::start_with(Options {
        idc_toml: NO_PROBES.into(),
        extra_sets: "[sets.extra]\npriority = 1\n".into(),
        extra_pools: vec![("extra".into(), hole)],
        extra_toml: extra_route("hole", 60_000),
        tweak: ConfigTweak::new(|config| {
            config.timeouts.upstream_connect = Duration::from_millis(300);
        }),
        ..Options::default()
    })
    .await;
    // A POST: never spilled to another IDC, so one connect attempt decides.
    let r = c
        .send(request(http::Method::POST, "/hole", &[], "{}"))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connect", "{}", r.text());
    c.stop().await;
}
