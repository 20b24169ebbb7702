//! The failover drill behind `benches/failover_drill.sh`: a real etcd, three simulated IDCs
//! (`sh`, `bj`, `gz`, one core and one noncore backend each), two `shardgate serve` processes
//! in etcd mode, steady GET and POST load through both. Then `sh`'s backends crash; the drill
//! reports crash → moved (sh serves no shard on either gateway), failed requests by method,
//! and, once the backends are back, the failback curve (share of sh's home shards served by
//! sh again over time, as the gateways see it).
//!
//! `cargo run --release --example failover_drill -- <shardgate binary>`; knobs in the
//! environment: CLIENTS (8), PACE_MS (10: pause between one client's requests), BEFORE_S (3),
//! AFTER_S (5), RECOVER_MS (10000), WARMUP_S (20), DETECT_MS (1500).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly on purpose

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::dev::sim::SimBackend;
use tokio::net::TcpStream;

const IDCS: [&str; 3] = ["sh", "bj", "gz"];
const CLUSTER: &str = "drill";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A one-member etcd in a temporary directory, killed on drop.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    async fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new("etcd")
            .args(["--name", "drill", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("drill={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (is it installed?)");
        let etcd = Etcd {
            child,
            url,
            _dir: dir,
        };
        for _ in 0..200 {
            if etcd.client().await.is_some() {
                return etcd;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not start");
    }

    async fn client(&self) -> Option<etcd_client::Client> {
        let mut c = tokio::time::timeout(
            Duration::from_secs(1),
            etcd_client::Client::connect([self.url.as_str()], None),
        )
        .await
        .ok()?
        .ok()?;
        tokio::time::timeout(Duration::from_secs(1), c.get("probe", None))
            .await
            .ok()?
            .ok()?;
        Some(c)
    }

    async fn put(&self, name: &str, value: &str) {
        let mut c = self.client().await.unwrap();
        c.put(format!("/shardgate/{CLUSTER}/{name}"), value, None)
            .await
            .unwrap();
    }

    async fn get(&self, name: &str) -> Option<Vec<u8>> {
        let mut c = self.client().await?;
        let r = c
            .get(format!("/shardgate/{CLUSTER}/{name}"), None)
            .await
            .ok()?;
        r.kvs().first().map(|kv| kv.value().to_vec())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
const SHARDS: u32 = 1024;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One request's outcome: time since the drill's start, method, status (0: no answer).
#[derive(Clone)]
struct Outcome {
    at: Duration,
    post: bool,
    status: u16,
    /// `x-shardgate-reason` of a gateway-made refusal.
    reason: Option<String>,
}

struct Gateway {
    child: tokio::process::Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

fn document(addrs: &[(SocketAddr, SocketAddr)]) -> String {
    let mut s = format!(
        "cluster = \"{CLUSTER}\"\nshard_count = {SHARDS}\n\n[sets.core]\npriority = 0\n\
         [sets.noncore]\npriority = 2\ndegradable = true\n"
    );
    for (idc, (core, noncore)) in IDCS.iter().zip(addrs) {
        s.push_str(&format!(
            "\n[[idcs]]\nname = \"{idc}\"\nweight = 100\npools.core = [\"{core}\"]\npools.noncore = [\"{noncore}\"]\n"
        ));
    }
    s.push_str(&format!(
        "\n[failover]\ndetect_ms = {}\nrecover_ms = {}\nauto_failback = true\nwarmup_s = {}\n\
         \n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\n\
         key = [\"header:x-user-id\"]\ntimeout_ms = 2000\n",
        knob("DETECT_MS", 1500),
        knob("RECOVER_MS", 10_000),
        knob("WARMUP_S", 20)
    ));
    s
}

async fn admin_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let (status, body) = shardgate::operator::admin_client::get(
        &format!("http://{addr}"),
        path,
        None,
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    (status == 200).then(|| serde_json::from_slice(&body).ok())?
}

/// (served, home) shards of `idc` in a gateway's `/status`.
async fn shards_of(admin: SocketAddr, idc: &str) -> Option<(u64, u64, String)> {
    let s = admin_json(admin, "/status").await?;
    let i = s["idcs"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == idc)?
        .clone();
    Some((
        i["shards_served"].as_u64()?,
        i["shards_home"].as_u64()?,
        i["state"].as_str()?.to_owned(),
    ))
}

/// One client: keep-alive connection to `proxy`, GET and POST in turn over `keys`, paced.
async fn client(
    proxy: SocketAddr,
    keys: Arc<Vec<String>>,
    start: Instant,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<Outcome>>>,
    offset: usize,
    pace: Duration,
) {
    let mut sender = None;
    let mut n = offset;
    while !stop.load(Ordering::Relaxed) {
        let key = &keys[n % keys.len()];
        let post = n % 2 == 1;
        n += 1;
        if sender.is_none() {
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(proxy)).await
            {
                if let Ok((s, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                {
                    tokio::spawn(conn);
                    sender = Some(s);
                }
            }
        }
        let (status, reason) = match sender.as_mut() {
            None => (0, None),
            Some(s) => {
                let req = Request::builder()
                    .method(if post { "POST" } else { "GET" })
                    .uri("/orders/1")
                    .header("host", "drill")
                    .header("x-user-id", key)
                    // Reads carry no body, as real ones do; writes a small JSON one.
                    .body(Full::new(if post {
                        Bytes::from_static(b"{\"qty\":1}")
                    } else {
                        Bytes::new()
                    }))
                    .unwrap();
                let answer = tokio::time::timeout(Duration::from_secs(5), async {
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
                    Ok(Ok(done)) => done,
                    _ => {
                        sender = None;
                        (0, None)
                    }
                }
            }
        };
        out.lock().unwrap().push(Outcome {
            at: start.elapsed(),
            post,
            status,
            reason,
        });
        tokio::time::sleep(pace).await;
    }
}

async fn start_sims(addrs: &[(SocketAddr, SocketAddr)], idc: &str) -> Vec<SimBackend> {
    let i = IDCS.iter().position(|n| *n == idc).unwrap();
    vec![
        SimBackend::start(addrs[i].0, idc, "core").await.unwrap(),
        SimBackend::start(addrs[i].1, idc, "noncore").await.unwrap(),
    ]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bin = std::env::args()
        .nth(1)
        .expect("usage: failover_drill <shardgate binary>");
    let etcd = Etcd::start().await;
    let mut addrs = Vec::new();
    let mut sims: Vec<Vec<SimBackend>> = Vec::new();
    for _ in IDCS {
        let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
        addrs.push((a(free_port()), a(free_port())));
    }
    for idc in IDCS {
        sims.push(start_sims(&addrs, idc).await);
    }
    etcd.put("topology", &document(&addrs)).await;

    // BREAKERS=0 sets the breaker thresholds out of reach, to see the failover without the
    // breaker of the crashed IDC's set answering `circuit_open` in front of it.
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("gateway.toml");
    let breakers = knob("BREAKERS", 1) != 0;
    std::fs::write(
        &config,
        if breakers {
            ""
        } else {
            "[isolation]\nbreaker_consecutive = 1000000000\nbreaker_min_requests = 1000000000\n"
        },
    )
    .unwrap();
    let mut gateways = Vec::new();
    for (name, idc) in [("gw-a", "bj"), ("gw-b", "gz")] {
        let (proxy, admin) = (free_port(), free_port());
        let child = tokio::process::Command::new(&bin)
            .args([
                "serve",
                "--etcd",
                &etcd.url,
                "--cluster",
                CLUSTER,
                "--instance",
                name,
            ])
            .args(["--idc", idc, "--listen", &format!("127.0.0.1:{proxy}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start a gateway");
        gateways.push(Gateway {
            child,
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        });
    }
    for g in &gateways {
        let ready = tokio::time::timeout(Duration::from_secs(20), async {
            while admin_json(g.admin, "/status").await.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "a gateway did not come up");
    }

    let keys: Arc<Vec<String>> = Arc::new((0..512).map(|i| format!("user-{i}")).collect());
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let clients = knob("CLIENTS", 8) as usize;
    let pace = Duration::from_millis(knob("PACE_MS", 10));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let g = &gateways[c % gateways.len()];
        tasks.push(tokio::spawn(client(
            g.proxy,
            keys.clone(),
            start,
            stop.clone(),
            outcomes.clone(),
            c * 37,
            pace,
        )));
    }
    tokio::time::sleep(Duration::from_secs(knob("BEFORE_S", 3))).await;

    // The crash.
    let crash = start.elapsed();
    for s in sims.remove(0) {
        s.stop().await;
    }
    let mut moved = vec![None; gateways.len()];
    let mut down_written = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while moved.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, g) in gateways.iter().enumerate() {
            if moved[i].is_none() && shards_of(g.admin, "sh").await.is_some_and(|s| s.0 == 0) {
                moved[i] = Some(start.elapsed() - crash);
            }
        }
        if down_written.is_none() && etcd.get("override/idc/sh").await.is_some() {
            down_written = Some(start.elapsed() - crash);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if std::env::var("DRILL_DEBUG").is_ok() {
        let s = admin_json(gateways[0].admin, "/status")
            .await
            .unwrap_or_default();
        eprintln!("gw-a breakers after the move: {}", s["breakers"]);
    }
    tokio::time::sleep(Duration::from_secs(knob("AFTER_S", 5))).await;

    // The backends come back: the failback curve.
    let back = start.elapsed();
    sims.insert(0, start_sims(&addrs, "sh").await);
    let mut curve = Vec::new();
    let limit = Duration::from_millis(knob("RECOVER_MS", 10_000))
        + Duration::from_secs(knob("WARMUP_S", 20) + 20);
    let until = Instant::now() + limit;
    let mut last_state = String::new();
    loop {
        let t = start.elapsed() - back;
        let mut fractions = Vec::new();
        let mut state = String::new();
        for g in &gateways {
            if let Some((served, home, s)) = shards_of(g.admin, "sh").await {
                fractions.push(served as f64 / home.max(1) as f64);
                state = s;
            }
        }
        let changed = state != last_state
            || curve
                .last()
                .is_none_or(|(_, f, _): &(Duration, Vec<f64>, String)| *f != fractions);
        if changed {
            curve.push((t, fractions.clone(), state.clone()));
        }
        last_state = state.clone();
        if (state == "active" && fractions.iter().all(|f| *f >= 1.0)) || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    // The report.
    let all = outcomes.lock().unwrap().clone();
    let ms = |d: Duration| d.as_millis();
    let failed = |o: &Outcome| o.status == 0 || o.status >= 500;
    let window = |from: Duration, to: Duration, post: bool| {
        let v: Vec<&Outcome> = all
            .iter()
            .filter(|o| o.post == post && o.at >= from && o.at < to)
            .collect();
        (v.len(), v.iter().filter(|o| failed(o)).count())
    };
    let moved_all = moved.iter().flatten().max().copied();
    let end = start.elapsed();
    println!(
        "failover drill: 3 IDCs, {} gateways, {clients} clients pausing {} ms, {} keys",
        gateways.len(),
        pace.as_millis(),
        keys.len()
    );
    println!(
        "detect_ms {} recover_ms {} warmup_s {} (auto_failback on)",
        knob("DETECT_MS", 1500),
        knob("RECOVER_MS", 10_000),
        knob("WARMUP_S", 20)
    );
    println!();
    match down_written {
        Some(d) => println!(
            "crash -> override/idc/sh = down (auto) written: {} ms",
            ms(d)
        ),
        None => println!("crash -> override/idc/sh: never written within 30 s"),
    }
    for (g, m) in ["gw-a", "gw-b"].iter().zip(&moved) {
        match m {
            Some(d) => println!("crash -> sh serves no shard on {g}: {} ms", ms(*d)),
            None => println!("crash -> {g} still routes to sh after 30 s"),
        }
    }
    println!();
    let moved_at = crash + moved_all.unwrap_or(Duration::from_secs(30));
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}",
        "requests (failed = no answer or 5xx)", "GET", "GET fail", "POST", "POST fail"
    );
    for (label, from, to) in [
        ("before the crash", Duration::ZERO, crash),
        ("crash -> moved", crash, moved_at),
        ("moved -> backends back", moved_at, back),
        ("failback", back, end),
    ] {
        let (g, gf) = window(from, to, false);
        let (p, pf) = window(from, to, true);
        println!("{label:<34} {g:>8} {gf:>8} {p:>8} {pf:>8}");
    }
    let mut statuses = std::collections::BTreeMap::new();
    for o in all.iter().filter(|o| o.at >= crash && failed(o)) {
        *statuses
            .entry((
                if o.post { "POST" } else { "GET" },
                o.status,
                o.reason.clone().unwrap_or_default(),
            ))
            .or_insert(0u64) += 1;
    }
    println!("failures after the crash by (method, status, reason; 0 = no answer): {statuses:?}");
    println!(
        "breakers: {}",
        if breakers {
            "default"
        } else {
            "out of reach (BREAKERS=0)"
        }
    );
    println!();
    println!("failback curve (time since the backends are back: share of sh's home shards served by sh per gateway, state)");
    for (t, f, s) in &curve {
        let f: Vec<String> = f.iter().map(|x| format!("{:.2}", x)).collect();
        println!("  {:>7} ms  {}  {s}", ms(*t), f.join(" "));
    }
    for mut g in gateways {
        let _ = g.child.start_kill();
        let _ = g.child.wait().await;
    }
}
