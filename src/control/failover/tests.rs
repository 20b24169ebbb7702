//! The decision rules with time passed in: detection, hysteresis, failback, operator overrides
//! left alone, finished warm-ups cleared, majority of views.

use std::collections::BTreeMap;

use super::*;

const POLICY: Policy = Policy {
    detect_ms: 1500,
    recover_ms: 10_000,
    auto_failback: true,
};
const T0: u64 = 1_700_000_000_000;
const IDCS: [&str; 3] = ["sh", "bj", "gz"];

fn view(sh: bool) -> BTreeMap<String, bool> {
    [("sh", sh), ("bj", true), ("gz", true)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn operator(state: IdcState, at_ms: u64) -> IdcOverride {
    IdcOverride {
        state,
        reason: "maintenance".into(),
        by: "alice".into(),
        at: at_ms / 1000,
        expires_at: None,
        at_ms,
        warmup_s: None,
        warmup_step: None,
    }
}

/// Observes `sh` as `healthy` every 100 ms from `from` to `to` (exclusive), deciding and
/// applying at each step like the controllers do; returns every decision made.
fn run(
    tracker: &mut Tracker,
    overrides: &mut Overrides,
    from: u64,
    to: u64,
    healthy: impl Fn(u64) -> bool,
) -> Vec<(u64, Decision)> {
    let mut made = Vec::new();
    let mut now = from;
    while now < to {
        tracker.observe_view(IDCS, &view(healthy(now)), now);
        let d = decide(IDCS, overrides, tracker, &POLICY, "gw", now);
        apply(overrides, &d, "gw", now);
        // The driver brings a warm-up home step by step; here every step at once.
        for o in overrides.idcs.values_mut() {
            if o.state == IdcState::Warming {
                o.warmup_step = Some(o.warmup_steps());
            }
        }
        made.extend(d.into_iter().map(|d| (now, d)));
        now += 100;
    }
    made
}

#[test]
fn unhealthy_for_detect_ms_marks_down_auto() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    let made = run(&mut t, &mut o, T0, T0 + 3000, |_| false);
    assert_eq!(made.len(), 1, "{made:?}");
    let (at, d) = &made[0];
    assert_eq!(*at, T0 + 1500);
    assert_eq!(d.idc, "sh");
    let Change::Set(ov) = &d.change else {
        panic!("expected an override: {d:?}")
    };
    assert_eq!(ov.state, IdcState::Down);
    assert_eq!(ov.reason, AUTO);
    assert_eq!(ov.by, "gw");
    assert_eq!(o.idcs["sh"].state, IdcState::Down);
    assert!(!o.idcs.contains_key("bj"));
}

#[test]
fn flapping_health_never_flaps_ownership() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    // Unhealthy 1.4 s, healthy 0.2 s, over and over: never 1.5 s in a row.
    let flap = |now: u64| (now - T0) % 1600 >= 1400;
    let made = run(&mut t, &mut o, T0, T0 + 20_000, flap);
    assert!(made.is_empty(), "{made:?}");
    assert!(o.idcs.is_empty());

    // Now down for real; then flapping healthy/unhealthy never brings it back.
    let made = run(&mut t, &mut o, T0 + 20_000, T0 + 22_000, |_| false);
    assert_eq!(made.len(), 1);
    let flap_up = |now: u64| (now - T0) % 2000 < 1900;
    let made = run(&mut t, &mut o, T0 + 22_000, T0 + 60_000, flap_up);
    assert!(made.is_empty(), "{made:?}");
    assert_eq!(o.idcs["sh"].state, IdcState::Down);
}

#[test]
fn auto_failback_warms_then_clears() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    run(&mut t, &mut o, T0, T0 + 2000, |_| false);
    assert_eq!(o.idcs["sh"].state, IdcState::Down);
    let made = run(&mut t, &mut o, T0 + 2000, T0 + 12_100, |_| true);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].0, T0 + 12_000, "recover_ms of healthy views");
    let w = &o.idcs["sh"];
    assert_eq!((w.state, w.reason.as_str()), (IdcState::Warming, AUTO));
    assert_eq!(w.at_ms, T0 + 12_000);
    // Once every step is home (the driver's doing, all at once in `run`), the IDC is active
    // again: written as an `active` override, never removed.
    let made = run(&mut t, &mut o, T0 + 12_100, T0 + 73_000, |_| true);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0].0, T0 + 12_100);
    assert_eq!(made[0].1.change, Change::Clear);
    assert_eq!(o.idcs["sh"].state, IdcState::Active);
}

#[test]
fn without_auto_failback_down_stays() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    let policy = Policy {
        auto_failback: false,
        ..POLICY
    };
    t.observe("sh", Some(false), T0);
    let d = decide(IDCS, &o, &t, &policy, "gw", T0 + 1500);
    apply(&mut o, &d, "gw", T0 + 1500);
    assert_eq!(o.idcs["sh"].state, IdcState::Down);
    t.observe("sh", Some(true), T0 + 2000);
    assert!(decide(IDCS, &o, &t, &policy, "gw", T0 + 60_000).is_empty());
}

#[test]
fn operator_overrides_are_left_alone_but_a_finished_warmup_is_cleared() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    o.idcs.insert("sh".into(), operator(IdcState::Down, T0));
    o.idcs.insert("bj".into(), operator(IdcState::Draining, T0));
    o.idcs.insert("gz".into(), operator(IdcState::Warming, T0));
    // Healthy for long: an operator's down is not failed back; unhealthy: nothing either.
    for idc in IDCS {
        t.observe(idc, Some(true), T0);
    }
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 30_000).is_empty());
    for idc in IDCS {
        t.observe(idc, Some(false), T0 + 30_000);
    }
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 40_000).is_empty());
    // Time alone never ends a warm-up: only its steps coming home do.
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 3_600_000).is_empty());
    let mut w = operator(IdcState::Warming, T0);
    w.warmup_step = Some(9);
    o.idcs.insert("gz".into(), w.clone());
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 60_000).is_empty());
    w.warmup_step = Some(10);
    o.idcs.insert("gz".into(), w.clone());
    let d = decide(IDCS, &o, &t, &POLICY, "gw", T0 + 60_000);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].idc.as_str(), &d[0].change), ("gz", &Change::Clear));
    // `restore --warmup 0` has one step.
    w.warmup_s = Some(0);
    w.warmup_step = Some(1);
    o.idcs.insert("gz".into(), w);
    assert_eq!(decide(["gz"], &o, &t, &POLICY, "gw", T0).len(), 1);
}

#[test]
fn an_operator_active_override_does_not_stop_failover_and_an_expired_down_warms() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    o.idcs.insert("sh".into(), operator(IdcState::Active, T0));
    let mut expired = operator(IdcState::Down, T0);
    expired.expires_at = Some(T0 / 1000 + 1);
    o.idcs.insert("bj".into(), expired);
    t.observe("sh", Some(false), T0);
    // Not expired yet: nothing for bj (the gateways never look at the clock either).
    let d = decide(IDCS, &o, &t, &POLICY, "gw", T0 + 999);
    assert!(d.is_empty(), "{d:?}");
    let d = decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2000);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(matches!(&d[0].change, Change::Set(x) if x.state == IdcState::Down));
    assert!(
        matches!(&d[1].change, Change::Set(x) if x.state == IdcState::Warming && x.warmup_step == Some(0))
    );
}

#[test]
fn the_last_idc_that_can_serve_is_never_marked_down() {
    let mut t = Tracker::new();
    let o = Overrides::default();
    // Every IDC unhealthy at once (a monitoring blip, a partition of the gateways): two go
    // down, the third keeps its shards.
    for idc in IDCS {
        t.observe(idc, Some(false), T0);
    }
    let d = decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2000);
    assert_eq!(d.len(), 2, "{d:?}");
    let mut o = o;
    apply(&mut o, &d, "gw", T0 + 2000);
    let serving = IDCS
        .iter()
        .filter(|i| o.idcs.get(**i).is_none_or(|x| x.state != IdcState::Down))
        .count();
    assert_eq!(serving, 1);
    // And later rounds do not take it either.
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 60_000).is_empty());
}

#[test]
fn an_auto_warming_idc_that_fails_again_goes_down() {
    let mut t = Tracker::new();
    let mut o = Overrides::default();
    let mut w = operator(IdcState::Warming, T0);
    w.reason = AUTO.into();
    o.idcs.insert("sh".into(), w);
    t.observe("sh", Some(false), T0 + 1000);
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2000).is_empty());
    let d = decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2500);
    assert!(matches!(&d[0].change, Change::Set(x) if x.state == IdcState::Down));
}

#[test]
fn no_verdict_breaks_a_streak() {
    let mut t = Tracker::new();
    let o = Overrides::default();
    t.observe("sh", Some(false), T0);
    t.observe("sh", None, T0 + 1000);
    t.observe("sh", Some(false), T0 + 1100);
    assert!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2000).is_empty());
    assert_eq!(decide(IDCS, &o, &t, &POLICY, "gw", T0 + 2600).len(), 1);
}

#[test]
fn majority_of_live_gateways() {
    let a = view(false);
    let b = view(true);
    let c = view(true);
    // One of three sees sh down: no verdict of "unhealthy"; the others make it healthy.
    assert_eq!(majority("sh", [&a, &b, &c], 3), Some(true));
    assert_eq!(majority("sh", [&a, &a, &c], 3), Some(false));
    // Two of four is not a majority either way.
    assert_eq!(majority("sh", [&a, &a, &b, &c], 4), None);
    // A live gateway with no view counts against both.
    let empty = BTreeMap::new();
    assert_eq!(majority("sh", [&a, &b, &empty], 3), None);
    assert_eq!(majority("sh", [&a, &a, &empty], 3), Some(false));
    assert_eq!(majority("sh", std::iter::empty(), 0), None);
}

#[test]
fn an_override_from_etcd_with_absurd_times_does_not_overflow() {
    // Written by hand with etcdctl: seconds that overflow once turned into milliseconds.
    let mut o = operator(IdcState::Warming, 0);
    o.at = u64::MAX / 10;
    o.warmup_s = Some(u64::MAX / 10);
    let overrides = Overrides {
        idcs: [("sh".to_owned(), o)].into_iter().collect(),
        ..Overrides::default()
    };
    let tracker = Tracker::default();
    // Nothing to decide about a warm-up with no step home yet, and no panic deciding it.
    assert!(decide(IDCS, &overrides, &tracker, &POLICY, "auto", T0).is_empty());
}
