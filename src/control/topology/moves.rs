//! Move records in the snapshot (DESIGN.md §5): the shards under a write fence, the owners that
//! applied moves give their ranges, and the shards a draining IDC still serves while its drain
//! is fenced. Resolved once per build, so a request pays one bit test at most.

use std::collections::HashMap;

use super::build::parse_range;
use super::overrides::{MoveKind, MovePhase, MoveRecord, Overrides};
use super::IdcId;

/// A set of shards as a bitmap: 128 bytes per 1,024 shards, one bit test per lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardSet {
    words: Box<[u64]>,
}

impl ShardSet {
    /// An empty set that can hold shards `0..shard_count`.
    pub fn new(shard_count: u32) -> ShardSet {
        ShardSet {
            words: vec![0; (shard_count as usize).div_ceil(64)].into_boxed_slice(),
        }
    }

    pub fn insert(&mut self, shard: u32) {
        if let Some(w) = self.words.get_mut((shard >> 6) as usize) {
            *w |= 1 << (shard & 63);
        }
    }

    pub fn insert_range(&mut self, (a, b): (u32, u32)) {
        for s in a..=b {
            self.insert(s);
        }
    }

    #[inline]
    pub fn contains(&self, shard: u32) -> bool {
        self.words
            .get((shard >> 6) as usize)
            .is_some_and(|w| (w >> (shard & 63)) & 1 == 1)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn intersects(&self, other: &ShardSet) -> bool {
        self.words
            .iter()
            .zip(other.words.iter())
            .any(|(a, b)| a & b != 0)
    }

    /// The shards in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64u32)
                .filter(move |b| (w >> b) & 1 == 1)
                .map(move |b| i as u32 * 64 + b)
        })
    }

    /// The set as inclusive ranges (`"0-63"`, `"70"`), the form move records keep.
    pub fn ranges(&self) -> Vec<String> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for s in self.iter() {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == s => *end = s,
                _ => out.push((s, s)),
            }
        }
        out.into_iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect()
    }
}

/// A record's ranges as one set; the first range that does not parse is the error.
pub fn record_shards(record: &MoveRecord, shard_count: u32) -> Result<ShardSet, String> {
    let mut set = ShardSet::new(shard_count);
    for r in &record.ranges {
        set.insert_range(parse_range(r, shard_count)?);
    }
    Ok(set)
}

/// What the move records change in a snapshot.
#[derive(Debug, Default)]
pub(super) struct MoveEffects {
    /// Shards whose writes are fenced (records in phase `fencing`).
    pub fenced: ShardSet,
    /// Per IDC (by `IdcId`): the shards a `draining` IDC still serves because its drain is
    /// still fencing. `None`: it serves nothing while draining.
    pub drain_serves: Vec<Option<ShardSet>>,
}

/// Applies the `applied` moves to the home and failover-order tables (the moved range's owner
/// becomes `to`, the rest of its order stays as it was; later fence revisions win) and collects
/// the fences and the drains in progress. A record naming an unknown IDC or a range outside the
/// shard count is skipped with a warning: it was checked when it was written, and one stale
/// record must not stop every later change from being served.
pub(super) fn apply(
    overrides: &Overrides,
    ids: &HashMap<&str, IdcId>,
    shard_count: u32,
    home: &mut [IdcId],
    order: &mut [IdcId],
) -> MoveEffects {
    let n = ids.len();
    let mut effects = MoveEffects {
        fenced: ShardSet::new(shard_count),
        drain_serves: vec![None; n],
    };
    let mut applied: Vec<(&String, &MoveRecord)> = Vec::new();
    for (id, record) in &overrides.moves {
        if record.phase == MovePhase::RolledBack {
            continue;
        }
        let shards = match record_shards(record, shard_count) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "move record has a range outside this topology; ignored");
                continue;
            }
        };
        match (record.phase, record.kind) {
            (MovePhase::Fencing, kind) => {
                for s in shards.iter() {
                    effects.fenced.insert(s);
                }
                if kind == MoveKind::Drain {
                    if let Some(from) = record.from.as_deref().and_then(|f| ids.get(f)) {
                        let serves = effects.drain_serves[from.0 as usize]
                            .get_or_insert_with(|| ShardSet::new(shard_count));
                        for s in shards.iter() {
                            serves.insert(s);
                        }
                    }
                }
            }
            (MovePhase::Applied, MoveKind::Move) => applied.push((id, record)),
            _ => {}
        }
    }
    applied.sort_by_key(|(id, r)| (r.fence_revision, r.fenced_at_ms, *id));
    for (id, record) in applied {
        let Some(to) = record.to.as_deref().and_then(|t| ids.get(t)).copied() else {
            tracing::warn!(id = %id, to = ?record.to, "applied move names an IDC this topology does not declare; ignored");
            continue;
        };
        let Ok(shards) = record_shards(record, shard_count) else {
            continue;
        };
        for s in shards.iter() {
            let s = s as usize;
            home[s] = to;
            let row = &mut order[s * n..(s + 1) * n];
            if let Some(pos) = row.iter().position(|&i| i == to) {
                row[..=pos].rotate_right(1);
            }
        }
    }
    effects
}

/// The newest applied move covering `shard`, for `explain`.
pub fn moved_by(
    overrides: &Overrides,
    shard: u32,
    shard_count: u32,
) -> Option<(&str, &MoveRecord)> {
    overrides
        .moves
        .iter()
        .filter(|(_, r)| r.phase == MovePhase::Applied && r.kind == MoveKind::Move)
        .filter(|(_, r)| record_shards(r, shard_count).is_ok_and(|s| s.contains(shard)))
        .max_by_key(|(id, r)| (r.fence_revision, r.fenced_at_ms, *id))
        .map(|(id, r)| (id.as_str(), r))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn shard_sets() {
        let mut s = ShardSet::new(130);
        assert!(s.is_empty());
        s.insert_range((0, 3));
        s.insert(64);
        s.insert(129);
        s.insert(500); // outside: ignored
        assert!(s.contains(2) && s.contains(64) && s.contains(129));
        assert!(!s.contains(4) && !s.contains(500));
        assert_eq!(s.len(), 6);
        assert_eq!(s.ranges(), vec!["0-3", "64", "129"]);
        let mut t = ShardSet::new(130);
        t.insert(5);
        assert!(!s.intersects(&t));
        t.insert(64);
        assert!(s.intersects(&t));
        assert!(!ShardSet::default().contains(0));
    }
}
