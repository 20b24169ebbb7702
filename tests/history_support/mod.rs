//! The history scenarios' cluster of real processes: a real etcd, simulated IDCs in this
//! process sharing one ledger, two or more `shardgate serve` processes each reaching etcd
//! through its own relay (cut/restore), a watch of the ownership records on the ledger's
//! clock, and a bounded mixed GET/POST load through every gateway. `Run::finish` hands it all
//! to `shardgate::sim::history::check`.
//!
//! Knob: `HISTORY_LOAD_SCALE` (default 1) multiplies every load phase (the ownership drill
//! runs the same scenarios longer with it).

#![allow(dead_code, clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, GetOptions, WatchOptions};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::sim::history::{self, ClientOutcome, History, OwnershipEvent, Phase, Report};
use shardgate::sim::ledger::{Ledger, DEFAULT_CAP};
use shardgate::sim::SimBackend;
use shardgate::topology::Shard;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::etcd_support::{free_port, shardgate, within, Etcd, Output, Relay, CLUSTER, IDCS};

/// Few shards, so that the load writes every one of them often: sh owns 0-3, bj 4-7, gz 8-11.
pub const SHARDS: u32 = 12;
/// How long a write takes at the backend (`x-sim-delay-ms`), between these: long enough that
/// two writers of one shard overlap in time, as replicated writes would, and varied so that
/// the writers of one shard do not march in step.
const WRITE_MS: (u64, u64) = (10, 60);
/// The hot writers' shards: one write after another, so that writes are in flight whenever
/// the owner changes (sh's and bj's first shards, which the scenarios move; two on each).
const HOT_SHARDS: [u32; 4] = [0, 0, 4, 4];
/// Longer than a gateway is frozen in the SIGSTOP scenarios (past the 5 s lease), so that the
/// requests it took in before it stopped are still wanted when it resumes, as a patient client's
/// would be; and far above the route timeout (500 ms), so a gateway's own deadline answers first.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests per load client, at most.
const MAX_REQUESTS: usize = 100_000;
/// A change of owner (fence, acks, `fence_ms`, and up to a lease TTL of waiting for a gateway
/// that went away) is done within this.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(40);

/// The topology of a run: short fence and warm-up so that the whole file stays short; the
/// fence covers the route timeout (a write admitted before the fence has ended by then).
pub fn document(sims: &[SocketAddr]) -> String {
    let mut s =
        format!("cluster = \"{CLUSTER}\"\nshard_count = {SHARDS}\n\n[sets.core]\npriority = 0\n");
    for (idc, addr) in IDCS.iter().zip(sims) {
        s.push_str(&format!(
            "\n[[idcs]]\nname = \"{idc}\"\nweight = 100\npools.core = [\"{addr}\"]\n"
        ));
    }
    for (range, idc) in [("0-3", "sh"), ("4-7", "bj"), ("8-11", "gz")] {
        s.push_str(&format!(
            "\n[[shards.pins]]\nrange = \"{range}\"\nidc = \"{idc}\"\n"
        ));
    }
    s.push_str(
        "\n[failover]\nfence_ms = 500\nwarmup_s = 5\n\
         \n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\n\
         key = [\"header:x-user-id\"]\ntimeout_ms = 500\nretries = 0\n",
    );
    s
}

/// Seconds of load, scaled by `HISTORY_LOAD_SCALE`.
pub fn load_for(secs: f64) -> Duration {
    let scale = std::env::var("HISTORY_LOAD_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs * scale)
}

/// One `shardgate serve` process in etcd mode, behind its own relay to etcd.
pub struct Gateway {
    pub name: String,
    pub idc: String,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub relay: Relay,
    cache_dir: TempDir,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Gateway {
    async fn start(name: &str, idc: &str, etcd: &Etcd, logs: &std::path::Path) -> Gateway {
        let mut g = Gateway {
            name: name.to_owned(),
            idc: idc.to_owned(),
            proxy: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            relay: Relay::start(etcd.client_addr).await,
            cache_dir: tempfile::tempdir().unwrap(),
            log: logs.join(format!("{name}.log")),
            child: None,
        };
        g.spawn();
        g
    }

    /// Starts the process (again) on the same ports and cache directory.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["serve", "--etcd", &self.relay.url, "--cluster", CLUSTER])
            .args(["--instance", &self.name, "--idc", &self.idc])
            .args(["--listen", &self.proxy.to_string()])
            .args(["--admin", &self.admin.to_string()])
            .arg("--cache-dir")
            .arg(self.cache_dir.path())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start a shardgate process");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("a running gateway")
    }

    /// Sends `signal` (`STOP`, `CONT`) with kill(1), by PID.
    pub async fn signal(&self, signal: &str) {
        let status = within(
            Duration::from_secs(5),
            "kill(1)",
            tokio::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string())
                .status(),
        )
        .await
        .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// kill -9, and reaps it.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("a running gateway");
        child.start_kill().unwrap();
        within(
            Duration::from_secs(10),
            "a killed gateway to exit",
            child.wait(),
        )
        .await
        .unwrap();
    }

    /// Starts it again from its `--cache-dir`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart a gateway that was killed");
        self.spawn();
    }

    /// The revision the gateway serves, from its `/status` (None: no answer, or no snapshot).
    pub async fn revision(&self) -> Option<u64> {
        let (status, body) = shardgate::admin_client::get(
            &format!("http://{}", self.admin),
            "/status",
            None,
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| v["revision"].as_u64()).flatten()
    }

    /// Waits until a first start serves `revision` or later. A free port found at random can
    /// be taken by another test before the process binds it: then the process exits, and it is
    /// started again on other ports (at most three times).
    async fn started(&mut self, revision: u64) {
        for _ in 0..3 {
            let exited = tokio::time::timeout(CHANGE_DEADLINE, async {
                loop {
                    if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                        return true;
                    }
                    if self.revision().await.is_some_and(|r| r >= revision) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            match exited {
                Ok(false) => return,
                Ok(true) => {
                    self.proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    self.admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    self.spawn();
                }
                Err(_) => break,
            }
        }
        self.serves(revision).await;
    }

    /// Waits until it serves a snapshot of `revision` or later.
    pub async fn serves(&self, revision: u64) {
        let waited = tokio::time::timeout(CHANGE_DEADLINE, async {
            while self.revision().await.is_none_or(|r| r < revision) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out after {CHANGE_DEADLINE:?} waiting for {} to serve revision {revision} (it serves {:?}); its log:\n{}",
                self.name,
                self.revision().await,
                self.log()
            );
        }
    }

    /// (shards served, home shards, state) of `idc` in its `/status`.
    pub async fn shards_of(&self, idc: &str) -> Option<(u64, u64, String)> {
        let (status, body) = shardgate::admin_client::get(
            &format!("http://{}", self.admin),
            "/status",
            None,
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        let i = v["idcs"].as_array()?.iter().find(|i| i["name"] == idc)?;
        (status == 200).then_some((
            i["shards_served"].as_u64()?,
            i["shards_home"].as_u64()?,
            i["state"].as_str()?.to_owned(),
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// What the test's own watch saw, on the ledger's clock.
#[derive(Default)]
struct Observed {
    events: Vec<OwnershipEvent>,
    /// Record id → its last phase (`fencing`, `applied`, `rolled_back`).
    phases: BTreeMap<String, String>,
    /// Instance → `applied_revision` of the live registrations.
    registrations: BTreeMap<String, u64>,
    /// Fenced records not yet acknowledged by every live gateway: id → (fence revision, event).
    unacked: BTreeMap<String, (u64, OwnershipEvent)>,
}

fn shards_of(ranges: &Value) -> BTreeSet<u32> {
    let mut shards = BTreeSet::new();
    for r in ranges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let mut ends = r.splitn(2, '-').map(|n| n.trim().parse::<u32>().ok());
        if let (Some(Some(lo)), hi) = (ends.next(), ends.next()) {
            let hi = hi.flatten().unwrap_or(lo);
            shards.extend(lo..=hi.min(SHARDS - 1));
        }
    }
    shards
}

impl Observed {
    fn apply(&mut self, name: &str, value: Option<&[u8]>, revision: u64, at_ns: u64) {
        if let Some(instance) = name.strip_prefix("gateway/") {
            match value.and_then(|v| serde_json::from_slice::<Value>(v).ok()) {
                Some(v) => {
                    let applied = v["applied_revision"].as_u64().unwrap_or(0);
                    self.registrations.insert(instance.to_owned(), applied);
                }
                None => {
                    self.registrations.remove(instance);
                }
            }
        } else if let Some(id) = name.strip_prefix("move/") {
            let Some(v) = value.and_then(|v| serde_json::from_slice::<Value>(v).ok()) else {
                return;
            };
            let phase_name = v["phase"].as_str().unwrap_or_default().to_owned();
            let phase = match phase_name.as_str() {
                "fencing" => Phase::Fenced,
                "applied" => Phase::Applied,
                "rolled_back" => Phase::RolledBack,
                _ => return,
            };
            if self.phases.get(id) == Some(&phase_name) {
                return;
            }
            self.phases.insert(id.to_owned(), phase_name);
            let event = OwnershipEvent {
                at_ns,
                record: id.to_owned(),
                kind: v["kind"].as_str().unwrap_or("?").to_owned(),
                phase,
                revision,
                shards: shards_of(&v["ranges"]),
                from: v["from"].as_str().map(str::to_owned),
                to: v["to"].as_str().map(str::to_owned),
            };
            if phase == Phase::Fenced {
                self.unacked
                    .insert(id.to_owned(), (revision, event.clone()));
            } else {
                self.unacked.remove(id);
            }
            self.events.push(event);
        } else if name.starts_with("override/idc/") {
            self.events.push(OwnershipEvent {
                at_ns,
                record: name.to_owned(),
                kind: "override".to_owned(),
                phase: Phase::Unfenced,
                revision,
                shards: (0..SHARDS).collect(),
                from: None,
                to: None,
            });
        }
        self.check_acks(at_ns);
    }

    /// A fence is acknowledged once every live registration shows a revision at least the
    /// fence's (what the leader waits for).
    fn check_acks(&mut self, at_ns: u64) {
        if self.registrations.is_empty() {
            return;
        }
        let lowest = self.registrations.values().copied().min().unwrap_or(0);
        let acked: Vec<String> = self
            .unacked
            .iter()
            .filter(|(_, (fence, _))| lowest >= *fence)
            .map(|(id, _)| id.clone())
            .collect();
        for id in acked {
            if let Some((_, fenced)) = self.unacked.remove(&id) {
                self.events.push(OwnershipEvent {
                    at_ns,
                    phase: Phase::Acked,
                    ..fenced
                });
            }
        }
    }
}

/// The test's own watch of `/shardgate/<cluster>/`, straight to etcd (never through a relay).
struct Watcher {
    observed: Arc<Mutex<Observed>>,
    task: JoinHandle<()>,
}

impl Watcher {
    async fn start(etcd: &Etcd, ledger: Arc<Ledger>) -> Watcher {
        let prefix = format!("/shardgate/{CLUSTER}/");
        let mut client = etcd.client().await;
        let listed = within(
            Duration::from_secs(5),
            "the first list",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .unwrap();
        let start = listed.header().unwrap().revision();
        let observed = Arc::new(Mutex::new(Observed::default()));
        {
            let mut o = observed.lock().unwrap();
            for kv in listed.kvs() {
                let name = kv.key_str().unwrap_or_default().trim_start_matches(&prefix);
                o.apply(name, Some(kv.value()), kv.mod_revision() as u64, 0);
            }
        }
        let mut stream = within(
            Duration::from_secs(5),
            "a watch",
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start + 1),
                ),
            ),
        )
        .await
        .unwrap();
        let task = {
            let observed = observed.clone();
            tokio::spawn(async move {
                while let Ok(Some(resp)) = stream.message().await {
                    let at_ns = ledger.now_ns();
                    let mut o = observed.lock().unwrap();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let name = kv.key_str().unwrap_or_default().trim_start_matches(&prefix);
                        let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                        o.apply(name, value, kv.mod_revision() as u64, at_ns);
                    }
                }
            })
        };
        Watcher { observed, task }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Mixed GET/POST load through every gateway, over one key per shard.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    outcomes: Arc<Mutex<Vec<ClientOutcome>>>,
}

/// One key per shard.
fn keys() -> Vec<(String, u32)> {
    (0..SHARDS)
        .map(|s| {
            (0..100_000)
                .map(|i| format!("user-{i}"))
                .find(|k| Shard::of_key(k.as_bytes(), SHARDS).0 == s)
                .map(|k| (k, s))
                .expect("a key for every shard")
        })
        .collect()
}

async fn client(
    proxy: SocketAddr,
    keys: Arc<Vec<(String, u32)>>,
    offset: usize,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<ClientOutcome>>>,
    ids: Arc<AtomicU64>,
) {
    let mut sender = None;
    for n in (offset..).take(MAX_REQUESTS) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (key, shard) = &keys[n % keys.len()];
        // Every key is read and written in turn, whatever the number of keys; a hot writer
        // (one key) only writes.
        let write = keys.len() == 1 || (n / keys.len() + n) % 2 == 1;
        let start_ns = ledger.now_ns();
        if sender.is_none() {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(CLIENT_TIMEOUT, TcpStream::connect(proxy)).await
            {
                if let Ok(Ok((s, conn))) = tokio::time::timeout(
                    CLIENT_TIMEOUT,
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)),
                )
                .await
                {
                    tokio::spawn(conn);
                    sender = Some(s);
                }
            }
        }
        let mut status = 0;
        let mut reason = None;
        if let Some(s) = sender.as_mut() {
            let id = format!("load-{}", ids.fetch_add(1, Ordering::Relaxed));
            let req = Request::builder()
                .method(if write { "POST" } else { "GET" })
                .uri("/orders/1")
                .header("host", "history.test")
                .header("x-user-id", key)
                .header("x-request-id", id);
            let req = if write {
                let delay = fastrand::u64(WRITE_MS.0..WRITE_MS.1);
                req.header("x-sim-delay-ms", delay.to_string())
                    .body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
            } else {
                req.body(Full::new(Bytes::new()))
            }
            .unwrap();
            let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
                let resp = s.send_request(req).await.map_err(|_| ())?;
                let status = resp.status().as_u16();
                let reason = resp
                    .headers()
                    .get("x-shardgate-reason")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                resp.into_body().collect().await.map_err(|_| ())?;
                Ok::<_, ()>((status, reason))
            })
            .await;
            match answer {
                Ok(Ok(done)) => (status, reason) = done,
                _ => sender = None,
            }
        }
        out.lock().unwrap().push(ClientOutcome {
            shard: *shard,
            write,
            status,
            reason,
            start_ns,
            end_ns: ledger.now_ns(),
        });
        if status == 0 {
            // Nothing listening, or a stopped process: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A scenario's cluster.
pub struct Run {
    pub name: String,
    pub etcd: Etcd,
    pub ledger: Arc<Ledger>,
    pub gateways: Vec<Gateway>,
    sims: Vec<SimBackend>,
    watcher: Watcher,
    load: Load,
    _logs: TempDir,
}

impl Run {
    /// etcd, the simulated IDCs, the topology, one gateway per entry of `gateways` (instance
    /// name, local IDC), all serving; then the load starts: per gateway, two clients over every
    /// shard and one hot writer per entry of `HOT_SHARDS`.
    pub async fn start(name: &str, gateways: &[(&str, &str)]) -> Run {
        let etcd = Etcd::start().await;
        let ledger = Arc::new(Ledger::new(DEFAULT_CAP));
        let mut sims = Vec::new();
        for idc in IDCS {
            let addr = "127.0.0.1:0".parse().unwrap();
            let sim = SimBackend::start_with_ledger(addr, idc, "core", Some(ledger.clone()))
                .await
                .unwrap();
            sims.push(sim);
        }
        let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
        let revision = etcd.put("topology", &document(&addrs)).await as u64;
        let watcher = Watcher::start(&etcd, ledger.clone()).await;
        let logs = tempfile::tempdir().unwrap();
        let mut started = Vec::new();
        for (instance, idc) in gateways {
            started.push(Gateway::start(instance, idc, &etcd, logs.path()).await);
        }
        for g in &mut started {
            g.started(revision).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let keys = Arc::new(keys());
        let ids = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for g in &started {
            for (h, hot) in HOT_SHARDS.iter().enumerate() {
                let key = keys.iter().find(|(_, s)| s == hot).cloned().unwrap();
                tasks.push(tokio::spawn(client(
                    g.proxy,
                    Arc::new(vec![key]),
                    h * 3,
                    ledger.clone(),
                    stop.clone(),
                    outcomes.clone(),
                    ids.clone(),
                )));
            }
        }
        for (i, g) in started.iter().enumerate() {
            for c in 0..2 {
                tasks.push(tokio::spawn(client(
                    g.proxy,
                    keys.clone(),
                    i * 5 + c * 7,
                    ledger.clone(),
                    stop.clone(),
                    outcomes.clone(),
                    ids.clone(),
                )));
            }
        }
        Run {
            name: name.to_owned(),
            etcd,
            ledger,
            gateways: started,
            sims,
            watcher,
            load: Load {
                stop,
                tasks,
                outcomes,
            },
            _logs: logs,
        }
    }

    /// Lets the load run for `secs` (scaled by `HISTORY_LOAD_SCALE`): this is the workload of
    /// the scenario, not a wait for a condition.
    pub async fn load(&self, secs: f64) {
        tokio::time::sleep(load_for(secs)).await;
    }

    pub fn gateway(&self, name: &str) -> &Gateway {
        self.gateways.iter().find(|g| g.name == name).unwrap()
    }

    pub fn gateway_mut(&mut self, name: &str) -> &mut Gateway {
        self.gateways.iter_mut().find(|g| g.name == name).unwrap()
    }

    /// The elected leader's instance name (the candidate key created first), once there is one.
    pub async fn leader(&self) -> String {
        let prefix = format!("/shardgate/{CLUSTER}/leader/");
        within(CHANGE_DEADLINE, "a leader to be elected", async {
            loop {
                let mut c = self.etcd.client().await;
                if let Ok(Ok(r)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
                )
                .await
                {
                    if let Some(kv) = r.kvs().iter().min_by_key(|kv| kv.create_revision()) {
                        return String::from_utf8_lossy(kv.value()).into_owned();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// (leader, another gateway).
    pub async fn leader_and_follower(&self) -> (String, String) {
        let leader = self.leader().await;
        let follower = self
            .gateways
            .iter()
            .find(|g| g.name != leader)
            .map(|g| g.name.clone())
            .expect("two gateways");
        (leader, follower)
    }

    /// Runs an operator command against etcd (never through a relay); it must succeed.
    pub async fn operator(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--etcd",
            &self.etcd.url,
            "--cluster",
            CLUSTER,
            "--reason",
            "history scenario",
            "--by",
            "history",
        ]);
        let out = shardgate(&all).await;
        assert_eq!(out.code, 0, "shardgate {args:?}: {out:?}");
        println!("[{}] shardgate {}", self.name, args.join(" "));
        out
    }

    fn record_ids(&self) -> BTreeSet<String> {
        self.watcher
            .observed
            .lock()
            .unwrap()
            .phases
            .keys()
            .cloned()
            .collect()
    }

    /// Runs an operator command that writes a fenced record and waits until that record is
    /// `applied` or `rolled_back`; the phase it ended in, and the revision of that commit.
    pub async fn fenced(&self, args: &[&str]) -> (String, u64) {
        let before = self.record_ids();
        self.operator(args).await;
        let what = format!("the record of `{}` to finish", args.join(" "));
        crate::etcd_support::within(CHANGE_DEADLINE, &what, async {
            loop {
                {
                    let o = self.watcher.observed.lock().unwrap();
                    let done = o.events.iter().find(|e| {
                        !before.contains(&e.record)
                            && matches!(e.phase, Phase::Applied | Phase::RolledBack)
                    });
                    if let Some(e) = done {
                        return (o.phases[&e.record].clone(), e.revision);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// The revision of the newest ownership change the test's watch has seen (a move record
    /// or an IDC override: keys that shape the snapshot, unlike registrations).
    pub fn last_change(&self) -> u64 {
        let o = self.watcher.observed.lock().unwrap();
        o.events.iter().map(|e| e.revision).max().unwrap_or(0)
    }

    /// Runs an operator command that changes ownership (`failover`, `restore`) and waits until
    /// the test's watch sees the change; its revision.
    pub async fn change(&self, args: &[&str]) -> u64 {
        let before = self.last_change();
        self.operator(args).await;
        let what = format!("the change of `{}` to be seen", args.join(" "));
        within(CHANGE_DEADLINE, &what, async {
            loop {
                let now = self.last_change();
                if now > before {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Waits until every gateway named serves `revision` or later.
    pub async fn all_serve(&self, names: &[&str], revision: u64) {
        for n in names {
            self.gateway(n).serves(revision).await;
        }
    }

    /// Waits until every gateway sees `idc` serving `want(served, home)`: the end of a change
    /// of owner however many steps and fences it takes.
    async fn all_see(&self, idc: &str, what: &str, want: impl Fn(u64, u64, &str) -> bool) {
        for g in &self.gateways {
            let what = format!("{} to see {idc} {what}", g.name);
            within(CHANGE_DEADLINE, &what, async {
                while !g
                    .shards_of(idc)
                    .await
                    .is_some_and(|(served, home, state)| want(served, home, &state))
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }

    /// Waits until every gateway sees `idc` serve no shard.
    pub async fn all_see_none_at(&self, idc: &str) {
        self.all_see(idc, "serve no shard", |served, _, _| served == 0)
            .await;
    }

    /// Waits until every gateway sees `idc` active again, serving all its home shards.
    pub async fn all_see_home_at(&self, idc: &str) {
        self.all_see(
            idc,
            "active, serving its home shards",
            |served, home, state| home > 0 && served == home && state == "active",
        )
        .await;
    }

    /// Stops the load, checks the history, prints the report and returns it.
    pub async fn finish(self) -> Report {
        self.load.stop.store(true, Ordering::Relaxed);
        for t in self.load.tasks {
            within(CLIENT_TIMEOUT * 3, "the load clients to stop", t)
                .await
                .unwrap();
        }
        let history = History {
            entries: self.ledger.entries(),
            events: self.watcher.observed.lock().unwrap().events.clone(),
            outcomes: self.load.outcomes.lock().unwrap().clone(),
            dropped: self.ledger.dropped(),
        };
        let report = history::check(&history);
        if let Some(shard) = std::env::var("HISTORY_DUMP_SHARD")
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        {
            for e in history.entries.iter().filter(|e| e.shard == shard) {
                println!(
                    "  ledger {} {} at {} [{:.4} s, {:.4} s] epoch {:?} id {}",
                    e.method,
                    e.shard,
                    e.idc,
                    e.start_ns as f64 / 1e9,
                    e.end_ns as f64 / 1e9,
                    e.epoch,
                    e.request_id
                );
            }
        }
        println!("=== scenario {} ===\n{report}", self.name);
        for e in &history.events {
            println!(
                "  event {:.3} s {} {} {:?} rev {} shards {:?} {:?} → {:?}",
                e.at_ns as f64 / 1e9,
                e.kind,
                e.record,
                e.phase,
                e.revision,
                e.shards,
                e.from,
                e.to
            );
        }
        if !report.violations.is_empty() {
            for g in &self.gateways {
                let log = g.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                println!("--- {} log (last lines, newest first) ---", g.name);
                for l in tail {
                    println!("  {l}");
                }
            }
        }
        drop(self.sims);
        report
    }
}

/// Waits until a (re)started gateway answers on its admin listener with a snapshot (from its
/// cache, when etcd is out of reach).
pub async fn wait_answering(g: &Gateway) {
    let what = format!("{} to answer", g.name);
    within(CHANGE_DEADLINE, &what, async {
        while g.revision().await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
