//! Heap allocations per proxied request (DESIGN.md §11: per-request work), counted by a global
//! allocator (`tools/alloc-counter`) over N sequential keep-alive HTTP/1.1 requests:
//! - direct: the bench's client straight to its backend (what the client and backend cost);
//! - gateway: the same requests through shardgate, in-process, every feature of the request
//!   path on (the request-head gate, a sharded route with `x-shardgate-epoch` and owner-epoch
//!   headers upstream, a set budget, a rate limit, breakers, two IDCs);
//! - the gateway's own share: gateway minus direct.
//!
//! The counts are the whole process's (client, backend and gateway share the allocator), so
//! the gateway's figure is a difference; a quiet window as long as the gateway's run is
//! counted too, to show that background tasks (probes, file polling) add nothing to it. The
//! access log is off, as in the side-by-side bench (`benches/proxy/gateway.sh`).
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

/// Allocations over `n` requests on one connection to `addr`, after `warmup` of them.
async fn measure(
    addr: SocketAddr,
    method: &Method,
    warmup: usize,
    n: usize,
) -> (Snapshot, Duration) {
    let mut client = Client::connect(addr).await;
    for _ in 0..warmup {
        client.send(method).await;
    }
    let (before, t0) = (alloc_counter::snapshot(), Instant::now());
    for _ in 0..n {
        client.send(method).await;
    }
    (alloc_counter::snapshot().since(before), t0.elapsed())
}

fn per_request(s: Snapshot, n: usize) -> (f64, f64) {
    (s.allocations as f64 / n as f64, s.bytes as f64 / n as f64)
}

fn row(method: &Method, what: &str, allocations: f64, bytes: f64) {
    println!("{method:<5}{what:<50}{allocations:>8.1} allocations {bytes:>8.0} bytes");
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (warmup, n) = if bench { (2_000, 20_000) } else { (50, 200) };
    // Two workers, as a small `--threads` gateway: client, backend and gateway share them.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let backend = Arc::new(Backend::default());
        let backend_addr = start_backend(backend.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("topology.toml");
        std::fs::write(&path, document(backend_addr)).unwrap();
        let mut config = Config::for_file(&path);
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin = "127.0.0.1:0".parse().unwrap();
        config.local_idc = Some("sh".into());
        config.file_poll = Duration::from_secs(3600);
        let running = shardgate::start(config).await.unwrap();

        println!("allocations per request, {n} sequential keep-alive HTTP/1.1 requests after {warmup} of warm-up;");
        println!("whole-process counts (client + backend [+ gateway]) / {n}:");
        for method in [Method::GET, Method::POST] {
            let (direct, _) = measure(backend_addr, &method, warmup, n).await;
            let epochs_before = backend.with_epochs.load(Ordering::Relaxed);
            let (through, took) = measure(running.proxy_addr, &method, warmup, n).await;
            let carried = backend.with_epochs.load(Ordering::Relaxed) - epochs_before;
            assert_eq!(carried, (warmup + n) as u64, "every request reached the backend with its epoch headers");
            let quiet_before = alloc_counter::snapshot();
            tokio::time::sleep(took).await;
            let quiet = alloc_counter::snapshot().since(quiet_before);

            let (d_allocs, d_bytes) = per_request(direct, n);
            let (t_allocs, t_bytes) = per_request(through, n);
            row(&method, "direct (client + backend)", d_allocs, d_bytes);
            row(&method, "through the gateway (client + backend + gateway)", t_allocs, t_bytes);
            row(&method, "the gateway alone (difference)", t_allocs - d_allocs, t_bytes - d_bytes);
            println!(
                "{method:<5}quiet window as long as the gateway's run: {} allocations, {} bytes in all",
                quiet.allocations, quiet.bytes
            );
        }
        running.shutdown().await;
    });
}
