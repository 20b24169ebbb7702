//! The history checker: given what the simulated IDCs applied (the `ledger`) and the ownership
//! events a test observed from etcd on the same clock, says whether a shard was ever written by
//! two IDCs at once (DESIGN.md §5, §12), and reports the run. Pure: no clock, no I/O.
//!
//! Rules, per shard (docs/failover.md, "Checking the promise: the history checker"):
//! - (a) `Overlap`: no two applied writes in different IDCs overlap in time;
//! - (b) `InFence`: between "every live gateway acknowledged the fence" and the `applied`
//!   commit of a fenced change of owner, no write routed by a snapshot older than that commit
//!   is in progress; `OldOwner`: after the `applied` commit, no write starts at the old owner
//!   (until the next change of that shard's owner);
//! - (c) `StaleOwnerEpoch`: no write is applied with an owner epoch below the highest owner
//!   epoch of a write to that shard that ended before it started.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::ledger::Entry;

#[cfg(test)]
mod tests;

/// Where a change of owner is, as observed from etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The record was committed in phase `fencing` (`revision`: that commit's revision).
    Fenced,
    /// Every live gateway's registration showed `applied_revision` ≥ the fence revision.
    Acked,
    /// The record was committed in phase `applied` (`revision`: that commit's revision).
    Applied,
    /// The record was committed in phase `rolled_back`: the owner did not change.
    RolledBack,
    /// An owner change written without a fence (an IDC override: failover, restore): it ends
    /// the "old owner" window of rule (b) for the shards it names.
    Unfenced,
}

/// One ownership event, on the ledger's clock (when the test's own watch saw it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnershipEvent {
    pub at_ns: u64,
    /// The record's id (`move/<id>`), or the override key for `Unfenced`.
    pub record: String,
    /// `move`, `drain`, `failover`, `warmup`, …: kept for the report, never interpreted.
    pub kind: String,
    pub phase: Phase,
    pub revision: u64,
    pub shards: BTreeSet<u32>,
    /// The IDC the shards leave, when the record names it.
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What one load client saw of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientOutcome {
    pub shard: u32,
    pub write: bool,
    /// 0: no answer (connection error or timeout).
    pub status: u16,
    /// `x-shardgate-reason`, on a gateway-made refusal.
    pub reason: Option<String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl ClientOutcome {
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    fn fenced(&self) -> bool {
        self.status == 503 && self.reason.as_deref() == Some("fenced")
    }
}

/// Everything a check looks at.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub entries: Vec<Entry>,
    pub events: Vec<OwnershipEvent>,
    pub outcomes: Vec<ClientOutcome>,
    /// Ledger entries dropped because it was full (the report says the check is partial).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Rule {
    /// (a) two applied writes in different IDCs overlap.
    Overlap,
    /// (b) a write in progress between the fence's acknowledgement and its `applied` commit.
    InFence,
    /// (b) a write applied at the old owner after the `applied` commit.
    OldOwner,
    /// (c) a write applied with an owner epoch below one already seen.
    StaleOwnerEpoch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub rule: Rule,
    pub shard: u32,
    pub detail: String,
    /// The ledger entries involved.
    pub entries: Vec<Entry>,
}

/// The per-scenario report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Writes the backends applied.
    pub writes: u64,
    /// Reads the backends answered.
    pub reads: u64,
    /// Writes the backends refused (421: sent by a stale owner).
    pub refused_by_backend: u64,
    /// Writes the load clients saw refused with 503 `fenced`.
    pub fenced_writes: u64,
    /// Writes the load clients saw fail otherwise (other status, or no answer).
    pub failed_writes: u64,
    /// Per shard that changed owner (and that the load wrote): seconds during which its writes
    /// were failing (see `unavailability`).
    pub unavailable_s: BTreeMap<u32, f64>,
    /// Ledger entries not kept (0 unless the ledger was full).
    pub dropped: u64,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn count(&self, rule: Rule) -> usize {
        self.violations.iter().filter(|v| v.rule == rule).count()
    }
}

/// How many violations of each rule the report prints in full.
const PRINTED_PER_RULE: usize = 5;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "writes {} · reads {} · refused by backend (421) {} · refused as fenced {} · other failed writes {}",
            self.writes, self.reads, self.refused_by_backend, self.fenced_writes, self.failed_writes
        )?;
        if self.dropped > 0 {
            writeln!(f, "ledger full: {} entries not checked", self.dropped)?;
        }
        if !self.unavailable_s.is_empty() {
            let max = self.unavailable_s.values().copied().fold(0.0, f64::max);
            let list: Vec<String> = self
                .unavailable_s
                .iter()
                .map(|(s, secs)| format!("{s}:{secs:.2}"))
                .collect();
            writeln!(
                f,
                "write unavailability per moved shard (s): max {max:.2} [{}]",
                list.join(" ")
            )?;
        }
        let rules = [
            Rule::Overlap,
            Rule::InFence,
            Rule::OldOwner,
            Rule::StaleOwnerEpoch,
        ];
        let counts: Vec<String> = rules
            .iter()
            .map(|r| format!("{r:?} {}", self.count(*r)))
            .collect();
        writeln!(
            f,
            "violations {} ({})",
            self.violations.len(),
            counts.join(", ")
        )?;
        for rule in rules {
            for v in self
                .violations
                .iter()
                .filter(|v| v.rule == rule)
                .take(PRINTED_PER_RULE)
            {
                writeln!(f, "  {:?} shard {}: {}", v.rule, v.shard, v.detail)?;
                for e in &v.entries {
                    writeln!(
                        f,
                        "    {} {} at {} [{:.3} s, {:.3} s] epoch {:?} owner epoch {:?} status {} id {}",
                        e.method,
                        e.shard,
                        e.idc,
                        secs(e.start_ns),
                        secs(e.end_ns),
                        e.epoch,
                        e.owner_epoch,
                        e.status,
                        e.request_id
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Checks every rule and builds the report.
pub fn check(history: &History) -> Report {
    let mut writes_by_shard: BTreeMap<u32, Vec<&Entry>> = BTreeMap::new();
    let mut report = Report {
        dropped: history.dropped,
        ..Report::default()
    };
    for e in &history.entries {
        if !e.is_write() {
            report.reads += 1;
        } else if e.refused() {
            report.refused_by_backend += 1;
        } else {
            report.writes += 1;
            writes_by_shard.entry(e.shard).or_default().push(e);
        }
    }
    for writes in writes_by_shard.values_mut() {
        writes.sort_by_key(|e| (e.start_ns, e.end_ns));
    }
    for o in history.outcomes.iter().filter(|o| o.write) {
        if o.fenced() {
            report.fenced_writes += 1;
        } else if !o.ok() {
            report.failed_writes += 1;
        }
    }
    for (shard, writes) in &writes_by_shard {
        overlaps(*shard, writes, &mut report.violations);
        stale_owner_epochs(*shard, writes, &mut report.violations);
    }
    fenced_changes(history, &writes_by_shard, &mut report.violations);
    report.unavailable_s = unavailability(history);
    report
}

/// Rule (a): writes sorted by start; each is compared with the earlier ones still running.
fn overlaps(shard: u32, writes: &[&Entry], out: &mut Vec<Violation>) {
    let mut running: Vec<&Entry> = Vec::new();
    for w in writes {
        running.retain(|r| r.end_ns > w.start_ns);
        for r in &running {
            if r.idc != w.idc {
                out.push(Violation {
                    rule: Rule::Overlap,
                    shard,
                    detail: format!("written at {} and at {} at the same time", r.idc, w.idc),
                    entries: vec![(*r).clone(), (*w).clone()],
                });
            }
        }
        running.push(w);
    }
}

/// Rule (c): the highest owner epoch among writes that ended before each write started.
fn stale_owner_epochs(shard: u32, writes: &[&Entry], out: &mut Vec<Violation>) {
    let mut by_end: Vec<&Entry> = writes
        .iter()
        .copied()
        .filter(|e| e.owner_epoch.is_some())
        .collect();
    by_end.sort_by_key(|e| e.end_ns);
    let mut ended = 0;
    let mut highest: Option<&Entry> = None;
    for w in writes {
        let Some(epoch) = w.owner_epoch else { continue };
        while ended < by_end.len() && by_end[ended].end_ns < w.start_ns {
            let e = by_end[ended];
            if highest.is_none_or(|h| e.owner_epoch > h.owner_epoch) {
                highest = Some(e);
            }
            ended += 1;
        }
        if let Some(h) = highest.filter(|h| h.owner_epoch > Some(epoch)) {
            out.push(Violation {
                rule: Rule::StaleOwnerEpoch,
                shard,
                detail: format!(
                    "applied at {} with owner epoch {epoch} after a write with owner epoch {}",
                    w.idc,
                    h.owner_epoch.unwrap_or(0)
                ),
                entries: vec![h.clone(), (*w).clone()],
            });
        }
    }
}

/// The phases one record went through, first observation of each.
#[derive(Default)]
struct Record<'a> {
    fenced: Option<&'a OwnershipEvent>,
    acked: Option<&'a OwnershipEvent>,
    applied: Option<&'a OwnershipEvent>,
}

/// Rule (b), for every record that reached `applied`.
fn fenced_changes(
    history: &History,
    writes_by_shard: &BTreeMap<u32, Vec<&Entry>>,
    out: &mut Vec<Violation>,
) {
    let mut records: BTreeMap<&str, Record<'_>> = BTreeMap::new();
    for e in &history.events {
        let r = records.entry(e.record.as_str()).or_default();
        let slot = match e.phase {
            Phase::Fenced => &mut r.fenced,
            Phase::Acked => &mut r.acked,
            Phase::Applied => &mut r.applied,
            Phase::RolledBack | Phase::Unfenced => continue,
        };
        if slot.is_none_or(|s| e.at_ns < s.at_ns) {
            *slot = Some(e);
        }
    }
    for (id, r) in &records {
        let Some(applied) = r.applied else { continue };
        // The test's watch may see the record applied before it sees the last registration
        // catch up; then the window is empty rather than undefined.
        let acked_at = r
            .acked
            .map_or(applied.at_ns, |a| a.at_ns.min(applied.at_ns));
        let fenced_at = r.fenced.map_or(acked_at, |f| f.at_ns.min(acked_at));
        for shard in &applied.shards {
            let Some(writes) = writes_by_shard.get(shard) else {
                continue;
            };
            for w in writes {
                let in_window = w.start_ns < applied.at_ns && w.end_ns > acked_at;
                // Routed by the applied snapshot (or a later one): the new owner, legitimately,
                // even if the test's watch saw the commit a moment after that gateway did.
                let routed_after = w.epoch.is_some_and(|e| e >= applied.revision);
                if in_window && !routed_after {
                    out.push(Violation {
                        rule: Rule::InFence,
                        shard: *shard,
                        detail: format!(
                            "{} `{id}` ({}): written at {} between every gateway's fence ack ({:.3} s) and the applied commit ({:.3} s, revision {}) by a snapshot of revision {:?}",
                            applied.kind,
                            route(applied),
                            w.idc,
                            secs(acked_at),
                            secs(applied.at_ns),
                            applied.revision,
                            w.epoch
                        ),
                        entries: vec![(*w).clone()],
                    });
                }
            }
            let Some(old) = applied
                .from
                .clone()
                .or_else(|| last_writer_before(writes, fenced_at))
            else {
                continue;
            };
            if applied.to.as_deref() == Some(old.as_str()) {
                continue;
            }
            let (until, until_revision) = next_change(&history.events, *shard, applied.at_ns);
            for w in writes {
                // Routed by a snapshot that already has the next change: that change decides,
                // even if the test's watch saw it a moment after that gateway did.
                let by_next = w.epoch.is_some_and(|e| e >= until_revision);
                if w.idc == old && w.start_ns > applied.at_ns && w.start_ns < until && !by_next {
                    out.push(Violation {
                        rule: Rule::OldOwner,
                        shard: *shard,
                        detail: format!(
                            "{} `{id}` ({}): written at the old owner {old} after the applied commit ({:.3} s, revision {}) by a snapshot of revision {:?}",
                            applied.kind,
                            route(applied),
                            secs(applied.at_ns),
                            applied.revision,
                            w.epoch
                        ),
                        entries: vec![(*w).clone()],
                    });
                }
            }
        }
    }
}

fn route(e: &OwnershipEvent) -> String {
    format!(
        "{} → {}",
        e.from.as_deref().unwrap_or("?"),
        e.to.as_deref().unwrap_or("?")
    )
}

/// The IDC of the last write to the shard that ended before `at`: its owner then, when the
/// record does not name the IDC the shards leave.
fn last_writer_before(writes: &[&Entry], at: u64) -> Option<String> {
    writes
        .iter()
        .filter(|w| w.end_ns <= at)
        .max_by_key(|w| w.end_ns)
        .map(|w| w.idc.clone())
}

/// When the shard's owner next starts to change after `after`, and that change's revision: a
/// later fence, applied commit or unfenced change naming it (the old owner may legitimately
/// own it again from then on). `u64::MAX` for both when none follows.
fn next_change(events: &[OwnershipEvent], shard: u32, after: u64) -> (u64, u64) {
    events
        .iter()
        .filter(|e| {
            e.at_ns > after
                && e.shards.contains(&shard)
                && matches!(e.phase, Phase::Fenced | Phase::Applied | Phase::Unfenced)
        })
        .min_by_key(|e| e.at_ns)
        .map_or((u64::MAX, u64::MAX), |e| (e.at_ns, e.revision))
}

/// Per shard that changed owner (or was fenced) and that the load wrote: how long its writes
/// were failing. Each failed write opens an interval that the next successful write to the
/// shard (the first to start at or after it) closes at its end (or its own end, when none
/// follows); the figure is the length of the union of those intervals, so that several
/// clients failing at once count once.
fn unavailability(history: &History) -> BTreeMap<u32, f64> {
    let moved: BTreeSet<u32> = history
        .events
        .iter()
        .filter(|e| e.phase != Phase::Unfenced)
        .flat_map(|e| e.shards.iter().copied())
        .collect();
    let mut by_shard: BTreeMap<u32, Vec<&ClientOutcome>> = BTreeMap::new();
    for o in &history.outcomes {
        if o.write && moved.contains(&o.shard) {
            by_shard.entry(o.shard).or_default().push(o);
        }
    }
    by_shard
        .into_iter()
        .map(|(shard, mut outcomes)| {
            outcomes.sort_by_key(|o| o.start_ns);
            let mut total = 0u64;
            // The union being built: [start, end).
            let mut open: Option<(u64, u64)> = None;
            for (i, f) in outcomes.iter().enumerate().filter(|(_, o)| !o.ok()) {
                let end = outcomes[i..]
                    .iter()
                    .find(|o| o.ok())
                    .map_or(f.end_ns, |s| s.end_ns.max(f.start_ns));
                open = match open {
                    Some((a, b)) if f.start_ns <= b => Some((a, b.max(end))),
                    Some((a, b)) => {
                        total += b - a;
                        Some((f.start_ns, end))
                    }
                    None => Some((f.start_ns, end)),
                };
            }
            if let Some((a, b)) = open {
                total += b - a;
            }
            (shard, secs(total))
        })
        .collect()
}
