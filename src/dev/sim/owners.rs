//! The simulated IDCs' ownership board: what a real service keeps in its replicated ownership
//! table, reduced to what the misroute contract (docs/backends.md) needs. Per shard, the
//! highest owner epoch a write arrived with and the IDC it arrived at. A write carrying an
//! older epoch than the board's comes from a gateway that has not seen the latest owner: it is
//! refused with 421 naming the owner the board knows, and not applied.

use std::collections::HashMap;
use std::sync::Mutex;

use http::{HeaderMap, Method};

use crate::data::headers;

/// Shared by every simulated IDC started together (`SimBackend::start_on_board`).
#[derive(Debug, Default)]
pub struct Owners {
    shards: Mutex<HashMap<u32, (u64, String)>>,
}

/// The board's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it (and, for a write with an epoch, it is recorded).
    Apply,
    /// Refuse it with 421: the owner the board knows, since `epoch`.
    Refuse { owner: String, epoch: u64 },
}

impl Owners {
    pub fn new() -> Owners {
        Owners::default()
    }

    /// Checks a request arriving at `idc` and, when it is a write that is applied, records its
    /// epoch. Reads, and requests without `x-shardgate-shard` or `x-shardgate-owner-epoch`,
    /// are always served.
    pub fn check(&self, idc: &str, method: &Method, h: &HeaderMap) -> Verdict {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return Verdict::Apply;
        }
        let number = |name| {
            h.get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(shard), Some(epoch)) = (number(headers::SHARD), number(headers::OWNER_EPOCH))
        else {
            return Verdict::Apply;
        };
        let Ok(shard) = u32::try_from(shard) else {
            return Verdict::Apply;
        };
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        match shards.get(&shard) {
            Some((known, owner)) if epoch < *known => Verdict::Refuse {
                owner: owner.clone(),
                epoch: *known,
            },
            _ => {
                shards.insert(shard, (epoch, idc.to_owned()));
                Verdict::Apply
            }
        }
    }

    /// Records a write at `epoch` applied at `idc`, as if a gateway had sent one: how a test
    /// makes the board know a newer owner than a gateway does.
    pub fn record(&self, shard: u32, epoch: u64, idc: &str) {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let entry = shards.entry(shard).or_insert((epoch, idc.to_owned()));
        if epoch >= entry.0 {
            *entry = (epoch, idc.to_owned());
        }
    }

    /// The board's (epoch, IDC) for `shard`, if a write with an epoch reached it.
    pub fn owner(&self, shard: u32) -> Option<(u64, String)> {
        let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        shards.get(&shard).cloned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    fn write(shard: &str, epoch: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::SHARD, shard.parse().unwrap());
        h.insert(headers::OWNER_EPOCH, epoch.parse().unwrap());
        h
    }

    #[test]
    fn older_writes_are_refused_newer_and_equal_ones_recorded() {
        let board = Owners::new();
        assert_eq!(
            board.check("sh", &Method::POST, &write("7", "10")),
            Verdict::Apply
        );
        assert_eq!(board.owner(7), Some((10, "sh".into())));
        assert_eq!(
            board.check("bj", &Method::POST, &write("7", "9")),
            Verdict::Refuse {
                owner: "sh".into(),
                epoch: 10
            }
        );
        assert_eq!(
            board.owner(7),
            Some((10, "sh".into())),
            "a refused write is not recorded"
        );
        assert_eq!(
            board.check("sh", &Method::PUT, &write("7", "10")),
            Verdict::Apply
        );
        assert_eq!(
            board.check("bj", &Method::POST, &write("7", "12")),
            Verdict::Apply
        );
        assert_eq!(board.owner(7), Some((12, "bj".into())));
        // Reads and requests without the headers are served as before.
        assert_eq!(
            board.check("gz", &Method::GET, &write("7", "1")),
            Verdict::Apply
        );
        assert_eq!(
            board.check("gz", &Method::POST, &HeaderMap::new()),
            Verdict::Apply
        );
        assert_eq!(
            board.check("gz", &Method::POST, &write("7", "x")),
            Verdict::Apply
        );
        assert_eq!(board.owner(7), Some((12, "bj".into())));
        assert_eq!(
            board.check("sh", &Method::POST, &write("8", "1")),
            Verdict::Apply
        );
        board.record(8, 5, "gz");
        board.record(8, 4, "sh");
        assert_eq!(board.owner(8), Some((5, "gz".into())));
    }
}
