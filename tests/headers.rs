//! Header hygiene on real sockets: what the backend receives from the gateway, what the client
//! gets back, and that clients cannot steer routing with the gateway's own headers.

mod support;

use http::StatusCode;
use shardgate::topology::Shard;
use support::{get, Cluster};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn is_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_gateway_headers_do_not_steer_routing() {
    let c = Cluster::start().await;
    let topo = c.topology();
    // A key that `sh` does not serve, so a spoofed `x-shardgate-idc: sh` would show.
    let key = (0..)
        .map(|i| format!("spoof-{i}"))
        .find(|k| c.serving_idc_of(k) != "sh")
        .expect("some key is served elsewhere");
    let real_shard = Shard::of_key(key.as_bytes(), topo.shard_count).0;
    let fake_shard = ((real_shard + 512) % 1024).to_string();
    let serving = c.serving_idc_of(&key);
    let sh_hits = c.sim("sh", "core").hits();

    let r = c
        .send(get(
            "/orders",
            &[
                ("x-user-id", &key),
                ("x-shardgate-idc", "sh"),
                ("x-shardgate-shard", &fake_shard),
                ("x-shardgate-epoch", "999999"),
                ("x-shardgate-spill", "1"),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.idc(), serving, "routing ignores x-shardgate-idc");
    assert_eq!(r.header("x-shardgate-idc"), Some(serving.as_str()));
    assert_eq!(r.shard(), Some(real_shard));
    // The backend sees the gateway's values, not the client's.
    let rev = topo.revision.to_string();
    assert_eq!(
        r.upstream_header("x-shardgate-idc").as_deref(),
        Some(serving.as_str())
    );
    let real = real_shard.to_string();
    assert_eq!(
        r.upstream_header("x-shardgate-shard").as_deref(),
        Some(real.as_str())
    );
    assert_eq!(
        r.upstream_header("x-shardgate-epoch").as_deref(),
        Some(rev.as_str())
    );
    assert_eq!(r.upstream_header("x-shardgate-spill"), None);
    assert_eq!(c.sim("sh", "core").hits(), sh_hits, "nothing went to sh");

    // On a non-sharded route a client's shard header is dropped, not passed on.
    let r = c
        .send(get(
            "/catalog",
            &[("x-shardgate-shard", "7"), ("x-shardgate-idc", "gz")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.idc(), "bj", "the local IDC");
    assert_eq!(r.upstream_header("x-shardgate-shard"), None);
    assert_eq!(r.upstream_header("x-shardgate-idc").as_deref(), Some("bj"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_gets_forwarding_headers_and_no_hop_by_hop_ones() {
    let c = Cluster::start().await;
    let key = "hygiene-1";
    let headers = [
        ("host", "shop.example.com:8443"),
        ("x-user-id", key),
        ("x-request-id", "req-abc_123.x:y"),
        ("x-forwarded-for", "203.0.113.9"),
        ("traceparent", TRACEPARENT),
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "s3cret"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("x-end-to-end", "kept"),
    ];
    // Control: sent straight to a backend, every one of these headers arrives, so their
    // absence below is the gateway's doing.
    let direct = support::send(c.sim("sh", "core").addr, get("/orders/1", &headers)).await;
    for name in ["x-hop-secret", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            direct.upstream_header(name).is_some(),
            "the test client did not send `{name}`"
        );
    }

    let r = c.send(get("/orders/1", &headers)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let up = |name: &str| r.upstream_header(name);

    assert_eq!(up("x-request-id").as_deref(), Some("req-abc_123.x:y"));
    assert_eq!(
        up("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(up("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        up("x-forwarded-host").as_deref(),
        Some("shop.example.com:8443")
    );
    assert_eq!(up("traceparent").as_deref(), Some(TRACEPARENT));
    let rev = c.topology().revision.to_string();
    assert_eq!(up("x-shardgate-epoch").as_deref(), Some(rev.as_str()));
    assert_eq!(up("x-end-to-end").as_deref(), Some("kept"));
    for hop in ["x-hop-secret", "keep-alive", "te", "proxy-authorization"] {
        assert_eq!(up(hop), None, "hop-by-hop `{hop}` reached the backend");
    }
    if let Some(conn) = up("connection") {
        assert!(
            !conn.contains("x-hop-secret"),
            "the client's Connection header was forwarded: {conn}"
        );
    }

    // The client's answer names the IDC, the shard and the request id.
    assert_eq!(
        r.header("x-shardgate-idc"),
        Some(c.serving_idc_of(key).as_str())
    );
    assert_eq!(
        r.shard(),
        Some(Shard::of_key(key.as_bytes(), 1024).0),
        "x-shardgate-shard on the answer"
    );
    assert_eq!(r.header("x-request-id"), Some("req-abc_123.x:y"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_traces_are_started_when_missing_or_invalid() {
    let c = Cluster::start().await;

    // Nothing from the client: everything is generated.
    let a = c.send(get("/orders", &[("x-user-id", "fresh")])).await;
    let b = c.send(get("/orders", &[("x-user-id", "fresh")])).await;
    for r in [&a, &b] {
        assert_eq!(r.status, StatusCode::OK);
        let id = r.upstream_header("x-request-id").expect("a generated id");
        assert!(!id.is_empty());
        assert_eq!(r.header("x-request-id"), Some(id.as_str()), "same id back");
        let tp = r.upstream_header("traceparent").expect("a started trace");
        assert!(is_traceparent(&tp), "`{tp}` is a W3C traceparent");
        assert_eq!(
            r.upstream_header("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
    }
    assert_ne!(
        a.upstream_header("x-request-id"),
        b.upstream_header("x-request-id"),
        "every request gets its own id"
    );
    assert_ne!(
        a.upstream_header("traceparent"),
        b.upstream_header("traceparent"),
        "every request starts its own trace"
    );

    // Invalid values from the client are replaced, not passed on.
    let bad_id = "not a valid id!";
    let bad_tp = "00-zzzz-1234-01";
    let r = c
        .send(get(
            "/orders",
            &[
                ("x-user-id", "fresh"),
                ("x-request-id", bad_id),
                ("traceparent", bad_tp),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.upstream_header("x-request-id").expect("a request id");
    assert_ne!(id, bad_id);
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    let tp = r.upstream_header("traceparent").expect("a traceparent");
    assert_ne!(tp, bad_tp);
    assert!(is_traceparent(&tp), "`{tp}` is a W3C traceparent");
    c.stop().await;
}
