//! Owner epochs (DESIGN.md §12): per shard, the revision of the last change of its owner, sent
//! upstream as `x-shardgate-owner-epoch` so a backend can refuse a write from a gateway that
//! has not seen the latest owner. Computed once per snapshot build, deterministically.
//!
//! etcd mode: the epoch of shard `s` is the max of the mod revisions of the keys that decide
//! its serving IDC: the `topology` document; `override/idc/<i>` of every IDC `i` at or before
//! the serving IDC in `s`'s failover order; every `move/<id>` in phase `applied` covering `s`.
//! Every gateway serving the same etcd state computes the same epochs, including one booted
//! from its `--cache-dir` (the revisions travel with the cached overrides). The rule needs
//! ownership keys to be overwritten, never deleted (a restore writes an `active` override, a
//! finished move keeps its record): a deleted key would take its revision out of the max and
//! let an epoch go backwards.
//!
//! File mode: the file revision at which the shard's serving IDC last changed, carried from the
//! previous snapshot while the serving IDC stays the same. After a restart every shard starts
//! at the first revision served; that revision only grows across restarts with `--cache-dir`
//! (`source::FileSource` keeps the counter there).
//!
//! No owner changes with the clock alone: a warm-up step is a fenced move that rewrites the
//! warming IDC's override (its `warmup_step`), and an expired override is replaced by the
//! driver, so every owner change comes with a revision of its own. (A step also bumps the
//! epoch of the warming IDC's shards that are not home yet: a harmless, spurious bump — a
//! lagging gateway's write is re-forwarded once with the stated epoch.)

use std::collections::HashMap;

use http::HeaderValue;

use super::moves::record_shards;
use super::overrides::{MovePhase, Overrides};
use super::{Idc, IdcId, Shard, Topology};

/// Owner epochs of one snapshot: per shard an index into a short table of distinct epochs, each
/// with its header value made once, so a request pays two array reads and a reference-count
/// increment for its header.
#[derive(Debug, Default)]
pub struct OwnerEpochs {
    of_shard: Vec<u32>,
    values: Vec<(u64, HeaderValue)>,
}

impl OwnerEpochs {
    fn from_epochs(epochs: &[u64]) -> OwnerEpochs {
        let mut index: HashMap<u64, u32> = HashMap::new();
        let mut values = Vec::new();
        let of_shard = epochs
            .iter()
            .map(|&e| {
                *index.entry(e).or_insert_with(|| {
                    values.push((e, HeaderValue::from(e)));
                    (values.len() - 1) as u32
                })
            })
            .collect();
        OwnerEpochs { of_shard, values }
    }

    /// The shard's owner epoch (0 for a shard outside the table).
    #[inline]
    pub fn epoch(&self, shard: Shard) -> u64 {
        self.entry(shard).map_or(0, |(e, _)| *e)
    }

    /// The shard's owner epoch as a header value.
    #[inline]
    pub fn header(&self, shard: Shard) -> Option<&HeaderValue> {
        self.entry(shard).map(|(_, h)| h)
    }

    fn entry(&self, shard: Shard) -> Option<&(u64, HeaderValue)> {
        let i = *self.of_shard.get(shard.0 as usize)?;
        self.values.get(i as usize)
    }
}

/// What the epoch rule reads of a snapshot being built.
pub(super) struct EpochInputs<'a> {
    pub idcs: &'a [Idc],
    /// shard → failover order, `idcs.len()` entries per shard (after applied moves).
    pub order: &'a [IdcId],
    pub serving: &'a [Option<IdcId>],
    pub shard_count: u32,
    pub overrides: &'a Overrides,
    pub revision: u64,
    /// The snapshot being replaced (file mode carries epochs from it).
    pub previous: Option<&'a Topology>,
}

/// The owner epoch of every shard: the etcd rule when the overrides carry etcd revisions,
/// else the file rule.
pub(super) fn owner_epochs(input: &EpochInputs<'_>) -> OwnerEpochs {
    let epochs = if input.overrides.revisions.is_empty() {
        carried(input)
    } else {
        from_revisions(input)
    };
    OwnerEpochs::from_epochs(&epochs)
}

/// etcd: the max of the revisions of the keys that decide each shard's serving IDC.
fn from_revisions(input: &EpochInputs<'_>) -> Vec<u64> {
    let revisions = &input.overrides.revisions;
    let document = revisions.get("topology").copied().unwrap_or(0);
    let idc_override: Vec<u64> = input
        .idcs
        .iter()
        .map(|i| {
            revisions
                .get(&format!("override/idc/{}", i.name))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let n = input.idcs.len();
    let mut epochs: Vec<u64> = (0..input.shard_count as usize)
        .map(|s| {
            let row = input.order.get(s * n..(s + 1) * n).unwrap_or(&[]);
            let mut epoch = document;
            // The IDCs before the serving one were passed over because of their state, and
            // the serving one serves because of its own: all of them decide the owner. With
            // no serving IDC, every IDC in the order does.
            for idc in row {
                epoch = epoch.max(idc_override[idc.0 as usize]);
                if Some(*idc) == input.serving[s] {
                    break;
                }
            }
            epoch
        })
        .collect();
    for (id, record) in &input.overrides.moves {
        if record.phase != MovePhase::Applied {
            continue;
        }
        let Some(&revision) = revisions.get(&format!("move/{id}")) else {
            continue;
        };
        let Ok(shards) = record_shards(record, input.shard_count) else {
            continue;
        };
        for s in shards.iter() {
            if let Some(e) = epochs.get_mut(s as usize) {
                *e = (*e).max(revision);
            }
        }
    }
    epochs
}

/// File mode: the previous snapshot's epoch while the shard's serving IDC (by name) is the
/// same, else this revision.
fn carried(input: &EpochInputs<'_>) -> Vec<u64> {
    let previous = input
        .previous
        .filter(|p| p.shard_count == input.shard_count);
    let name = |t: Option<IdcId>, idcs: &[Idc]| t.map(|i| idcs[i.0 as usize].name.clone());
    (0..input.shard_count)
        .map(|s| {
            let shard = Shard(s);
            let now = name(input.serving[s as usize], input.idcs);
            match previous {
                Some(p) if name(p.serving(shard), &p.idcs) == now => p.owner_epoch(shard),
                _ => input.revision,
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::super::overrides::{IdcOverride, IdcState, MoveKind, MoveRecord};
    use super::super::{build_with_previous, BuildContext, RawTopology};
    use super::*;
    use crate::data::upstream::Upstreams;

    const DOC: &str = r#"
cluster = "t"
shard_count = 64
[sets.core]
[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]
[[idcs]]
name = "bj"
pools.core = ["127.0.0.1:7002"]
[[idcs]]
name = "gz"
pools.core = ["127.0.0.1:7003"]
[[shards.pins]]
range = "0-31"
idc = "sh"
[[shards.pins]]
range = "32-63"
idc = "bj"
[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
key = ["header:x-user-id"]
"#;

    fn snapshot(o: &Overrides, revision: u64, previous: Option<&Topology>) -> Topology {
        let ctx = BuildContext {
            revision,
            ..BuildContext::default()
        };
        build_with_previous(
            RawTopology::parse(DOC).unwrap(),
            o,
            &ctx,
            &Upstreams::new(),
            previous,
        )
        .unwrap()
    }

    fn idc(state: IdcState) -> IdcOverride {
        IdcOverride {
            state,
            reason: String::new(),
            by: String::new(),
            at: 1,
            expires_at: None,
            at_ms: 0,
            warmup_s: None,
            warmup_step: None,
        }
    }

    fn applied_move(range: &str, to: &str) -> MoveRecord {
        MoveRecord {
            kind: MoveKind::Move,
            ranges: vec![range.into()],
            from: None,
            to: Some(to.into()),
            phase: MovePhase::Applied,
            fence_revision: 1,
            fenced_at_ms: 0,
            reason: String::new(),
            by: String::new(),
            at: 0,
            finished_at: None,
            note: String::new(),
            step: None,
        }
    }

    /// Overrides as read from etcd: the document at revision 5.
    fn etcd() -> Overrides {
        let mut o = Overrides::default();
        o.revisions.insert("topology".into(), 5);
        o
    }

    #[test]
    fn an_unrelated_override_change_keeps_the_owner_epoch() {
        let mut o = etcd();
        let before = snapshot(&o, 5, None);
        assert!((0..64).all(|s| before.owner_epoch(Shard(s)) == 5));
        // gz changes state: no shard's failover order reaches gz before its serving IDC
        // (every IDC is active, so the home serves), so no epoch moves.
        o.idcs.insert("gz".into(), idc(IdcState::Down));
        o.revisions.insert("override/idc/gz".into(), 9);
        let after = snapshot(&o, 9, None);
        assert!((0..64).all(|s| after.owner_epoch(Shard(s)) == 5));
        // sh goes down: its shards change owner at 11, bj's keep 5.
        o.idcs.insert("sh".into(), idc(IdcState::Down));
        o.revisions.insert("override/idc/sh".into(), 11);
        let down = snapshot(&o, 11, None);
        assert!((0..32).all(|s| down.owner_epoch(Shard(s)) == 11));
        assert!((32..64).all(|s| down.owner_epoch(Shard(s)) == 5));
        assert_eq!(down.owner_epoch_header(Shard(0)).unwrap(), "11");
    }

    #[test]
    fn an_applied_move_bumps_only_its_shards() {
        let mut o = etcd();
        let mut record = applied_move("8-11", "gz");
        record.phase = MovePhase::Fencing;
        o.moves.insert("m1".into(), record.clone());
        o.revisions.insert("move/m1".into(), 20);
        let fencing = snapshot(&o, 20, None);
        assert!(
            (0..64).all(|s| fencing.owner_epoch(Shard(s)) == 5),
            "a fence does not change the owner"
        );
        record.phase = MovePhase::Applied;
        o.moves.insert("m1".into(), record);
        o.revisions.insert("move/m1".into(), 23);
        let t = snapshot(&o, 23, None);
        for s in 0..64 {
            let want = if (8..=11).contains(&s) { 23 } else { 5 };
            assert_eq!(t.owner_epoch(Shard(s)), want, "shard {s}");
        }
        assert_eq!(t.idc(t.serving(Shard(9)).unwrap()).name.as_str(), "gz");
    }

    #[test]
    fn a_snapshot_rebuilt_from_the_cache_has_the_same_epochs() {
        let mut o = etcd();
        o.idcs.insert("bj".into(), idc(IdcState::Down));
        o.revisions.insert("override/idc/bj".into(), 8);
        o.moves.insert("m1".into(), applied_move("0-3", "gz"));
        o.revisions.insert("move/m1".into(), 12);
        let live = snapshot(&o, 14, None);
        // What the etcd source caches, and what a gateway booting from the cache reads back.
        let cached = crate::control::etcd::cache::CachedSnapshot {
            cluster: "t".into(),
            revision: 14,
            document: DOC.into(),
            overrides: o.clone(),
            written_at: 0,
        };
        let text = serde_json::to_vec(&cached).unwrap();
        let back: crate::control::etcd::cache::CachedSnapshot =
            serde_json::from_slice(&text).unwrap();
        let booted = snapshot(&back.overrides, back.revision, None);
        for s in 0..64 {
            assert_eq!(
                live.owner_epoch(Shard(s)),
                booted.owner_epoch(Shard(s)),
                "shard {s}"
            );
        }
        assert_eq!(live.owner_epoch(Shard(0)), 12);
        assert_eq!(live.owner_epoch(Shard(40)), 8);
        assert_eq!(live.owner_epoch(Shard(10)), 5);
        // A single record, as written to etcd, never carries the revisions.
        let record = serde_json::to_string(&o.idcs["bj"]).unwrap();
        assert!(!record.contains("revisions"), "{record}");
        assert!(!serde_json::to_string(&Overrides::default())
            .unwrap()
            .contains("revisions"));
    }

    #[test]
    fn file_mode_carries_the_epoch_while_the_owner_stays() {
        let first = snapshot(&Overrides::default(), 3, None);
        assert!((0..64).all(|s| first.owner_epoch(Shard(s)) == 3));
        let mut o = Overrides::default();
        o.idcs.insert("sh".into(), idc(IdcState::Down));
        let second = snapshot(&o, 4, Some(&first));
        assert!((0..32).all(|s| second.owner_epoch(Shard(s)) == 4));
        assert!((32..64).all(|s| second.owner_epoch(Shard(s)) == 3));
        // An unrelated reload keeps both.
        let third = snapshot(&o, 5, Some(&second));
        assert_eq!(third.owner_epoch(Shard(0)), 4);
        assert_eq!(third.owner_epoch(Shard(40)), 3);
    }
}
