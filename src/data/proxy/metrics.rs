//! The request path's metric handles, resolved once per snapshot (the last step of the
//! pipeline): `shardgate_requests_total` and `shardgate_request_duration_seconds` per (route,
//! IDC), `shardgate_upstream_duration_seconds` per (IDC, set), and fenced writes in
//! `shardgate_refused_total` per set. The first request of a snapshot that needs a handle finds
//! it in its family by name; every later one indexes an array: no label clones, no hashing of
//! names, no family lock per request (one reference-count increment for a route's handles).

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use crate::control::topology::{IdcId, RouteId, SetId, Topology};
use crate::telemetry::{IdcSetLabels, Metrics, RefusedLabels, RequestLabels, RouteLabels};

/// Statuses whose counters are kept per (route, IDC); any other is looked up by name (rare,
/// and counted all the same).
const COMMON_STATUSES: [u16; 21] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 421, 429, 500, 502,
    503, 504,
];

/// The handles of one (route, IDC), made on first use (so `/metrics` lists only series that
/// counted something, as before).
struct RouteHandles {
    labels: RouteLabels,
    duration: Histogram,
    /// By index in `COMMON_STATUSES`.
    statuses: [OnceLock<Counter>; COMMON_STATUSES.len()],
}

impl RouteHandles {
    fn new(metrics: &Metrics, labels: RouteLabels) -> RouteHandles {
        RouteHandles {
            duration: metrics.request_duration.get_or_create(&labels).clone(),
            labels,
            statuses: Default::default(),
        }
    }

    fn record(&self, metrics: &Metrics, status: u16, seconds: f64) {
        self.duration.observe(seconds);
        let counter = || {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    route: self.labels.route.clone(),
                    set: self.labels.set.clone(),
                    idc: self.labels.idc.clone(),
                    status,
                })
                .clone()
        };
        match COMMON_STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.statuses[i].get_or_init(counter).inc(),
            None => counter().inc(),
        };
    }
}

/// The handles of one snapshot.
struct Resolved {
    /// `Topology::build_id` of the snapshot they were resolved for.
    snapshot: u64,
    /// By `RouteId * idcs + IdcId`.
    routes: Vec<OnceLock<Box<RouteHandles>>>,
    /// By `IdcId * sets + SetId`.
    upstream: Vec<OnceLock<Histogram>>,
    /// By `SetId`: writes refused by a fence (`reason="fenced"`).
    fenced: Vec<OnceLock<Counter>>,
}

/// The request path's metrics, with the handles of the newest snapshot a request was
/// recorded under.
pub struct RequestMetrics {
    metrics: Arc<Metrics>,
    resolved: ArcSwapOption<Resolved>,
}

impl RequestMetrics {
    pub fn new(metrics: Arc<Metrics>) -> RequestMetrics {
        RequestMetrics {
            metrics,
            resolved: ArcSwapOption::empty(),
        }
    }

    /// `apply` on the handle that `cell` picks among `topo`'s, made by `make` on first use. A
    /// request still under an older snapshot (during a reload) gets `make`'s own, looked up by
    /// name, rather than evict the newer snapshot's handles.
    fn cached<T>(
        &self,
        topo: &Topology,
        cell: impl FnOnce(&Resolved) -> Option<&OnceLock<T>>,
        make: impl Fn() -> T,
        apply: impl FnOnce(&T),
    ) {
        let kept = self.resolved.load();
        match kept.as_deref() {
            Some(r) if r.snapshot == topo.build_id => on_cell(cell(r), make, apply),
            Some(r) if r.snapshot > topo.build_id => apply(&make()),
            // Newer than the handles kept (or none yet): this snapshot's become the kept ones.
            _ => {
                let fresh = Arc::new(Resolved {
                    snapshot: topo.build_id,
                    routes: cells(topo.routes.len() * topo.idcs.len()),
                    upstream: cells(topo.idcs.len() * topo.sets.len()),
                    fenced: cells(topo.sets.len()),
                });
                on_cell(cell(&fresh), make, apply);
                self.resolved.store(Some(fresh));
            }
        }
    }

    /// A request of `route` answered by `idc` (both of `topo`) with `status` after `seconds`.
    pub fn request(&self, topo: &Topology, route: RouteId, idc: IdcId, status: u16, seconds: f64) {
        let slot = usize::from(idc.0) + route.0 as usize * topo.idcs.len();
        let make = || {
            let labels = RouteLabels {
                route: topo.route(route).name.clone(),
                set: topo.set(topo.route(route).set).name.clone(),
                idc: topo.idc(idc).name.clone(),
            };
            Box::new(RouteHandles::new(&self.metrics, labels))
        };
        self.cached(
            topo,
            |r| r.routes.get(slot),
            make,
            |h| h.record(&self.metrics, status, seconds),
        );
    }

    /// A request counted under these labels (no routing decision, or a stale snapshot).
    pub fn request_by_labels(&self, labels: RouteLabels, status: u16, seconds: f64) {
        RouteHandles::new(&self.metrics, labels).record(&self.metrics, status, seconds);
    }

    /// An upstream exchange with `idc`'s pool of `set` (both of `topo`) that took `seconds`.
    pub fn upstream(&self, topo: &Topology, idc: IdcId, set: SetId, seconds: f64) {
        let slot = usize::from(set.0) + usize::from(idc.0) * topo.sets.len();
        let make = || {
            let labels = IdcSetLabels {
                idc: topo.idc(idc).name.clone(),
                set: topo.set(set).name.clone(),
            };
            self.metrics
                .upstream_duration
                .get_or_create(&labels)
                .clone()
        };
        self.cached(topo, |r| r.upstream.get(slot), make, |h| h.observe(seconds));
    }

    /// A write of `set` (of `topo`) refused by a fence: a move's, or this gateway's own.
    pub fn fenced(&self, topo: &Topology, set: SetId) {
        let make = || {
            let labels = RefusedLabels {
                set: topo.set(set).name.clone(),
                reason: "fenced",
            };
            self.metrics.refused.get_or_create(&labels).clone()
        };
        self.cached(
            topo,
            |r| r.fenced.get(usize::from(set.0)),
            make,
            |c| {
                c.inc();
            },
        );
    }
}

/// `apply` on the cell's handle, made on first use; on one made now when there is no cell (an
/// id out of range: counted all the same).
fn on_cell<T>(cell: Option<&OnceLock<T>>, make: impl Fn() -> T, apply: impl FnOnce(&T)) {
    match cell {
        Some(c) => apply(c.get_or_init(make)),
        None => apply(&make()),
    }
}

fn cells<T>(n: usize) -> Vec<OnceLock<T>> {
    (0..n).map(|_| OnceLock::new()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    fn topology() -> Topology {
        super::super::test_topology()
    }

    #[test]
    fn counts_land_under_their_names_from_any_snapshot() {
        let metrics = Arc::new(Metrics::new());
        let m = RequestMetrics::new(metrics.clone());
        let (old, new) = (topology(), topology());
        let orders = new.route_by_name("orders").unwrap();
        let bj = new.idc_by_name("bj").unwrap();
        let core = new.route(orders).set;
        m.request(&new, orders, bj, 200, 0.01);
        m.request(&new, orders, bj, 200, 0.01);
        // An uncommon status, and a request still under the older snapshot (looked up by
        // name, without evicting the newer snapshot's handles).
        m.request(&new, orders, bj, 599, 0.01);
        m.request(&old, orders, bj, 200, 0.01);
        m.request(&new, orders, bj, 200, 0.01);
        m.upstream(&new, bj, core, 0.01);
        m.upstream(&old, bj, core, 0.01);
        m.fenced(&new, core);
        m.request_by_labels(
            RouteLabels {
                route: Arc::new(String::new()),
                set: Arc::new(String::new()),
                idc: Arc::new(String::new()),
            },
            404,
            0.01,
        );
        let text = metrics.encode();
        for line in [
            r#"shardgate_requests_total{route="orders",set="core",idc="bj",status="200"} 4"#,
            r#"shardgate_requests_total{route="orders",set="core",idc="bj",status="599"} 1"#,
            r#"shardgate_requests_total{route="",set="",idc="",status="404"} 1"#,
            r#"shardgate_request_duration_seconds_count{route="orders",set="core",idc="bj"} 5"#,
            r#"shardgate_upstream_duration_seconds_count{idc="bj",set="core"} 2"#,
            r#"shardgate_refused_total{set="core",reason="fenced"} 1"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        // Only series that counted something are listed.
        assert!(!text.contains(r#"idc="sh""#), "{text}");
        assert_eq!(
            m.resolved.load().as_ref().map(|r| r.snapshot),
            Some(new.build_id)
        );
    }
}
