//! Automatic IDC decisions (DESIGN.md §5, §6): from health seen over time, which IDCs to mark
//! `down` (reason `auto`), which to bring back `warming` (with `auto_failback`), and which
//! finished warm-ups to clear. Pure: views and time are arguments, so the rules are tested
//! without a runtime. The file-mode controller ([`controller`]) and the etcd leader
//! (`etcd::leader`) feed it and write what it decides.

pub mod controller;

use std::collections::BTreeMap;

use crate::topology::{FailoverSpec, IdcOverride, IdcState, Overrides};

/// The reason every automatic decision carries; any other reason is an operator's.
pub const AUTO: &str = "auto";

/// The numbers of the decision, from the document's `[failover]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub detect_ms: u64,
    pub recover_ms: u64,
    pub auto_failback: bool,
    /// The document's `warmup_s`, in ms (a restore may carry its own).
    pub warmup_ms: u64,
}

impl Policy {
    pub fn of(spec: &FailoverSpec) -> Policy {
        Policy {
            detect_ms: spec.detect.as_millis() as u64,
            recover_ms: spec.recover.as_millis() as u64,
            auto_failback: spec.auto_failback,
            warmup_ms: spec.warmup.as_millis() as u64,
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
    /// Write this override.
    Set(IdcOverride),
    /// Remove the override: the IDC is `active` again (a finished warm-up).
    Clear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub idc: String,
    pub change: Change,
    /// In words, for the log.
    pub why: String,
}

/// When a warming override's warm-up ends, in unix ms.
pub fn warmup_ends_ms(o: &IdcOverride, policy: &Policy) -> u64 {
    // Saturating: an override is JSON anyone with etcd access can write.
    let start = if o.at_ms != 0 {
        o.at_ms
    } else {
        o.at.saturating_mul(1000)
    };
    let length = o
        .warmup_s
        .map_or(policy.warmup_ms, |s| s.saturating_mul(1000));
    start.saturating_add(length)
}

/// The automatic decisions for `idcs` at `now_ms` (unix ms), given the overrides in force and
/// what `tracker` has seen. Rules:
/// - active (no override, an expired one, or an `active` one) or auto-`warming`, seen
///   unhealthy for `detect_ms` → `down`, reason `auto`;
/// - auto-`down`, seen healthy for `recover_ms`, with `auto_failback` → `warming`, reason
///   `auto`, timed from now;
/// - any `warming` whose warm-up is over → cleared (active);
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
    let auto = |state: IdcState| IdcOverride {
        state,
        reason: AUTO.to_owned(),
        by: by.to_owned(),
        at: now_s,
        expires_at: None,
        at_ms: now_ms,
        warmup_s: None,
    };
    let mut out = Vec::new();
    for idc in idcs {
        let current = overrides.idc_state(idc, now_s);
        let unhealthy_for = tracker.held(idc, false, now_ms);
        let healthy_for = tracker.held(idc, true, now_ms);
        let state = current.map_or(IdcState::Active, |o| o.state);
        let is_auto = current.is_some_and(|o| o.reason == AUTO);
        match (state, current) {
            (IdcState::Active, _) if unhealthy_for >= policy.detect_ms => {
                out.push(Decision {
                    idc: idc.to_owned(),
                    change: Change::Set(auto(IdcState::Down)),
                    why: format!("seen unhealthy for {unhealthy_for} ms"),
                });
            }
            (IdcState::Warming, Some(o)) => {
                if now_ms >= warmup_ends_ms(o, policy) {
                    out.push(Decision {
                        idc: idc.to_owned(),
                        change: Change::Clear,
                        why: "warm-up finished".to_owned(),
                    });
                } else if is_auto && unhealthy_for >= policy.detect_ms {
                    out.push(Decision {
                        idc: idc.to_owned(),
                        change: Change::Set(auto(IdcState::Down)),
                        why: format!("seen unhealthy for {unhealthy_for} ms while warming"),
                    });
                }
            }
            (IdcState::Down, _)
                if is_auto && policy.auto_failback && healthy_for >= policy.recover_ms =>
            {
                out.push(Decision {
                    idc: idc.to_owned(),
                    change: Change::Set(auto(IdcState::Warming)),
                    why: format!("seen healthy for {healthy_for} ms (auto_failback)"),
                });
            }
            _ => {}
        }
    }
    out
}

/// Applies decisions to overrides (file mode keeps them all in one file).
pub fn apply(overrides: &mut Overrides, decisions: &[Decision]) {
    for d in decisions {
        match &d.change {
            Change::Set(o) => {
                overrides.idcs.insert(d.idc.clone(), o.clone());
            }
            Change::Clear => {
                overrides.idcs.remove(&d.idc);
            }
        }
    }
}

/// Unix milliseconds now.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
