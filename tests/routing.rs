//! Routing on real sockets: key → `crc32 % shard_count` → serving IDC, pins, key sources and
//! their order, every status the gateway decides on, and h2c clients.

mod support;

use std::collections::BTreeMap;

use http::{Method, StatusCode, Version};
use shardgate::control::topology::{build, BuildContext, Overrides, RawTopology, Shard};
use shardgate::data::upstream::Upstreams;
use support::{get, keys_where, request, send_h2c, Cluster, Options, IDCS};

fn shard(key: &str) -> u32 {
    Shard::of_key(key.as_bytes(), 1024).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_go_to_the_serving_idc_of_their_crc32_shard() {
    let c = Cluster::start().await;
    let topo = c.topology();
    assert_eq!(topo.shard_count, 1024);

    // The formula itself, against the CRC-32 (IEEE) check value: crc32("123456789") =
    // 0xCBF43926, and 0xCBF43926 % 1024 = 294. Backends in any language rely on it.
    let r = c.send(get("/orders", &[("x-user-id", "123456789")])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.shard(), Some(294));

    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    let before: Vec<u64> = IDCS.iter().map(|i| c.sim(i, "core").hits()).collect();
    for i in 0..200 {
        let key = format!("user-{i}");
        let r = c.send(get("/orders", &[("x-user-id", &key)])).await;
        assert_eq!(r.status, StatusCode::OK, "{key}: {}", r.text());
        let expected = Shard::of_key(key.as_bytes(), topo.shard_count);
        assert_eq!(expected.0, crc32fast::hash(key.as_bytes()) % 1024);
        assert_eq!(r.shard(), Some(expected.0), "{key}: x-shardgate-shard");
        let serving = topo.serving(expected).expect("every shard is served");
        let serving = topo.idc(serving).name.to_string();
        assert_eq!(r.idc(), serving, "{key} (shard {}) answered by", expected.0);
        assert_eq!(r.header("x-shardgate-idc"), Some(serving.as_str()));
        assert_eq!(r.json()["set"], "core", "{key}: the route's set");
        *answered.entry(serving).or_default() += 1;
    }
    assert_eq!(
        answered.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bj", "gz", "sh"],
        "200 keys spread over every IDC: {answered:?}"
    );
    // The backends agree with what the answers say.
    for (i, idc) in IDCS.iter().enumerate() {
        let hits = c.sim(idc, "core").hits() - before[i];
        assert_eq!(hits, answered[*idc], "requests {idc}'s core backend saw");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_always_lands_on_the_same_idc() {
    let c = Cluster::start().await;
    for key in ["alice", "bob", "carol", "dave", "erin"] {
        let first = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(first.status, StatusCode::OK);
        for _ in 0..5 {
            let again = c.send(get("/orders", &[("x-user-id", key)])).await;
            assert_eq!(again.idc(), first.idc(), "{key}");
            assert_eq!(again.shard(), first.shard(), "{key}");
        }
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_shards_go_to_the_pinned_idc() {
    // The default test topology pins 0-63 to gz.
    let c = Cluster::start().await;
    let topo = c.topology();
    let pinned_keys = keys_where("pinned", 20, |s| s.0 <= 63);

    // The pin must matter: without it the ring places some of these shards elsewhere.
    let unpinned = build(
        RawTopology::parse(&c.document(&[])).expect("the test topology parses"),
        &Overrides::default(),
        &BuildContext::default(),
        &Upstreams::new(),
    )
    .expect("the test topology without pins is valid");
    let moved_by_pin = pinned_keys
        .iter()
        .filter(|k| {
            let home = unpinned.home(Shard(shard(k)));
            unpinned.idc(home).name.as_str() != "gz"
        })
        .count();
    assert!(moved_by_pin > 0, "the ring alone would put them all on gz");

    for key in &pinned_keys {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.status, StatusCode::OK);
        let s = r.shard().expect("a sharded answer");
        assert!(s <= 63, "{key} is in the pinned range");
        assert_eq!(topo.idc(topo.home(Shard(s))).name.as_str(), "gz");
        assert_eq!(r.idc(), "gz", "{key} (shard {s}) is pinned to gz");
    }
    // Just outside the range, the ring decides again: not everything is on gz.
    let outside: Vec<String> = keys_where("outside", 20, |s| (64..128).contains(&s.0));
    let mut idcs = std::collections::BTreeSet::new();
    for key in &outside {
        let r = c.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.idc(), c.serving_idc_of(key));
        idcs.insert(r.idc());
    }
    assert!(
        idcs.len() > 1,
        "shards 64..128 spread by the ring: {idcs:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_source_routes_by_its_value() {
    let c = Cluster::start().await;
    // (what, request, the key the gateway must have read)
    let cases = [
        ("header", get("/orders", &[("x-user-id", "alice")]), "alice"),
        (
            "query, percent-decoded",
            get("/orders?page=2&user_id=b%C3%B6b%20%2F1", &[]),
            "böb /1",
        ),
        (
            "query, `+` is a space",
            get("/orders?user_id=ann+lee", &[]),
            "ann lee",
        ),
        (
            "cookie",
            get("/orders", &[("cookie", "theme=dark; uid=carol-9; lang=en")]),
            "carol-9",
        ),
        ("path:2", get("/orders/o-123/items", &[]), "o-123"),
        (
            "path:2, percent-decoded",
            get("/orders/dave%2042", &[]),
            "dave 42",
        ),
    ];
    // Decoding must matter for the decoded cases, or they would prove nothing.
    assert_ne!(shard("b%C3%B6b%20%2F1"), shard("böb /1"));
    assert_ne!(shard("ann+lee"), shard("ann lee"));
    assert_ne!(shard("dave%2042"), shard("dave 42"));
    for (what, req, key) in cases {
        let r = c.send(req).await;
        assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text());
        assert_eq!(r.shard(), Some(shard(key)), "{what}: shard of `{key}`");
        assert_eq!(r.idc(), c.serving_idc_of(key), "{what}: IDC of `{key}`");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_present_key_source_wins() {
    let c = Cluster::start().await;
    let (h, q, k, p) = ("from-header", "from-query", "from-cookie", "from-path");
    let shards = [shard(h), shard(q), shard(k), shard(p)];
    let distinct: std::collections::BTreeSet<u32> = shards.iter().copied().collect();
    assert_eq!(distinct.len(), 4, "the four values need distinct shards");

    let path = format!("/orders/{p}?user_id={q}");
    let cookie = format!("uid={k}");
    let cases = [
        (
            "header first",
            get(&path, &[("x-user-id", h), ("cookie", &cookie)]),
            h,
        ),
        ("then query", get(&path, &[("cookie", &cookie)]), q),
        (
            "then cookie",
            get(&format!("/orders/{p}"), &[("cookie", &cookie)]),
            k,
        ),
        ("then path", get(&format!("/orders/{p}"), &[]), p),
    ];
    for (what, req, key) in cases {
        let r = c.send(req).await;
        assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text());
        assert_eq!(r.shard(), Some(shard(key)), "{what}: routed by `{key}`");
        assert_eq!(r.idc(), c.serving_idc_of(key), "{what}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_client_errors_itself() {
    let c = Cluster::start().await;
    let hits = c.total_hits();

    // No key in any source: 400 with the JSON error body.
    let r = c.send(get("/orders", &[("x-request-id", "rid-400")])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["error"], "missing_key");
    assert_eq!(body["request_id"], "rid-400");
    assert!(body["detail"]
        .as_str()
        .is_some_and(|d| d.contains("orders")));
    assert_eq!(r.header("x-request-id"), Some("rid-400"));

    // A generated request id is in the body too.
    let r = c.send(get("/orders", &[])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let id = r.header("x-request-id").expect("x-request-id on a refusal");
    assert_eq!(r.json()["request_id"], id);

    // No route: 404, also for a path that only shares the prefix's characters.
    for path in ["/nowhere", "/ordersx/1", "/"] {
        let r = c.send(get(path, &[("x-user-id", "u1")])).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "no_route", "{path}");
        assert!(r.header("x-request-id").is_some());
    }

    // The path matches, the method does not: 405.
    for (method, path) in [
        (Method::DELETE, "/orders/1"),
        (Method::POST, "/recommendations"),
    ] {
        let r = c
            .send(request(method.clone(), path, &[("x-user-id", "u1")], ""))
            .await;
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            r.text()
        );
        assert_eq!(r.json()["error"], "method_not_allowed");
    }

    // The key is too long to be a key.
    let long = "k".repeat(300);
    let r = c.send(get("/orders", &[("x-user-id", &long)])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_key");

    assert_eq!(c.total_hits(), hits, "no refused request reached a backend");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_and_global_requests_go_to_the_local_idc() {
    for local in ["bj", "gz"] {
        let c = Cluster::start_with(Options {
            local_idc: Some(local.into()),
            ..Options::default()
        })
        .await;
        // A key served elsewhere, to tell "local" from "sharded".
        let elsewhere = (0..)
            .map(|i| format!("far-{i}"))
            .find(|k| c.serving_idc_of(k) != local)
            .expect("some key is served by another IDC");

        // on_missing_key = "local"
        let r = c.send(get("/recommendations", &[])).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.idc(), local, "keyless request with local IDC {local}");
        assert_eq!(r.json()["set"], "noncore");
        assert_eq!(r.header("x-shardgate-idc"), Some(local));
        assert_eq!(r.header("x-shardgate-shard"), None, "no key, no shard");
        // ... and with a key it is sharded as usual.
        let r = c
            .send(get("/recommendations", &[("x-user-id", &elsewhere)]))
            .await;
        assert_eq!(r.idc(), c.serving_idc_of(&elsewhere));
        assert_eq!(r.shard(), Some(shard(&elsewhere)));

        // sharded = false: a key-looking header changes nothing.
        let r = c
            .send(get("/catalog/items/1", &[("x-user-id", &elsewhere)]))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.idc(), local, "non-sharded route with local IDC {local}");
        assert_eq!(r.header("x-shardgate-shard"), None);
        assert_eq!(r.upstream_header("x-shardgate-shard"), None);
        assert_eq!(r.upstream_header("x-shardgate-idc").as_deref(), Some(local));
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_are_502_and_504() {
    let c = Cluster::start().await;

    // Every backend of the `dead` set is a closed port: a POST is never spilled, so 502.
    let key = "writer-1";
    let r = c
        .send(request(
            Method::POST,
            "/dead/1",
            &[("x-user-id", key)],
            "{\"x\":1}",
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_connect");
    assert_eq!(
        r.header("x-shardgate-idc"),
        Some(c.serving_idc_of(key).as_str())
    );
    assert_eq!(r.shard(), Some(shard(key)));

    // The upstream answers after the route's 300 ms timeout: 504.
    let r = c
        .send(get(
            "/slow",
            &[("x-user-id", "patient"), ("x-sim-delay-ms", "5000")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.json()["error"], "upstream_timeout");
    // The same route within its timeout is fine.
    let r = c.send(get("/slow", &[("x-user-id", "patient")])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // The upstream's own statuses pass through untouched.
    let r = c
        .send(get(
            "/orders",
            &[("x-user-id", "u"), ("x-sim-status", "503")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.idc(), c.serving_idc_of("u"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_and_encoded_slashes_cannot_reach_another_route() {
    let c = Cluster::start().await;
    let user = [("x-user-id", "dots-1")];
    // Dot segments (also percent-encoded ones) and repeated slashes are resolved before the
    // route is matched, and the backend gets the path that was matched: `orders` (set core),
    // never `catalog` (set noncore).
    for path in [
        "/catalog/../orders/1",
        "/catalog/%2e%2e/orders/1",
        "/catalog/.%2E/orders/./1",
        "/catalog/x/../../orders/1",
        "/../orders/1",
        "/orders//1",
    ] {
        let r = c.send(get(path, &user)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        let v = r.json();
        assert_eq!(v["set"], "core", "{path} was routed by `catalog`: {v}");
        assert_eq!(v["path"], "/orders/1", "{path}");
        assert_eq!(r.idc(), c.serving_idc_of("dots-1"), "{path}");
    }
    // The other way round too, and the query is left alone.
    let r = c.send(get("/orders/../catalog/a?next=/../x", &[])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["set"], "noncore");
    assert_eq!(r.json()["path"], "/catalog/a");
    assert_eq!(r.json()["query"], "next=/../x");

    // An encoded slash or backslash would be split differently by different backends: 400,
    // nothing forwarded.
    let hits = c.total_hits();
    for path in [
        "/catalog/..%2Forders/1",
        "/catalog%2F..%2Forders/1",
        "/catalog/..%2forders/1",
        "/catalog/..%5Corders/1",
        "/catalog/..;/orders/1",
    ] {
        let r = c.send(get(path, &user)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{path}");
    }
    assert_eq!(c.total_hits(), hits, "a refused path reached a backend");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_are_forwarded_as_http11() {
    let c = Cluster::start().await;
    let key = "h2-user";
    let r = send_h2c(c.proxy(), get("/orders/1", &[("x-user-id", key)])).await;
    assert_eq!(r.version, Version::HTTP_2, "the client spoke h2c");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/1.1", "the upstream hop");
    assert_eq!(r.idc(), c.serving_idc_of(key));
    assert_eq!(r.shard(), Some(shard(key)));
    let authority = c.proxy().to_string();
    assert_eq!(
        r.upstream_header("x-forwarded-host").as_deref(),
        Some(authority.as_str()),
        "the h2 authority becomes the forwarded host"
    );
    assert_eq!(
        r.upstream_header("host").as_deref(),
        Some(authority.as_str())
    );

    // A body over h2 arrives whole.
    let body = "x".repeat(100_000);
    let r = send_h2c(
        c.proxy(),
        request(Method::POST, "/orders", &[("x-user-id", key)], body.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["body_bytes"], 100_000);
    assert_eq!(r.json()["body_crc32"], crc32fast::hash(body.as_bytes()));

    // Gateway-made answers work over h2 too.
    let r = send_h2c(c.proxy(), get("/orders", &[])).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "missing_key");
    c.stop().await;
}
