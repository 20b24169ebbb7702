//! Operator IDC control and fenced moves against a real etcd with two gateways: `drain` with a
//! write fence seen by both gateways, phase 2 driven by the leader the gateways elect
//! (`etcd::leader`), `move --wait`, a rollback,
//! `failover`/`restore`, and the refusals (exit 1) and an unreachable etcd (exit 4).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use etcd_support::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::control::moves::Step;
use shardgate::Running;
use tokio::net::TcpStream;

/// `POST /orders` with `x-user-id: key`: (status, `x-shardgate-reason`, `x-shardgate-idc`).
async fn post(addr: SocketAddr, key: &str) -> (u16, Option<String>, Option<String>) {
    within(Duration::from_secs(10), "a POST", async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/orders")
            .header("host", "gw.test")
            .header("x-user-id", key)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let out = (
            resp.status().as_u16(),
            header("x-shardgate-reason"),
            header("x-shardgate-idc"),
        );
        let _ = resp.into_body().collect().await;
        out
    })
    .await
}

/// Two gateways on a document with `fence_ms` and shards 0-63 pinned to sh.
async fn setup(etcd: &Etcd, idcs: &Idcs, fence_ms: u64) -> (Running, Running) {
    let doc = format!(
        "{}\n[failover]\nfence_ms = {fence_ms}\n",
        idcs.document(&[("0-63", "sh")])
    );
    let rev = etcd.put("topology", &doc).await as u64;
    let g1 = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let g2 = start_gateway(&etcd.url, GatewayOptions::default()).await;
    eventually("both gateways to serve and register", || async {
        (revision(&g1) >= rev && revision(&g2) >= rev && etcd.keys("gateway/").await.len() == 2)
            .then_some(())
    })
    .await;
    // Registered and caught up: their self-fences open, so a 503 `fenced` below is the move's.
    for g in [&g1, &g2] {
        eventually("writes to open", || async {
            (admin(g.admin_addr, "/status").await.1["self_fence"]["writes"] == "open").then_some(())
        })
        .await;
    }
    (g1, g2)
}

/// Waits until the elected leader (one of the two gateways) decides the move `id`: phase 2
/// (`applied`) or a rollback, with its note.
async fn drive_until_decided(etcd: &Etcd, id: &str) -> Step {
    within(
        Duration::from_secs(45),
        "the leader to decide the move",
        async {
            loop {
                let r = record(etcd, id).await;
                match r["phase"].as_str() {
                    Some("applied") => return Step::Apply,
                    Some("rolled_back") => {
                        return Step::RollBack(r["note"].as_str().unwrap_or("").to_owned())
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        },
    )
    .await
}

async fn record(etcd: &Etcd, id: &str) -> Value {
    serde_json::from_slice(&etcd.get(&format!("move/{id}")).await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_fences_writes_on_every_gateway_then_the_leader_moves_the_shards() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let (g1, g2) = setup(&etcd, &idcs, 300).await;
    let key = key_in(0, 63);
    // A third registered gateway that has not acknowledged the fence: the leader cannot
    // start phase 2 until the test lets it, however slowly the checks below run.
    hold_phase_2(&etcd, "holdout").await;

    let out = cli(&etcd, &["drain", "sh", "--reason", "maintenance"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    let stored = record(&etcd, &id).await;
    assert_eq!(stored["kind"], "drain");
    assert_eq!(stored["phase"], "fencing");
    assert!(stored["fenced_at_ms"].as_u64().unwrap() > 0);
    let over: Value = serde_json::from_slice(&etcd.get("override/idc/sh").await.unwrap()).unwrap();
    assert_eq!(over["state"], "draining");
    assert_eq!(over["by"], "tester");

    // Phase 1 on both gateways: writes fenced, reads still from sh. The leader waits for
    // the held-back gateway's acknowledgement, so the fence holds for as long as the test
    // looks.
    for g in [&g1, &g2] {
        eventually("the fence to reach the gateway", || async {
            let (status, reason, _) = post(g.proxy_addr, &key).await;
            (status == 503 && reason.as_deref() == Some("fenced")).then_some(())
        })
        .await;
        let r = get(g.proxy_addr, "/orders", &key).await.unwrap();
        assert_eq!((r.status, r.idc.as_deref()), (200, Some("sh")));
    }
    assert_eq!(
        record(&etcd, &id).await["phase"],
        "fencing",
        "phase 2 before every gateway acknowledged the fence"
    );

    // The leader's pass: applied once every gateway acknowledged and fence_ms passed.
    release_phase_2(&etcd, "holdout").await;
    assert_eq!(drive_until_decided(&etcd, &id).await, Step::Apply);
    let stored = record(&etcd, &id).await;
    assert_eq!(stored["phase"], "applied");
    assert!(stored["fence_revision"].as_u64().unwrap() > 0);
    for g in [&g1, &g2] {
        let idc = eventually("the new owner to be served", || async {
            let r = get(g.proxy_addr, "/orders", &key).await.ok()?;
            (r.status == 200 && r.idc.as_deref() != Some("sh")).then_some(r.idc)
        })
        .await;
        let (status, _, served_by) = post(g.proxy_addr, &key).await;
        assert_eq!((status, served_by), (200, idc));
    }
    let out = shardgate(&[
        "status",
        "--json",
        "--etcd",
        &etcd.url,
        "--cluster",
        CLUSTER,
    ])
    .await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let m = v["moves"].as_array().unwrap();
    assert_eq!(m[0]["phase"], "applied", "{v}");
    g1.shutdown().await;
    g2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_wait_returns_when_applied_everywhere_and_exits_1_on_a_rollback() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let (g1, g2) = setup(&etcd, &idcs, 500).await;
    let key = key_in(0, 63);

    let url = etcd.url.clone();
    let waiting = tokio::spawn(async move {
        shardgate(&[
            "move",
            "0-63",
            "--to",
            "gz",
            "--wait",
            "--timeout",
            "40s",
            "--etcd",
            &url,
            "--cluster",
            CLUSTER,
        ])
        .await
    });
    let id = eventually("the move record", || async {
        etcd.keys("move/")
            .await
            .first()
            .map(|k| k["move/".len()..].to_owned())
    })
    .await;
    assert_eq!(drive_until_decided(&etcd, &id).await, Step::Apply);
    let out = within(Duration::from_secs(60), "move --wait", waiting)
        .await
        .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("applied at revision"), "{}", out.stdout);
    assert!(
        out.stdout.contains("2/2 gateways serve the new owner"),
        "{}",
        out.stdout
    );
    for g in [&g1, &g2] {
        let r = get(g.proxy_addr, "/orders", &key).await.unwrap();
        assert_eq!(
            r.idc.as_deref(),
            Some("gz"),
            "--wait returned after every gateway"
        );
    }

    // A move whose target fails during the fence is rolled back; --wait says so (exit 1).
    // The held-back gateway keeps phase 2 from happening before the target fails.
    hold_phase_2(&etcd, "holdout").await;
    let url = etcd.url.clone();
    let waiting = tokio::spawn(async move {
        shardgate(&[
            "move",
            "100-110",
            "--to",
            "bj",
            "--wait",
            "--timeout",
            "40s",
            "--etcd",
            &url,
            "--cluster",
            CLUSTER,
        ])
        .await
    });
    let id2 = eventually("the second move record", || async {
        etcd.keys("move/")
            .await
            .into_iter()
            .map(|k| k["move/".len()..].to_owned())
            .find(|k| *k != id)
    })
    .await;
    assert_eq!(cli(&etcd, &["failover", "bj"]).await.code, 0);
    assert_eq!(record(&etcd, &id2).await["phase"], "fencing");
    release_phase_2(&etcd, "holdout").await;
    assert!(matches!(
        drive_until_decided(&etcd, &id2).await,
        Step::RollBack(_)
    ));
    let out = within(Duration::from_secs(60), "move --wait", waiting)
        .await
        .unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("rolled back"), "{}", out.stderr);
    assert_eq!(record(&etcd, &id2).await["phase"], "rolled_back");
    g1.shutdown().await;
    g2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_restore_and_refusals_through_etcd() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let (g1, g2) = setup(&etcd, &idcs, 600_000).await;
    let key = key_in(0, 63);

    let out = cli(&etcd, &["failover", "sh", "--reason", "sh is on fire"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    assert_eq!(record(&etcd, &id).await["kind"], "failover");
    // Reads leave sh at once on both gateways; writes to its shards are fenced while the
    // failover's fence is held (600 s here: for as long as the test looks).
    for g in [&g1, &g2] {
        eventually("the failover to be served", || async {
            let r = get(g.proxy_addr, "/orders", &key).await.ok()?;
            (r.status == 200 && r.idc.as_deref() != Some("sh")).then_some(())
        })
        .await;
        let (status, reason, _) = post(g.proxy_addr, &key).await;
        assert_eq!((status, reason.as_deref()), (503, Some("fenced")));
    }
    let out = cli(&etcd, &["restore", "sh", "--warmup", "30s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let over: Value = serde_json::from_slice(&etcd.get("override/idc/sh").await.unwrap()).unwrap();
    assert_eq!(over["state"], "warming");
    assert_eq!(over["warmup_s"], 30);
    assert_eq!(over["warmup_step"], 0);
    let out = cli(&etcd, &["restore", "sh", "--warmup", "0"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let over: Value = serde_json::from_slice(&etcd.get("override/idc/sh").await.unwrap()).unwrap();
    assert_eq!(
        (over["state"].as_str(), over["warmup_s"].as_u64()),
        (Some("warming"), Some(0)),
        "one fenced step, driven by the leader once the failover's fence is done"
    );

    let refused = |out: &Output, why: &str| {
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(why), "expected `{why}`: {}", out.stderr);
    };
    // An open move, then a second one over the same shards (a shard bj serves, outside the
    // failover's fence).
    let t = g1.snapshots.current().unwrap();
    let bj = t.idc_by_name("bj").unwrap();
    let free = (0..t.shard_count)
        .map(shardgate::control::topology::Shard)
        .find(|s| !t.is_fenced(*s) && t.serving(*s) == Some(bj))
        .unwrap()
        .0
        .to_string();
    assert_eq!(cli(&etcd, &["move", &free, "--to", "gz"]).await.code, 0);
    refused(
        &cli(&etcd, &["move", &free, "--to", "bj"]).await,
        "still moving",
    );
    // Targets that are not active, and the last active IDC.
    assert_eq!(cli(&etcd, &["failover", "bj"]).await.code, 0);
    refused(
        &cli(&etcd, &["move", "0-3", "--to", "bj"]).await,
        "not active",
    );
    refused(&cli(&etcd, &["drain", "bj"]).await, "not active");
    assert_eq!(cli(&etcd, &["failover", "sh"]).await.code, 0);
    refused(&cli(&etcd, &["drain", "gz"]).await, "last active IDC");
    assert!(
        etcd.get("override/idc/gz").await.is_none(),
        "nothing written"
    );
    // The move, and the fences of the three failovers (sh, bj, sh again): nothing else.
    let kinds: Vec<String> = {
        let mut k = Vec::new();
        for key in etcd.keys("move/").await {
            let v: Value = serde_json::from_slice(&etcd.get(&key).await.unwrap()).unwrap();
            k.push(v["kind"].as_str().unwrap().to_owned());
        }
        k
    };
    assert_eq!(
        kinds.iter().filter(|k| *k == "move").count(),
        1,
        "{kinds:?}"
    );

    // etcd that is not there: exit 4.
    let (_held, nowhere) = refused_url();
    let out = shardgate(&["failover", "gz", "--etcd", &nowhere, "--cluster", CLUSTER]).await;
    assert_eq!(out.code, 4, "{out:?}");
    g1.shutdown().await;
    g2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_nowhere_to_go_is_rolled_back_with_its_override() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let (g1, g2) = setup(&etcd, &idcs, 300).await;
    // Phase 2 waits for the test: the IDCs below go down during the fence, not after it.
    hold_phase_2(&etcd, "holdout").await;
    let out = cli(&etcd, &["drain", "gz"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    // Both other IDCs go down during the fence (as an automatic decision would write them).
    let down = r#"{"state":"down","reason":"auto","by":"leader"}"#;
    etcd.put("override/idc/sh", down).await;
    etcd.put("override/idc/bj", down).await;
    assert_eq!(record(&etcd, &id).await["phase"], "fencing");
    release_phase_2(&etcd, "holdout").await;
    match drive_until_decided(&etcd, &id).await {
        Step::RollBack(why) => assert!(why.contains("no other IDC"), "{why}"),
        other => panic!("expected a rollback, got {other:?}"),
    }
    let stored = record(&etcd, &id).await;
    assert_eq!(stored["phase"], "rolled_back");
    assert!(stored["note"].as_str().unwrap().contains("no other IDC"));
    let gz: Value = serde_json::from_slice(&etcd.get("override/idc/gz").await.unwrap()).unwrap();
    assert_eq!(
        gz["state"], "active",
        "rolling back a drain ends its draining override in the same transaction"
    );
    // gz serves again, writes included: the fence is lifted.
    let key = key_in(0, 63);
    for g in [&g1, &g2] {
        eventually("gz to serve again", || async {
            let (status, _, idc) = post(g.proxy_addr, &key).await;
            (status == 200 && idc.as_deref() == Some("gz")).then_some(())
        })
        .await;
    }
    g1.shutdown().await;
    g2.shutdown().await;
}
