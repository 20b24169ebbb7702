//! Isolation and degradation through real sockets (DESIGN.md §5): set budgets keep a noncore
//! flood away from core, refusals come at once, degrade switches answer without backends,
//! breakers trip on system failures only and recover, rate limits and the retry budget hold.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use shardgate::admission::{BreakerSettings, IsolationSettings};
use support::*;

/// How long the slow noncore backend takes: every refusal must come back well before it.
const SLOW_MS: u64 = 3000;

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
        noncore_max_inflight: Some(4),
        extra_toml: SLOW_ROUTE.into(),
        ..Options::default()
    })
    .await;
    let proxy = c.proxy();
    let delay = SLOW_MS.to_string();
    // 40 concurrent slow noncore requests against a budget of 4.
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let req = get("/reports", &[("x-sim-delay-ms", &delay)]);
            tokio::spawn(async move {
                let start = Instant::now();
                let reply = send(proxy, req).await;
                (reply, start.elapsed())
            })
        })
        .collect();
    eventually("noncore to be at its budget", || async {
        (status(&c).await["sets"]["noncore"]["inflight"] == 4).then_some(())
    })
    .await;

    // Meanwhile core answers every request.
    let mut core_ok = 0;
    for i in 0..50 {
        let key = format!("user-{i}");
        let reply = c.send(get("/orders", &[("x-user-id", &key)])).await;
        assert_eq!(reply.status, 200, "core request {i}: {}", reply.text());
        core_ok += 1;
    }
    assert_eq!(core_ok, 50);

    let mut served = 0;
    let mut refused = 0;
    for task in flood {
        let (reply, took) = within(REQUEST_DEADLINE, "a flood request", task)
            .await
            .expect("the flood task");
        match reply.status.as_u16() {
            200 => served += 1,
            503 => {
                refused += 1;
                assert_eq!(reply.header("x-shardgate-reason"), Some("set_full"));
                assert_eq!(reply.header("retry-after"), Some("1"));
                assert_eq!(reply.json()["error"], "set_full");
                assert!(
                    took < Duration::from_millis(SLOW_MS),
                    "a refusal waited for the slow backend ({took:?})"
                );
            }
            s => panic!("unexpected flood answer {s}: {}", reply.text()),
        }
    }
    assert!(served >= 4, "the budget's worth is served ({served})");
    assert!(refused >= 20, "most of the flood is refused ({refused})");
    assert_eq!(served + refused, 40);
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
        let out = within(
            Duration::from_secs(30),
            "shardgate degrade",
            tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
                .args(&args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("run the shardgate binary");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
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
    assert_eq!(code, Some(1), "core without --force is refused: {err}");
    assert_eq!(c.send(get("/orders/1", &[])).await.status, 200);
    let (code, err) = run(args("noncore", "on", false)).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(c.send(get("/catalog", &[])).await.status, 503);
    let (code, err) = run(args("noncore", "off", false)).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(c.send(get("/catalog", &[])).await.status, 200);
    let (code, err) = run(args("core", "on", true)).await;
    assert_eq!(code, Some(0), "core with --force: {err}");
    assert_eq!(c.send(get("/orders/1", &[])).await.status, 503);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakers_trip_on_5xx_not_4xx_and_recover() {
    let c = Cluster::start_with(Options {
        isolation: IsolationSettings {
            breaker: BreakerSettings {
                open_for: Duration::from_millis(300),
                ..BreakerSettings::default()
            },
            ..IsolationSettings::default()
        },
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

    // After `open_for`, three good probes close it again.
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
        isolation: IsolationSettings {
            breaker: BreakerSettings {
                consecutive: 1_000_000,
                min_requests: 1_000_000,
                ..BreakerSettings::default()
            },
            ..IsolationSettings::default()
        },
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
    let reserve = u64::from(IsolationSettings::default().retry_reserve);
    // Unbudgeted, each request would retry in every IDC it tried (at least 60).
    assert!(
        retries <= reserve + n / 5,
        "{retries} retries for {n} requests"
    );
    assert!(retries > 0);
    c.stop().await;
}
