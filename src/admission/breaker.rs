//! The circuit breaker of one (IDC, set), as a pure state machine: the caller passes the time
//! and the outcome, so every transition is unit-tested without a runtime.

use std::time::{Duration, Instant};

/// Breaker knobs (DESIGN.md §5 defaults).
#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive system failures that open the breaker.
    pub consecutive: u32,
    /// Requests a window needs before its failure ratio counts.
    pub min_requests: u32,
    /// Failure ratio (of at least `min_requests` in one window) that opens the breaker.
    pub failure_ratio: f64,
    /// Length of the counting window (tumbling: counts restart when it ends).
    pub window: Duration,
    /// How long an open breaker refuses before it lets probes through.
    pub open_for: Duration,
    /// Probes let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive: 5,
            min_requests: 20,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            probes: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of `shardgate_breaker_state`.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What the breaker says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Closed: go ahead.
    Normal,
    /// Half-open: go ahead as one of the probes; its outcome decides.
    Probe,
    /// Open (or half-open with every probe out): refuse; try again after this long.
    Refuse(Duration),
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    consecutive: u32,
    window_start: Instant,
    requests: u32,
    failures: u32,
    /// When it last opened, or went half-open.
    since: Instant,
    probes_out: u32,
    probes_ok: u32,
}

impl Breaker {
    pub fn new(now: Instant) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            consecutive: 0,
            window_start: now,
            requests: 0,
            failures: 0,
            since: now,
            probes_out: 0,
            probes_ok: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn admit(&mut self, now: Instant, s: &BreakerSettings) -> Pass {
        if self.state == BreakerState::Open {
            let open = now.saturating_duration_since(self.since);
            if open < s.open_for {
                return Pass::Refuse(s.open_for - open);
            }
            self.state = BreakerState::HalfOpen;
            self.since = now;
            self.probes_out = 0;
            self.probes_ok = 0;
        }
        match self.state {
            BreakerState::Closed => Pass::Normal,
            _ => {
                // A probe whose outcome never came back (its client went away) must not hold
                // the breaker half-open forever: after another `open_for`, probe afresh.
                if self.probes_out >= s.probes
                    && now.saturating_duration_since(self.since) >= s.open_for
                {
                    self.since = now;
                    self.probes_out = self.probes_ok;
                }
                if self.probes_out < s.probes {
                    self.probes_out += 1;
                    Pass::Probe
                } else {
                    Pass::Refuse(Duration::from_secs(1))
                }
            }
        }
    }

    /// Records the outcome of a request the breaker let through; `failure` is a system failure
    /// (connect error, timeout, 5xx). Outcomes of requests admitted before the last transition
    /// (a slow request finishing after the breaker opened) are ignored.
    pub fn record(&mut self, now: Instant, failure: bool, probe: bool, s: &BreakerSettings) {
        match (self.state, probe) {
            (BreakerState::Closed, false) => {
                if now.saturating_duration_since(self.window_start) >= s.window {
                    self.window_start = now;
                    self.requests = 0;
                    self.failures = 0;
                }
                self.requests += 1;
                if failure {
                    self.failures += 1;
                    self.consecutive += 1;
                } else {
                    self.consecutive = 0;
                }
                let ratio_tripped = self.requests >= s.min_requests
                    && f64::from(self.failures) >= s.failure_ratio * f64::from(self.requests);
                if self.consecutive >= s.consecutive || ratio_tripped {
                    self.open(now);
                }
            }
            (BreakerState::HalfOpen, true) => {
                if failure {
                    self.open(now);
                } else {
                    self.probes_ok += 1;
                    if self.probes_ok >= s.probes {
                        self.close(now);
                    }
                }
            }
            _ => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.since = now;
    }

    fn close(&mut self, now: Instant) {
        *self = Breaker::new(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn five_consecutive_failures_open_it_and_four_do_not() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..4 {
            assert_eq!(b.admit(t0, &s), Pass::Normal);
            b.record(t0, true, false, &s);
        }
        b.record(t0, false, false, &s);
        for _ in 0..4 {
            b.record(t0, true, false, &s);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(t0, true, false, &s);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(t0 + ms(10), &s), Pass::Refuse(_)));
    }

    #[test]
    fn half_of_twenty_in_a_window_opens_it() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        // Alternate: never two failures in a row.
        for i in 0..19 {
            b.record(t0, i % 2 == 1, false, &s);
        }
        assert_eq!(b.state(), BreakerState::Closed, "19 requests are too few");
        b.record(t0, false, false, &s);
        assert_eq!(b.state(), BreakerState::Closed, "9 of 20 is under half");
        b.record(t0, true, false, &s);
        assert_eq!(b.state(), BreakerState::Closed, "10 of 21 is under half");
        b.record(t0, true, false, &s);
        assert_eq!(b.state(), BreakerState::Open, "11 of 22");
    }

    #[test]
    fn the_window_restarts() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for i in 0..18 {
            b.record(t0, i % 2 == 0, false, &s);
        }
        let later = t0 + s.window;
        for i in 0..4 {
            b.record(later, i % 2 == 0, false, &s);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn half_open_lets_three_probes_and_closes_when_they_succeed() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            b.record(t0, true, false, &s);
        }
        let t1 = t0 + s.open_for;
        assert_eq!(b.admit(t1, &s), Pass::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1, &s), Pass::Probe);
        assert_eq!(b.admit(t1, &s), Pass::Probe);
        assert!(matches!(b.admit(t1, &s), Pass::Refuse(_)));
        // A late answer of a request admitted while closed changes nothing.
        b.record(t1, false, false, &s);
        for _ in 0..3 {
            b.record(t1, false, true, &s);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t1, &s), Pass::Normal);
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            b.record(t0, true, false, &s);
        }
        let t1 = t0 + s.open_for;
        assert_eq!(b.admit(t1, &s), Pass::Probe);
        b.record(t1, true, true, &s);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(t1 + ms(1), &s), Pass::Refuse(_)));
    }

    #[test]
    fn lost_probes_are_replaced() {
        let s = BreakerSettings::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            b.record(t0, true, false, &s);
        }
        let t1 = t0 + s.open_for;
        for _ in 0..3 {
            assert_eq!(b.admit(t1, &s), Pass::Probe);
        }
        assert!(matches!(b.admit(t1, &s), Pass::Refuse(_)));
        assert_eq!(b.admit(t1 + s.open_for, &s), Pass::Probe);
    }
}
