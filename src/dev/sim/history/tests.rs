//! Synthetic histories that do and do not break each rule of the checker.

use super::*;

const MS: u64 = 1_000_000;

fn write(idc: &str, shard: u32, start_ms: u64, end_ms: u64, epoch: u64) -> Entry {
    Entry {
        shard,
        idc: idc.into(),
        set: "core".into(),
        method: "POST".into(),
        request_id: format!("{idc}-{start_ms}"),
        owner_epoch: None,
        epoch: Some(epoch),
        status: 200,
        start_ns: start_ms * MS,
        end_ns: end_ms * MS,
    }
}

fn read(idc: &str, shard: u32, start_ms: u64, end_ms: u64) -> Entry {
    Entry {
        method: "GET".into(),
        ..write(idc, shard, start_ms, end_ms, 1)
    }
}

fn owner_epoch(mut e: Entry, owner_epoch: u64) -> Entry {
    e.owner_epoch = Some(owner_epoch);
    e
}

fn event(record: &str, phase: Phase, at_ms: u64, revision: u64, shards: &[u32]) -> OwnershipEvent {
    OwnershipEvent {
        at_ns: at_ms * MS,
        record: record.into(),
        kind: "move".into(),
        phase,
        revision,
        shards: shards.iter().copied().collect(),
        from: Some("sh".into()),
        to: Some("bj".into()),
    }
}

/// A move of shard 1 from sh to bj: fenced at 100 ms (rev 10), acked at 200 ms, applied at
/// 500 ms (rev 12).
fn move_events() -> Vec<OwnershipEvent> {
    vec![
        event("m1", Phase::Fenced, 100, 10, &[1]),
        event("m1", Phase::Acked, 200, 10, &[1]),
        event("m1", Phase::Applied, 500, 12, &[1]),
    ]
}

fn history(entries: Vec<Entry>, events: Vec<OwnershipEvent>) -> History {
    History {
        entries,
        events,
        ..History::default()
    }
}

#[test]
fn a_clean_move_has_no_violation() {
    let h = history(
        vec![
            write("sh", 1, 0, 50, 5),
            read("sh", 1, 250, 260),
            write("bj", 1, 520, 530, 12),
            write("bj", 1, 600, 610, 13),
            // Another shard, in another IDC, at the same time: not a conflict.
            write("gz", 2, 520, 530, 12),
        ],
        move_events(),
    );
    let r = check(&h);
    assert_eq!(r.violations, vec![], "{r}");
    assert_eq!((r.writes, r.reads), (4, 1));
}

#[test]
fn overlapping_writes_in_two_idcs_break_rule_a() {
    let h = history(
        vec![write("sh", 7, 0, 100, 5), write("bj", 7, 90, 120, 5)],
        vec![],
    );
    let r = check(&h);
    assert_eq!(r.count(Rule::Overlap), 1, "{r}");
    assert_eq!(r.violations[0].entries.len(), 2);
    assert_eq!(r.violations[0].shard, 7);
}

#[test]
fn touching_or_same_idc_writes_do_not_overlap() {
    let h = history(
        vec![
            write("sh", 7, 0, 100, 5),
            write("bj", 7, 100, 120, 5),
            write("bj", 7, 110, 130, 5),
        ],
        vec![],
    );
    assert_eq!(check(&h).violations, vec![]);
}

#[test]
fn a_stale_write_during_the_fence_window_breaks_rule_b() {
    // A gateway cut from etcd still routes by revision 5 while every live gateway acked.
    let h = history(vec![write("sh", 1, 300, 310, 5)], move_events());
    let r = check(&h);
    assert_eq!(r.count(Rule::InFence), 1, "{r}");
}

#[test]
fn a_write_in_flight_at_the_ack_breaks_rule_b() {
    // Admitted before the fence, still at the old owner when every gateway acked.
    let h = history(vec![write("sh", 1, 90, 210, 9)], move_events());
    assert_eq!(check(&h).count(Rule::InFence), 1);
}

#[test]
fn a_write_before_the_ack_is_fine() {
    // Before every gateway acknowledged, the old owner still legitimately takes writes.
    let h = history(vec![write("sh", 1, 120, 190, 9)], move_events());
    assert_eq!(check(&h).violations, vec![]);
}

#[test]
fn a_write_routed_by_the_applied_snapshot_is_not_in_the_window() {
    // That gateway saw the commit a moment before the test's own watch did.
    let h = history(vec![write("bj", 1, 495, 505, 12)], move_events());
    assert_eq!(check(&h).violations, vec![]);
}

#[test]
fn a_write_at_the_old_owner_after_the_commit_breaks_rule_b() {
    let h = history(
        vec![write("sh", 1, 0, 10, 5), write("sh", 1, 900, 910, 5)],
        move_events(),
    );
    let r = check(&h);
    assert_eq!(r.count(Rule::OldOwner), 1, "{r}");
    assert_eq!(r.violations[0].entries[0].start_ns, 900 * MS);
}

#[test]
fn the_old_owner_is_inferred_when_the_record_does_not_name_it() {
    let mut events = move_events();
    for e in &mut events {
        e.from = None;
        e.kind = "warmup".into();
    }
    let h = history(
        vec![write("gz", 1, 0, 10, 5), write("gz", 1, 900, 910, 5)],
        events,
    );
    assert_eq!(check(&h).count(Rule::OldOwner), 1);
}

#[test]
fn the_old_owner_may_write_again_after_a_later_change() {
    let mut events = move_events();
    events.push(OwnershipEvent {
        from: Some("bj".into()),
        to: Some("sh".into()),
        ..event("m2", Phase::Fenced, 800, 20, &[1])
    });
    events.push(OwnershipEvent {
        from: Some("bj".into()),
        to: Some("sh".into()),
        ..event("m2", Phase::Applied, 850, 21, &[1])
    });
    let h = history(vec![write("sh", 1, 900, 910, 21)], events);
    assert_eq!(check(&h).violations, vec![], "{}", check(&h));
}

#[test]
fn a_rolled_back_fence_checks_nothing() {
    let events = vec![
        event("m1", Phase::Fenced, 100, 10, &[1]),
        event("m1", Phase::RolledBack, 500, 12, &[1]),
    ];
    let h = history(vec![write("sh", 1, 900, 910, 12)], events);
    assert_eq!(check(&h).violations, vec![]);
}

#[test]
fn an_older_owner_epoch_after_a_newer_one_breaks_rule_c() {
    let h = history(
        vec![
            owner_epoch(write("bj", 3, 0, 10, 12), 12),
            owner_epoch(write("sh", 3, 20, 30, 5), 4),
        ],
        vec![],
    );
    let r = check(&h);
    assert_eq!(r.count(Rule::StaleOwnerEpoch), 1, "{r}");
    assert_eq!(r.violations[0].entries[0].owner_epoch, Some(12));
}

#[test]
fn owner_epochs_that_only_grow_or_overlap_are_fine() {
    let h = history(
        vec![
            owner_epoch(write("sh", 3, 0, 10, 5), 4),
            owner_epoch(write("sh", 3, 5, 15, 5), 4),
            // Started before the epoch-12 write ended: not ordered after it.
            owner_epoch(write("bj", 3, 20, 30, 12), 12),
            owner_epoch(write("bj", 3, 31, 40, 13), 12),
        ],
        vec![],
    );
    let mut concurrent = owner_epoch(write("bj", 3, 25, 35, 12), 4);
    concurrent.idc = "bj".into();
    let mut h2 = h.clone();
    h2.entries.push(concurrent);
    assert_eq!(check(&h).violations, vec![]);
    assert_eq!(check(&h2).count(Rule::StaleOwnerEpoch), 0);
}

#[test]
fn refused_writes_are_not_applied() {
    let mut refused = owner_epoch(write("sh", 3, 20, 30, 5), 4);
    refused.status = 421;
    let h = history(
        vec![
            owner_epoch(write("bj", 3, 0, 40, 12), 12),
            refused,
            write("sh", 1, 900, 910, 5),
        ],
        vec![],
    );
    let r = check(&h);
    assert_eq!(r.violations, vec![], "{r}");
    assert_eq!((r.writes, r.refused_by_backend), (2, 1));
}

#[test]
fn the_report_counts_fenced_writes_and_unavailability() {
    let outcome = |shard, status, reason: Option<&str>, start_ms: u64| ClientOutcome {
        shard,
        write: true,
        status,
        reason: reason.map(str::to_owned),
        start_ns: start_ms * MS,
        end_ns: (start_ms + 10) * MS,
    };
    let h = History {
        outcomes: vec![
            outcome(1, 200, None, 0),
            outcome(1, 503, Some("fenced"), 100),
            outcome(1, 503, Some("fenced"), 300),
            outcome(1, 200, None, 590),
            outcome(1, 0, None, 700),
            outcome(1, 200, None, 800),
            // Shard 2 never moved: not in the unavailability list.
            outcome(2, 503, Some("set_full"), 100),
        ],
        events: move_events(),
        ..History::default()
    };
    let r = check(&h);
    assert_eq!((r.fenced_writes, r.failed_writes), (2, 2));
    let s = r.unavailable_s.get(&1).copied().unwrap_or_default();
    // 100 → 600 ms, then 700 → 810 ms.
    assert!((s - 0.61).abs() < 1e-9, "{s}");
    assert!(!r.unavailable_s.contains_key(&2));
    assert!(r.to_string().contains("refused as fenced 2"));
}

#[test]
fn unavailability_counts_concurrent_failures_once() {
    let outcome = |status, start_ms: u64, end_ms: u64| ClientOutcome {
        shard: 1,
        write: true,
        status,
        reason: None,
        start_ns: start_ms * MS,
        end_ns: end_ms * MS,
    };
    // Two clients: A fails at 100 and 110, B succeeds at 105-165 and 170-230.
    let h = History {
        outcomes: vec![
            outcome(503, 100, 101),
            outcome(200, 105, 165),
            outcome(503, 110, 111),
            outcome(200, 170, 230),
        ],
        events: move_events(),
        ..History::default()
    };
    let s = check(&h).unavailable_s[&1];
    // [100, 165] ∪ [110, 230] = 130 ms.
    assert!((s - 0.13).abs() < 1e-9, "{s}");
}

#[test]
fn a_later_change_seen_late_by_the_watch_does_not_make_an_old_owner_write() {
    // A gateway saw the move back to sh (fenced at rev 20, applied at rev 21) a moment before
    // the test's watch did, and wrote sh by revision 21.
    let mut events = move_events();
    events.push(OwnershipEvent {
        from: Some("bj".into()),
        to: Some("sh".into()),
        ..event("m2", Phase::Fenced, 800, 20, &[1])
    });
    events.push(OwnershipEvent {
        from: Some("bj".into()),
        to: Some("sh".into()),
        ..event("m2", Phase::Applied, 850, 21, &[1])
    });
    let h = history(vec![write("sh", 1, 795, 805, 21)], events);
    assert_eq!(check(&h).violations, vec![], "{}", check(&h));
    // The same write by the old snapshot is still one.
    let h = history(vec![write("sh", 1, 795, 805, 5)], h.events);
    assert_eq!(check(&h).count(Rule::OldOwner), 1);
}
