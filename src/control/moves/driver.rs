//! The file-mode move driver: the single gateway advances its own `fencing` records and paces
//! its own warm-ups. It has acknowledged a fence once the published snapshot carries it and no
//! write admitted under an older snapshot is still in flight (`Snapshots::acknowledged`);
//! phase 2 then waits `fence_ms` on this process's monotonic clock. Results are kept in the
//! cache dir's `overrides.json` and republished.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::pace::{FenceClocks, WarmupPacer};
use super::{finish, next_step, target_can_serve, Operator, Step};
use crate::control::source::{FileOverrides, Snapshots};
use crate::control::topology::overrides::unix_now;
use crate::util::unix_now_ms;

/// How often open records are looked at: small against `fence_ms` (default 2 s), and free
/// when no record is open (the check reads the published snapshot, not the disk).
const TICK: Duration = Duration::from_millis(100);

/// Who the file-mode driver writes as.
const BY: &str = "shardgate";

/// This gateway's health view (IDC → healthy), asked for at phase-2 time.
pub use crate::control::health::ViewSource as ViewFn;

/// Drives the open records and warm-ups until `shutdown` turns true.
pub async fn run(
    snapshots: Arc<Snapshots>,
    store: Arc<FileOverrides>,
    view: ViewFn,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut driver = FileDriver::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = crate::control::tasks::shutdown_requested(&mut shutdown) => return,
        }
        driver.drive_once(&snapshots, &store, &view);
    }
}

/// The driver's memory: its monotonic clocks, and the revision at which each open record was
/// first published (the revision it must acknowledge).
#[derive(Debug, Default)]
pub struct FileDriver {
    clocks: FenceClocks,
    pacer: WarmupPacer,
    published_at: HashMap<String, u64>,
}

impl FileDriver {
    pub fn new() -> FileDriver {
        FileDriver::default()
    }

    /// One pass: decides every open record of the published snapshot, starts the warm-up steps
    /// that are due, and writes both. Returns what was decided (for tests and logs).
    pub fn drive_once(
        &mut self,
        snapshots: &Snapshots,
        store: &FileOverrides,
        view: &ViewFn,
    ) -> Vec<(String, Step)> {
        let Some(t) = snapshots.current() else {
            return Vec::new();
        };
        let now = Instant::now();
        let now_ms = unix_now_ms();
        let open: Vec<&str> = t
            .overrides
            .moves
            .iter()
            .filter(|(_, r)| r.phase.is_open())
            .map(|(id, _)| id.as_str())
            .collect();
        self.clocks.retain(&open);
        self.published_at
            .retain(|id, _| open.contains(&id.as_str()));
        let op = Operator {
            reason: "warm-up".to_owned(),
            by: BY.to_owned(),
            now_ms,
        };
        let steps = self.pacer.due(&t, now, &op);
        if open.is_empty() && steps.is_empty() {
            return Vec::new();
        }
        let view = view();
        let acknowledged = snapshots.acknowledged();
        let mut decided = Vec::new();
        for id in &open {
            let Some(r) = t.overrides.moves.get(*id) else {
                continue;
            };
            let since = *self
                .published_at
                .entry((*id).to_owned())
                .or_insert(t.revision);
            let facts = self.clocks.facts(
                id,
                acknowledged >= since,
                now,
                false,
                target_can_serve(&t, r, &view),
            );
            let step = next_step(r, &facts, t.failover.fence);
            if step != Step::Wait {
                decided.push(((*id).to_owned(), step));
            }
        }
        if decided.is_empty() && steps.is_empty() {
            return decided;
        }
        let _guard = store.lock();
        let mut overrides = store.read();
        let mut changed = false;
        for (id, step) in &decided {
            if finish(&mut overrides, id, step, unix_now()) {
                changed = true;
                log_step(id, step);
            }
        }
        for (id, mut record) in steps {
            // Started only while the IDC is still at the step it was planned from (an
            // operator's write in between wins; the next pass plans again).
            let to = record.to.clone().unwrap_or_default();
            let planned = t.overrides.idcs.get(&to);
            if overrides.idcs.get(&to) != planned {
                continue;
            }
            record.fence_revision = overrides
                .moves
                .values()
                .map(|r| r.fence_revision)
                .max()
                .unwrap_or(0)
                .max(t.revision)
                + 1;
            tracing::info!(id = %id, idc = %to, step = ?record.step, shards = record.ranges.len(), "warm-up step fenced");
            overrides.moves.insert(id, record);
            changed = true;
        }
        if changed {
            if let Err(e) = store.write(&overrides) {
                tracing::error!(error = %e, "cannot keep the move's new phase; it will be retried");
                return Vec::new();
            }
            store.republish();
        }
        decided
    }
}

fn log_step(id: &str, step: &Step) {
    match step {
        Step::Apply => {
            tracing::info!(id = %id, "move applied: the new owner is published and the fence lifted")
        }
        Step::RollBack(why) => {
            tracing::warn!(id = %id, why = %why, "move rolled back: the fence is lifted, the owner did not change")
        }
        Step::Wait => {}
    }
}
