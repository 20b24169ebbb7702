//! The etcd topology source (DESIGN.md §6), the reload path in etcd mode: list the cluster's
//! keys once, then one watch on the prefix from the listed revision + 1. Every change to the
//! document, an override or a move rebuilds the whole effective snapshot and hands it to
//! `Snapshots::publish` with the etcd revision. A broken watch resumes from the last seen
//! revision after a capped backoff; a compacted or cancelled one re-lists. While etcd is away
//! the last good snapshot keeps serving, and every published one is cached on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::WatchResponse;
use tokio::sync::{oneshot, watch};

use super::cache::{CachedSnapshot, SnapshotCache};
use super::{Backoff, ClusterKeys, Etcd, EtcdError, KeyKind, Keys, Stored};
use crate::control::source::Snapshots;
use crate::control::tasks::shutdown_requested;
use crate::control::topology::overrides::unix_now;
use crate::control::topology::{Overrides, Problems, RawTopology};

/// How often a progress answer is asked for while the self-fence waits for this source to
/// catch up (the first ask is at once).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Where the source reads from and how.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub access: super::EtcdAccess,
    pub cluster: String,
    /// Deadline of every etcd call.
    pub timeout: Duration,
    pub cache_dir: Option<std::path::PathBuf>,
}

pub struct EtcdSource {
    settings: EtcdSettings,
    keys: Keys,
    snapshots: Arc<Snapshots>,
    cache: Option<SnapshotCache>,
    /// The cluster's keys as last seen; `None` until listed, and again after a compaction.
    state: Option<ClusterKeys>,
    /// Every event up to this revision has been seen: a new watch starts after it.
    seen: i64,
    /// Told once, when the first attempt to reach etcd has succeeded or failed.
    first: Option<oneshot::Sender<()>>,
    /// The document as the last rebuild read it, so that a change to anything else (an
    /// override, a move) reuses its parse.
    document: Option<Arc<ParsedDocument>>,
}

/// The topology document as last read from etcd: its value and what parsing it gave. Parsing
/// the 1,000-route document costs a gateway milliseconds, and an override or a move record
/// changing leaves the document's value as it was: its parse is then reused. The snapshot is
/// still validated and built in full from it and the overrides on every change.
#[derive(Debug)]
struct ParsedDocument {
    /// The document key's value; `None` when there is no document.
    value: Option<Vec<u8>>,
    /// Its parse, or why there is none.
    parsed: Result<RawTopology, Problems>,
}

impl ParsedDocument {
    /// The document of `state`: `last` again when its value is the same, else a new parse.
    fn of(state: &ClusterKeys, keys: &Keys, last: Option<Arc<ParsedDocument>>) -> Arc<Self> {
        let value = state.topology().map(|stored| &stored.value);
        match last {
            Some(last) if last.value.as_ref() == value => last,
            _ => Arc::new(ParsedDocument {
                value: value.cloned(),
                parsed: state.document(keys).map(|(_text, doc)| doc),
            }),
        }
    }

    /// The document's text (for the snapshot cache); UTF-8 whenever it parsed.
    fn text(&self) -> String {
        String::from_utf8_lossy(self.value.as_deref().unwrap_or_default()).into_owned()
    }
}

impl EtcdSource {
    pub fn new(settings: EtcdSettings, snapshots: Arc<Snapshots>) -> EtcdSource {
        let keys = Keys::new(&settings.cluster);
        let cache = settings
            .cache_dir
            .as_deref()
            .map(|d| SnapshotCache::new(d, &settings.cluster));
        EtcdSource {
            settings,
            keys,
            snapshots,
            cache,
            state: None,
            seen: 0,
            first: None,
            document: None,
        }
    }

    /// Resolves when the first attempt to reach etcd is over (either way), so `start()` can
    /// wait for etcd's view without waiting for etcd forever.
    pub fn first_attempt(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.first = Some(tx);
        rx
    }

    /// Publishes the cached snapshot, if there is a usable one: what serves until etcd answers.
    pub fn load_cache(&mut self) {
        let Some(cache) = &self.cache else {
            return;
        };
        let cached = match cache.load() {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the snapshot cache");
                return;
            }
        };
        if cached.cluster != self.settings.cluster {
            tracing::warn!(
                path = %cache.path().display(),
                cached = %cached.cluster,
                cluster = %self.settings.cluster,
                "the snapshot cache is of another cluster; ignoring it"
            );
            return;
        }
        let doc = match RawTopology::parse(&cached.document) {
            Ok(doc) => doc,
            Err(problems) => {
                tracing::warn!(%problems, "the cached document does not parse; ignoring the cache");
                return;
            }
        };
        if self
            .snapshots
            .publish(doc, &cached.overrides, cached.revision)
            .is_ok()
        {
            tracing::info!(
                revision = cached.revision,
                path = %cache.path().display(),
                "serving the cached snapshot until etcd answers"
            );
        }
    }

    /// Lists, watches and publishes until `shutdown` turns true. Never returns an error: etcd
    /// being away is reported (`/status`, metric, log) and retried with backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new();
        let mut outage_logged = false;
        loop {
            let err = tokio::select! {
                err = self.session(&mut backoff) => err,
                _ = shutdown_requested(&mut shutdown) => return,
            };
            if self.snapshots.source_up() {
                outage_logged = false;
            }
            self.snapshots.set_source_up(false);
            // Events may be missed from now on: writes wait until the source has caught up
            // again (the self-fence).
            self.snapshots.self_fence().source_lost();
            if self.snapshots.current().is_none() {
                let cache = self.cache.as_ref().map_or_else(
                    || "no --cache-dir".to_owned(),
                    |c| format!("no usable cache at {}", c.path().display()),
                );
                self.snapshots
                    .note_not_ready(format!("no topology yet: {err}; {cache}"));
            }
            // Told after the reason is noted: `start()` may return on it, and /readyz must
            // already say why it is not ready.
            if let Some(first) = self.first.take() {
                let _ = first.send(());
            }
            if outage_logged {
                tracing::debug!(error = %err, "etcd still unreachable");
            } else {
                tracing::warn!(error = %err, "etcd unreachable; serving the last good snapshot and retrying");
                outage_logged = true;
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown_requested(&mut shutdown) => return,
            }
        }
    }

    /// One connection: (re-)list if needed, then one watch; returns why it broke.
    async fn session(&mut self, backoff: &mut Backoff) -> EtcdError {
        let etcd = match Etcd::connect(&self.settings.access, self.settings.timeout).await {
            Ok(e) => e,
            Err(e) => return e,
        };
        if self.state.is_some() {
            // Resuming needs etcd's history to still reach back to what we saw. An etcd whose
            // revision is behind ours was restored or replaced: only a fresh list is true.
            match etcd.revision(&self.keys).await {
                Ok(now) if now < self.seen => {
                    tracing::error!(
                        seen = self.seen,
                        revision = now,
                        "etcd's revision is behind the last one seen (restored or replaced?); re-listing, and serving its older revision"
                    );
                    self.state = None;
                    self.seen = 0;
                    self.snapshots.allow_lower_revision();
                }
                Ok(_) => {}
                Err(e) => return e,
            }
        }
        loop {
            if self.state.is_none() {
                let listed = match etcd.list(&self.keys).await {
                    Ok(l) => l,
                    Err(e) => return e,
                };
                let revision = listed.revision;
                self.seen = revision;
                self.state = Some(listed);
                self.report_gateways();
                self.rebuild(revision).await;
                self.caught_up(revision);
                self.mark_up();
            }
            let (mut requests, mut stream) = match etcd.watch(&self.keys, self.seen + 1).await {
                Ok(s) => s.split(),
                Err(e) => return e,
            };
            // A resumed watch delivers what was missed before etcd's answer to a progress
            // request: that answer says the snapshot is caught up to its revision. Asked again
            // while writes wait for it (an etcd may hold the answer while the watch catches up).
            let mut ask = tokio::time::interval(PROGRESS_EVERY);
            self.mark_up();
            backoff.reset();
            loop {
                let message = loop {
                    tokio::select! {
                        m = stream.message() => break m,
                        _ = ask.tick() => {
                            if self.snapshots.self_fence().check()
                                == Err(crate::control::self_fence::Closed::CatchingUp)
                            {
                                let progress = requests.request_progress();
                                if let Err(e) = etcd.call("request watch progress", progress).await {
                                    return e;
                                }
                            }
                        }
                    }
                };
                let resp = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return EtcdError(format!(
                            "etcd at {}: the watch stream ended",
                            etcd.endpoints()
                        ))
                    }
                    Err(e) => {
                        return EtcdError(format!(
                            "etcd at {}: the watch broke: {e}",
                            etcd.endpoints()
                        ))
                    }
                };
                if resp.compact_revision() > 0 {
                    // The revisions we would resume from are gone: only a fresh list can say
                    // what the cluster holds now.
                    tracing::warn!(
                        seen = self.seen,
                        compact_revision = resp.compact_revision(),
                        "the watch revision was compacted; re-listing"
                    );
                    self.state = None;
                    break;
                }
                if resp.canceled() {
                    // Cancelled for another reason: re-list, but through the backoff, so a
                    // watch that etcd keeps refusing cannot turn into a busy loop.
                    self.state = None;
                    return EtcdError(format!(
                        "etcd at {}: the watch was cancelled: {}",
                        etcd.endpoints(),
                        resp.cancel_reason()
                    ));
                }
                let progress_only = resp.events().is_empty() && !resp.created();
                let (shaping, gateways) = self.apply(&resp);
                if gateways {
                    self.report_gateways();
                }
                if let Some(revision) = shaping {
                    self.rebuild(revision).await;
                }
                if progress_only {
                    // Every event up to the header's revision has been delivered before it.
                    if let Some(h) = resp.header() {
                        self.seen = self.seen.max(h.revision());
                    }
                }
                self.caught_up(self.seen);
            }
        }
    }

    /// Every event up to `revision` is in the published snapshot.
    fn caught_up(&self, revision: i64) {
        self.snapshots
            .self_fence()
            .seen(u64::try_from(revision).unwrap_or(0));
    }

    fn mark_up(&mut self) {
        if !self.snapshots.source_up() {
            tracing::info!(endpoints = ?self.settings.access.endpoints, revision = self.seen, "etcd reachable; watching the cluster");
        }
        self.snapshots.set_source_up(true);
        if let Some(first) = self.first.take() {
            let _ = first.send(());
        }
    }

    /// Applies a batch of events to the keys: the revision of the last one that shapes the
    /// snapshot (when any did), and whether a gateway registration changed.
    fn apply(&mut self, resp: &WatchResponse) -> (Option<i64>, bool) {
        let Some(state) = self.state.as_mut() else {
            return (None, false);
        };
        let mut shaping = None;
        let mut gateways = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else {
                continue;
            };
            let revision = kv.mod_revision();
            self.seen = self.seen.max(revision);
            state.revision = state.revision.max(revision);
            let Some(name) = self.keys.relative(kv.key()) else {
                continue;
            };
            // A delete event carries the key with version 0, a put always has version >= 1.
            // Read that way because `Event::event_type` panics on a type it does not know.
            if kv.version() == 0 {
                state.keys.remove(name);
            } else {
                state.keys.insert(
                    name.to_owned(),
                    Stored {
                        value: kv.value().to_vec(),
                        mod_revision: revision,
                    },
                );
            }
            match KeyKind::of(name) {
                KeyKind::Gateway(_) | KeyKind::Leader => gateways = true,
                kind if kind.shapes_snapshot() => shaping = Some(revision),
                _ => {}
            }
        }
        (shaping, gateways)
    }

    /// Hands the registered gateways to `/status`.
    fn report_gateways(&self) {
        let Some(state) = &self.state else {
            return;
        };
        let gateways = state
            .gateways()
            .into_iter()
            .map(|(instance, record)| match record {
                Ok(r) => serde_json::json!({
                    "instance": instance,
                    "idc": r.idc,
                    "addr": r.addr,
                    "applied_revision": r.applied_revision,
                    "view": r.view,
                }),
                Err(e) => serde_json::json!({"instance": instance, "error": e}),
            })
            .collect();
        self.snapshots.set_gateways(gateways);
        self.snapshots.set_leader(state.leader());
    }

    /// Rebuilds the whole effective snapshot from the keys and publishes it as `revision`.
    async fn rebuild(&mut self, revision: i64) {
        let Some(state) = &self.state else {
            return;
        };
        let revision = u64::try_from(revision).unwrap_or(0);
        let (state, keys, snapshots) = (state.clone(), self.keys.clone(), self.snapshots.clone());
        let last = self.document.take();
        // Parsing and building a large topology takes tens of milliseconds of CPU: done off the
        // async workers, so the requests they serve are not held up (with `--threads 1` there
        // is only one). Awaited, so snapshots are still published in revision order.
        let rebuilt = tokio::task::spawn_blocking(move || {
            let document = ParsedDocument::of(&state, &keys, last);
            let overrides = match state.overrides(&keys) {
                Ok(o) => o,
                Err(problems) => {
                    snapshots.reject(&problems, revision);
                    return (document, None);
                }
            };
            let problems = match &document.parsed {
                Ok(doc) => match snapshots.publish(doc.clone(), &overrides, revision) {
                    Ok(_) => return (document.clone(), Some((document.text(), overrides))),
                    // Logged, counted and shown by `publish`.
                    Err(problems) => problems,
                },
                Err(problems) => {
                    snapshots.reject(problems, revision);
                    problems.clone()
                }
            };
            keep_document_apply_overrides(&snapshots, &overrides, revision, &problems);
            (document, None)
        })
        .await;
        // A rebuild that panicked leaves no document behind: the next one parses again.
        let published = rebuilt.ok().and_then(|(document, published)| {
            self.document = Some(document);
            published
        });
        let Some((text, overrides)) = published else {
            // Nothing new was cached: either nothing was published, or overrides were applied
            // on the last good document (not cacheable; a boot from the cache keeps writes
            // fenced until etcd answers, so that revision may be acknowledged).
            self.snapshots.cached(revision);
            return;
        };
        if let Some(cache) = &self.cache {
            let snapshot = CachedSnapshot {
                cluster: self.settings.cluster.clone(),
                revision,
                document: text,
                overrides,
                written_at: unix_now(),
            };
            store_cache(cache.clone(), snapshot).await;
        }
        // Acknowledged only now: a restart never boots from a cache older than a revision
        // this gateway has announced as applied.
        self.snapshots.cached(revision);
    }
}

/// The document in etcd is invalid, but the overrides may have changed with it or after it (an
/// operator's `failover` during an incident must not wait for someone to fix the document):
/// they are applied on top of the last good document, while the document's problems stay
/// reported. Not cached: the cache holds a document and the overrides that were valid with it.
fn keep_document_apply_overrides(
    snapshots: &Snapshots,
    overrides: &Overrides,
    revision: u64,
    problems: &Problems,
) {
    let Some(current) = snapshots.current() else {
        return;
    };
    // The revision of the document in effect, not of the invalid one (owner epochs).
    let overrides = &overrides.on_document_of(&current.overrides);
    if current.overrides == *overrides {
        return;
    }
    match snapshots.publish(current.document.clone(), overrides, revision) {
        Ok(_) => {
            tracing::warn!(revision, "overrides applied on the last good document; the document in etcd is still invalid");
            snapshots.note_problem(problems);
        }
        Err(p) => {
            tracing::error!(revision, problems = %p, "overrides rejected with the last good document too")
        }
    }
}

/// Writes the cache off the async workers (it fsyncs), and waits, so writes stay in order.
async fn store_cache(cache: SnapshotCache, snapshot: CachedSnapshot) {
    let path = cache.path().to_owned();
    let result = tokio::task::spawn_blocking(move || cache.store(&snapshot)).await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => cache_error(&path, &e.to_string()),
        Err(e) => cache_error(&path, &e.to_string()),
    }
}

/// A cache that could not be updated is removed rather than left stale: a restart then waits
/// for etcd instead of serving an ownership older than what this gateway acknowledged.
fn cache_error(path: &Path, error: &str) {
    let removed = std::fs::remove_file(path).is_ok();
    tracing::error!(path = %path.display(), error, removed, "cannot write the snapshot cache; a restart while etcd is down will not serve until etcd answers");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn document(idc: &str) -> String {
        format!(
            "cluster = \"c\"\nshard_count = 16\n[sets.core]\n\
             [[idcs]]\nname = \"sh\"\npools.core = [\"127.0.0.1:7000\"]\n\
             [[idcs]]\nname = \"bj\"\npools.core = [\"127.0.0.1:7001\"]\n\
             [[shards.pins]]\nrange = \"0-15\"\nidc = \"{idc}\"\n\
             [[routes]]\nname = \"r\"\npath_prefix = \"/\"\nset = \"core\"\nkey = [\"header:k\"]\n"
        )
    }

    fn put(source: &mut EtcdSource, key: &str, value: &str, revision: i64) {
        let state = source.state.get_or_insert_with(ClusterKeys::default);
        state.revision = revision;
        state.keys.insert(
            key.to_owned(),
            Stored {
                value: value.as_bytes().to_vec(),
                mod_revision: revision,
            },
        );
    }

    #[tokio::test]
    async fn an_override_change_reuses_the_parsed_document_and_a_document_change_parses_again() {
        let snapshots = Arc::new(Snapshots::new("etcd", None, Arc::new(Metrics::new())));
        let settings = EtcdSettings {
            access: super::super::EtcdAccess {
                endpoints: vec!["http://127.0.0.1:1".into()],
                ..Default::default()
            },
            cluster: "c".into(),
            timeout: Duration::from_secs(1),
            cache_dir: None,
        };
        let mut source = EtcdSource::new(settings, snapshots.clone());
        put(&mut source, "topology", &document("sh"), 1);
        source.rebuild(1).await;
        let parsed = source.document.clone().unwrap();
        assert_eq!(snapshots.current().unwrap().revision, 1);

        // An override only: the same parse, and the override is in the published snapshot.
        put(
            &mut source,
            "override/degrade/core",
            r#"{"on":true,"reason":"test"}"#,
            2,
        );
        source.rebuild(2).await;
        assert!(Arc::ptr_eq(&parsed, source.document.as_ref().unwrap()));
        let served = snapshots.current().unwrap();
        assert_eq!(served.revision, 2);
        assert!(served.overrides.degrade["core"].on);

        // The document itself: parsed again, and the new pin is served.
        put(&mut source, "topology", &document("bj"), 3);
        source.rebuild(3).await;
        assert!(!Arc::ptr_eq(&parsed, source.document.as_ref().unwrap()));
        let served = snapshots.current().unwrap();
        assert_eq!(served.revision, 3);
        assert_eq!(served.document.shards.pins[0].idc, "bj");
        assert!(served.overrides.degrade["core"].on);

        // An invalid document is parsed once too: an override after it reuses the failed
        // parse, and is applied on the last good document.
        put(&mut source, "topology", "not toml [", 4);
        source.rebuild(4).await;
        let failed = source.document.clone().unwrap();
        assert!(failed.parsed.is_err());
        put(
            &mut source,
            "override/degrade/core",
            r#"{"on":false,"reason":"test"}"#,
            5,
        );
        source.rebuild(5).await;
        assert!(Arc::ptr_eq(&failed, source.document.as_ref().unwrap()));
        let served = snapshots.current().unwrap();
        assert_eq!(served.revision, 5);
        assert!(!served.overrides.degrade["core"].on);
        assert_eq!(served.document.shards.pins[0].idc, "bj");
    }
}
