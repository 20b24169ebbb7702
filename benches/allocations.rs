//! Heap allocations per proxied request (DESIGN.md §11: per-request work), counted by a global
//! allocator (`tools/alloc-counter`) over N sequential keep-alive HTTP/1.1 requests, GET and
//! a small POST:
//! - direct: the bench's client straight to its backend;
//! - through shardgate, in-process, with every feature of the request path on (the
//!   request-head gate, a sharded route with `x-shardgate-epoch` and owner-epoch headers
//!   upstream, set budgets, a rate limit, breakers, two IDCs).
//!
//! The gateway runs on a runtime of its own whose threads count apart from the client's and
//! the backend's, so its figure is its own work, not a difference (the client and backend do
//! a little more through it: they parse the headers it adds). Its threads are also counted
//! through a quiet window as long as the run, to show that background tasks (probes, file
//! polling) add nothing. The access log is off, as in the side-by-side bench
//! (`benches/proxy/gateway.sh`).
//!
//! `cargo bench --bench allocations` (`make bench-alloc`); under `cargo test` a short run.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly on purpose

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloc_counter::Snapshot;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use shardgate::config::Config;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static COUNTING: alloc_counter::Counting = alloc_counter::Counting;

/// Distinct sharding keys the requests cycle through (shards in both IDCs).
const KEYS: usize = 64;

/// The bench's backend: answers every request `200 ok`, after reading its body, and counts the
/// requests that carried the gateway's epoch headers.
#[derive(Default)]
struct Backend {
    with_epochs: AtomicU64,
}

async fn start_backend(backend: Arc<Backend>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let backend = backend.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let backend = backend.clone();
                async move {
                    let h = req.headers();
                    if h.contains_key("x-shardgate-epoch")
                        && h.contains_key("x-shardgate-owner-epoch")
                    {
                        backend.with_epochs.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
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

/// Two IDCs on the one backend, shards split between them, one sharded route with a rate
/// limit in a budgeted set; health probes and file polling far apart (they would otherwise
/// allocate during the count).
fn document(backend: SocketAddr) -> String {
    let mut doc = String::from(
        "cluster = \"alloc\"\nshard_count = 1024\n\
         [sets.core]\npriority = 0\nmax_inflight = 4096\n\
         [sets.noncore]\npriority = 2\nmax_inflight = 1024\ndegradable = true\n",
    );
    for idc in ["sh", "bj"] {
        doc.push_str(&format!(
            "[[idcs]]\nname = \"{idc}\"\nweight = 100\n\
             health = {{ interval_ms = 3600000, timeout_ms = 300 }}\n\
             pools.core = [\"{backend}\"]\npools.noncore = [\"{backend}\"]\n"
        ));
    }
    doc.push_str(
        "[[shards.pins]]\nrange = \"0-511\"\nidc = \"bj\"\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nmethods = [\"GET\", \"POST\"]\n\
         set = \"core\"\nkey = [\"header:x-user-id\", \"query:user_id\"]\ntimeout_ms = 1000\n\
         retries = 1\nrate_limit = { rps = 10000000, burst = 10000000 }\n",
    );
    doc
}

/// One keep-alive connection and the requests it sends.
struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    keys: Vec<HeaderValue>,
    sent: usize,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client {
            sender,
            host: HeaderValue::from_static("api.example.com"),
            keys: (0..KEYS)
                .map(|i| HeaderValue::from_str(&format!("user-{i}")).unwrap())
                .collect(),
            sent: 0,
        }
    }

    /// Sends one request and reads its whole answer.
    async fn send(&mut self, method: &Method) {
        let key = self.keys[self.sent % KEYS].clone();
        self.sent += 1;
        let body = if method == Method::POST {
            Bytes::from_static(b"{\"qty\":1}")
        } else {
            Bytes::new()
        };
        let req = Request::builder()
            .method(method.clone())
            .uri("/orders/items")
            .header(http::header::HOST, self.host.clone())
            .header("x-user-id", key)
            .body(Full::new(body))
            .unwrap();
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{:?}", resp.headers());
        resp.into_body().collect().await.unwrap();
    }
}

/// The thread group of the gateway's runtime (the client and backend are in group 0).
const GATEWAY: usize = 1;

/// What `n` requests on one connection to `addr` cost, after `warmup` of them: (client and
/// backend, the gateway's threads), and how long they took.
async fn measure(
    addr: SocketAddr,
    method: &Method,
    warmup: usize,
    n: usize,
) -> (Snapshot, Snapshot, Duration) {
    let mut client = Client::connect(addr).await;
    for _ in 0..warmup {
        client.send(method).await;
    }
    let peers = alloc_counter::group_snapshot(0);
    let gateway = alloc_counter::group_snapshot(GATEWAY);
    let t0 = Instant::now();
    for _ in 0..n {
        client.send(method).await;
    }
    (
        alloc_counter::group_snapshot(0).since(peers),
        alloc_counter::group_snapshot(GATEWAY).since(gateway),
        t0.elapsed(),
    )
}

fn per_request(s: Snapshot, n: usize) -> (f64, f64) {
    (s.allocations as f64 / n as f64, s.bytes as f64 / n as f64)
}

fn row(method: &Method, what: &str, counted: Snapshot, n: usize) {
    let (allocations, bytes) = per_request(counted, n);
    println!(
        "{:<5}{what:<44}{allocations:>7.1} allocations {bytes:>8.0} bytes",
        method.as_str()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (warmup, n) = if bench { (2_000, 20_000) } else { (50, 200) };
    // One worker for the client and backend, one for the gateway (as `--threads 1` in the
    // side-by-side bench); the gateway's threads count in their own group.
    let peers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(|| alloc_counter::join_group(GATEWAY))
        .enable_all()
        .build()
        .unwrap();

    let backend = Arc::new(Backend::default());
    let backend_addr = peers.block_on(start_backend(backend.clone()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.toml");
    std::fs::write(&path, document(backend_addr)).unwrap();
    let mut config = Config::for_file(&path);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.local_idc = Some("sh".into());
    config.file_poll = Duration::from_secs(3600);
    let running = gateway_rt.block_on(shardgate::start(config)).unwrap();

    println!(
        "heap allocations and bytes allocated per request: {n} sequential keep-alive HTTP/1.1 \
         requests after {warmup} of warm-up"
    );
    peers.block_on(async {
        for method in [Method::GET, Method::POST] {
            let (direct, _, _) = measure(backend_addr, &method, warmup, n).await;
            let epochs_before = backend.with_epochs.load(Ordering::Relaxed);
            let (peers_through, gateway, took) =
                measure(running.proxy_addr, &method, warmup, n).await;
            let carried = backend.with_epochs.load(Ordering::Relaxed) - epochs_before;
            assert_eq!(
                carried,
                (warmup + n) as u64,
                "every request reached the backend with its epoch headers"
            );
            let quiet_before = alloc_counter::group_snapshot(GATEWAY);
            tokio::time::sleep(took).await;
            let quiet = alloc_counter::group_snapshot(GATEWAY).since(quiet_before);

            row(&method, "client + backend, direct", direct, n);
            row(
                &method,
                "client + backend, through the gateway",
                peers_through,
                n,
            );
            row(&method, "the gateway (its own threads)", gateway, n);
            println!(
                "{:<5}the gateway's threads, idle as long: {} allocations, {} bytes in all",
                method.as_str(),
                quiet.allocations,
                quiet.bytes
            );
        }
    });
    gateway_rt.block_on(running.shutdown());
}
