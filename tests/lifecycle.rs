//! The gateway over time: hot reload of the topology file (good, invalid, good again) and
//! graceful shutdown with a request in flight.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use shardgate::control::topology::Topology;
use support::{eventually, get, request, try_send, within, Cluster, Options, Reply};
use tokio::net::TcpStream;

/// The revision the backend was told (`x-shardgate-epoch`).
fn epoch(r: &Reply) -> u64 {
    r.upstream_header("x-shardgate-epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no numeric x-shardgate-epoch upstream: {}", r.text()))
}

/// The value of a counter or gauge line `name{labels} value` (or `name value`) in /metrics.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn status(c: &Cluster) -> Value {
    let r = c.admin_get("/status").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()
}

async fn invalid_reloads(c: &Cluster) -> f64 {
    let text = c.admin_get("/metrics").await.text();
    metric(
        &text,
        "shardgate_topology_reloads_total{result=\"invalid\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_file_changes_are_applied_and_invalid_ones_are_not() {
    let c = Cluster::start().await;
    let keys: Vec<String> = (0..)
        .map(|i| format!("reload-{i}"))
        .filter(|k| c.serving_idc_of(k) != "sh")
        .take(10)
        .collect();
    let probe = || get("/orders", &[("x-user-id", &keys[0])]);

    let r = c.send(probe()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.idc(), "sh");
    let rev1 = epoch(&r);
    assert_eq!(rev1, c.topology().revision);

    // 1. Every shard pinned to sh.
    c.write_topology(&c.document(&[("0-1023", "sh")]));
    let r = eventually("requests to go to sh after the reload", || async {
        let r = c.send(probe()).await;
        (r.idc() == "sh").then_some(r)
    })
    .await;
    let rev2 = epoch(&r);
    assert!(rev2 > rev1, "the revision grows: {rev1} -> {rev2}");
    assert_eq!(c.topology().revision, rev2);
    assert_eq!(r.header("x-shardgate-idc"), Some("sh"));
    for key in &keys {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.idc(), "sh", "{key} after pinning everything to sh");
        assert_eq!(epoch(&r), rev2);
    }
    assert_eq!(status(&c).await["source"]["last_problem"], Value::Null);

    // 2. A document that parses but is invalid (a pin to an unknown IDC): rejected.
    let invalid_before = invalid_reloads(&c).await;
    c.write_topology(&c.document(&[("0-1023", "atlantis")]));
    let problem = eventually("/status to report the rejected document", || async {
        status(&c).await["source"]["last_problem"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(problem.contains("atlantis"), "last_problem: {problem}");
    assert!(invalid_reloads(&c).await > invalid_before);
    let s = status(&c).await;
    assert_eq!(s["revision"], rev2, "the revision does not move");
    assert_eq!(c.topology().revision, rev2);
    for key in &keys {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.idc(), "sh", "{key}: routing unchanged");
        assert_eq!(epoch(&r), rev2);
    }

    // 3. A file that is not even TOML: rejected too, and reported.
    let invalid_before = invalid_reloads(&c).await;
    c.write_topology("cluster = \"itest\"\nthis is [not toml\n");
    eventually(
        "the broken file to be counted as an invalid reload",
        || async { (invalid_reloads(&c).await > invalid_before).then_some(()) },
    )
    .await;
    let s = status(&c).await;
    let problem = s["source"]["last_problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("line 2"),
        "/status names the syntax error, not an older problem: {problem:?}"
    );
    assert_eq!(s["revision"], rev2);
    let r = c.send(probe()).await;
    assert_eq!((r.idc().as_str(), epoch(&r)), ("sh", rev2));

    // 4. A valid document again: applied, and the problem is cleared.
    c.write_topology(&c.document(&[("0-1023", "bj")]));
    let r = eventually("requests to go to bj after the good reload", || async {
        let r = c.send(probe()).await;
        (r.idc() == "bj").then_some(r)
    })
    .await;
    let rev3 = epoch(&r);
    assert!(rev3 > rev2, "the revision grows again: {rev2} -> {rev3}");
    let s = status(&c).await;
    assert_eq!(s["revision"], rev3);
    assert_eq!(s["source"]["last_problem"], Value::Null);
    let text = c.admin_get("/metrics").await.text();
    assert_eq!(
        metric(&text, "shardgate_topology_revision"),
        Some(rev3 as f64)
    );
    c.stop().await;
}

/// Requests in flight to any backend of the snapshot.
fn in_flight(topo: &Topology) -> u32 {
    topo.idcs
        .iter()
        .flat_map(|idc| idc.pools.iter())
        .flat_map(|pool| pool.iter())
        .map(|b| b.inflight())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_once_panicked_the_file_source_is_rejected_and_reloads_go_on() {
    let c = Cluster::start().await;
    let rev = c.topology().revision;
    // A pin past the end of the largest shard table, in a document whose shard_count is past it.
    let huge = c
        .document(&[("1048576", "sh")])
        .replace("shard_count = 1024", "shard_count = 2000000");
    assert_ne!(
        huge,
        c.document(&[("1048576", "sh")]),
        "the count was replaced"
    );
    c.write_topology(&huge);
    let problem = eventually("/status to report the rejected document", || async {
        status(&c).await["source"]["last_problem"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(problem.contains("shards.pins[0].range"), "{problem}");
    assert_eq!(c.topology().revision, rev, "the last good snapshot serves");
    let r = c.send(get("/orders", &[("x-user-id", "u1")])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The source is alive: the next good document is applied.
    c.write_topology(&c.document(&[("0-1023", "sh")]));
    eventually("the good document to be applied", || async {
        (c.topology().revision > rev).then_some(())
    })
    .await;
    let r = c.send(get("/orders", &[("x-user-id", "u1")])).await;
    assert_eq!(r.idc(), "sh");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_then_refuses_connections() {
    let mut c = Cluster::start().await;
    let proxy = c.proxy();
    let admin = c.admin();
    let key = "slowpoke";
    let serving = c.serving_idc_of(key);
    let before = c.total_hits();

    let slow = tokio::spawn(try_send(
        proxy,
        get("/orders", &[("x-user-id", key), ("x-sim-delay-ms", "500")]),
    ));
    // The request is in flight once its backend has it (the delay starts then).
    eventually("the slow request to reach its backend", || {
        let reached = c.total_hits() > before;
        async move { reached.then_some(()) }
    })
    .await;

    let topo = c.topology();
    assert_eq!(in_flight(&topo), 1, "one request is in flight upstream");

    let running = c.take_running();
    // What is still in flight upstream the moment shutdown returns.
    let shutdown = tokio::spawn(async move {
        running.shutdown().await;
        in_flight(&topo)
    });

    let reply = within(Duration::from_secs(10), "the in-flight request", slow)
        .await
        .expect("the request task")
        .expect("the in-flight request completes during shutdown");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.idc(), serving);

    let left = within(Duration::from_secs(10), "shutdown to complete", shutdown)
        .await
        .expect("the shutdown task");
    assert_eq!(
        left, 0,
        "shutdown returned before the in-flight request ended"
    );
    for (what, addr) in [("proxy", proxy), ("admin", admin)] {
        let attempt = within(
            Duration::from_secs(5),
            "a connection attempt",
            TcpStream::connect(addr),
        )
        .await;
        assert!(
            attempt.is_err(),
            "the {what} listener still accepts connections after shutdown"
        );
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_idle_connections() {
    let mut c = Cluster::start_with(Options {
        drain: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    // A keep-alive connection that served one request and now idles.
    let stream = TcpStream::connect(c.proxy()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    let conn = tokio::spawn(conn);
    let mut req = get("/orders", &[("x-user-id", "idler")]);
    req.headers_mut()
        .insert("host", c.proxy().to_string().parse().expect("host"));
    let resp = within(
        Duration::from_secs(10),
        "a request",
        sender.send_request(req),
    )
    .await
    .expect("an answer");
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    // An idle connection, never used.
    let _idle = TcpStream::connect(c.proxy()).await.expect("connect");

    // Idle connections are closed at once, well before the 60 s drain timeout.
    let running = c.take_running();
    within(
        Duration::from_secs(10),
        "shutdown with only idle connections open",
        running.shutdown(),
    )
    .await;
    within(
        Duration::from_secs(5),
        "the gateway to close the idle keep-alive connection",
        conn,
    )
    .await
    .expect("the client connection task")
    .expect("the connection closed cleanly");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_no_longer_than_the_drain_timeout() {
    let mut c = Cluster::start_with(Options {
        drain: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let before = c.total_hits();
    // A request that would take 30 s: far past the drain timeout (and the route's 2 s).
    let stuck = tokio::spawn(try_send(
        c.proxy(),
        request(
            Method::POST,
            "/upload",
            &[("x-user-id", "stuck"), ("x-sim-delay-ms", "30000")],
            "payload",
        ),
    ));
    eventually("the stuck request to reach its backend", || {
        let reached = c.total_hits() > before;
        async move { reached.then_some(()) }
    })
    .await;
    let running = c.take_running();
    within(
        Duration::from_secs(5),
        "shutdown with a request stuck past the 300 ms drain timeout",
        running.shutdown(),
    )
    .await;
    stuck.abort();
    c.stop().await;
}
