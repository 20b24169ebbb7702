//! This gateway's health view (DESIGN.md §5): active probes per backend ([`probe`]) and passive
//! outlier ejection from real traffic ([`BackendHealth`], fed by `forward`) decide which
//! backends get traffic; an IDC is healthy when its `core` pool has at least `min_healthy` of
//! its backends in service. The view is published to `/status`, the metrics and the etcd
//! registration, and watched by whoever decides failover.

mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use probe::probe;

use crate::control::source::Snapshots;
use crate::control::topology::{HealthSpec, Topology};
use crate::data::upstream::health::BackendHealth;
use crate::data::upstream::tls::UpstreamTls;
use crate::telemetry::{BackendLabels, IdcLabels, Metrics, TaskLabels};

/// Where a decision reads this gateway's health view (IDC name → healthy) from: the file-mode
/// failover controller and move driver ask it when they decide. `Health::idc_view` in the
/// gateway; a plain closure in tests.
pub type ViewSource = Arc<dyn Fn() -> BTreeMap<String, bool> + Send + Sync>;

/// How often the view is re-evaluated besides probe flips and publishes: passive ejections
/// and their expiry happen on the request path and are picked up within this.
const EVALUATE_EVERY: Duration = Duration::from_millis(100);

/// Whether a pool with `in_service` of `total` backends in service counts as healthy: at least
/// `min_healthy` of them, and never zero (a pool with nothing in service is dead whatever the
/// fraction says). A pool with no backends has nothing to judge.
pub fn pool_healthy(in_service: usize, total: usize, min_healthy: f64) -> bool {
    total == 0 || (in_service > 0 && in_service as f64 >= min_healthy * total as f64)
}

/// IDC name → healthy, from the backends' state now: the `core` pool decides.
pub fn view_of(t: &Topology) -> BTreeMap<String, bool> {
    let core = t.sets.iter().position(|s| s.name.as_str() == "core");
    t.idcs
        .iter()
        .map(|idc| {
            let pool = core.map_or(&[][..], |c| idc.pools.get(c).map_or(&[][..], |p| &p[..]));
            let up = pool.iter().filter(|b| b.health.in_service()).count();
            let healthy = pool_healthy(up, pool.len(), t.failover.min_healthy);
            (idc.name.to_string(), healthy)
        })
        .collect()
}

/// The health view and the probes behind it. One per gateway, made in `lib::start`.
pub struct Health {
    snapshots: Arc<Snapshots>,
    metrics: Arc<Metrics>,
    view: Mutex<BTreeMap<String, bool>>,
    changes: watch::Sender<u64>,
    /// Told by a probe task when a backend's verdict flips, so the view follows at once.
    flipped: Arc<Notify>,
}

/// A backend identity: IDC name + address.
type BackendKey = (Arc<String>, SocketAddr);

/// A running probe task; dropping it stops the probing.
struct Probe {
    health: Arc<BackendHealth>,
    spec: HealthSpec,
    /// The TLS it speaks, and its identity (`UpstreamTls::id`, 0 for plain TCP): a new CA or
    /// server name restarts the probe, like it gets the traffic new connections.
    tls: Option<Arc<UpstreamTls>>,
    tls_id: u64,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Health {
    pub fn new(snapshots: Arc<Snapshots>, metrics: Arc<Metrics>) -> Arc<Health> {
        let view = snapshots.current().map(|t| view_of(&t)).unwrap_or_default();
        Arc::new(Health {
            snapshots,
            metrics,
            view: Mutex::new(view),
            changes: watch::channel(0).0,
            flipped: Arc::new(Notify::new()),
        })
    }

    /// This gateway's view: IDC name → healthy (core pool ≥ min_healthy healthy backends).
    pub fn idc_view(&self) -> BTreeMap<String, bool> {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Bumped on every change of an IDC's health in this view.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// One IDC's health in this view (`None` for an IDC the view does not know yet).
    pub fn idc_healthy(&self, idc: &str) -> Option<bool> {
        self.view.lock().ok()?.get(idc).copied()
    }

    /// Probes the backends the published snapshot names and keeps the view current, until
    /// `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut revisions = self.snapshots.subscribe();
        let mut probes: HashMap<BackendKey, Probe> = HashMap::new();
        let mut dead_pools: HashSet<(String, String)> = HashSet::new();
        let mut tick = tokio::time::interval(EVALUATE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.sync(&mut probes);
        loop {
            tokio::select! {
                _ = tick.tick() => self.revive_probes(&mut probes),
                _ = self.flipped.notified() => {}
                changed = revisions.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.sync(&mut probes);
                }
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
            if *shutdown.borrow() {
                break;
            }
            self.evaluate(&mut dead_pools);
        }
    }

    /// Starts probing every backend the current snapshot names, restarts probes whose IDC's
    /// `health` settings changed, and stops those no snapshot names any more. Probe state lives
    /// in the shared `BackendHealth`, so none of this forgets what the probes have seen.
    fn sync(&self, probes: &mut HashMap<BackendKey, Probe>) {
        let Some(t) = self.snapshots.current() else {
            return;
        };
        type Wanted<'a> = (Arc<BackendHealth>, &'a HealthSpec, Option<Arc<UpstreamTls>>);
        let mut wanted: HashMap<BackendKey, Wanted<'_>> = HashMap::new();
        for idc in &t.idcs {
            for b in idc.pools.iter().flat_map(|p| p.iter()) {
                // TLS is the IDC's, so every pool listing this address agrees on it.
                wanted
                    .entry((idc.name.clone(), b.addr))
                    .or_insert_with(|| (b.health.clone(), &idc.health, b.tls().cloned()));
            }
        }
        probes.retain(|key, _| {
            let keep = wanted.contains_key(key);
            if !keep {
                tracing::debug!(idc = %key.0, backend = %key.1, "no snapshot names the backend: probing stopped");
            }
            keep
        });
        for (key, (health, spec, tls)) in wanted {
            let tls_id = tls.as_ref().map_or(0, |t| t.id());
            let current = probes.get(&key).is_some_and(|p| {
                Arc::ptr_eq(&p.health, &health) && p.spec == *spec && p.tls_id == tls_id
            });
            if !current {
                let task = tokio::spawn(probe::run(
                    health.clone(),
                    spec.clone(),
                    tls.clone(),
                    self.flipped.clone(),
                ));
                probes.insert(
                    key,
                    Probe {
                        health,
                        spec: spec.clone(),
                        tls,
                        tls_id,
                        task,
                    },
                );
            }
        }
        // Backends or IDCs that left the topology leave the metrics.
        self.metrics.backend_healthy.clear();
        self.metrics.idc_healthy.clear();
    }

    /// Starts again every probe task that died. A probe loops until aborted, so a finished
    /// task panicked; left alone, its backend's verdict would freeze where it was. Logged and
    /// counted like the gateway's other tasks (`task_failures{task="health_probe"}`); not a
    /// readiness matter, since it is back at once.
    fn revive_probes(&self, probes: &mut HashMap<BackendKey, Probe>) {
        for ((idc, addr), p) in probes.iter_mut() {
            if !p.task.is_finished() {
                continue;
            }
            tracing::error!(idc = %idc, backend = %addr, "health probe task died; restarting it");
            self.metrics
                .task_failures
                .get_or_create(&TaskLabels {
                    task: "health_probe",
                })
                .inc();
            p.task = tokio::spawn(probe::run(
                p.health.clone(),
                p.spec.clone(),
                p.tls.clone(),
                self.flipped.clone(),
            ));
        }
    }

    /// Recomputes the view from the backends' state; publishes it when an IDC changed.
    fn evaluate(&self, dead_pools: &mut HashSet<(String, String)>) {
        let Some(t) = self.snapshots.current() else {
            return;
        };
        for idc in &t.idcs {
            for (pool, set) in idc.pools.iter().zip(&t.sets) {
                let mut up = 0;
                for b in pool.iter() {
                    let in_service = b.health.in_service();
                    up += usize::from(in_service);
                    self.metrics
                        .backend_healthy
                        .get_or_create(&BackendLabels {
                            idc: idc.name.clone(),
                            set: set.name.clone(),
                            backend: b.addr.to_string(),
                        })
                        .set(i64::from(in_service));
                }
                // Never silently: a pool with nothing in service gets no traffic at all (no
                // fail-open), so its going and coming back are logged loudly.
                let key = (idc.name.to_string(), set.name.to_string());
                let dead = !pool.is_empty() && up == 0;
                if dead && dead_pools.insert(key.clone()) {
                    tracing::error!(idc = %key.0, set = %key.1, backends = pool.len(), "every backend of the pool is unhealthy or ejected: the pool gets no traffic (reads spill, other requests get 502)");
                } else if !dead && dead_pools.remove(&key) {
                    tracing::info!(idc = %key.0, set = %key.1, in_service = up, "the pool has backends in service again");
                }
            }
        }
        let view = view_of(&t);
        for (idc, healthy) in &view {
            self.metrics
                .idc_healthy
                .get_or_create(&IdcLabels {
                    idc: Arc::new(idc.clone()),
                })
                .set(i64::from(*healthy));
        }
        let Ok(mut current) = self.view.lock() else {
            return;
        };
        if *current == view {
            return;
        }
        for (idc, healthy) in &view {
            match (current.get(idc), healthy) {
                (Some(true) | None, false) => {
                    tracing::warn!(idc = %idc, min_healthy = t.failover.min_healthy, "IDC unhealthy in this gateway's view: too few core backends in service")
                }
                (Some(false), true) => {
                    tracing::info!(idc = %idc, "IDC healthy again in this gateway's view")
                }
                _ => {}
            }
        }
        *current = view;
        drop(current);
        self.changes.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_probe_task_is_counted_and_started_again() {
        let metrics = Arc::new(Metrics::new());
        let snapshots = Arc::new(Snapshots::new("file", None, metrics.clone()));
        let health = Health::new(snapshots, metrics.clone());
        // A port nothing listens on: the revived probe fails its probes, harmlessly.
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let dead = tokio::spawn(async { panic!("a bug in a probe") });
        while !dead.is_finished() {
            tokio::task::yield_now().await;
        }
        let mut probes = HashMap::new();
        let key: BackendKey = (Arc::new("sh".to_owned()), addr);
        probes.insert(
            key.clone(),
            Probe {
                health: Arc::new(BackendHealth::new("sh", addr)),
                spec: HealthSpec {
                    path: "/healthz".into(),
                    interval: Duration::from_secs(60),
                    timeout: Duration::from_millis(300),
                    rise: 2,
                    fall: 3,
                },
                tls: None,
                tls_id: 0,
                task: dead,
            },
        );
        health.revive_probes(&mut probes);
        assert!(!probes[&key].task.is_finished(), "the probe runs again");
        let failures = |m: &Metrics| {
            m.task_failures
                .get_or_create(&TaskLabels {
                    task: "health_probe",
                })
                .get()
        };
        assert_eq!(failures(&metrics), 1);
        // A running probe is left alone.
        health.revive_probes(&mut probes);
        assert_eq!(failures(&metrics), 1);
    }

    #[test]
    fn a_pool_needs_min_healthy_of_its_backends_and_at_least_one() {
        assert!(pool_healthy(2, 4, 0.5));
        assert!(!pool_healthy(1, 4, 0.5));
        assert!(pool_healthy(3, 4, 0.75));
        assert!(!pool_healthy(2, 3, 0.75));
        assert!(pool_healthy(1, 1, 0.5));
        assert!(!pool_healthy(0, 1, 0.5));
        // A fraction of zero still needs one backend in service: a dead pool is dead.
        assert!(!pool_healthy(0, 4, 0.0));
        assert!(pool_healthy(1, 4, 0.0));
        assert!(pool_healthy(0, 0, 0.5));
    }
}
