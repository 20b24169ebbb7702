//! The history scenarios' cluster of real processes: a real etcd, simulated IDCs in this
//! process sharing one ledger, two or more `shardgate serve` processes each reaching etcd
//! through its own relay (cut/restore), a watch of the ownership records on the ledger's
//! clock, and a bounded mixed GET/POST load through every gateway. `Run::finish` hands it all
//! to `shardgate::dev::sim::history::check`.
//!
//! Knobs: `HISTORY_LOAD_SCALE` (default 1) multiplies every load phase (the ownership drill
//! runs the same scenarios longer with it); `HISTORY_DUMP_SHARD=N` prints every write outcome
//! and ledger entry of shard N with the report, to follow one shard through a scenario.

#![allow(dead_code, clippy::unwrap_used)] // tests fail loudly on purpose

mod gateway;
mod load;
mod watch;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use shardgate::dev::sim::history::{self, History, Phase, Report};
use shardgate::dev::sim::ledger::{Ledger, DEFAULT_CAP};
use shardgate::dev::sim::SimBackend;
use tempfile::TempDir;

use crate::etcd_support::{shardgate, within, Etcd, Output, CLUSTER, IDCS};
pub use gateway::{wait_answering, Gateway};
use load::Load;
use watch::Watcher;

/// Few shards, so that the load writes every one of them often: sh owns 0-3, bj 4-7, gz 8-11.
pub const SHARDS: u32 = 12;
/// A change of owner (fence, acks, `fence_ms`, and up to a lease TTL of waiting for a gateway
/// that went away) is done within this.
pub const CHANGE_DEADLINE: Duration = Duration::from_secs(40);

/// The topology of a run: short fence and warm-up so that the whole file stays short; the
/// fence covers the route timeout (a write admitted before the fence has ended by then).
pub fn document(sims: &[SocketAddr]) -> String {
    let mut s =
        format!("cluster = \"{CLUSTER}\"\nshard_count = {SHARDS}\n\n[sets.core]\npriority = 0\n");
    for (idc, addr) in IDCS.iter().zip(sims) {
        s.push_str(&format!(
            "\n[[idcs]]\nname = \"{idc}\"\nweight = 100\npools.core = [\"{addr}\"]\n"
        ));
    }
    for (range, idc) in [("0-3", "sh"), ("4-7", "bj"), ("8-11", "gz")] {
        s.push_str(&format!(
            "\n[[shards.pins]]\nrange = \"{range}\"\nidc = \"{idc}\"\n"
        ));
    }
    s.push_str(
        "\n[failover]\nfence_ms = 500\nwarmup_s = 5\n\
         \n[[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\n\
         key = [\"header:x-user-id\"]\ntimeout_ms = 500\nretries = 0\n",
    );
    s
}

/// Seconds of load, scaled by `HISTORY_LOAD_SCALE`.
pub fn load_for(secs: f64) -> Duration {
    let scale = std::env::var("HISTORY_LOAD_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs * scale)
}

/// A scenario's cluster.
pub struct Run {
    pub name: String,
    pub etcd: Etcd,
    pub ledger: Arc<Ledger>,
    pub gateways: Vec<Gateway>,
    sims: Vec<SimBackend>,
    watcher: Watcher,
    load: Load,
    _logs: TempDir,
}

impl Run {
    /// etcd, the simulated IDCs, the topology, one gateway per entry of `gateways` (instance
    /// name, local IDC), all serving; then the load starts: per gateway, two clients over every
    /// shard and one hot writer per entry of `HOT_SHARDS`.
    pub async fn start(name: &str, gateways: &[(&str, &str)]) -> Run {
        let etcd = Etcd::start().await;
        let ledger = Arc::new(Ledger::new(DEFAULT_CAP));
        // One ownership board for every IDC, as a real service's replicated ownership table:
        // a write carrying an owner epoch older than one already seen is refused (421).
        let board = Arc::new(shardgate::dev::sim::owners::Owners::new());
        let mut sims = Vec::new();
        for idc in IDCS {
            let addr = "127.0.0.1:0".parse().unwrap();
            let sim =
                SimBackend::start_with(addr, idc, "core", board.clone(), Some(ledger.clone()))
                    .await
                    .unwrap();
            sims.push(sim);
        }
        let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
        let revision = etcd.put("topology", &document(&addrs)).await as u64;
        let watcher = Watcher::start(&etcd, ledger.clone()).await;
        let logs = tempfile::tempdir().unwrap();
        let mut started = Vec::new();
        for (instance, idc) in gateways {
            started.push(Gateway::start(instance, idc, &etcd, logs.path()).await);
        }
        for g in &mut started {
            g.started(revision).await;
        }
        let proxies: Vec<SocketAddr> = started.iter().map(|g| g.proxy).collect();
        let load = Load::start(&proxies, ledger.clone());
        Run {
            name: name.to_owned(),
            etcd,
            ledger,
            gateways: started,
            sims,
            watcher,
            load,
            _logs: logs,
        }
    }

    /// Lets the load run for `secs` (scaled by `HISTORY_LOAD_SCALE`): this is the workload of
    /// the scenario, not a wait for a condition.
    pub async fn load(&self, secs: f64) {
        tokio::time::sleep(load_for(secs)).await;
    }

    /// `n` single writes to `shard` through gateway `name`, each on a new connection (see
    /// `Load::burst`).
    pub fn burst(&mut self, name: &str, shard: u32, n: usize) {
        let proxy = self.gateway(name).proxy;
        self.load.burst(proxy, shard, n);
    }

    pub fn gateway(&self, name: &str) -> &Gateway {
        self.gateways.iter().find(|g| g.name == name).unwrap()
    }

    pub fn gateway_mut(&mut self, name: &str) -> &mut Gateway {
        self.gateways.iter_mut().find(|g| g.name == name).unwrap()
    }

    /// The elected leader's instance name (the candidate key created first), once there is one.
    pub async fn leader(&self) -> String {
        let prefix = format!("/shardgate/{CLUSTER}/leader/");
        within(CHANGE_DEADLINE, "a leader to be elected", async {
            loop {
                let mut c = self.etcd.client().await;
                if let Ok(Ok(r)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
                )
                .await
                {
                    if let Some(kv) = r.kvs().iter().min_by_key(|kv| kv.create_revision()) {
                        return String::from_utf8_lossy(kv.value()).into_owned();
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// (leader, another gateway).
    pub async fn leader_and_follower(&self) -> (String, String) {
        let leader = self.leader().await;
        let follower = self
            .gateways
            .iter()
            .find(|g| g.name != leader)
            .map(|g| g.name.clone())
            .expect("two gateways");
        (leader, follower)
    }

    /// Runs an operator command against etcd (never through a relay); it must succeed.
    pub async fn operator(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--etcd",
            &self.etcd.url,
            "--cluster",
            CLUSTER,
            "--reason",
            "history scenario",
            "--by",
            "history",
        ]);
        let out = shardgate(&all).await;
        assert_eq!(out.code, 0, "shardgate {args:?}: {out:?}");
        println!("[{}] shardgate {}", self.name, args.join(" "));
        out
    }

    fn record_ids(&self) -> BTreeSet<String> {
        self.watcher
            .observed
            .lock()
            .unwrap()
            .phases
            .keys()
            .cloned()
            .collect()
    }

    /// Runs an operator command that writes a fenced record and waits until that record is
    /// `applied` or `rolled_back`; the phase it ended in, and the revision of that commit.
    pub async fn fenced(&self, args: &[&str]) -> (String, u64) {
        let before = self.record_ids();
        self.operator(args).await;
        let what = format!("the record of `{}` to finish", args.join(" "));
        crate::etcd_support::within(CHANGE_DEADLINE, &what, async {
            loop {
                {
                    let o = self.watcher.observed.lock().unwrap();
                    let done = o.events.iter().find(|e| {
                        !before.contains(&e.record)
                            && matches!(e.phase, Phase::Applied | Phase::RolledBack)
                    });
                    if let Some(e) = done {
                        return (o.phases[&e.record].clone(), e.revision);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// The revision of the newest ownership change the test's watch has seen (a move record
    /// or an IDC override: keys that shape the snapshot, unlike registrations).
    pub fn last_change(&self) -> u64 {
        let o = self.watcher.observed.lock().unwrap();
        o.events.iter().map(|e| e.revision).max().unwrap_or(0)
    }

    /// Runs an operator command that changes ownership (`failover`, `restore`) and waits until
    /// the test's watch sees the change; its revision.
    pub async fn change(&self, args: &[&str]) -> u64 {
        let before = self.last_change();
        self.operator(args).await;
        let what = format!("the change of `{}` to be seen", args.join(" "));
        within(CHANGE_DEADLINE, &what, async {
            loop {
                let now = self.last_change();
                if now > before {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Waits until every gateway named serves `revision` or later.
    pub async fn all_serve(&self, names: &[&str], revision: u64) {
        for n in names {
            self.gateway(n).serves(revision).await;
        }
    }

    /// Waits until every gateway sees `idc` serving `want(served, home)`: the end of a change
    /// of owner however many steps and fences it takes.
    async fn all_see(&self, idc: &str, what: &str, want: impl Fn(u64, u64, &str) -> bool) {
        for g in &self.gateways {
            let what = format!("{} to see {idc} {what}", g.name);
            within(CHANGE_DEADLINE, &what, async {
                while !g
                    .shards_of(idc)
                    .await
                    .is_some_and(|(served, home, state)| want(served, home, &state))
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }

    /// Waits until every gateway sees `idc` serve no shard.
    pub async fn all_see_none_at(&self, idc: &str) {
        self.all_see(idc, "serve no shard", |served, _, _| served == 0)
            .await;
    }

    /// Waits until every gateway sees `idc` active again, serving all its home shards.
    pub async fn all_see_home_at(&self, idc: &str) {
        self.all_see(
            idc,
            "active, serving its home shards",
            |served, home, state| home > 0 && served == home && state == "active",
        )
        .await;
    }

    /// Stops the load, checks the history, prints the report and returns it.
    pub async fn finish(self) -> Report {
        let outcomes = self.load.stop().await;
        let history = History {
            entries: self.ledger.entries(),
            events: self.watcher.observed.lock().unwrap().events.clone(),
            outcomes,
            dropped: self.ledger.dropped(),
        };
        let report = history::check(&history);
        if let Some(shard) = std::env::var("HISTORY_DUMP_SHARD")
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        {
            for o in history
                .outcomes
                .iter()
                .filter(|o| o.shard == shard && o.write)
            {
                println!(
                    "  outcome [{:.4} s, {:.4} s] status {} {:?}",
                    o.start_ns as f64 / 1e9,
                    o.end_ns as f64 / 1e9,
                    o.status,
                    o.reason
                );
            }
            for e in history.entries.iter().filter(|e| e.shard == shard) {
                println!(
                    "  ledger {} {} at {} [{:.4} s, {:.4} s] epoch {:?} id {}",
                    e.method,
                    e.shard,
                    e.idc,
                    e.start_ns as f64 / 1e9,
                    e.end_ns as f64 / 1e9,
                    e.epoch,
                    e.request_id
                );
            }
        }
        println!("=== scenario {} ===\n{report}", self.name);
        for e in &history.events {
            println!(
                "  event {:.3} s {} {} {:?} rev {} shards {:?} {:?} → {:?}",
                e.at_ns as f64 / 1e9,
                e.kind,
                e.record,
                e.phase,
                e.revision,
                e.shards,
                e.from,
                e.to
            );
        }
        if !report.violations.is_empty() {
            for g in &self.gateways {
                let log = g.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                println!("--- {} log (last lines, newest first) ---", g.name);
                for l in tail {
                    println!("  {l}");
                }
            }
        }
        drop(self.sims);
        report
    }
}
