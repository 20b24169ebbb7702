//! `diff(old, new)`: what a reload changed, in the words an operator reads in the log and in
//! `push --dry-run`: routes added/removed/changed, IDCs added/removed, and shards whose
//! serving IDC changed, counted per source → target pair.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::{Shard, Topology};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TopologyDiff {
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    pub routes_changed: Vec<String>,
    pub idcs_added: Vec<String>,
    pub idcs_removed: Vec<String>,
    /// (from, to) → shards whose serving IDC changed that way. `-` stands for "none".
    pub moved: BTreeMap<(String, String), u32>,
    pub shard_count: Option<(u32, u32)>,
    /// Top-level tables whose settings changed: `sets`, `failover`, `isolation`.
    pub settings_changed: Vec<String>,
}

impl TopologyDiff {
    pub fn shards_moved(&self) -> u32 {
        self.moved.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        *self == TopologyDiff::default()
    }
}

pub fn diff(old: &Topology, new: &Topology) -> TopologyDiff {
    let mut d = TopologyDiff::default();
    let old_routes: BTreeMap<&str, _> = old
        .document
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();
    let new_routes: BTreeMap<&str, _> = new
        .document
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();
    for (name, r) in &new_routes {
        match old_routes.get(name) {
            None => d.routes_added.push((*name).to_owned()),
            Some(o) if o != r => d.routes_changed.push((*name).to_owned()),
            Some(_) => {}
        }
    }
    for name in old_routes.keys() {
        if !new_routes.contains_key(name) {
            d.routes_removed.push((*name).to_owned());
        }
    }
    for idc in &new.idcs {
        if old.idc_by_name(&idc.name).is_none() {
            d.idcs_added.push(idc.name.to_string());
        }
    }
    for idc in &old.idcs {
        if new.idc_by_name(&idc.name).is_none() {
            d.idcs_removed.push(idc.name.to_string());
        }
    }
    if old.shard_count != new.shard_count {
        d.shard_count = Some((old.shard_count, new.shard_count));
    }
    let (a, b) = (&old.document, &new.document);
    for (table, changed) in [
        ("sets", a.sets != b.sets),
        ("failover", a.failover != b.failover),
        ("isolation", a.isolation != b.isolation),
    ] {
        if changed {
            d.settings_changed.push(table.to_owned());
        }
    }
    let name = |t: &Topology, s: Shard| {
        t.serving(s)
            .map_or_else(|| "-".to_owned(), |i| t.idc(i).name.to_string())
    };
    for s in 0..new.shard_count {
        let shard = Shard(s);
        let before = if s < old.shard_count {
            name(old, shard)
        } else {
            "-".to_owned()
        };
        let after = name(new, shard);
        if before != after {
            *d.moved.entry((before, after)).or_default() += 1;
        }
    }
    d
}

impl fmt::Display for TopologyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut parts = Vec::new();
        let list = |label: &str, v: &[String]| {
            (!v.is_empty()).then(|| format!("{label} [{}]", v.join(", ")))
        };
        parts.extend(list("routes added", &self.routes_added));
        parts.extend(list("routes removed", &self.routes_removed));
        parts.extend(list("routes changed", &self.routes_changed));
        parts.extend(list("IDCs added", &self.idcs_added));
        parts.extend(list("IDCs removed", &self.idcs_removed));
        parts.extend(list("settings changed", &self.settings_changed));
        if let Some((a, b)) = self.shard_count {
            parts.push(format!("shard_count {a} -> {b}"));
        }
        if !self.moved.is_empty() {
            let moves: Vec<String> = self
                .moved
                .iter()
                .map(|((from, to), n)| format!("{from}->{to}: {n}"))
                .collect();
            parts.push(format!(
                "{} shards change serving IDC ({})",
                self.shards_moved(),
                moves.join(", ")
            ));
        }
        f.write_str(&parts.join("; "))
    }
}
