//! The file-mode controller: the single gateway decides from its own health view (DESIGN.md
//! §5). On every health change and on a short tick it feeds the view to the decision, keeps
//! what it decides in the file overrides (`overrides.json` in `--cache-dir`, `by =
//! "shardgate"`) and asks the file source to republish.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{apply, decide, Change, Policy, Tracker};
use crate::control::source::{FileOverrides, Snapshots};
use crate::util::unix_now_ms;

pub use crate::control::health::ViewSource as HealthView;

/// Who automatic decisions are written by in file mode.
pub const FILE_MODE_BY: &str = "shardgate";

/// How often the view is sampled when nothing notifies a change: short against `detect_ms`
/// (1.5 s by default), so a decision lands within a tick of its deadline.
pub const TICK: Duration = Duration::from_millis(100);

pub struct FileController {
    snapshots: Arc<Snapshots>,
    overrides: Arc<FileOverrides>,
    view: HealthView,
    /// Bumped on every health change (when the view provider offers one).
    changes: Option<watch::Receiver<u64>>,
    tracker: Tracker,
}

impl FileController {
    pub fn new(
        snapshots: Arc<Snapshots>,
        overrides: Arc<FileOverrides>,
        view: HealthView,
        changes: Option<watch::Receiver<u64>>,
    ) -> FileController {
        FileController {
            snapshots,
            overrides,
            view,
            changes,
            tracker: Tracker::new(),
        }
    }

    /// Decides until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = async {
                match self.changes.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = changed => {}
                _ = crate::control::tasks::shutdown_requested(&mut shutdown) => return,
            }
            self.evaluate(unix_now_ms());
        }
    }

    /// One round: observe, decide, keep and republish what changed.
    pub fn evaluate(&mut self, now_ms: u64) {
        let Some(topo) = self.snapshots.current() else {
            return;
        };
        let view = (self.view)();
        let names: Vec<&str> = topo.idcs.iter().map(|i| i.name.as_str()).collect();
        self.tracker
            .observe_view(names.iter().copied(), &view, now_ms);
        let policy = Policy::of(&topo.failover);
        // Decide from the overrides as kept (under the file's lock), not as last published:
        // an operator's write that is not served yet is never overwritten.
        let written = self.overrides.update(|o| {
            let decisions = decide(
                names.iter().copied(),
                o,
                &self.tracker,
                &policy,
                FILE_MODE_BY,
                now_ms,
            );
            // A `down` fences its shards' writes until this gateway has no write in flight to
            // the departed IDC and fence_ms has passed (the move driver lifts it).
            apply(o, &decisions, FILE_MODE_BY, now_ms);
            for (id, r) in decisions
                .iter()
                .filter_map(|d| d.fence(&topo, FILE_MODE_BY, now_ms))
            {
                o.moves.insert(id, r);
            }
            decisions
        });
        match written {
            Ok(done) => {
                for d in &done {
                    match &d.change {
                        Change::Set(o) => {
                            tracing::warn!(idc = %d.idc, state = %o.state, reason = %o.reason, why = %d.why, "automatic IDC decision")
                        }
                        Change::Clear => {
                            tracing::info!(idc = %d.idc, why = %d.why, "IDC active again")
                        }
                    }
                }
                if !done.is_empty() {
                    self.overrides.republish();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot keep the automatic IDC decision; retrying")
            }
        }
    }
}
