//! `[isolation]` of the topology document → the admission knobs of the snapshot (shedding
//! threshold, retry budget, breaker), checked with every problem named by its field.

use std::time::Duration;

use super::raw::RawIsolation;
use super::Problem;
use crate::admission::{BreakerSettings, IsolationSettings, BREAKER_BUCKETS};

/// Checks `[isolation]`, pushing a problem per bad field; the result is only used when
/// there is none.
pub(super) fn resolve(raw: &RawIsolation, problems: &mut Vec<Problem>) -> IsolationSettings {
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
    IsolationSettings {
        breaker: BreakerSettings {
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
        let d = IsolationSettings::default();
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
