//! One backend's observed health, shared by every (IDC, set) pool that lists its address and
//! kept across snapshots: the active probes' verdict (rise/fall) and passive outlier ejection
//! from real traffic (connect errors, timeouts, 5xx). Written lock-free from the request path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// First ejection period after failing answers; the n-th consecutive ejection lasts n times its
/// base (Envoy's `base_ejection_time × ejection count`). One second keeps a transient blip cheap
/// while a backend that keeps failing is left alone for longer and longer.
pub const BASE_EJECTION_MS: u64 = 1_000;
/// First ejection period after a failed connect. Longer than the probes take to call a dead
/// backend unhealthy (3 × 500 ms by default), so a crashed backend goes from ejected to
/// unhealthy without coming back in between; a backend that accepts connections again is back
/// at its next good probe, whatever is left of the period.
pub const CONNECT_BASE_EJECTION_MS: u64 = 5_000;
/// Longest ejection period.
pub const MAX_EJECTION_MS: u64 = 30_000;
/// Consecutive 5xx answers or timeouts that eject a backend (Envoy's `consecutive_5xx`). A
/// refused or failed connect ejects at once: it is unambiguous, and it is what a crash looks
/// like, so the first one already takes the backend out of rotation.
///
/// Answers never eject the last backend in service of a pool (Envoy's `max_ejection_percent`,
/// for this cause only): a pool that answers is alive, and an application failing everywhere
/// is the circuit breaker's business (503 `circuit_open`), not a reason to call the pool dead.
/// Connect failures and probes may take a whole pool out; that is logged loudly (`health`).
pub const CONSECUTIVE_FAILURES: u32 = 5;

/// Why a backend was last ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionCause {
    /// Connect refused or timed out: a good probe ends the ejection early (the backend is back).
    Connect,
    /// 5xx answers or timeouts: the period runs out (a health path can answer 200 while the
    /// real routes fail).
    Answers,
}

/// A backend's health as the gateway sees it. Identity: IDC name + address.
#[derive(Debug)]
pub struct BackendHealth {
    pub idc: Arc<String>,
    pub addr: SocketAddr,
    /// The probes' verdict. A new backend starts healthy: it gets traffic until the probes or
    /// the traffic say otherwise (starting unhealthy would refuse everything at start-up).
    probe_healthy: AtomicBool,
    /// Consecutive probe results in the current direction (written by the one probe task).
    probe_successes: AtomicU32,
    probe_failures: AtomicU32,
    /// Probes finished since the backend was first named (`/status`; tests wait on it).
    probes: AtomicU64,
    /// Consecutive 5xx answers / timeouts from real traffic.
    failures: AtomicU32,
    /// Ejections in a row (the period multiplier); decays after a quiet period.
    ejections: AtomicU32,
    /// Until when (ms on the process clock) the backend is ejected; 0 = never was.
    ejected_until_ms: AtomicU64,
    /// The length of the current (or last) ejection.
    ejection_ms: AtomicU64,
    ejected_for_connect: AtomicBool,
}

impl BackendHealth {
    pub fn new(idc: &str, addr: SocketAddr) -> BackendHealth {
        BackendHealth {
            idc: Arc::new(idc.to_owned()),
            addr,
            probe_healthy: AtomicBool::new(true),
            probe_successes: AtomicU32::new(0),
            probe_failures: AtomicU32::new(0),
            probes: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejection_ms: AtomicU64::new(0),
            ejected_for_connect: AtomicBool::new(false),
        }
    }

    /// Gets traffic: the probes say healthy and traffic has not ejected it.
    pub fn in_service(&self) -> bool {
        self.probe_healthy() && !self.ejected()
    }

    #[cfg(test)]
    fn in_service_at(&self, now: u64) -> bool {
        self.probe_healthy() && !self.ejected_at(now)
    }

    /// Probes finished so far, whatever their result.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    pub fn probe_healthy(&self) -> bool {
        self.probe_healthy.load(Ordering::Relaxed)
    }

    /// Out of service for an ejection now. The clock is read only for a backend ejected at
    /// some time: one never ejected (0) is not, whatever the time (`pick` asks this of each
    /// backend of a pool per request).
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > clock_ms()
    }

    #[cfg(test)]
    fn ejected_at(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Ejections in a row so far (0 = never ejected, or decayed).
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// The period of the current or last ejection, in ms (0 = never ejected).
    pub fn ejection_ms(&self) -> u64 {
        self.ejection_ms.load(Ordering::Relaxed)
    }

    /// A connect to the backend failed. True when this ejected it.
    pub fn record_connect_failure(&self) -> bool {
        self.eject(clock_ms(), EjectionCause::Connect)
    }

    /// The backend answered 5xx, did not answer in time, or broke the exchange. True when
    /// this ejected it; `last_in_service` (no other backend of the pool is in service) keeps it.
    pub fn record_failure(&self, last_in_service: bool) -> bool {
        self.record_failure_at(clock_ms(), last_in_service)
    }

    fn record_failure_at(&self, now: u64, last_in_service: bool) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < CONSECUTIVE_FAILURES {
            return false;
        }
        if last_in_service {
            tracing::debug!(idc = %self.idc, backend = %self.addr, "failing answers, but the last backend in service of its pool: not ejected");
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.eject(now, EjectionCause::Answers)
    }

    /// The backend answered (not 5xx): the run of failures is over.
    pub fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn eject(&self, now: u64, cause: EjectionCause) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until > now {
            // Already out: requests that were in flight when it went are not new evidence.
            return false;
        }
        // The multiplier decays: a backend whose last ejection ended long ago starts over.
        let count = if until != 0 && now.saturating_sub(until) > MAX_EJECTION_MS {
            1
        } else {
            self.ejections.load(Ordering::Relaxed).saturating_add(1)
        };
        let base = match cause {
            EjectionCause::Connect => CONNECT_BASE_EJECTION_MS,
            EjectionCause::Answers => BASE_EJECTION_MS,
        };
        let period = base.saturating_mul(u64::from(count)).min(MAX_EJECTION_MS);
        // Concurrent failures race here: exactly one of them ejects.
        if self
            .ejected_until_ms
            .compare_exchange(until, now + period, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.ejections.store(count, Ordering::Relaxed);
        self.ejection_ms.store(period, Ordering::Relaxed);
        self.ejected_for_connect
            .store(cause == EjectionCause::Connect, Ordering::Relaxed);
        tracing::warn!(idc = %self.idc, backend = %self.addr, ?cause, ejections = count, period_ms = period, "backend ejected");
        true
    }

    /// One probe result, with the IDC's `rise`/`fall`. Returns the new verdict when it flipped.
    pub fn record_probe(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.probes.fetch_add(1, Ordering::Relaxed);
        let healthy = self.probe_healthy();
        if ok {
            self.probe_failures.store(0, Ordering::Relaxed);
            let n = self.probe_successes.fetch_add(1, Ordering::Relaxed) + 1;
            // The backend accepts connections again: a connect-caused ejection is over.
            if self.ejected_for_connect.swap(false, Ordering::Relaxed) {
                self.ejected_until_ms.store(
                    self.ejected_until_ms
                        .load(Ordering::Relaxed)
                        .min(clock_ms()),
                    Ordering::Relaxed,
                );
            }
            if !healthy && n >= rise {
                self.probe_healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.probe_successes.store(0, Ordering::Relaxed);
            let n = self.probe_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && n >= fall {
                self.probe_healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// Milliseconds on a monotonic clock that starts with the process.
pub fn clock_ms() -> u64 {
    use std::sync::OnceLock;
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> BackendHealth {
        BackendHealth::new("sh", "127.0.0.1:1".parse().unwrap())
    }

    #[test]
    fn probes_flip_after_fall_failures_and_rise_successes() {
        let b = backend();
        assert!(b.probe_healthy());
        assert_eq!(b.record_probe(false, 2, 3), None);
        assert_eq!(b.record_probe(false, 2, 3), None);
        // A success in between starts the count over.
        assert_eq!(b.record_probe(true, 2, 3), None);
        assert_eq!(b.record_probe(false, 2, 3), None);
        assert_eq!(b.record_probe(false, 2, 3), None);
        assert_eq!(b.record_probe(false, 2, 3), Some(false));
        assert!(!b.probe_healthy() && !b.in_service());
        assert_eq!(b.record_probe(false, 2, 3), None);
        assert_eq!(b.record_probe(true, 2, 3), None);
        assert_eq!(b.record_probe(true, 2, 3), Some(true));
        assert!(b.in_service());
    }

    #[test]
    fn ejection_periods_grow_with_repeated_ejections_and_are_capped() {
        let b = backend();
        let mut now = 1_000_000;
        let mut periods = Vec::new();
        for _ in 0..40 {
            assert!(b.eject(now, EjectionCause::Connect));
            assert!(b.ejected_at(now) && !b.in_service_at(now));
            // While ejected, more failures change nothing.
            assert!(!b.eject(now + 1, EjectionCause::Connect));
            periods.push(b.ejection_ms());
            now += b.ejection_ms();
            assert!(!b.ejected_at(now));
        }
        assert_eq!(&periods[..3], &[5_000, 10_000, 15_000]);
        assert!(periods.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*periods.last().unwrap(), MAX_EJECTION_MS);
        // A long quiet period resets the multiplier.
        now += MAX_EJECTION_MS + 1;
        assert!(b.eject(now, EjectionCause::Answers));
        assert_eq!(b.ejection_ms(), BASE_EJECTION_MS);
        assert_eq!(b.ejections(), 1);
    }

    #[test]
    fn answers_eject_after_consecutive_failures_only() {
        let b = backend();
        let now = 5_000;
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
            assert!(!b.record_failure_at(now, false));
        }
        b.record_success();
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
            assert!(!b.record_failure_at(now, false));
        }
        assert!(!b.ejected_at(now));
        // The last backend in service of its pool is kept, however it answers.
        assert!(!b.record_failure_at(now, true));
        assert!(!b.ejected_at(now));
        assert!(b.record_failure_at(now, false));
        assert!(b.ejected_at(now));
    }

    #[test]
    fn a_good_probe_ends_a_connect_ejection_but_not_an_answers_one() {
        let b = backend();
        assert!(b.in_service() && !b.ejected(), "never ejected");
        let now = clock_ms();
        assert!(b.eject(now, EjectionCause::Connect));
        assert!(b.ejected() && !b.in_service());
        b.record_probe(true, 2, 3);
        assert!(!b.ejected() && b.in_service());
        let b = backend();
        for _ in 0..CONSECUTIVE_FAILURES {
            b.record_failure_at(now, false);
        }
        b.record_probe(true, 2, 3);
        assert!(b.ejected());
    }
}
