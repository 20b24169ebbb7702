//! Admission state looked up once per snapshot: the first request admitted with a snapshot
//! finds its sets', breakers' and rate-limit buckets' state by name; every later request of
//! that snapshot indexes arrays (no hashing, no map lock on the request path).

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use super::{BreakerCell, Bucket, SetState};

/// The handles of one snapshot, kept by `Admission` for the snapshot it last saw.
pub struct Resolved {
    /// The snapshot they were resolved for (`Topology::build_id`).
    pub(super) snapshot: u64,
    /// By `SetId`.
    pub(super) sets: Vec<Arc<SetState>>,
    /// By `IdcId * sets + SetId`, filled on first use (`/status` lists breakers that have seen
    /// a request).
    pub(super) breakers: Vec<OnceLock<Arc<BreakerCell>>>,
    /// By `RouteId`; `None` for routes without a rate limit.
    pub(super) buckets: Vec<Option<Arc<Mutex<Bucket>>>>,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("sets", &self.sets.len())
            .field("breakers", &self.breakers.len())
            .finish_non_exhaustive()
    }
}
