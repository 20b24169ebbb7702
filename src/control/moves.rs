//! Operator IDC control and planned, fenced moves (DESIGN.md §5, §7): checks of a new `drain`,
//! `failover`, `restore` or `move` against the live snapshot, and the pure phase function that
//! every driver of a `fencing` record (the file-mode gateway, the etcd leader) follows.
//!
//! - [`driver`]: the file-mode driver, a task of the single gateway.
//! - [`pace`]: the drivers' monotonic fence clocks and warm-up pacing.
//! - The etcd writes of the operator commands are [`crate::operator::cluster::writes`].

pub mod driver;
pub mod pace;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::control::topology::moves::record_shards;
use crate::control::topology::overrides::{unix_now, MoveKind, MovePhase, MoveRecord};
use crate::control::topology::{IdcOverride, IdcState, Overrides, ShardSet, Topology};
// `admin.rs` still reads the clock through this path.
pub use crate::util::unix_now_ms;

/// A `fencing` record older than `fence_ms` plus this is rolled back: a fence must not hold
/// writes hostage to a gateway that never acknowledges it, or to a driver that went away.
pub const FENCE_GRACE: Duration = Duration::from_secs(30);

/// IDC name → healthy, as the caller sees the cluster. An IDC missing from it counts as
/// healthy: nobody has said otherwise.
pub type HealthView = BTreeMap<String, bool>;

/// What the driver of a `fencing` record should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Wait,
    Apply,
    RollBack(String),
}

/// What the driver of a `fencing` record knows of it, measured on the driver's own monotonic
/// clock (never on wall clocks: the operator's, the leader's and each gateway's may disagree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceFacts {
    /// How long this driver has seen the record fencing.
    pub fencing_for: Duration,
    /// How long every live gateway has acknowledged the fence (`None`: not every one yet).
    /// A gateway acknowledges only once no write it admitted before the fence is in flight.
    pub acked_for: Option<Duration>,
    /// A gateway this driver cannot see may still be writing: a registration vanished less
    /// than the lease TTL plus the hold ago, or this driver took over less than that ago.
    pub unseen_writer: bool,
    /// The record's shards have somewhere to go now (see `target_can_serve`).
    pub target_can_serve: bool,
}

/// What the driver of a `fencing` record should do now: wait until every live gateway has
/// acknowledged the fence, then hold it for `hold` (replication catch-up: `fence_ms`) with no
/// gateway unaccounted for, then apply; or roll back when the target cannot serve at that
/// moment, or when the record has been fencing for longer than `hold + FENCE_GRACE`. A
/// `failover` record is never rolled back: its IDC is down already, and lifting the fence
/// early would let the new owner take writes while the old one may still get some; it
/// applies once acknowledged and held, whatever the target. Records in any other phase are
/// done: `Wait`.
pub fn next_step(record: &MoveRecord, facts: &FenceFacts, hold: Duration) -> Step {
    if record.phase != MovePhase::Fencing {
        return Step::Wait;
    }
    let failover = record.kind == MoveKind::Failover;
    if !failover && facts.fencing_for >= hold + FENCE_GRACE {
        let why = if facts.acked_for.is_some() {
            "no driver completed it in time"
        } else {
            "not every live gateway acknowledged the fence"
        };
        return Step::RollBack(format!(
            "still fencing after {} ms (fence_ms {} + 30 s): {why}",
            facts.fencing_for.as_millis(),
            hold.as_millis()
        ));
    }
    let held = facts.acked_for.is_some_and(|a| a >= hold);
    if !held || facts.unseen_writer {
        return Step::Wait;
    }
    if !failover && !facts.target_can_serve {
        let target = match (record.kind, &record.to) {
            (MoveKind::Move, Some(to)) => format!("the target IDC {to} is not active and healthy"),
            (MoveKind::Warmup, Some(to)) => format!("the warming IDC {to} is not healthy"),
            _ => "no other IDC is active and healthy to take the shards".to_owned(),
        };
        return Step::RollBack(format!("{target} when the fence ended"));
    }
    Step::Apply
}

/// Why an operator command was not accepted. Both end the command with exit 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The request itself is wrong (unknown IDC, bad range): 422 on the admin API.
    #[error("{0}")]
    Invalid(String),
    /// The cluster's state does not allow it now: 409 on the admin API.
    #[error("{0}")]
    Conflict(String),
}

/// Who asks and why (`--by`, `--reason`), and when.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    pub reason: String,
    pub by: String,
    /// Unix milliseconds.
    pub now_ms: u64,
}

impl Operator {
    pub fn now(reason: &str, by: &str) -> Operator {
        Operator {
            reason: reason.to_owned(),
            by: by.to_owned(),
            now_ms: unix_now_ms(),
        }
    }

    fn idc_override(&self, state: IdcState) -> IdcOverride {
        IdcOverride {
            state,
            reason: self.reason.clone(),
            by: self.by.clone(),
            at: self.now_ms / 1000,
            expires_at: None,
            at_ms: self.now_ms,
            warmup_s: None,
            warmup_step: None,
        }
    }

    /// A new `fencing` record of `kind` over `shards`, written by this operator now.
    fn record(
        &self,
        kind: MoveKind,
        shards: &ShardSet,
        from: Option<String>,
        to: Option<String>,
    ) -> MoveRecord {
        MoveRecord {
            kind,
            ranges: shards.ranges(),
            from,
            to,
            phase: MovePhase::Fencing,
            fence_revision: 0,
            fenced_at_ms: self.now_ms,
            reason: self.reason.clone(),
            by: self.by.clone(),
            at: self.now_ms / 1000,
            finished_at: None,
            note: String::new(),
            step: None,
        }
    }
}

fn known_idc(t: &Topology, idc: &str) -> Result<IdcState, Refused> {
    t.idc_by_name(idc).map(|i| t.idc(i).state).ok_or_else(|| {
        let names: Vec<&str> = t.idcs.iter().map(|i| i.name.as_str()).collect();
        Refused::Invalid(format!(
            "unknown IDC `{idc}` (this topology has {})",
            names.join(", ")
        ))
    })
}

fn healthy(view: &HealthView, idc: &str) -> bool {
    view.get(idc).copied().unwrap_or(true)
}

/// Refuses when an open (`fencing`) record already fences one of `shards`.
fn check_no_open_move(t: &Topology, shards: &ShardSet, what: &str) -> Result<(), Refused> {
    for (id, record) in &t.overrides.moves {
        if !record.phase.is_open() {
            continue;
        }
        let Ok(theirs) = record_shards(record, t.shard_count) else {
            continue;
        };
        if theirs.intersects(shards) {
            return Err(Refused::Conflict(format!(
                "{what} touches shards that move/{id} ({} {}) is still moving (phase fencing); wait for it to finish",
                record.kind.as_str(),
                shown(&record.ranges)
            )));
        }
    }
    Ok(())
}

/// A record's ranges for a message: the first few, then how many more.
fn shown(ranges: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut s = ranges
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    if ranges.len() > SHOWN {
        s.push_str(&format!(",… ({} ranges)", ranges.len()));
    }
    s
}

/// A new record's id: kind, IDC and the time, so `status` sorts and reads well.
pub fn new_id(kind: MoveKind, idc: &str, now_ms: u64) -> String {
    format!("{}-{idc}-{now_ms}", kind.as_str())
}

/// `move RANGE --to IDC`: the range parses, the target is active and healthy, and no open
/// move touches the same shards. The record starts in phase `fencing` (fence revision 0: the
/// writer fills it in).
pub fn plan_move(
    t: &Topology,
    range: &str,
    to: &str,
    view: &HealthView,
    op: &Operator,
) -> Result<(String, MoveRecord), Refused> {
    let (a, b) = crate::control::topology::parse_range(range, t.shard_count)
        .map_err(|e| Refused::Invalid(format!("range {e}")))?;
    let state = known_idc(t, to)?;
    if state != IdcState::Active {
        return Err(Refused::Conflict(format!(
            "IDC {to} is {state}, not active: a move needs an active target"
        )));
    }
    if !healthy(view, to) {
        return Err(Refused::Conflict(format!(
            "IDC {to} is not healthy (its core pool has too few healthy backends): a move needs a healthy target"
        )));
    }
    let mut shards = ShardSet::new(t.shard_count);
    shards.insert_range((a, b));
    check_no_open_move(t, &shards, &format!("move {range}"))?;
    // The shards' owner now, when they have one: shown as the move's `from`.
    let mut owners = (a..=b).map(|s| t.serving(crate::control::topology::Shard(s)));
    let first = owners.next().flatten();
    let from = first
        .filter(|f| owners.all(|o| o == Some(*f)))
        .map(|f| t.idc(f).name.to_string());
    let record = op.record(MoveKind::Move, &shards, from, Some(to.to_owned()));
    Ok((new_id(MoveKind::Move, to, op.now_ms), record))
}

/// `drain IDC`: it must be active, not the last active IDC, and none of its shards may be in
/// an open move. Gives the `draining` override and the `drain` record (its ranges: the shards
/// it serves now), to be written together.
pub fn plan_drain(
    t: &Topology,
    idc: &str,
    op: &Operator,
) -> Result<(IdcOverride, String, MoveRecord), Refused> {
    let state = known_idc(t, idc)?;
    if state != IdcState::Active {
        return Err(Refused::Conflict(format!(
            "IDC {idc} is {state}, not active: only an active IDC can be drained"
        )));
    }
    let others_active = t
        .idcs
        .iter()
        .filter(|i| i.name.as_str() != idc && i.state == IdcState::Active)
        .count();
    if others_active == 0 {
        return Err(Refused::Conflict(format!(
            "IDC {idc} is the last active IDC: draining it would leave its shards nowhere to go"
        )));
    }
    let shards = served_by(t, idc)?;
    check_no_open_move(t, &shards, &format!("drain {idc}"))?;
    let record = op.record(MoveKind::Drain, &shards, Some(idc.to_owned()), None);
    Ok((
        op.idc_override(IdcState::Draining),
        new_id(MoveKind::Drain, idc, op.now_ms),
        record,
    ))
}

/// The shards `idc` serves in `t`.
fn served_by(t: &Topology, idc: &str) -> Result<ShardSet, Refused> {
    let id = t
        .idc_by_name(idc)
        .ok_or_else(|| Refused::Invalid(idc.into()))?;
    let mut shards = ShardSet::new(t.shard_count);
    for s in 0..t.shard_count {
        if t.serving(crate::control::topology::Shard(s)) == Some(id) {
            shards.insert(s);
        }
    }
    Ok(shards)
}

/// Whether an IDC other than `idc` is active or warming: someone can still serve.
pub fn another_can_serve(t: &Topology, idc: &str) -> bool {
    t.idcs
        .iter()
        .any(|i| i.name.as_str() != idc && matches!(i.state, IdcState::Active | IdcState::Warming))
}

/// `failover IDC` (emergency): the `down` override, and the `failover` record that fences the
/// writes of the shards it serves now until every live gateway stopped writing to it (`None`
/// when it serves none, or with `unfenced`: `--force-unfenced`, for an IDC proven dead, the
/// one documented trade-off). Refused when it would leave no IDC that can serve, or when the
/// IDC is down already.
pub fn plan_failover(
    t: &Topology,
    idc: &str,
    unfenced: bool,
    op: &Operator,
) -> Result<(IdcOverride, Option<(String, MoveRecord)>), Refused> {
    let state = known_idc(t, idc)?;
    if state == IdcState::Down {
        return Err(Refused::Conflict(format!("IDC {idc} is down already")));
    }
    if !another_can_serve(t, idc) {
        return Err(Refused::Conflict(format!(
            "IDC {idc} is the last IDC that can serve: failing it over would leave every shard without an owner"
        )));
    }
    let record = (!unfenced)
        .then(|| failover_record(t, idc, &op.reason, &op.by, op.now_ms))
        .flatten();
    Ok((op.idc_override(IdcState::Down), record))
}

/// The `failover` record an automatic `down` decision writes with its override: it fences the
/// writes of the shards `idc` serves in `t` (`None` when it serves none).
pub fn failover_record(
    t: &Topology,
    idc: &str,
    reason: &str,
    by: &str,
    now_ms: u64,
) -> Option<(String, MoveRecord)> {
    let shards = served_by(t, idc).ok()?;
    let op = Operator {
        reason: reason.to_owned(),
        by: by.to_owned(),
        now_ms,
    };
    (!shards.is_empty()).then(|| {
        (
            new_id(MoveKind::Failover, idc, now_ms),
            op.record(MoveKind::Failover, &shards, Some(idc.to_owned()), None),
        )
    })
}

/// `restore IDC [--warmup D]`: `warming` from step 0 over `warmup` (the document's `warmup_s`
/// when `None`); `Some(0)` brings every home shard back in one fenced step. Every step is a
/// fenced move driven by the leader (or the file-mode gateway).
pub fn plan_restore(
    t: &Topology,
    idc: &str,
    warmup: Option<Duration>,
    op: &Operator,
) -> Result<IdcOverride, Refused> {
    let state = known_idc(t, idc)?;
    let overridden = t
        .overrides
        .idcs
        .get(idc)
        .is_some_and(|o| o.state != IdcState::Active);
    if state == IdcState::Active && !overridden {
        return Err(Refused::Conflict(format!(
            "IDC {idc} is active already: nothing to restore"
        )));
    }
    let mut o = op.idc_override(IdcState::Warming);
    o.warmup_s = warmup.map(|w| w.as_secs());
    o.warmup_step = Some(0);
    Ok(o)
}

/// Whether the record's shards have somewhere to go now: a move's target is active and
/// healthy; a drain has another active, healthy IDC.
pub fn target_can_serve(t: &Topology, record: &MoveRecord, view: &HealthView) -> bool {
    match record.kind {
        MoveKind::Move => record.to.as_deref().is_some_and(|to| {
            t.idc_by_name(to)
                .is_some_and(|i| t.idc(i).state == IdcState::Active && healthy(view, to))
        }),
        MoveKind::Drain => t.idcs.iter().any(|i| {
            Some(i.name.as_str()) != record.from.as_deref()
                && i.state == IdcState::Active
                && healthy(view, &i.name)
        }),
        // The IDC is down already: its shards went to whoever can serve them.
        MoveKind::Failover => true,
        MoveKind::Warmup => record.to.as_deref().is_some_and(|to| {
            t.idc_by_name(to)
                .is_some_and(|i| t.idc(i).state == IdcState::Warming && healthy(view, to))
        }),
    }
}

/// The cluster-wide view: an IDC is healthy when a majority of the gateways that report on it
/// say so (unreported IDCs are left out, and so count as healthy).
pub fn majority_view<'a>(views: impl IntoIterator<Item = &'a HealthView>) -> HealthView {
    let mut votes: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for view in views {
        for (idc, ok) in view {
            let v = votes.entry(idc.clone()).or_default();
            v.1 += 1;
            if *ok {
                v.0 += 1;
            }
        }
    }
    votes
        .into_iter()
        .map(|(idc, (yes, all))| (idc, yes * 2 > all))
        .collect()
}

/// Ends a `fencing` record in `overrides` as `step` says (applied, or rolled back with the
/// reason in its note; rolling back a drain also removes its `draining` override). Returns
/// false when the record is not there or not fencing any more.
pub fn finish(overrides: &mut Overrides, id: &str, step: &Step, now_s: u64) -> bool {
    let Some(record) = overrides.moves.get_mut(id) else {
        return false;
    };
    if record.phase != MovePhase::Fencing {
        return false;
    }
    match step {
        Step::Wait => return false,
        Step::Apply => {
            record.phase = MovePhase::Applied;
            // A warm-up step comes home with its record: the override's step moves on in the
            // same write (the same etcd transaction).
            if let (MoveKind::Warmup, Some(to), Some(step)) =
                (record.kind, record.to.clone(), record.step)
            {
                if let Some(o) = overrides.idcs.get_mut(&to) {
                    if o.state == IdcState::Warming && o.steps_done() < step {
                        o.warmup_step = Some(step);
                    }
                }
            }
        }
        Step::RollBack(why) => {
            record.phase = MovePhase::RolledBack;
            record.note = why.clone();
            if record.kind == MoveKind::Drain {
                if let Some(from) = record.from.clone() {
                    if let Some(o) = overrides
                        .idcs
                        .get_mut(&from)
                        .filter(|o| o.state == IdcState::Draining)
                    {
                        // Active again, kept as an override rather than removed: ownership keys
                        // are never deleted, so owner epochs never go backwards.
                        o.state = IdcState::Active;
                        o.reason = format!("drain rolled back: {why}");
                    }
                }
            }
        }
    }
    if let Some(record) = overrides.moves.get_mut(id) {
        record.finished_at = Some(now_s);
    }
    true
}

/// The move records as `/status` and `status --etcd` show them, oldest first.
pub fn status_json(overrides: &Overrides, now_ms: u64) -> Vec<serde_json::Value> {
    let mut records: Vec<(&String, &MoveRecord)> = overrides.moves.iter().collect();
    records.sort_by_key(|(id, r)| (r.at, r.fenced_at_ms, *id));
    records
        .into_iter()
        .map(|(id, r)| {
            serde_json::json!({
                "id": id,
                "kind": r.kind.as_str(),
                "step": r.step,
                "ranges": r.ranges,
                "from": r.from,
                "to": r.to,
                "phase": r.phase.as_str(),
                "fence_revision": r.fence_revision,
                "age_s": unix_now().saturating_sub(r.at),
                "fencing_ms": (r.phase == MovePhase::Fencing)
                    .then(|| now_ms.saturating_sub(r.fenced_at_ms)),
                "finished_at": r.finished_at,
                "reason": r.reason,
                "by": r.by,
                "note": r.note,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
