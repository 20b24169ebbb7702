//! One writer per shard under faults, gateway by gateway, against a real etcd: a gateway cut
//! off from etcd fences its own writes before its lease can expire; a gateway booted from its
//! cache writes nothing until it is registered and caught up; a failover of a live IDC fences
//! the departing shards' writes until every gateway stopped writing there (or not at all with
//! `--force-unfenced`); a fence is acknowledged only once the writes admitted before it are
//! done; and two concurrent failovers cannot leave the cluster without an IDC.

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
use shardgate::Running;
use tokio::net::TcpStream;

/// What a write through the proxy got.
#[derive(Debug)]
struct Wrote {
    status: u16,
    reason: Option<String>,
    idc: Option<String>,
}

/// `POST /orders` with `x-user-id: key` and `extra` headers.
async fn post(addr: SocketAddr, key: &str, extra: &[(&str, &str)]) -> Wrote {
    within(Duration::from_secs(30), "a POST", async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::post("/orders")
            .header("host", "gw.test")
            .header("x-user-id", key);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
            .await
            .unwrap();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let out = Wrote {
            status: resp.status().as_u16(),
            reason: header("x-shardgate-reason"),
            idc: header("x-shardgate-idc"),
        };
        let _ = resp.into_body().collect().await;
        out
    })
    .await
}

async fn self_fence(g: &Running) -> Value {
    admin(g.admin_addr, "/status").await.1["self_fence"].clone()
}

async fn writes_open(g: &Running) -> bool {
    self_fence(g).await["writes"] == "open"
}

/// The `applied_revision` gateway `instance` registered.
async fn acknowledged(etcd: &Etcd, instance: &str) -> u64 {
    json_at(etcd, &format!("gateway/{instance}"))
        .await
        .and_then(|v| v["applied_revision"].as_u64())
        .unwrap_or(0)
}

fn named(instance: &str) -> GatewayOptions {
    GatewayOptions {
        instance: Some(instance.into()),
        ..GatewayOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_off_from_etcd_fences_its_writes_and_keeps_serving_reads() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[("0-63", "sh")]))
        .await;
    let key = key_in(0, 63);
    let g = start_gateway(&relay.url, named("gw-cut")).await;
    eventually("writes to open once registered and caught up", || async {
        writes_open(&g).await.then_some(())
    })
    .await;
    let w = post(g.proxy_addr, &key, &[]).await;
    assert_eq!((w.status, w.idc.as_deref()), (200, Some("sh")), "{w:?}");

    relay.cut();
    // Before its lease (5 s) can expire in etcd, the gateway stops writing: the leader may
    // move the shard away without it once the registration is gone.
    let fenced = within(Duration::from_secs(8), "the self-fence to close", async {
        loop {
            let w = post(g.proxy_addr, &key, &[]).await;
            if w.status == 503 {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(fenced.reason.as_deref(), Some("fenced"), "{fenced:?}");
    let why = self_fence(&g).await;
    assert_eq!(why["writes"], "fenced", "{why}");
    assert!(why["reason"].as_str().unwrap().contains("etcd"), "{why}");
    let (_, metrics) = admin(g.admin_addr, "/metrics").await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("shardgate_self_fenced 1"),
        "{metrics}"
    );
    // Reads keep flowing from the last good snapshot.
    let r = get(g.proxy_addr, "/orders/1", &key).await.unwrap();
    assert_eq!((r.status, r.idc.as_deref()), (200, Some("sh")));

    relay.restore();
    eventually(
        "writes to open again once re-registered and caught up",
        || async { (post(g.proxy_addr, &key, &[]).await.status == 200).then_some(()) },
    )
    .await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_booted_from_its_cache_reads_but_writes_nothing_until_etcd_answers() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    let rev = etcd
        .put("topology", &idcs.document(&[("0-63", "sh")]))
        .await as u64;
    let key = key_in(0, 63);
    let cache = tempfile::tempdir().unwrap();
    let opts = GatewayOptions {
        instance: Some("gw-cache".into()),
        cache_dir: Some(cache.path().to_owned()),
        ..GatewayOptions::default()
    };
    let g = start_gateway(&relay.url, opts.clone()).await;
    eventually(
        "the revision to be acknowledged (so it is cached)",
        || async { (acknowledged(&etcd, "gw-cache").await >= rev).then_some(()) },
    )
    .await;
    g.shutdown().await;

    relay.cut();
    let g = start_gateway(&relay.url, opts).await;
    assert_eq!(revision(&g), rev, "served from the cache");
    let r = get(g.proxy_addr, "/orders/1", &key).await.unwrap();
    assert_eq!((r.status, r.idc.as_deref()), (200, Some("sh")));
    // The cache may predate a move made while this gateway was away: no write until it is
    // registered and has caught up with etcd.
    let w = post(g.proxy_addr, &key, &[]).await;
    assert_eq!(
        (w.status, w.reason.as_deref()),
        (503, Some("fenced")),
        "{w:?}"
    );
    let why = self_fence(&g).await;
    assert!(
        why["reason"].as_str().unwrap().contains("not registered"),
        "{why}"
    );

    relay.restore();
    eventually("writes to open once etcd answers", || async {
        (post(g.proxy_addr, &key, &[]).await.status == 200).then_some(())
    })
    .await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_a_live_idc_fences_its_writes_until_every_gateway_stopped_writing_there() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let doc = format!(
        "{}\n[failover]\nfence_ms = 1000\n",
        idcs.document(&[("0-63", "sh")])
    );
    etcd.put("topology", &doc).await;
    let key = key_in(0, 63);
    let g1 = start_gateway(&etcd.url, named("g1")).await;
    let g2 = start_gateway(&etcd.url, named("g2")).await;
    for g in [&g1, &g2] {
        eventually("writes to open", || async {
            writes_open(g).await.then_some(())
        })
        .await;
    }
    assert_eq!(
        post(g1.proxy_addr, &key, &[]).await.idc.as_deref(),
        Some("sh")
    );

    let out = cli(&etcd, &["failover", "sh", "--reason", "drill"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    assert!(id.starts_with("failover-sh-"), "{out:?}");
    let rev = json_at(&etcd, &format!("move/{id}")).await.unwrap();
    assert_eq!(rev["kind"], "failover");
    // Served by the next IDC for reads at once, on both gateways; writes fenced meanwhile.
    for g in [&g1, &g2] {
        let r = eventually("the failover to be served", || async {
            let r = get(g.proxy_addr, "/orders/1", &key).await.ok()?;
            (r.idc.as_deref() != Some("sh")).then_some(r)
        })
        .await;
        let w = post(g.proxy_addr, &key, &[]).await;
        let still_fenced =
            json_at(&etcd, &format!("move/{id}")).await.unwrap()["phase"] == "fencing";
        if still_fenced {
            assert_eq!(
                (w.status, w.reason.as_deref()),
                (503, Some("fenced")),
                "{w:?}"
            );
        }
        assert_eq!(r.status, 200);
    }
    // The leader lifts the fence once both gateways acknowledged it and it was held.
    let done = eventually("the failover fence to be lifted", || async {
        json_at(&etcd, &format!("move/{id}"))
            .await
            .filter(|v| v["phase"] != "fencing")
    })
    .await;
    assert_eq!(done["phase"], "applied", "{done}");
    let new_owner = get(g1.proxy_addr, "/orders/1", &key).await.unwrap().idc;
    for g in [&g1, &g2] {
        let w = eventually("writes to reach the new owner", || async {
            let w = post(g.proxy_addr, &key, &[]).await;
            (w.status == 200).then_some(w)
        })
        .await;
        assert_eq!(w.idc, new_owner);
        assert_ne!(w.idc.as_deref(), Some("sh"));
    }

    // Unfenced, for an IDC proven dead: no record, writes go to the new owner at once.
    let key_bj = key_in(64, 1023);
    let out = cli(&etcd, &["failover", "bj", "--force-unfenced"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("unfenced"), "{out:?}");
    assert!(!out.stdout.contains("move/"), "{out:?}");
    eventually("bj's shards to be written elsewhere at once", || async {
        let w = post(g1.proxy_addr, &key_bj, &[]).await;
        (w.status == 200 && w.idc.as_deref() != Some("bj")).then_some(())
    })
    .await;
    g1.shutdown().await;
    g2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_is_acknowledged_only_once_the_writes_admitted_before_it_are_done() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    // A route that may wait 20 s for its answer needs a fence at least that long.
    let doc = idcs
        .document(&[("0-63", "sh")])
        .replace("timeout_ms = 300", "timeout_ms = 20000");
    let doc = format!("{doc}\n[failover]\nfence_ms = 20000\n");
    etcd.put("topology", &doc).await;
    let key = key_in(0, 63);
    let g = start_gateway(&etcd.url, named("g-ack")).await;
    eventually("writes to open", || async {
        writes_open(&g).await.then_some(())
    })
    .await;

    // A write the backend holds: admitted under the snapshot before the fence.
    let proxy = g.proxy_addr;
    let held_key = key.clone();
    let held = tokio::spawn(async move { post(proxy, &held_key, &[("x-sim-hold", "1")]).await });
    eventually("the held write to be in flight", || async {
        let (_, m) = admin(g.admin_addr, "/metrics").await;
        m.as_str()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("shardgate_inflight{set=\"core\"} 1"))
            .then_some(())
    })
    .await;
    let out = cli(&etcd, &["move", "0-63", "--to", "bj"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    let fence = eventually("the fence to be served", || async {
        let t = g.snapshots.current()?;
        t.is_fenced(shardgate::control::topology::Shard(3))
            .then_some(t.revision)
    })
    .await;
    // Served, but not acknowledged while the write admitted before it is in flight: the
    // registration stays below the fence revision, and the move waits.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            acknowledged(&etcd, "g-ack").await < fence,
            "acknowledged too early"
        );
        let (_, s) = admin(g.admin_addr, "/status").await;
        assert!(s["acknowledged_revision"].as_u64().unwrap() < fence, "{s}");
    }
    assert_eq!(
        json_at(&etcd, &format!("move/{id}")).await.unwrap()["phase"],
        "fencing"
    );
    idcs.release_held();
    let w = held.await.unwrap();
    assert_eq!((w.status, w.idc.as_deref()), (200, Some("sh")), "{w:?}");
    eventually(
        "the fence to be acknowledged once the write is done",
        || async { (acknowledged(&etcd, "g-ack").await >= fence).then_some(()) },
    )
    .await;
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failovers_at_once_never_leave_the_cluster_without_an_idc() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[])).await;
    // gz is down already: sh and bj are the last two that can serve.
    etcd.put(
        "override/idc/gz",
        r#"{"state":"down","reason":"maintenance","by":"alice"}"#,
    )
    .await;
    let g = start_gateway(&etcd.url, named("g-race")).await;
    for round in 0..5 {
        let (a, b) = tokio::join!(
            cli(&etcd, &["failover", "sh", "--force-unfenced"]),
            cli(&etcd, &["failover", "bj", "--force-unfenced"]),
        );
        let ok = [&a, &b].iter().filter(|o| o.code == 0).count();
        assert!(
            ok <= 1,
            "round {round}: both failovers were written: {a:?} {b:?}"
        );
        for o in [&a, &b] {
            assert!(
                [0, 1, 3].contains(&o.code),
                "round {round}: refused (1) or conflict (3) expected: {o:?}"
            );
        }
        let serving = ["sh", "bj", "gz"].len() - down_count(&etcd).await;
        assert!(serving >= 1, "round {round}: no IDC left");
        // Back to two serving IDCs for the next round.
        for idc in ["sh", "bj"] {
            if json_at(&etcd, &format!("override/idc/{idc}"))
                .await
                .is_some_and(|v| v["state"] == "down")
            {
                etcd.put(
                    &format!("override/idc/{idc}"),
                    r#"{"state":"active","reason":"reset","by":"tester"}"#,
                )
                .await;
            }
        }
        eventually("the reset to be served", || async {
            let (_, s) = admin(g.admin_addr, "/status").await;
            let down = s["idcs"]
                .as_array()?
                .iter()
                .filter(|i| i["state"] == "down")
                .count();
            (down == 1).then_some(())
        })
        .await;
    }
    g.shutdown().await;
}

/// How many IDCs have a `down` override in etcd.
async fn down_count(etcd: &Etcd) -> usize {
    let mut n = 0;
    for idc in ["sh", "bj", "gz"] {
        if json_at(etcd, &format!("override/idc/{idc}"))
            .await
            .is_some_and(|v| v["state"] == "down")
        {
            n += 1;
        }
    }
    n
}
