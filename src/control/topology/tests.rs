//! Unit tests of validation, the shard tables and the diff, without a runtime.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::data::upstream::Upstreams;

fn doc(idcs: &[(&str, u32)], extra: &str) -> String {
    let mut s = String::from(
        "cluster = \"t\"\nshard_count = 1024\n[sets.core]\n[sets.noncore]\ndegradable = true\n",
    );
    for (i, (name, weight)) in idcs.iter().enumerate() {
        s.push_str(&format!(
            "[[idcs]]\nname = \"{name}\"\nweight = {weight}\npools.core = [\"127.0.0.1:{}\"]\npools.noncore = [\"127.0.0.1:{}\"]\n",
            7000 + i,
            7100 + i
        ));
    }
    s.push_str(extra);
    s.push_str(
        "[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\n",
    );
    s
}

fn build_text(text: &str, overrides: &Overrides) -> Result<Topology, Problems> {
    let raw = RawTopology::parse(text)?;
    build(
        raw,
        overrides,
        &BuildContext {
            revision: 7,
            ..BuildContext::default()
        },
        &Upstreams::new(),
    )
}

fn names(t: &Topology, ids: &[IdcId]) -> Vec<String> {
    ids.iter().map(|&i| t.idc(i).name.to_string()).collect()
}

#[test]
fn every_problem_is_listed_at_once() {
    let text = r#"
cluster = "t"
shard_count = 16
[sets.core]
max_inflight = 0
[[idcs]]
name = "sh"
failover_to = ["nowhere"]
pools.core = ["not-an-address"]
[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:1"]
[[shards.pins]]
range = "10-99"
idc = "sh"
[[shards.pins]]
range = "1-2"
idc = "xx"
[[routes]]
name = "a"
path_prefix = "a"
set = "gold"
key = ["body:x"]
timeout_ms = 0
max_body_bytes = 0
[[routes]]
name = "a"
set = "core"
sharded = true
"#;
    let problems = build_text(text, &Overrides::default()).unwrap_err().0;
    let text = problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for expected in [
        "sets.core.max_inflight",
        "idcs[0].failover_to: unknown IDC `nowhere`",
        "idcs[0].pools.core: `not-an-address`",
        "idcs[1].name: IDC `sh` is declared twice",
        "shards.pins[0].range: `10-99` is outside 0..16",
        "shards.pins[1].idc: unknown IDC `xx`",
        "routes[0].path_prefix",
        "routes[0].set: unknown set `gold`",
        "routes[0].key: unknown key source `body`",
        "routes[0].timeout_ms: must be greater than 0",
        "routes[0].max_body_bytes: must be greater than 0",
        "routes[1].name: route `a` is declared twice",
        "routes[1].key: a sharded route needs at least one key source",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[test]
fn syntax_errors_name_the_line() {
    let problems = build_text(
        "cluster = \"t\"\nshard_count = \"many\"\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .0;
    assert_eq!(problems.len(), 1);
    assert!(problems[0].at.starts_with("line 2"), "{:?}", problems[0]);
}

#[test]
fn unknown_fields_are_rejected() {
    let text = doc(&[("sh", 100)], "").replace("weight = 100", "wieght = 100");
    let problems = build_text(&text, &Overrides::default()).unwrap_err();
    assert!(problems.to_string().contains("wieght"), "{problems}");
}

#[test]
fn idc_without_a_pool_for_a_used_set() {
    let text =
        doc(&[("sh", 100), ("bj", 100)], "").replacen("pools.core = [\"127.0.0.1:7001\"]\n", "", 1);
    let problems = build_text(&text, &Overrides::default()).unwrap_err();
    assert!(
        problems
            .to_string()
            .contains("IDC `bj` has no backends for set `core`"),
        "{problems}"
    );
}

#[test]
fn reshard_needs_allow_reshard() {
    let raw = RawTopology::parse(&doc(&[("sh", 100)], "")).unwrap();
    let ctx = BuildContext {
        running_shard_count: Some(512),
        ..BuildContext::default()
    };
    let err = build(raw.clone(), &Overrides::default(), &ctx, &Upstreams::new()).unwrap_err();
    assert!(err.to_string().contains("allow_reshard"), "{err}");
    let mut allowed = raw;
    allowed.allow_reshard = true;
    assert!(build(allowed, &Overrides::default(), &ctx, &Upstreams::new()).is_ok());
}

#[test]
fn pins_win_over_the_ring() {
    let t = build_text(
        &doc(
            &[("sh", 100), ("bj", 100), ("gz", 100)],
            "[[shards.pins]]\nrange = \"0-99\"\nidc = \"gz\"\n[[shards.pins]]\nrange = \"500\"\nidc = \"bj\"\n",
        ),
        &Overrides::default(),
    )
    .unwrap();
    for s in 0..100 {
        assert_eq!(t.idc(t.home(Shard(s))).name.as_str(), "gz");
    }
    assert_eq!(t.idc(t.home(Shard(500))).name.as_str(), "bj");
    // Outside pins every IDC owns something, roughly by weight.
    let served = t.shards_served();
    assert!(served.iter().all(|&n| n > 150), "{served:?}");
}

#[test]
fn every_shard_has_exactly_one_serving_idc_and_a_full_failover_order() {
    let t = build_text(
        &doc(&[("sh", 100), ("bj", 50), ("gz", 100)], ""),
        &Overrides::default(),
    )
    .unwrap();
    for s in 0..t.shard_count {
        let order = t.failover_order(Shard(s));
        assert_eq!(order[0], t.home(Shard(s)));
        let mut sorted = order.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "shard {s}: {order:?}");
        assert_eq!(t.serving(Shard(s)), Some(t.home(Shard(s))));
    }
    assert_eq!(t.shards_served().iter().sum::<u32>(), 1024);
}

#[test]
fn a_rebuild_reuses_the_ring_walk_only_while_the_idcs_are_the_same() {
    let ctx = BuildContext {
        revision: 8,
        ..BuildContext::default()
    };
    let with_previous = |text: &str, previous: &Topology| {
        let raw = RawTopology::parse(text).unwrap();
        build_with_previous(
            raw,
            &Overrides::default(),
            &ctx,
            &Upstreams::new(),
            Some(previous),
        )
        .unwrap()
    };
    let failover = "[[idcs]]\nname = \"xa\"\nweight = 0\nfailover_to = [\"gz\"]\npools.core = [\"127.0.0.1:7200\"]\npools.noncore = [\"127.0.0.1:7201\"]\n";
    let first = build_text(
        &doc(&[("sh", 100), ("bj", 50), ("gz", 100)], ""),
        &Overrides::default(),
    )
    .unwrap();
    // The same IDCs with pins: the walk is reused, and the tables are those of a build from
    // nothing.
    let pinned = doc(
        &[("sh", 100), ("bj", 50), ("gz", 100)],
        "[[shards.pins]]\nrange = \"0-99\"\nidc = \"gz\"\n",
    );
    let reused = with_previous(&pinned, &first);
    assert!(Arc::ptr_eq(&reused.ring_shards, &first.ring_shards));
    let fresh = build_text(&pinned, &Overrides::default()).unwrap();
    assert_eq!((&reused.home, &reused.order), (&fresh.home, &fresh.order));
    assert_eq!(reused.serving, fresh.serving);
    assert_ne!(reused.home, first.home, "the pins took effect");

    // A weight changed, or an IDC added: walked anew, and again the same as from nothing.
    for text in [
        doc(&[("sh", 100), ("bj", 80), ("gz", 100)], ""),
        doc(&[("sh", 100), ("bj", 50), ("gz", 100)], failover),
    ] {
        let rebuilt = with_previous(&text, &first);
        assert!(!Arc::ptr_eq(&rebuilt.ring_shards, &first.ring_shards));
        let fresh = build_text(&text, &Overrides::default()).unwrap();
        assert_eq!((&rebuilt.home, &rebuilt.order), (&fresh.home, &fresh.order));
        assert_ne!(rebuilt.order, first.order, "the change took effect");
    }
}

fn state(idc: &str, state: IdcState, at: u64) -> Overrides {
    let mut o = Overrides::default();
    o.idcs.insert(
        idc.to_owned(),
        IdcOverride {
            state,
            reason: "test".into(),
            by: "tests".into(),
            at,
            expires_at: None,
            at_ms: 0,
            warmup_s: None,
            warmup_step: None,
        },
    );
    o
}

#[test]
fn a_down_idc_hands_its_shards_to_the_next_in_failover_order() {
    let text = doc(&[("sh", 100), ("bj", 100), ("gz", 100)], "")
        .replace("name = \"sh\"\n", "name = \"sh\"\nfailover_to = [\"gz\"]\n");
    let before = build_text(&text, &Overrides::default()).unwrap();
    let after = build_text(&text, &state("sh", IdcState::Down, 1)).unwrap();
    let sh = after.idc_by_name("sh").unwrap();
    let mut moved = 0;
    for s in 0..1024 {
        let shard = Shard(s);
        if before.serving(shard) == Some(sh) {
            moved += 1;
            assert_eq!(names(&after, &[after.serving(shard).unwrap()]), ["gz"]);
        } else {
            assert_eq!(
                before.serving(shard),
                after.serving(shard),
                "shard {s} moved"
            );
        }
    }
    assert!(moved > 0);
    assert_eq!(after.shards_served()[sh.0 as usize], 0);
    let d = diff(&before, &after);
    assert_eq!(d.shards_moved(), moved);
    assert_eq!(d.moved.len(), 1);
    assert!(d.moved.contains_key(&("sh".to_owned(), "gz".to_owned())));
    assert!(d.to_string().contains("sh->gz"), "{d}");
}

#[test]
fn no_active_idc_means_no_serving_idc() {
    let mut o = state("sh", IdcState::Down, 1);
    o.idcs.insert(
        "bj".into(),
        IdcOverride {
            state: IdcState::Draining,
            reason: String::new(),
            by: String::new(),
            at: 1,
            expires_at: None,
            at_ms: 0,
            warmup_s: None,
            warmup_step: None,
        },
    );
    let t = build_text(&doc(&[("sh", 100), ("bj", 100)], ""), &o).unwrap();
    assert!((0..1024).all(|s| t.serving(Shard(s)).is_none()));
    assert_eq!(t.global_idc(), None);
}

#[test]
fn an_expired_override_still_applies_until_the_driver_replaces_it() {
    // A gateway's clock never changes an owner: expiry is the driver's to act on.
    let mut o = state("sh", IdcState::Down, 1);
    o.idcs.get_mut("sh").unwrap().expires_at = Some(10); // long before now
    let t = build_text(&doc(&[("sh", 100), ("bj", 100)], ""), &o).unwrap();
    assert_eq!(t.idc(t.idc_by_name("sh").unwrap()).state, IdcState::Down);
}

#[test]
fn warm_up_returns_shards_in_growing_steps_and_never_takes_one_back() {
    let steps = 10;
    let mut previous = 0;
    for done in 0..=steps {
        let now: Vec<u32> = (0..1024)
            .filter(|&s| warmed(Shard(s), done, steps))
            .collect();
        assert!(
            now.len() > previous || done == 0,
            "step {done} brought nothing home"
        );
        for s in 0..1024 {
            if done > 0 && warmed(Shard(s), done - 1, steps) {
                assert!(
                    warmed(Shard(s), done, steps),
                    "step {done} took shard {s} back"
                );
            }
            assert_eq!(
                warmed(Shard(s), done, steps),
                warmup_step_of(Shard(s), steps) <= done
            );
        }
        previous = now.len();
    }
    assert_eq!(previous, 1024);
    // Spread: no step brings more than a fifth of the shards.
    for step in 1..=steps {
        let n = (0..1024)
            .filter(|&s| warmup_step_of(Shard(s), steps) == step)
            .count();
        assert!(n < 1024 / 5, "step {step} has {n} shards");
    }
    // One step (`restore --warmup 0`): everything at step 1.
    assert!((0..1024).all(|s| warmup_step_of(Shard(s), 1) == 1));
}

#[test]
fn a_warming_idc_serves_the_steps_its_override_says_are_home() {
    let text = doc(&[("sh", 100), ("bj", 100)], "");
    let mut o = state("sh", IdcState::Warming, 999_999);
    let t = build_text(&text, &o).unwrap();
    let sh = t.idc_by_name("sh").unwrap();
    let home = (0..1024).filter(|&s| t.home(Shard(s)) == sh).count() as u32;
    assert_eq!(
        t.shards_served()[sh.0 as usize],
        0,
        "step 0: nothing home yet"
    );
    o.idcs.get_mut("sh").unwrap().warmup_step = Some(3);
    let t = build_text(&text, &o).unwrap();
    let served = t.shards_served()[sh.0 as usize];
    assert!(
        served > home / 10 && served < home / 2,
        "{served} of {home}"
    );
    for s in 0..1024 {
        if t.home(Shard(s)) == sh {
            let here = t.serving(Shard(s)) == Some(sh);
            assert_eq!(here, warmup_step_of(Shard(s), 10) <= 3);
        }
    }
    o.idcs.get_mut("sh").unwrap().warmup_step = Some(10);
    let t = build_text(&text, &o).unwrap();
    assert_eq!(t.shards_served()[sh.0 as usize], home);
}

#[test]
fn global_routes_prefer_the_local_idc() {
    let raw = RawTopology::parse(&doc(&[("sh", 100), ("bj", 100), ("gz", 100)], "")).unwrap();
    let ctx = BuildContext {
        local_idc: Some("bj".into()),
        ..BuildContext::default()
    };
    let t = build(raw.clone(), &Overrides::default(), &ctx, &Upstreams::new()).unwrap();
    assert_eq!(names(&t, &[t.global_idc().unwrap()]), ["bj"]);
    let down = build(
        raw,
        &state("bj", IdcState::Down, 1),
        &ctx,
        &Upstreams::new(),
    )
    .unwrap();
    assert_ne!(names(&down, &[down.global_idc().unwrap()]), ["bj"]);
}

#[test]
fn reloads_share_backends_by_identity() {
    let upstreams = Upstreams::new();
    let raw = RawTopology::parse(&doc(&[("sh", 100)], "")).unwrap();
    let a = build(
        raw.clone(),
        &Overrides::default(),
        &BuildContext::default(),
        &upstreams,
    )
    .unwrap();
    let b = build(
        raw,
        &Overrides::default(),
        &BuildContext::default(),
        &upstreams,
    )
    .unwrap();
    let pa = a.idcs[0].pool(SetId(0));
    let pb = b.idcs[0].pool(SetId(0));
    assert!(std::sync::Arc::ptr_eq(&pa[0], &pb[0]));
}

fn homes(idcs: &[(String, u32)]) -> BTreeMap<u32, String> {
    let named: Vec<(&str, u32)> = idcs.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    let t = build_text(&doc(&named, ""), &Overrides::default()).unwrap();
    (0..t.shard_count)
        .map(|s| (s, t.idc(t.home(Shard(s))).name.to_string()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Adding an IDC to the ring moves shards only to the new IDC.
    #[test]
    fn adding_an_idc_only_moves_shards_to_it(
        weights in prop::collection::vec(1u32..300, 1..6),
        new_weight in 1u32..300,
    ) {
        let idcs: Vec<(String, u32)> = weights.iter().enumerate().map(|(i, w)| (format!("idc{i}"), *w)).collect();
        let before = homes(&idcs);
        let mut grown = idcs.clone();
        grown.push(("newcomer".to_owned(), new_weight));
        let after = homes(&grown);
        for (shard, owner) in &after {
            let old = &before[shard];
            prop_assert!(owner == old || owner == "newcomer", "shard {} moved {} -> {}", shard, old, owner);
        }
    }
}

#[test]
fn a_fence_shorter_than_the_longest_route_timeout_is_refused() {
    // The document's route has the default timeout_ms (1000).
    let short = doc(&[("sh", 100), ("bj", 100)], "[failover]\nfence_ms = 999\n");
    let problems = build_text(&short, &Overrides::default()).unwrap_err();
    let text = problems.to_string();
    assert!(text.contains("failover.fence_ms"), "{text}");
    assert!(text.contains("timeout_ms (1000 ms)"), "{text}");
    let enough = doc(&[("sh", 100), ("bj", 100)], "[failover]\nfence_ms = 1000\n");
    assert!(build_text(&enough, &Overrides::default()).is_ok());
}
