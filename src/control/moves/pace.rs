//! What a move driver (the etcd leader, or the file-mode gateway) measures on its own monotonic
//! clock: how long each open record has been fencing and acknowledged ([`FenceClocks`]), and
//! when a warming IDC's next step is due ([`WarmupPacer`]). Wall clocks are never compared:
//! an operator's laptop, the leader and each gateway may disagree by seconds.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::{new_id, FenceFacts, Operator};
use crate::control::topology::overrides::{MoveKind, MoveRecord};
use crate::control::topology::{warmup_step_of, IdcOverride, IdcState, Shard, ShardSet, Topology};

#[derive(Debug, Clone, Copy)]
struct Clock {
    first_seen: Instant,
    acked_since: Option<Instant>,
}

/// Per open record: since when this driver has seen it fencing, and since when every live
/// gateway has acknowledged it (the hold counts from the last acknowledgement).
#[derive(Debug, Default)]
pub struct FenceClocks {
    clocks: HashMap<String, Clock>,
}

impl FenceClocks {
    pub fn new() -> FenceClocks {
        FenceClocks::default()
    }

    /// The facts about record `id` at `now`, `acked` meaning every live gateway acknowledges
    /// its fence now. An acknowledgement that is lost again (a new gateway registered behind
    /// it) restarts the hold.
    pub fn facts(
        &mut self,
        id: &str,
        acked: bool,
        now: Instant,
        unseen_writer: bool,
        target_can_serve: bool,
    ) -> FenceFacts {
        let clock = self.clocks.entry(id.to_owned()).or_insert(Clock {
            first_seen: now,
            acked_since: None,
        });
        clock.acked_since = match (acked, clock.acked_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
        FenceFacts {
            fencing_for: now.saturating_duration_since(clock.first_seen),
            acked_for: clock
                .acked_since
                .map(|since| now.saturating_duration_since(since)),
            unseen_writer,
            target_can_serve,
        }
    }

    /// Forgets records that are not open any more.
    pub fn retain(&mut self, open: &[&str]) {
        self.clocks.retain(|id, _| open.contains(&id.as_str()));
    }
}

/// Per warming IDC: the step it was at when this driver last saw it change, and since when.
#[derive(Debug, Default)]
pub struct WarmupPacer {
    seen: BTreeMap<String, (u32, Instant)>,
}

impl WarmupPacer {
    pub fn new() -> WarmupPacer {
        WarmupPacer::default()
    }

    /// The next warm-up record due for the warming IDCs of `t`, at most one per IDC: when the
    /// IDC's previous step came home at least `interval − hold` ago (so that, with the fence
    /// held for `hold`, steps land one `interval` apart), and no open record is in its way.
    pub fn due(&mut self, t: &Topology, now: Instant, op: &Operator) -> Vec<(String, MoveRecord)> {
        let warming: Vec<(&str, &IdcOverride)> = t
            .idcs
            .iter()
            .filter(|i| i.state == IdcState::Warming)
            .filter_map(|i| Some((i.name.as_str(), t.overrides.idcs.get(i.name.as_str())?)))
            .collect();
        self.seen
            .retain(|idc, _| warming.iter().any(|(w, _)| w == idc));
        let mut due = Vec::new();
        for (idc, o) in warming {
            let done = o.steps_done();
            let since = match self.seen.get(idc) {
                Some((step, since)) if *step == done => *since,
                _ => {
                    self.seen.insert(idc.to_owned(), (done, now));
                    now
                }
            };
            if o.warmed_up() || open_for(t, idc) {
                continue;
            }
            let warmup = o.warmup_s.map_or(t.failover.warmup, Duration::from_secs);
            let interval = warmup / o.warmup_steps();
            // The first step is not delayed: the IDC was judged ready when it was restored.
            let wait = if done == 0 {
                Duration::ZERO
            } else {
                interval.saturating_sub(t.failover.fence)
            };
            if now.saturating_duration_since(since) < wait {
                continue;
            }
            if let Some(record) = step_record(t, idc, o, op) {
                due.push(record);
            }
        }
        due
    }
}

/// Whether an open record brings shards to `idc` or takes them from it: the next step waits.
fn open_for(t: &Topology, idc: &str) -> bool {
    t.overrides.moves.values().any(|r| {
        r.phase.is_open() && (r.to.as_deref() == Some(idc) || r.from.as_deref() == Some(idc))
    })
}

/// The record that fences the next step of `idc`'s warm-up: its home shards of that step,
/// served elsewhere until the step is applied.
fn step_record(
    t: &Topology,
    idc: &str,
    o: &IdcOverride,
    op: &Operator,
) -> Option<(String, MoveRecord)> {
    let id = t.idc_by_name(idc)?;
    let steps = o.warmup_steps();
    let step = o.steps_done() + 1;
    let mut shards = ShardSet::new(t.shard_count);
    for s in 0..t.shard_count {
        if t.home(Shard(s)) == id && warmup_step_of(Shard(s), steps) == step {
            shards.insert(s);
        }
    }
    let mut record = op.record(MoveKind::Warmup, &shards, None, Some(idc.to_owned()));
    record.step = Some(step);
    record.note = format!("warm-up step {step} of {steps}");
    let id = format!("{}-{step}", new_id(MoveKind::Warmup, idc, op.now_ms));
    Some((id, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_counts_from_the_last_acknowledgement() {
        let mut c = FenceClocks::new();
        let t0 = Instant::now();
        let f = c.facts("m", false, t0, false, true);
        assert_eq!(f.acked_for, None);
        let f = c.facts("m", true, t0 + Duration::from_secs(1), false, true);
        assert_eq!(f.acked_for, Some(Duration::ZERO));
        assert_eq!(f.fencing_for, Duration::from_secs(1));
        let f = c.facts("m", true, t0 + Duration::from_secs(3), false, true);
        assert_eq!(f.acked_for, Some(Duration::from_secs(2)));
        // A gateway registered behind the fence: the hold starts again once it acknowledges.
        let f = c.facts("m", false, t0 + Duration::from_secs(4), false, true);
        assert_eq!(f.acked_for, None);
        let f = c.facts("m", true, t0 + Duration::from_secs(5), false, true);
        assert_eq!(f.acked_for, Some(Duration::ZERO));
        assert_eq!(f.fencing_for, Duration::from_secs(5));
        c.retain(&[]);
        let f = c.facts("m", true, t0 + Duration::from_secs(6), false, true);
        assert_eq!(
            f.fencing_for,
            Duration::ZERO,
            "a forgotten record starts over"
        );
    }
}
