//! Health through real sockets (DESIGN.md §5): probes take a stopped backend out after `fall`
//! failures and back after `rise`, their state survives reloads, traffic ejects backends for
//! growing periods, a dead pool gets no traffic (reads spill), an IDC whose core pool is dead
//! is unhealthy in /status and the metrics, warm-up steps advance with no reload, and
//! idempotent requests survive their backend dying.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use serde_json::Value;
use shardgate::control::topology::overrides::unix_now;
use shardgate::dev::sim::SimBackend;
use shardgate::util::unix_now_ms;
use support::*;

/// Fast probes: a stopped backend is out after 3 × 100 ms, back after 2 × 100 ms.
const FAST_PROBES: &str = "health.interval_ms = 100\nhealth.fall = 3\nhealth.rise = 2\n";
/// Probes that stay out of the way of passive ejection (one probe a minute).
const SLOW_PROBES: &str = "health.interval_ms = 60000\n";

/// Keeps the gateway from failing an unhealthy IDC over within a test's lifetime.
const NO_AUTO_FAILOVER: &str = "\n[failover]\ndetect_ms = 600000\n";

async fn status(c: &Cluster) -> Value {
    c.admin_get("/status").await.json()
}

fn idc<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["idcs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("IDC {name} in /status: {st}"))
}

/// The first backend of an IDC's pool for `set`, as /status shows it.
fn backend<'a>(st: &'a Value, idc_name: &str, set: &str) -> &'a Value {
    &idc(st, idc_name)["backends"][set][0]
}

/// Keys whose shard is pinned to gz by the default options (shards 0-63).
fn gz_keys(n: usize) -> Vec<String> {
    keys_where("gz-key", n, |s| s.0 < 64)
}

/// A breaker that never opens, so every request reaches the pools.
fn no_breaker() -> String {
    "[isolation.breaker]\nconsecutive = 1000000\nmin_requests = 1000000\n".into()
}

/// Writes the operator overrides (file mode keeps them in the cache dir) and reloads; returns
/// once a newer snapshot than before is served.
async fn apply_overrides(c: &Cluster, overrides: Value) {
    let before = c.topology().revision;
    let dir = c.dir.path().join("cache");
    std::fs::create_dir_all(&dir).expect("create the cache dir");
    std::fs::write(dir.join("overrides.json"), overrides.to_string()).expect("write overrides");
    let doc = c.document(&[("0-63", "gz")]);
    c.write_topology(&format!("{doc}\n# overrides at {}\n", unix_now_ms()));
    eventually("the overrides to be applied", || async {
        (c.topology().revision > before).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_take_a_stopped_backend_out_after_fall_and_back_after_rise() {
    // No automatic failover: gz must stay the serving IDC (reads spill, writes get 502)
    // however long the checks below take.
    let mut c = Cluster::start_with(Options {
        idc_toml: FAST_PROBES.into(),
        extra_toml: NO_AUTO_FAILOVER.into(),
        ..Options::default()
    })
    .await;
    let gz_core = c.sim_addr("gz", "core");
    let mut changes = c.running().health.subscribe();
    changes.mark_unchanged();
    assert_eq!(c.running().health.idc_view().get("gz"), Some(&true));
    assert_eq!(idc(&status(&c).await, "gz")["healthy"], true);

    c.stop_sim("gz", "core").await;
    eventually("the probes to take gz's core backend out", || async {
        let st = status(&c).await;
        (backend(&st, "gz", "core")["healthy"] == false && idc(&st, "gz")["healthy"] == false)
            .then_some(())
    })
    .await;
    // The other IDCs are untouched; the view and its subscribers saw the change.
    let st = status(&c).await;
    assert_eq!(idc(&st, "sh")["healthy"], true);
    assert_eq!(idc(&st, "bj")["healthy"], true);
    assert_eq!(backend(&st, "gz", "noncore")["healthy"], true);
    assert_eq!(c.running().health.idc_view().get("gz"), Some(&false));
    assert!(changes.has_changed().expect("the view's channel is open"));
    let metrics = c.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"shardgate_idc_healthy{idc="gz"} 0"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"shardgate_idc_healthy{idc="sh"} 1"#));
    assert!(
        metrics.contains(&format!(
            r#"shardgate_backend_healthy{{idc="gz",set="core",backend="{gz_core}"}} 0"#
        )),
        "{metrics}"
    );

    // The dead pool gets no traffic: reads spill to the next IDC (every one of them: a pool
    // known dead does not trip gz's breaker), a write gets 502.
    let key = &gz_keys(1)[0];
    for _ in 0..12 {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(r.idc(), "gz");
        assert_eq!(r.upstream_header("x-shardgate-spill").as_deref(), Some("1"));
    }
    let r = c
        .send(request(
            Method::POST,
            "/orders",
            &[("x-user-id", key)],
            "{}",
        ))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connect");
    assert!(r.json()["detail"]
        .as_str()
        .is_some_and(|d| d.contains("in service")));

    c.restart_sim("gz", "core").await;
    eventually("the probes to bring gz's core backend back", || async {
        let st = status(&c).await;
        (backend(&st, "gz", "core")["healthy"] == true && idc(&st, "gz")["healthy"] == true)
            .then_some(())
    })
    .await;
    assert_eq!(c.running().health.idc_view().get("gz"), Some(&true));
    let metrics = c.admin_get("/metrics").await.text();
    assert!(metrics.contains(r#"shardgate_idc_healthy{idc="gz"} 1"#));
    let r = c
        .send(request(
            Method::POST,
            "/orders",
            &[("x-user-id", key)],
            "{}",
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.idc(), "gz");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_state_survives_a_reload_that_keeps_the_backend() {
    // Slow to fall (5 × 100 ms): a reload that forgot the state would show the backend
    // healthy again for half a second.
    // No automatic failover: its override would be a reload of its own.
    let mut c = Cluster::start_with(Options {
        idc_toml: "health.interval_ms = 100\nhealth.fall = 5\nhealth.rise = 2\n".into(),
        extra_toml: NO_AUTO_FAILOVER.into(),
        ..Options::default()
    })
    .await;
    c.stop_sim("gz", "core").await;
    eventually("gz's core backend to be unhealthy", || async {
        (backend(&status(&c).await, "gz", "core")["healthy"] == false).then_some(())
    })
    .await;
    let before = c.topology().revision;
    // A reload that adds a route, keeps gz's core backend, and gives gz's noncore pool another
    // address (sh's noncore backend).
    let (old_noncore, new_noncore) = (c.sim_addr("gz", "noncore"), c.sim_addr("sh", "noncore"));
    let doc = c.document(&[("0-63", "gz")]).replacen(
        &format!("pools.noncore = [\"{old_noncore}\"]"),
        &format!("pools.noncore = [\"{new_noncore}\"]"),
        1,
    );
    c.write_topology(&format!(
        "{doc}\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nset = \"core\"\nsharded = false\n"
    ));
    eventually("the reload", || async {
        (c.topology().revision > before).then_some(())
    })
    .await;
    let st = status(&c).await;
    assert!(st["revision"].as_u64() > Some(before));
    assert_eq!(backend(&st, "gz", "core")["healthy"], false, "{st}");
    assert_eq!(idc(&st, "gz")["healthy"], false, "{st}");
    assert_eq!(c.running().health.idc_view().get("gz"), Some(&false));
    // The backend no snapshot names any more is no longer probed or reported; its
    // replacement is (it is now probed as sh's and as gz's).
    let gone = format!(r#"backend_healthy{{idc="gz",set="noncore",backend="{old_noncore}"}}"#);
    let new = format!(r#"backend_healthy{{idc="gz",set="noncore",backend="{new_noncore}"}} 1"#);
    eventually("the metrics to follow the reload", || async {
        let m = c.admin_get("/metrics").await.text();
        (!m.contains(&gone) && m.contains(&new)).then_some(())
    })
    .await;
    let unnamed = c.sim("gz", "noncore").health_checks();
    let named = c.sim("sh", "noncore").health_checks();
    eventually("more probes of the backends still named", || async {
        (c.sim("sh", "noncore").health_checks() >= named + 20).then_some(())
    })
    .await;
    assert!(
        c.sim("gz", "noncore").health_checks() <= unnamed + 1,
        "a backend no snapshot names is still probed"
    );
    c.stop().await;
}

/// Two simulated backends (`pa`, `pb`) forming the `pair` set's pool in every IDC, and the
/// route `/pair` (not sharded: served by the local IDC, bj).
async fn pair_backends() -> (Vec<SimBackend>, Options) {
    let loopback = "127.0.0.1:0".parse().expect("loopback address");
    let mut pair = Vec::new();
    for name in ["pa", "pb"] {
        pair.push(
            SimBackend::start(loopback, name, "pair")
                .await
                .expect("start a pair backend"),
        );
    }
    let options = Options {
        extra_sets: "[sets.pair]\npriority = 1\n".into(),
        extra_pools: vec![("pair".into(), pair[0].addr), ("pair".into(), pair[1].addr)],
        extra_toml: "\n[[routes]]\nname = \"pair\"\npath_prefix = \"/pair\"\nset = \"pair\"\nsharded = false\ntimeout_ms = 10000\nretries = 1\n".into(),
        ..Options::default()
    };
    (pair, options)
}

/// Which of bj's `pair` backends are ejected, by name.
fn ejected_pair(st: &Value, pair: &[SimBackend]) -> Vec<&'static str> {
    let backends = idc(st, "bj")["backends"]["pair"]
        .as_array()
        .expect("bj's pair pool in /status");
    ["pa", "pb"]
        .into_iter()
        .zip(pair)
        .filter(|(_, sim)| {
            backends
                .iter()
                .any(|b| b["addr"] == sim.addr.to_string() && b["ejected"] == true)
        })
        .map(|(name, _)| name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_answers_eject_a_backend_but_never_the_last_one_in_service() {
    let (pair, options) = pair_backends().await;
    let c = Cluster::start_with(Options {
        idc_toml: SLOW_PROBES.into(),
        isolation: no_breaker(),
        ..options
    })
    .await;
    let fail = || get("/pair", &[("x-sim-status", "500")]);
    // 5xx answers pass through; five in a row from one backend eject it.
    let mut sent = 0;
    let ejected = within(POLL_DEADLINE, "a pair backend to be ejected", async {
        loop {
            let r = c.send(fail()).await;
            assert_eq!(r.status, 500, "the backend's own 500 passes through");
            sent += 1;
            let ejected = ejected_pair(&status(&c).await, &pair);
            if !ejected.is_empty() {
                return ejected;
            }
        }
    })
    .await;
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert!(sent >= shardgate::data::upstream::health::CONSECUTIVE_FAILURES);
    let st = status(&c).await;
    let b = idc(&st, "bj")["backends"]["pair"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["ejected"] == true))
        .expect("the ejected backend in /status")
        .clone();
    assert_eq!(b["ejections"], 1);
    assert_eq!(
        b["ejection_ms"].as_u64(),
        Some(shardgate::data::upstream::health::BASE_EJECTION_MS)
    );
    // The other one is the last in service: it keeps every request, failing or not.
    let survivor = if ejected[0] == "pa" { "pb" } else { "pa" };
    for _ in 0..2 * shardgate::data::upstream::health::CONSECUTIVE_FAILURES {
        let r = c.send(fail()).await;
        assert_eq!(r.status, 500);
        assert_eq!(r.idc(), survivor, "an ejected backend got traffic");
    }
    assert_eq!(ejected_pair(&status(&c).await, &pair), ejected);
    c.stop().await;
    for sim in pair {
        sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_take_a_pool_out_for_growing_periods_and_a_dead_pool_gets_nothing() {
    let mut c = Cluster::start_with(Options {
        idc_toml: SLOW_PROBES.into(),
        isolation: no_breaker(),
        // The pool's ejections are under test, not failover: gz must keep serving its shards
        // (so the writes below reach its pools) while it is unhealthy.
        extra_toml: NO_AUTO_FAILOVER.into(),
        ..Options::default()
    })
    .await;
    let key = &gz_keys(1)[0];
    let gz_core = c.sim_addr("gz", "core");

    // gz's only core backend crashes: the first read finds it refusing, ejects it and spills.
    c.stop_sim("gz", "core").await;
    let r = c.send(get("/orders", &[("x-user-id", key)])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.idc(), "gz");
    assert_eq!(r.upstream_header("x-shardgate-spill").as_deref(), Some("1"));
    let st = status(&c).await;
    let b = backend(&st, "gz", "core");
    assert_eq!(b["ejected"], true, "{b}");
    assert_eq!(
        b["healthy"], true,
        "ejected by traffic, not by the probes: {b}"
    );
    assert_eq!(
        b["ejection_ms"].as_u64(),
        Some(shardgate::data::upstream::health::CONNECT_BASE_EJECTION_MS)
    );
    // The whole pool is out (loudly): gz is unhealthy, and nothing is tried there any more.
    eventually("gz to be unhealthy", || async {
        (idc(&status(&c).await, "gz")["healthy"] == false).then_some(())
    })
    .await;
    let metrics = c.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(&format!(
            r#"shardgate_backend_healthy{{idc="gz",set="core",backend="{gz_core}"}} 0"#
        )),
        "{metrics}"
    );
    assert!(metrics.contains(r#"shardgate_idc_healthy{idc="gz"} 0"#));
    let r = c
        .send(request(Method::PUT, "/orders", &[("x-user-id", key)], "{}"))
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connect");
    assert!(
        r.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("in service")),
        "{}",
        r.text()
    );

    // Each ejection in a row lasts longer.
    let dead_of_gz = |st: &Value| backend(st, "gz", "dead").clone();
    let r = c
        .send(request(
            Method::POST,
            "/dead/1",
            &[("x-user-id", key)],
            "{}",
        ))
        .await;
    assert_eq!(r.status, 502);
    let first = dead_of_gz(&status(&c).await);
    assert_eq!(first["ejected"], true, "{first}");
    assert_eq!(first["ejections"], 1);
    eventually("the first ejection to run out", || async {
        (dead_of_gz(&status(&c).await)["ejected"] == false).then_some(())
    })
    .await;
    let r = c
        .send(request(
            Method::POST,
            "/dead/1",
            &[("x-user-id", key)],
            "{}",
        ))
        .await;
    assert_eq!(r.status, 502);
    let second = dead_of_gz(&status(&c).await);
    assert_eq!(second["ejected"], true, "{second}");
    assert_eq!(second["ejections"], 2);
    assert!(
        second["ejection_ms"].as_u64() > first["ejection_ms"].as_u64(),
        "{first} then {second}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_under_read_load_fails_no_read() {
    // Default probes and breaker: what a crash looks like with the shipped settings. Sixteen
    // readers in flight are enough for the crash to open gz's breaker (reads must spill past it).
    let mut c = Cluster::start().await;
    let keys = gz_keys(50);
    let proxy = c.proxy();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..16)
        .map(|w| {
            let (stop, failed, served, keys) =
                (stop.clone(), failed.clone(), served.clone(), keys.clone());
            tokio::spawn(async move {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let key = &keys[i % keys.len()];
                    i += 1;
                    match try_send(proxy, get("/orders", &[("x-user-id", key)])).await {
                        Ok(r) if r.status == 200 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failed
                            .lock()
                            .expect("the list of failed reads")
                            .push(format!("{}: {}", r.status, r.text())),
                        Err(e) => failed.lock().expect("the list of failed reads").push(e),
                    }
                }
            })
        })
        .collect();
    let more_than = |n: u64| {
        let served = served.clone();
        async move {
            eventually("reads to be served", || async {
                (served.load(Ordering::Relaxed) > n).then_some(())
            })
            .await
        }
    };
    more_than(100).await;
    c.stop_sim("gz", "core").await;
    // Through the ejection, the probes taking over and the breaker: every read is served.
    eventually("the probes to call gz's core backend down", || async {
        (backend(&status(&c).await, "gz", "core")["healthy"] == false).then_some(())
    })
    .await;
    more_than(served.load(Ordering::Relaxed) + 200).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        within(REQUEST_DEADLINE, "a reader to stop", r)
            .await
            .expect("the reader task");
    }
    let failed = failed.lock().expect("the list of failed reads").clone();
    assert!(
        failed.is_empty(),
        "{} reads failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    c.stop().await;
}

/// gz warming from now over `warmup_s`.
fn warming(warmup_s: u64) -> Value {
    serde_json::json!({"idcs": {"gz": {
        "state": "warming", "reason": "test", "by": "tests",
        "at": unix_now(), "at_ms": unix_now_ms(), "warmup_s": warmup_s,
    }}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_steps_come_home_one_fenced_step_at_a_time() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let home = idc(&status(&c).await, "gz")["shards_home"]
        .as_u64()
        .expect("shards_home");
    apply_overrides(&c, warming(2)).await;
    // Sample what gz serves until it is active again: the share only grows, and it changes
    // only with a new revision (each step is a fenced move the gateway drives and publishes,
    // never a clock tick of its own).
    let mut samples: Vec<(u64, u64)> = Vec::new();
    within(Duration::from_secs(90), "the warm-up to complete", async {
        loop {
            let st = status(&c).await;
            let gz = idc(&st, "gz");
            let served = gz["shards_served"].as_u64().expect("shards_served");
            let revision = st["revision"].as_u64().expect("revision");
            if let Some((rev, before)) = samples.last() {
                if served != *before {
                    assert!(revision > *rev, "gz's share changed without a new revision");
                }
            }
            if samples.last().map(|s| s.1) != Some(served) {
                samples.push((revision, served));
            }
            if gz["state"] == "active" {
                assert_eq!(served, home, "active before the warm-up ended: {gz}");
                return;
            }
            assert_eq!(gz["state"], "warming");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let samples: Vec<u64> = samples.into_iter().map(|s| s.1).collect();
    assert!(
        samples.windows(2).all(|w| w[0] < w[1]),
        "served shards went down: {samples:?}"
    );
    assert!(
        samples.len() >= 4,
        "expected the fraction to rise in steps: {samples:?} of {home}"
    );
    let st = status(&c).await;
    let steps: Vec<u64> = st["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "warmup" && m["phase"] == "applied")
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps.len(), 10, "ten fenced steps: {st}");
    assert!(samples[0] < home / 2, "{samples:?} of {home}");
    // A key of gz's is served by gz again, and the table always gives it one IDC.
    let key = &gz_keys(1)[0];
    assert_eq!(c.serving_idc_of(key), "gz");
    let r = c.send(get("/orders", &[("x-user-id", key)])).await;
    assert_eq!(r.idc(), "gz");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_is_retried_on_another_backend_when_its_backend_dies() {
    let (pair, options) = pair_backends().await;
    let mut pair: Vec<Option<SimBackend>> = pair.into_iter().map(Some).collect();
    let c = Cluster::start_with(options).await;
    let proxy = c.proxy();
    // Held by its backend until the backend dies, then held by the other until released:
    // no answer can come before the backend dies, however slow the machine.
    let inflight =
        tokio::spawn(async move { send(proxy, get("/pair", &[("x-sim-hold", "1")])).await });
    let first = eventually("the request to be held by a backend", || {
        let hit = pair
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.held() == 1));
        async move { hit }
    })
    .await;
    // The backend dies with the request in flight.
    let dying = pair[first].take().expect("running");
    within(Duration::from_secs(5), "the backend to stop", dying.stop()).await;
    let survivor = pair[1 - first].as_ref().expect("running");
    eventually("the retry to reach the other backend", || async {
        (survivor.held() == 1).then_some(())
    })
    .await;
    survivor.release_held();
    let r = within(REQUEST_DEADLINE, "the request", inflight)
        .await
        .expect("the request task");
    let other = ["pa", "pb"][1 - first];
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.idc(), other, "answered by the surviving backend");
    assert_eq!(survivor.hits(), 1);
    c.stop().await;
    for sim in pair.into_iter().flatten() {
        sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_requests_follow_their_shard_to_a_new_serving_idc() {
    // `ledger`: like `orders`, with time for a replay after a held answer was cut short.
    let mut c = Cluster::start_with(Options {
        cache_dir: true,
        extra_toml: "\n[[routes]]\nname = \"ledger\"\npath_prefix = \"/ledger\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\ntimeout_ms = 15000\n".into(),
        ..Options::default()
    })
    .await;
    let key = gz_keys(1)[0].clone();
    let proxy = c.proxy();
    let slow = |method: Method| {
        let key = key.clone();
        tokio::spawn(async move {
            // Held by gz's backend until it dies: the failover below always happens while
            // both are in flight.
            let headers = [("x-user-id", key.as_str()), ("x-sim-hold", "1")];
            send(proxy, request(method, "/ledger", &headers, "")).await
        })
    };
    let put = slow(Method::PUT);
    let post = slow(Method::POST);
    eventually("both requests to be held by gz", || async {
        (c.sim("gz", "core").held() == 2).then_some(())
    })
    .await;
    // Failover while they are in flight: gz goes down, then its backend dies.
    let down = serde_json::json!({"idcs": {"gz": {
        "state": "down", "reason": "test", "by": "tests", "at": unix_now(),
    }}});
    apply_overrides(&c, down).await;
    let owner = c.serving_idc_of(&key);
    assert_ne!(owner, "gz");
    c.stop_sim("gz", "core").await;
    // The replayed PUT carries the hold too: let the new owner answer it.
    eventually("the PUT to be replayed in the new owner", || async {
        (c.sim(&owner, "core").held() == 1).then_some(())
    })
    .await;
    c.sim(&owner, "core").release_held();

    let put = within(REQUEST_DEADLINE, "the PUT", put)
        .await
        .expect("task");
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(put.idc(), owner, "the PUT was replayed in the new owner");
    assert_eq!(put.header("x-shardgate-idc"), Some(owner.as_str()));
    assert_eq!(put.upstream_header("x-shardgate-idc"), Some(owner.clone()));
    // A POST is never replayed anywhere.
    let post = within(REQUEST_DEADLINE, "the POST", post)
        .await
        .expect("task");
    assert_eq!(post.status, 502, "{}", post.text());
    assert_eq!(post.json()["error"], "upstream_protocol");
    assert_eq!(
        c.sim(&owner, "core").hits(),
        1,
        "only the PUT reached the new owner"
    );
    c.stop().await;
}
