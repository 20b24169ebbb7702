//! Misroute correction with a real etcd and two gateways (DESIGN.md §12): one gateway is cut
//! off from etcd (through a relay) while the shard's owner changes; its write reaches the old
//! owner, which refuses it (421) because the simulated IDCs' board has seen the new owner's
//! epoch, and the stale gateway sends it, once, to the new owner.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use etcd_support::{
    admin, eventually, key_in, revision, start_gateway, within, Etcd, GatewayOptions, Idcs, Relay,
};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::control::topology::Shard;
use tokio::net::TcpStream;

/// `POST /orders/1` with `x-user-id: key`: status, `x-shardgate-idc`, and the simulated
/// backend's JSON (what it received).
async fn post(addr: SocketAddr, key: &str) -> (u16, Option<String>, Value) {
    tokio::time::timeout(Duration::from_secs(10), async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/orders/1")
            .header("host", "gw.test")
            .header("x-user-id", key)
            .body(Full::new(Bytes::from_static(b"an order")))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let idc = resp
            .headers()
            .get("x-shardgate-idc")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            idc,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        )
    })
    .await
    .expect("an answer within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_gateways_write_is_refused_by_the_old_owner_and_sent_to_the_new_one() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    let key = key_in(0, 127);
    let shard = Shard::of_key(key.as_bytes(), 1024).0;
    let first = etcd
        .put("topology", &idcs.document(&[("0-127", "sh")]))
        .await;
    let fresh = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let stale = start_gateway(&relay.url, GatewayOptions::default()).await;
    for g in [&fresh, &stale] {
        eventually(
            "both gateways to serve the document and take writes",
            || async {
                let (_, v) = admin(g.admin_addr, "/status").await;
                (revision(g) >= first as u64 && v["self_fence"]["writes"] == "open").then_some(())
            },
        )
        .await;
    }
    let (status, idc, body) = post(stale.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("sh")), "{body}");
    let first_epoch = first.to_string();
    assert_eq!(
        body["headers"]["x-shardgate-owner-epoch"].as_str(),
        Some(first_epoch.as_str())
    );

    // Packets to and from etcd are dropped: the stale gateway does not know yet. Until its own
    // deadline (the lease TTL less a margin after its last confirmed keep-alive, at least 3 s
    // from here) it still takes writes, by its old snapshot.
    relay.stall();
    // The shard's owner changes while the stale gateway cannot hear it (a document push: an
    // owner change with no fence to wait for the stale gateway's acknowledgement).
    let moved = etcd
        .put("topology", &idcs.document(&[("0-127", "gz")]))
        .await;
    eventually("the fresh gateway to serve the new owner", || async {
        (revision(&fresh) >= moved as u64).then_some(())
    })
    .await;
    let (status, idc, body) = post(fresh.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("gz")), "{body}");
    assert_eq!(idcs.owners.owner(shard), Some((moved as u64, "gz".into())));

    // The stale gateway still sends the shard's writes to sh, with the old epoch: sh refuses
    // it without applying it, and the gateway sends it on to gz, once.
    // (It listed at whatever revision etcd had then, registrations included: behind the move.)
    let stale_revision = revision(&stale);
    assert!(stale_revision < moved as u64, "still stale");
    let (status, idc, body) = post(stale.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("gz")), "{body}");
    assert_eq!(body["idc"], "gz");
    assert_eq!(body["headers"]["x-shardgate-reforward"], "1");
    let moved_epoch = moved.to_string();
    assert_eq!(
        body["headers"]["x-shardgate-owner-epoch"].as_str(),
        Some(moved_epoch.as_str())
    );
    let stale_epoch = stale_revision.to_string();
    assert_eq!(
        body["headers"]["x-shardgate-epoch"].as_str(),
        Some(stale_epoch.as_str()),
        "routed by the stale snapshot"
    );
    let (_, metrics) = admin(stale.admin_addr, "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("shardgate_reforwarded_total{route=\"orders\",from=\"sh\",to=\"gz\"} 1"),
        "{metrics}"
    );
    let (_, metrics) = admin(fresh.admin_addr, "/metrics").await;
    assert!(
        !metrics
            .as_str()
            .unwrap_or_default()
            .contains("shardgate_reforwarded_total{"),
        "the fresh gateway sent nothing again"
    );

    // Then its self-fence closes: a gateway that cannot hear etcd writes nothing at all.
    let fenced = within(
        Duration::from_secs(10),
        "the stale gateway to fence itself",
        async {
            loop {
                let (status, _, _) = post(stale.proxy_addr, &key).await;
                if status == 503 {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    assert_eq!(fenced, 503);

    relay.resume();
    eventually("the stale gateway to catch up", || async {
        (revision(&stale) >= moved as u64).then_some(())
    })
    .await;
    let (status, idc, body) = eventually("the caught-up gateway to take writes", || async {
        let answer = post(stale.proxy_addr, &key).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!((status, idc.as_deref()), (200, Some("gz")), "{body}");
    assert!(body["headers"]["x-shardgate-reforward"].is_null(), "{body}");
    fresh.shutdown().await;
    stale.shutdown().await;
}

/// The `x-shardgate-owner-epoch` a gateway sends for `key` (through a GET).
async fn owner_epoch(addr: SocketAddr, key: &str) -> Option<u64> {
    let a = etcd_support::get(addr, "/orders/1", key).await.unwrap();
    a.body["headers"]["x-shardgate-owner-epoch"]
        .as_str()
        .and_then(|e| e.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_booted_from_its_cache_sends_the_same_owner_epochs() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.client_addr).await;
    let idcs = Idcs::start().await;
    let cache = tempfile::tempdir().unwrap();
    // sh owns 0-127 and bj 128-255 by pins; bj is then failed over, which changes the owner
    // of bj's shards (and of no sh shard).
    let sh_key = key_in(0, 127);
    let bj_key = key_in(128, 255);
    etcd.put(
        "topology",
        &idcs.document(&[("0-127", "sh"), ("128-255", "bj")]),
    )
    .await;
    let down = etcd
        .put(
            "override/idc/bj",
            r#"{"state":"down","reason":"test","by":"test","at":1}"#,
        )
        .await;
    let opts = GatewayOptions {
        cache_dir: Some(cache.path().to_owned()),
        ..GatewayOptions::default()
    };
    let g = start_gateway(&relay.url, opts.clone()).await;
    eventually("the gateway to serve the override", || async {
        (revision(&g) >= down as u64).then_some(())
    })
    .await;
    let sh_epoch = owner_epoch(g.proxy_addr, &sh_key).await;
    let bj_epoch = owner_epoch(g.proxy_addr, &bj_key).await;
    assert_eq!(bj_epoch, Some(down as u64), "bj's shards changed owner");
    assert!(
        sh_epoch.is_some_and(|e| e < down as u64),
        "sh's did not: {sh_epoch:?}"
    );
    g.shutdown().await;

    // Restarted while etcd cannot be reached: it serves its cache, with the same epochs as a
    // gateway that reads etcd itself.
    relay.cut();
    let booted = start_gateway(&relay.url, opts).await;
    let (_, status) = admin(booted.admin_addr, "/status").await;
    assert_eq!(status["source"]["up"], false, "{status}");
    assert_eq!(owner_epoch(booted.proxy_addr, &sh_key).await, sh_epoch);
    assert_eq!(owner_epoch(booted.proxy_addr, &bj_key).await, bj_epoch);
    let direct = start_gateway(&etcd.url, GatewayOptions::default()).await;
    assert_eq!(owner_epoch(direct.proxy_addr, &sh_key).await, sh_epoch);
    assert_eq!(owner_epoch(direct.proxy_addr, &bj_key).await, bj_epoch);
    booted.shutdown().await;
    direct.shutdown().await;
}
