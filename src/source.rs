//! The only writer of the snapshot. A source (the topology file, or etcd) hands over a document
//! and overrides; `Snapshots::publish` validates and builds the whole snapshot and swaps it in
//! with one store, or keeps the last good one and reports every problem.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::forward::Upstreams;
use crate::telemetry::Metrics;
use crate::topology::overrides::unix_now_ms;
use crate::topology::{
    self, BuildContext, Overrides, Problems, RawTopology, Topology, TopologyDiff,
};

/// The published snapshot and what it was built from.
pub struct Snapshots {
    current: Arc<ArcSwapOption<Topology>>,
    upstreams: Upstreams,
    metrics: Arc<Metrics>,
    local_idc: Option<String>,
    kind: &'static str,
    up: AtomicBool,
    /// Serialises publishes, so a revision never goes backwards.
    publish_lock: Mutex<()>,
    last_problem: Mutex<Option<String>>,
    /// The revision of every publish, for whoever reports it (the etcd gateway registry).
    revisions: watch::Sender<u64>,
    /// The cluster's registered gateways as the source last saw them (etcd), for `/status`.
    gateways: Mutex<Vec<serde_json::Value>>,
    /// The elected failover leader's instance (etcd), for `/status`.
    leader: Mutex<Option<String>>,
}

impl Snapshots {
    pub fn new(kind: &'static str, local_idc: Option<String>, metrics: Arc<Metrics>) -> Snapshots {
        Snapshots {
            current: Arc::new(ArcSwapOption::empty()),
            upstreams: Upstreams::new(),
            metrics,
            local_idc,
            kind,
            up: AtomicBool::new(false),
            publish_lock: Mutex::new(()),
            last_problem: Mutex::new(None),
            revisions: watch::channel(0).0,
            gateways: Mutex::new(Vec::new()),
            leader: Mutex::new(None),
        }
    }

    /// The cell request handlers load from.
    pub fn cell(&self) -> Arc<ArcSwapOption<Topology>> {
        self.current.clone()
    }

    pub fn current(&self) -> Option<Arc<Topology>> {
        self.current.load_full()
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn source_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn set_source_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.topology_source_up.set(i64::from(up));
    }

    /// The last rejected document's problems, until a good one is published.
    pub fn last_problem(&self) -> Option<String> {
        self.last_problem.lock().ok().and_then(|p| p.clone())
    }

    /// Validates `doc + overrides` and publishes it as `revision`. On any problem nothing
    /// changes: the last good snapshot keeps serving.
    pub fn publish(
        &self,
        doc: RawTopology,
        overrides: &Overrides,
        revision: u64,
    ) -> Result<TopologyDiff, Problems> {
        let _guard = self.publish_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.publish_locked(doc, overrides, revision)
    }

    /// `publish`, with the publish lock held.
    fn publish_locked(
        &self,
        doc: RawTopology,
        overrides: &Overrides,
        revision: u64,
    ) -> Result<TopologyDiff, Problems> {
        let old = self.current.load_full();
        let ctx = BuildContext {
            revision,
            local_idc: self.local_idc.clone(),
            running_shard_count: old.as_ref().map(|t| t.shard_count),
            now: 0,
        };
        match topology::build(doc, overrides, &ctx, &self.upstreams) {
            Ok(new) => {
                let new = Arc::new(new);
                let change = old
                    .as_ref()
                    .map(|old| topology::diff(old, &new))
                    .unwrap_or_default();
                self.current.store(Some(new.clone()));
                self.revisions.send_replace(revision);
                self.metrics.observe_snapshot(&new);
                self.metrics.reload("ok");
                if let Ok(mut p) = self.last_problem.lock() {
                    *p = None;
                }
                match &old {
                    Some(_) => tracing::info!(revision, change = %change, "topology reloaded"),
                    None => tracing::info!(
                        revision,
                        routes = new.routes.len(),
                        idcs = new.idcs.len(),
                        shards = new.shard_count,
                        "topology loaded"
                    ),
                }
                Ok(change)
            }
            Err(problems) => {
                self.metrics.reload("invalid");
                tracing::error!(revision, %problems, "topology rejected; the last good snapshot keeps serving");
                if let Ok(mut p) = self.last_problem.lock() {
                    *p = Some(problems.to_string());
                }
                Err(problems)
            }
        }
    }
}

impl Snapshots {
    /// Rebuilds the published snapshot from its own document and overrides, at the same
    /// revision, whenever its serving table is due to change with time alone (the next step
    /// of a warm-up, an override expiring: `Topology::next_change_ms`). Each step is a normal
    /// publish (diff logged, metrics, subscribers told), for the file and the etcd source
    /// alike, and it goes on while etcd is unreachable. Runs until `shutdown` turns true.
    pub async fn run_timed_rebuilds(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut revisions = self.subscribe();
        // The instant last rebuilt for: a rebuild that did not move it on (it failed) is not
        // retried in a loop, only after the next publish.
        let mut done: Option<u64> = None;
        loop {
            let due = self
                .current()
                .and_then(|t| t.next_change_ms)
                .filter(|&at| done != Some(at));
            // One millisecond late rather than early: the table changes at the instant itself.
            let wait = due.map(|at| Duration::from_millis(at.saturating_sub(unix_now_ms()) + 1));
            tokio::select! {
                _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {
                    let snapshots = self.clone();
                    // Building a large snapshot takes milliseconds of CPU: off the workers.
                    let tried = tokio::task::spawn_blocking(move || snapshots.rebuild_due()).await;
                    if tried.unwrap_or(true) {
                        done = due;
                    }
                }
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Rebuilds the current snapshot if its next timed change is due (false when it is not
    /// due yet: a publish that got in first did it, or the clock woke us early).
    fn rebuild_due(&self) -> bool {
        let _guard = self.publish_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(current) = self.current() else {
            return false;
        };
        if current.next_change_ms.is_none_or(|at| at > unix_now_ms()) {
            return false;
        }
        tracing::debug!(
            revision = current.revision,
            "serving table due to change (warm-up step or expiry): rebuilding"
        );
        let _ = self.publish_locked(
            current.document.clone(),
            &current.overrides,
            current.revision,
        );
        true
    }

    /// Notified with the revision of every snapshot published from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// A source's input that never reached `publish` (unparsable, or an unreadable override):
    /// logged, counted and shown like a rejected document; the last good snapshot keeps serving.
    /// Shows `problems` in `/status` as the source's last problem, without counting a reload.
    pub fn note_problem(&self, problems: &Problems) {
        if let Ok(mut p) = self.last_problem.lock() {
            *p = Some(problems.to_string());
        }
    }

    pub fn reject(&self, problems: &Problems, revision: u64) {
        self.metrics.reload("invalid");
        tracing::error!(revision, %problems, "topology rejected; the last good snapshot keeps serving");
        if let Ok(mut p) = self.last_problem.lock() {
            *p = Some(problems.to_string());
        }
    }

    /// The cluster's registered gateways (etcd mode; empty for the file source).
    pub fn gateways(&self) -> Vec<serde_json::Value> {
        self.gateways.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_gateways(&self, gateways: Vec<serde_json::Value>) {
        if let Ok(mut g) = self.gateways.lock() {
            *g = gateways;
        }
    }

    /// The elected failover leader (etcd mode; `None` in file mode or while there is none).
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().ok().and_then(|l| l.clone())
    }

    pub fn set_leader(&self, leader: Option<String>) {
        if let Ok(mut l) = self.leader.lock() {
            *l = leader;
        }
    }

    /// Why there is no snapshot yet (shown by `/readyz`); ignored once one is published.
    pub fn note_not_ready(&self, why: String) {
        if self.current.load().is_some() {
            return;
        }
        if let Ok(mut p) = self.last_problem.lock() {
            *p = Some(why);
        }
    }
}

/// Reads and parses a topology file.
pub fn read_document(path: &Path) -> Result<RawTopology, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems(vec![topology::Problem::new(
            path.display().to_string(),
            format!("cannot read: {e}"),
        )])
    })?;
    RawTopology::parse(&text)
}

/// What identifies one version of the file on disk.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

/// Operator overrides in file mode: kept in the cache dir's `overrides.json` so they survive a
/// restart, and applied by asking the file source to rebuild the snapshot (the one writer).
pub struct FileOverrides {
    path: Option<PathBuf>,
    reload: tokio::sync::Notify,
    /// Held across read → change → write (`lock`, `update`), so two writers (an operator's
    /// write, the move driver, the failover controller) never lose each other's change.
    writing: Mutex<()>,
    /// Without `--cache-dir`, the overrides live here only (lost on restart): automatic
    /// failover must not depend on a cache dir.
    memory: Mutex<Overrides>,
}

impl FileOverrides {
    /// Where they are kept; `None` without `--cache-dir`.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Taken around a read-modify-write of the overrides.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The overrides on disk (none when the file is missing or unreadable).
    pub fn read(&self) -> Overrides {
        let Some(path) = &self.path else {
            return self.memory.lock().map(|m| m.clone()).unwrap_or_default();
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "overrides file is not valid JSON; ignoring it");
                Overrides::default()
            }),
            Err(_) => Overrides::default(),
        }
    }

    /// Replaces the file atomically (write aside, fsync, rename), so a crash leaves the old
    /// or the new overrides, never half of them. Without `--cache-dir` they are kept in
    /// memory only.
    pub fn write(&self, overrides: &Overrides) -> std::io::Result<()> {
        use std::io::Write as _;
        let Some(path) = &self.path else {
            if let Ok(mut m) = self.memory.lock() {
                *m = overrides.clone();
            }
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(overrides).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Reads, lets `f` change, and writes back only when something changed, under one lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut Overrides) -> T) -> std::io::Result<T> {
        let _guard = self.lock();
        let before = self.read();
        let mut after = before.clone();
        let out = f(&mut after);
        if after != before {
            self.write(&after)?;
        }
        Ok(out)
    }

    /// Asks the file source to rebuild and publish the snapshot with the overrides on disk.
    pub fn republish(&self) {
        self.reload.notify_one();
    }
}

/// The file source: the topology file plus overrides kept in the cache dir. The revision is a
/// reload counter that only grows.
pub struct FileSource {
    path: PathBuf,
    overrides: Arc<FileOverrides>,
    snapshots: Arc<Snapshots>,
    revision: u64,
    seen: Option<Stamp>,
    /// Installed when the source is made, so a SIGHUP right after start-up reloads instead of
    /// killing the process.
    hangup: Hangup,
}

impl FileSource {
    pub fn new(path: PathBuf, cache_dir: Option<&Path>, snapshots: Arc<Snapshots>) -> FileSource {
        FileSource {
            path,
            overrides: Arc::new(FileOverrides {
                path: cache_dir.map(|d| d.join("overrides.json")),
                reload: tokio::sync::Notify::new(),
                writing: Mutex::new(()),
                memory: Mutex::new(Overrides::default()),
            }),
            snapshots,
            revision: 0,
            seen: None,
            hangup: hangup_signal(),
        }
    }

    /// A new source for a running gateway whose source task died: the same overrides handle
    /// (the admin API and the deciders write through it) and the revision counter going on
    /// from the published snapshot, so the revision keeps only growing. Its first poll reads
    /// the file again.
    pub fn resume(
        path: PathBuf,
        overrides: Arc<FileOverrides>,
        snapshots: Arc<Snapshots>,
    ) -> FileSource {
        FileSource {
            path,
            overrides,
            revision: snapshots.current().map_or(0, |t| t.revision),
            snapshots,
            seen: None,
            hangup: hangup_signal(),
        }
    }

    fn overrides(&self) -> Overrides {
        self.overrides.read()
    }

    /// The handle the admin API writes operator overrides through.
    pub fn overrides_handle(&self) -> Arc<FileOverrides> {
        self.overrides.clone()
    }

    /// Loads the file now and publishes it.
    pub fn load(&mut self) -> Result<TopologyDiff, Problems> {
        self.seen = stamp(&self.path);
        let doc = read_document(&self.path).inspect_err(|problems| {
            self.snapshots.set_source_up(self.seen.is_some());
            self.snapshots.metrics.reload("invalid");
            // A file that does not parse is a rejected document like any other: logged and
            // shown in /status, not hidden behind an older problem.
            tracing::error!(path = %self.path.display(), %problems, "topology rejected; the last good snapshot keeps serving");
            if let Ok(mut p) = self.snapshots.last_problem.lock() {
                *p = Some(problems.to_string());
            }
        })?;
        self.snapshots.set_source_up(true);
        let next = self.revision + 1;
        let change = self.snapshots.publish(doc, &self.overrides(), next)?;
        self.revision = next;
        Ok(change)
    }

    /// Polls the file and listens for SIGHUP until `shutdown` turns true.
    pub async fn run(mut self, poll: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = self.hangup.take();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let overrides = self.overrides.clone();
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = recv_hangup(&mut hangup) => true,
                _ = overrides.reload.notified() => true,
                _ = shutdown.changed() => return,
            };
            if *shutdown.borrow() {
                return;
            }
            let now = stamp(&self.path);
            if now.is_none() {
                if self.snapshots.source_up() {
                    tracing::warn!(path = %self.path.display(), "topology file is gone; serving the last good snapshot");
                }
                self.snapshots.set_source_up(false);
                continue;
            }
            if forced || now != self.seen {
                if forced {
                    tracing::info!(path = %self.path.display(), "SIGHUP: reloading the topology file");
                }
                let _ = self.load();
            }
        }
    }
}

#[cfg(unix)]
pub(crate) type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub(crate) type Hangup = Option<()>;

pub(crate) fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

pub(crate) async fn recv_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(sig) = h.as_mut() {
        sig.recv().await;
        return;
    }
    let _ = h;
    std::future::pending::<()>().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;
    use crate::topology::{IdcOverride, IdcState};

    fn down() -> IdcOverride {
        IdcOverride {
            state: IdcState::Down,
            reason: "auto".into(),
            by: "shardgate".into(),
            at: 1,
            expires_at: None,
            at_ms: 1000,
            warmup_s: None,
        }
    }

    // A runtime, because the file source installs its SIGHUP handler when made.
    #[tokio::test]
    async fn overrides_are_kept_on_disk_or_in_memory_and_updated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        for cache in [Some(dir.path()), None] {
            let file = FileSource::new(
                dir.path().join("topology.toml"),
                cache,
                Arc::new(Snapshots::new("file", None, Arc::new(Metrics::new()))),
            )
            .overrides_handle();
            assert_eq!(file.read(), Overrides::default());
            let n = file
                .update(|o| {
                    o.idcs.insert("sh".into(), down());
                    o.idcs.len()
                })
                .unwrap();
            assert_eq!(n, 1);
            assert_eq!(file.read().idcs["sh"], down());
            file.update(|o| o.idcs.remove("sh")).unwrap();
            assert!(file.read().idcs.is_empty());
        }
        assert!(dir.path().join("overrides.json").exists());
    }
}
