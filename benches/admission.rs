//! The admission hot path (DESIGN.md §2): `admit` then releasing the permit, for a core
//! request without and with a route rate limit, and with the breaker outcome recorded as the
//! proxy does after every exchange.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use shardgate::control::topology::{build, BuildContext, IdcId, Overrides, RawTopology};
use shardgate::data::admission::Admission;
use shardgate::data::upstream::Upstreams;
use shardgate::telemetry::Metrics;

/// The demo's three sets and IDCs; `orders` has no rate limit, `orders-limited` one high
/// enough never to refuse, so both measure the admitted path.
const DOC: &str = r#"
cluster = "bench"
[sets.core]
priority = 0
max_inflight = 4096
[sets.subcore]
priority = 1
max_inflight = 1024
[sets.noncore]
priority = 2
max_inflight = 256
degradable = true
[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]
pools.subcore = ["127.0.0.1:7002"]
pools.noncore = ["127.0.0.1:7003"]
[[idcs]]
name = "bj"
pools.core = ["127.0.0.1:7011"]
pools.subcore = ["127.0.0.1:7012"]
pools.noncore = ["127.0.0.1:7013"]
[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
key = ["header:x-user-id"]
[[routes]]
name = "orders-limited"
path_prefix = "/limited"
set = "core"
key = ["header:x-user-id"]
rate_limit = { rps = 1000000000, burst = 1000000000 }
"#;

fn bench(c: &mut Criterion) {
    let raw = RawTopology::parse(DOC).expect("bench topology parses");
    let ctx = BuildContext {
        revision: 1,
        ..BuildContext::default()
    };
    let topo = build(raw, &Overrides::default(), &ctx, &Upstreams::new()).expect("valid");
    let admission = Admission::new(Arc::new(Metrics::new()));
    let orders = topo.route_by_name("orders").expect("orders");
    let limited = topo
        .route_by_name("orders-limited")
        .expect("orders-limited");
    let idc = IdcId(1);

    let mut group = c.benchmark_group("admission");
    group.bench_function("admit_release_core", |b| {
        b.iter(|| drop(black_box(admission.admit(&topo, black_box(orders), idc))))
    });
    group.bench_function("admit_release_core_rate_limited", |b| {
        b.iter(|| drop(black_box(admission.admit(&topo, black_box(limited), idc))))
    });
    group.bench_function("admit_record_release_core", |b| {
        b.iter(|| {
            if let Ok(permit) = admission.admit(&topo, black_box(orders), idc) {
                permit.record(black_box(false));
            }
        })
    });
    group.finish();
    assert!(
        admission.admit(&topo, orders, idc).is_ok(),
        "still admitting"
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
