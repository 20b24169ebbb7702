//! The health view in etcd mode against a real etcd (DESIGN.md §6): a gateway's registration
//! carries its own view of which IDCs are healthy, and is rewritten as soon as the view changes;
//! warm-up steps advance on the etcd source too, with no write to etcd.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;

use std::time::Duration;

use etcd_support::*;
use shardgate::control::topology::overrides::unix_now;
use shardgate::util::unix_now_ms;

/// Fast probes in every IDC.
fn fast_probes(doc: &str) -> String {
    doc.replace(
        "weight = 100\n",
        "weight = 100\nhealth.interval_ms = 100\nhealth.fall = 2\nhealth.rise = 2\n",
    )
}

async fn registration(etcd: &Etcd, instance: &str) -> Option<serde_json::Value> {
    serde_json::from_slice(&etcd.get(&format!("gateway/{instance}")).await?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_view_follows_this_gateways_health() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let good = fast_probes(&idcs.document(&[]));
    // gz's core backend: a port that refuses connections (bound, not listening).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let refused = socket.local_addr().unwrap();
    let gz_core = good
        .split("name = \"gz\"")
        .nth(1)
        .and_then(|rest| rest.split("pools.core = [\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let bad = good.replace(&gz_core, &refused.to_string());
    etcd.put("topology", &bad).await;
    let g = start_gateway(
        &etcd.url,
        GatewayOptions {
            instance: Some("gw-h".into()),
            ..GatewayOptions::default()
        },
    )
    .await;
    let record = eventually("the registration to see gz unhealthy", || async {
        let v = registration(&etcd, "gw-h").await?;
        (v["view"]["gz"] == false).then_some(v)
    })
    .await;
    assert_eq!(record["view"]["sh"], true, "{record}");
    assert_eq!(record["view"]["bj"], true, "{record}");
    assert_eq!(g.health.idc_view().get("gz"), Some(&false));
    let (_, st) = admin(g.admin_addr, "/status").await;
    let gz = st["idcs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "gz")
        .unwrap();
    assert_eq!(gz["healthy"], false, "{st}");

    // gz's core pool back on a live backend: the view, and with it the record, follow.
    etcd.put("topology", &good).await;
    eventually("the registration to see gz healthy again", || async {
        let v = registration(&etcd, "gw-h").await?;
        (v["view"]["gz"] == true).then_some(())
    })
    .await;
    drop(socket);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_steps_are_fenced_moves_the_leader_drives() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let doc = format!("{}\n[failover]\nfence_ms = 300\n", idcs.document(&[]));
    etcd.put("topology", &doc).await;
    let g = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let home = |t: &shardgate::control::topology::Topology| {
        let gz = t.idc_by_name("gz").unwrap();
        (0..t.shard_count)
            .filter(|&s| t.home(shardgate::control::topology::Shard(s)) == gz)
            .count() as u32
    };
    let warming = serde_json::json!({
        "state": "warming", "reason": "test", "by": "tests",
        "at": unix_now(), "at_ms": unix_now_ms(), "warmup_s": 2,
    });
    let written = etcd.put("override/idc/gz", &warming.to_string()).await;
    eventually("the override to be applied", || async {
        (revision(&g) >= written as u64).then_some(())
    })
    .await;
    let mut samples: Vec<(u64, u32)> = Vec::new();
    within(Duration::from_secs(60), "the warm-up to complete", async {
        loop {
            let t = g.snapshots.current().unwrap();
            let gz = t.idc_by_name("gz").unwrap();
            let served = t.shards_served()[gz.0 as usize];
            if let Some((rev, before)) = samples.last() {
                if served != *before {
                    assert!(t.revision > *rev, "a step without a revision");
                }
            }
            if samples.last().map(|s| s.1) != Some(served) {
                samples.push((t.revision, served));
            }
            // Every step home, the leader writes gz `active`.
            if t.idc(gz).state == shardgate::control::topology::IdcState::Active {
                assert_eq!(served, home(&t), "active before the warm-up ended");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let served: Vec<u32> = samples.iter().map(|s| s.1).collect();
    assert!(served.windows(2).all(|w| w[0] < w[1]), "{served:?}");
    assert!(served.len() >= 4, "expected steps: {served:?}");
    // Each step is a `warmup` record the leader fenced and applied.
    let mut steps = Vec::new();
    for key in etcd.keys("move/").await {
        let v: serde_json::Value = serde_json::from_slice(&etcd.get(&key).await.unwrap()).unwrap();
        if v["kind"] == "warmup" && v["phase"] == "applied" {
            steps.push(v["step"].as_u64().unwrap());
        }
    }
    steps.sort_unstable();
    assert_eq!(steps, (1..=10).collect::<Vec<u64>>());
    g.shutdown().await;
}
