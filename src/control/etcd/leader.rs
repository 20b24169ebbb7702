//! The cluster's failover leader (DESIGN.md §5, §6). Every gateway campaigns through etcd's
//! election API on `leader`; the one elected marks IDCs `down`/`warming` from the MAJORITY
//! of live gateways' registered views (`failover::decide`), and drives fenced moves from
//! `fencing` to `applied` or `rolled_back`. Every write is a compare-and-swap on the key's
//! mod revision that also checks the leader's own election key, so neither a concurrent
//! operator write nor a deposed leader is ever overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, GetOptions, LeaderKey, LeaseKeepAliveStream, LeaseKeeper, ResignOptions,
    Txn, TxnOp,
};
use tokio::sync::watch;

use super::{Backoff, ClusterKeys, Etcd, EtcdError, Keys, Stored};
use crate::control::failover::{decide, majority, Change, Decision, Policy, Tracker};
use crate::control::moves::pace::{FenceClocks, WarmupPacer};
use crate::control::moves::{self, next_step, HealthView, Operator, Step};
use crate::control::source::Snapshots;
use crate::control::tasks::shutdown_requested;
use crate::control::topology::overrides::{MovePhase, MoveRecord};
use crate::control::topology::{Overrides, Topology};
use crate::util::unix_now_ms;

/// TTL of the leader's lease: a leader that dies without resigning is replaced once it
/// expires. Short, but long enough that a few lost keep-alives do not depose a live leader.
pub const LEASE_TTL_S: i64 = 5;

const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);

/// How often the leader reads the views and moves: a decision lands within a tick of its
/// `detect_ms` deadline, and the read is small (the document is not part of it).
const TICK: Duration = Duration::from_millis(100);

/// What the leader campaigns as.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    pub access: crate::control::etcd::EtcdAccess,
    pub cluster: String,
    /// This gateway's instance name: the election's value and `by` of its decisions.
    pub instance: String,
    /// Deadline of every etcd call.
    pub timeout: Duration,
}

/// Why a session ended.
enum Ended {
    Shutdown,
    Lost(EtcdError),
}

pub struct Leader {
    settings: LeaderSettings,
    keys: Keys,
    snapshots: Arc<Snapshots>,
    /// Majority verdicts over time; fresh for every term, so a new leader judges only what it
    /// has seen itself.
    tracker: Tracker,
    /// The last unusable-overrides problem, logged once.
    problem: Option<String>,
    /// When this term began: until the lease TTL plus the fence hold has passed, a gateway
    /// that vanished just before the election may still be writing, unseen.
    term_started: Instant,
    /// The gateways registered at the last round, and when each one that vanished since was
    /// first seen gone (its writes may still be in flight until TTL + hold later).
    registered: BTreeSet<String>,
    departed: BTreeMap<String, Instant>,
    /// How long each open record has been fencing and acknowledged, on this leader's clock.
    clocks: FenceClocks,
    pacer: WarmupPacer,
}

impl Leader {
    pub fn new(settings: LeaderSettings, snapshots: Arc<Snapshots>) -> Leader {
        Leader {
            keys: Keys::new(&settings.cluster),
            settings,
            snapshots,
            tracker: Tracker::new(),
            problem: None,
            term_started: Instant::now(),
            registered: BTreeSet::new(),
            departed: BTreeMap::new(),
            clocks: FenceClocks::new(),
            pacer: WarmupPacer::new(),
        }
    }

    /// Campaigns, leads when elected, and campaigns again after losing etcd, until
    /// `shutdown` turns true (then resigns).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new();
        loop {
            match self.session(&mut shutdown, &mut backoff).await {
                Ended::Shutdown => return,
                Ended::Lost(e) => {
                    tracing::warn!(instance = %self.settings.instance, error = %e, "failover election interrupted; campaigning again")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown_requested(&mut shutdown) => return,
            }
        }
    }

    /// One lease: campaign, lead, and on the way out resign and revoke (best effort, so a
    /// successor does not wait for the TTL).
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Ended {
        let s = &self.settings;
        let etcd = match Etcd::connect(&s.access, s.timeout).await {
            Ok(e) => e,
            Err(e) => return Ended::Lost(e),
        };
        let mut client = etcd.client();
        let lease = match etcd
            .call("lease grant", client.lease_grant(LEASE_TTL_S, None))
            .await
        {
            Ok(l) => l.id(),
            Err(e) => return Ended::Lost(e),
        };
        let (mut keeper, mut responses) = match etcd
            .call("lease keep-alive", client.lease_keep_alive(lease))
            .await
        {
            Ok(k) => k,
            Err(e) => {
                revoke(&etcd, lease).await;
                return Ended::Lost(e);
            }
        };
        let mut leader_key = None;
        let ended = self
            .campaign_and_lead(
                &etcd,
                lease,
                &mut keeper,
                &mut responses,
                &mut leader_key,
                shutdown,
                backoff,
            )
            .await;
        if let Some(key) = leader_key {
            let mut election = etcd.client().election_client();
            let resign = election.resign(Some(ResignOptions::new().with_leader(key)));
            match etcd.call("resign", resign).await {
                Ok(_) => {
                    tracing::info!(instance = %self.settings.instance, "resigned as failover leader")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not resign; the lease revoke ends the term")
                }
            }
        }
        revoke(&etcd, lease).await;
        ended
    }

    #[allow(clippy::too_many_arguments)] // one session's pieces, borrowed for its length
    async fn campaign_and_lead(
        &mut self,
        etcd: &Etcd,
        lease: i64,
        keeper: &mut LeaseKeeper,
        responses: &mut LeaseKeepAliveStream,
        leader_key: &mut Option<LeaderKey>,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Ended {
        let name = self.keys.leader();
        let instance = self.settings.instance.clone();
        let mut keep = tokio::time::interval(KEEP_ALIVE_EVERY);
        keep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A campaign waits in etcd until this candidate's key is the oldest. Each attempt
        // has the call deadline; an attempt that runs out is simply made again (same lease,
        // same key), while the lease is kept alive in between.
        let key = loop {
            let mut election = etcd.client().election_client();
            let campaign = etcd.call(
                "campaign",
                election.campaign(name.clone(), instance.clone(), lease),
            );
            tokio::pin!(campaign);
            let answer = loop {
                tokio::select! {
                    r = &mut campaign => break r,
                    _ = keep.tick() => {
                        if let Err(e) = keep_alive(etcd, keeper, responses).await {
                            return Ended::Lost(e);
                        }
                    }
                    _ = shutdown_requested(shutdown) => return Ended::Shutdown,
                }
            };
            match answer {
                Ok(mut resp) => match resp.take_leader() {
                    Some(k) => break k,
                    None => {
                        return Ended::Lost(EtcdError("campaign answered without a key".into()))
                    }
                },
                Err(e) => {
                    tracing::debug!(error = %e, "campaign attempt ended; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown_requested(shutdown) => return Ended::Shutdown,
                    }
                }
            }
        };
        *leader_key = Some(key.clone());
        backoff.reset();
        // A new term knows nothing of the last one: no history of verdicts, of vanished
        // gateways, or of how long a fence has been held.
        self.tracker = Tracker::new();
        self.term_started = Instant::now();
        self.registered.clear();
        self.departed.clear();
        self.clocks = FenceClocks::new();
        self.pacer = WarmupPacer::new();
        tracing::info!(instance = %instance, key = %String::from_utf8_lossy(key.key()), "elected failover leader");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => match self.round(etcd, &key).await {
                    Ok(()) => failing = None,
                    Err(Round::NotLeader) => {
                        return Ended::Lost(EtcdError("this gateway's election key is gone: no longer the leader".into()))
                    }
                    Err(Round::Etcd(e)) => {
                        if failing.as_deref() != Some(e.0.as_str()) {
                            tracing::warn!(error = %e, "failover leader cannot read the cluster; retrying");
                        }
                        failing = Some(e.0);
                    }
                },
                _ = keep.tick() => {
                    if let Err(e) = keep_alive(etcd, keeper, responses).await {
                        return Ended::Lost(e);
                    }
                }
                _ = shutdown_requested(shutdown) => return Ended::Shutdown,
            }
        }
    }

    /// Reads what decisions need: registrations, the election, moves and overrides, at one
    /// revision (the range `gateway/` … `override/…`, without the document).
    async fn read(&self, etcd: &Etcd) -> Result<ClusterKeys, EtcdError> {
        let prefix = self.keys.prefix();
        let mut client = etcd.client();
        let resp = etcd
            .call(
                "read the cluster",
                client.get(
                    format!("{prefix}gateway/"),
                    Some(GetOptions::new().with_range(format!("{prefix}topology"))),
                ),
            )
            .await?;
        let mut listed = ClusterKeys {
            revision: resp.header().map_or(0, |h| h.revision()),
            ..ClusterKeys::default()
        };
        for kv in resp.kvs() {
            if let Some(name) = self.keys.relative(kv.key()) {
                listed.keys.insert(
                    name.to_owned(),
                    Stored {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
        Ok(listed)
    }

    /// One round of the leader's work.
    async fn round(&mut self, etcd: &Etcd, key: &LeaderKey) -> Result<(), Round> {
        let listed = self.read(etcd).await.map_err(Round::Etcd)?;
        let ours = self
            .keys
            .relative(key.key())
            .and_then(|k| listed.keys.get(k))
            .is_some_and(|s| s.mod_revision == key.rev());
        if !ours {
            return Err(Round::NotLeader);
        }
        let Some(topo) = self.snapshots.current() else {
            return Ok(());
        };
        let overrides = match listed.overrides(&self.keys) {
            Ok(o) => {
                self.problem = None;
                o
            }
            Err(p) => {
                let p = p.to_string();
                if self.problem.as_ref() != Some(&p) {
                    tracing::error!(problems = %p, "unreadable overrides: no automatic decision until they are fixed");
                }
                self.problem = Some(p);
                return Ok(());
            }
        };
        let registered = listed.gateways();
        let live = registered.len();
        let records: Vec<_> = registered
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .collect();
        let now = unix_now_ms();
        let clock = Instant::now();
        let hold = topo.failover.fence;
        let unseen_writer = self.note_registrations(&registered, clock, hold);
        let names: Vec<&str> = topo.idcs.iter().map(|i| i.name.as_str()).collect();
        self.tracker.retain(&names);
        for idc in &names {
            let verdict = majority(idc, records.iter().map(|r| &r.view), live);
            self.tracker.observe(idc, verdict, now);
        }
        let policy = Policy::of(&topo.failover);
        let decisions = decide(
            names.iter().copied(),
            &overrides,
            &self.tracker,
            &policy,
            &self.settings.instance,
            now,
        );
        for d in &decisions {
            self.write_decision(etcd, key, &listed, &topo, d, now).await;
        }
        if !decisions.is_empty() {
            // The records below were read before these writes: decide on them next round.
            return Ok(());
        }
        let all_acked = |fence_revision: u64| {
            live > 0
                && records.len() == live
                && records.iter().all(|r| r.applied_revision >= fence_revision)
        };
        let open: Vec<&str> = overrides
            .moves
            .iter()
            .filter(|(_, r)| r.phase == MovePhase::Fencing)
            .map(|(id, _)| id.as_str())
            .collect();
        self.clocks.retain(&open);
        for (id, record) in &overrides.moves {
            if record.phase != MovePhase::Fencing {
                continue;
            }
            let can_serve = self.target_can_serve(record, &topo);
            let facts = self.clocks.facts(
                id,
                all_acked(record.fence_revision),
                clock,
                unseen_writer,
                can_serve,
            );
            let step = next_step(record, &facts, hold);
            self.drive(etcd, key, &listed, &overrides, id, step).await;
        }
        // Warm-up steps are paced from the snapshot this leader serves, and only while it
        // holds the overrides just read (a lagging snapshot would plan a step twice).
        if topo.overrides.idcs == overrides.idcs {
            let op = Operator {
                reason: "warm-up".to_owned(),
                by: self.settings.instance.clone(),
                now_ms: now,
            };
            for (id, record) in self.pacer.due(&topo, clock, &op) {
                self.start_step(etcd, key, &listed, &id, &record).await;
            }
        }
        Ok(())
    }

    /// Keeps track of registrations that vanished (lease expired or revoked): until the lease
    /// TTL plus `hold` has passed since, that gateway may still have writes in flight to an
    /// owner this leader is about to replace. Returns whether any gateway may be writing
    /// unseen now (one vanished recently, or this term is younger than that).
    fn note_registrations(
        &mut self,
        registered: &[(String, Result<crate::control::etcd::GatewayRecord, String>)],
        now: Instant,
        hold: Duration,
    ) -> bool {
        let grace = Duration::from_secs(super::registry::LEASE_TTL_S as u64) + hold;
        let names: BTreeSet<String> = registered.iter().map(|(n, _)| n.clone()).collect();
        for gone in self.registered.difference(&names) {
            tracing::info!(instance = %gone, "gateway registration gone; owner changes wait for its lease TTL and the fence hold");
            self.departed.insert(gone.clone(), now);
        }
        self.departed
            .retain(|name, at| !names.contains(name) && now.saturating_duration_since(*at) < grace);
        self.registered = names;
        now.saturating_duration_since(self.term_started) < grace || !self.departed.is_empty()
    }

    /// Whether the shards of `record` have somewhere to go (`moves::target_can_serve`), judged
    /// by the majority verdicts: an IDC counts as healthy unless a majority sees it unhealthy.
    fn target_can_serve(&self, record: &MoveRecord, topo: &Topology) -> bool {
        let view: HealthView = topo
            .idcs
            .iter()
            .map(|i| {
                let name = i.name.to_string();
                let healthy = self.tracker.verdict(&name) != Some(false);
                (name, healthy)
            })
            .collect();
        moves::target_can_serve(topo, record, &view)
    }

    /// The transaction guard every leader write carries: still the leader.
    fn still_leader(key: &LeaderKey) -> Compare {
        Compare::create_revision(key.key().to_vec(), CompareOp::Equal, key.rev())
    }

    /// `Compare` that the key is as read (absent keys compare as revision 0).
    fn unchanged(&self, listed: &ClusterKeys, relative: &str) -> Compare {
        let rev = listed.keys.get(relative).map_or(0, |s| s.mod_revision);
        Compare::mod_revision(
            format!("{}{relative}", self.keys.prefix()),
            CompareOp::Equal,
            rev,
        )
    }

    /// Writes one automatic decision: a `down` with the `failover` record that fences its
    /// shards' writes, in one transaction; a finished warm-up as an `active` override. Guarded
    /// by the leader's key and by every IDC override being as read (the decision counted the
    /// IDCs that can still serve from them).
    async fn write_decision(
        &self,
        etcd: &Etcd,
        key: &LeaderKey,
        listed: &ClusterKeys,
        topo: &Topology,
        d: &Decision,
        now_ms: u64,
    ) {
        let by = &self.settings.instance;
        let (value, record) = (d.value(by, now_ms), d.fence(topo, by, now_ms));
        let mut ops = Vec::new();
        match serde_json::to_vec(&value) {
            Ok(v) => ops.push(TxnOp::put(self.keys.idc_override(&d.idc), v, None)),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an IDC override");
                return;
            }
        }
        if let Some((id, r)) = &record {
            match serde_json::to_vec(r) {
                Ok(v) => ops.push(TxnOp::put(self.keys.move_record(id), v, None)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a move record");
                    return;
                }
            }
        }
        let txn = Txn::new()
            .when([
                Self::still_leader(key),
                self.unchanged(listed, &format!("override/idc/{}", d.idc)),
                listed.unchanged_under(&self.keys, "override/idc/"),
            ])
            .and_then(ops);
        let mut client = etcd.client();
        match etcd.call("write an IDC decision", client.txn(txn)).await {
            Ok(r) if r.succeeded() => match &d.change {
                Change::Set(o) => {
                    tracing::warn!(idc = %d.idc, state = %o.state, reason = %o.reason, why = %d.why, fence = ?record.as_ref().map(|(id, _)| id), "automatic IDC decision (cluster-wide)")
                }
                Change::Clear => tracing::info!(idc = %d.idc, why = %d.why, "IDC active again"),
            },
            Ok(_) => {
                tracing::debug!(idc = %d.idc, "overrides changed since they were read; deciding again")
            }
            Err(e) => tracing::warn!(idc = %d.idc, error = %e, "cannot write an IDC decision"),
        }
    }

    /// No gateway registered anew since `listed` was read: a phase 2 decided on the
    /// acknowledgements read there must not overtake a gateway that has not acknowledged.
    fn no_new_gateway(&self, listed: &ClusterKeys) -> Compare {
        Compare::create_revision(
            format!("{}gateway/", self.keys.prefix()),
            CompareOp::Less,
            listed.revision + 1,
        )
        .with_prefix()
    }

    /// Fences the next step of a warm-up: the step's record in phase `fencing`, if the warming
    /// IDC's override and the move records are as read.
    async fn start_step(
        &self,
        etcd: &Etcd,
        key: &LeaderKey,
        listed: &ClusterKeys,
        id: &str,
        record: &MoveRecord,
    ) {
        let Some(to) = record.to.as_deref() else {
            return;
        };
        let value = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a move record");
                return;
            }
        };
        let txn = Txn::new()
            .when([
                Self::still_leader(key),
                self.unchanged(listed, &format!("override/idc/{to}")),
                listed.unchanged_under(&self.keys, "move/"),
            ])
            .and_then([TxnOp::put(self.keys.move_record(id), value, None)]);
        let mut client = etcd.client();
        match etcd.call("fence a warm-up step", client.txn(txn)).await {
            Ok(r) if r.succeeded() => {
                tracing::info!(id, idc = to, step = ?record.step, "warm-up step fenced")
            }
            Ok(_) => tracing::debug!(id, "warm-up changed since it was read"),
            Err(e) => tracing::warn!(id, error = %e, "cannot fence a warm-up step"),
        }
    }

    /// Moves a `fencing` record on: phase 2, or a rollback (a drain's rollback also removes
    /// its `draining` override, in the same transaction).
    #[allow(clippy::too_many_arguments)] // the round's pieces
    async fn drive(
        &self,
        etcd: &Etcd,
        key: &LeaderKey,
        listed: &ClusterKeys,
        overrides: &Overrides,
        id: &str,
        step: Step,
    ) {
        // The same ending as in file mode (`moves::finish`): the record's new phase, and for a
        // drain rolled back, its `draining` override gone — written here in one transaction.
        let mut after = overrides.clone();
        if !moves::finish(&mut after, id, &step, unix_now_ms() / 1000) {
            return;
        }
        let Some(next) = after.moves.get(id) else {
            return;
        };
        let mut ops = Vec::new();
        let mut guards = vec![
            Self::still_leader(key),
            self.unchanged(listed, &format!("move/{id}")),
        ];
        if step == Step::Apply {
            guards.push(self.no_new_gateway(listed));
        }
        // The IDC overrides the ending changes with it (a drain rolled back is active again; a
        // warm-up step moves the warming IDC's step on): written in the same transaction.
        for (idc, o) in &after.idcs {
            if overrides.idcs.get(idc) == Some(o) {
                continue;
            }
            match serde_json::to_vec(o) {
                Ok(v) => {
                    guards.push(self.unchanged(listed, &format!("override/idc/{idc}")));
                    ops.push(TxnOp::put(self.keys.idc_override(idc), v, None));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an IDC override");
                    return;
                }
            }
        }
        // The fence revision stays in the record: applied moves are ordered by it.
        let value = match serde_json::to_vec(next) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a move record");
                return;
            }
        };
        ops.push(TxnOp::put(self.keys.move_record(id), value, None));
        let txn = Txn::new().when(guards).and_then(ops);
        let mut client = etcd.client();
        match etcd.call("drive a move", client.txn(txn)).await {
            Ok(r) if r.succeeded() => {
                tracing::info!(id, phase = next.phase.as_str(), note = %next.note, "move record driven")
            }
            Ok(_) => tracing::debug!(id, "move record changed since it was read"),
            Err(e) => tracing::warn!(id, error = %e, "cannot drive a move record"),
        }
    }
}

/// Why a round did not complete.
enum Round {
    NotLeader,
    Etcd(EtcdError),
}

async fn keep_alive(
    etcd: &Etcd,
    keeper: &mut LeaseKeeper,
    responses: &mut LeaseKeepAliveStream,
) -> Result<(), EtcdError> {
    let renewed = etcd
        .call("lease keep-alive", async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await?;
    match renewed {
        Some(r) if r.ttl() > 0 => Ok(()),
        _ => Err(EtcdError("the leader lease expired".into())),
    }
}

async fn revoke(etcd: &Etcd, lease: i64) {
    let mut client = etcd.client();
    if let Err(e) = etcd.call("lease revoke", client.lease_revoke(lease)).await {
        tracing::debug!(error = %e, "could not revoke the leader lease; it expires on its own");
    }
}
