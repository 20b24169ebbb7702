//! Operator overrides: IDC states and degrade switches that sit on top of the document.
//! The effective snapshot is always `document + overrides`, rebuilt whole on any change.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The state of an IDC (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdcState {
    #[default]
    Active,
    /// Planned: shards leave behind a write fence.
    Draining,
    /// Emergency: shards leave at once.
    Down,
    /// Coming back: home shards return in steps.
    Warming,
}

impl IdcState {
    pub const ALL: [IdcState; 4] = [
        IdcState::Active,
        IdcState::Draining,
        IdcState::Down,
        IdcState::Warming,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdcState::Active => "active",
            IdcState::Draining => "draining",
            IdcState::Down => "down",
            IdcState::Warming => "warming",
        }
    }
}

impl fmt::Display for IdcState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `override/idc/<idc>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdcOverride {
    pub state: IdcState,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub by: String,
    /// Unix seconds when it was written.
    #[serde(default)]
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Unix milliseconds when it was written, for people reading it (nothing is timed from a
    /// wall clock: warm-up steps are paced by the driver's monotonic clock).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub at_ms: u64,
    /// `warming` only: the warm-up duration for this restore (`restore --warmup`); the
    /// document's `failover.warmup_s` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_s: Option<u64>,
    /// `warming` only: how many of the warm-up's steps have come home (0 when absent). Moved on
    /// by the driver (the etcd leader, or the file-mode gateway) one fenced step at a time, never
    /// by a gateway's clock, so every gateway switches a shard at the same revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_step: Option<u32>,
}

/// Steps of a warm-up: at least five (DESIGN.md §5), here ten.
pub const WARMUP_STEPS: u32 = 10;

impl IdcOverride {
    /// The warm-up steps that have come home.
    pub fn steps_done(&self) -> u32 {
        self.warmup_step.unwrap_or(0)
    }

    /// How many steps this warm-up has: one for `restore --warmup 0`, else `WARMUP_STEPS`.
    pub fn warmup_steps(&self) -> u32 {
        if self.warmup_s == Some(0) {
            1
        } else {
            WARMUP_STEPS
        }
    }

    /// Every step has come home.
    pub fn warmed_up(&self) -> bool {
        self.steps_done() >= self.warmup_steps()
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// `override/degrade/<set or route:name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DegradeOverride {
    pub on: bool,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub at: u64,
}

/// What a move record moves: a shard range to an IDC, or every shard an IDC serves (drain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveKind {
    /// `shardgate move RANGE --to IDC`: the range's owner becomes `to`.
    Move,
    /// `shardgate drain IDC`: the IDC's shards leave for the next IDC in their failover order.
    Drain,
    /// `shardgate failover IDC`, or the automatic decision: the IDC is `down` and its shards
    /// are served elsewhere at once for reads, while their writes stay fenced until every live
    /// gateway stopped writing to the departed IDC. Applying it lifts the fence; the owner was
    /// changed by the `down` override itself.
    Failover,
    /// One step of a warm-up: the step's home shards come back to the warming IDC (`to`) once
    /// fenced; applying it moves the override's `warmup_step` on in the same transaction.
    Warmup,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Move => "move",
            MoveKind::Drain => "drain",
            MoveKind::Failover => "failover",
            MoveKind::Warmup => "warmup",
        }
    }
}

/// Where a fenced move is (DESIGN.md §5). A record always ends `applied` or `rolled_back`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MovePhase {
    /// Phase 1: the moving shards are fenced (writes get 503 `fenced`), reads keep flowing to
    /// the old owner.
    Fencing,
    /// Phase 2 done: the new owner is published and the fence lifted.
    Applied,
    /// Abandoned before phase 2: the fence is lifted and the owner did not change.
    RolledBack,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Fencing => "fencing",
            MovePhase::Applied => "applied",
            MovePhase::RolledBack => "rolled_back",
        }
    }

    /// Still in flight: its shards are fenced and no other move may touch them.
    pub fn is_open(self) -> bool {
        self == MovePhase::Fencing
    }
}

/// `move/<id>`: a planned, fenced move of shards (a `move` of a range or a `drain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveRecord {
    pub kind: MoveKind,
    /// Inclusive shard ranges (`"0-63"`, `"7"`); for a drain, the shards the IDC served when
    /// the drain started.
    #[serde(default)]
    pub ranges: Vec<String>,
    /// The IDC the shards leave (for a drain: the drained IDC).
    #[serde(default)]
    pub from: Option<String>,
    /// The new owner (moves only; a drain sends each shard to its failover order).
    #[serde(default)]
    pub to: Option<String>,
    pub phase: MovePhase,
    /// The revision at which the fence was written; every live gateway must have applied it
    /// before phase 2. In etcd it is the record's `mod_revision` when the phase is `fencing`
    /// (filled in by the reader, not stored); in file mode the snapshot revision.
    #[serde(default)]
    pub fence_revision: u64,
    /// Unix milliseconds when the fence was written, for `status` (its age) and to order
    /// records; phase 2 is timed on the driver's monotonic clock, from the last acknowledgement.
    #[serde(default)]
    pub fenced_at_ms: u64,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub by: String,
    /// Unix seconds when it was created.
    #[serde(default)]
    pub at: u64,
    /// Unix seconds when it reached `applied` or `rolled_back`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// Why it was rolled back, or anything else the driver wants the operator to see.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// `warmup` records: the warm-up step this record brings home (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    #[serde(default)]
    pub idcs: BTreeMap<String, IdcOverride>,
    #[serde(default)]
    pub degrade: BTreeMap<String, DegradeOverride>,
    /// Move records by id (`move/<id>`), applied in the order of their `fence_revision`.
    #[serde(default)]
    pub moves: BTreeMap<String, MoveRecord>,
    /// etcd only: the mod revision of every key these overrides and the document were read
    /// from, by name relative to the cluster prefix (`topology`, `override/idc/sh`,
    /// `move/m1`). Owner epochs are computed from them (`topology::epochs`). Kept with the
    /// overrides so the snapshot cache carries them, and never written to etcd (records are
    /// written one by one, never this struct whole).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub revisions: BTreeMap<String, u64>,
}

impl Overrides {
    /// These overrides on top of another document than the one they were read with (etcd: the
    /// last good one, while the document in etcd is invalid): the document's revision becomes
    /// that document's, so owner epochs count the document in effect.
    pub fn on_document_of(&self, document: &Overrides) -> Overrides {
        let mut o = self.clone();
        match document.revisions.get("topology") {
            Some(&r) => o.revisions.insert("topology".to_owned(), r),
            None => o.revisions.remove("topology"),
        };
        o
    }

    /// The IDC's override as every gateway serves it. `expires_at` is not looked at here: a
    /// gateway's own clock never changes an owner. The driver (`failover::decide`) replaces an
    /// expired override, through the same fenced steps as any other change.
    pub fn idc_state(&self, idc: &str) -> Option<&IdcOverride> {
        self.idcs.get(idc)
    }

    /// Whether the IDC's override has expired at `now` (unix seconds).
    pub fn expired(&self, idc: &str, now: u64) -> bool {
        self.idcs
            .get(idc)
            .and_then(|o| o.expires_at)
            .is_some_and(|exp| exp <= now)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
