//! Document + overrides → validated `Topology`. One pass collects every problem; a document
//! with any problem builds nothing, so an invalid document can never replace a valid one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use consistent_hash_ring::{Ring, RingBuilder};
use http::Method;

use super::moves::ShardSet;
use super::raw::{RawIdc, RawRoute, RawTopology};
use super::ring_shards::RingShards;
use super::{
    FailoverSpec, Fallback, HealthSpec, Idc, IdcId, IdcState, MissingKey, Overrides, Problem,
    Problems, RateLimitSpec, Route, RouteId, SetId, SetSpec, Shard, Topology,
};
use crate::data::route::{KeySource, RouteMatcher, RouteRule};
use crate::data::upstream::{Backend, Upstreams};

/// Largest shard table we build (memory: a few bytes per shard per IDC).
pub const MAX_SHARD_COUNT: u32 = 1 << 20;
const MAX_IDCS: usize = 64;
const MAX_WEIGHT: u32 = 10_000;

/// What a build needs besides the document and the overrides.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// The snapshot's revision (etcd revision, or the file source's reload counter).
    pub revision: u64,
    /// This instance's IDC (`--idc`), for non-sharded routes.
    pub local_idc: Option<String>,
    /// The running snapshot's shard count: changing it needs `allow_reshard`.
    pub running_shard_count: Option<u32>,
}

struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn fail(&mut self, at: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(Problem::new(at, reason));
    }

    fn name(&mut self, at: String, name: &str) {
        if name.is_empty() {
            self.fail(at, "must not be empty");
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            self.fail(
                at,
                format!("`{name}` may use only letters, digits, `-`, `_` and `.`"),
            );
        }
    }

    fn positive(&mut self, at: String, value: u64) {
        if value == 0 {
            self.fail(at, "must be greater than 0");
        }
    }
}

/// Parses a pin range `"A-B"` (inclusive) or `"A"`, within `0..shard_count`.
pub fn parse_range(text: &str, shard_count: u32) -> Result<(u32, u32), String> {
    let (a, b) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text.trim(), text.trim()),
    };
    let a: u32 = a
        .parse()
        .map_err(|_| format!("`{text}` is not a shard range like `0-255`"))?;
    let b: u32 = b
        .parse()
        .map_err(|_| format!("`{text}` is not a shard range like `0-255`"))?;
    if a > b {
        return Err(format!("`{text}`: the start is after the end"));
    }
    if b >= shard_count {
        return Err(format!(
            "`{text}` is outside 0..{shard_count} (shard_count = {shard_count})"
        ));
    }
    Ok((a, b))
}

/// Validates `doc` and builds the snapshot, or returns every problem found.
pub fn build(
    doc: RawTopology,
    overrides: &Overrides,
    ctx: &BuildContext,
    upstreams: &Upstreams,
) -> Result<Topology, Problems> {
    build_with_previous(doc, overrides, ctx, upstreams, None)
}

/// `build`, given the snapshot it replaces: in file mode owner epochs are carried from it
/// (`topology::epochs`).
pub fn build_with_previous(
    doc: RawTopology,
    overrides: &Overrides,
    ctx: &BuildContext,
    upstreams: &Upstreams,
    previous: Option<&Topology>,
) -> Result<Topology, Problems> {
    let mut c = Checker {
        problems: Vec::new(),
    };

    // Validate, section by section, every problem collected; nothing is built past a problem.
    check_cluster(&mut c, &doc, ctx);
    let sets = check_sets(&mut c, &doc);
    let idc_ids = check_idc_names(&mut c, &doc);
    let (mut routes, used_sets) = check_routes(&mut c, &doc, &sets.ids);
    let idcs = check_idcs(
        &mut c, &doc, &sets.ids, &idc_ids, &used_sets, overrides, upstreams,
    );
    let failover = check_failover(&mut c, &doc);
    let isolation = super::isolation::resolve(&doc.isolation, &mut c.problems);
    super::bounds::check(&doc, &mut c.problems);
    let shard_count = doc.shard_count.clamp(1, MAX_SHARD_COUNT);
    let pinned = check_pins(&mut c, &doc, &idc_ids, shard_count);
    let local_idc = check_local_idc(&mut c, ctx, &idc_ids);
    if !c.problems.is_empty() {
        return Err(Problems(c.problems));
    }

    // Build: the route matcher, the shard and serving tables, owner epochs, degrade switches.
    let matcher = route_matcher(&routes);
    let ring = idc_ring(&doc.idcs);
    let ring_shards = RingShards::for_build(
        &doc.idcs,
        &idc_ids,
        &ring,
        shard_count,
        previous.map(|p| &p.ring_shards),
    );
    let (mut home, mut order) =
        shard_tables(&doc.idcs, &idc_ids, &ring_shards, &pinned, shard_count);
    let moves = super::moves::apply(overrides, &idc_ids, shard_count, &mut home, &mut order);
    let warmup = warmup_steps(&idcs, overrides);
    let serving = serving_table(
        &idcs,
        &home,
        &order,
        shard_count,
        &warmup,
        &moves.drain_serves,
    );
    let owner_epochs = super::epochs::owner_epochs(&super::epochs::EpochInputs {
        idcs: &idcs,
        order: &order,
        serving: &serving,
        shard_count,
        overrides,
        revision: ctx.revision,
        previous,
    });
    let global = global_idc(&idcs, local_idc, &idc_ids, &ring);
    apply_degrade_switches(&mut routes, &sets.specs, overrides);
    let inflight_capacity = sets.specs.iter().map(|s| u64::from(s.max_inflight)).sum();

    Ok(Topology {
        revision: ctx.revision,
        inflight_capacity,
        shed_tiers: sets.shed_tiers,
        epoch_header: http::HeaderValue::from(ctx.revision),
        cluster: doc.cluster.clone(),
        shard_count,
        sets: sets.specs,
        idcs,
        routes,
        failover,
        isolation,
        build_id: next_build_id(),
        local_idc,
        document: doc,
        overrides: overrides.clone(),
        matcher,
        home,
        order,
        serving,
        fenced: moves.fenced,
        owner_epochs,
        shard_headers: super::shard_headers::ShardHeaders::for_count(
            shard_count,
            previous.map(|p| &p.shard_headers),
        ),
        ring_shards,
        global,
        writes_in_flight: std::sync::atomic::AtomicU64::new(0),
    })
}

/// The cluster's name and its shard count (bounded; changed only with `allow_reshard`).
fn check_cluster(c: &mut Checker, doc: &RawTopology, ctx: &BuildContext) {
    c.name("cluster".into(), &doc.cluster);
    if doc.shard_count == 0 || doc.shard_count > MAX_SHARD_COUNT {
        c.fail(
            "shard_count",
            format!("must be between 1 and {MAX_SHARD_COUNT}"),
        );
    }
    if let Some(running) = ctx.running_shard_count {
        if running != doc.shard_count && !doc.allow_reshard {
            c.fail(
                "shard_count",
                format!(
                    "changes from {running} to {}: this moves almost every key; set allow_reshard = true to do it on purpose",
                    doc.shard_count
                ),
            );
        }
    }
}

/// The sets, in document order, and their ids by name.
struct Sets<'d> {
    specs: Vec<SetSpec>,
    ids: HashMap<&'d str, SetId>,
    /// How many distinct positive priorities: the shedding tiers.
    shed_tiers: usize,
}

fn check_sets<'d>(c: &mut Checker, doc: &'d RawTopology) -> Sets<'d> {
    if doc.sets.is_empty() {
        c.fail("sets", "declare at least one set (e.g. [sets.core])");
    }
    if doc.sets.len() > u8::MAX as usize {
        c.fail("sets", "too many sets (at most 255)");
    }
    let mut specs = Vec::new();
    let mut ids: HashMap<&str, SetId> = HashMap::new();
    for (name, raw) in &doc.sets {
        c.name(format!("sets.{name}"), name);
        c.positive(format!("sets.{name}.max_inflight"), raw.max_inflight.into());
        ids.insert(name.as_str(), SetId(specs.len() as u8));
        specs.push(SetSpec {
            name: Arc::new(name.clone()),
            priority: raw.priority,
            max_inflight: raw.max_inflight,
            degradable: raw.degradable,
            shed_rank: 0,
        });
    }
    let mut priorities: Vec<u32> = specs
        .iter()
        .map(|s| s.priority)
        .filter(|&p| p > 0)
        .collect();
    priorities.sort_unstable_by(|a, b| b.cmp(a));
    priorities.dedup();
    for set in &mut specs {
        set.shed_rank = priorities
            .iter()
            .position(|&p| p == set.priority)
            .unwrap_or(0);
    }
    Sets {
        specs,
        ids,
        shed_tiers: priorities.len(),
    }
}

/// IDC names first, so references between IDCs resolve in any order; and their weights.
fn check_idc_names<'d>(c: &mut Checker, doc: &'d RawTopology) -> HashMap<&'d str, IdcId> {
    if doc.idcs.is_empty() {
        c.fail("idcs", "declare at least one IDC ([[idcs]])");
    }
    if doc.idcs.len() > MAX_IDCS {
        c.fail("idcs", format!("too many IDCs (at most {MAX_IDCS})"));
    }
    let mut idc_ids: HashMap<&str, IdcId> = HashMap::new();
    for (i, idc) in doc.idcs.iter().enumerate() {
        c.name(format!("idcs[{i}].name"), &idc.name);
        if idc_ids.insert(idc.name.as_str(), IdcId(i as u16)).is_some() && !idc.name.is_empty() {
            c.fail(
                format!("idcs[{i}].name"),
                format!("IDC `{}` is declared twice", idc.name),
            );
        }
    }
    for (i, idc) in doc.idcs.iter().enumerate() {
        // The weight is the IDC's number of points on the ring: bound it.
        if idc.weight > MAX_WEIGHT {
            c.fail(format!("idcs[{i}].weight"), format!("at most {MAX_WEIGHT}"));
        }
    }
    if !doc.idcs.is_empty() && doc.idcs.iter().all(|i| i.weight == 0) {
        c.fail(
            "idcs",
            "at least one IDC needs a weight above 0 to own shards",
        );
    }
    idc_ids
}

/// Routes (before IDCs: an IDC must have a pool for every set a route uses). Also returns the
/// sets the routes use, each with the first route using it.
fn check_routes(
    c: &mut Checker,
    doc: &RawTopology,
    set_ids: &HashMap<&str, SetId>,
) -> (Vec<Route>, BTreeMap<SetId, String>) {
    let mut routes = Vec::new();
    let mut used_sets: BTreeMap<SetId, String> = BTreeMap::new();
    let mut route_names = HashSet::new();
    // (host, prefix) → the routes there, with their methods: two that overlap are ambiguous.
    type Place = (String, String);
    let mut route_places: HashMap<Place, Vec<(usize, Vec<Method>)>> = HashMap::new();
    for (i, raw) in doc.routes.iter().enumerate() {
        if !raw.name.is_empty() && !route_names.insert(raw.name.clone()) {
            c.fail(
                format!("routes[{i}].name"),
                format!("route `{}` is declared twice", raw.name),
            );
        }
        if let Some(route) = check_route(c, i, raw, set_ids) {
            let place = (
                route.host.to_ascii_lowercase(),
                route.path_prefix.trim_end_matches('/').to_owned(),
            );
            let others = route_places.entry(place).or_default();
            for (j, methods) in others.iter() {
                let overlap = methods.is_empty()
                    || route.methods.is_empty()
                    || methods.iter().any(|m| route.methods.contains(m));
                if overlap {
                    c.fail(
                        format!("routes[{i}]"),
                        format!(
                            "same host, path_prefix and methods as routes[{j}] (`{}`): it could never match",
                            doc.routes[*j].name
                        ),
                    );
                }
            }
            others.push((i, route.methods.clone()));
            used_sets
                .entry(route.set)
                .or_insert_with(|| raw.name.clone());
            routes.push(route);
        }
    }
    (routes, used_sets)
}

/// Every IDC (`check_idc`); an override naming an IDC the document lacks is only logged.
fn check_idcs(
    c: &mut Checker,
    doc: &RawTopology,
    set_ids: &HashMap<&str, SetId>,
    idc_ids: &HashMap<&str, IdcId>,
    used_sets: &BTreeMap<SetId, String>,
    overrides: &Overrides,
    upstreams: &Upstreams,
) -> Vec<Idc> {
    let mut idcs = Vec::new();
    for (i, raw) in doc.idcs.iter().enumerate() {
        idcs.push(check_idc(
            c, i, raw, doc, set_ids, idc_ids, used_sets, overrides, upstreams,
        ));
    }
    for name in overrides.idcs.keys() {
        if !idc_ids.contains_key(name.as_str()) {
            tracing::warn!(idc = %name, "override names an IDC the document does not declare; ignored");
        }
    }
    idcs
}

/// Failover settings.
fn check_failover(c: &mut Checker, doc: &RawTopology) -> FailoverSpec {
    let f = &doc.failover;
    c.positive("failover.detect_ms".into(), f.detect_ms);
    c.positive("failover.recover_ms".into(), f.recover_ms);
    c.positive("failover.fence_ms".into(), f.fence_ms);
    // The fence is held fence_ms after every gateway acknowledged it, and a gateway cut off
    // from etcd stops writing before its lease can expire: in both cases a write already
    // sent may still be at the old owner for up to its route's timeout_ms. A shorter fence
    // would hand the shard over while such a write can still land.
    if let Some((name, longest)) = doc
        .routes
        .iter()
        .map(|r| (r.name.as_str(), r.timeout_ms))
        .max_by_key(|(_, t)| *t)
    {
        if f.fence_ms > 0 && f.fence_ms < longest {
            c.fail(
                "failover.fence_ms",
                format!(
                    "{} ms is shorter than route `{name}`'s timeout_ms ({longest} ms): a write sent before the fence could still land at the old owner after it (raise fence_ms to at least {longest})",
                    f.fence_ms
                ),
            );
        }
    }
    if !(0.0..=1.0).contains(&f.min_healthy) {
        c.fail("failover.min_healthy", "must be between 0.0 and 1.0");
    }
    FailoverSpec {
        detect: Duration::from_millis(f.detect_ms),
        recover: Duration::from_millis(f.recover_ms),
        auto_failback: f.auto_failback,
        min_healthy: f.min_healthy,
        warmup: Duration::from_secs(f.warmup_s),
        fence: Duration::from_millis(f.fence_ms),
    }
}

/// Pins: shard → the IDC it is pinned to. Ranges are checked against the table they fill:
/// with a `shard_count` out of bounds (a problem already) that is the clamped one, and a pin
/// past it one more problem. Past `MAX_PINS` (a problem too) the rest are not looked at.
fn check_pins(
    c: &mut Checker,
    doc: &RawTopology,
    idc_ids: &HashMap<&str, IdcId>,
    shard_count: u32,
) -> Vec<Option<IdcId>> {
    let mut pinned: Vec<Option<IdcId>> = vec![None; shard_count as usize];
    for (i, pin) in doc
        .shards
        .pins
        .iter()
        .enumerate()
        .take(super::bounds::MAX_PINS)
    {
        let idc = idc_ids.get(pin.idc.as_str()).copied();
        if idc.is_none() {
            c.fail(
                format!("shards.pins[{i}].idc"),
                format!("unknown IDC `{}`", pin.idc),
            );
        }
        match parse_range(&pin.range, shard_count) {
            Err(e) => c.fail(format!("shards.pins[{i}].range"), e),
            Ok((a, b)) => {
                if let Some(idc) = idc {
                    // Filling stops at the first overlap (the document is rejected then), so
                    // any number of overlapping pins costs at most one pass over the table.
                    let mut overlap = None;
                    for s in a..=b {
                        let slot = &mut pinned[s as usize];
                        if slot.is_some() {
                            overlap = Some(s);
                            break;
                        }
                        *slot = Some(idc);
                    }
                    if let Some(s) = overlap {
                        c.fail(
                            format!("shards.pins[{i}].range"),
                            format!("`{}` overlaps an earlier pin at shard {s}", pin.range),
                        );
                    }
                }
            }
        }
    }
    pinned
}

/// This instance's IDC (`--idc`) must be one of the document's.
fn check_local_idc(
    c: &mut Checker,
    ctx: &BuildContext,
    idc_ids: &HashMap<&str, IdcId>,
) -> Option<IdcId> {
    let name = ctx.local_idc.as_ref()?;
    match idc_ids.get(name.as_str()) {
        Some(id) => Some(*id),
        None => {
            c.fail(
                "local IDC (--idc)",
                format!("`{name}` is not an IDC of this topology"),
            );
            None
        }
    }
}

fn route_matcher(routes: &[Route]) -> RouteMatcher {
    let rules: Vec<RouteRule> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| RouteRule {
            id: RouteId(i as u32),
            host: r.host.clone(),
            path_prefix: r.path_prefix.clone(),
            methods: r.methods.clone(),
        })
        .collect();
    RouteMatcher::new(&rules)
}

/// Marks each route degraded by the degrade override that is on for its set or for it
/// (`route:NAME`), if any.
fn apply_degrade_switches(routes: &mut [Route], sets: &[SetSpec], overrides: &Overrides) {
    for route in routes {
        let set = sets[route.set.0 as usize].name.as_str();
        route.degraded_by = overrides.degrade.iter().find_map(|(target, o)| {
            let hit = target == set || target.strip_prefix("route:") == Some(route.name.as_str());
            (o.on && hit).then(|| target.clone())
        });
    }
}

fn check_route(
    c: &mut Checker,
    i: usize,
    raw: &RawRoute,
    set_ids: &HashMap<&str, SetId>,
) -> Option<Route> {
    let at = |field: &str| format!("routes[{i}].{field}");
    let before = c.problems.len();
    c.name(at("name"), &raw.name);
    if raw.host.is_empty() {
        c.fail(at("host"), "must not be empty (use \"*\" for any host)");
    }
    if !raw.path_prefix.starts_with('/') {
        c.fail(
            at("path_prefix"),
            format!("`{}` must start with `/`", raw.path_prefix),
        );
    }
    let mut methods = Vec::new();
    for m in &raw.methods {
        match Method::from_bytes(m.as_bytes()) {
            Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => methods.push(method),
            _ => c.fail(
                at("methods"),
                format!("`{m}` is not an upper-case HTTP method"),
            ),
        }
    }
    let set = set_ids.get(raw.set.as_str()).copied();
    if set.is_none() {
        c.fail(at("set"), format!("unknown set `{}`", raw.set));
    }
    let mut keys = Vec::new();
    for k in &raw.key {
        match KeySource::parse(k) {
            Ok(source) => keys.push(source),
            Err(e) => c.fail(at("key"), e),
        }
    }
    if raw.sharded && raw.key.is_empty() {
        c.fail(at("key"), "a sharded route needs at least one key source");
    }
    let on_missing_key = match raw.on_missing_key.as_str() {
        "reject" => MissingKey::Reject,
        "local" => MissingKey::Local,
        other => {
            c.fail(
                at("on_missing_key"),
                format!("`{other}` is not \"reject\" or \"local\""),
            );
            MissingKey::Reject
        }
    };
    c.positive(at("timeout_ms"), raw.timeout_ms);
    if let Some(max) = raw.max_body_bytes {
        c.positive(at("max_body_bytes"), max);
    }
    if raw.retries > 5 {
        c.fail(at("retries"), "at most 5");
    }
    let rate_limit = raw.rate_limit.as_ref().map(|rl| {
        c.positive(at("rate_limit.rps"), rl.rps.into());
        RateLimitSpec {
            rps: rl.rps,
            burst: rl.burst.max(rl.rps),
        }
    });
    let fallback = raw.fallback.as_ref().and_then(|fb| {
        let status = http::StatusCode::from_u16(fb.status)
            .ok()
            .filter(|s| (200..=599).contains(&s.as_u16()));
        if status.is_none() {
            c.fail(
                at("fallback.status"),
                format!("{} is not a status from 200 to 599", fb.status),
            );
        }
        let content_type = http::HeaderValue::from_str(&fb.content_type).ok();
        if content_type.is_none() {
            c.fail(at("fallback.content_type"), "not a valid header value");
        }
        Some(Fallback {
            status: status?,
            body: bytes::Bytes::from(fb.body.clone()),
            content_type: content_type?,
            retry_after_s: fb.retry_after_s,
        })
    });
    if c.problems.len() > before {
        return None;
    }
    Some(Route {
        name: Arc::new(raw.name.clone()),
        host: raw.host.clone(),
        path_prefix: raw.path_prefix.clone(),
        methods,
        set: set?,
        sharded: raw.sharded,
        keys,
        on_missing_key,
        timeout: Duration::from_millis(raw.timeout_ms),
        retries: raw.retries,
        max_body_bytes: raw.max_body_bytes,
        websocket: raw.websocket,
        rate_limit,
        fallback,
        degraded_by: None,
    })
}

#[allow(clippy::too_many_arguments)]
fn check_idc(
    c: &mut Checker,
    i: usize,
    raw: &RawIdc,
    doc: &RawTopology,
    set_ids: &HashMap<&str, SetId>,
    idc_ids: &HashMap<&str, IdcId>,
    used_sets: &BTreeMap<SetId, String>,
    overrides: &Overrides,
    upstreams: &Upstreams,
) -> Idc {
    let at = |field: &str| format!("idcs[{i}].{field}");
    let mut failover_to = Vec::new();
    for name in &raw.failover_to {
        match idc_ids.get(name.as_str()) {
            Some(_) if *name == raw.name => {
                c.fail(at("failover_to"), "an IDC cannot fail over to itself")
            }
            Some(id) if failover_to.contains(id) => {
                c.fail(at("failover_to"), format!("`{name}` is listed twice"))
            }
            Some(id) => failover_to.push(*id),
            None => c.fail(at("failover_to"), format!("unknown IDC `{name}`")),
        }
    }
    let h = &raw.health;
    if !h.path.starts_with('/') {
        c.fail(at("health.path"), "must start with `/`");
    }
    c.positive(at("health.interval_ms"), h.interval_ms);
    c.positive(at("health.timeout_ms"), h.timeout_ms);
    c.positive(at("health.rise"), h.rise.into());
    c.positive(at("health.fall"), h.fall.into());

    let tls = raw.tls.as_ref().and_then(|t| {
        match crate::data::upstream::tls::UpstreamTls::load(&t.ca, t.server_name.as_deref()) {
            Ok(tls) => Some(Arc::new(tls)),
            Err((field, problem)) => {
                c.fail(at(field), problem);
                None
            }
        }
    });
    let mut pools: Vec<Arc<[Arc<Backend>]>> = vec![Arc::from(Vec::new()); doc.sets.len()];
    for (set_name, addrs) in &raw.pools {
        let Some(set) = set_ids.get(set_name.as_str()) else {
            c.fail(
                at(&format!("pools.{set_name}")),
                format!("unknown set `{set_name}`"),
            );
            continue;
        };
        let mut backends = Vec::new();
        let mut seen = HashSet::new();
        for addr in addrs {
            match addr.parse::<SocketAddr>() {
                Ok(sa) if seen.insert(sa) => {
                    backends.push(upstreams.backend(&raw.name, set_name, sa, tls.as_ref()))
                }
                Ok(_) => c.fail(
                    at(&format!("pools.{set_name}")),
                    format!("`{addr}` is listed twice"),
                ),
                Err(_) => c.fail(
                    at(&format!("pools.{set_name}")),
                    format!("`{addr}` is not an `ip:port` address"),
                ),
            }
        }
        pools[set.0 as usize] = Arc::from(backends);
    }
    for (set, route) in used_sets {
        if pools[set.0 as usize].is_empty() {
            let name = doc
                .sets
                .keys()
                .nth(set.0 as usize)
                .map_or("?", String::as_str);
            c.fail(
                at(&format!("pools.{name}")),
                format!(
                    "IDC `{}` has no backends for set `{name}`, which route `{route}` uses",
                    raw.name
                ),
            );
        }
    }

    let (state, state_reason) = match overrides.idc_state(&raw.name) {
        Some(o) => (o.state, o.reason.clone()),
        None => (IdcState::Active, String::new()),
    };
    Idc {
        name: Arc::new(raw.name.clone()),
        header: http::HeaderValue::from_str(&raw.name)
            .unwrap_or(http::HeaderValue::from_static("invalid")),
        weight: raw.weight,
        failover_to,
        health: HealthSpec {
            path: h.path.clone(),
            interval: Duration::from_millis(h.interval_ms),
            timeout: Duration::from_millis(h.timeout_ms),
            rise: h.rise,
            fall: h.fall,
        },
        state,
        state_reason,
        pools,
    }
}

/// The consistent hash ring over IDC names, vnodes ∝ weight. Keyed by name (not index), so
/// reordering `[[idcs]]` moves nothing.
pub fn idc_ring(idcs: &[RawIdc]) -> Ring<String> {
    let mut builder = RingBuilder::default();
    for idc in idcs.iter().filter(|i| i.weight > 0) {
        builder = builder.weighted_node(idc.name.clone(), idc.weight as usize);
    }
    builder.build()
}

/// shard → home IDC, and shard → failover order (home first, then the home IDC's
/// `failover_to`, then the ring's replica order).
fn shard_tables(
    raw: &[RawIdc],
    ids: &HashMap<&str, IdcId>,
    ring: &RingShards,
    pinned: &[Option<IdcId>],
    shard_count: u32,
) -> (Vec<IdcId>, Vec<IdcId>) {
    let n = raw.len();
    // Each IDC's `failover_to`, resolved once rather than once per shard.
    let failover_to: Vec<Vec<IdcId>> = raw
        .iter()
        .map(|i| {
            i.failover_to
                .iter()
                .filter_map(|name| ids.get(name.as_str()).copied())
                .collect()
        })
        .collect();
    let mut home = Vec::with_capacity(shard_count as usize);
    let mut order = Vec::with_capacity(shard_count as usize * n);
    let mut row: Vec<IdcId> = Vec::with_capacity(n);
    for shard in 0..shard_count {
        row.clear();
        let h = match pinned[shard as usize] {
            Some(idc) => idc,
            None => ring.home(shard).unwrap_or(IdcId(0)),
        };
        home.push(h);
        row.push(h);
        let after_home = failover_to.get(h.0 as usize).map_or(&[][..], Vec::as_slice);
        for &next in after_home.iter().chain(ring.order(shard)) {
            if !row.contains(&next) {
                row.push(next);
            }
        }
        // IDCs of weight 0 are not on the ring: they come last, in document order.
        for i in 0..n {
            let id = IdcId(i as u16);
            if !row.contains(&id) {
                row.push(id);
            }
        }
        order.extend_from_slice(&row);
    }
    (home, order)
}

/// The warm-up step (1-based, of `steps`) at which `shard` comes home to a warming IDC. Each
/// step's shards are spread over the whole range, deterministically, and a shard comes back
/// whole at its step: never split between two IDCs.
pub fn warmup_step_of(shard: Shard, steps: u32) -> u32 {
    let steps = u64::from(steps.max(1));
    ((u64::from(shard.0).wrapping_mul(2_654_435_761) >> 7) % steps) as u32 + 1
}

/// Whether a warming IDC whose override has brought `done` of `steps` steps home serves
/// `shard`. Steps move on only when the driver writes them (a fenced move each), never with
/// a gateway's clock, so every gateway switches the shard at the same revision.
pub fn warmed(shard: Shard, done: u32, steps: u32) -> bool {
    warmup_step_of(shard, steps) <= done
}

/// A draining IDC keeps serving the shards of its drain while the drain is fenced (`drain`:
/// what it served when the drain started), and nothing once it is applied.
fn can_serve(idc: &Idc, shard: Shard, warmup: (u32, u32), drain: Option<&ShardSet>) -> bool {
    match idc.state {
        IdcState::Active => true,
        IdcState::Warming => warmed(shard, warmup.0, warmup.1),
        IdcState::Draining => drain.is_some_and(|d| d.contains(shard.0)),
        IdcState::Down => false,
    }
}

/// Per IDC: the warm-up steps done and the steps in all (meaningful for warming IDCs only).
fn warmup_steps(idcs: &[Idc], overrides: &Overrides) -> Vec<(u32, u32)> {
    idcs.iter()
        .map(|i| {
            overrides
                .idcs
                .get(i.name.as_str())
                .map_or((0, 1), |o| (o.steps_done(), o.warmup_steps()))
        })
        .collect()
}

fn serving_table(
    idcs: &[Idc],
    home: &[IdcId],
    order: &[IdcId],
    shard_count: u32,
    warmup: &[(u32, u32)],
    drain_serves: &[Option<ShardSet>],
) -> Vec<Option<IdcId>> {
    let n = idcs.len();
    (0..shard_count)
        .map(|s| {
            let shard = Shard(s);
            let row = &order[s as usize * n..(s as usize + 1) * n];
            debug_assert_eq!(row[0], home[s as usize]);
            row.iter().copied().find(|id| {
                let i = id.0 as usize;
                can_serve(&idcs[i], shard, warmup[i], drain_serves[i].as_ref())
            })
        })
        .collect()
}

/// Non-sharded routes: the local IDC when it is active, else the next active IDC in its
/// failover order; without a local IDC, the ring's order for the cluster's global data.
fn global_idc(
    idcs: &[Idc],
    local: Option<IdcId>,
    ids: &HashMap<&str, IdcId>,
    ring: &Ring<String>,
) -> Option<IdcId> {
    let active = |id: &IdcId| idcs[id.0 as usize].state == IdcState::Active;
    let mut candidates: Vec<IdcId> = Vec::new();
    let ring_key = match local {
        Some(l) => {
            candidates.push(l);
            candidates.extend(idcs[l.0 as usize].failover_to.iter().copied());
            idcs[l.0 as usize].name.as_str().to_owned()
        }
        None => "global".to_owned(),
    };
    candidates.extend(
        ring.replicas(ring_key)
            .filter_map(|n| ids.get(n.as_str()).copied()),
    );
    candidates.extend((0..idcs.len()).map(|i| IdcId(i as u16)));
    candidates.into_iter().find(active)
}

/// A new snapshot identity (`Topology::build_id`).
fn next_build_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
