//! Misroute correction on real sockets (DESIGN.md §12, docs/backends.md), file mode: the owner
//! epoch sent upstream, a write refused by the simulated IDCs' ownership board and sent once to
//! the owner it names, 421s that are passed on or answered `misrouted`, and a file revision
//! that only grows across restarts with a cache dir.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use shardgate::control::topology::Shard;
use shardgate::data::server::{serve, ClientBody, Handler, ListenerSettings, Peer};
use shardgate::data::upstream::body::ResponseBody;
use support::{
    channel_body, keys_where, request, send, within, Cluster, Options, REQUEST_DEADLINE,
};
use tokio::net::TcpListener;

/// A key of a shard in `0..=63`, which the harness pins to `gz`.
fn gz_key() -> (String, u32) {
    let key = keys_where("user", 1, |s| s.0 <= 63).remove(0);
    let shard = Shard::of_key(key.as_bytes(), 1024).0;
    (key, shard)
}

fn post(path: &str, key: &str, body: impl Into<Bytes>) -> Request<support::ClientBody> {
    request(Method::POST, path, &[("x-user-id", key)], body)
}

/// `name{labels} value` from the gateway's metrics, 0 when absent.
async fn metric(c: &Cluster, line_start: &str) -> u64 {
    c.metric(line_start).await.unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_epoch_goes_upstream_and_changes_only_with_the_owner() {
    let mut c = Cluster::start().await;
    let (gz, _) = gz_key();
    // A shard in 64..=127, which the ring places, and which the next document pins to sh.
    let moved = keys_where("user", 1, |s| {
        (64..=127).contains(&s.0) && {
            let t = c.topology();
            t.idc(t.serving(s).expect("served")).name.as_str() != "sh"
        }
    })
    .remove(0);
    let get = |key: &str| support::get("/orders/1", &[("x-user-id", key)]);
    let first = c.send(get(&gz)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let epoch = first.upstream_header("x-shardgate-epoch");
    assert_eq!(first.upstream_header("x-shardgate-owner-epoch"), epoch);
    let before = c
        .send(get(&moved))
        .await
        .upstream_header("x-shardgate-owner-epoch");
    assert_eq!(before, epoch);

    c.options.pins = vec![("0-63".into(), "gz".into()), ("64-127".into(), "sh".into())];
    let pins: Vec<(String, String)> = c.options.pins.clone();
    let pins: Vec<(&str, &str)> = pins.iter().map(|(r, i)| (&r[..], &i[..])).collect();
    c.write_topology(&c.document(&pins));
    support::eventually("the new pins to be served", || {
        let t = c.topology();
        async move { (t.revision >= 2).then_some(()) }
    })
    .await;
    let revision = c.topology().revision.to_string();
    let unchanged = c.send(get(&gz)).await;
    assert_eq!(unchanged.idc(), "gz");
    assert_eq!(
        unchanged.upstream_header("x-shardgate-owner-epoch"),
        epoch,
        "the owner did not change: neither does its epoch"
    );
    assert_eq!(
        unchanged.upstream_header("x-shardgate-epoch").as_deref(),
        Some(revision.as_str())
    );
    let now = c.send(get(&moved)).await;
    assert_eq!(now.idc(), "sh");
    assert_eq!(
        now.upstream_header("x-shardgate-owner-epoch").as_deref(),
        Some(revision.as_str()),
        "a new owner comes with the revision that made it"
    );
    // Unsharded requests carry none.
    let catalog = c.send(support::get("/catalog/1", &[])).await;
    assert_eq!(catalog.upstream_header("x-shardgate-owner-epoch"), None);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_is_refused_and_sent_once_to_the_owner_the_backend_names() {
    let c = Cluster::start().await;
    let (key, shard) = gz_key();
    let ours: u64 = c.topology().owner_epoch(Shard(shard));
    // Another gateway wrote this shard at bj with a newer owner epoch.
    c.owners().record(shard, ours + 1000, "bj");
    let gz_hits = c.sim("gz", "core").hits();

    let body = support::pattern_chunk(7, 5000);
    let r = c.send(post("/orders/1", &key, body.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.idc(), "bj", "answered by the owner the board names");
    assert_eq!(r.header("x-shardgate-idc"), Some("bj"));
    assert_eq!(
        r.upstream_header("x-shardgate-reforward").as_deref(),
        Some("1")
    );
    let stated = (ours + 1000).to_string();
    assert_eq!(
        r.upstream_header("x-shardgate-owner-epoch").as_deref(),
        Some(stated.as_str())
    );
    assert_eq!(r.upstream_header("x-shardgate-idc").as_deref(), Some("bj"));
    assert_eq!(r.json()["body_bytes"], 5000, "the kept body went whole");
    assert_eq!(r.json()["body_crc32"], crc32fast::hash(&body));
    assert_eq!(
        c.sim("gz", "core").hits(),
        gz_hits + 1,
        "gz was asked first and refused"
    );
    assert_eq!(
        metric(
            &c,
            "shardgate_reforwarded_total{route=\"orders\",from=\"gz\",to=\"bj\"}"
        )
        .await,
        1
    );
    // Reads are not refused by the board: they stay with the gateway's owner.
    let read = c
        .send(support::get("/orders/1", &[("x-user-id", &key)]))
        .await;
    assert_eq!(read.idc(), "gz");
    assert_eq!(read.upstream_header("x-shardgate-reforward"), None);
    c.stop().await;
}

/// A backend that answers every request with 421 naming the owner and epoch the request asks
/// for (`x-test-owner`, `x-test-owner-epoch`), after reading its body.
#[derive(Default)]
struct Refuser {
    requests: AtomicU64,
    /// `x-shardgate-reforward` of each request, in order.
    reforward: Mutex<Vec<Option<String>>>,
}

impl Handler for Refuser {
    async fn call(self: Arc<Self>, req: Request<ClientBody>, _: Peer) -> Response<ResponseBody> {
        // The gateway's health probes are answered and not counted: only requests count.
        if req.uri().path() == "/healthz" {
            return Response::new(ResponseBody::empty());
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let (parts, body) = req.into_parts();
        let _ = body.collect().await;
        let h = |n: &str| parts.headers.get(n).cloned();
        self.reforward
            .lock()
            .unwrap()
            .push(h("x-shardgate-reforward").and_then(|v| v.to_str().ok().map(str::to_owned)));
        let mut r = Response::new(ResponseBody::full("refused by the test backend\n"));
        *r.status_mut() = StatusCode::MISDIRECTED_REQUEST;
        if let Some(v) = h("x-test-owner") {
            r.headers_mut().insert("x-shardgate-owner", v);
        }
        if let Some(v) = h("x-test-owner-epoch") {
            r.headers_mut().insert("x-shardgate-owner-epoch", v);
        }
        r
    }
}

async fn start_refuser() -> (Arc<Refuser>, SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refuser = Arc::new(Refuser::default());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let settings = ListenerSettings::plain(
        Duration::from_secs(10),
        Duration::from_secs(60),
        Duration::from_secs(1),
    );
    tokio::spawn(serve(listener, refuser.clone(), settings, stop_rx));
    (refuser, addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_unknown_repeated_or_unkept_421s_never_loop() {
    let (refuser, addr, _stop) = start_refuser().await;
    let c = Cluster::start_with(Options {
        extra_sets: "[sets.odd]\npriority = 0\n".into(),
        extra_pools: vec![("odd".into(), addr)],
        extra_toml: "\n[[routes]]\nname = \"odd\"\npath_prefix = \"/odd\"\nset = \"odd\"\n\
                     key = [\"header:x-user-id\"]\nretries = 0\n"
            .into(),
        ..Options::default()
    })
    .await;
    let (key, shard) = gz_key();
    let ours = c.topology().owner_epoch(Shard(shard));
    let newer = (ours + 1000).to_string();
    let asked = || refuser.requests.load(Ordering::SeqCst);
    let odd = |owner: &str, epoch: &str, body: support::ClientBody| {
        let mut req = Request::new(body);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/odd/1".parse().unwrap();
        for (k, v) in [
            ("x-user-id", key.as_str()),
            ("x-test-owner", owner),
            ("x-test-owner-epoch", epoch),
        ] {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        req
    };
    let full = |b: &'static [u8]| {
        http_body_util::Full::new(Bytes::from_static(b))
            .map_err(|e| match e {})
            .boxed()
    };

    // An owner epoch no newer than ours: the backend's answer, unchanged.
    let r = c.send(odd("bj", &ours.to_string(), full(b"x"))).await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(r.text(), "refused by the test backend\n");
    assert_eq!(r.header("x-shardgate-reason"), None);
    assert_eq!(asked(), 1);

    // A newer owner that refuses too: sent there once, then 421 `misrouted` to the client.
    let r = c.send(odd("bj", &newer, full(b"x"))).await;
    assert_eq!(r.status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(r.header("x-shardgate-reason"), Some("misrouted"));
    assert_eq!(r.json()["error"], "misrouted", "{}", r.text());
    assert_eq!(asked(), 3, "one first try, one re-forward, no loop");
    assert_eq!(
        refuser.reforward.lock().unwrap()[1..],
        [None, Some("1".to_owned())]
    );

    // A newer owner the gateway does not know: not sent anywhere.
    let r = c.send(odd("nowhere", &newer, full(b"x"))).await;
    assert_eq!(r.header("x-shardgate-reason"), Some("misrouted"));
    assert_eq!(asked(), 4);

    // Bodies that were not kept: over 64 KiB, and of unknown length.
    let big = support::pattern_chunk(1, 100 * 1024);
    let r = c
        .send(odd(
            "bj",
            &newer,
            http_body_util::Full::new(big)
                .map_err(|e| match e {})
                .boxed(),
        ))
        .await;
    assert_eq!(r.header("x-shardgate-reason"), Some("misrouted"));
    assert_eq!(asked(), 5);
    let (tx, body) = channel_body();
    let reply = tokio::spawn(send(c.proxy(), odd("bj", &newer, body)));
    tx.send(Bytes::from_static(b"small but chunked"))
        .await
        .unwrap();
    drop(tx);
    let r = within(REQUEST_DEADLINE, "the chunked request's answer", reply)
        .await
        .unwrap();
    assert_eq!(r.header("x-shardgate-reason"), Some("misrouted"));
    assert_eq!(asked(), 6);
    assert_eq!(
        metric(
            &c,
            "shardgate_reforwarded_total{route=\"odd\",from=\"gz\",to=\"bj\"}"
        )
        .await,
        1
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_revision_only_grows_across_restarts_with_a_cache_dir() {
    let mut c = Cluster::start_with(Options {
        cache_dir: true,
        ..Options::default()
    })
    .await;
    let (key, shard) = gz_key();
    let write = |n: u8| post("/orders/1", &key, vec![n; 10]);
    let before = c.send(write(1)).await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.text());
    let epoch = |r: &support::Reply, h: &str| -> u64 {
        r.upstream_header(h)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {h} upstream: {}", r.text()))
    };
    let first = epoch(&before, "x-shardgate-owner-epoch");
    assert_eq!(c.owners().owner(shard), Some((first, "gz".into())));
    c.restart().await;
    let after = c.send(write(2)).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
    assert!(
        epoch(&after, "x-shardgate-epoch") > epoch(&before, "x-shardgate-epoch"),
        "the revision went on from where it was"
    );
    assert!(epoch(&after, "x-shardgate-owner-epoch") > first);
    assert_eq!(
        after.upstream_header("x-shardgate-reforward"),
        None,
        "the restarted gateway's epoch is not behind the board"
    );
    c.stop().await;
}
