//! The admin listener on a real socket: health, readiness, metrics after traffic, explain,
//! topology and status; the operator writes refusing bad, oversized and slow bodies; and the
//! proxy listener never serving admin paths.

mod support;

use http::StatusCode;
use serde_json::Value;
use shardgate::control::topology::Shard;
use support::{get, keys_where, request, send, within, Cluster, Options, REQUEST_DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sum of the samples of `name` whose labels contain every one of `labels`.
fn sum_series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (set, value) = rest.split_once("} ")?;
            labels
                .iter()
                .all(|want| set.split(',').any(|have| have == *want))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let c = Cluster::start().await;
    let r = c.admin_get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = c.admin_get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Traffic: three orders answered 200, one refused 400, one request with no route.
    for key in ["m1", "m2", "m3"] {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(
        c.send(get("/orders", &[])).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        c.send(get("/nowhere", &[])).await.status,
        StatusCode::NOT_FOUND
    );

    let r = c.admin_get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    let total = "shardgate_requests_total";
    assert_eq!(
        sum_series(
            &text,
            total,
            &["route=\"orders\"", "set=\"core\"", "status=\"200\""]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        sum_series(&text, total, &["route=\"orders\"", "status=\"400\""]),
        1.0,
        "{text}"
    );
    assert_eq!(sum_series(&text, total, &["status=\"404\""]), 1.0, "{text}");
    // Each answered request is counted under the IDC that served it.
    for key in ["m1", "m2", "m3"] {
        let idc = format!("idc=\"{}\"", c.serving_idc_of(key));
        assert!(
            sum_series(&text, total, &["route=\"orders\"", &idc]) >= 1.0,
            "{key}: {text}"
        );
    }
    let revision = c.topology().revision;
    assert!(
        text.lines()
            .any(|l| l == format!("shardgate_topology_revision {revision}")),
        "{text}"
    );
    assert_eq!(
        sum_series(
            &text,
            "shardgate_topology_reloads_total",
            &["result=\"ok\""]
        ),
        1.0,
        "{text}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_topology_and_status() {
    let c = Cluster::start().await;
    let topo = c.topology();

    for key in ["user-42", "böb /1"] {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("key", key)
            .finish();
        let r = c.admin_get(&format!("/explain?{query}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let v = r.json();
        let shard = Shard::of_key(key.as_bytes(), topo.shard_count);
        assert_eq!(v["key"], key);
        assert_eq!(v["shard"], shard.0, "{key}");
        assert_eq!(v["home_idc"], topo.idc(topo.home(shard)).name.as_str());
        assert_eq!(v["serving_idc"], c.serving_idc_of(key));
        assert_eq!(v["revision"], topo.revision);
        // What explain says is what the proxy does.
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.idc(), v["serving_idc"].as_str().unwrap_or_default());
    }
    // A pinned key explains its pin.
    let pinned = &keys_where("explained", 1, |s| s.0 <= 63)[0];
    let v = c.admin_get(&format!("/explain?key={pinned}")).await.json();
    assert_eq!(v["home_idc"], "gz");
    assert!(
        v["reason"].as_str().is_some_and(|r| r.contains("pinned")),
        "{v}"
    );
    // Non-sharded routes explain the local IDC.
    let v = c
        .admin_get("/explain?key=anything&route=catalog")
        .await
        .json();
    assert_eq!(v["shard"], Value::Null);
    assert_eq!(v["serving_idc"], "bj");
    let r = c.admin_get("/explain").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "explain needs a key");

    let r = c.admin_get("/topology").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["revision"], topo.revision);
    assert_eq!(v["document"]["cluster"], "itest");
    let served: u64 = v["shards_served"]
        .as_object()
        .expect("shards_served by IDC")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(served, 1024);

    let r = c.admin_get("/status").await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["revision"], topo.revision);
    assert_eq!(v["source"]["kind"], "file");
    assert_eq!(v["source"]["up"], true);
    assert_eq!(v["source"]["last_problem"], Value::Null);
    assert_eq!(v["local_idc"], "bj");
    let names: Vec<&str> = v["idcs"]
        .as_array()
        .expect("idcs")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, ["sh", "bj", "gz"]);
    for idc in v["idcs"].as_array().expect("idcs") {
        assert_eq!(idc["state"], "active", "{idc}");
    }

    let r = c.admin_get("/no-such-endpoint").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_listener_does_not_serve_admin_paths() {
    let c = Cluster::start().await;
    for path in ["/metrics", "/status", "/healthz", "/explain?key=1"] {
        let r = c.send(get(path, &[])).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path} on the proxy");
        assert_eq!(r.json()["error"], "no_route", "{path} on the proxy");
    }
    c.stop().await;
}

/// The value of `shardgate_task_failures_total{task="<task>"}` on the admin listener.
async fn task_failures(c: &Cluster, task: &str) -> f64 {
    let text = c.admin_get("/metrics").await.text();
    sum_series(
        &text,
        "shardgate_task_failures_total",
        &[&format!("task=\"{task}\"")],
    )
}

// The fault hook exists in debug builds only (absent from release builds).
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_listener_is_counted_and_keeps_the_gateway_not_ready() {
    let c = Cluster::start().await;
    assert_eq!(c.admin_get("/readyz").await.status, StatusCode::OK);
    assert!(c.running().tasks.inject_panic("proxy_listener"));

    let reason = support::eventually("/readyz to report the dead listener", || async {
        let r = c.admin_get("/readyz").await;
        (r.status == StatusCode::SERVICE_UNAVAILABLE).then(|| r.text())
    })
    .await;
    assert!(
        reason.contains("proxy_listener (panicked: fault injected into task proxy_listener)"),
        "{reason}"
    );
    assert_eq!(task_failures(&c, "proxy_listener").await, 1.0);
    // Never restarted: its socket went with it, and the gateway stays not ready.
    support::eventually("the proxy port to refuse connections", || async {
        tokio::net::TcpStream::connect(c.proxy())
            .await
            .is_err()
            .then_some(())
    })
    .await;
    let r = c.admin_get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(c.running().tasks.down().contains_key("proxy_listener"));
}

#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_health_task_is_counted_and_restarted_and_probes_again() {
    let mut c = Cluster::start_with(support::Options {
        idc_toml: "health.interval_ms = 50\nhealth.fall = 2\nhealth.rise = 1\n".into(),
        // Keep automatic failover out of the picture: only the health view is looked at.
        extra_toml: "\n[failover]\ndetect_ms = 600000\n".into(),
        ..support::Options::default()
    })
    .await;
    assert!(c.running().tasks.inject_panic("health"));
    support::eventually("the health task's death to be counted", || async {
        (task_failures(&c, "health").await == 1.0).then_some(())
    })
    .await;
    support::eventually("the health task to be back (ready again)", || async {
        (c.admin_get("/readyz").await.status == StatusCode::OK).then_some(())
    })
    .await;
    assert!(c.running().tasks.down().is_empty());

    // It works again: probes find a stopped backend and the view follows.
    c.stop_sim("sh", "core").await;
    support::eventually("the restarted health task to see `sh` unhealthy", || {
        let healthy = c.running().health.idc_healthy("sh");
        async move { (healthy == Some(false)).then_some(()) }
    })
    .await;
    assert_eq!(task_failures(&c, "health").await, 1.0);
}

#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_file_source_reloads_and_keeps_the_revision_growing() {
    let c = Cluster::start().await;
    let before = c.topology().revision;
    assert!(c.running().tasks.inject_panic("file_source"));
    support::eventually("the file source's death to be counted", || async {
        (task_failures(&c, "file_source").await == 1.0).then_some(())
    })
    .await;
    // The new source reads the file once more, as the next revision (never an old one).
    support::eventually("the restarted source to publish the next revision", || {
        let revision = c.topology().revision;
        async move { (revision == before + 1).then_some(()) }
    })
    .await;
    assert_eq!(c.admin_get("/readyz").await.status, StatusCode::OK);

    // And it follows the file again: every shard pinned to `sh`.
    c.write_topology(&c.document(&[("0-1023", "sh")]));
    support::eventually("the edited file to be served", || {
        let all_sh = c.serving_idc_of("user-1") == "sh" && c.serving_idc_of("user-2") == "sh";
        async move { all_sh.then_some(()) }
    })
    .await;
    assert_eq!(c.topology().revision, before + 2);
}

/// Every operator write on the admin API (file mode) with a body that is not JSON, JSON of
/// the wrong shape, over 64 KiB, or too slow: each refused with its reason, and nothing
/// written or published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_writes_refuse_bad_big_and_slow_bodies_and_change_nothing() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let revision = c.topology().revision;
    let big = format!(
        r#"{{"on":true,"state":"down","range":"0-3","to":"gz","reason":"{}"}}"#,
        "x".repeat(65 * 1024)
    );
    for path in ["/override/degrade/noncore", "/override/idc/gz", "/move"] {
        for (body, status, kind) in [
            ("{\"on\": tru", 400, "bad_json"),
            ("[1, 2]", 400, "bad_json"),
            (big.as_str(), 400, "bad_body"),
        ] {
            let r = send(
                c.admin(),
                request(
                    http::Method::POST,
                    path,
                    &[("content-type", "application/json")],
                    body.to_owned(),
                ),
            )
            .await;
            assert_eq!(r.status.as_u16(), status, "{path}: {}", r.text());
            assert_eq!(r.json()["error"], kind, "{path}: {}", r.text());
        }
    }

    // A body that promises 100 bytes and stops after 10: refused once the body deadline
    // passes, with the connection still open.
    let mut s = tokio::net::TcpStream::connect(c.admin())
        .await
        .expect("connect");
    s.write_all(
        b"POST /override/idc/gz HTTP/1.1\r\nhost: admin\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"state\":",
    )
    .await
    .expect("write a partial body");
    let mut got = Vec::new();
    within(REQUEST_DEADLINE, "the slow body to be refused", async {
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).contains("\"error\"") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""error":"timeout""#), "{text}");

    // Nothing was written or published.
    assert_eq!(c.topology().revision, revision);
    let st = c.admin_get("/status").await.json();
    assert_eq!(st["overrides"], serde_json::json!([]), "{st}");
    assert_eq!(st["moves"], serde_json::json!([]), "{st}");
    assert!(!c.dir.path().join("cache/overrides.json").exists());
    c.stop().await;
}
