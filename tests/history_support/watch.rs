//! The test's own watch of the ownership records, on the ledger's clock: when each record was
//! seen `fencing`, acknowledged by every live gateway, `applied` or `rolled_back`, and every
//! IDC override (an owner change without a fence).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde_json::Value;
use shardgate::dev::sim::history::{OwnershipEvent, Phase};
use shardgate::dev::sim::ledger::Ledger;
use tokio::task::JoinHandle;

use super::SHARDS;
use crate::etcd_support::{within, Etcd, CLUSTER};

/// What the test's own watch saw, on the ledger's clock.
#[derive(Default)]
pub struct Observed {
    pub events: Vec<OwnershipEvent>,
    /// Record id → its last phase (`fencing`, `applied`, `rolled_back`).
    pub phases: BTreeMap<String, String>,
    /// Instance → `applied_revision` of the live registrations.
    registrations: BTreeMap<String, u64>,
    /// Fenced records not yet acknowledged by every live gateway: id → (fence revision, event).
    unacked: BTreeMap<String, (u64, OwnershipEvent)>,
}

fn shards_of(ranges: &Value) -> BTreeSet<u32> {
    let mut shards = BTreeSet::new();
    for r in ranges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let mut ends = r.splitn(2, '-').map(|n| n.trim().parse::<u32>().ok());
        if let (Some(Some(lo)), hi) = (ends.next(), ends.next()) {
            let hi = hi.flatten().unwrap_or(lo);
            shards.extend(lo..=hi.min(SHARDS - 1));
        }
    }
    shards
}

impl Observed {
    fn apply(&mut self, name: &str, value: Option<&[u8]>, revision: u64, at_ns: u64) {
        if let Some(instance) = name.strip_prefix("gateway/") {
            match value.and_then(|v| serde_json::from_slice::<Value>(v).ok()) {
                Some(v) => {
                    let applied = v["applied_revision"].as_u64().unwrap_or(0);
                    self.registrations.insert(instance.to_owned(), applied);
                }
                None => {
                    self.registrations.remove(instance);
                }
            }
        } else if let Some(id) = name.strip_prefix("move/") {
            let Some(v) = value.and_then(|v| serde_json::from_slice::<Value>(v).ok()) else {
                return;
            };
            let phase_name = v["phase"].as_str().unwrap_or_default().to_owned();
            let phase = match phase_name.as_str() {
                "fencing" => Phase::Fenced,
                "applied" => Phase::Applied,
                "rolled_back" => Phase::RolledBack,
                _ => return,
            };
            if self.phases.get(id) == Some(&phase_name) {
                return;
            }
            self.phases.insert(id.to_owned(), phase_name);
            let event = OwnershipEvent {
                at_ns,
                record: id.to_owned(),
                kind: v["kind"].as_str().unwrap_or("?").to_owned(),
                phase,
                revision,
                shards: shards_of(&v["ranges"]),
                from: v["from"].as_str().map(str::to_owned),
                to: v["to"].as_str().map(str::to_owned),
            };
            if phase == Phase::Fenced {
                self.unacked
                    .insert(id.to_owned(), (revision, event.clone()));
            } else {
                self.unacked.remove(id);
            }
            self.events.push(event);
        } else if name.starts_with("override/idc/") {
            self.events.push(OwnershipEvent {
                at_ns,
                record: name.to_owned(),
                kind: "override".to_owned(),
                phase: Phase::Unfenced,
                revision,
                shards: (0..SHARDS).collect(),
                from: None,
                to: None,
            });
        }
        self.check_acks(at_ns);
    }

    /// A fence is acknowledged once every live registration shows a revision at least the
    /// fence's (what the leader waits for).
    fn check_acks(&mut self, at_ns: u64) {
        if self.registrations.is_empty() {
            return;
        }
        let lowest = self.registrations.values().copied().min().unwrap_or(0);
        let acked: Vec<String> = self
            .unacked
            .iter()
            .filter(|(_, (fence, _))| lowest >= *fence)
            .map(|(id, _)| id.clone())
            .collect();
        for id in acked {
            if let Some((_, fenced)) = self.unacked.remove(&id) {
                self.events.push(OwnershipEvent {
                    at_ns,
                    phase: Phase::Acked,
                    ..fenced
                });
            }
        }
    }
}

/// The test's own watch of `/shardgate/<cluster>/`, straight to etcd (never through a relay).
pub struct Watcher {
    pub observed: Arc<Mutex<Observed>>,
    task: JoinHandle<()>,
}

impl Watcher {
    pub async fn start(etcd: &Etcd, ledger: Arc<Ledger>) -> Watcher {
        let prefix = format!("/shardgate/{CLUSTER}/");
        let mut client = etcd.client().await;
        let listed = within(
            Duration::from_secs(5),
            "the first list",
            client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .unwrap();
        let start = listed.header().unwrap().revision();
        let observed = Arc::new(Mutex::new(Observed::default()));
        {
            let mut o = observed.lock().unwrap();
            for kv in listed.kvs() {
                let name = kv.key_str().unwrap_or_default().trim_start_matches(&prefix);
                o.apply(name, Some(kv.value()), kv.mod_revision() as u64, 0);
            }
        }
        let mut stream = within(
            Duration::from_secs(5),
            "a watch",
            client.watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start + 1),
                ),
            ),
        )
        .await
        .unwrap();
        let task = {
            let observed = observed.clone();
            tokio::spawn(async move {
                while let Ok(Some(resp)) = stream.message().await {
                    let at_ns = ledger.now_ns();
                    let mut o = observed.lock().unwrap();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let name = kv.key_str().unwrap_or_default().trim_start_matches(&prefix);
                        let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                        o.apply(name, value, kv.mod_revision() as u64, at_ns);
                    }
                }
            })
        };
        Watcher { observed, task }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
