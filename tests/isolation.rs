//! Isolation and degradation through real sockets (DESIGN.md §5): set budgets keep a noncore
//! flood away from core, refusals come at once, overload sheds noncore then subcore and stops
//! by itself, degrade switches answer without backends, breakers trip on system failures only
//! and recover, rate limits and the retry budget hold, and the `[isolation]` knobs of the
//! topology change on a reload while the admission state carries on.

mod support;

use std::time::Duration;

use serde_json::Value;
use shardgate::control::topology::IsolationSpec;
use shardgate::dev::sim::SimBackend;
use support::*;

async fn status(c: &Cluster) -> Value {
    c.admin_get("/status").await.json()
}

fn breaker_state(status: &Value, idc: &str, set: &str) -> Option<String> {
    status["breakers"].as_array()?.iter().find_map(|b| {
        (b["idc"] == idc && b["set"] == set).then(|| b["state"].as_str().unwrap_or("").to_owned())
    })
}

/// A noncore route slow enough to hold its set's budget.
const SLOW_ROUTE: &str = r#"
[[routes]]
name = "reports"
path_prefix = "/reports"
set = "noncore"
sharded = false
timeout_ms = 10000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_noncore_flood_leaves_core_untouched_and_is_refused_fast() {
    let c = Cluster::start_with(Options {
        max_inflight: vec![("noncore", 4)],
        extra_toml: SLOW_ROUTE.into(),
        ..Options::default()
    })
    .await;
    let proxy = c.proxy();
    // `reports` is unsharded noncore: served by the local IDC's (bj's) noncore backend, which
    // holds each request until the test releases it.
    let backend = c.sim("bj", "noncore");
    // 40 concurrent held noncore requests against a budget of 4.
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let req = get("/reports", &[("x-sim-hold", "1")]);
            tokio::spawn(async move { send(proxy, req).await })
        })
        .collect();
    eventually("noncore to be at its budget", || async {
        (status(&c).await["sets"]["noncore"]["inflight"] == 4 && backend.held() == 4).then_some(())
    })
    .await;

    // Meanwhile core answers every request.
    for i in 0..50 {
        let key = format!("user-{i}");
        let reply = c.send(get("/orders", &[("x-user-id", &key)])).await;
        assert_eq!(reply.status, 200, "core request {i}: {}", reply.text());
    }

    // Every request over the budget is answered while the budget's four are still held by
    // the backend: a refusal never waits for the slow backend.
    eventually(
        "the refusals to come back while the backend holds the rest",
        || async { (flood.iter().filter(|t| t.is_finished()).count() == 36).then_some(()) },
    )
    .await;
    assert_eq!(backend.held(), 4, "nothing was released yet");
    let (refusals, held): (Vec<_>, Vec<_>) = flood.into_iter().partition(|t| t.is_finished());
    for task in refusals {
        let reply = within(REQUEST_DEADLINE, "a refused flood request", task)
            .await
            .expect("the flood task");
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.header("x-shardgate-reason"), Some("set_full"));
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.json()["error"], "set_full");
    }
    backend.release_held();
    for task in held {
        let reply = within(REQUEST_DEADLINE, "a held flood request", task)
            .await
            .expect("the flood task");
        assert_eq!(
            reply.status,
            200,
            "the budget's worth is served: {}",
            reply.text()
        );
    }
    let metrics = c.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"shardgate_refused_total{set="noncore",reason="set_full"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"shardgate_inflight{set="noncore"}"#));
    c.stop().await;
}

const FALLBACK_ROUTES: &str = r#"
[[routes]]
name = "feed"
path_prefix = "/feed"
set = "noncore"
sharded = false
fallback = { status = 200, body = '{"feed":[]}', content_type = "application/json", retry_after_s = 9 }

[[routes]]
name = "limited"
path_prefix = "/limited"
set = "noncore"
sharded = false
rate_limit = { rps = 1, burst = 2 }
"#;

async fn post_degrade(c: &Cluster, target: &str, body: &str) -> Reply {
    send(
        c.admin(),
        request(
            http::Method::POST,
            &format!("/override/degrade/{target}"),
            &[("content-type", "application/json")],
            body.to_owned(),
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_switches_answer_without_backend_calls() {
    let c = Cluster::start_with(Options {
        extra_toml: FALLBACK_ROUTES.into(),
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let noncore = c.sim("bj", "noncore");
    assert_eq!(c.send(get("/feed", &[])).await.status, 200);
    assert_eq!(noncore.hits(), 1);

    let on = post_degrade(&c, "noncore", r#"{"on":true,"reason":"test","by":"itest"}"#).await;
    assert_eq!(on.status, 200, "{}", on.text());
    let hits = c.total_hits();
    let fb = c.send(get("/feed", &[])).await;
    assert_eq!(fb.status, 200);
    assert_eq!(fb.text(), r#"{"feed":[]}"#);
    assert_eq!(fb.header("x-shardgate-reason"), Some("degraded"));
    assert_eq!(fb.header("retry-after"), Some("9"));
    // A route of the set without a fallback: 503 degraded.
    let plain = c.send(get("/catalog", &[])).await;
    assert_eq!(plain.status, 503);
    assert_eq!(plain.header("x-shardgate-reason"), Some("degraded"));
    assert!(plain.header("retry-after").is_some());
    assert_eq!(plain.json()["error"], "degraded");
    // Core is not affected.
    assert_eq!(c.send(get("/orders/1", &[])).await.status, 200);
    assert_eq!(
        c.total_hits(),
        hits + 1,
        "only the core request reached a backend"
    );
    let st = status(&c).await;
    assert_eq!(st["sets"]["noncore"]["degraded"], true);
    // Kept in the cache dir's overrides.json.
    let kept = std::fs::read_to_string(c.dir.path().join("cache/overrides.json"))
        .expect("overrides.json is written");
    assert!(kept.contains("noncore"), "{kept}");

    // Core needs force; a route switch works too.
    let refused = post_degrade(&c, "core", r#"{"on":true}"#).await;
    assert_eq!(refused.status, 409, "{}", refused.text());
    let off = post_degrade(&c, "noncore", r#"{"on":false}"#).await;
    assert_eq!(off.status, 200, "{}", off.text());
    assert_eq!(c.send(get("/catalog", &[])).await.status, 200);
    let route = post_degrade(&c, "route:catalog", r#"{"on":true}"#).await;
    assert_eq!(route.status, 200, "{}", route.text());
    assert_eq!(c.send(get("/catalog", &[])).await.status, 503);
    assert_eq!(c.send(get("/feed", &[])).await.status, 200);
    assert!(c
        .send(get("/feed", &[]))
        .await
        .header("x-shardgate-reason")
        .is_none());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_degrades_through_the_admin_api() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let admin = format!("http://{}", c.admin());
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_shardgate(&args, &[], Duration::from_secs(30)).await;
        (out.code, out.stderr)
    };
    let args = |target: &str, switch: &str, force: bool| {
        let mut v: Vec<String> = ["degrade", target, switch, "--admin", &admin, "--by", "t"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if force {
            v.push("--force".into());
        }
        v
    };
    let (code, err) = run(args("core", "on", false)).await;
    assert_eq!(code, 1, "core without --force is refused: {err}");
    assert_eq!(c.send(get("/orders/1", &[])).await.status, 200);
    let (code, err) = run(args("noncore", "on", false)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.send(get("/catalog", &[])).await.status, 503);
    let (code, err) = run(args("noncore", "off", false)).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.send(get("/catalog", &[])).await.status, 200);
    let (code, err) = run(args("core", "on", true)).await;
    assert_eq!(code, 0, "core with --force: {err}");
    assert_eq!(c.send(get("/orders/1", &[])).await.status, 503);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_trip_on_5xx_not_4xx_and_recover() {
    // Open for as long as the checks of the open breaker take; then a reload shortens it.
    let mut c = Cluster::start_with(Options {
        isolation: "[isolation.breaker]\nopen_ms = 600000\n".into(),
        ..Options::default()
    })
    .await;
    // `catalog` is noncore in the local IDC (bj).
    let sim = c.sim("bj", "noncore");
    for _ in 0..30 {
        let r = c.send(get("/catalog", &[("x-sim-status", "404")])).await;
        assert_eq!(r.status, 404);
    }
    assert_eq!(
        breaker_state(&status(&c).await, "bj", "noncore").as_deref(),
        Some("closed")
    );

    for _ in 0..5 {
        let r = c.send(get("/catalog", &[("x-sim-status", "500")])).await;
        assert_eq!(r.status, 500, "the backend's own 500 passes through");
    }
    let hits = sim.hits();
    let open = c.send(get("/catalog", &[])).await;
    assert_eq!(open.status, 503);
    assert_eq!(open.header("x-shardgate-reason"), Some("circuit_open"));
    assert!(open.header("retry-after").is_some());
    assert_eq!(sim.hits(), hits, "an open breaker calls no backend");
    assert_eq!(
        breaker_state(&status(&c).await, "bj", "noncore").as_deref(),
        Some("open")
    );
    let metrics = c.admin_get("/metrics").await.text();
    assert!(
        metrics.contains(r#"shardgate_breaker_state{idc="bj",set="noncore"} 1"#),
        "{metrics}"
    );
    // Core in the same IDC has its own breaker.
    let core_key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| c.serving_idc_of(k) == "bj")
        .expect("a key served by bj");
    assert_eq!(
        c.send(get("/orders", &[("x-user-id", &core_key)]))
            .await
            .status,
        200
    );

    // After `open_for` (now short), three good probes close it again.
    reload_isolation(&mut c, "[isolation.breaker]\nopen_ms = 200\n").await;
    eventually("the breaker to close after good probes", || async {
        let r = c.send(get("/catalog", &[])).await;
        assert!(r.status == 200 || r.status == 503, "{}", r.status);
        (breaker_state(&status(&c).await, "bj", "noncore").as_deref() == Some("closed"))
            .then_some(())
    })
    .await;
    assert_eq!(c.send(get("/catalog", &[])).await.status, 200);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let c = Cluster::start_with(Options {
        extra_toml: FALLBACK_ROUTES.into(),
        ..Options::default()
    })
    .await;
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..10 {
        let r = c.send(get("/limited", &[])).await;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(r.header("x-shardgate-reason"), Some("rate_limited"));
                assert!(r.header("retry-after").is_some());
                assert_eq!(r.json()["error"], "rate_limited");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 2, "the burst is served ({ok})");
    assert!(limited >= 1, "the limit is enforced ({ok} served)");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_under_a_failing_pool() {
    // Two refused backends per IDC in set `flaky`: every request could retry once in each IDC
    // it tries. The breaker is kept out of the way so every request reaches the pool.
    let (_s1, a) = refused_port();
    let (_s2, b) = refused_port();
    let c = Cluster::start_with(Options {
        extra_sets: "[sets.flaky]\npriority = 1\n".into(),
        extra_pools: vec![("flaky".into(), a), ("flaky".into(), b)],
        extra_toml: "\n[[routes]]\nname = \"flaky\"\npath_prefix = \"/flaky\"\nset = \"flaky\"\nsharded = false\nretries = 1\ntimeout_ms = 2000\n".into(),
        isolation: "[isolation.breaker]\nconsecutive = 1000000\nmin_requests = 1000000\n".into(),
        ..Options::default()
    })
    .await;
    let n = 60;
    for _ in 0..n {
        let r = c.send(get("/flaky", &[])).await;
        assert_eq!(r.status, 502, "{}", r.text());
    }
    let st = status(&c).await;
    let flaky = &st["sets"]["flaky"];
    assert_eq!(flaky["requests"], n);
    let retries = flaky["retries"].as_u64().expect("retries in /status");
    let reserve = u64::from(IsolationSpec::default().retry_reserve);
    // Unbudgeted, each request would retry in every IDC it tried (at least 60).
    assert!(
        retries <= reserve + n / 5,
        "{retries} retries for {n} requests"
    );
    assert!(retries > 0);
    c.stop().await;
}

/// `held`: a core route whose requests wait at the backend until released (`x-sim-hold`);
/// `sub`: a subcore route; `feed`: a noncore route with a fallback.
const SHEDDING_ROUTES: &str = r#"
[[routes]]
name = "held"
path_prefix = "/held"
set = "core"
sharded = false
timeout_ms = 60000

[[routes]]
name = "sub"
path_prefix = "/sub"
set = "subcore"
sharded = false

[[routes]]
name = "feed"
path_prefix = "/feed"
set = "noncore"
sharded = false
fallback = { status = 200, body = '{"feed":[]}', content_type = "application/json" }
"#;

/// Sends `n` requests one after the other and counts (served, shed); anything else fails.
async fn probe(c: &Cluster, path: &str, headers: &[(&str, &str)], n: usize) -> (usize, usize) {
    let (mut served, mut shed) = (0, 0);
    for _ in 0..n {
        let r = c.send(get(path, headers)).await;
        match r.status.as_u16() {
            200 => served += 1,
            503 => {
                assert_eq!(r.header("x-shardgate-reason"), Some("shed"), "{path}");
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"], "shed");
                shed += 1;
            }
            s => panic!("{path}: unexpected {s}: {}", r.text()),
        }
    }
    (served, shed)
}

/// Starts `n` more core requests that wait at bj's core backend, and waits until the gateway
/// counts every held request in flight.
async fn hold(c: &Cluster, held: &mut Vec<tokio::task::JoinHandle<Reply>>, n: usize) {
    let proxy = c.proxy();
    for _ in 0..n {
        let req = get("/held", &[("x-sim-hold", "1")]);
        held.push(tokio::spawn(async move { send(proxy, req).await }));
    }
    let want = held.len() as u64;
    let sim = c.sim("bj", "core");
    eventually("the held core requests to reach the backend", || async {
        let inflight = status(c).await["inflight_total"].as_u64();
        (sim.held() == want && inflight == Some(want)).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_sheds_noncore_then_subcore_and_stops_by_itself() {
    let subcore = SimBackend::start("127.0.0.1:0".parse().expect("addr"), "any", "subcore")
        .await
        .expect("a subcore backend");
    // Budgets sum to 20 and shedding starts at load 0.5: noncore (priority 2) ramps from 0
    // to 1 over load 0.50-0.75, then subcore and dead (priority 1) over 0.75-1.0. The probes
    // go one at a time, so each sees load (held + 1) / 20.
    let c = Cluster::start_with(Options {
        max_inflight: vec![("core", 17), ("noncore", 1), ("dead", 1)],
        extra_sets: "[sets.subcore]\npriority = 1\nmax_inflight = 1\n".into(),
        extra_pools: vec![("subcore".into(), subcore.addr)],
        isolation: "[isolation]\nshed_start = 0.5\n".into(),
        extra_toml: SHEDDING_ROUTES.into(),
        ..Options::default()
    })
    .await;
    let core = [("x-user-id", "user-7")];
    let mut held = Vec::new();
    assert_eq!(probe(&c, "/catalog", &[], 10).await, (10, 0), "no load");

    // Load 0.65: noncore is partly shed (about 60%), subcore and core not at all.
    hold(&c, &mut held, 12).await;
    let (served, shed) = probe(&c, "/catalog", &[], 40).await;
    assert!(
        served > 0 && shed > 0,
        "noncore ramps: {served} served, {shed} shed"
    );
    assert_eq!(probe(&c, "/sub", &[], 20).await, (20, 0));
    assert_eq!(probe(&c, "/orders", &core, 20).await, (20, 0));

    // Load 0.75: every noncore request is shed, subcore is not yet. Noncore is degradable:
    // a route of it with a fallback answers the fallback instead, without a backend call.
    hold(&c, &mut held, 2).await;
    assert_eq!(probe(&c, "/catalog", &[], 20).await, (0, 20));
    let hits = c.sim("bj", "noncore").hits();
    let fb = c.send(get("/feed", &[])).await;
    assert_eq!(
        (fb.status.as_u16(), fb.text().as_str()),
        (200, r#"{"feed":[]}"#)
    );
    assert_eq!(fb.header("x-shardgate-reason"), Some("degraded"));
    assert_eq!(c.sim("bj", "noncore").hits(), hits);
    assert_eq!(probe(&c, "/sub", &[], 20).await, (20, 0));
    assert_eq!(probe(&c, "/orders", &core, 20).await, (20, 0));

    // Load 0.85: subcore is partly shed (about 40%); core is still served in full.
    hold(&c, &mut held, 2).await;
    assert_eq!(probe(&c, "/catalog", &[], 20).await, (0, 20));
    let (served, shed) = probe(&c, "/sub", &[], 40).await;
    assert!(
        served > 0 && shed > 0,
        "subcore ramps: {served} served, {shed} shed"
    );
    assert_eq!(probe(&c, "/orders", &core, 20).await, (20, 0));
    let metrics = c.admin_get("/metrics").await.text();
    for set in ["noncore", "subcore"] {
        let line = format!(r#"shardgate_refused_total{{set="{set}",reason="shed"}}"#);
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    assert!(!metrics.contains(r#"shardgate_refused_total{set="core""#));

    // The load falls: shedding stops without anyone touching the gateway.
    c.sim("bj", "core").release_held();
    for task in held {
        let reply = within(REQUEST_DEADLINE, "a held request", task)
            .await
            .expect("the held request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    eventually("the in-flight count to fall", || async {
        (status(&c).await["inflight_total"] == 0).then_some(())
    })
    .await;
    assert_eq!(probe(&c, "/catalog", &[], 20).await, (20, 0));
    assert_eq!(probe(&c, "/sub", &[], 20).await, (20, 0));
    c.stop().await;
    subcore.stop().await;
}

/// Rewrites the topology with these `[isolation]` tables and waits until it serves.
async fn reload_isolation(c: &mut Cluster, isolation: &str) {
    let before = c.topology().revision;
    c.options.isolation = isolation.to_owned();
    let pins = c.options.pins.clone();
    let pins: Vec<(&str, &str)> = pins.iter().map(|(r, i)| (&r[..], &i[..])).collect();
    let doc = c.document(&pins);
    c.write_topology(&doc);
    eventually("the reload to be served", || async {
        (c.topology().revision > before).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_knobs_change_on_reload_and_breakers_carry_on() {
    let mut c = Cluster::start_with(Options {
        isolation: "[isolation.breaker]\nopen_ms = 600000\n".into(),
        ..Options::default()
    })
    .await;
    let t = c.topology();
    assert_eq!(t.isolation.breaker.open_for, Duration::from_secs(600));
    for _ in 0..5 {
        let r = c.send(get("/catalog", &[("x-sim-status", "500")])).await;
        assert_eq!(r.status, 500);
    }
    assert_eq!(c.send(get("/catalog", &[])).await.status, 503);

    // A reload that leaves the breaker's knobs alone keeps it open (and only shedding moves).
    reload_isolation(
        &mut c,
        "[isolation]\nshed_start = 0.8\n[isolation.breaker]\nopen_ms = 600000\n",
    )
    .await;
    assert_eq!(c.topology().isolation.shed_start, 0.8);
    let r = c.send(get("/catalog", &[])).await;
    assert_eq!(r.header("x-shardgate-reason"), Some("circuit_open"));
    assert_eq!(
        breaker_state(&status(&c).await, "bj", "noncore").as_deref(),
        Some("open")
    );

    // A shorter open time takes effect on the open breaker without a restart: it lets probes
    // through and closes.
    reload_isolation(&mut c, "[isolation.breaker]\nopen_ms = 200\n").await;
    eventually("the breaker to close after good probes", || async {
        let r = c.send(get("/catalog", &[])).await;
        assert!(r.status == 200 || r.status == 503, "{}", r.status);
        (breaker_state(&status(&c).await, "bj", "noncore").as_deref() == Some("closed"))
            .then_some(())
    })
    .await;

    // An invalid table is refused whole, with the field named; the last good one serves.
    let revision = c.topology().revision;
    c.options.isolation = "[isolation]\nretry_ratio = 2.0\n".into();
    let pins = c.options.pins.clone();
    let pins: Vec<(&str, &str)> = pins.iter().map(|(r, i)| (&r[..], &i[..])).collect();
    let doc = c.document(&pins);
    c.write_topology(&doc);
    let problem = eventually("the invalid reload to be reported", || async {
        let st = status(&c).await;
        st["source"]["last_problem"]
            .as_str()
            .filter(|p| p.contains("isolation.retry_ratio"))
            .map(str::to_owned)
    })
    .await;
    assert!(problem.contains("between 0.0 and 1.0"), "{problem}");
    assert_eq!(c.topology().revision, revision);
    assert_eq!(
        c.topology().isolation.retry_ratio,
        IsolationSpec::default().retry_ratio
    );
    c.stop().await;
}
