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
    admin, eventually, key_in, revision, start_gateway, Etcd, GatewayOptions, Idcs, Relay,
};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use shardgate::topology::Shard;
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
        eventually("both gateways to serve the document", || async {
            (revision(g) >= first as u64).then_some(())
        })
        .await;
    }
    let (status, idc, body) = post(stale.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("sh")), "{body}");
    let first_epoch = first.to_string();
    assert_eq!(
        body["headers"]["x-shardgate-owner-epoch"].as_str(),
        Some(first_epoch.as_str())
    );

    relay.cut();
    eventually("the stale gateway to see etcd gone", || async {
        let (_, v) = admin(stale.admin_addr, "/status").await;
        (v["source"]["up"] == false).then_some(())
    })
    .await;
    // The shard's owner changes while the stale gateway cannot hear it.
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
    assert_eq!(revision(&stale), first as u64, "still stale");
    let (status, idc, body) = post(stale.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("gz")), "{body}");
    assert_eq!(body["idc"], "gz");
    assert_eq!(body["headers"]["x-shardgate-reforward"], "1");
    let moved_epoch = moved.to_string();
    assert_eq!(
        body["headers"]["x-shardgate-owner-epoch"].as_str(),
        Some(moved_epoch.as_str())
    );
    assert_eq!(
        body["headers"]["x-shardgate-epoch"].as_str(),
        Some(first_epoch.as_str())
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

    relay.restore();
    eventually("the stale gateway to catch up", || async {
        (revision(&stale) >= moved as u64).then_some(())
    })
    .await;
    let (status, idc, body) = post(stale.proxy_addr, &key).await;
    assert_eq!((status, idc.as_deref()), (200, Some("gz")), "{body}");
    assert!(body["headers"]["x-shardgate-reforward"].is_null(), "{body}");
    fresh.shutdown().await;
    stale.shutdown().await;
}
