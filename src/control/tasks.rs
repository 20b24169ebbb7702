//! Supervised background tasks: the topology source, the health probes, the deciders, the etcd
//! registration and the listeners each run in a task watched by a supervisor. A task that
//! panics, or ends before shutdown asked it to, is logged at error, counted
//! (`shardgate_task_failures_total{task}`) and listed by `/readyz` (503 with the reason) while
//! it is not running; the tasks that are safe to start again are restarted with a backoff.
//!
//! A silent death is the worst outcome here: a dead file source stops reloads, a dead health
//! task freezes every backend's verdict, a dead leader stops failover, and the process still
//! answers `/healthz`. Restarting is only done where a fresh instance rebuilds everything it
//! needs from shared state (the published snapshot, the backends' health, etcd, the overrides
//! on disk); where it cannot (a listener owns its socket and its open connections), the task
//! stays dead and the gateway stays not ready, so an orchestrator replaces it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::telemetry::{Metrics, TaskLabels};

/// The first wait before a restart; it doubles after each failure in a row, up to
/// `MAX_BACKOFF`. A task that panics at once on every start (a bad input it meets again) is
/// then retried every few seconds instead of spinning a core.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task that ran this long before dying starts its backoff over: the failure is new.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Whether a dead task is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// A fresh instance is as good as the old one: start it again after a backoff.
    Yes,
    /// It owns what cannot be made again in place (a bound socket, open connections): it stays
    /// dead, and the gateway stays not ready.
    No,
}

/// The supervised tasks of one gateway instance.
pub struct Tasks {
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// Task name → why it is not running now. Empty when all is well.
    down: Mutex<BTreeMap<&'static str, String>>,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
    /// Test-only fault injection (debug builds only): task name → a switch that makes the
    /// running instance panic, as a bug in it would.
    #[cfg(debug_assertions)]
    faults: Mutex<BTreeMap<&'static str, Arc<tokio::sync::Notify>>>,
}

impl Tasks {
    pub fn new(metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) -> Arc<Tasks> {
        Arc::new(Tasks {
            metrics,
            shutdown,
            down: Mutex::new(BTreeMap::new()),
            supervisors: Mutex::new(Vec::new()),
            #[cfg(debug_assertions)]
            faults: Mutex::new(BTreeMap::new()),
        })
    }

    /// Runs `task` once, supervised: its death is reported, never restarted.
    pub fn spawn_once<F>(self: &Arc<Self>, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut task = Some(task);
        self.spawn(name, Restart::No, move || task.take());
    }

    /// Runs the task `start` makes, supervised, and makes a new one with `start` each time it
    /// dies (until shutdown).
    pub fn spawn_restarting<F, S>(self: &Arc<Self>, name: &'static str, mut start: S)
    where
        F: Future<Output = ()> + Send + 'static,
        S: FnMut() -> F + Send + 'static,
    {
        self.spawn(name, Restart::Yes, move || Some(start()));
    }

    fn spawn<F, S>(self: &Arc<Self>, name: &'static str, restart: Restart, mut start: S)
    where
        F: Future<Output = ()> + Send + 'static,
        S: FnMut() -> Option<F> + Send + 'static,
    {
        let tasks = self.clone();
        // Made before the supervisor runs, so a test can pull it as soon as `start` returns.
        let switch = self.fault_switch(name);
        let supervisor = tokio::spawn(async move {
            let mut shutdown = tasks.shutdown.clone();
            let mut backoff = FIRST_BACKOFF;
            while let Some(task) = start() {
                let started = Instant::now();
                let outcome = tokio::spawn(with_fault_switch(&switch, name, task)).await;
                // Asked to stop, or the gateway dropped without a shutdown (the sender is
                // gone): the end of the task is no failure.
                if *shutdown.borrow() || shutdown.has_changed().is_err() {
                    return;
                }
                let reason = match outcome {
                    Ok(()) => "ended without being asked to".to_owned(),
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e)),
                    Err(e) => format!("stopped: {e}"),
                };
                tasks
                    .metrics
                    .task_failures
                    .get_or_create(&TaskLabels { task: name })
                    .inc();
                tasks.mark_down(name, reason.clone());
                if restart == Restart::No {
                    tracing::error!(task = name, %reason, "background task died; it is not restarted (the gateway is not ready until it is replaced)");
                    return;
                }
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = FIRST_BACKOFF;
                }
                tracing::error!(task = name, %reason, restart_in_ms = backoff.as_millis() as u64, "background task died; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown_requested(&mut shutdown) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                tasks.mark_up(name);
                tracing::info!(task = name, "background task restarted");
            }
        });
        if let Ok(mut all) = self.supervisors.lock() {
            all.push(supervisor);
        }
    }

    /// The tasks not running now and why (empty when all run): `/readyz` fails on any.
    pub fn down(&self) -> BTreeMap<&'static str, String> {
        self.down.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn mark_down(&self, name: &'static str, reason: String) {
        if let Ok(mut down) = self.down.lock() {
            down.insert(name, reason);
        }
    }

    fn mark_up(&self, name: &'static str) {
        if let Ok(mut down) = self.down.lock() {
            down.remove(name);
        }
    }

    /// Waits for every supervisor (after shutdown was asked for: each returns when its task
    /// does).
    pub async fn join(&self) {
        let all = self
            .supervisors
            .lock()
            .map(|mut all| std::mem::take(&mut *all))
            .unwrap_or_default();
        for supervisor in all {
            let _ = supervisor.await;
        }
    }

    /// Makes the running instance of task `name` panic (debug builds only: a test hook, absent
    /// from release builds). False when no such task was started.
    #[cfg(debug_assertions)]
    pub fn inject_panic(&self, name: &str) -> bool {
        let Ok(faults) = self.faults.lock() else {
            return false;
        };
        match faults.get(name) {
            Some(switch) => {
                switch.notify_one();
                true
            }
            None => false,
        }
    }

    #[cfg(debug_assertions)]
    fn fault_switch(&self, name: &'static str) -> FaultSwitch {
        self.faults
            .lock()
            .map(|mut f| f.entry(name).or_default().clone())
            .unwrap_or_default()
    }

    #[cfg(not(debug_assertions))]
    fn fault_switch(&self, _name: &'static str) -> FaultSwitch {}
}

/// Pulled by `Tasks::inject_panic` (debug builds); nothing in release builds.
#[cfg(debug_assertions)]
type FaultSwitch = Arc<tokio::sync::Notify>;
#[cfg(not(debug_assertions))]
type FaultSwitch = ();

/// The task, panicking when its fault switch is pulled (debug builds).
#[cfg(debug_assertions)]
fn with_fault_switch<F>(
    switch: &FaultSwitch,
    name: &'static str,
    task: F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let switch = switch.clone();
    async move {
        tokio::select! {
            () = task => {}
            () = switch.notified() => panic!("fault injected into task {name}"),
        }
    }
}

#[cfg(not(debug_assertions))]
fn with_fault_switch<F>(_switch: &FaultSwitch, _name: &'static str, task: F) -> F {
    task
}

/// The message a panic was raised with (`panic!("…")`), when it was a string.
fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Resolves when `shutdown` turns true (or its sender is gone).
pub(crate) async fn shutdown_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn failures(metrics: &Metrics, task: &'static str) -> u64 {
        metrics
            .task_failures
            .get_or_create(&TaskLabels { task })
            .get()
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_and_restarted_when_allowed() {
        let metrics = Arc::new(Metrics::new());
        let (stop, shutdown) = watch::channel(false);
        let tasks = Tasks::new(metrics.clone(), shutdown.clone());
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        // Panics on its first start only; the second instance keeps running.
        tasks.spawn_restarting("flaky", move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let mut shutdown = shutdown.clone();
            async move {
                if n == 0 {
                    panic!("boom");
                }
                let _ = shutdown.changed().await;
            }
        });
        tasks.spawn_once("fragile", async { panic!("gone for good") });

        until("the fragile task to be reported down", || {
            tasks.down().contains_key("fragile")
        })
        .await;
        assert_eq!(tasks.down()["fragile"], "panicked: gone for good");
        assert_eq!(failures(&metrics, "fragile"), 1);
        until("the flaky task to be started again", || {
            starts.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(failures(&metrics, "flaky"), 1);
        until("the flaky task to be back up", || {
            !tasks.down().contains_key("flaky")
        })
        .await;
        assert!(
            metrics
                .encode()
                .contains("shardgate_task_failures_total{task=\"flaky\"} 1"),
            "{}",
            metrics.encode()
        );
        // Shutdown ends the supervisors; a task ending because of it is no failure.
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), tasks.join())
            .await
            .expect("the supervisors end on shutdown");
        assert_eq!(failures(&metrics, "flaky"), 1);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_task_ending_on_its_own_is_dead_too() {
        let metrics = Arc::new(Metrics::new());
        let (_stop, shutdown) = watch::channel(false);
        let tasks = Tasks::new(metrics.clone(), shutdown);
        tasks.spawn_once("quitter", async {});
        until("the quitter to be reported down", || {
            tasks.down().contains_key("quitter")
        })
        .await;
        assert_eq!(tasks.down()["quitter"], "ended without being asked to");
        assert_eq!(failures(&metrics, "quitter"), 1);
    }
}
