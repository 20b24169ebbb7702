//! Automatic IDC decisions (DESIGN.md §5, §6): from health seen over time, which IDCs to mark
//! `down` (reason `auto`), which to bring back `warming` (with `auto_failback`), and which
//! finished warm-ups to clear. Pure: views and time are arguments, so the rules are tested
//! without a runtime. The file-mode controller ([`controller`]) and the etcd leader
//! (`etcd::leader`) feed it and write what it decides.

pub mod controller;

use std::collections::BTreeMap;

use crate::control::topology::{FailoverSpec, IdcOverride, IdcState, Overrides};

/// The reason every automatic decision carries; any other reason is an operator's.
pub const AUTO: &str = "auto";

/// The numbers of the decision, from the document's `[failover]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub detect_ms: u64,
    pub recover_ms: u64,
    pub auto_failback: bool,
}

impl Policy {
    pub fn of(spec: &FailoverSpec) -> Policy {
        Policy {
            detect_ms: spec.detect.as_millis() as u64,
            recover_ms: spec.recover.as_millis() as u64,
            auto_failback: spec.auto_failback,
        }
    }
}

/// An unbroken run of the same verdict about one IDC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Streak {
    /// `Some(healthy)`, or `None` when the observers did not agree (no majority either way).
    healthy: Option<bool>,
    since_ms: u64,
}

/// Remembers, per IDC, since when it has been seen the way it is seen now. Any change of the
/// verdict restarts the clock: that is the hysteresis, so health that flaps faster than
/// `detect_ms` (or `recover_ms`) never moves a shard.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    streaks: BTreeMap<String, Streak>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Records what is seen of `idc` at `now_ms`: healthy, unhealthy, or no clear answer.
    pub fn observe(&mut self, idc: &str, healthy: Option<bool>, now_ms: u64) {
        match self.streaks.get_mut(idc) {
            Some(s) if s.healthy == healthy => {}
            Some(s) => {
                *s = Streak {
                    healthy,
                    since_ms: now_ms,
                }
            }
            None => {
                self.streaks.insert(
                    idc.to_owned(),
                    Streak {
                        healthy,
                        since_ms: now_ms,
                    },
                );
            }
        }
    }

    /// Records one gateway's own view (file mode): every IDC in `idcs`; one the view does not
    /// name has no verdict.
    pub fn observe_view<'a>(
        &mut self,
        idcs: impl IntoIterator<Item = &'a str>,
        view: &BTreeMap<String, bool>,
        now_ms: u64,
    ) {
        let idcs: Vec<&str> = idcs.into_iter().collect();
        self.retain(&idcs);
        for idc in idcs {
            self.observe(idc, view.get(idc).copied(), now_ms);
        }
    }

    /// Forgets IDCs that are no longer in the topology.
    pub fn retain(&mut self, idcs: &[&str]) {
        self.streaks.retain(|k, _| idcs.contains(&k.as_str()));
    }

    /// How long `idc` has been seen with verdict `healthy`, without a break; 0 otherwise.
    fn held(&self, idc: &str, healthy: bool, now_ms: u64) -> u64 {
        self.streaks
            .get(idc)
            .filter(|s| s.healthy == Some(healthy))
            .map_or(0, |s| now_ms.saturating_sub(s.since_ms))
    }

    /// The current verdict about `idc`, if any.
    pub fn verdict(&self, idc: &str) -> Option<bool> {
        self.streaks.get(idc).and_then(|s| s.healthy)
    }
}

/// The majority verdict of several gateways' views about `idc`: `Some(false)` when more than
/// half of the `live` gateways see it unhealthy, `Some(true)` when more than half see it
/// healthy, `None` otherwise (a split, or too few reporting). A gateway that alone sees an IDC
/// down therefore changes nothing.
pub fn majority<'a>(
    idc: &str,
    views: impl IntoIterator<Item = &'a BTreeMap<String, bool>>,
    live: usize,
) -> Option<bool> {
    let (mut up, mut down) = (0usize, 0usize);
    for view in views {
        match view.get(idc) {
            Some(true) => up += 1,
            Some(false) => down += 1,
            None => {}
        }
    }
    if down * 2 > live {
        Some(false)
    } else if up * 2 > live {
        Some(true)
    } else {
        None
    }
}

/// What to do with one IDC's override.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Write this override (a `down` one goes with a `failover` record fencing its shards'
    /// writes: the writer adds it, `moves::failover_record`).
    Set(IdcOverride),
    /// The IDC is `active` again (a finished warm-up): written as an `active` override, never
    /// a removal, so that the key's revision (and owner epochs) never go backwards.
    Clear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub idc: String,
    pub change: Change,
    /// In words, for the log.
    pub why: String,
}

impl Decision {
    /// The override this decision writes: a `Clear` as an `active` one, never a removal.
    pub fn value(&self, by: &str, now_ms: u64) -> IdcOverride {
        match &self.change {
            Change::Set(o) => o.clone(),
            Change::Clear => active_again(by, &self.why, now_ms),
        }
    }

    /// With a `down`, the `failover` record that fences the writes of the shards the IDC serves
    /// in `t` (`moves::failover_record`), written together with the override.
    pub fn fence(
        &self,
        t: &crate::control::topology::Topology,
        by: &str,
        now_ms: u64,
    ) -> Option<(String, crate::control::topology::overrides::MoveRecord)> {
        match &self.change {
            Change::Set(o) if o.state == IdcState::Down => {
                crate::control::moves::failover_record(t, &self.idc, &o.reason, by, now_ms)
            }
            _ => None,
        }
    }
}

/// The automatic decisions for `idcs` at `now_ms` (unix ms), given the overrides in force and
/// what `tracker` has seen. Rules:
/// - active (no override, or an `active` one) or auto-`warming`, seen unhealthy for
///   `detect_ms` → `down`, reason `auto` — unless no other IDC could serve then: the last IDC
///   that can serve is never marked down (its shards would have no owner at all);
/// - auto-`down`, seen healthy for `recover_ms`, with `auto_failback` → `warming`, reason
///   `auto`, from step 0;
/// - a `down` override past its `expires_at` → `warming` from step 0 (reason `expired`): its
///   shards come home through fenced steps, never by a gateway's clock;
/// - any `warming` whose every step has come home → active;
/// - nothing else: an operator's `down`, `draining` or unfinished `warming` is theirs.
pub fn decide<'a>(
    idcs: impl IntoIterator<Item = &'a str>,
    overrides: &Overrides,
    tracker: &Tracker,
    policy: &Policy,
    by: &str,
    now_ms: u64,
) -> Vec<Decision> {
    let now_s = now_ms / 1000;
    let auto = |state: IdcState, reason: &str| IdcOverride {
        state,
        reason: reason.to_owned(),
        by: by.to_owned(),
        at: now_s,
        expires_at: None,
        at_ms: now_ms,
        warmup_s: None,
        warmup_step: (state == IdcState::Warming).then_some(0),
    };
    let idcs: Vec<&str> = idcs.into_iter().collect();
    let state_of = |idc: &str| {
        overrides
            .idc_state(idc)
            .map_or(IdcState::Active, |o| o.state)
    };
    // IDCs that can serve (active or warming), as the decisions below leave them.
    let mut serving = idcs
        .iter()
        .filter(|i| matches!(state_of(i), IdcState::Active | IdcState::Warming))
        .count();
    let mut out = Vec::new();
    for idc in idcs {
        let current = overrides.idc_state(idc);
        let unhealthy_for = tracker.held(idc, false, now_ms);
        let healthy_for = tracker.held(idc, true, now_ms);
        let state = state_of(idc);
        let is_auto = current.is_some_and(|o| o.reason == AUTO);
        let mut down = |why: String, out: &mut Vec<Decision>| {
            if serving <= 1 {
                tracing::warn!(idc, why = %why, "not marking the last IDC that can serve down");
                return;
            }
            serving -= 1;
            out.push(Decision {
                idc: idc.to_owned(),
                change: Change::Set(auto(IdcState::Down, AUTO)),
                why,
            });
        };
        match (state, current) {
            (IdcState::Active, _) if unhealthy_for >= policy.detect_ms => {
                down(format!("seen unhealthy for {unhealthy_for} ms"), &mut out);
            }
            (IdcState::Warming, Some(o)) => {
                if o.warmed_up() {
                    out.push(Decision {
                        idc: idc.to_owned(),
                        change: Change::Clear,
                        why: "every warm-up step is home".to_owned(),
                    });
                } else if is_auto && unhealthy_for >= policy.detect_ms {
                    down(
                        format!("seen unhealthy for {unhealthy_for} ms while warming"),
                        &mut out,
                    );
                }
            }
            (IdcState::Down, _) if overrides.expired(idc, now_s) => {
                out.push(Decision {
                    idc: idc.to_owned(),
                    change: Change::Set(auto(IdcState::Warming, "expired")),
                    why: "the down override expired".to_owned(),
                });
            }
            (IdcState::Down, _)
                if is_auto && policy.auto_failback && healthy_for >= policy.recover_ms =>
            {
                out.push(Decision {
                    idc: idc.to_owned(),
                    change: Change::Set(auto(IdcState::Warming, AUTO)),
                    why: format!("seen healthy for {healthy_for} ms (auto_failback)"),
                });
            }
            _ => {}
        }
    }
    out
}

/// The override a `Clear` decision writes.
pub fn active_again(by: &str, why: &str, now_ms: u64) -> IdcOverride {
    IdcOverride {
        state: IdcState::Active,
        reason: why.to_owned(),
        by: by.to_owned(),
        at: now_ms / 1000,
        expires_at: None,
        at_ms: now_ms,
        warmup_s: None,
        warmup_step: None,
    }
}

/// Applies decisions to overrides (file mode keeps them all in one file), each as
/// `Decision::value`. The `failover` record of a `down` is the caller's to add
/// (`Decision::fence`): it needs the snapshot.
pub fn apply(overrides: &mut Overrides, decisions: &[Decision], by: &str, now_ms: u64) {
    for d in decisions {
        overrides.idcs.insert(d.idc.clone(), d.value(by, now_ms));
    }
}

#[cfg(test)]
mod tests;
