//! The gateway in etcd mode against a real etcd (DESIGN.md §6): pushes and direct puts are
//! applied, a bad document never replaces a good one, etcd dying or partitioned away costs no
//! request, a restart during an outage serves the cached snapshot, a compacted watch recovers,
//! and the gateway registry follows the process's life.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_support::*;

/// The IDC `key` is routed to now, asked through the proxy.
async fn routed_idc(g: &shardgate::Running, key: &str) -> String {
    let a = get(g.proxy_addr, "/orders/1", key).await.unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    a.idc.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_routed_within_a_bound() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(0, 127);
    let base = write_file(dir.path(), "a.toml", &idcs.document(&[("0-127", "sh")]));
    let out = push(&etcd.url, &base, &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(routed_idc(&g, &key).await, "sh");

    let edited = write_file(dir.path(), "b.toml", &idcs.document(&[("0-127", "bj")]));
    let out = push(&etcd.url, &edited, &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("sh -> bj"), "{}", out.stdout);
    let pushed: u64 = out
        .stdout
        .rsplit("at revision ")
        .next()
        .and_then(|r| r.trim().parse().ok())
        .expect("push prints the revision it wrote");
    let answer = eventually("the pushed topology to be routed", || async {
        let a = get(g.proxy_addr, "/orders/1", &key).await.ok()?;
        (a.idc.as_deref() == Some("bj")).then_some(a)
    })
    .await;
    assert!(answer.epoch().unwrap() >= pushed, "{answer:?}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_put_of_an_edited_document_is_applied() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(routed_idc(&g, &key).await, "sh");

    let edited = idcs.document(&[("0-127", "gz")]);
    let status = tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.url, "put", "/shardgate/itest/topology"])
        .arg(&edited)
        .kill_on_drop(true)
        .output();
    let out = within(Duration::from_secs(20), "etcdctl put", status)
        .await
        .expect("run etcdctl");
    assert!(out.status.success(), "{out:?}");
    eventually("the etcdctl edit to be routed", || async {
        (get(g.proxy_addr, "/orders/1", &key)
            .await
            .ok()?
            .idc
            .as_deref()
            == Some("gz"))
        .then_some(())
    })
    .await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_direct_put_keeps_the_last_good_then_a_good_put_applies() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    let good = etcd
        .put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(revision(&g), good as u64);

    // Unparsable, then parsable but invalid (a pin to an unknown IDC).
    etcd.put("topology", "cluster = \"itest\"\nshard_count = [")
        .await;
    eventually("the unparsable document to be reported", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        v["source"]["last_problem"]
            .as_str()
            .filter(|p| p.contains("line"))
            .map(|_| ())
    })
    .await;
    etcd.put("topology", &idcs.document(&[("0-127", "nowhere")]))
        .await;
    eventually("the invalid document to be reported", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        v["source"]["last_problem"]
            .as_str()
            .filter(|p| p.contains("nowhere"))
            .map(|_| ())
    })
    .await;
    assert_eq!(revision(&g), good as u64, "the last good snapshot serves");
    assert_eq!(routed_idc(&g, &key).await, "sh");
    let (_, metrics) = admin(g.admin_addr, "/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("shardgate_topology_reloads_total{result=\"invalid\"} 2"),
        "{metrics}"
    );

    // An operator's failover while the document is still invalid applies at once, on the last
    // good document; the document's problem stays reported.
    let down = etcd
        .put(
            "override/idc/sh",
            r#"{"state":"down","reason":"incident","by":"oncall"}"#,
        )
        .await;
    eventually(
        "the override to apply over the last good document",
        || async { (revision(&g) == down as u64).then_some(()) },
    )
    .await;
    assert_ne!(routed_idc(&g, &key).await, "sh");
    let (_, v) = admin(g.admin_addr, "/status").await;
    assert!(
        v["source"]["last_problem"]
            .as_str()
            .is_some_and(|p| p.contains("nowhere")),
        "{v}"
    );
    etcd.delete("override/idc/sh").await;

    let fixed = etcd
        .put("topology", &idcs.document(&[("0-127", "bj")]))
        .await;
    eventually("the good document after bad ones to apply", || async {
        (revision(&g) == fixed as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "bj");
    let (_, v) = admin(g.admin_addr, "/status").await;
    assert!(v["source"]["last_problem"].is_null(), "{v}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_once_panicked_the_source_is_refused_and_overrides_still_apply() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    let good = etcd
        .put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(revision(&g), good as u64);

    // shard_count past the largest table and a pin past its end: validation once sized the
    // pin table by one count and checked ranges against the other, and the source panicked.
    let huge = idcs
        .document(&[("1048576", "sh")])
        .replace("shard_count = 1024", "shard_count = 2000000");
    assert!(huge.contains("shard_count = 2000000"), "{huge}");
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "huge.toml", &huge);
    let out = push(&etcd.url, &file, &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("shards.pins[0].range"),
        "{}",
        out.stderr
    );

    // Put past `push`, straight into etcd: refused by the gateway, which keeps the last good.
    etcd.put("topology", &huge).await;
    eventually("the document's problem to be reported", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        v["source"]["last_problem"]
            .as_str()
            .filter(|p| p.contains("shards.pins[0].range"))
            .map(|_| ())
    })
    .await;
    assert_eq!(revision(&g), good as u64);
    assert_eq!(routed_idc(&g, &key).await, "sh");

    // The source is alive: an operator's failover applies on the last good document.
    let down = etcd
        .put(
            "override/idc/sh",
            r#"{"state":"down","reason":"incident","by":"oncall"}"#,
        )
        .await;
    eventually("the override to apply", || async {
        (revision(&g) == down as u64).then_some(())
    })
    .await;
    assert_ne!(routed_idc(&g, &key).await, "sh");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_in_etcd_reach_the_snapshot() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    // `--wait` waits for the gateways registered when it looks: this one must be among them.
    eventually("the gateway to register", || async {
        (!etcd.keys("gateway/").await.is_empty()).then_some(())
    })
    .await;

    let out = shardgate(&[
        "degrade",
        "noncore",
        "on",
        "--reason",
        "load test",
        "--by",
        "alice",
        "--etcd",
        &etcd.url,
        "--cluster",
        CLUSTER,
        "--wait",
        "--timeout",
        "15s",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let t = g.snapshots.current().unwrap();
    let d = &t.overrides.degrade["noncore"];
    assert!(d.on);
    assert_eq!((d.reason.as_str(), d.by.as_str()), ("load test", "alice"));

    // An IDC override written as operators' tools do: sh down, its shards go elsewhere.
    etcd.put(
        "override/idc/sh",
        r#"{"state":"down","reason":"drill","by":"bob"}"#,
    )
    .await;
    eventually("the IDC override to apply", || async {
        let idc = get(g.proxy_addr, "/orders/1", &key).await.ok()?.idc?;
        (idc != "sh").then_some(())
    })
    .await;
    let (_, v) = admin(g.admin_addr, "/status").await;
    assert_eq!(v["idcs"][0]["state"], "down", "{v}");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_under_traffic_fails_no_request_and_routing_holds() {
    let mut etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let mut expected = Vec::new();
    for k in &keys {
        expected.push(routed_idc(&g, k).await);
    }
    let before = revision(&g);

    // Four clients send requests until told to stop; etcd is killed once 100 were answered,
    // and they go on until another 200 were answered with the source seen down before and
    // after them.
    let proxy = g.proxy_addr;
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let keys = keys.clone();
        let expected = expected.clone();
        let (answered, stop) = (answered.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = (c * 7 + i) % keys.len();
                i += 1;
                match get(proxy, "/orders/1", &keys[k]).await {
                    Ok(a) if a.status == 200 && a.idc.as_deref() == Some(&expected[k]) => {}
                    other => failures.push(format!("{}: {other:?}", keys[k])),
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    let answered_past = |n: usize| {
        let answered = answered.clone();
        async move {
            eventually("more requests to be answered", || async {
                (answered.load(Ordering::Relaxed) >= n).then_some(())
            })
            .await
        }
    };
    let source_up = || async {
        let (_, m) = admin(g.admin_addr, "/metrics").await;
        let m = m.as_str().unwrap().to_owned();
        if m.contains("shardgate_topology_source_up 0") {
            Some(false)
        } else if m.contains("shardgate_topology_source_up 1") {
            Some(true)
        } else {
            panic!("no shardgate_topology_source_up in the metrics: {m}")
        }
    };
    answered_past(100).await;
    etcd.kill();
    eventually("the source to be shown down", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        (v["source"]["up"] == false && source_up().await == Some(false)).then_some(())
    })
    .await;
    // etcd stays dead from here on: every request answered in this window was served while
    // the source was down (shown before and after it).
    let down_from = answered.load(Ordering::Relaxed);
    answered_past(down_from + 200).await;
    assert_eq!(source_up().await, Some(false), "the source came back");
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(
            within(Duration::from_secs(60), "the clients", c)
                .await
                .unwrap(),
        );
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    assert_eq!(revision(&g), before);
    let (status, _) = admin(g.admin_addr, "/readyz").await;
    assert_eq!(status, 200, "ready once, ready while etcd is down");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_etcd_is_down_serves_from_the_cache_then_follows_etcd() {
    let mut etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let cache = tempfile::tempdir().unwrap();
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    etcd.put("override/degrade/noncore", r#"{"on":true,"reason":"kept"}"#)
        .await;
    let opts = GatewayOptions {
        cache_dir: Some(cache.path().to_owned()),
        ..GatewayOptions::default()
    };
    let g = start_gateway(&etcd.url, opts.clone()).await;
    let cached_revision = revision(&g);
    assert!(cached_revision > 0);
    g.shutdown().await;

    etcd.kill();
    let g = start_gateway(&etcd.url, opts).await;
    assert_eq!(revision(&g), cached_revision, "serves the cached snapshot");
    assert_eq!(routed_idc(&g, &key).await, "sh");
    assert!(g.snapshots.current().unwrap().overrides.degrade["noncore"].on);
    let (status, _) = admin(g.admin_addr, "/readyz").await;
    assert_eq!(status, 200);
    let (_, v) = admin(g.admin_addr, "/status").await;
    assert_eq!(v["source"]["up"], false, "{v}");

    etcd.restart().await;
    eventually("the gateway to reach etcd again", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        (v["source"]["up"] == true).then_some(())
    })
    .await;
    let edited = etcd
        .put("topology", &idcs.document(&[("0-127", "bj")]))
        .await;
    eventually("an edit after etcd came back to apply", || async {
        (revision(&g) >= edited as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "bj");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_etcd_and_no_cache_is_not_ready_and_says_why() {
    let (_held, url) = refused_url();
    let g = start_gateway(&url, GatewayOptions::default()).await;
    // Not ready from the start; the reason names etcd once the first attempt has failed.
    let (status, _) = admin(g.admin_addr, "/readyz").await;
    assert_eq!(status, 503);
    eventually("/readyz to say why", || async {
        let (status, v) = admin(g.admin_addr, "/readyz").await;
        assert_eq!(status, 503);
        let why = v.as_str().unwrap().to_owned();
        (why.contains("not ready") && why.contains(&url)).then_some(())
    })
    .await;
    let a = get(g.proxy_addr, "/orders/1", "user-1").await.unwrap();
    assert_eq!(a.status, 503);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumes_after_a_partition() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&relay.url, GatewayOptions::default()).await;
    assert_eq!(routed_idc(&g, &key).await, "sh");

    relay.cut();
    eventually("the source to be shown down", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        (v["source"]["up"] == false).then_some(())
    })
    .await;
    let during = etcd
        .put("topology", &idcs.document(&[("0-127", "gz")]))
        .await;
    assert_eq!(
        routed_idc(&g, &key).await,
        "sh",
        "cut off, it keeps serving"
    );
    relay.restore();
    eventually("the write made during the partition to apply", || async {
        (revision(&g) >= during as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "gz");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_watch_revision_recovers() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(&relay.url, GatewayOptions::default()).await;
    assert_eq!(routed_idc(&g, &key).await, "sh");

    relay.cut();
    eventually("the source to be shown down", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        (v["source"]["up"] == false).then_some(())
    })
    .await;
    etcd.put("topology", &idcs.document(&[("0-127", "bj")]))
        .await;
    etcd.put("override/degrade/noncore", r#"{"on":true}"#).await;
    let last = etcd
        .put("topology", &idcs.document(&[("0-127", "gz")]))
        .await;
    etcd.compact(last).await;
    relay.restore();
    eventually("the gateway to re-list after the compaction", || async {
        (revision(&g) >= last as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "gz");
    assert!(g.snapshots.current().unwrap().overrides.degrade["noncore"].on);
    // And the new watch delivers later writes.
    let after = etcd
        .put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    eventually("a write after the re-list to apply", || async {
        (revision(&g) >= after as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "sh");
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_replaced_by_an_empty_one_is_re_listed() {
    let mut etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    for _ in 0..5 {
        etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
            .await;
    }
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let before = revision(&g);
    assert!(before >= 5);
    etcd.replace_with_empty().await;
    // Revision 2 or so: far behind what the gateway saw, so resuming the watch would wait for
    // revisions that mean something else now.
    let fresh = etcd
        .put("topology", &idcs.document(&[("0-127", "bj")]))
        .await;
    assert!((fresh as u64) < before);
    eventually("the new etcd's document to be served", || async {
        (get(g.proxy_addr, "/orders/1", &key)
            .await
            .ok()?
            .idc
            .as_deref()
            == Some("bj"))
        .then_some(())
    })
    .await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_carries_the_applied_revision_and_is_revoked_on_shutdown() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let opts = GatewayOptions {
        instance: Some("gw-a".into()),
        idc: Some("bj".into()),
        ..GatewayOptions::default()
    };
    let g = start_gateway(&etcd.url, opts).await;
    let edited = etcd
        .put("topology", &idcs.document(&[("0-127", "gz")]))
        .await;
    let record: serde_json::Value =
        eventually("the registration to carry the revision", || async {
            let v: serde_json::Value =
                serde_json::from_slice(&etcd.get("gateway/gw-a").await?).ok()?;
            (v["applied_revision"].as_i64()? >= edited).then_some(v)
        })
        .await;
    assert_eq!(record["idc"], "bj");
    assert_eq!(record["addr"], g.proxy_addr.to_string());
    assert_eq!(record["view"]["sh"], true, "{record}");
    // The gateway's own /status lists the cluster's gateways, itself included.
    eventually("/status to list the registered gateway", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        v["gateways"]
            .as_array()?
            .iter()
            .any(|gw| gw["instance"] == "gw-a" && gw["applied_revision"].as_i64() >= Some(edited))
            .then_some(())
    })
    .await;

    g.shutdown().await;
    // Revoked on the way out: gone at once, not after the 5 s lease.
    assert!(etcd.get("gateway/gw-a").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_removes_a_dead_gateways_registration() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    // A real process, killed with SIGKILL: no goodbye, only the lease can clean up.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args([
            "serve",
            "--etcd",
            &etcd.url,
            "--cluster",
            CLUSTER,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--instance",
            "doomed",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start a gateway process");
    eventually("the gateway process to register", || async {
        etcd.keys("gateway/")
            .await
            .contains(&"gateway/doomed".to_owned())
            .then_some(())
    })
    .await;
    child.start_kill().unwrap();
    within(
        Duration::from_secs(10),
        "the gateway process to die",
        child.wait(),
    )
    .await
    .unwrap();
    eventually(
        "the dead gateway's key to expire with its lease",
        || async { etcd.keys("gateway/").await.is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_knobs_and_degrade_switches_in_etcd_apply_without_a_restart() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    let doc = idcs.document(&[("0-127", "sh")]);
    etcd.put("topology", &doc).await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(get(g.proxy_addr, "/recs", &key).await.unwrap().status, 200);
    let t = g.snapshots.current().unwrap();
    assert_eq!(t.isolation.breaker.consecutive, 5);

    // The document's [isolation] tables change on every gateway through the watch.
    let tight = format!(
        "{doc}\n[isolation]\nshed_start = 0.6\n[isolation.breaker]\nconsecutive = 2\nopen_ms = 60000\n"
    );
    etcd.put("topology", &tight).await;
    eventually("the new isolation knobs to be served", || async {
        let t = g.snapshots.current()?;
        (t.isolation.breaker.consecutive == 2).then_some(())
    })
    .await;
    let t = g.snapshots.current().unwrap();
    assert_eq!(t.isolation.shed_start, 0.6);
    assert_eq!(t.isolation.breaker.open_for, Duration::from_secs(60));

    // A bad value is refused whole; the last good knobs keep serving.
    etcd.put(
        "topology",
        &format!("{doc}\n[isolation.breaker]\nwindow_ms = 5\n"),
    )
    .await;
    eventually("the bad document to be reported", || async {
        let (_, v) = admin(g.admin_addr, "/status").await;
        v["source"]["last_problem"]
            .as_str()?
            .contains("isolation.breaker.window_ms")
            .then_some(())
    })
    .await;
    assert_eq!(
        g.snapshots.current().unwrap().isolation.breaker.consecutive,
        2
    );

    // A degrade switch written to etcd answers without the backend at once. (Overrides are
    // built with the document, so the bad one is replaced first.)
    etcd.put("topology", &tight).await;
    etcd.put(
        "override/degrade/noncore",
        r#"{"on":true,"reason":"drill"}"#,
    )
    .await;
    let degraded = eventually("the degrade switch to apply", || async {
        let a = get(g.proxy_addr, "/recs", &key).await.ok()?;
        (a.status == 503).then_some(a)
    })
    .await;
    assert_eq!(degraded.body["error"], "degraded", "{degraded:?}");
    assert_eq!(
        get(g.proxy_addr, "/orders/1", &key).await.unwrap().status,
        200
    );
    etcd.put("override/degrade/noncore", r#"{"on":false}"#)
        .await;
    eventually("the degrade switch to turn off", || async {
        let a = get(g.proxy_addr, "/recs", &key).await.ok()?;
        (a.status == 200).then_some(())
    })
    .await;
    g.shutdown().await;
}

/// The lease holding the cluster's election key (the leader's campaign), if any.
async fn leader_lease(etcd: &Etcd) -> Option<i64> {
    let c = etcd.client().await;
    let mut e = c.election_client();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        e.leader(format!("/shardgate/{CLUSTER}/leader")),
    )
    .await
    .ok()?
    .ok()?;
    resp.kv().map(|kv| kv.lease())
}

// The fault hook exists in debug builds only (absent from release builds).
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_etcd_tasks_are_counted_restarted_and_follow_etcd_again() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    etcd.put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let g = start_gateway(
        &etcd.url,
        GatewayOptions {
            instance: Some("gw-restarts".into()),
            ..GatewayOptions::default()
        },
    )
    .await;
    let first_lease = eventually("this gateway to lead", || leader_lease(&etcd)).await;
    eventually("this gateway to be registered", || async {
        etcd.get("gateway/gw-restarts").await.map(|_| ())
    })
    .await;

    for task in ["etcd_source", "registry", "leader"] {
        assert!(g.tasks.inject_panic(task), "{task}");
    }
    eventually("the three deaths to be counted", || async {
        let (_, m) = admin(g.admin_addr, "/metrics").await;
        let m = m.as_str().unwrap_or("").to_owned();
        ["etcd_source", "registry", "leader"]
            .iter()
            .all(|t| m.contains(&format!("shardgate_task_failures_total{{task=\"{t}\"}} 1")))
            .then_some(())
    })
    .await;
    eventually("the tasks to be back (ready again)", || async {
        (admin(g.admin_addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    // The source is back: an edit in etcd is served.
    let edited = etcd
        .put("topology", &idcs.document(&[("0-127", "bj")]))
        .await;
    eventually("an edit after the restart to apply", || async {
        (revision(&g) >= edited as u64).then_some(())
    })
    .await;
    assert_eq!(routed_idc(&g, &key).await, "bj");
    // The registry is back: the registration reports the new revision.
    eventually("the registration to report the edit", || async {
        let record = etcd.get("gateway/gw-restarts").await?;
        let v: serde_json::Value = serde_json::from_slice(&record).ok()?;
        (v["applied_revision"].as_u64()? >= edited as u64).then_some(())
    })
    .await;
    // The leader is back: a new campaign (a new lease) holds the election once the dead
    // one's lease ran out.
    within(Duration::from_secs(20), "a new campaign to lead", async {
        loop {
            if leader_lease(&etcd)
                .await
                .is_some_and(|lease| lease != first_lease)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    g.shutdown().await;
}
