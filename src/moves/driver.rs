//! The file-mode move driver: the single gateway advances its own `fencing` records. It has
//! acknowledged a fence once the published snapshot carries it, so phase 2 waits only for
//! `fence_ms`; the result is kept in the cache dir's `overrides.json` and republished.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{finish, next_step, target_can_serve, unix_now_ms, Step};
use crate::source::{FileOverrides, Snapshots};
use crate::topology::overrides::unix_now;

/// How often open records are looked at: small against `fence_ms` (default 2 s), and free
/// when no record is open (the check reads the published snapshot, not the disk).
const TICK: Duration = Duration::from_millis(100);

/// This gateway's health view (IDC → healthy), asked for at phase-2 time.
pub use crate::health::ViewSource as ViewFn;

/// Drives the open records until `shutdown` turns true.
pub async fn run(
    snapshots: Arc<Snapshots>,
    store: Arc<FileOverrides>,
    view: ViewFn,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = crate::etcd::shutdown_requested(&mut shutdown) => return,
        }
        drive_once(&snapshots, &store, &view);
    }
}

/// One pass: decides every open record of the published snapshot and writes the decisions.
/// Returns what was decided (for tests and logs).
pub fn drive_once(
    snapshots: &Snapshots,
    store: &FileOverrides,
    view: &ViewFn,
) -> Vec<(String, Step)> {
    let Some(t) = snapshots.current() else {
        return Vec::new();
    };
    if !t.overrides.moves.values().any(|r| r.phase.is_open()) {
        return Vec::new();
    }
    let view = view();
    let now_ms = unix_now_ms();
    let decided: Vec<(String, Step)> = t
        .overrides
        .moves
        .iter()
        .filter(|(_, r)| r.phase.is_open())
        .map(|(id, r)| {
            // Read from the published snapshot, the fence is served: acknowledged.
            let step = next_step(
                r,
                now_ms,
                t.failover.fence,
                true,
                target_can_serve(&t, r, &view),
            );
            (id.clone(), step)
        })
        .filter(|(_, s)| *s != Step::Wait)
        .collect();
    if decided.is_empty() {
        return decided;
    }
    let _guard = store.lock();
    let mut overrides = store.read();
    let mut changed = false;
    for (id, step) in &decided {
        if finish(&mut overrides, id, step, unix_now()) {
            changed = true;
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
