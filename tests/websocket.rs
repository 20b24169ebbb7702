//! WebSocket upgrades (HTTP/1.1): on a route with `websocket = true` the handshake goes
//! upstream, the backend's 101 comes back, and raw bytes then flow both ways through the
//! gateway; on a route without it the upgrade headers are stripped and the backend sees a
//! plain GET; the request gate steps aside only once a 101 came back; a connection that rested
//! between requests still upgrades, and an upgraded one never rests. The backend is a raw
//! TCP server on 127.0.0.1 that answers an upgrade with 101 and then echoes.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{within, Cluster, ConfigTweak, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every request head the backend received.
type Heads = Arc<Mutex<Vec<String>>>;

/// A backend that upgrades any request carrying `Upgrade: websocket` (101, then a greeting,
/// then an echo of every byte) and answers anything else with a plain 200.
async fn upgrading_backend() -> (SocketAddr, Heads) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads: Heads = Arc::default();
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let upgrade = head.to_ascii_lowercase().contains("\r\nupgrade: websocket");
                seen.lock().unwrap().push(head);
                if !upgrade {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                          Upgrade: websocket\r\nSec-WebSocket-Accept: test\r\n\r\nhello from backend",
                    )
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, heads)
}

/// Reads up to the end of a request or response head (bounded by a deadline).
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&buf).into_owned())
    })
    .await
    .ok()?
}

async fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within(
        Duration::from_secs(10),
        "relayed bytes",
        s.read_exact(&mut buf),
    )
    .await
    .unwrap();
    buf
}

async fn cluster(backend: SocketAddr, idle: Option<Duration>) -> Cluster {
    Cluster::start_with(Options {
        extra_sets: "[sets.live]\npriority = 1\n".into(),
        extra_pools: vec![("live".into(), backend)],
        extra_toml: "\n[[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nset = \"live\"\n\
                     sharded = false\nwebsocket = true\n\
                     \n[[routes]]\nname = \"nows\"\npath_prefix = \"/nows\"\nset = \"live\"\n\
                     sharded = false\n"
            .into(),
        tweak: idle.and_then(|idle| ConfigTweak::new(move |c| c.timeouts.idle = idle)),
        ..Options::default()
    })
    .await
}

/// The head the backend got for `path`, lowercased (health checks come in among them).
fn head_for(heads: &Heads, path: &str) -> String {
    let want = format!("get {path} ");
    heads
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .find(|h| h.starts_with(&want))
        .unwrap_or_else(|| panic!("the backend got no request for {path}"))
}

const HANDSHAKE: &str = "Host: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Upgrades `s` on `/ws/chat`: the 101, the backend's greeting, then one echoed message.
async fn upgrade_and_echo(s: &mut TcpStream) {
    s.write_all(format!("GET /ws/chat HTTP/1.1\r\n{HANDSHAKE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_exact(s, 18).await, b"hello from backend");
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact(s, 4).await, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_proxied_and_bytes_flow_both_ways() {
    let (backend, heads) = upgrading_backend().await;
    let c = cluster(backend, None).await;
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    s.write_all(format!("GET /ws/chat HTTP/1.1\r\n{HANDSHAKE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert!(lower.contains("sec-websocket-accept: test"), "{head}");

    // Backend → client, then client → backend → client, several times, binary included.
    assert_eq!(read_exact(&mut s, 18).await, b"hello from backend");
    for round in 0..5u8 {
        let msg = [0u8, 0xff, round, b'\n', b'x'];
        s.write_all(&msg).await.unwrap();
        assert_eq!(read_exact(&mut s, msg.len()).await, msg);
    }

    // What the backend got was the handshake, with the gateway's headers.
    let head = head_for(&heads, "/ws/chat");
    assert!(head.starts_with("get /ws/chat http/1.1"), "{head}");
    assert!(
        head.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="),
        "{head}"
    );
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("x-request-id:"), "{head}");

    // Closing the client's side ends the relay: the backend's echo loop sees EOF and the
    // gateway closes the client's connection.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(
        Duration::from_secs(10),
        "the relay to close",
        s.read_to_end(&mut rest),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_websocket_strips_the_upgrade() {
    let (backend, heads) = upgrading_backend().await;
    let c = cluster(backend, None).await;
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    s.write_all(format!("GET /nows/chat HTTP/1.1\r\n{HANDSHAKE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exact(&mut s, 5).await, b"plain");
    let seen = head_for(&heads, "/nows/chat");
    assert!(!seen.contains("upgrade: websocket"), "{seen}");
    assert!(!seen.contains("connection: upgrade"), "{seen}");
    // End-to-end headers are untouched: the backend can tell what the client wanted.
    assert!(seen.contains("sec-websocket-version: 13"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed() {
    let (backend, _) = upgrading_backend().await;
    // 2 s of silence: long enough that a slow machine's pause during the handshake and the
    // echo below is not taken for idleness, short against the 10 s deadline.
    let c = cluster(backend, Some(Duration::from_secs(2))).await;
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    upgrade_and_echo(&mut s).await;
    // Then silence: the gateway closes the pair on its own (the read ends, at EOF or with a
    // reset, well before the deadline; without the idle limit it would never end).
    let mut rest = Vec::new();
    let _ = within(
        Duration::from_secs(10),
        "the idle relay to be closed",
        s.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty(), "nothing more was relayed: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_closed_when_its_shard_is_fenced() {
    let (backend, _) = upgrading_backend().await;
    let c = Cluster::start_with(Options {
        extra_sets: "[sets.live]\npriority = 1\n".into(),
        extra_pools: vec![("live".into(), backend)],
        extra_toml: "\n[[routes]]\nname = \"wss\"\npath_prefix = \"/wss\"\nset = \"live\"\n\
                     key = [\"header:x-user-id\"]\nwebsocket = true\n"
            .into(),
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let key = "ws-user-1";
    let shard =
        shardgate::control::topology::Shard::of_key(key.as_bytes(), c.topology().shard_count).0;
    let owner = c.serving_idc_of(key);
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    s.write_all(format!("GET /wss/chat HTTP/1.1\r\nx-user-id: {key}\r\n{HANDSHAKE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_exact(&mut s, 18).await, b"hello from backend");
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_exact(&mut s, 4).await, b"ping");

    // An operator moves the connection's shard: the fence alone is enough to close it, since
    // a WebSocket can carry writes.
    let to = ["sh", "bj", "gz"]
        .into_iter()
        .find(|i| *i != owner)
        .unwrap();
    let body = format!(r#"{{"range":"{shard}","to":"{to}","reason":"test","by":"tester"}}"#);
    let r = support::send(
        c.admin(),
        support::request(
            http::Method::POST,
            "/move",
            &[("content-type", "application/json")],
            body,
        ),
    )
    .await;
    assert_eq!(r.status, http::StatusCode::OK, "{}", r.text());
    let mut rest = Vec::new();
    let closed = within(
        Duration::from_secs(10),
        "the upgraded connection to be closed",
        s.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "{closed:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_gate_steps_aside_only_after_a_101() {
    let (backend, _) = upgrading_backend().await;
    // `refused` proxies WebSocket, but its backends (the simulated ones) answer a handshake
    // with a plain 200: no upgrade happens there.
    let c = Cluster::start_with(Options {
        extra_sets: "[sets.live]\npriority = 1\n".into(),
        extra_pools: vec![("live".into(), backend)],
        extra_toml: "\n[[routes]]\nname = \"ws\"\npath_prefix = \"/ws\"\nset = \"live\"\n\
                     sharded = false\nwebsocket = true\n\
                     \n[[routes]]\nname = \"refused\"\npath_prefix = \"/refused\"\nset = \"core\"\n\
                     sharded = false\nwebsocket = true\n"
            .into(),
        ..Options::default()
    })
    .await;
    let smuggle: &[u8] = b"POST /orders HTTP/1.1\r\nHost: gw\r\nx-user-id: u1\r\n\
        Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    // After a 101 the bytes are the application's, whatever they look like: relayed as they
    // are.
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    s.write_all(format!("GET /ws/chat HTTP/1.1\r\n{HANDSHAKE}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_exact(&mut s, 18).await, b"hello from backend");
    s.write_all(smuggle).await.unwrap();
    assert_eq!(read_exact(&mut s, smuggle.len()).await, smuggle);
    drop(s);

    // A handshake its backend did not accept: the connection stays HTTP/1.1, and a smuggling
    // request pipelined behind it is refused, never forwarded.
    let hits = c.total_hits();
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    let mut payload = format!("GET /refused/chat HTTP/1.1\r\n{HANDSHAKE}").into_bytes();
    payload.extend_from_slice(smuggle);
    s.write_all(&payload).await.unwrap();
    let mut answer = Vec::new();
    within(
        Duration::from_secs(10),
        "the gateway to answer and close",
        s.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 400").count(), 1, "{answer}");
    assert_eq!(c.total_hits(), hits + 1, "only the handshake was forwarded");
}

/// The proxy listener's resting connections (`shardgate_client_connections{state="resting"}`).
async fn resting(c: &Cluster) -> Option<i64> {
    c.metric("shardgate_client_connections{state=\"resting\"}")
        .await
        .map(|v| v as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_rested_still_upgrades() {
    let (backend, heads) = upgrading_backend().await;
    let c = cluster(backend, None).await;
    let mut s = TcpStream::connect(c.proxy()).await.unwrap();
    // A plain request first, then quiet until the connection rests (its hyper connection
    // gone); the handshake then wakes it on the same socket.
    s.write_all(b"GET /nows/a HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exact(&mut s, 5).await, b"plain");
    support::eventually("the connection to rest", || async {
        (resting(&c).await == Some(1)).then_some(())
    })
    .await;

    upgrade_and_echo(&mut s).await;
    let requests = heads
        .lock()
        .unwrap()
        .iter()
        .filter(|h| !h.starts_with("GET /healthz"))
        .count();
    assert_eq!(
        requests, 2,
        "the plain request and the handshake (health probes aside)"
    );
    // An upgraded connection never rests: it is no longer HTTP.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(resting(&c).await, Some(0));
    s.write_all(b"pong").await.unwrap();
    assert_eq!(read_exact(&mut s, 4).await, b"pong");
}
