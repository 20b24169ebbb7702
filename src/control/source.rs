//! The only writer of the snapshot. A source (the topology file, or etcd) hands over a document
//! and overrides; `Snapshots::publish` validates and builds the whole snapshot and swaps it in
//! with one store, or keeps the last good one and reports every problem.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use crate::control::self_fence::SelfFence;
use crate::control::topology::{
    self, BuildContext, IdcState, Overrides, Problems, RawTopology, Topology, TopologyDiff,
};
use crate::data::upstream::Upstreams;
use crate::telemetry::{IdcLabels, IdcStateLabels, Metrics};

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
    /// This gateway's own write fence (closed while it cannot be sure the leader waits for it).
    self_fence: Arc<SelfFence>,
    /// Snapshots replaced by a newer one that may still have writes in flight.
    retired: Mutex<Vec<Weak<Topology>>>,
    /// With a snapshot cache: the newest revision stored in it (or given up on storing), so
    /// that a revision is acknowledged only once a restart would not boot from an older one.
    cached: Option<AtomicU64>,
    /// Set when etcd was found behind what this gateway served (restored or replaced): the
    /// next publish may go back to its revision.
    allow_lower: AtomicBool,
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
            self_fence: Arc::new(if kind == "etcd" {
                SelfFence::leased()
            } else {
                SelfFence::open()
            }),
            retired: Mutex::new(Vec::new()),
            cached: None,
            allow_lower: AtomicBool::new(false),
        }
    }

    /// Acknowledged revisions wait for the snapshot cache: set when a cache dir is used.
    pub fn with_cache(mut self) -> Snapshots {
        self.cached = Some(AtomicU64::new(0));
        self
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This gateway's own write fence.
    pub fn self_fence(&self) -> Arc<SelfFence> {
        self.self_fence.clone()
    }

    /// The snapshot cache holds `revision` now (or storing it failed and the stale cache was
    /// removed): it may be acknowledged.
    pub fn cached(&self, revision: u64) {
        if let Some(c) = &self.cached {
            c.fetch_max(revision, Ordering::AcqRel);
        }
    }

    /// The revision this gateway can truthfully report as applied (its registration's
    /// `applied_revision`, the fence acknowledgement): the served revision, held back while
    /// a write admitted under an older snapshot is still in flight, and while the snapshot
    /// cache does not hold it yet.
    pub fn acknowledged(&self) -> u64 {
        let Some(current) = self.current() else {
            return 0;
        };
        let mut ack = current.revision;
        if let Some(c) = &self.cached {
            ack = ack.min(c.load(Ordering::Acquire));
        }
        if let Ok(mut retired) = self.retired.lock() {
            retired.retain(|w| w.strong_count() > 0);
            for t in retired.iter().filter_map(Weak::upgrade) {
                if t.writes_in_flight.load(Ordering::Acquire) > 0 {
                    // Writes under that snapshot may still reach the owner it named: nothing
                    // newer than it is fully applied yet.
                    ack = ack.min(t.revision);
                }
            }
        }
        ack
    }

    /// etcd is behind the revision served (restored from a backup, or replaced): the next
    /// publish may carry a lower revision. Logged by the caller; writes stay fenced by the
    /// self-fence until this gateway re-registers and catches up.
    pub fn allow_lower_revision(&self) {
        self.allow_lower.store(true, Ordering::Release);
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
        if let Some(old) = &old {
            if revision < old.revision && !self.allow_lower.swap(false, Ordering::AcqRel) {
                // A late or replayed input: serving it would take ownership backwards.
                let problems = Problems(vec![topology::Problem::new(
                    "revision",
                    format!(
                        "revision {revision} is older than the revision {} served; not published",
                        old.revision
                    ),
                )]);
                tracing::error!(
                    revision,
                    served = old.revision,
                    "refusing to publish an older revision"
                );
                return Err(problems);
            }
        }
        let ctx = BuildContext {
            revision,
            local_idc: self.local_idc.clone(),
            running_shard_count: old.as_ref().map(|t| t.shard_count),
        };
        // The file source carries owner epochs from the snapshot being replaced.
        match topology::build_with_previous(doc, overrides, &ctx, &self.upstreams, old.as_deref()) {
            Ok(new) => {
                let new = Arc::new(new);
                let change = old
                    .as_ref()
                    .map(|old| topology::diff(old, &new))
                    .unwrap_or_default();
                self.current.store(Some(new.clone()));
                if let (Some(old), Ok(mut retired)) = (&old, self.retired.lock()) {
                    // Snapshots no request holds any more are gone from the list here too, so
                    // it stays short even when nobody asks for the acknowledged revision.
                    retired.retain(|w| w.strong_count() > 0);
                    retired.push(Arc::downgrade(old));
                }
                self.revisions.send_replace(revision);
                observe_snapshot(&self.metrics, &new);
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
                self.reject(&problems, revision);
                Err(problems)
            }
        }
    }
}

impl Snapshots {
    /// Notified with the revision of every snapshot published from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    /// Shows `problems` in `/status` as the source's last problem, without counting a reload.
    pub fn note_problem(&self, problems: &Problems) {
        if let Ok(mut p) = self.last_problem.lock() {
            *p = Some(problems.to_string());
        }
    }

    /// A document refused whole, or a source's input that never reached `publish` (unparsable,
    /// or an unreadable override): logged, shown and counted; the last good snapshot keeps
    /// serving.
    pub fn reject(&self, problems: &Problems, revision: u64) {
        tracing::error!(revision, %problems, "topology rejected; the last good snapshot keeps serving");
        self.count_rejected(problems);
    }

    /// A rejected document shown in /status, then counted: whoever sees
    /// `shardgate_topology_reloads_total{result="invalid"}` go up finds this problem there, not
    /// the one before.
    fn count_rejected(&self, problems: &Problems) {
        self.note_problem(problems);
        self.metrics.reload("invalid");
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
/// reload counter that only grows; with `--cache-dir` across restarts too (kept in
/// `file-revision` there), so owner epochs, which are file revisions, never go backwards.
/// Without a cache dir it starts again at 1: a backend that saw higher epochs from the gateway's
/// previous life refuses its writes (421) until it has reloaded past them.
pub struct FileSource {
    path: PathBuf,
    overrides: Arc<FileOverrides>,
    snapshots: Arc<Snapshots>,
    revision: u64,
    /// Where the revision counter is kept (`<cache-dir>/file-revision`).
    revision_file: Option<PathBuf>,
    seen: Option<Stamp>,
    /// Installed when the source is made, so a SIGHUP right after start-up reloads instead of
    /// killing the process.
    hangup: Hangup,
}

impl FileSource {
    pub fn new(path: PathBuf, cache_dir: Option<&Path>, snapshots: Arc<Snapshots>) -> FileSource {
        let revision_file = cache_dir.map(|d| d.join("file-revision"));
        let revision = revision_file.as_deref().map_or(0, read_revision);
        FileSource {
            path,
            overrides: Arc::new(FileOverrides {
                path: cache_dir.map(|d| d.join("overrides.json")),
                reload: tokio::sync::Notify::new(),
                writing: Mutex::new(()),
                memory: Mutex::new(Overrides::default()),
            }),
            snapshots,
            revision,
            revision_file,
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
        // The counter lives beside the overrides file, in the cache dir.
        let revision_file = overrides
            .path()
            .and_then(Path::parent)
            .map(|d| d.join("file-revision"));
        FileSource {
            path,
            revision: snapshots.current().map_or(0, |t| t.revision),
            overrides,
            snapshots,
            seen: None,
            hangup: hangup_signal(),
            revision_file,
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
            // A file that does not parse is a rejected document like any other: logged, shown
            // in /status (not hidden behind an older problem) and counted.
            tracing::error!(path = %self.path.display(), %problems, "topology rejected; the last good snapshot keeps serving");
            self.snapshots.count_rejected(problems);
        })?;
        self.snapshots.set_source_up(true);
        let next = self.revision + 1;
        // Kept before it is served: a crash right after the publish must not serve this
        // revision again, with other owners, after the restart.
        if let Some(file) = &self.revision_file {
            if let Err(e) = write_revision(file, next) {
                tracing::warn!(path = %file.display(), error = %e, "cannot keep the file revision; after a restart owner epochs may go backwards");
            }
        }
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

/// The revision counter kept in the cache dir; 0 when there is none (or it is unreadable).
fn read_revision(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %path.display(), "the file revision counter is unreadable; starting again at 1");
            0
        }),
        Err(_) => 0,
    }
}

/// Replaces the counter atomically (write aside, fsync, rename).
fn write_revision(path: &Path, revision: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{revision}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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

/// Snapshot-level gauges, refreshed when a snapshot is published.
fn observe_snapshot(metrics: &Metrics, t: &Topology) {
    metrics.topology_revision.set(t.revision as i64);
    metrics.shards_served.clear();
    metrics.idc_state.clear();
    for (idc, n) in t.idcs.iter().zip(t.shards_served()) {
        metrics
            .shards_served
            .get_or_create(&IdcLabels {
                idc: idc.name.clone(),
            })
            .set(i64::from(n));
        for state in IdcState::ALL {
            metrics
                .idc_state
                .get_or_create(&IdcStateLabels {
                    idc: idc.name.clone(),
                    state: state.as_str(),
                })
                .set(i64::from(idc.state == state));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;
    use crate::control::topology::{IdcOverride, IdcState};

    fn down() -> IdcOverride {
        IdcOverride {
            state: IdcState::Down,
            reason: "auto".into(),
            by: "shardgate".into(),
            at: 1,
            expires_at: None,
            at_ms: 1000,
            warmup_s: None,
            warmup_step: None,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod revision_tests {
    use super::*;

    const DOC: &str = "cluster = \"t\"\nshard_count = 16\n[sets.core]\n[[idcs]]\nname = \"sh\"\npools.core = [\"127.0.0.1:7000\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nset = \"core\"\nkey = [\"header:k\"]\n";

    fn snapshots() -> Snapshots {
        Snapshots::new("etcd", None, Arc::new(Metrics::new()))
    }

    #[test]
    fn an_older_revision_is_never_published_unless_etcd_went_back() {
        let s = snapshots();
        let doc = || RawTopology::parse(DOC).unwrap();
        s.publish(doc(), &Overrides::default(), 10).unwrap();
        let refused = s.publish(doc(), &Overrides::default(), 9).unwrap_err();
        assert!(refused.to_string().contains("older"), "{refused}");
        assert_eq!(s.current().unwrap().revision, 10);
        s.publish(doc(), &Overrides::default(), 10).unwrap();
        // etcd restored from a backup: the source says so explicitly, once.
        s.allow_lower_revision();
        s.publish(doc(), &Overrides::default(), 3).unwrap();
        assert_eq!(s.current().unwrap().revision, 3);
        assert!(s.publish(doc(), &Overrides::default(), 2).is_err());
    }

    #[test]
    fn acknowledged_waits_for_writes_in_flight_and_for_the_cache() {
        let s = snapshots().with_cache();
        let doc = || RawTopology::parse(DOC).unwrap();
        s.publish(doc(), &Overrides::default(), 10).unwrap();
        assert_eq!(s.acknowledged(), 0, "not cached yet");
        s.cached(10);
        assert_eq!(s.acknowledged(), 10);
        let write = crate::control::topology::WriteInFlight::new(s.current().unwrap());
        s.publish(doc(), &Overrides::default(), 12).unwrap();
        s.cached(12);
        assert_eq!(
            s.acknowledged(),
            10,
            "a write admitted under 10 is in flight"
        );
        drop(write);
        assert_eq!(s.acknowledged(), 12);
    }
}
