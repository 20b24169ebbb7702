//! Shared set-up of the integration tests: three simulated IDCs (`sh`, `bj`, `gz`), each with a
//! `core` and a `noncore` backend on port 0, a topology file in a temporary directory naming
//! them, a gateway started on port 0, and a small HTTP client (HTTP/1.1 and h2c) whose every
//! wait has a deadline.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

pub mod browser;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use shardgate::config::Config;
use shardgate::control::topology::{Shard, Topology};
use shardgate::dev::sim::owners::Owners;
use shardgate::dev::sim::SimBackend;
use shardgate::Running;
use tempfile::TempDir;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)] // each test crate uses a different part
pub use common::{eventually, run_shardgate, within, Output};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every test request uses.
pub type ClientBody = BoxBody<Bytes, BoxError>;

pub const IDCS: [&str; 3] = ["sh", "bj", "gz"];
pub const SETS: [&str; 2] = ["core", "noncore"];

/// How long one request (connect, send, whole answer) may take before the test fails.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(20);
/// How long a polled condition (a reload, a counter) may take to come true.
pub const POLL_DEADLINE: Duration = Duration::from_secs(10);

/// A local port that is bound but not listening: connecting to it is refused, and as long as
/// the socket lives no other test can be given the port.
pub fn refused_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind("127.0.0.1:0".parse().expect("loopback address"))
        .expect("bind a port");
    let addr = socket.local_addr().expect("local address");
    (socket, addr)
}

/// A `[[routes]]` block for `Options::extra_toml`: route `name` under `/name`, in set `set`,
/// keyed by `x-user-id`, with `extra` lines (timeout, methods, limits) after.
pub fn route_toml(name: &str, set: &str, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
path_prefix = "/{name}"
set = "{set}"
key = ["header:x-user-id"]
{extra}
"#
    )
}

/// What the gateway under test is started with.
#[derive(Debug, Clone)]
pub struct Options {
    /// `config.local_idc`: where non-sharded routes and `on_missing_key = "local"` go.
    pub local_idc: Option<String>,
    /// `[[shards.pins]]` as (range, IDC).
    pub pins: Vec<(String, String)>,
    pub file_poll: Duration,
    pub drain: Duration,
    /// Extra pools given to every IDC: (set, address).
    pub extra_pools: Vec<(String, SocketAddr)>,
    /// TOML appended to the document (extra sets and routes).
    pub extra_toml: String,
    /// `max_inflight` of the harness's sets (`core`, `noncore`, `dead`) that should not have
    /// the document's default.
    pub max_inflight: Vec<(&'static str, u32)>,
    /// Extra `[sets.*]` tables, placed before the IDCs.
    pub extra_sets: String,
    /// The document's `[isolation]` tables (shedding threshold, retry budget, breaker), as
    /// TOML; empty for the defaults.
    pub isolation: String,
    /// `config.cache_dir`: `Some` puts it in the test's temporary directory.
    pub cache_dir: bool,
    /// Changes made to the gateway's configuration before it starts (TLS, limits, timeouts).
    pub tweak: Option<ConfigTweak>,
    /// TOML added to every `[[idcs]]` table (e.g. `health.interval_ms = 100`).
    pub idc_toml: String,
}

/// A change to the gateway's configuration, applied after the harness's own settings.
#[derive(Clone)]
pub struct ConfigTweak(pub Arc<dyn Fn(&mut Config) + Send + Sync>);

impl ConfigTweak {
    pub fn new(f: impl Fn(&mut Config) + Send + Sync + 'static) -> Option<ConfigTweak> {
        Some(ConfigTweak(Arc::new(f)))
    }
}

impl std::fmt::Debug for ConfigTweak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigTweak")
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            local_idc: Some("bj".into()),
            pins: vec![("0-63".into(), "gz".into())],
            file_poll: Duration::from_millis(50),
            drain: Duration::from_secs(10),
            extra_pools: Vec::new(),
            extra_toml: String::new(),
            tweak: None,
            idc_toml: String::new(),
            max_inflight: Vec::new(),
            extra_sets: String::new(),
            isolation: String::new(),
            cache_dir: false,
        }
    }
}

/// Validation wants `failover.fence_ms` at least as long as the longest route `timeout_ms` (a
/// write may be in flight that long). A test that sets neither gets a fence that covers its
/// routes; one that sets `fence_ms` itself keeps it (and its document is checked as is).
fn fence_covers_routes(mut doc: String) -> String {
    if doc.contains("fence_ms") {
        return doc;
    }
    let longest = doc
        .lines()
        .filter_map(|l| l.trim().strip_prefix("timeout_ms = "))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    if longest <= 2000 {
        return doc;
    }
    let line = format!("fence_ms = {longest}\n");
    match doc.find("[failover]\n") {
        Some(at) => doc.insert_str(at + "[failover]\n".len(), &line),
        None => doc.push_str(&format!("\n[failover]\n{line}")),
    }
    doc
}

/// The routes of every test topology.
///
/// - `orders`: sharded by header, query, cookie, then path segment 2.
/// - `upload`: large POST bodies (a timeout as long as the default `fence_ms`, the longest
///   a topology may have without raising `fence_ms`).
/// - `recommendations`: `on_missing_key = "local"`, noncore.
/// - `catalog`: not sharded.
/// - `slow`: a 300 ms timeout, for 504.
/// - `dead`: its pools point at a closed port in every IDC, for 502.
const ROUTES: &str = r#"
[[routes]]
name = "orders"
path_prefix = "/orders"
methods = ["GET", "POST", "PUT"]
set = "core"
key = ["header:x-user-id", "query:user_id", "cookie:uid", "path:2"]
timeout_ms = 1000

[[routes]]
name = "upload"
path_prefix = "/upload"
methods = ["POST"]
set = "core"
key = ["header:x-user-id"]
timeout_ms = 2000
retries = 0

[[routes]]
name = "recommendations"
path_prefix = "/recommendations"
methods = ["GET"]
set = "noncore"
key = ["header:x-user-id"]
on_missing_key = "local"

[[routes]]
name = "catalog"
path_prefix = "/catalog"
set = "noncore"
sharded = false

[[routes]]
name = "slow"
path_prefix = "/slow"
set = "core"
key = ["header:x-user-id"]
timeout_ms = 300
retries = 0

[[routes]]
name = "dead"
path_prefix = "/dead"
set = "dead"
key = ["header:x-user-id"]
timeout_ms = 2000
retries = 0
"#;

/// Three simulated IDCs and a gateway in front of them.
pub struct Cluster {
    pub dir: TempDir,
    pub topology_path: PathBuf,
    pub options: Options,
    /// `sims[idc * 2 + set]`, in the order of `IDCS` and `SETS`; `None` while stopped.
    sims: Vec<Option<SimBackend>>,
    /// Their addresses (kept while stopped, so a restart takes the same one).
    sim_addrs: Vec<SocketAddr>,
    /// The ownership board the simulated IDCs share (the misroute contract).
    owners: Arc<Owners>,
    /// The address of every `dead` pool, and the socket keeping it refused.
    dead: SocketAddr,
    _dead_port: TcpSocket,
    running: Option<Running>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        Cluster::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Cluster {
        let owners = Arc::new(Owners::new());
        let mut sims = Vec::new();
        for idc in IDCS {
            for set in SETS {
                let addr = "127.0.0.1:0".parse().expect("loopback address");
                let sim = within(
                    Duration::from_secs(5),
                    "a simulated backend to start",
                    SimBackend::start_on_board(addr, idc, set, owners.clone()),
                )
                .await
                .expect("start a simulated backend");
                sims.push(sim);
            }
        }
        let sim_addrs = sims.iter().map(|s| s.addr).collect();
        let sims = sims.into_iter().map(Some).collect();
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let topology_path = dir.path().join("topology.toml");
        let (dead_port, dead) = refused_port();
        let mut cluster = Cluster {
            dir,
            topology_path,
            options,
            sims,
            sim_addrs,
            owners,
            dead,
            _dead_port: dead_port,
            running: None,
        };
        let pins: Vec<(String, String)> = cluster.options.pins.clone();
        let pins: Vec<(&str, &str)> = pins.iter().map(|(r, i)| (&r[..], &i[..])).collect();
        let doc = cluster.document(&pins);
        cluster.write_topology(&doc);

        cluster.running = Some(cluster.start_gateway().await);
        cluster
    }

    /// The gateway's configuration: ports 0, this cluster's topology file and cache dir.
    fn config(&self) -> Config {
        let mut config = loopback_config(&self.topology_path);
        config.local_idc = self.options.local_idc.clone();
        config.file_poll = self.options.file_poll;
        config.timeouts.drain = self.options.drain;
        if self.options.cache_dir {
            config.cache_dir = Some(self.dir.path().join("cache"));
        }
        if let Some(tweak) = &self.options.tweak {
            (tweak.0)(&mut config);
        }
        config
    }

    async fn start_gateway(&self) -> Running {
        start_gateway(self.config()).await
    }

    /// Stops the gateway and starts a new one on the same topology file and cache dir (new
    /// ports), as a restart of the process would.
    pub async fn restart(&mut self) {
        if let Some(running) = self.running.take() {
            within(
                Duration::from_secs(15),
                "the gateway to shut down",
                running.shutdown(),
            )
            .await;
        }
        self.running = Some(self.start_gateway().await);
    }

    /// The test topology with these pins, naming this cluster's backends.
    pub fn document(&self, pins: &[(&str, &str)]) -> String {
        let mut s = String::from("cluster = \"itest\"\nshard_count = 1024\n\n");
        for (set, fields) in [
            ("core", "priority = 0\n"),
            ("noncore", "priority = 2\ndegradable = true\n"),
            ("dead", "priority = 1\n"),
        ] {
            s.push_str(&format!("[sets.{set}]\n{fields}"));
            if let Some((_, n)) = self.options.max_inflight.iter().find(|(x, _)| *x == set) {
                s.push_str(&format!("max_inflight = {n}\n"));
            }
        }
        s.push_str(&self.options.extra_sets);
        for (i, idc) in IDCS.iter().enumerate() {
            s.push_str(&format!(
                "\n[[idcs]]\nname = \"{idc}\"\nweight = 100\npools.core = [\"{}\"]\npools.noncore = [\"{}\"]\npools.dead = [\"{}\"]\n",
                self.sim_addrs[i * 2], self.sim_addrs[i * 2 + 1], self.dead
            ));
            s.push_str(&self.options.idc_toml);
            // Entries naming the same set make one pool of several backends.
            let mut pools: Vec<(&str, Vec<String>)> = Vec::new();
            for (set, addr) in &self.options.extra_pools {
                match pools.iter_mut().find(|(s, _)| *s == set.as_str()) {
                    Some((_, addrs)) => addrs.push(format!("\"{addr}\"")),
                    None => pools.push((set, vec![format!("\"{addr}\"")])),
                }
            }
            for (set, addrs) in pools {
                s.push_str(&format!("pools.{set} = [{}]\n", addrs.join(", ")));
            }
        }
        for (range, idc) in pins {
            s.push_str(&format!(
                "\n[[shards.pins]]\nrange = \"{range}\"\nidc = \"{idc}\"\n"
            ));
        }
        s.push('\n');
        s.push_str(&self.options.isolation);
        s.push_str(ROUTES);
        s.push_str(&self.options.extra_toml);
        fence_covers_routes(s)
    }

    /// Replaces the topology file atomically (write aside, then rename), as an operator's
    /// deploy tool would, so the gateway never reads half a file.
    pub fn write_topology(&self, text: &str) {
        let tmp = self.dir.path().join(".topology.toml.tmp");
        std::fs::write(&tmp, text).expect("write the topology file");
        std::fs::rename(&tmp, &self.topology_path).expect("move the topology file in place");
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("the gateway is running")
    }

    /// Hands the gateway over (to shut it down in a test).
    pub fn take_running(&mut self) -> Running {
        self.running.take().expect("the gateway is running")
    }

    pub fn proxy(&self) -> SocketAddr {
        self.running().proxy_addr
    }

    pub fn admin(&self) -> SocketAddr {
        self.running().admin_addr
    }

    /// The snapshot being served now.
    pub fn topology(&self) -> Arc<Topology> {
        self.running()
            .snapshots
            .current()
            .expect("a topology snapshot is published")
    }

    /// The name of the IDC serving `key`'s shard in the current snapshot.
    pub fn serving_idc_of(&self, key: &str) -> String {
        let t = self.topology();
        let shard = Shard::of_key(key.as_bytes(), t.shard_count);
        let idc = t.serving(shard).expect("every shard has a serving IDC");
        t.idc(idc).name.to_string()
    }

    fn sim_index(idc: &str, set: &str) -> usize {
        let i = IDCS.iter().position(|n| *n == idc).expect("a test IDC");
        let s = SETS.iter().position(|n| *n == set).expect("a test set");
        i * 2 + s
    }

    pub fn sim(&self, idc: &str, set: &str) -> &SimBackend {
        self.sims[Self::sim_index(idc, set)]
            .as_ref()
            .expect("the simulated backend is running")
    }

    /// The address of a simulated backend (also while it is stopped).
    /// The ownership board the simulated IDCs share.
    pub fn owners(&self) -> &Arc<Owners> {
        &self.owners
    }

    pub fn sim_addr(&self, idc: &str, set: &str) -> SocketAddr {
        self.sim_addrs[Self::sim_index(idc, set)]
    }

    /// Stops a simulated backend (a crashed backend, as the gateway sees it).
    pub async fn stop_sim(&mut self, idc: &str, set: &str) {
        if let Some(sim) = self.sims[Self::sim_index(idc, set)].take() {
            within(
                Duration::from_secs(5),
                "a simulated backend to stop",
                sim.stop(),
            )
            .await;
        }
    }

    /// Starts a stopped simulated backend again, on its old address.
    pub async fn restart_sim(&mut self, idc: &str, set: &str) {
        let i = Self::sim_index(idc, set);
        let sim = within(
            Duration::from_secs(5),
            "a simulated backend to restart",
            SimBackend::start_on_board(self.sim_addrs[i], idc, set, self.owners.clone()),
        )
        .await
        .expect("restart a simulated backend on its address");
        self.sims[i] = Some(sim);
    }

    /// Requests answered by every simulated backend together.
    pub fn total_hits(&self) -> u64 {
        self.sims.iter().flatten().map(SimBackend::hits).sum()
    }

    /// Sends a request to the proxy listener.
    pub async fn send(&self, req: Request<ClientBody>) -> Reply {
        send(self.proxy(), req).await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Reply {
        send(self.admin(), get(path, &[])).await
    }

    /// The value of the `/metrics` line that starts with `series` (`name{labels}`), if any.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.admin_get("/metrics").await.text();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Stops the gateway (if still running) and the backends.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            within(
                Duration::from_secs(15),
                "the gateway to shut down",
                running.shutdown(),
            )
            .await;
        }
        for sim in self.sims.drain(..).flatten() {
            within(
                Duration::from_secs(5),
                "a simulated backend to stop",
                sim.stop(),
            )
            .await;
        }
    }
}

/// A configuration serving the topology file at `path`, on loopback ports the system chooses.
fn loopback_config(path: &std::path::Path) -> Config {
    let mut config = Config::for_file(path);
    config.listen = "127.0.0.1:0".parse().expect("loopback address");
    config.admin = "127.0.0.1:0".parse().expect("loopback address");
    config
}

/// A gateway started on `config`, within 10 s.
async fn start_gateway(config: Config) -> Running {
    within(
        Duration::from_secs(10),
        "the gateway to start",
        shardgate::start(config),
    )
    .await
    .expect("the gateway starts")
}

/// A gateway on loopback ports chosen by the system, serving `topology` (written to `dir`),
/// its configuration adjusted by `tweak` first.
pub async fn gateway_on_topology(
    dir: &std::path::Path,
    topology: &str,
    tweak: impl FnOnce(&mut Config),
) -> Running {
    let path = dir.join("topology.toml");
    std::fs::write(&path, topology).expect("write the topology");
    let mut config = loopback_config(&path);
    tweak(&mut config);
    start_gateway(config).await
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "the {} answer is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The IDC of the simulated backend that answered.
    pub fn idc(&self) -> String {
        let v = self.json();
        v["idc"]
            .as_str()
            .unwrap_or_else(|| panic!("not a simulated backend's answer: {v}"))
            .to_owned()
    }

    /// A header as the simulated backend received it from the gateway.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }

    /// `x-shardgate-shard` of the answer, as a number.
    pub fn shard(&self) -> Option<u32> {
        self.header("x-shardgate-shard").map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("x-shardgate-shard `{s}` is not a number"))
        })
    }
}

fn full(body: impl Into<Bytes>) -> ClientBody {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A request with these headers and body.
pub fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<ClientBody> {
    let mut req = Request::new(full(body));
    *req.method_mut() = method;
    *req.uri_mut() = path.parse().expect("a valid request path");
    for (k, v) in headers {
        req.headers_mut().append(
            http::header::HeaderName::from_bytes(k.as_bytes()).expect("a valid header name"),
            HeaderValue::from_str(v).expect("a valid header value"),
        );
    }
    req
}

pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<ClientBody> {
    request(Method::GET, path, headers, Bytes::new())
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole answer.
pub async fn send(addr: SocketAddr, req: Request<ClientBody>) -> Reply {
    let what = format!("{} {} via {addr}", req.method(), req.uri());
    match try_send(addr, req).await {
        Ok(r) => r,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Like `send`, but a failure (refused connection, reset) comes back as an error.
pub async fn try_send(addr: SocketAddr, req: Request<ClientBody>) -> Result<Reply, String> {
    let what = format!("{} {}", req.method(), req.uri());
    within(REQUEST_DEADLINE, &what, async {
        let resp = open(addr, req).await?;
        collect(resp).await
    })
    .await
}

/// Sends one request on a fresh HTTP/1.1 connection and returns as soon as the response head
/// is in; the body streams from the returned response.
pub async fn open(
    addr: SocketAddr,
    mut req: Request<ClientBody>,
) -> Result<Response<Incoming>, String> {
    if !req.headers().contains_key(http::header::HOST) {
        let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
        req.headers_mut().insert(http::header::HOST, host);
    }
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("exchange: {e}"))
}

/// Sends one request over HTTP/2 with prior knowledge (h2c).
pub async fn send_h2c(addr: SocketAddr, mut req: Request<ClientBody>) -> Reply {
    let what = format!("h2c {} {}", req.method(), req.uri());
    // HTTP/2 carries the authority in the request target.
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = format!("http://{addr}{pq}")
        .parse()
        .expect("an absolute URI");
    let result = within(REQUEST_DEADLINE, &what, async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("exchange: {e}"))?;
        collect(resp).await
    })
    .await;
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn collect(resp: Response<Incoming>) -> Result<Reply, String> {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    })
}

/// A request body fed chunk by chunk from a channel, without a length: sent chunked.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|d| Ok(Frame::data(d))))
    }
}

/// A streamed body and the sender that feeds it; dropping the sender ends the body.
pub fn channel_body() -> (mpsc::Sender<Bytes>, ClientBody) {
    let (tx, rx) = mpsc::channel(4);
    (tx, ChannelBody { rx }.boxed())
}

/// Deterministic, incompressible-looking test data: chunk `i` of `len` bytes.
pub fn pattern_chunk(i: usize, len: usize) -> Bytes {
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    Bytes::from(v)
}

/// Keys (`prefix-N`) whose shard satisfies `want`, `count` of them.
pub fn keys_where(prefix: &str, count: usize, mut want: impl FnMut(Shard) -> bool) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| want(Shard::of_key(k.as_bytes(), 1024)))
        .take(count)
        .collect()
}
