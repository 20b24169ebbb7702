//! Admission (DESIGN.md §2, §5 "Isolation and degradation"): after the routing decision and
//! before forwarding, in this order: set budget (and priority shedding) · rate limit · degrade
//! switch · circuit breaker. `Admission::admit` answers with a `Permit` or a `Refusal`.
//!
//! The decisions are pure functions (`shed_probability`, `Breaker`, `Bucket`). What depends
//! only on the topology (capacity, shedding ranks, the `[isolation]` knobs, which routes a
//! degrade switch covers) is resolved when the snapshot is built; the state they act on lives
//! here, beside the snapshot, keyed by stable names (set, route, (IDC, set)), so it survives
//! reloads.

mod breaker;
mod bucket;
mod resolved;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{json, Value};

pub use breaker::{Breaker, BreakerState, Pass};
pub use bucket::Bucket;
pub use resolved::Resolved;

use crate::control::topology::{
    Fallback, IdcId, IsolationSpec, RateLimitSpec, Route, RouteId, SetSpec, Topology,
};
use crate::telemetry::{IdcSetLabels, Metrics, RefusedLabels, SetLabels};

/// Why a request was not admitted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("set `{set}` is at its in-flight budget on this gateway")]
    SetFull { set: String },
    #[error("the gateway is overloaded and sheds set `{set}` first")]
    Shed { set: String },
    #[error("route `{route}` is over its rate limit")]
    RateLimited { route: String, retry_after_s: u32 },
    /// By an operator's switch (`target` is the set or `route:<name>`), or automatically.
    #[error("`{target}` is degraded")]
    Degraded {
        target: String,
        fallback: Option<Box<Fallback>>,
    },
    #[error("the circuit breaker of set `{set}` in IDC {idc} is open")]
    CircuitOpen {
        idc: String,
        set: String,
        retry_after_s: u32,
    },
    /// A write for a shard that a planned move has fenced (decided by the proxy from the
    /// snapshot, not by `admit`, but counted and answered like every refusal).
    #[error("shard {shard} is moving to a new owner: writes are fenced until it is published")]
    Fenced { shard: u32, retry_after_s: u32 },
    /// This gateway cannot be sure the cluster waits for it (its etcd registration is lost,
    /// unconfirmed or not caught up): it writes nothing until it is (`self_fence`).
    #[error("shard {shard}: this gateway fences its writes: {why}")]
    SelfFenced {
        shard: u32,
        why: &'static str,
        retry_after_s: u32,
    },
}

impl Refusal {
    /// `x-shardgate-reason`, and the `reason` label of `shardgate_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::SetFull { .. } => "set_full",
            Refusal::Shed { .. } => "shed",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Degraded { .. } => "degraded",
            Refusal::CircuitOpen { .. } => "circuit_open",
            Refusal::Fenced { .. } | Refusal::SelfFenced { .. } => "fenced",
        }
    }
}

/// A set's bulkhead on this instance.
struct SetState {
    inflight: AtomicU32,
    requests: AtomicU64,
    retries: AtomicU64,
    /// Retry budget in thousandths of a retry.
    retry_tokens: AtomicI64,
    gauge: Gauge,
}

/// The retry budget of one set, handed to `forward`.
pub struct RetryBudget<'a> {
    set: &'a SetState,
    reserve_milli: i64,
}

impl RetryBudget<'_> {
    /// Spends one retry if the set has one left.
    pub fn try_retry(&self) -> bool {
        let ok = self
            .set
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= 1000).then_some(t - 1000)
            })
            .is_ok();
        if ok {
            self.set.retries.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn deposit(&self, milli: i64) {
        let cap = self.reserve_milli;
        let _ = self
            .set
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + milli).min(cap))
            });
    }
}

/// A breaker and its gauge.
struct BreakerCell {
    breaker: Mutex<Breaker>,
    gauge: Gauge,
}

/// An admitted request: holds its set's in-flight slot until dropped, and reports the
/// upstream outcome to the breaker.
pub struct Permit {
    set: Arc<SetState>,
    total: Arc<AtomicU32>,
    breaker: Arc<BreakerCell>,
    probe: bool,
    settings: IsolationSpec,
}

impl Permit {
    pub fn retry_budget(&self) -> RetryBudget<'_> {
        RetryBudget {
            set: &self.set,
            reserve_milli: i64::from(self.settings.retry_reserve) * 1000,
        }
    }

    /// The upstream outcome: `failure` is a system failure (connect error, timeout, 5xx).
    pub fn record(&self, failure: bool) {
        if let Ok(mut b) = self.breaker.breaker.lock() {
            b.record(Instant::now(), failure, self.probe, &self.settings.breaker);
            self.breaker.gauge.set(b.state().gauge());
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.set.inflight.fetch_sub(1, Ordering::Relaxed);
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.set.gauge.dec();
    }
}

/// The admission state of one gateway instance.
pub struct Admission {
    /// The handles of the snapshot requests were last admitted with: resolved by name once
    /// per snapshot, indexed by every later request of it (state outlives snapshots; lookups
    /// need not).
    resolved: ArcSwapOption<Resolved>,
    metrics: Arc<Metrics>,
    total: Arc<AtomicU32>,
    sets: RwLock<HashMap<String, Arc<SetState>>>,
    buckets: Mutex<HashMap<String, Arc<Mutex<Bucket>>>>,
    /// IDC name → set name → breaker.
    breakers: RwLock<HashMap<String, HashMap<String, Arc<BreakerCell>>>>,
}

/// The chance that a request of a set is shed at instance `load` (total in-flight ÷ the sum of
/// set budgets). Sets with priority 0 are never shed (only their own budget refuses them).
/// The other priorities shed in steps, least important first: with `tiers` distinct non-zero
/// priorities, tier `rank` (0 = highest priority number) ramps linearly from 0 to 1 over its
/// own slice of `[start, 1]`, so `noncore` is fully shed before `subcore` starts to be.
pub fn shed_probability(load: f64, priority: u32, rank: usize, tiers: usize, start: f64) -> f64 {
    if priority == 0 || tiers == 0 {
        return 0.0;
    }
    let width = (1.0 - start).max(0.0) / tiers as f64;
    let from = start + width * rank as f64;
    if width <= 0.0 {
        return if load >= start { 1.0 } else { 0.0 };
    }
    ((load - from) / width).clamp(0.0, 1.0)
}

/// Graceful degradation without an operator: a request of a `degradable` set that the gateway
/// cannot serve under stress (set full, shed, breaker open) answers its route's `fallback`
/// instead of a bare 503, when the route has one. Other sets, routes without a fallback, and
/// rate limits (a contract with the client, not stress) keep the refusal.
fn degrade_automatically(refusal: Refusal, spec: &SetSpec, route: &Route) -> Refusal {
    let stress = matches!(
        refusal,
        Refusal::SetFull { .. } | Refusal::Shed { .. } | Refusal::CircuitOpen { .. }
    );
    match &route.fallback {
        Some(fallback) if stress && spec.degradable => Refusal::Degraded {
            target: format!("{} (automatically: {})", spec.name, refusal.reason()),
            fallback: Some(Box::new(fallback.clone())),
        },
        _ => refusal,
    }
}

fn secs_ceil(d: Duration) -> u32 {
    (d.as_millis().div_ceil(1000) as u32).max(1)
}

impl Admission {
    pub fn new(metrics: Arc<Metrics>) -> Admission {
        Admission {
            resolved: ArcSwapOption::empty(),
            metrics,
            total: Arc::new(AtomicU32::new(0)),
            sets: RwLock::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            breakers: RwLock::new(HashMap::new()),
        }
    }

    /// The set's state; a new set starts with a full retry reserve.
    fn set_state(&self, name: &Arc<String>, retry_reserve: u32) -> Arc<SetState> {
        if let Some(s) = self
            .sets
            .read()
            .ok()
            .and_then(|m| m.get(name.as_str()).cloned())
        {
            return s;
        }
        let fresh = || {
            Arc::new(SetState {
                inflight: AtomicU32::new(0),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
                retry_tokens: AtomicI64::new(i64::from(retry_reserve) * 1000),
                gauge: self
                    .metrics
                    .inflight
                    .get_or_create(&SetLabels { set: name.clone() })
                    .clone(),
            })
        };
        match self.sets.write() {
            Ok(mut m) => m.entry(name.to_string()).or_insert_with(fresh).clone(),
            Err(_) => fresh(),
        }
    }

    fn breaker(&self, idc: &Arc<String>, set: &Arc<String>) -> Arc<BreakerCell> {
        if let Some(b) = self.breakers.read().ok().and_then(|m| {
            m.get(idc.as_str())
                .and_then(|s| s.get(set.as_str()))
                .cloned()
        }) {
            return b;
        }
        let fresh = || {
            let gauge = self
                .metrics
                .breaker_state
                .get_or_create(&IdcSetLabels {
                    idc: idc.clone(),
                    set: set.clone(),
                })
                .clone();
            Arc::new(BreakerCell {
                breaker: Mutex::new(Breaker::new(Instant::now())),
                gauge,
            })
        };
        match self.breakers.write() {
            Ok(mut m) => m
                .entry(idc.to_string())
                .or_default()
                .entry(set.to_string())
                .or_insert_with(fresh)
                .clone(),
            Err(_) => fresh(),
        }
    }

    /// The route's bucket: kept while its limit is unchanged, a new full one otherwise.
    fn bucket(&self, route: &str, limit: &RateLimitSpec) -> Arc<Mutex<Bucket>> {
        let fresh = || Arc::new(Mutex::new(Bucket::new(limit, Instant::now())));
        let Ok(mut buckets) = self.buckets.lock() else {
            return fresh();
        };
        let bucket = buckets.entry(route.to_owned()).or_insert_with(fresh);
        if !bucket.lock().is_ok_and(|b| b.same_limit(limit)) {
            *bucket = fresh();
        }
        bucket.clone()
    }

    /// Looks up by name the state every set and rate-limited route of `topo` uses.
    fn resolve(&self, topo: &Topology) -> Resolved {
        let reserve = topo.isolation.retry_reserve;
        Resolved {
            snapshot: topo.build_id,
            sets: topo
                .sets
                .iter()
                .map(|s| self.set_state(&s.name, reserve))
                .collect(),
            breakers: (0..topo.idcs.len() * topo.sets.len())
                .map(|_| OnceLock::new())
                .collect(),
            buckets: topo
                .routes
                .iter()
                .map(|r| r.rate_limit.as_ref().map(|l| self.bucket(&r.name, l)))
                .collect(),
        }
    }

    /// Admits a request of `route` to be served by `idc`, or says why not. Refusals are
    /// counted in `shardgate_refused_total` under their cause.
    pub fn admit(&self, topo: &Topology, route: RouteId, idc: IdcId) -> Result<Permit, Refusal> {
        let refusal = match self.try_admit(topo, route, idc) {
            Ok(permit) => return Ok(permit),
            Err(refusal) => refusal,
        };
        let r = topo.route(route);
        let spec = topo.set(r.set);
        self.metrics
            .refused
            .get_or_create(&RefusedLabels {
                set: spec.name.clone(),
                reason: refusal.reason(),
            })
            .inc();
        Err(degrade_automatically(refusal, spec, r))
    }

    fn try_admit(&self, topo: &Topology, route: RouteId, idc: IdcId) -> Result<Permit, Refusal> {
        let r = topo.route(route);
        let spec = topo.set(r.set);
        let settings = &topo.isolation;
        let cached = self.resolved.load();
        let fresh;
        let resolved: &Resolved = match cached.as_deref() {
            Some(resolved) if resolved.snapshot == topo.build_id => resolved,
            _ => {
                fresh = Arc::new(self.resolve(topo));
                self.resolved.store(Some(fresh.clone()));
                &fresh
            }
        };
        let set = match resolved.sets.get(r.set.0 as usize) {
            Some(set) => set.clone(),
            _ => self.set_state(&spec.name, settings.retry_reserve),
        };

        // 1. The set's own budget: never queue, never borrow.
        if set.inflight.fetch_add(1, Ordering::Relaxed) >= spec.max_inflight {
            set.inflight.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::SetFull {
                set: spec.name.to_string(),
            });
        }
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        set.gauge.inc();
        let new_breaker = || self.breaker(&topo.idc(idc).name, &spec.name);
        let slot = usize::from(idc.0) * topo.sets.len() + usize::from(r.set.0);
        let breaker = match resolved.breakers.get(slot) {
            Some(cell) => cell.get_or_init(new_breaker).clone(),
            _ => new_breaker(),
        };
        // From here on, dropping the permit gives the slot back.
        let mut permit = Permit {
            set,
            total: self.total.clone(),
            breaker,
            probe: false,
            settings: *settings,
        };

        // 1b. Priority shedding on the instance's load.
        let load = f64::from(total) / topo.inflight_capacity.max(1) as f64;
        if spec.priority > 0 && load >= settings.shed_start {
            let p = shed_probability(
                load,
                spec.priority,
                spec.shed_rank,
                topo.shed_tiers,
                settings.shed_start,
            );
            if fastrand::f64() < p {
                return Err(Refusal::Shed {
                    set: spec.name.to_string(),
                });
            }
        }

        // 2. The route's rate limit.
        if let Some(limit) = &r.rate_limit {
            let bucket = match resolved.buckets.get(route.0 as usize) {
                Some(Some(bucket)) => bucket.clone(),
                _ => self.bucket(&r.name, limit),
            };
            let taken = bucket.lock().map_or(Ok(()), |mut b| b.take(Instant::now()));
            if let Err(wait) = taken {
                return Err(Refusal::RateLimited {
                    route: r.name.to_string(),
                    retry_after_s: secs_ceil(wait),
                });
            }
        }

        // 3. Degrade switches.
        if let Some(target) = &r.degraded_by {
            return Err(Refusal::Degraded {
                target: target.clone(),
                fallback: r.fallback.clone().map(Box::new),
            });
        }

        // 4. The breaker of (serving IDC, set).
        let pass = match permit.breaker.breaker.lock() {
            // Closed needs neither the clock nor a gauge update: the common case stays cheap.
            Ok(b) if b.state() == BreakerState::Closed => Pass::Normal,
            Ok(mut b) => {
                let pass = b.admit(Instant::now(), &settings.breaker);
                permit.breaker.gauge.set(b.state().gauge());
                pass
            }
            Err(_) => Pass::Normal,
        };
        match pass {
            Pass::Normal => {}
            Pass::Probe => permit.probe = true,
            Pass::Refuse(wait) => {
                return Err(Refusal::CircuitOpen {
                    idc: topo.idc(idc).name.to_string(),
                    set: spec.name.to_string(),
                    retry_after_s: secs_ceil(wait),
                })
            }
        }

        permit.set.requests.fetch_add(1, Ordering::Relaxed);
        permit
            .retry_budget()
            .deposit((settings.retry_ratio * 1000.0) as i64);
        Ok(permit)
    }

    /// Per-set counters for `/status`.
    pub fn set_status(&self, set: &str) -> Value {
        let Some(s) = self.sets.read().ok().and_then(|m| m.get(set).cloned()) else {
            return json!({"inflight": 0, "requests": 0, "retries": 0});
        };
        json!({
            "inflight": s.inflight.load(Ordering::Relaxed),
            "requests": s.requests.load(Ordering::Relaxed),
            "retries": s.retries.load(Ordering::Relaxed),
        })
    }

    /// Every breaker that has seen a request, for `/status`.
    pub fn breakers_status(&self) -> Vec<Value> {
        let Ok(m) = self.breakers.read() else {
            return Vec::new();
        };
        let mut out: Vec<Value> = m
            .iter()
            .flat_map(|(idc, sets)| {
                sets.iter().map(move |(set, cell)| {
                    let state = cell
                        .breaker
                        .lock()
                        .map_or(BreakerState::Closed, |b| b.state());
                    json!({"idc": idc, "set": set, "state": state.as_str()})
                })
            })
            .collect();
        out.sort_by_key(|v| (v["idc"].to_string(), v["set"].to_string()));
        out
    }

    /// Total requests in flight on this instance.
    pub fn total_inflight(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
