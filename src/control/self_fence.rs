//! This gateway's own write fence (DESIGN.md §5, docs/failover.md "The self-fence"). In etcd
//! mode the leader moves a shard's owner only after every *registered* gateway acknowledged the
//! fence, and a gateway whose registration is gone is waited out for the lease TTL and the fence
//! hold. That is only safe if a gateway stops writing before its registration can expire, and
//! writes again only once it is registered and has caught up with etcd. This is that rule:
//! writes on sharded routes (any method but GET/HEAD/OPTIONS) are allowed while
//! - the registration lease was confirmed recently enough: its monotonic deadline (the instant
//!   the last successful keep-alive was *sent*, plus the TTL, minus a margin) is in the future;
//! - and the topology source has applied every etcd event up to the revision at which the
//!   current registration was written (so anything the leader did while this gateway was not
//!   registered is in the snapshot before the first write).
//!
//! Reads are never fenced here. In file mode there is no lease and the fence is always open.
//! Checked on the request path: two atomic loads and a monotonic clock read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How much earlier than the lease's expiry (as etcd will count it) a gateway stops writing.
/// Covers the keep-alive's flight time and scheduling delays of this process; etcd counts the
/// TTL from when it *received* the keep-alive, which is after it was sent.
pub const MARGIN: Duration = Duration::from_secs(1);

/// Why writes are refused right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Not registered in etcd in this lease session (starting, or from the cache).
    NotRegistered,
    /// The lease has not been confirmed for too long: etcd may count this gateway gone.
    LeaseUnconfirmed,
    /// Registered, but the source has not applied etcd's events up to the registration yet.
    CatchingUp,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::NotRegistered => "not registered in etcd (starting, or serving from the cache)",
            Closed::LeaseUnconfirmed => {
                "the registration lease is not confirmed: etcd unreachable from this gateway"
            }
            Closed::CatchingUp => "catching up with etcd after (re-)registering",
        }
    }
}

#[derive(Debug)]
pub struct SelfFence {
    /// False in file mode: nothing to fence against.
    leased: bool,
    base: Instant,
    /// Writes are allowed before this many nanoseconds after `base` (0: not allowed).
    deadline_ns: AtomicU64,
    /// The revision that wrote the current registration (`u64::MAX`: not registered).
    registered_at: AtomicU64,
    /// Every etcd event up to this revision is in the published snapshot (0: not since the
    /// last time the source lost etcd).
    seen: AtomicU64,
}

impl SelfFence {
    /// A fence that is always open (file mode).
    pub fn open() -> SelfFence {
        SelfFence::new(false)
    }

    /// A fence governed by the registration lease (etcd mode): closed until registered.
    pub fn leased() -> SelfFence {
        SelfFence::new(true)
    }

    fn new(leased: bool) -> SelfFence {
        SelfFence {
            leased,
            base: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            registered_at: AtomicU64::new(u64::MAX),
            seen: AtomicU64::new(0),
        }
    }

    pub fn is_leased(&self) -> bool {
        self.leased
    }

    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Whether this gateway may send a write now; the reason when it may not.
    #[inline]
    pub fn check(&self) -> Result<(), Closed> {
        if !self.leased {
            return Ok(());
        }
        self.check_at(Instant::now())
    }

    pub fn check_at(&self, now: Instant) -> Result<(), Closed> {
        if !self.leased {
            return Ok(());
        }
        let registered_at = self.registered_at.load(Ordering::Acquire);
        if registered_at == u64::MAX {
            return Err(Closed::NotRegistered);
        }
        if self.ns(now) >= self.deadline_ns.load(Ordering::Acquire) {
            return Err(Closed::LeaseUnconfirmed);
        }
        if self.seen.load(Ordering::Acquire) < registered_at {
            return Err(Closed::CatchingUp);
        }
        Ok(())
    }

    /// The registration was written at `revision` under a lease of `ttl`, whose grant or
    /// keep-alive was sent at `sent_at`.
    pub fn registered(&self, revision: u64, sent_at: Instant, ttl: Duration) {
        self.registered_at.store(revision, Ordering::Release);
        self.renewed(sent_at, ttl);
    }

    /// A keep-alive sent at `sent_at` was answered with a live lease of `ttl`.
    pub fn renewed(&self, sent_at: Instant, ttl: Duration) {
        let until = self.ns(sent_at + ttl.saturating_sub(MARGIN));
        // Never moves backwards: an answer that arrives late must not shorten the deadline
        // a later keep-alive set (it cannot lengthen it either: it was sent earlier).
        self.deadline_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// The registration session ended (lease lost, etcd unreachable, shutdown): writes stop
    /// at once rather than at the deadline, since nothing will renew it.
    pub fn unregistered(&self) {
        self.registered_at.store(u64::MAX, Ordering::Release);
        self.deadline_ns.store(0, Ordering::Release);
    }

    /// The source has applied every event up to `revision` (a list, or the watch).
    pub fn seen(&self, revision: u64) {
        self.seen.fetch_max(revision, Ordering::AcqRel);
    }

    /// The source lost etcd: it may miss events until it has listed again.
    pub fn source_lost(&self) {
        self.seen.store(0, Ordering::Release);
    }

    /// For `/status`: `{"writes":"open"}` or `{"writes":"fenced","reason":…}`.
    pub fn status_json(&self) -> serde_json::Value {
        match self.check() {
            Ok(()) => serde_json::json!({ "writes": "open", "leased": self.leased }),
            Err(why) => serde_json::json!({
                "writes": "fenced",
                "leased": self.leased,
                "reason": why.as_str(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);

    #[test]
    fn file_mode_is_always_open() {
        let f = SelfFence::open();
        assert_eq!(f.check(), Ok(()));
        f.unregistered();
        assert_eq!(f.check(), Ok(()));
    }

    #[test]
    fn closed_until_registered_and_caught_up() {
        let f = SelfFence::leased();
        let t0 = Instant::now();
        assert_eq!(f.check_at(t0), Err(Closed::NotRegistered));
        f.registered(40, t0, TTL);
        assert_eq!(f.check_at(t0), Err(Closed::CatchingUp));
        f.seen(39);
        assert_eq!(f.check_at(t0), Err(Closed::CatchingUp));
        f.seen(40);
        assert_eq!(f.check_at(t0), Ok(()));
    }

    #[test]
    fn closes_before_the_lease_can_expire_and_reopens_on_renewal() {
        let f = SelfFence::leased();
        let t0 = Instant::now();
        f.registered(7, t0, TTL);
        f.seen(7);
        let last_open = t0 + TTL - MARGIN - Duration::from_millis(1);
        assert_eq!(f.check_at(last_open), Ok(()));
        assert_eq!(f.check_at(t0 + TTL - MARGIN), Err(Closed::LeaseUnconfirmed));
        // A keep-alive sent later pushes the deadline on; a late answer to an older one
        // does not pull it back.
        f.renewed(t0 + Duration::from_secs(3), TTL);
        f.renewed(t0 + Duration::from_secs(1), TTL);
        assert_eq!(f.check_at(t0 + TTL), Ok(()));
        assert_eq!(
            f.check_at(t0 + Duration::from_secs(3) + TTL - MARGIN),
            Err(Closed::LeaseUnconfirmed)
        );
    }

    #[test]
    fn a_lost_source_or_registration_closes_at_once() {
        let f = SelfFence::leased();
        let t0 = Instant::now();
        f.registered(5, t0, TTL);
        f.seen(9);
        assert_eq!(f.check_at(t0), Ok(()));
        f.source_lost();
        assert_eq!(f.check_at(t0), Err(Closed::CatchingUp));
        f.seen(9);
        f.unregistered();
        assert_eq!(f.check_at(t0), Err(Closed::NotRegistered));
    }
}
