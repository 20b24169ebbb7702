//! What the shard tables take from the hash ring: for every shard, the ring's IDC and the
//! ring's replica order. Walking the ring is most of a snapshot build (a third of the
//! 1,000-route / 16,384-shard one), and it depends only on the IDCs' names and weights and the
//! shard count: a rebuild whose ring is unchanged (every override change, and every document
//! change that does not add, remove, rename or reweigh an IDC) takes it from the previous
//! snapshot. Pins and `failover_to` are applied on top (build.rs, `shard_tables`).

use std::collections::HashMap;
use std::sync::Arc;

use consistent_hash_ring::Ring;

use super::raw::RawIdc;
use super::IdcId;

#[derive(Debug)]
pub struct RingShards {
    /// The IDCs (name, weight) in document order, and the shard count: what the rest follows
    /// from.
    key: (Vec<(String, u32)>, u32),
    /// shard → the ring's IDC (`None`: no IDC on the ring; the build refuses that document).
    home: Vec<Option<IdcId>>,
    /// shard → the ring's replica order, from `starts[shard]` to `starts[shard + 1]`.
    order: Vec<IdcId>,
    starts: Vec<u32>,
}

fn key_of(idcs: &[RawIdc], shard_count: u32) -> (Vec<(String, u32)>, u32) {
    (
        idcs.iter().map(|i| (i.name.clone(), i.weight)).collect(),
        shard_count,
    )
}

impl RingShards {
    /// The previous snapshot's, when its IDCs and shard count are these; else walked anew.
    pub fn for_build(
        idcs: &[RawIdc],
        ids: &HashMap<&str, IdcId>,
        ring: &Ring<String>,
        shard_count: u32,
        previous: Option<&Arc<RingShards>>,
    ) -> Arc<RingShards> {
        if let Some(p) = previous.filter(|p| p.matches(idcs, shard_count)) {
            return p.clone();
        }
        Arc::new(RingShards::walk(idcs, ids, ring, shard_count))
    }

    fn matches(&self, idcs: &[RawIdc], shard_count: u32) -> bool {
        self.key.1 == shard_count
            && self.key.0.len() == idcs.len()
            && self
                .key
                .0
                .iter()
                .zip(idcs)
                .all(|((name, weight), i)| *name == i.name && *weight == i.weight)
    }

    fn walk(
        idcs: &[RawIdc],
        ids: &HashMap<&str, IdcId>,
        ring: &Ring<String>,
        shard_count: u32,
    ) -> RingShards {
        let weighted = idcs.iter().filter(|i| i.weight > 0).count();
        let mut home = Vec::with_capacity(shard_count as usize);
        let mut order = Vec::with_capacity(shard_count as usize * weighted);
        let mut starts = Vec::with_capacity(shard_count as usize + 1);
        starts.push(0);
        for shard in 0..shard_count {
            home.push(
                ring.try_get(shard)
                    .and_then(|name| ids.get(name.as_str()).copied()),
            );
            order.extend(
                ring.replicas(shard)
                    .filter_map(|name| ids.get(name.as_str()).copied()),
            );
            starts.push(order.len() as u32);
        }
        RingShards {
            key: key_of(idcs, shard_count),
            home,
            order,
            starts,
        }
    }

    /// The ring's IDC for `shard`.
    pub fn home(&self, shard: u32) -> Option<IdcId> {
        self.home.get(shard as usize).copied().flatten()
    }

    /// The ring's replica order for `shard`.
    pub fn order(&self, shard: u32) -> &[IdcId] {
        let s = shard as usize;
        match (self.starts.get(s), self.starts.get(s + 1)) {
            (Some(&a), Some(&b)) => &self.order[a as usize..b as usize],
            _ => &[],
        }
    }
}
