//! Automatic failover in file mode, on real sockets: an IDC whose backends stop under steady
//! GET traffic is marked `down` (reason `auto`) by the gateway alone, its shards are served
//! elsewhere and no GET fails from then on; with `auto_failback` it comes back `warming` once
//! its backends answer again.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shardgate::dev::sim::SimBackend;
use support::*;

const FAILOVER: &str =
    "\n[failover]\ndetect_ms = 500\nrecover_ms = 1000\nauto_failback = true\nwarmup_s = 600\n";

/// One answer seen by the traffic: when, which key, status (0: no answer), serving IDC.
type Seen = (Instant, String, u16, String);

fn idc_state(status: &Value, idc: &str) -> (String, String) {
    let i = status["idcs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == idc))
        .cloned()
        .unwrap_or_default();
    (
        i["state"].as_str().unwrap_or("").to_owned(),
        i["reason"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_idc_is_failed_over_under_traffic_and_warms_back() {
    let cluster = Cluster::start_with(Options {
        cache_dir: true,
        extra_toml: FAILOVER.into(),
        ..Options::default()
    })
    .await;
    // sh gets backends this test can stop and start again on the same addresses.
    let loopback = "127.0.0.1:0".parse().unwrap();
    let mut sh = Vec::new();
    for set in SETS {
        sh.push(SimBackend::start(loopback, "sh", set).await.unwrap());
    }
    let addrs: Vec<_> = sh.iter().map(|s| s.addr).collect();
    let doc = cluster
        .document(&[("0-63", "gz")])
        .replace(
            &cluster.sim("sh", "core").addr.to_string(),
            &addrs[0].to_string(),
        )
        .replace(
            &cluster.sim("sh", "noncore").addr.to_string(),
            &addrs[1].to_string(),
        );
    cluster.write_topology(&doc);
    eventually("sh's new backends in the snapshot", || async {
        let t = cluster.topology();
        let sh = t.idc(t.idc_by_name("sh")?);
        (sh.pools
            .iter()
            .any(|p| p.iter().any(|b| b.addr == addrs[0])))
        .then_some(())
    })
    .await;

    // Keys served by each IDC, two of each.
    let mut keys: Vec<String> = Vec::new();
    for idc in IDCS {
        keys.extend(
            (0..10_000)
                .map(|i| format!("user-{i}"))
                .filter(|k| cluster.serving_idc_of(k) == idc)
                .take(2),
        );
    }
    let sh_keys: Vec<String> = keys
        .iter()
        .filter(|k| cluster.serving_idc_of(k) == "sh")
        .cloned()
        .collect();
    assert_eq!(sh_keys.len(), 2);

    // Steady GET traffic from four clients.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = cluster.proxy();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (seen, stop, keys) = (seen.clone(), stop.clone(), keys.clone());
        clients.push(tokio::spawn(async move {
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[n % keys.len()];
                n += 1;
                let r = try_send(proxy, get("/orders/1", &[("x-user-id", key)])).await;
                let (status, idc) = match r {
                    Ok(r) => (
                        r.status.as_u16(),
                        r.header("x-shardgate-idc").unwrap_or("").to_owned(),
                    ),
                    Err(_) => (0, String::new()),
                };
                seen.lock()
                    .unwrap()
                    .push((Instant::now(), key.clone(), status, idc));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    eventually("traffic to flow", || async {
        (seen.lock().unwrap().len() > 50).then_some(())
    })
    .await;

    // sh crashes.
    for s in sh.drain(..) {
        s.stop().await;
    }
    let down_at = within(
        Duration::from_secs(30),
        "sh marked down automatically",
        async {
            loop {
                let status = cluster.admin_get("/status").await.json();
                if idc_state(&status, "sh") == ("down".into(), "auto".into()) {
                    return Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    // Kept where a restart finds it.
    let kept: Value = serde_json::from_slice(
        &std::fs::read(cluster.dir.path().join("cache/overrides.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(kept["idcs"]["sh"]["state"], "down", "{kept}");
    assert_eq!(kept["idcs"]["sh"]["by"], "shardgate", "{kept}");
    let count = seen.lock().unwrap().len();
    eventually("a second of traffic after the failover", || async {
        (seen.lock().unwrap().len() > count + 100).then_some(())
    })
    .await;

    // The backends come back: warming again, reason auto.
    for set in SETS {
        let addr = if set == "core" { addrs[0] } else { addrs[1] };
        sh.push(SimBackend::start(addr, "sh", set).await.unwrap());
    }
    within(Duration::from_secs(40), "sh warming again", async {
        loop {
            let status = cluster.admin_get("/status").await.json();
            if idc_state(&status, "sh") == ("warming".into(), "auto".into()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let after: Vec<&Seen> = seen.iter().filter(|s| s.0 > down_at).collect();
    assert!(
        after.len() > 100,
        "{} answers after the failover",
        after.len()
    );
    let failed: Vec<&&Seen> = after.iter().filter(|s| s.2 != 200).collect();
    assert!(
        failed.is_empty(),
        "GETs failed after the failover: {failed:?}"
    );
    // sh's keys were answered by another IDC once sh was down (warming keeps them away too:
    // the first warm-up step is a minute away).
    let moved = after
        .iter()
        .filter(|s| sh_keys.contains(&s.1))
        .collect::<Vec<_>>();
    assert!(!moved.is_empty());
    assert!(moved.iter().all(|s| s.3 != "sh"), "{moved:?}");
    for s in sh {
        s.stop().await;
    }
    cluster.stop().await;
}
