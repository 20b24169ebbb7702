//! Resting connections (src/data/server/rest.rs) on real sockets: a plain HTTP/1.1 keep-alive
//! connection with nothing to do gives hyper's buffers back and waits with none, and the client
//! never sees it: the next request on the same connection is served, bytes pipelined behind
//! it too, and a response whose body is slow to come is never cut for the sake of resting.
//! `shardgate_client_connections{state}` shows which state each connection is in.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The gauge of client connections in `state`, read from the admin endpoint (-1: absent).
async fn connections(c: &Cluster, state: &str) -> i64 {
    let series = format!("shardgate_client_connections{{state=\"{state}\"}}");
    c.metric(&series).await.map_or(-1, |v| v as i64)
}

/// Reads one response with a `content-length` body from `s`; its status and body.
async fn read_response(s: &mut TcpStream, pending: &mut Vec<u8>) -> (u16, String) {
    let mut buf = [0u8; 4096];
    within(REQUEST_DEADLINE, "a whole response", async {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .expect("a content-length");
                if pending.len() >= end + 4 + length {
                    let status = head[9..12].parse().expect("a status code");
                    let body = String::from_utf8_lossy(&pending[end + 4..end + 4 + length]).into();
                    pending.drain(..end + 4 + length);
                    return (status, body);
                }
            }
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "the gateway closed the connection");
            pending.extend_from_slice(&buf[..n]);
        }
    })
    .await
}

fn get_head(path: &str, key: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: gw.test\r\nx-user-id: {key}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_rests_and_serves_its_next_requests_on_the_same_socket() {
    let c = Cluster::start().await;
    let key = "resting-client";
    let backend = c.sim(&c.serving_idc_of(key), "core");
    let before = backend.hits();
    let mut s = TcpStream::connect(c.proxy()).await.expect("connect");
    let mut pending = Vec::new();
    // A new connection that has said nothing rests from the start.
    eventually("the silent new connection rests", || async {
        (connections(&c, "resting").await == 1).then_some(())
    })
    .await;

    s.write_all(get_head("/orders/1", key).as_bytes())
        .await
        .expect("write");
    let (status, _) = read_response(&mut s, &mut pending).await;
    assert_eq!(status, 200);
    // Quiet for a second or two: the connection rests (hyper's connection is gone).
    eventually("the connection rests after its request", || async {
        (connections(&c, "resting").await == 1 && connections(&c, "active").await == 0)
            .then_some(())
    })
    .await;

    // The next request on the same socket wakes it; two more pipelined behind it in one write.
    let three = [
        get_head("/orders/2", key),
        get_head("/orders/3", key),
        get_head("/orders/4", key),
    ]
    .concat();
    s.write_all(three.as_bytes()).await.expect("write");
    for _ in 0..3 {
        let (status, _) = read_response(&mut s, &mut pending).await;
        assert_eq!(status, 200, "every request after the rest is served");
    }
    assert_eq!(
        backend.hits() - before,
        4,
        "each request reached the backend once"
    );
    assert!(pending.is_empty(), "nothing but the three answers came");

    // And it rests again, as often as it goes quiet.
    eventually("the connection rests again", || async {
        (connections(&c, "resting").await == 1).then_some(())
    })
    .await;
    s.write_all(get_head("/orders/5", key).as_bytes())
        .await
        .expect("write");
    let (status, _) = read_response(&mut s, &mut pending).await;
    assert_eq!(status, 200);
    assert_eq!(backend.hits() - before, 5);

    // A client that closes a resting connection leaves no connection behind.
    eventually("the connection rests a third time", || async {
        (connections(&c, "resting").await == 1).then_some(())
    })
    .await;
    drop(s);
    eventually("the closed connection is gone", || async {
        (connections(&c, "resting").await == 0 && connections(&c, "active").await == 0)
            .then_some(())
    })
    .await;
    c.stop().await;
}

/// A backend answering with a chunked body whose second half comes `gap` after the first.
async fn slow_body_backend(gap: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /healthz") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let first = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                if s.write_all(first).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
                let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_slow_to_come_is_never_cut_to_rest() {
    // Three seconds between the two halves: past the rest delay twice over, within the
    // route's timeout between chunks.
    let backend = slow_body_backend(Duration::from_secs(3)).await;
    let c = Cluster::start_with(Options {
        idc_toml: "health.interval_ms = 600000\n".into(),
        extra_sets: "[sets.extra]\npriority = 1\n".into(),
        extra_pools: vec![("extra".into(), backend)],
        extra_toml: "\n[[routes]]\nname = \"trickle\"\npath_prefix = \"/trickle\"\nset = \"extra\"\nsharded = false\ntimeout_ms = 10000\nretries = 0\n".into(),
        ..Options::default()
    })
    .await;
    let mut s = TcpStream::connect(c.proxy()).await.expect("connect");
    s.write_all(b"GET /trickle HTTP/1.1\r\nhost: gw.test\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut rested_mid_body = false;
    within(Duration::from_secs(15), "the whole slow body", async {
        while !got.ends_with(b"0\r\n\r\n") {
            tokio::select! {
                n = s.read(&mut buf) => {
                    let n = n.expect("read");
                    assert!(n > 0, "the gateway closed the connection mid-body: {}", String::from_utf8_lossy(&got));
                    got.extend_from_slice(&buf[..n]);
                }
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    rested_mid_body |= connections(&c, "resting").await != 0;
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("first") && text.contains("second"),
        "both halves arrived: {text}"
    );
    assert!(
        !rested_mid_body,
        "the connection rested while its response was being sent"
    );
    // Once the response is whole, the quiet connection rests, and still serves.
    eventually("the connection rests after the response", || async {
        (connections(&c, "resting").await == 1).then_some(())
    })
    .await;
    c.stop().await;
}
