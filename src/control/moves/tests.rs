//! Unit tests of the phase function, the operator checks and what move records do to a
//! snapshot (fence, owner, draining), without a runtime.

#![allow(clippy::unwrap_used)] // a test fails loudly on purpose

use std::time::Duration;

use super::*;
use crate::control::topology::{build, BuildContext, RawTopology, Shard};
use crate::data::upstream::Upstreams;

/// Three IDCs, 64 shards: 0-15 pinned to sh, 16-31 to bj, 32-63 to gz; gz fails over to sh.
fn doc() -> String {
    let mut s = String::from("cluster = \"t\"\nshard_count = 64\n[sets.core]\n");
    for (i, name) in ["sh", "bj", "gz"].iter().enumerate() {
        s.push_str(&format!(
            "[[idcs]]\nname = \"{name}\"\npools.core = [\"127.0.0.1:{}\"]\n",
            7000 + i
        ));
    }
    s.push_str("failover_to = [\"sh\", \"bj\"]\n");
    for (range, idc) in [("0-15", "sh"), ("16-31", "bj"), ("32-63", "gz")] {
        s.push_str(&format!(
            "[[shards.pins]]\nrange = \"{range}\"\nidc = \"{idc}\"\n"
        ));
    }
    s.push_str("[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\n");
    s
}

fn topo(overrides: &Overrides) -> Topology {
    build(
        RawTopology::parse(&doc()).unwrap(),
        overrides,
        &BuildContext {
            revision: 3,
            ..BuildContext::default()
        },
        &Upstreams::new(),
    )
    .unwrap()
}

fn serving(t: &Topology, shard: u32) -> String {
    t.serving(Shard(shard))
        .map_or("-".into(), |i| t.idc(i).name.to_string())
}

fn op() -> Operator {
    Operator {
        reason: "test".into(),
        by: "me".into(),
        now_ms: 1_000_000,
    }
}

fn record(kind: MoveKind, ranges: &[&str], from: Option<&str>, to: Option<&str>) -> MoveRecord {
    MoveRecord {
        kind,
        ranges: ranges.iter().map(|r| r.to_string()).collect(),
        from: from.map(str::to_owned),
        to: to.map(str::to_owned),
        phase: MovePhase::Fencing,
        fence_revision: 5,
        fenced_at_ms: 10_000,
        reason: String::new(),
        by: String::new(),
        at: 10,
        finished_at: None,
        note: String::new(),
        step: None,
    }
}

fn facts(acked_ms: Option<u64>, fencing_ms: u64, can_serve: bool) -> FenceFacts {
    FenceFacts {
        fencing_for: Duration::from_millis(fencing_ms),
        acked_for: acked_ms.map(Duration::from_millis),
        unseen_writer: false,
        target_can_serve: can_serve,
    }
}

#[test]
fn next_step_waits_for_every_ack_then_holds_the_fence_then_applies() {
    let r = record(MoveKind::Move, &["0-3"], Some("sh"), Some("bj"));
    let hold = Duration::from_millis(2000);
    // Not acknowledged by every gateway: wait, however long it has been fencing.
    assert_eq!(next_step(&r, &facts(None, 5_000, true), hold), Step::Wait);
    // The hold counts from the last acknowledgement, not from when the fence was written.
    assert_eq!(
        next_step(&r, &facts(Some(1_999), 9_000, true), hold),
        Step::Wait
    );
    assert_eq!(
        next_step(&r, &facts(Some(2_000), 2_000, true), hold),
        Step::Apply
    );
    // A gateway that may still be writing unseen (vanished recently, or a new leader): wait.
    let mut unseen = facts(Some(5_000), 5_000, true);
    unseen.unseen_writer = true;
    assert_eq!(next_step(&r, &unseen, hold), Step::Wait);
    // The target cannot serve when the fence ends: roll back, never half-apply.
    assert!(matches!(
        next_step(&r, &facts(Some(2_000), 2_000, false), hold),
        Step::RollBack(why) if why.contains("bj")
    ));
    // A target that is unhealthy during the fence may still recover before it ends.
    assert_eq!(
        next_step(&r, &facts(Some(1_000), 1_000, false), hold),
        Step::Wait
    );
    // A gateway that never acknowledges: rolled back after fence_ms + 30 s.
    assert_eq!(next_step(&r, &facts(None, 31_999, true), hold), Step::Wait);
    assert!(matches!(
        next_step(&r, &facts(None, 32_000, true), hold),
        Step::RollBack(why) if why.contains("acknowledged")
    ));
    // A record that is not fencing is finished: nothing to do.
    let mut done = r.clone();
    done.phase = MovePhase::Applied;
    assert_eq!(
        next_step(&done, &facts(Some(9_000), 9_000, true), hold),
        Step::Wait
    );
}

#[test]
fn a_failover_fence_is_never_rolled_back_and_ignores_the_target() {
    let r = record(MoveKind::Failover, &["0-3"], Some("sh"), None);
    let hold = Duration::from_millis(2000);
    assert_eq!(next_step(&r, &facts(None, 600_000, true), hold), Step::Wait);
    assert_eq!(
        next_step(&r, &facts(Some(2_000), 2_000, false), hold),
        Step::Apply
    );
}

#[test]
fn a_fencing_move_fences_writes_and_keeps_the_owner_then_applied_moves_it() {
    let mut o = Overrides::default();
    o.moves.insert(
        "m1".into(),
        record(MoveKind::Move, &["2-5"], Some("sh"), Some("gz")),
    );
    let t = topo(&o);
    assert!(t.is_fenced(Shard(2)) && t.is_fenced(Shard(5)));
    assert!(!t.is_fenced(Shard(1)) && !t.is_fenced(Shard(6)));
    assert_eq!(serving(&t, 3), "sh", "reads stay with the old owner");

    o.moves.get_mut("m1").unwrap().phase = MovePhase::Applied;
    let t = topo(&o);
    assert!(t.fenced().is_empty(), "the fence is lifted");
    assert_eq!(serving(&t, 3), "gz");
    assert_eq!(t.idc(t.home(Shard(3))).name.as_str(), "gz");
    assert_eq!(serving(&t, 6), "sh");
    assert!(t.serving_reason(Shard(3)).contains("move/m1"));
    // The old order continues after the new owner: gz down → sh (its old home) again.
    o.idcs
        .insert("gz".into(), op().idc_override(IdcState::Down));
    let t = topo(&o);
    assert_eq!(serving(&t, 3), "sh");
}

#[test]
fn later_applied_moves_win() {
    let mut o = Overrides::default();
    let mut a = record(MoveKind::Move, &["0-7"], None, Some("gz"));
    a.phase = MovePhase::Applied;
    a.fence_revision = 9;
    let mut b = record(MoveKind::Move, &["4-5"], None, Some("bj"));
    b.phase = MovePhase::Applied;
    b.fence_revision = 4;
    o.moves.insert("a".into(), a);
    o.moves.insert("b".into(), b);
    let t = topo(&o);
    assert_eq!(serving(&t, 4), "gz", "revision 9 was written after 4");
    o.moves.get_mut("b").unwrap().fence_revision = 12;
    let t = topo(&o);
    assert_eq!(serving(&t, 4), "bj");
    assert_eq!(serving(&t, 0), "gz");
    // A rolled-back move changes nothing.
    o.moves.get_mut("b").unwrap().phase = MovePhase::RolledBack;
    assert_eq!(serving(&topo(&o), 4), "gz");
}

#[test]
fn a_draining_idc_serves_its_shards_only_while_its_drain_is_fenced() {
    let t = topo(&Overrides::default());
    let (over, id, rec) = plan_drain(&t, "sh", &op()).unwrap();
    assert_eq!(rec.ranges, vec!["0-15"]);
    assert_eq!(rec.from.as_deref(), Some("sh"));
    let mut o = Overrides::default();
    o.idcs.insert("sh".into(), over);
    o.moves.insert(id.clone(), rec);
    let t = topo(&o);
    assert_eq!(serving(&t, 0), "sh", "still the owner during the fence");
    assert!(t.is_fenced(Shard(0)) && !t.is_fenced(Shard(16)));
    // Exactly one serving IDC per shard at every phase.
    assert_eq!(t.shards_served().iter().sum::<u32>(), 64);

    o.moves.get_mut(&id).unwrap().phase = MovePhase::Applied;
    let t = topo(&o);
    assert_ne!(serving(&t, 0), "sh", "gone to the next in the order");
    assert_ne!(serving(&t, 0), "-");
    assert_eq!(t.shards_served()[0], 0);
    assert!(t.fenced().is_empty());

    // Draining with no record at all: serves nothing.
    let mut bare = Overrides::default();
    bare.idcs
        .insert("sh".into(), op().idc_override(IdcState::Draining));
    assert_eq!(topo(&bare).shards_served()[0], 0);
}

#[test]
fn operator_refusals() {
    let t = topo(&Overrides::default());
    let view = HealthView::new();
    // Ranges and names.
    assert!(matches!(
        plan_move(&t, "60-70", "bj", &view, &op()),
        Err(Refused::Invalid(_))
    ));
    assert!(matches!(
        plan_move(&t, "0-3", "nowhere", &view, &op()),
        Err(Refused::Invalid(_))
    ));
    // An unhealthy target.
    let sick: HealthView = [("bj".to_owned(), false)].into();
    assert!(matches!(
        plan_move(&t, "0-3", "bj", &sick, &op()),
        Err(Refused::Conflict(e)) if e.contains("not healthy")
    ));
    // A target that is not active.
    let mut o = Overrides::default();
    o.idcs
        .insert("gz".into(), op().idc_override(IdcState::Down));
    let t = topo(&o);
    assert!(matches!(
        plan_move(&t, "0-3", "gz", &view, &op()),
        Err(Refused::Conflict(e)) if e.contains("down")
    ));
    assert!(matches!(
        plan_drain(&t, "gz", &op()),
        Err(Refused::Conflict(e)) if e.contains("not active")
    ));
    // An open move touching the same shards.
    let (id, rec) = plan_move(&t, "0-3", "bj", &view, &op()).unwrap();
    assert_eq!(rec.from.as_deref(), Some("sh"));
    o.moves.insert(id, rec);
    let t = topo(&o);
    assert!(matches!(
        plan_move(&t, "3-4", "bj", &view, &op()),
        Err(Refused::Conflict(e)) if e.contains("still moving")
    ));
    assert!(plan_move(&t, "4-5", "bj", &view, &op()).is_ok());
    assert!(matches!(
        plan_drain(&t, "sh", &op()),
        Err(Refused::Conflict(_))
    ));
    // The last active IDC.
    let mut o = Overrides::default();
    o.idcs
        .insert("gz".into(), op().idc_override(IdcState::Down));
    o.idcs
        .insert("bj".into(), op().idc_override(IdcState::Down));
    let t = topo(&o);
    assert!(matches!(
        plan_drain(&t, "sh", &op()),
        Err(Refused::Conflict(e)) if e.contains("last active")
    ));
    assert!(plan_failover(&t, "sh", false, &op()).is_err());
    assert!(
        plan_failover(&t, "gz", false, &op()).is_err(),
        "down already"
    );
    // Restore: warming from step 0 with the given warm-up; 0 is one step.
    let w = plan_restore(&t, "gz", Some(Duration::from_secs(30)), &op()).unwrap();
    assert_eq!(
        (w.state, w.warmup_s, w.warmup_step, w.warmup_steps()),
        (IdcState::Warming, Some(30), Some(0), 10)
    );
    let w = plan_restore(&t, "gz", Some(Duration::ZERO), &op()).unwrap();
    assert_eq!((w.state, w.warmup_steps()), (IdcState::Warming, 1));
    assert!(
        plan_restore(&t, "sh", None, &op()).is_err(),
        "active already"
    );
}

#[test]
fn finishing_a_drain_rolls_back_its_override_and_majority_views() {
    let t = topo(&Overrides::default());
    let (over, id, rec) = plan_drain(&t, "sh", &op()).unwrap();
    let mut o = Overrides::default();
    o.idcs.insert("sh".into(), over);
    o.moves.insert(id.clone(), rec.clone());
    let mut applied = o.clone();
    assert!(finish(&mut applied, &id, &Step::Apply, 5));
    assert_eq!(applied.moves[&id].phase, MovePhase::Applied);
    assert!(
        applied.idcs.contains_key("sh"),
        "an applied drain keeps draining"
    );
    assert!(!finish(&mut applied, &id, &Step::Apply, 6), "once only");
    assert!(finish(&mut o, &id, &Step::RollBack("x".into()), 5));
    assert_eq!(o.moves[&id].phase, MovePhase::RolledBack);
    assert_eq!(o.moves[&id].note, "x");
    assert_eq!(
        o.idcs["sh"].state,
        IdcState::Active,
        "rolling back a drain ends it (an active override: never removed)"
    );

    let a: HealthView = [("sh".to_owned(), true), ("bj".to_owned(), false)].into();
    let b: HealthView = [("sh".to_owned(), false), ("bj".to_owned(), false)].into();
    let c: HealthView = [("sh".to_owned(), true)].into();
    let m = majority_view([&a, &b, &c]);
    assert!(m["sh"]);
    assert!(!m["bj"]);
    let tie = majority_view([&a, &b]);
    assert!(!tie["sh"], "a tie is no majority");
    assert!(target_can_serve(&t, &rec, &m));
}

proptest::proptest! {
    /// Whatever the records and states, every shard has exactly one serving IDC while some IDC
    /// is active, that IDC can serve it, and the fence is exactly the open records' shards.
    #[test]
    fn every_shard_keeps_one_owner_that_can_serve(
        records in proptest::collection::vec(
            (0u32..64, 0u32..16, 0usize..3, 0u8..3, proptest::bool::ANY),
            0..6,
        ),
        states in proptest::collection::vec(0u8..4, 3),
    ) {
        let names = ["sh", "bj", "gz"];
        let mut o = Overrides::default();
        for (i, s) in states.iter().enumerate() {
            let state = [IdcState::Active, IdcState::Down, IdcState::Draining, IdcState::Warming][*s as usize];
            if state != IdcState::Active {
                o.idcs.insert(names[i].into(), op().idc_override(state));
            }
        }
        // At least one active IDC.
        o.idcs.remove("bj");
        let mut fenced = ShardSet::new(64);
        for (n, (start, len, idc, phase, drain)) in records.into_iter().enumerate() {
            let end = (start + len).min(63);
            let mut r = if drain {
                record(MoveKind::Drain, &[&format!("{start}-{end}")], Some(names[idc]), None)
            } else {
                record(MoveKind::Move, &[&format!("{start}-{end}")], None, Some(names[idc]))
            };
            r.phase = [MovePhase::Fencing, MovePhase::Applied, MovePhase::RolledBack][phase as usize];
            r.fence_revision = n as u64;
            if r.phase == MovePhase::Fencing {
                fenced.insert_range((start, end));
            }
            o.moves.insert(format!("r{n}"), r);
        }
        let t = topo(&o);
        proptest::prop_assert_eq!(t.shards_served().iter().sum::<u32>(), 64);
        for s in 0..64 {
            let idc = t.serving(Shard(s)).unwrap();
            let state = t.idc(idc).state;
            proptest::prop_assert!(state != IdcState::Down, "shard {} on a down IDC", s);
            if state == IdcState::Draining {
                proptest::prop_assert!(t.is_fenced(Shard(s)), "a draining IDC serves only fenced shards");
            }
            proptest::prop_assert_eq!(t.is_fenced(Shard(s)), fenced.contains(s));
        }
    }
}
