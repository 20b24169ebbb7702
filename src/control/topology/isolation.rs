//! `[isolation]` of the topology document → the admission knobs of the snapshot (shedding
//! threshold, retry budget, breaker), checked with every problem named by its field.

use std::time::Duration;

use super::raw::RawIsolation;
use super::Problem;

/// The counting window slides in this many buckets (ten 1-second buckets by default).
pub const BREAKER_BUCKETS: usize = 10;

/// Breaker knobs (`[isolation.breaker]` of the topology; DESIGN.md §5 defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSpec {
    /// Consecutive system failures that open the breaker.
    pub consecutive: u32,
    /// Requests the window needs before its failure ratio counts.
    pub min_requests: u32,
    /// Failure ratio (of at least `min_requests` in the window) that opens the breaker.
    pub failure_ratio: f64,
    /// Length of the sliding window, counted in `BREAKER_BUCKETS` buckets: an outcome stops
    /// counting between `window - window/10` and `window` after it was recorded.
    pub window: Duration,
    /// How long an open breaker refuses before it lets probes through.
    pub open_for: Duration,
    /// Probes let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        BreakerSpec {
            consecutive: 5,
            min_requests: 20,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            probes: 3,
        }
    }
}

/// Isolation knobs, resolved from the topology's `[isolation]` table into each snapshot
/// (defaults from DESIGN.md §5). Admission reads them from the snapshot of each request, so a
/// reload changes them while the state they act on (breakers, budgets) carries on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IsolationSpec {
    pub breaker: BreakerSpec,
    /// Retries allowed per request of a set (0.2: retries ≤ 20% of the set's requests).
    pub retry_ratio: f64,
    /// Retries a set may make before its requests have earned any (and the most it can save).
    pub retry_reserve: u32,
    /// Instance load (total in-flight ÷ sum of set budgets) at which shedding starts.
    pub shed_start: f64,
}

impl Default for IsolationSpec {
    fn default() -> Self {
        IsolationSpec {
            breaker: BreakerSpec::default(),
            retry_ratio: 0.2,
            retry_reserve: 10,
            shed_start: 0.7,
        }
    }
}

/// Checks `[isolation]`, pushing a problem per bad field; the result is only used when
/// there is none.
pub(super) fn resolve(raw: &RawIsolation, problems: &mut Vec<Problem>) -> IsolationSpec {
    let mut fail = |field: &str, reason: &str| {
        problems.push(Problem::new(format!("isolation.{field}"), reason));
    };
    let fraction = |v: f64| (0.0..=1.0).contains(&v);
    if !fraction(raw.shed_start) {
        fail("shed_start", "must be between 0.0 and 1.0");
    }
    if !fraction(raw.retry_ratio) {
        fail("retry_ratio", "must be between 0.0 and 1.0");
    }
    let b = &raw.breaker;
    for (field, v) in [
        ("breaker.consecutive", b.consecutive),
        ("breaker.min_requests", b.min_requests),
        ("breaker.probes", b.probes),
    ] {
        if v == 0 {
            fail(field, "must be greater than 0");
        }
    }
    // A ratio of 0 would open the breaker on a window without a single failure.
    if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
        fail("breaker.failure_ratio", "must be above 0.0 and at most 1.0");
    }
    // The window slides in ten buckets: each needs at least a millisecond.
    if b.window_ms < BREAKER_BUCKETS as u64 {
        fail(
            "breaker.window_ms",
            &format!("must be at least {BREAKER_BUCKETS}"),
        );
    }
    if b.open_ms == 0 {
        fail("breaker.open_ms", "must be greater than 0");
    }
    IsolationSpec {
        breaker: BreakerSpec {
            consecutive: b.consecutive,
            min_requests: b.min_requests,
            failure_ratio: b.failure_ratio,
            window: Duration::from_millis(b.window_ms),
            open_for: Duration::from_millis(b.open_ms),
            probes: b.probes,
        },
        retry_ratio: raw.retry_ratio,
        retry_reserve: raw.retry_reserve,
        shed_start: raw.shed_start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_design_s() {
        let mut problems = Vec::new();
        let s = resolve(&RawIsolation::default(), &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let d = IsolationSpec::default();
        assert_eq!(s.breaker, d.breaker);
        assert_eq!(
            (s.retry_ratio, s.retry_reserve, s.shed_start),
            (d.retry_ratio, d.retry_reserve, d.shed_start)
        );
        assert_eq!(s.breaker.window, Duration::from_secs(10));
    }

    #[test]
    fn every_bad_field_is_named() {
        let raw: RawIsolation = toml::from_str(
            "shed_start = 1.5\nretry_ratio = -0.1\n[breaker]\nconsecutive = 0\nmin_requests = 0\n\
             probes = 0\nfailure_ratio = 0.0\nwindow_ms = 9\nopen_ms = 0\n",
        )
        .expect("parses");
        let mut problems = Vec::new();
        resolve(&raw, &mut problems);
        let at: Vec<&str> = problems.iter().map(|p| p.at.as_str()).collect();
        assert_eq!(
            at,
            [
                "isolation.shed_start",
                "isolation.retry_ratio",
                "isolation.breaker.consecutive",
                "isolation.breaker.min_requests",
                "isolation.breaker.probes",
                "isolation.breaker.failure_ratio",
                "isolation.breaker.window_ms",
                "isolation.breaker.open_ms",
            ]
        );
    }
}
