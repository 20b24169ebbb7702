//! Cluster-wide failover decisions against a real etcd: one elected leader and a successor,
//! the majority rule over gateways' registered views (a lone view changes nothing), automatic
//! failback, hysteresis, and fenced moves that always end `applied` or `rolled_back`, even
//! when the leader driving them is killed.

mod etcd_support;

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_support::*;
use serde_json::{json, Value};

/// Short failover numbers, so the tests run in seconds.
const FAILOVER: &str =
    "\n[failover]\ndetect_ms = 1000\nrecover_ms = 1500\nauto_failback = true\nwarmup_s = 600\nfence_ms = 2000\n";

/// For the hysteresis test: views flap every `FLAP_MS`, ten times faster than `detect_ms`
/// and `recover_ms`, so that only a stall of seconds between two of the test's etcd writes
/// could make a flap look steady to the leader.
const FLAP_MS: u64 = 400;
const HYSTERESIS: &str =
    "\n[failover]\ndetect_ms = 4000\nrecover_ms = 4000\nauto_failback = true\nwarmup_s = 600\nfence_ms = 2000\n";

fn opts(instance: &str) -> GatewayOptions {
    GatewayOptions {
        instance: Some(instance.to_owned()),
        ..GatewayOptions::default()
    }
}

/// The election's current leader (its value: an instance name), if any.
async fn leader(etcd: &Etcd) -> Option<String> {
    let c = etcd.client().await;
    let mut e = c.election_client();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        e.leader(format!("/shardgate/{CLUSTER}/leader")),
    )
    .await
    .ok()?
    .ok()?;
    resp.kv()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn json_at(etcd: &Etcd, name: &str) -> Option<Value> {
    etcd.get(name)
        .await
        .map(|v| serde_json::from_slice(&v).expect("JSON in etcd"))
}

/// Registers a gateway that exists only as its record: its `view` is what the test says.
async fn fake_gateway(etcd: &Etcd, instance: &str, sh_healthy: bool) {
    let view: BTreeMap<&str, bool> = [("sh", sh_healthy), ("bj", true), ("gz", true)].into();
    let record =
        json!({"idc": "bj", "addr": "127.0.0.1:1", "applied_revision": 1_000_000, "view": view});
    etcd.put(&format!("gateway/{instance}"), &record.to_string())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_among_three_and_a_successor_when_it_leaves() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[])).await;
    let mut gateways = Vec::new();
    for name in ["g1", "g2", "g3"] {
        gateways.push((name, start_gateway(&etcd.url, opts(name)).await));
    }
    let first = eventually("a leader to be elected", || leader(&etcd)).await;
    assert!(["g1", "g2", "g3"].contains(&first.as_str()), "{first}");
    // Every gateway shows the same leader in /status; there is one candidate key each.
    for (_, g) in &gateways {
        eventually("/status to show the leader", || async {
            let (_, s) = admin(g.admin_addr, "/status").await;
            (s["leader"] == json!(first)).then_some(())
        })
        .await;
    }
    // Every gateway is a candidate (a follower's key is re-made after each campaign attempt
    // runs out its deadline, so look until all three are there at once).
    eventually("three candidates", || async {
        (etcd.keys("leader/").await.len() == 3).then_some(())
    })
    .await;

    let at = gateways.iter().position(|(n, _)| *n == first).unwrap();
    let (_, old) = gateways.remove(at);
    old.shutdown().await;
    let next = eventually("a new leader after the old one left", || async {
        leader(&etcd).await.filter(|l| *l != first)
    })
    .await;
    assert!(gateways.iter().any(|(n, _)| *n == next), "{next}");
    for (_, g) in &gateways {
        eventually("/status to show the new leader", || async {
            let (_, s) = admin(g.admin_addr, "/status").await;
            (s["leader"] == json!(next)).then_some(())
        })
        .await;
    }
    for (_, g) in gateways {
        g.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_of_views_decides_with_hysteresis_and_fails_back() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let mut doc = idcs.document(&[("0-255", "sh")]);
    doc.push_str(HYSTERESIS);
    etcd.put("topology", &doc).await;
    // One real gateway (the leader, seeing every IDC healthy) and two registered views.
    let g = start_gateway(&etcd.url, opts("g1")).await;
    fake_gateway(&etcd, "fake-a", true).await;
    fake_gateway(&etcd, "fake-b", true).await;
    eventually("g1 to lead", || async {
        (leader(&etcd).await.as_deref() == Some("g1")).then_some(())
    })
    .await;

    // One gateway of three sees sh unhealthy: for longer than detect_ms, nothing is written.
    fake_gateway(&etcd, "fake-a", false).await;
    for _ in 0..45 {
        assert!(
            etcd.get("override/idc/sh").await.is_none(),
            "a lone view must not fail sh over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second one flaps ten times faster than detect_ms: the majority never holds long
    // enough.
    for i in 0..10 {
        fake_gateway(&etcd, "fake-b", i % 2 == 1).await;
        tokio::time::sleep(Duration::from_millis(FLAP_MS)).await;
        assert!(etcd.get("override/idc/sh").await.is_none(), "flap {i}");
    }
    // Two of three, steadily: down, reason auto, by the leader; the gateway serves it.
    fake_gateway(&etcd, "fake-b", false).await;
    let down = eventually("sh marked down", || json_at(&etcd, "override/idc/sh")).await;
    assert_eq!(down["state"], "down", "{down}");
    assert_eq!(down["reason"], "auto");
    assert_eq!(down["by"], "g1");
    eventually("the gateway to serve sh's shards elsewhere", || async {
        let t = g.snapshots.current()?;
        let sh = t.idc_by_name("sh")?;
        (t.shards_served()[sh.0 as usize] == 0).then_some(())
    })
    .await;
    let (_, status) = admin(g.admin_addr, "/status").await;
    let sh = status["idcs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "sh")
        .unwrap()
        .clone();
    assert_eq!(
        (sh["state"].as_str(), sh["reason"].as_str()),
        (Some("down"), Some("auto"))
    );

    // Healthy views that flap ten times faster than recover_ms do not bring it back.
    for i in 0..8 {
        let healthy = i % 2 == 0;
        fake_gateway(&etcd, "fake-a", healthy).await;
        fake_gateway(&etcd, "fake-b", healthy).await;
        tokio::time::sleep(Duration::from_millis(FLAP_MS)).await;
        let now = json_at(&etcd, "override/idc/sh").await.unwrap();
        assert_eq!(now["state"], "down", "flap {i}: {now}");
    }
    // Steadily healthy for recover_ms: warming, reason auto.
    fake_gateway(&etcd, "fake-a", true).await;
    fake_gateway(&etcd, "fake-b", true).await;
    let warming = eventually("sh warming again", || async {
        json_at(&etcd, "override/idc/sh")
            .await
            .filter(|v| v["state"] == "warming")
    })
    .await;
    assert_eq!(warming["reason"], "auto");
    assert!(warming["at_ms"].as_u64().unwrap() > 0);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_override_is_never_touched_by_the_leader() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let mut doc = idcs.document(&[]);
    doc.push_str(FAILOVER);
    etcd.put("topology", &doc).await;
    let operator = json!({"state": "down", "reason": "maintenance", "by": "alice", "at": 1});
    etcd.put("override/idc/sh", &operator.to_string()).await;
    let g = start_gateway(&etcd.url, opts("g1")).await;
    eventually("g1 to lead", || async {
        (leader(&etcd).await.as_deref() == Some("g1")).then_some(())
    })
    .await;
    // Every view healthy for longer than recover_ms: an operator's `down` stays.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            json_at(&etcd, "override/idc/sh").await,
            Some(operator.clone())
        );
    }
    g.shutdown().await;
}

/// A fenced move record as an operator command writes it.
fn move_record(kind: &str, to: Option<&str>, from: &str) -> String {
    json!({
        "kind": kind, "ranges": ["0-63"], "from": from, "to": to, "phase": "fencing",
        "fenced_at_ms": shardgate::util::unix_now_ms(), "reason": "test", "by": "alice",
        "at": shardgate::control::topology::overrides::unix_now(),
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_leader_is_killed_is_finished_by_the_next_leader() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let mut doc = idcs.document(&[("0-63", "sh")]);
    doc.push_str(FAILOVER);
    etcd.put("topology", &doc).await;
    // The first leader is a real process, so it can die without a goodbye (SIGKILL).
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
    eventually("the process to lead", || async {
        (leader(&etcd).await.as_deref() == Some("doomed")).then_some(())
    })
    .await;
    let g2 = start_gateway(&etcd.url, opts("g2")).await;
    let g3 = start_gateway(&etcd.url, opts("g3")).await;

    // Phase 1 written while a registered gateway has not acknowledged it, so the doomed
    // leader cannot finish the move, however long it takes to die.
    hold_phase_2(&etcd, "holdout").await;
    etcd.put("move/m1", &move_record("move", Some("bj"), "sh"))
        .await;
    child.start_kill().unwrap();
    within(
        Duration::from_secs(10),
        "the leader process to die",
        child.wait(),
    )
    .await
    .unwrap();
    let successor = eventually("a new leader", || async {
        leader(&etcd).await.filter(|l| l == "g2" || l == "g3")
    })
    .await;
    assert_eq!(
        json_at(&etcd, "move/m1").await.unwrap()["phase"],
        "fencing",
        "the killed leader finished the move"
    );

    release_phase_2(&etcd, "holdout").await;
    let done = eventually("the move to be finished by a new leader", || async {
        json_at(&etcd, "move/m1")
            .await
            .filter(|v| v["phase"] != "fencing")
    })
    .await;
    assert_eq!(done["phase"], "applied", "{done}");
    assert!(done["finished_at"].as_u64().is_some(), "{done}");
    assert!(done["fence_revision"].as_u64().unwrap() > 0, "{done}");
    let now = leader(&etcd).await.unwrap();
    assert!(now == "g2" || now == "g3", "{now} (after {successor})");
    g2.shutdown().await;
    g3.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_that_cannot_land_are_rolled_back_with_their_drain() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let mut doc = idcs.document(&[]);
    doc.push_str(FAILOVER);
    etcd.put("topology", &doc).await;
    let down = |by: &str| json!({"state": "down", "reason": "maintenance", "by": by}).to_string();
    etcd.put("override/idc/bj", &down("alice")).await;
    let g = start_gateway(&etcd.url, opts("g1")).await;

    // A move to an IDC that is down is rolled back, not applied.
    etcd.put("move/to-down", &move_record("move", Some("bj"), "sh"))
        .await;
    let r = eventually("the move to bj to end", || async {
        json_at(&etcd, "move/to-down")
            .await
            .filter(|v| v["phase"] != "fencing")
    })
    .await;
    assert_eq!(r["phase"], "rolled_back", "{r}");
    assert!(!r["note"].as_str().unwrap_or("").is_empty(), "{r}");

    // A drain of gz with nowhere to go (sh down too): rolled back, and its `draining`
    // override turned `active` in the same transaction (never removed: an ownership key's
    // revision must not go backwards).
    etcd.put("override/idc/sh", &down("alice")).await;
    etcd.put(
        "override/idc/gz",
        &json!({"state": "draining", "reason": "planned", "by": "alice"}).to_string(),
    )
    .await;
    etcd.put("move/drain-gz", &move_record("drain", None, "gz"))
        .await;
    let r = eventually("the drain to end", || async {
        json_at(&etcd, "move/drain-gz")
            .await
            .filter(|v| v["phase"] != "fencing")
    })
    .await;
    assert_eq!(r["phase"], "rolled_back", "{r}");
    let gz = json_at(&etcd, "override/idc/gz")
        .await
        .expect("gz's override");
    assert_eq!(gz["state"], "active", "{gz}");
    // The operator's `down` overrides are untouched.
    assert!(etcd.get("override/idc/sh").await.is_some());
    g.shutdown().await;
}
