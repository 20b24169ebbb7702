//! Shared set-up of the etcd tests (and the propagation benchmark): a real `etcd` process on
//! free loopback ports with a temporary data dir, killed by PID when dropped; a relay in front
//! of it that a test can cut and restore; three simulated IDCs and topology documents naming
//! them; gateways in etcd mode on port 0; a small HTTP client; the `shardgate` binary for the
//! operator commands. Every wait is bounded; nothing uses a fixed port. No mock of etcd.

// Each test crate uses a different part of this module; tests may unwrap.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::config::RawConfig;
use shardgate::control::topology::Shard;
use shardgate::dev::sim::owners::Owners;
use shardgate::dev::sim::SimBackend;
use shardgate::Running;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

#[path = "../common/mod.rs"]
mod common;
#[allow(unused_imports)] // each test crate uses a different part
pub use common::{eventually, run_shardgate, within, Output};

pub const IDCS: [&str; 3] = ["sh", "bj", "gz"];
pub const CLUSTER: &str = "itest";

/// How long a polled condition may take to come true before the test fails.
pub const POLL_DEADLINE: Duration = Duration::from_secs(20);

/// A free loopback port: bound, read, released. Another process may take it before etcd
/// binds it: [`Etcd::start`] checks that the etcd it reaches is its own and retries on new
/// ports. For an address where nothing answers use [`refused_url`].
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a throwaway port");
    l.local_addr().expect("local address").port()
}

/// An etcd URL where nothing will ever answer: the port stays bound (not listening) for as
/// long as the returned socket lives, so connections are refused and no other test or
/// process can be given the port meanwhile.
pub fn refused_url() -> (tokio::net::TcpSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a port");
    let port = socket.local_addr().expect("local address").port();
    (socket, format!("http://127.0.0.1:{port}"))
}

/// How many times [`Etcd::start`] tries new ports when the ones it picked were taken.
const START_ATTEMPTS: usize = 5;

fn etcd_binary() -> PathBuf {
    let installed = Path::new("/usr/bin/etcd");
    if installed.exists() {
        installed.to_owned()
    } else {
        PathBuf::from("etcd")
    }
}

/// TLS material for an etcd that requires TLS and client certificates, made at test time
/// (rcgen): a CA, etcd's server certificate for 127.0.0.1, and a client certificate whose
/// common name is no etcd user (so that access comes from the password, not the certificate).
pub struct EtcdTls {
    _dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl EtcdTls {
    pub fn generate() -> EtcdTls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().expect("a temporary directory for certificates");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "shardgate etcd test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key"))
            .expect("a self-signed CA");
        let leaf = |names: &[&str], cn: &str, name: &str| {
            let key = KeyPair::generate().expect("a leaf key");
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .expect("leaf parameters");
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &ca).expect("a signed leaf");
            let cert_path = dir.path().join(format!("{name}.pem"));
            let key_path = dir.path().join(format!("{name}.key"));
            std::fs::write(&cert_path, cert.pem()).expect("write a certificate");
            std::fs::write(&key_path, key.serialize_pem()).expect("write a key");
            (cert_path, key_path)
        };
        let (server_cert, server_key) = leaf(&["127.0.0.1", "localhost"], "etcd", "server");
        let (client_cert, client_key) = leaf(&["shardgate-client"], "shardgate-client", "client");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("write the CA");
        EtcdTls {
            _dir: dir,
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// The etcdctl / shardgate flags that present this material.
    pub fn etcdctl_flags(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", self.ca.display()),
            format!("--cert={}", self.client_cert.display()),
            format!("--key={}", self.client_key.display()),
        ]
    }

    pub fn shardgate_flags(&self) -> Vec<String> {
        vec![
            format!("--etcd-ca={}", self.ca.display()),
            format!("--etcd-cert={}", self.client_cert.display()),
            format!("--etcd-key={}", self.client_key.display()),
        ]
    }
}

/// A real etcd server of one member.
pub struct Etcd {
    child: Option<Child>,
    pub url: String,
    pub client_addr: SocketAddr,
    peer_port: u16,
    dir: TempDir,
    /// TLS with client certificates required, when set.
    pub tls: Option<Arc<EtcdTls>>,
    /// (user, password) once auth is enabled.
    pub auth: Option<(String, String)>,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// An etcd that serves only TLS on its client port and requires client certificates.
    pub async fn start_tls(tls: Arc<EtcdTls>) -> Etcd {
        Etcd::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Arc<EtcdTls>>) -> Etcd {
        // The ports are picked free but released before etcd binds them: when another
        // process took one meanwhile, this etcd exits (or another one answers), and the
        // attempt is repeated on new ports.
        for attempt in 1..=START_ATTEMPTS {
            let client_port = free_port();
            let peer_port = free_port();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut etcd = Etcd {
                child: None,
                url: format!("{scheme}://127.0.0.1:{client_port}"),
                client_addr: SocketAddr::from(([127, 0, 0, 1], client_port)),
                peer_port,
                dir: tempfile::tempdir().expect("a temporary directory for etcd"),
                tls: tls.clone(),
                auth: None,
            };
            etcd.spawn();
            match etcd.try_ready().await {
                Ok(()) => return etcd,
                Err(why) if attempt < START_ATTEMPTS => {
                    eprintln!("etcd on port {client_port} did not start ({why}); new ports");
                }
                Err(why) => panic!("etcd did not start in {START_ATTEMPTS} attempts: {why}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// This etcd's member name: unique, so that the readiness check recognises its own
    /// process and not another etcd that took the port.
    fn member_name(&self) -> String {
        format!("itest-{}-{}", std::process::id(), self.peer_port)
    }

    /// Adds the `root` user with `password` and turns etcd's auth on, with etcdctl as an
    /// operator would; from then on every client of this value signs in as root.
    pub async fn enable_auth(&mut self, password: &str) {
        let mut base = vec![format!("--endpoints={}", self.url)];
        if let Some(tls) = &self.tls {
            base.extend(tls.etcdctl_flags());
        }
        for args in [
            vec![
                "user".to_owned(),
                "add".to_owned(),
                "root".to_owned(),
                format!("--new-user-password={password}"),
            ],
            vec!["auth".to_owned(), "enable".to_owned()],
        ] {
            let out = within(
                Duration::from_secs(20),
                "etcdctl",
                tokio::process::Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .args(&base)
                    .args(&args)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("run etcdctl");
            assert!(
                out.status.success(),
                "etcdctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.auth = Some(("root".to_owned(), password.to_owned()));
    }

    /// How a client of this etcd connects (TLS material, credentials).
    pub fn connect_options(&self) -> Option<etcd_client::ConnectOptions> {
        if self.tls.is_none() && self.auth.is_none() {
            return None;
        }
        let mut o = etcd_client::ConnectOptions::new();
        if let Some(tls) = &self.tls {
            let read = |p: &Path| std::fs::read(p).expect("read TLS material");
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.client_cert),
                        read(&tls.client_key),
                    )),
            );
        }
        if let Some((user, password)) = &self.auth {
            o = o.with_user(user, password);
        }
        Some(o)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("open the etcd log");
        let mut command = Command::new(etcd_binary());
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(self.member_name())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&self.url)
            .arg("--advertise-client-urls")
            .arg(&self.url)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("{}={peer}", self.member_name()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (is etcd installed? `make deps` installs etcd-server)");
        self.child = Some(child);
    }

    /// Polls until this etcd (not another process on its port) answers a read, for at most
    /// 20 s.
    pub async fn wait_ready(&mut self) {
        if let Err(why) = self.try_ready().await {
            panic!("{why}");
        }
    }

    /// Waits until etcd answers a read and lists its own member; an error when the process
    /// exited (a port was taken) or nothing of its own answered within 20 s.
    async fn try_ready(&mut self) -> Result<(), String> {
        let url = self.url.clone();
        let name = self.member_name();
        let log = self.dir.path().join("etcd.log");
        let options = self.connect_options();
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("etcd exited ({status})"));
                    }
                }
                let attempt = tokio::time::timeout(Duration::from_secs(1), async {
                    let mut c =
                        etcd_client::Client::connect([url.as_str()], options.clone()).await?;
                    c.get("ready-probe", None).await?;
                    c.member_list().await
                })
                .await;
                if let Ok(Ok(members)) = attempt {
                    if members.members().iter().any(|m| m.name() == name) {
                        return Ok(());
                    }
                    return Err(format!("another etcd answers on {url}"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let why = match ready {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => why,
            Err(_) => "not ready within 20 s".to_owned(),
        };
        // Whatever runs of it goes: the next attempt starts clean.
        self.kill();
        let log = std::fs::read_to_string(log).unwrap_or_default();
        Err(format!("etcd at {}: {why}\n{log}", self.url))
    }

    /// Kills the process (SIGKILL by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// Replaces it with an empty etcd on the same ports (its data is gone, its revision
    /// starts again from 1), as after a disaster recovery.
    pub async fn replace_with_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.dir.path().join("data")).expect("remove etcd's data");
        self.spawn();
        self.wait_ready().await;
    }

    pub async fn client(&self) -> etcd_client::Client {
        within(
            Duration::from_secs(5),
            "a connection to etcd",
            etcd_client::Client::connect([self.url.as_str()], self.connect_options()),
        )
        .await
        .expect("connect to etcd")
    }

    /// Puts `value` at `/shardgate/<CLUSTER>/<name>`; the revision of the write.
    pub async fn put(&self, name: &str, value: &str) -> i64 {
        let mut c = self.client().await;
        let resp = within(
            Duration::from_secs(5),
            "an etcd put",
            c.put(format!("/shardgate/{CLUSTER}/{name}"), value, None),
        )
        .await
        .expect("put into etcd");
        resp.header().expect("a response header").revision()
    }

    /// Deletes `/shardgate/<CLUSTER>/<name>`.
    pub async fn delete(&self, name: &str) {
        let mut c = self.client().await;
        within(
            Duration::from_secs(5),
            "an etcd delete",
            c.delete(format!("/shardgate/{CLUSTER}/{name}"), None),
        )
        .await
        .expect("delete from etcd");
    }

    /// The value at `/shardgate/<CLUSTER>/<name>`.
    pub async fn get(&self, name: &str) -> Option<Vec<u8>> {
        let mut c = self.client().await;
        let resp = within(
            Duration::from_secs(5),
            "an etcd get",
            c.get(format!("/shardgate/{CLUSTER}/{name}"), None),
        )
        .await
        .expect("get from etcd");
        resp.kvs().first().map(|kv| kv.value().to_vec())
    }

    /// Names (relative to the cluster prefix) of the keys under `/shardgate/<CLUSTER>/<prefix>`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut c = self.client().await;
        let resp = within(
            Duration::from_secs(5),
            "an etcd list",
            c.get(
                format!("/shardgate/{CLUSTER}/{prefix}"),
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            ),
        )
        .await
        .expect("list etcd keys");
        let base = format!("/shardgate/{CLUSTER}/");
        resp.kvs()
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|k| k.strip_prefix(&base))
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Compacts the history up to `revision` (physically, so old revisions are gone).
    pub async fn compact(&self, revision: i64) {
        let mut c = self.client().await;
        within(
            Duration::from_secs(10),
            "an etcd compaction",
            c.compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            ),
        )
        .await
        .expect("compact etcd");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay in front of etcd that a test can cut (every connection closed, new ones
/// refused) and restore: a network partition between a gateway and etcd, while etcd stays up
/// for the test's own writes.
pub struct Relay {
    pub url: String,
    open: Arc<AtomicBool>,
    /// While false, relayed bytes are held back (connections stay open): a black hole.
    flowing: tokio::sync::watch::Sender<bool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

/// Copies `from` to `to`, holding each chunk back while `flowing` is false.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut flowing: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if flowing.wait_for(|f| *f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let open = Arc::new(AtomicBool::new(true));
        let flowing = tokio::sync::watch::channel(true).0;
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let open = open.clone();
            let conns = conns.clone();
            let flowing = flowing.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let (up, down) = (flowing.subscribe(), flowing.subscribe());
                    let handle = tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(upstream).await {
                            let (ir, iw) = inbound.into_split();
                            let (or, ow) = outbound.into_split();
                            tokio::join!(pump(ir, ow, up), pump(or, iw, down));
                        }
                    });
                    conns.lock().unwrap().push(handle.abort_handle());
                }
            })
        };
        Relay {
            url: format!("http://{addr}"),
            open,
            flowing,
            conns,
            task,
        }
    }

    /// Holds every byte back without closing anything: a partition that drops packets, so
    /// the gateway notices only by its own deadlines (a stalled watch, unanswered keep-alives).
    pub fn stall(&self) {
        self.flowing.send_replace(false);
    }

    /// Lets the held bytes through again.
    pub fn resume(&self) {
        self.flowing.send_replace(true);
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// Three simulated IDCs, each with a `core` and a `noncore` backend.
pub struct Idcs {
    sims: Vec<SimBackend>,
    /// The ownership board they share (the misroute contract).
    pub owners: Arc<Owners>,
}

impl Idcs {
    pub async fn start() -> Idcs {
        let owners = Arc::new(Owners::new());
        let mut sims = Vec::new();
        for idc in IDCS {
            for set in ["core", "noncore"] {
                let addr = "127.0.0.1:0".parse().expect("loopback");
                let sim = within(
                    Duration::from_secs(5),
                    "a simulated backend",
                    SimBackend::start_on_board(addr, idc, set, owners.clone()),
                )
                .await
                .expect("start a simulated backend");
                sims.push(sim);
            }
        }
        Idcs { sims, owners }
    }

    /// Answers every request held with `x-sim-hold` by any simulated backend.
    pub fn release_held(&self) {
        for sim in &self.sims {
            sim.release_held();
        }
    }

    /// A topology for these IDCs with `pins` as (range, IDC): routes `orders` (core) and
    /// `recs` (noncore, degradable), both sharded by `x-user-id`, with a 300 ms timeout (so a
    /// test may hold a fence as short as 300 ms: `fence_ms` must cover every route timeout).
    pub fn document(&self, pins: &[(&str, &str)]) -> String {
        let mut s = format!(
            "cluster = \"{CLUSTER}\"\nshard_count = 1024\n\n\
             [sets.core]\npriority = 0\n[sets.noncore]\npriority = 2\ndegradable = true\n"
        );
        for (i, idc) in IDCS.iter().enumerate() {
            s.push_str(&format!(
                "\n[[idcs]]\nname = \"{idc}\"\nweight = 100\npools.core = [\"{}\"]\npools.noncore = [\"{}\"]\n",
                self.sims[i * 2].addr,
                self.sims[i * 2 + 1].addr
            ));
        }
        for (range, idc) in pins {
            s.push_str(&format!(
                "\n[[shards.pins]]\nrange = \"{range}\"\nidc = \"{idc}\"\n"
            ));
        }
        s.push_str(
            "\n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\n\
             key = [\"header:x-user-id\"]\ntimeout_ms = 300\n\
             \n[[routes]]\nname = \"recs\"\npath_prefix = \"/recs\"\nset = \"noncore\"\n\
             key = [\"header:x-user-id\"]\ntimeout_ms = 300\n",
        );
        s
    }
}

/// A sharding key whose shard is in `lo..=hi` (of 1024).
pub fn key_in(lo: u32, hi: u32) -> String {
    (0..100_000)
        .map(|i| format!("user-{i}"))
        .find(|k| (lo..=hi).contains(&Shard::of_key(k.as_bytes(), 1024).0))
        .expect("some key falls in the range")
}

/// What a gateway under test is started with.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    pub instance: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub idc: Option<String>,
}

/// Starts a gateway in etcd mode on port 0.
pub async fn start_gateway(etcd_url: &str, opts: GatewayOptions) -> Running {
    let raw = RawConfig {
        etcd: vec![etcd_url.to_owned()],
        cluster: Some(CLUSTER.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        idc: opts.idc,
        cache_dir: opts.cache_dir,
        instance: opts.instance,
        ..RawConfig::default()
    };
    let mut config = raw.into_config().expect("a valid gateway configuration");
    config.timeouts.drain = Duration::from_secs(5);
    within(
        Duration::from_secs(20),
        "the gateway to start",
        shardgate::start(config),
    )
    .await
    .expect("the gateway starts")
}

/// The revision of the snapshot the gateway serves (0: none).
pub fn revision(g: &Running) -> u64 {
    g.snapshots.current().map_or(0, |t| t.revision)
}

/// One answer from the proxy.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// `x-shardgate-idc` of the response.
    pub idc: Option<String>,
    /// The simulated backend's JSON (what it received), or Null.
    pub body: Value,
}

impl Answer {
    /// The `x-shardgate-epoch` the gateway sent upstream.
    pub fn epoch(&self) -> Option<u64> {
        self.body["headers"]["x-shardgate-epoch"]
            .as_str()
            .and_then(|e| e.parse().ok())
    }
}

/// `GET path` with `x-user-id: key` on a fresh connection; an error names what failed.
pub async fn get(addr: SocketAddr, path: &str, key: &str) -> Result<Answer, String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "gw.test")
            .header("x-user-id", key)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let idc = resp
            .headers()
            .get("x-shardgate-idc")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            idc,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        })
    })
    .await
    .map_err(|_| "no answer within 10 s".to_owned())?
}

/// `GET path` on the admin listener, as JSON (or the text as a JSON string).
pub async fn admin(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = shardgate::operator::admin_client::get(
        &format!("http://{addr}"),
        path,
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("the admin listener answers");
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

/// What a `shardgate` command did.
/// How long an operator command may run before the test fails.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the `shardgate` binary with `args`; killed if it runs over 60 s.
pub async fn shardgate(args: &[&str]) -> Output {
    run_shardgate(args, &[], COMMAND_DEADLINE).await
}

/// Runs the `shardgate` binary with `args` and these environment variables.
pub async fn shardgate_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_shardgate(args, env, COMMAND_DEADLINE).await
}

/// Writes `text` to a file in `dir` and returns its path as a string.
pub fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path.display().to_string()
}

/// `shardgate <command> FILE --etcd URL --cluster CLUSTER <extra>`.
pub async fn push(etcd_url: &str, file: &str, extra: &[&str]) -> Output {
    let mut args = vec!["push", file, "--etcd", etcd_url, "--cluster", CLUSTER];
    args.extend_from_slice(extra);
    shardgate(&args).await
}

/// Registers a gateway that exists only as its record (no process, no lease) and has applied
/// nothing: the leader cannot take any fenced move to phase 2 while it is registered
/// unacknowledged, so a test controls when phase 2 may happen instead of racing `fence_ms`.
/// Its view sees every IDC healthy, so it never tips a failover decision.
pub async fn hold_phase_2(etcd: &Etcd, instance: &str) {
    register_record(etcd, instance, 0).await;
}

/// The held-back gateway of [`hold_phase_2`] acknowledges every revision: phase 2 may go on.
pub async fn release_phase_2(etcd: &Etcd, instance: &str) {
    register_record(etcd, instance, 1 << 50).await;
}

async fn register_record(etcd: &Etcd, instance: &str, applied_revision: u64) {
    let record = serde_json::json!({
        "idc": "bj", "addr": "127.0.0.1:1", "applied_revision": applied_revision,
        "view": {"sh": true, "bj": true, "gz": true},
    });
    etcd.put(&format!("gateway/{instance}"), &record.to_string())
        .await;
}

/// An operator command against this test cluster's etcd, as `tester`.
pub async fn cli(etcd: &Etcd, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend([
        "--etcd",
        etcd.url.as_str(),
        "--cluster",
        CLUSTER,
        "--by",
        "tester",
    ]);
    shardgate(&all).await
}

/// The `move/<id>` a command printed.
pub fn printed_move_id(out: &Output) -> String {
    out.stdout
        .split("move/")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no move id printed: {out:?}"))
        .to_owned()
}

/// A key's JSON value in etcd (`None`: absent or not JSON).
pub async fn json_at(etcd: &Etcd, name: &str) -> Option<Value> {
    serde_json::from_slice(&etcd.get(name).await?).ok()
}
