//! Unit tests of admission, on snapshots built from text, without a runtime.

use super::*;
use crate::control::topology::{build, BuildContext, DegradeOverride, Overrides, RawTopology};
use crate::data::upstream::Upstreams;

const DOC: &str = r#"
cluster = "t"
shard_count = 16
[sets.core]
priority = 0
max_inflight = 4
[sets.subcore]
priority = 1
max_inflight = 4
[sets.noncore]
priority = 2
max_inflight = 2
degradable = true
[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]
pools.subcore = ["127.0.0.1:7002"]
pools.noncore = ["127.0.0.1:7003"]
[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
sharded = false
[[routes]]
name = "recs"
path_prefix = "/recs"
set = "noncore"
sharded = false
fallback = { status = 200, body = '{"recs":[]}', content_type = "application/json", retry_after_s = 7 }
[[routes]]
name = "search"
path_prefix = "/search"
set = "noncore"
sharded = false
rate_limit = { rps = 1, burst = 2 }
"#;

fn topo_with(text: &str, overrides: &Overrides) -> Topology {
    let raw = RawTopology::parse(text).expect("the test document parses");
    build(
        raw,
        overrides,
        &BuildContext {
            revision: 1,
            ..BuildContext::default()
        },
        &Upstreams::new(),
    )
    .expect("the test document is valid")
}

fn topo() -> Topology {
    topo_with(DOC, &Overrides::default())
}

fn admission() -> Admission {
    Admission::new(Arc::new(Metrics::new()))
}

fn route(t: &Topology, name: &str) -> RouteId {
    t.route_by_name(name).expect("a test route")
}

const SH: IdcId = IdcId(0);

#[test]
fn a_full_set_refuses_at_once_and_never_borrows() {
    let t = topo();
    let a = admission();
    let recs = route(&t, "recs");
    let p1 = a.admit(&t, recs, SH).expect("first noncore slot");
    let _p2 = a.admit(&t, recs, SH).expect("second noncore slot");
    let search = route(&t, "search");
    let refused = a.admit(&t, search, SH).err().expect("noncore is full");
    assert_eq!(refused.reason(), "set_full");
    // Core has its own budget.
    let orders = route(&t, "orders");
    let core: Vec<_> = (0..4).map(|_| a.admit(&t, orders, SH)).collect();
    assert!(core.iter().all(Result::is_ok));
    assert_eq!(
        a.admit(&t, orders, SH).err().map(|r| r.reason()),
        Some("set_full")
    );
    drop(p1);
    assert!(a.admit(&t, recs, SH).is_ok(), "a released slot is reusable");
}

#[test]
fn degrade_switches_answer_the_fallback() {
    let orders_off = Overrides {
        degrade: [(
            "route:orders".to_string(),
            DegradeOverride {
                on: true,
                reason: String::new(),
                by: String::new(),
                at: 0,
            },
        )]
        .into(),
        ..Overrides::default()
    };
    let t = topo_with(DOC, &orders_off);
    let a = admission();
    match a.admit(&t, route(&t, "orders"), SH) {
        Err(Refusal::Degraded { target, fallback }) => {
            assert_eq!(target, "route:orders");
            assert!(fallback.is_none(), "orders has no fallback: 503 degraded");
        }
        other => panic!("expected degraded, got {:?}", other.map(|_| ())),
    }
    assert!(a.admit(&t, route(&t, "recs"), SH).is_ok());

    let mut set_off = orders_off.clone();
    set_off.degrade.clear();
    set_off.degrade.insert(
        "noncore".into(),
        DegradeOverride {
            on: true,
            reason: String::new(),
            by: String::new(),
            at: 0,
        },
    );
    let t = topo_with(DOC, &set_off);
    match a.admit(&t, route(&t, "recs"), SH) {
        Err(Refusal::Degraded { fallback, .. }) => {
            let fb = fallback.expect("recs has a fallback");
            assert_eq!(fb.status, 200);
            assert_eq!(fb.retry_after_s, Some(7));
        }
        other => panic!("expected degraded, got {:?}", other.map(|_| ())),
    }
    assert!(a.admit(&t, route(&t, "orders"), SH).is_ok());
    // A switch that is off does nothing.
    set_off.degrade.values_mut().for_each(|o| o.on = false);
    let t = topo_with(DOC, &set_off);
    assert!(a.admit(&t, route(&t, "recs"), SH).is_ok());
}

#[test]
fn rate_limits_survive_reloads_while_unchanged() {
    let a = admission();
    let t = topo();
    let search = route(&t, "search");
    drop(a.admit(&t, search, SH).expect("burst 1"));
    drop(a.admit(&t, search, SH).expect("burst 2"));
    match a.admit(&t, search, SH) {
        Err(Refusal::RateLimited { retry_after_s, .. }) => assert!(retry_after_s >= 1),
        other => panic!("expected rate_limited, got {:?}", other.map(|_| ())),
    }
    // The same limit in a new snapshot: the bucket is kept (still empty).
    let t2 = topo();
    assert!(a.admit(&t2, route(&t2, "search"), SH).is_err());
    // A changed limit starts a new, full bucket.
    let t3 = topo_with(
        &DOC.replace("rps = 1, burst = 2", "rps = 1, burst = 5"),
        &Overrides::default(),
    );
    assert!(a.admit(&t3, route(&t3, "search"), SH).is_ok());
}

#[test]
fn the_breaker_opens_on_system_failures_only() {
    let a = admission();
    let t = topo();
    let orders = route(&t, "orders");
    for _ in 0..10 {
        // 4xx answers are recorded as successes by the proxy.
        a.admit(&t, orders, SH).expect("closed").record(false);
    }
    for _ in 0..5 {
        a.admit(&t, orders, SH).expect("closed").record(true);
    }
    match a.admit(&t, orders, SH) {
        Err(Refusal::CircuitOpen { idc, set, .. }) => assert_eq!((&*idc, &*set), ("sh", "core")),
        other => panic!("expected circuit_open, got {:?}", other.map(|_| ())),
    }
    // Other sets of the IDC have their own breaker.
    assert!(a.admit(&t, route(&t, "recs"), SH).is_ok());
    assert_eq!(a.breakers_status().len(), 2);
}

#[test]
fn retries_are_at_most_a_fifth_of_requests_after_the_reserve() {
    let a = admission();
    let t = topo();
    let orders = route(&t, "orders");
    let mut retries = 0;
    for _ in 0..100 {
        let p = a.admit(&t, orders, SH).expect("admitted");
        if p.retry_budget().try_retry() {
            retries += 1;
        }
    }
    // The reserve (10) plus 0.2 per request; the reserve refills only up to itself.
    assert!(retries <= 10 + 20, "{retries} retries for 100 requests");
    assert!(retries >= 20, "{retries} retries for 100 requests");
}

#[test]
fn shedding_ramps_by_priority_and_never_touches_priority_zero() {
    let start = 0.7;
    // Two tiers: noncore (rank 0) ramps over [0.7, 0.85], subcore (rank 1) over [0.85, 1].
    assert_eq!(shed_probability(0.6, 2, 0, 2, start), 0.0);
    let mid = shed_probability(0.775, 2, 0, 2, start);
    assert!(mid > 0.4 && mid < 0.6, "{mid}");
    assert_eq!(shed_probability(0.85, 2, 0, 2, start), 1.0);
    assert_eq!(shed_probability(0.85, 1, 1, 2, start), 0.0);
    assert!(shed_probability(0.95, 1, 1, 2, start) > 0.5);
    assert_eq!(shed_probability(5.0, 0, 0, 2, start), 0.0);
    // The rank follows the priority, highest number first.
    let t = topo();
    assert_eq!(shed_rank(&t, 2), (0, 2));
    assert_eq!(shed_rank(&t, 1), (1, 2));
}

#[test]
fn overload_sheds_noncore_before_subcore_and_never_core() {
    // Budgets sum to 10; shedding starts at load 0.7.
    let t = topo_with(
        &DOC.replace(
            "[[routes]]\nname = \"orders\"",
            "[[routes]]\nname = \"merchants\"\npath_prefix = \"/m\"\nset = \"subcore\"\nsharded = false\n[[routes]]\nname = \"orders\"",
        ),
        &Overrides::default(),
    );
    let a = admission();
    let (orders, merchants, recs) = (
        route(&t, "orders"),
        route(&t, "merchants"),
        route(&t, "recs"),
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(a.admit(&t, orders, SH).expect("core under its budget"));
    }
    for _ in 0..3 {
        held.push(
            a.admit(&t, merchants, SH)
                .expect("subcore at load <= 0.7 is not shed"),
        );
    }
    // Load 8/10 for subcore's 4th: its tier starts at 0.85.
    held.push(
        a.admit(&t, merchants, SH)
            .expect("subcore at load 0.8 is not shed"),
    );
    // Load 9/10 for noncore: past its ramp (0.7 → 0.85), always shed.
    let search = route(&t, "search");
    for _ in 0..20 {
        assert_eq!(
            a.admit(&t, search, SH).err().map(|r| r.reason()),
            Some("shed")
        );
    }
    // Core is refused by its own budget only.
    assert_eq!(
        a.admit(&t, orders, SH).err().map(|r| r.reason()),
        Some("set_full")
    );
    // Load falls: shedding stops by itself.
    held.truncate(2);
    assert!(a.admit(&t, recs, SH).is_ok());
}

/// The shedding rank and tier count the snapshot holds for a priority.
fn shed_rank(t: &Topology, priority: u32) -> (usize, usize) {
    let rank = t
        .sets
        .iter()
        .find(|s| s.priority == priority)
        .map_or(0, |s| s.shed_rank);
    (rank, t.shed_tiers)
}

#[test]
fn the_knobs_come_from_each_snapshot_and_the_state_carries_on() {
    let a = admission();
    let strict = topo_with(
        &format!("{DOC}\n[isolation]\nretry_ratio = 0.0\nretry_reserve = 0\n[isolation.breaker]\nconsecutive = 2\n"),
        &Overrides::default(),
    );
    // The sets are first seen under the strict snapshot: no reserve, no earned retries.
    let (orders, recs) = (route(&strict, "orders"), route(&strict, "recs"));
    for _ in 0..10 {
        let p = a.admit(&strict, recs, SH).expect("admitted");
        assert!(!p.retry_budget().try_retry());
    }
    // Two failures open the breaker under the strict knobs, where the default needs five.
    a.admit(&strict, orders, SH).expect("closed").record(true);
    a.admit(&strict, orders, SH).expect("closed").record(true);
    assert_eq!(
        a.admit(&strict, orders, SH).err().map(|r| r.reason()),
        Some("circuit_open")
    );
    // A reload back to the defaults keeps the open breaker (same (IDC, set)) and the empty
    // retry budget, which earns 0.2 of a retry per request from now on.
    let t = topo();
    assert_eq!(
        a.admit(&t, route(&t, "orders"), SH)
            .err()
            .map(|r| r.reason()),
        Some("circuit_open")
    );
    let recs = route(&t, "recs");
    let mut retries = 0;
    for _ in 0..10 {
        let p = a.admit(&t, recs, SH).expect("noncore admitted");
        retries += u32::from(p.retry_budget().try_retry());
    }
    assert_eq!(retries, 2, "two retries earned by ten requests");
}

#[test]
fn degradable_sets_answer_their_fallback_under_stress() {
    // `orders` (core, not degradable) gets a fallback too: it must still be refused.
    let doc = DOC.replace(
        "name = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nsharded = false\n",
        "name = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nsharded = false\nfallback = { status = 200 }\n",
    );
    let t = topo_with(&doc, &Overrides::default());
    assert!(t.route(route(&t, "orders")).fallback.is_some());
    let a = admission();
    let (recs, search, orders) = (route(&t, "recs"), route(&t, "search"), route(&t, "orders"));
    let _held = [
        a.admit(&t, recs, SH).expect("noncore slot 1"),
        a.admit(&t, recs, SH).expect("noncore slot 2"),
    ];
    match a.admit(&t, recs, SH) {
        Err(Refusal::Degraded { target, fallback }) => {
            assert_eq!(target, "noncore (automatically: set_full)");
            assert_eq!(fallback.expect("recs' fallback").status, 200);
        }
        other => panic!("expected the fallback, got {:?}", other.map(|_| ())),
    }
    // No fallback: the refusal stays.
    assert_eq!(
        a.admit(&t, search, SH).err().map(|r| r.reason()),
        Some("set_full")
    );
    let _core: Vec<_> = (0..4).map(|_| a.admit(&t, orders, SH)).collect();
    assert_eq!(
        a.admit(&t, orders, SH).err().map(|r| r.reason()),
        Some("set_full"),
        "core is not degradable"
    );
    // Rate limits are not stress: 429 even with a fallback.
    let limited = topo_with(
        &DOC.replace(
            "name = \"recs\"\n",
            "name = \"recs\"\nrate_limit = { rps = 1, burst = 1 }\n",
        ),
        &Overrides::default(),
    );
    let b = admission();
    let recs = route(&limited, "recs");
    drop(b.admit(&limited, recs, SH).expect("the burst"));
    assert_eq!(
        b.admit(&limited, recs, SH).err().map(|r| r.reason()),
        Some("rate_limited")
    );
}

#[test]
fn a_snapshot_resolved_by_one_admission_does_not_leak_its_state_to_another() {
    let t = topo();
    let (a, b) = (admission(), admission());
    let recs = route(&t, "recs");
    let search = route(&t, "search");
    let _held = [
        a.admit(&t, recs, SH).expect("a's slot 1"),
        a.admit(&t, recs, SH).expect("a's slot 2"),
    ];
    assert_eq!(
        a.admit(&t, search, SH).err().map(|r| r.reason()),
        Some("set_full")
    );
    // `b` finds the snapshot resolved by `a` and looks its own state up by name.
    let _b_held = [
        b.admit(&t, recs, SH).expect("b's slot 1"),
        b.admit(&t, search, SH).expect("b's slot 2"),
    ];
    assert_eq!(
        b.admit(&t, search, SH).err().map(|r| r.reason()),
        Some("set_full")
    );
    assert_eq!(a.total_inflight(), 2);
    assert_eq!(b.total_inflight(), 2);
}
