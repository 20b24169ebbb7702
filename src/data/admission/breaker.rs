//! The circuit breaker of one (IDC, set), as a pure state machine: the caller passes the time
//! and the outcome, so every transition is unit-tested without a runtime.

use std::time::{Duration, Instant};

use crate::control::topology::{BreakerSpec, BREAKER_BUCKETS};

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

/// Outcomes recorded in one bucket of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u32,
    failures: u32,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: BreakerState,
    consecutive: u32,
    /// The window: bucket `n` holds the outcomes recorded `n` bucket widths after `origin`;
    /// `head` is the newest bucket number, stored at `head % BREAKER_BUCKETS`.
    origin: Instant,
    window: Duration,
    head: u64,
    buckets: [Counts; BREAKER_BUCKETS],
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
            origin: now,
            window: Duration::ZERO,
            head: 0,
            buckets: [Counts::default(); BREAKER_BUCKETS],
            since: now,
            probes_out: 0,
            probes_ok: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    pub fn admit(&mut self, now: Instant, s: &BreakerSpec) -> Pass {
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
    pub fn record(&mut self, now: Instant, failure: bool, probe: bool, s: &BreakerSpec) {
        match (self.state, probe) {
            (BreakerState::Closed, false) => {
                self.slide(now, s.window);
                let bucket = &mut self.buckets[(self.head % BREAKER_BUCKETS as u64) as usize];
                bucket.requests += 1;
                if failure {
                    bucket.failures += 1;
                    self.consecutive += 1;
                } else {
                    self.consecutive = 0;
                }
                let (requests, failures) = self.window_counts();
                let ratio_tripped = requests >= s.min_requests
                    && f64::from(failures) >= s.failure_ratio * f64::from(requests);
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

    /// Requests and failures in the window.
    fn window_counts(&self) -> (u32, u32) {
        self.buckets.iter().fold((0, 0), |(r, f), b| {
            (r.saturating_add(b.requests), f.saturating_add(b.failures))
        })
    }

    /// Moves the window to `now`: buckets that fell out of it are emptied. A changed window
    /// length (a reload) restarts the counts; the state (open, half-open) is kept.
    fn slide(&mut self, now: Instant, window: Duration) {
        if window != self.window {
            self.window = window;
            self.origin = now;
            self.head = 0;
            self.buckets = [Counts::default(); BREAKER_BUCKETS];
        }
        let width = (window / BREAKER_BUCKETS as u32).as_nanos().max(1);
        let n = (now.saturating_duration_since(self.origin).as_nanos() / width) as u64;
        // An outcome timed just before the newest one (threads racing for the lock) goes
        // into the newest bucket.
        if n > self.head {
            let stale = (n - self.head).min(BREAKER_BUCKETS as u64);
            for i in 1..=stale {
                self.buckets[((self.head + i) % BREAKER_BUCKETS as u64) as usize] =
                    Counts::default();
            }
            self.head = n;
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.since = now;
    }

    /// Closing starts afresh: the failures that opened it are not held against it again.
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
        let s = BreakerSpec::default();
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
        let s = BreakerSpec::default();
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

    /// Twenty alternating outcomes (ten failures, never two in a row) at `at`.
    fn alternate(b: &mut Breaker, at: Instant, n: u32, s: &BreakerSpec) {
        for i in 0..n {
            b.record(at, i % 2 == 0, false, s);
        }
    }

    #[test]
    fn the_window_slides_across_bucket_boundaries() {
        let s = BreakerSpec::default();
        let t0 = Instant::now();
        // Ten outcomes at 9.5 s and ten at 10.5 s are in one 10 s window: a window that
        // restarted every 10 s would have split them.
        let mut b = Breaker::new(t0);
        alternate(&mut b, t0 + ms(9_500), 10, &s);
        alternate(&mut b, t0 + ms(10_500), 9, &s);
        assert_eq!(b.state(), BreakerState::Closed, "19 requests are too few");
        b.record(t0 + ms(10_500), true, false, &s);
        assert_eq!(b.state(), BreakerState::Open, "11 of 20 within 10 s");
    }

    #[test]
    fn outcomes_age_out_of_the_window() {
        let s = BreakerSpec::default();
        let t0 = Instant::now();
        // 19 outcomes (10 failures) at t0; one more failure makes 11 of 20 while they count.
        let mut inside = Breaker::new(t0);
        alternate(&mut inside, t0, 19, &s);
        inside.record(t0 + ms(9_900), true, false, &s);
        assert_eq!(inside.state(), BreakerState::Open);
        // Once the window has moved past t0's bucket they no longer count.
        let mut after = Breaker::new(t0);
        alternate(&mut after, t0, 19, &s);
        after.record(t0 + ms(10_000), true, false, &s);
        assert_eq!(after.state(), BreakerState::Closed);
        // Nor after a long quiet spell (more than a whole window of empty buckets).
        let mut quiet = Breaker::new(t0);
        alternate(&mut quiet, t0, 19, &s);
        quiet.record(t0 + ms(95_000), true, false, &s);
        assert_eq!(quiet.state(), BreakerState::Closed);
        // Half of a steady trickle over many windows opens it only once 20 are in one window.
        let mut steady = Breaker::new(t0);
        for i in 0..200u64 {
            // One outcome every 600 ms: 16 or 17 per window, never 20.
            steady.record(t0 + ms(i * 600), i % 2 == 0, false, &s);
        }
        assert_eq!(steady.state(), BreakerState::Closed);
    }

    #[test]
    fn a_changed_window_restarts_the_counts() {
        let s = BreakerSpec::default();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        alternate(&mut b, t0, 19, &s);
        let longer = BreakerSpec {
            window: Duration::from_secs(20),
            ..s
        };
        b.record(t0 + ms(1), true, false, &longer);
        assert_eq!(b.state(), BreakerState::Closed);
        // The state survives: an open breaker stays open across the change.
        for _ in 0..5 {
            b.record(t0 + ms(2), true, false, &longer);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b.record(t0 + ms(3), true, false, &s);
        assert!(matches!(b.admit(t0 + ms(4), &s), Pass::Refuse(_)));
    }

    #[test]
    fn half_open_lets_three_probes_and_closes_when_they_succeed() {
        let s = BreakerSpec::default();
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
        let s = BreakerSpec::default();
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
        let s = BreakerSpec::default();
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
