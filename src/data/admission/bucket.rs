//! A token bucket for one route's rate limit, as a pure function of the time.

use std::time::{Duration, Instant};

use crate::control::topology::RateLimitSpec;

#[derive(Debug, Clone)]
pub struct Bucket {
    /// The limit it was made for: a reload that changes it starts a new bucket.
    pub rps: u32,
    pub burst: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(spec: &RateLimitSpec, now: Instant) -> Bucket {
        Bucket {
            rps: spec.rps,
            burst: spec.burst,
            tokens: f64::from(spec.burst.max(1)),
            last: now,
        }
    }

    pub fn same_limit(&self, spec: &RateLimitSpec) -> bool {
        self.rps == spec.rps && self.burst == spec.burst
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let rps = f64::from(self.rps.max(1));
        let capacity = f64::from(self.burst.max(1));
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rps).min(capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rps))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let spec = RateLimitSpec { rps: 10, burst: 3 };
        let t0 = Instant::now();
        let mut b = Bucket::new(&spec, t0);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        // One token every 100 ms.
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
        // Never more than the burst, however long it was idle.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }
}
