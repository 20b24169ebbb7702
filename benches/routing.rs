//! The routing decision (match + key + shard + serving IDC) and the snapshot build, on a
//! topology of 1,000 routes and 16,384 shards (DESIGN.md §11: under 200 ns per decision).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, Uri};
use shardgate::control::topology::{build, BuildContext, Overrides, RawTopology, RequestView};
use shardgate::data::upstream::Upstreams;

mod common;

fn big_topology() -> RawTopology {
    RawTopology::parse(&common::big_document("bench", "sh", 7000)).expect("bench topology parses")
}

fn bench(c: &mut Criterion) {
    let raw = big_topology();
    let upstreams = Upstreams::new();
    let ctx = BuildContext {
        revision: 1,
        local_idc: Some("sh".into()),
        ..BuildContext::default()
    };
    let topo = build(raw.clone(), &Overrides::default(), &ctx, &upstreams).expect("valid");

    let uri: Uri = "/svc517/v1/orders/42?x=1".parse().expect("uri");
    let mut headers = HeaderMap::new();
    headers.insert("host", "gw.example.com".parse().expect("host"));
    headers.insert("x-user-id", "user-8812731".parse().expect("key"));
    headers.insert("accept", "*/*".parse().expect("accept"));
    headers.insert("user-agent", "bench/1.0".parse().expect("ua"));
    let method = Method::GET;
    let view = RequestView {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    assert!(topo.decide(view).is_ok());
    c.bench_function("decide/header_key_1000_routes_16384_shards", |b| {
        b.iter(|| black_box(topo.decide(black_box(view))))
    });

    // A POST while a move fences a quarter of the shards: the decision plus the one bit
    // test the proxy adds for requests that may write.
    let mut fencing = Overrides::default();
    let record: shardgate::control::topology::overrides::MoveRecord = serde_json::from_str(
        r#"{"kind":"move","ranges":["0-4095"],"to":"sh","phase":"fencing","fenced_at_ms":1}"#,
    )
    .expect("a move record");
    fencing.moves.insert("bench".into(), record);
    let fenced = build(raw.clone(), &fencing, &ctx, &upstreams).expect("valid");
    let post = Method::POST;
    let post_view = RequestView {
        method: &post,
        ..view
    };
    c.bench_function("decide/header_key_plus_fence_check_post", |b| {
        b.iter(|| {
            let d = fenced.decide(black_box(post_view));
            black_box(d.map(|d| d.shard.is_some_and(|s| fenced.is_fenced(s))))
        })
    });

    let path_uri: Uri = "/svc333/v1/merchant-77/items".parse().expect("uri");
    let no_key_headers = {
        let mut h = HeaderMap::new();
        h.insert("host", "gw.example.com".parse().expect("host"));
        h
    };
    let path_view = RequestView {
        method: &method,
        uri: &path_uri,
        headers: &no_key_headers,
    };
    assert!(topo.decide(path_view).is_ok());
    c.bench_function("decide/path_key_fallthrough_1000_routes", |b| {
        b.iter(|| black_box(topo.decide(black_box(path_view))))
    });

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function("build_1000_routes_16384_shards_5_idcs", |b| {
        b.iter(|| {
            black_box(build(raw.clone(), &Overrides::default(), &ctx, &upstreams).expect("valid"))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
