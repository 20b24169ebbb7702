//! The topology snapshot: the validated document plus operator overrides, with everything a
//! request needs precomputed (route matcher, shard → home/serving IDC tables, backend pools).
//! Snapshots are immutable; the source builds a new one and swaps it in whole.

mod bounds;
mod build;
mod diff;
pub mod epochs;
mod isolation;
pub mod moves;
pub mod overrides;
mod problems;
pub mod raw;
mod ring_shards;
mod shard_headers;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Uri};

pub use build::{build, build_with_previous, parse_range, warmed, warmup_step_of, BuildContext};
pub use diff::{diff, TopologyDiff};
pub use isolation::{BreakerSpec, IsolationSpec, BREAKER_BUCKETS};
pub use moves::ShardSet;
pub use overrides::{DegradeOverride, IdcOverride, IdcState, Overrides};
pub use problems::{Problem, Problems};
pub use raw::RawTopology;

pub use crate::data::route::RouteId;
use crate::data::route::{extract_key, KeyError, KeySource, Match, RouteMatcher};
use crate::data::upstream::Backend;

/// Index of an IDC in `Topology::idcs`. Only meaningful within one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdcId(pub u16);

/// Index of a set in `Topology::sets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetId(pub u8);

/// A shard number, `crc32_ieee(key) % shard_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard(pub u32);

impl Shard {
    pub fn of_key(key: &[u8], shard_count: u32) -> Shard {
        Shard(crc32fast::hash(key) % shard_count)
    }
}

#[derive(Debug)]
pub struct SetSpec {
    pub name: Arc<String>,
    pub priority: u32,
    pub max_inflight: u32,
    pub degradable: bool,
    /// Shedding order among the distinct non-zero priorities, highest number first (0 = shed
    /// first); unused for priority 0, which is never shed.
    pub shed_rank: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug)]
pub struct Idc {
    pub name: Arc<String>,
    /// The name as a header value (`x-shardgate-idc`), made once per snapshot.
    pub header: http::HeaderValue,
    pub weight: u32,
    pub failover_to: Vec<IdcId>,
    pub health: HealthSpec,
    pub state: IdcState,
    /// Why it is in that state (operator reason, or empty when active by default).
    pub state_reason: String,
    /// Indexed by `SetId`; empty when the IDC has no pool for that set.
    pub pools: Vec<Arc<[Arc<Backend>]>>,
}

impl Idc {
    pub fn pool(&self, set: SetId) -> &[Arc<Backend>] {
        self.pools.get(set.0 as usize).map_or(&[], |p| p)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    Reject,
    Local,
}

#[derive(Debug, Clone)]
pub struct RateLimitSpec {
    pub rps: u32,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct Fallback {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
    pub content_type: http::HeaderValue,
    pub retry_after_s: Option<u32>,
}

#[derive(Debug)]
pub struct Route {
    pub name: Arc<String>,
    pub host: String,
    pub path_prefix: String,
    pub methods: Vec<Method>,
    pub set: SetId,
    pub sharded: bool,
    pub keys: Vec<KeySource>,
    pub on_missing_key: MissingKey,
    pub timeout: Duration,
    pub retries: u32,
    /// Request bodies past this many bytes get 413 (`None`: no limit).
    pub max_body_bytes: Option<u64>,
    pub rate_limit: Option<RateLimitSpec>,
    pub fallback: Option<Fallback>,
    /// WebSocket upgrades are proxied (`websocket = true`).
    pub websocket: bool,
    /// The degrade switch (`<set>` or `route:<name>`) that is on for this route, if any:
    /// resolved when the snapshot is built, since every override change rebuilds it.
    pub degraded_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FailoverSpec {
    pub detect: Duration,
    pub recover: Duration,
    pub auto_failback: bool,
    pub min_healthy: f64,
    pub warmup: Duration,
    pub fence: Duration,
}

/// One immutable, validated snapshot. Loaded once per request and passed down by reference.
#[derive(Debug)]
pub struct Topology {
    pub revision: u64,
    /// The revision as a header value (`x-shardgate-epoch`).
    pub epoch_header: http::HeaderValue,
    pub cluster: String,
    pub shard_count: u32,
    pub sets: Vec<SetSpec>,
    pub idcs: Vec<Idc>,
    pub routes: Vec<Route>,
    pub failover: FailoverSpec,
    /// Shedding threshold, retry budget and breaker knobs (`[isolation]`): a reload changes
    /// them without touching the admission state they act on.
    pub isolation: crate::control::topology::IsolationSpec,
    /// This build's identity, unique in the process: what per-snapshot caches (admission's
    /// resolved handles) are keyed by.
    pub build_id: u64,
    /// Sum of the sets' `max_inflight`: the instance load that shedding is measured against.
    pub inflight_capacity: u64,
    /// How many distinct non-zero set priorities there are (shedding tiers).
    pub shed_tiers: usize,
    pub local_idc: Option<IdcId>,
    /// The document this snapshot was built from, and the overrides on top of it.
    pub document: RawTopology,
    pub overrides: Overrides,
    matcher: RouteMatcher,
    /// shard → home IDC.
    home: Vec<IdcId>,
    /// shard → failover order (home first), `idcs.len()` entries per shard.
    order: Vec<IdcId>,
    /// shard → serving IDC now; `None` when no IDC in its order can serve.
    serving: Vec<Option<IdcId>>,
    /// Shards whose writes are fenced by a move in phase `fencing` (empty when none).
    fenced: ShardSet,
    /// shard → owner epoch (`x-shardgate-owner-epoch`), see `epochs`.
    owner_epochs: epochs::OwnerEpochs,
    /// shard → its number as a header value (`x-shardgate-shard`).
    shard_headers: shard_headers::ShardHeaders,
    /// What the shard tables took from the hash ring, for the next build to reuse.
    ring_shards: Arc<ring_shards::RingShards>,
    /// Where non-sharded routes (and `on_missing_key = "local"`) go.
    global: Option<IdcId>,
    /// Writes admitted under this snapshot whose exchange with the backend is not over yet.
    /// A gateway acknowledges a newer revision only once the older snapshots have none left
    /// (`Snapshots::acknowledged`), so a fence is never acknowledged while a write admitted
    /// before it is still on its way to the old owner.
    pub writes_in_flight: std::sync::atomic::AtomicU64,
}

/// Counts one write in flight under a snapshot until dropped (the exchange is over).
pub struct WriteInFlight(std::sync::Arc<Topology>);

impl WriteInFlight {
    pub fn new(topo: std::sync::Arc<Topology>) -> WriteInFlight {
        topo.writes_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        WriteInFlight(topo)
    }
}

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        self.0
            .writes_in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What the routing decision needs of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

/// The routing decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub route: RouteId,
    /// `None` for non-sharded routes and for `on_missing_key = "local"` without a key.
    pub shard: Option<Shard>,
    pub idc: IdcId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    NoRoute,
    MethodNotAllowed,
    MissingKey(RouteId),
    KeyTooLong(RouteId),
    NoServingIdc(RouteId, Option<Shard>),
}

impl Topology {
    /// The routing decision (DESIGN.md §3): match route → key → shard → serving IDC.
    /// One CRC, one modulo and one table read once the route is known.
    pub fn decide(&self, req: RequestView<'_>) -> Result<Decision, RouteError> {
        let host = || crate::data::route::request_host(req.uri, req.headers);
        let route_id = match self.matcher.find(host, req.uri.path(), req.method) {
            Match::Route(id) => id,
            Match::MethodNotAllowed => return Err(RouteError::MethodNotAllowed),
            Match::NotFound => return Err(RouteError::NoRoute),
        };
        let route = self.route(route_id);
        if !route.sharded {
            return self.global_decision(route_id);
        }
        match extract_key(&route.keys, req.headers, req.uri.path(), req.uri.query()) {
            Ok(key) => {
                let shard = Shard::of_key(&key, self.shard_count);
                match self.serving(shard) {
                    Some(idc) => Ok(Decision {
                        route: route_id,
                        shard: Some(shard),
                        idc,
                    }),
                    None => Err(RouteError::NoServingIdc(route_id, Some(shard))),
                }
            }
            Err(KeyError::TooLong) => Err(RouteError::KeyTooLong(route_id)),
            Err(KeyError::Missing) => match route.on_missing_key {
                MissingKey::Reject => Err(RouteError::MissingKey(route_id)),
                MissingKey::Local => self.global_decision(route_id),
            },
        }
    }

    fn global_decision(&self, route: RouteId) -> Result<Decision, RouteError> {
        match self.global {
            Some(idc) => Ok(Decision {
                route,
                shard: None,
                idc,
            }),
            None => Err(RouteError::NoServingIdc(route, None)),
        }
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0 as usize]
    }

    pub fn idc(&self, id: IdcId) -> &Idc {
        &self.idcs[id.0 as usize]
    }

    pub fn set(&self, id: SetId) -> &SetSpec {
        &self.sets[id.0 as usize]
    }

    pub fn route_by_name(&self, name: &str) -> Option<RouteId> {
        self.routes
            .iter()
            .position(|r| r.name.as_str() == name)
            .map(|i| RouteId(i as u32))
    }

    pub fn idc_by_name(&self, name: &str) -> Option<IdcId> {
        self.idcs
            .iter()
            .position(|i| i.name.as_str() == name)
            .map(|i| IdcId(i as u16))
    }

    pub fn home(&self, shard: Shard) -> IdcId {
        self.home[shard.0 as usize]
    }

    pub fn serving(&self, shard: Shard) -> Option<IdcId> {
        self.serving.get(shard.0 as usize).copied().flatten()
    }

    /// Whether non-idempotent requests for `shard` are refused now (a move is fencing it).
    #[inline]
    pub fn is_fenced(&self, shard: Shard) -> bool {
        self.fenced.contains(shard.0)
    }

    /// The revision of the last change of the shard's owner (`x-shardgate-owner-epoch`).
    #[inline]
    pub fn owner_epoch(&self, shard: Shard) -> u64 {
        self.owner_epochs.epoch(shard)
    }

    /// The shard's number as a header value (`x-shardgate-shard`), a slice of a table made
    /// once (no formatting per request).
    #[inline]
    pub fn shard_header(&self, shard: Shard) -> http::HeaderValue {
        self.shard_headers.get(shard.0)
    }

    /// `owner_epoch` as a header value, made once per snapshot.
    #[inline]
    pub fn owner_epoch_header(&self, shard: Shard) -> Option<&http::HeaderValue> {
        self.owner_epochs.header(shard)
    }

    /// The shards under a write fence now.
    pub fn fenced(&self) -> &ShardSet {
        &self.fenced
    }

    /// The shard's failover order, home first.
    pub fn failover_order(&self, shard: Shard) -> &[IdcId] {
        let n = self.idcs.len();
        let start = shard.0 as usize * n;
        &self.order[start..start + n]
    }

    /// Where non-sharded routes go now.
    pub fn global_idc(&self) -> Option<IdcId> {
        self.global
    }

    /// How many shards each IDC serves now (indexed by `IdcId`).
    pub fn shards_served(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.idcs.len()];
        for idc in self.serving.iter().flatten() {
            counts[idc.0 as usize] += 1;
        }
        counts
    }

    /// Why a shard is served where it is, in words for `explain`.
    pub fn serving_reason(&self, shard: Shard) -> String {
        let home = self.home(shard);
        let moved = moves::moved_by(&self.overrides, shard.0, self.shard_count);
        let placed = match moved {
            Some((id, _)) => format!("moved by move/{id}"),
            None if self.is_pinned(shard) => "pinned".to_owned(),
            None => "ring".to_owned(),
        };
        let fence = if self.is_fenced(shard) {
            "; writes are fenced while it moves"
        } else {
            ""
        };
        let why = match self.serving(shard) {
            Some(idc) if idc == home => {
                format!(
                    "home IDC {} ({placed}) is {}",
                    self.idc(home).name,
                    self.idc(home).state
                )
            }
            Some(idc) => format!(
                "home IDC {} ({placed}) is {}; next in failover order that can serve is {}",
                self.idc(home).name,
                self.idc(home).state,
                self.idc(idc).name
            ),
            None => format!(
                "home IDC {} ({placed}) is {} and no IDC in its failover order can serve",
                self.idc(home).name,
                self.idc(home).state
            ),
        };
        format!("{why}{fence}")
    }

    fn is_pinned(&self, shard: Shard) -> bool {
        self.document.shards.pins.iter().any(|p| {
            build::parse_range(&p.range, self.shard_count)
                .is_ok_and(|(a, b)| (a..=b).contains(&shard.0))
        })
    }
}

#[cfg(test)]
mod tests;
