//! The operator side of etcd (DESIGN.md §7): read the cluster, plan and push a document with a
//! compare-and-swap on its mod_revision, write a degrade override, wait until every registered
//! gateway has applied a revision. Typed results and errors; `cli` prints them and maps them
//! to exit codes.

pub mod writes;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use crate::control::etcd::{ClusterKeys, Etcd, EtcdAccess, EtcdError, GatewayRecord, Keys};
use crate::control::topology::{
    self, BuildContext, DegradeOverride, Overrides, Problems, RawTopology, Shard, Topology,
    TopologyDiff,
};
use crate::data::upstream::Upstreams;

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// etcd could not be reached (exit 4).
    #[error("{0}")]
    Unreachable(#[from] EtcdError),
    /// Refused or invalid; nothing written (exit 1).
    #[error("{0}")]
    Refused(String),
    /// Someone else changed the key since it was read; nothing written (exit 3).
    #[error("conflict: {key} is at mod_revision {found}, not {expected} as read; nothing was written (read it again and retry)")]
    Conflict {
        key: String,
        expected: i64,
        found: i64,
    },
    /// A key the command was checked against changed before it wrote; nothing written (exit 3).
    #[error("conflict: {0}")]
    Changed(String),
    /// Waited too long (exit 5).
    #[error("{0}")]
    TimedOut(String),
}

/// The cluster as the operator commands see it.
pub struct EtcdCluster {
    etcd: Etcd,
    keys: Keys,
    name: String,
}

/// Builds `doc + overrides` offline, as a gateway would (no connections are opened).
pub fn build_effective(
    doc: RawTopology,
    overrides: &Overrides,
    revision: i64,
    running_shard_count: Option<u32>,
) -> Result<Topology, Problems> {
    let ctx = BuildContext {
        revision: u64::try_from(revision).unwrap_or(0),
        running_shard_count,
        ..BuildContext::default()
    };
    topology::build(doc, overrides, &ctx, &Upstreams::new())
}

/// The live effective snapshot of what was read.
pub fn live_topology(keys: &Keys, listed: &ClusterKeys) -> Result<Topology, Problems> {
    let (_, doc) = listed.document(keys)?;
    let overrides = listed.overrides(keys)?;
    build_effective(doc, &overrides, listed.revision, None)
}

/// What a push would do.
#[derive(Debug)]
pub struct PushPlan {
    /// The document's mod_revision as read (0: no document yet): the compare of the CAS.
    pub base: i64,
    /// The effective snapshot after the push (new document + live overrides).
    pub new: Topology,
    /// `None` for the first push to a cluster (or when the live document is unusable).
    pub diff: Option<TopologyDiff>,
    /// Why there is no diff although a document exists.
    pub live_problem: Option<String>,
    /// (from, to) → inclusive shard ranges whose serving IDC changes that way.
    pub moved_ranges: BTreeMap<(String, String), Vec<(u32, u32)>>,
    /// Percent of shards whose serving IDC changes.
    pub moved_percent: f64,
    pub unchanged: bool,
}

/// Plans pushing `text` onto what was read: every problem of the document at once.
pub fn plan_push(
    keys: &Keys,
    cluster: &str,
    listed: &ClusterKeys,
    text: &str,
) -> Result<PushPlan, Problems> {
    let doc = RawTopology::parse(text)?;
    if doc.cluster != cluster {
        return Err(Problems(vec![topology::Problem::new(
            "cluster",
            format!(
                "the document is for cluster `{}`, not `{cluster}` (--cluster)",
                doc.cluster
            ),
        )]));
    }
    let base = listed.topology().map_or(0, |s| s.mod_revision);
    let overrides = listed.overrides(keys).unwrap_or_default();
    let live = listed.topology().map(|_| live_topology(keys, listed));
    let running = live
        .as_ref()
        .and_then(|l| l.as_ref().ok())
        .map(|t| t.shard_count);
    let new = build_effective(doc, &overrides, listed.revision, running)?;
    let unchanged = listed
        .topology()
        .is_some_and(|s| s.value == text.as_bytes());
    let (diff, live_problem, moved_ranges) = match live {
        Some(Ok(live)) => {
            let diff = topology::diff(&live, &new);
            let ranges = moved_ranges(&live, &new);
            (Some(diff), None, ranges)
        }
        Some(Err(p)) => (None, Some(p.to_string()), BTreeMap::new()),
        None => (None, None, BTreeMap::new()),
    };
    let moved = diff.as_ref().map_or(0, TopologyDiff::shards_moved);
    let moved_percent = 100.0 * f64::from(moved) / f64::from(new.shard_count.max(1));
    Ok(PushPlan {
        base,
        new,
        diff,
        live_problem,
        moved_ranges,
        moved_percent,
        unchanged,
    })
}

/// Shards whose serving IDC changes, as inclusive ranges per (from, to).
pub fn moved_ranges(old: &Topology, new: &Topology) -> BTreeMap<(String, String), Vec<(u32, u32)>> {
    let name = |t: &Topology, s: u32| {
        if s >= t.shard_count {
            return "-".to_owned();
        }
        t.serving(Shard(s))
            .map_or_else(|| "-".to_owned(), |i| t.idc(i).name.to_string())
    };
    let mut out: BTreeMap<(String, String), Vec<(u32, u32)>> = BTreeMap::new();
    for s in 0..new.shard_count {
        let (from, to) = (name(old, s), name(new, s));
        if from == to {
            continue;
        }
        let ranges = out.entry((from, to)).or_default();
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == s => *end = s,
            _ => ranges.push((s, s)),
        }
    }
    out
}

/// Whether `target` (a set, or `route:<name>`) may be degraded without `--force`.
pub fn check_degrade_target(t: &Topology, target: &str, force: bool) -> Result<(), String> {
    let set_name = match target.strip_prefix("route:") {
        Some(route) => {
            let id = t
                .route_by_name(route)
                .ok_or_else(|| format!("unknown route `{route}`"))?;
            t.set(t.route(id).set).name.to_string()
        }
        None => {
            if !t.sets.iter().any(|s| s.name.as_str() == target) {
                return Err(format!(
                    "unknown set `{target}` (give a set name, or route:<name>)"
                ));
            }
            target.to_owned()
        }
    };
    if force {
        return Ok(());
    }
    let degradable = t
        .sets
        .iter()
        .find(|s| s.name.as_str() == set_name)
        .is_some_and(|s| s.degradable);
    if set_name == "core" {
        return Err(format!(
            "`{target}` is core traffic: degrading it needs --force"
        ));
    }
    if !degradable {
        return Err(format!(
            "set `{set_name}` is not degradable (degradable = false in the topology): degrading `{target}` needs --force"
        ));
    }
    Ok(())
}

/// Progress of a wait for gateways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaitProgress {
    pub revision: u64,
    pub gateways: usize,
    pub applied: usize,
    /// (instance, applied revision) of those still behind.
    pub behind: Vec<(String, u64)>,
}

impl EtcdCluster {
    pub async fn open(
        access: &EtcdAccess,
        cluster: &str,
        timeout: Duration,
    ) -> Result<EtcdCluster, OpError> {
        let etcd = Etcd::connect(access, timeout).await?;
        Ok(EtcdCluster {
            etcd,
            keys: Keys::new(cluster),
            name: cluster.to_owned(),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn endpoints(&self) -> &str {
        self.etcd.endpoints()
    }

    /// The connection, for writes made elsewhere (`cluster::writes`).
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Every key of the cluster at one revision.
    pub async fn read(&self) -> Result<ClusterKeys, OpError> {
        Ok(self.etcd.list(&self.keys).await?)
    }

    /// Writes the document if its mod_revision is still `expected` (0: it must not exist yet).
    /// Returns the revision of the write.
    pub async fn write_topology(&self, text: &str, expected: i64) -> Result<i64, OpError> {
        let key = self.keys.topology();
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key.clone(), text, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.etcd.client();
        let resp = self.etcd.call("push", client.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        let found = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or(0);
        Err(OpError::Conflict {
            key,
            expected,
            found,
        })
    }

    /// Writes `override/degrade/<target>`; returns the revision of the write.
    pub async fn write_degrade(
        &self,
        target: &str,
        value: &DegradeOverride,
    ) -> Result<i64, OpError> {
        let json = serde_json::to_vec(value)
            .map_err(|e| OpError::Refused(format!("cannot encode the override: {e}")))?;
        let mut client = self.etcd.client();
        let resp = self
            .etcd
            .call(
                "degrade",
                client.put(self.keys.degrade_override(target), json, None),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Polls the registry until every registered gateway has applied `revision`, calling
    /// `progress` whenever the count changes; `TimedOut` after `limit`.
    pub async fn wait_applied(
        &self,
        revision: i64,
        limit: Duration,
        mut progress: impl FnMut(&WaitProgress),
    ) -> Result<WaitProgress, OpError> {
        let revision = u64::try_from(revision).unwrap_or(0);
        let deadline = Instant::now() + limit;
        let mut last: Option<WaitProgress> = None;
        loop {
            let now = match self.read().await {
                Ok(listed) => Some(wait_progress(&listed.gateways(), revision)),
                // A blip while waiting is not the end of the wait: the deadline decides.
                Err(OpError::Unreachable(_)) if Instant::now() < deadline => None,
                Err(e) => return Err(e),
            };
            if let Some(now) = now {
                if last.as_ref() != Some(&now) {
                    progress(&now);
                }
                if now.applied == now.gateways {
                    return Ok(now);
                }
                last = Some(now);
            }
            if Instant::now() >= deadline {
                let behind = last.map_or_else(String::new, |p| {
                    p.behind
                        .iter()
                        .map(|(i, r)| format!("{i} at {r}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                return Err(OpError::TimedOut(format!(
                    "not every gateway applied revision {revision} within {} ms (behind: {behind})",
                    limit.as_millis()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Who has applied `revision` among the registered gateways.
pub fn wait_progress(
    gateways: &[(String, Result<GatewayRecord, String>)],
    revision: u64,
) -> WaitProgress {
    let mut p = WaitProgress {
        revision,
        gateways: gateways.len(),
        ..WaitProgress::default()
    };
    for (instance, record) in gateways {
        let applied = record.as_ref().map_or(0, |r| r.applied_revision);
        if applied >= revision {
            p.applied += 1;
        } else {
            p.behind.push((instance.clone(), applied));
        }
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;
    use crate::control::etcd::Stored;

    fn doc(pin_to: &str) -> String {
        format!(
            "cluster = \"c\"\nshard_count = 64\n[sets.core]\n[sets.noncore]\ndegradable = true\n\
             [[idcs]]\nname = \"sh\"\npools.core = [\"127.0.0.1:1\"]\npools.noncore = [\"127.0.0.1:1\"]\n\
             [[idcs]]\nname = \"bj\"\npools.core = [\"127.0.0.1:2\"]\npools.noncore = [\"127.0.0.1:2\"]\n\
             [[shards.pins]]\nrange = \"0-63\"\nidc = \"{pin_to}\"\n\
             [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\n\
             [[routes]]\nname = \"recs\"\npath_prefix = \"/recs\"\nset = \"noncore\"\nkey = [\"header:x-user-id\"]\n"
        )
    }

    fn listed(text: Option<&str>) -> ClusterKeys {
        let mut ck = ClusterKeys {
            revision: 10,
            ..ClusterKeys::default()
        };
        if let Some(t) = text {
            ck.keys.insert(
                "topology".into(),
                Stored {
                    value: t.as_bytes().to_vec(),
                    mod_revision: 8,
                },
            );
        }
        ck
    }

    #[test]
    fn first_push_moves_nothing_and_a_move_is_counted_with_ranges() {
        let keys = Keys::new("c");
        let first = plan_push(&keys, "c", &listed(None), &doc("sh")).unwrap();
        assert_eq!(first.base, 0);
        assert!(first.diff.is_none());
        assert_eq!(first.moved_percent, 0.0);

        let plan = plan_push(&keys, "c", &listed(Some(&doc("sh"))), &doc("bj")).unwrap();
        assert_eq!(plan.base, 8);
        assert_eq!(plan.moved_percent, 100.0);
        assert_eq!(
            plan.moved_ranges[&("sh".to_owned(), "bj".to_owned())],
            vec![(0, 63)]
        );
        assert!(
            plan_push(&keys, "c", &listed(Some(&doc("sh"))), &doc("sh"))
                .unwrap()
                .unchanged
        );
    }

    #[test]
    fn push_problems_and_wrong_cluster() {
        let keys = Keys::new("c");
        assert!(plan_push(
            &keys,
            "c",
            &listed(None),
            "shard_count = 0\ncluster = \"c\""
        )
        .is_err());
        let p = plan_push(&keys, "other", &listed(None), &doc("sh")).unwrap_err();
        assert!(p.to_string().contains("not `other`"), "{p}");
    }

    #[test]
    fn degrade_targets() {
        let keys = Keys::new("c");
        let t = live_topology(&keys, &listed(Some(&doc("sh")))).unwrap();
        assert!(check_degrade_target(&t, "noncore", false).is_ok());
        assert!(check_degrade_target(&t, "route:recs", false).is_ok());
        assert!(check_degrade_target(&t, "core", false).is_err());
        assert!(check_degrade_target(&t, "route:orders", false).is_err());
        assert!(check_degrade_target(&t, "route:orders", true).is_ok());
        assert!(check_degrade_target(&t, "nope", true).is_err());
        assert!(check_degrade_target(&t, "route:nope", true).is_err());
    }

    #[test]
    fn wait_progress_counts_behind() {
        let rec = |r: u64| {
            Ok(GatewayRecord {
                idc: None,
                addr: String::new(),
                admin: String::new(),
                applied_revision: r,
                view: BTreeMap::new(),
                started_at: 0,
            })
        };
        let gws = vec![("a".to_owned(), rec(5)), ("b".to_owned(), rec(3))];
        let p = wait_progress(&gws, 4);
        assert_eq!((p.gateways, p.applied), (2, 1));
        assert_eq!(p.behind, vec![("b".to_owned(), 3)]);
    }
}
