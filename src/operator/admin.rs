//! The admin listener (DESIGN.md §8): health, readiness, metrics, status, explain, the
//! effective topology and the live console ([`console`]). Loopback by default; with a token,
//! every endpoint but `/healthz` and the console's static page needs
//! `Authorization: Bearer <token>`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::data::server::ClientBody;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::control::source::Snapshots;
use crate::control::topology::{Shard, Topology};
use crate::data::admission::Admission;
use crate::data::server::Handler;
use crate::data::upstream::body::ResponseBody;
use crate::telemetry::Metrics;

pub struct Admin {
    pub snapshots: Arc<Snapshots>,
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    /// This gateway's health view (`idcs[].healthy`).
    pub health: Arc<crate::control::health::Health>,
    /// File mode: where operator writes (`POST /override/…`) go. `None` in etcd mode.
    pub file_overrides: Option<Arc<crate::control::source::FileOverrides>>,
    pub token: Option<String>,
    /// The proxy listener's certificates, shown in `/status`.
    pub tls: Option<Arc<crate::data::tls::Certificates>>,
    /// The supervised background tasks: one that is down makes `/readyz` fail.
    pub tasks: Arc<crate::control::tasks::Tasks>,
    /// The console's history of this gateway's counters (its sparklines).
    pub console: Arc<console::History>,
}

impl Handler for Admin {
    async fn call(
        self: Arc<Self>,
        req: Request<ClientBody>,
        _peer: crate::data::server::Peer,
    ) -> Response<ResponseBody> {
        if req.method() == Method::POST && self.authorized(&req) {
            if let Some(target) = req.uri().path().strip_prefix("/override/degrade/") {
                let target = write::percent_decode(target);
                return write::degrade(&self, &target, req).await;
            }
            if let Some(idc) = req.uri().path().strip_prefix("/override/idc/") {
                let idc = write::percent_decode(idc);
                return write::idc(&self, &idc, req).await;
            }
            if req.uri().path() == "/move" {
                return write::move_range(&self, req).await;
            }
        }
        self.handle(&req)
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<ResponseBody> {
    respond(status, "application/json", v.to_string())
}

pub(crate) fn error(status: StatusCode, kind: &str, detail: &str) -> Response<ResponseBody> {
    json_response(status, &json!({"error": kind, "detail": detail}))
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from timings.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

impl Admin {
    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        req.headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|given| same_token(given, token.as_bytes()))
    }

    pub fn handle<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        let path = req.uri().path();
        if path != "/healthz" && !console::is_shell(path) && !self.authorized(req) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>",
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "admin endpoints here are read-only (GET), but for POST /override/degrade/<target>, /override/idc/<idc> and /move",
            );
        }
        if let Some(r) = console::serve(self, path) {
            return r;
        }
        let topo = self.snapshots.current();
        match path {
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => self.readiness(topo.as_deref()),
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/dashboard" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
            _ => {
                let Some(topo) = topo else {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_ready",
                        "no topology snapshot yet",
                    );
                };
                match path {
                    "/status" => json_response(StatusCode::OK, &self.status(&topo)),
                    "/topology" => json_response(StatusCode::OK, &topology_json(&topo)),
                    "/explain" => explain(&topo, req.uri().query().unwrap_or("")),
                    _ => error(StatusCode::NOT_FOUND, "not_found", "unknown admin endpoint"),
                }
            }
        }
    }

    /// `/readyz`: ready with a valid snapshot and every background task running; otherwise
    /// 503 with every reason.
    fn readiness(&self, topo: Option<&Topology>) -> Response<ResponseBody> {
        let down = self.tasks.down();
        let tasks = (!down.is_empty()).then(|| {
            let list: Vec<String> = down
                .iter()
                .map(|(task, why)| format!("{task} ({why})"))
                .collect();
            format!("background tasks down: {}", list.join("; "))
        });
        let (status, text) = match (topo, tasks) {
            (Some(t), None) => (StatusCode::OK, format!("ready: revision {}", t.revision)),
            (Some(_), Some(tasks)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {tasks}"),
            ),
            (None, tasks) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "not ready: no valid topology snapshot yet{}{}",
                    self.snapshots
                        .last_problem()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default(),
                    tasks.map(|t| format!("; {t}")).unwrap_or_default()
                ),
            ),
        };
        respond(status, "text/plain", format!("{text}\n"))
    }

    fn status(&self, t: &Topology) -> Value {
        let served = t.shards_served();
        let mut home = vec![0u32; t.idcs.len()];
        for s in 0..t.shard_count {
            home[t.home(Shard(s)).0 as usize] += 1;
        }
        let view = self.health.idc_view();
        let idcs: Vec<Value> = t
            .idcs
            .iter()
            .enumerate()
            .map(|(i, idc)| {
                // An IDC the view has not evaluated yet (just added) is judged now.
                let healthy = view
                    .get(idc.name.as_str())
                    .copied()
                    .or_else(|| crate::control::health::view_of(t).get(idc.name.as_str()).copied())
                    .unwrap_or(true);
                json!({
                    "name": idc.name.as_str(),
                    "state": idc.state.as_str(),
                    "reason": idc.state_reason,
                    "healthy": healthy,
                    "weight": idc.weight,
                    "shards_home": home[i],
                    "shards_served": served[i],
                    "backends": idc.pools.iter().zip(&t.sets).filter(|(p, _)| !p.is_empty()).map(|(p, s)| {
                        (s.name.to_string(), p.iter().map(|b| json!({
                            "addr": b.addr.to_string(),
                            "inflight": b.inflight(),
                            "idle_connections": b.idle_connections(),
                            "avoided": b.avoided(),
                            "healthy": b.health.probe_healthy(),
                            "probes": b.health.probes(),
                            "ejected": b.health.ejected(),
                            "ejections": b.health.ejections(),
                            "ejection_ms": b.health.ejection_ms(),
                        })).collect::<Vec<_>>())
                    }).collect::<BTreeMap<_, _>>(),
                })
            })
            .collect();
        let sets: BTreeMap<String, Value> = t
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let live = self.admission.set_status(&s.name);
                let degraded = t
                    .overrides
                    .degrade
                    .get(s.name.as_str())
                    .is_some_and(|o| o.on);
                let degraded_routes: Vec<&str> = t
                    .routes
                    .iter()
                    .filter(|r| r.set == crate::control::topology::SetId(i as u8))
                    .filter(|r| {
                        t.overrides
                            .degrade
                            .get(&format!("route:{}", r.name))
                            .is_some_and(|o| o.on)
                    })
                    .map(|r| r.name.as_str())
                    .collect();
                (
                    s.name.to_string(),
                    json!({
                        "priority": s.priority,
                        "max_inflight": s.max_inflight,
                        "degradable": s.degradable,
                        "inflight": live["inflight"],
                        "requests": live["requests"],
                        "retries": live["retries"],
                        "degraded": degraded,
                        "degraded_routes": degraded_routes,
                    }),
                )
            })
            .collect();
        let overrides: Vec<Value> =
            t.overrides
                .idcs
                .iter()
                .map(|(idc, o)| json!({"target": format!("idc/{idc}"), "value": o}))
                .chain(
                    t.overrides.degrade.iter().map(
                        |(target, o)| json!({"target": format!("degrade/{target}"), "value": o}),
                    ),
                )
                .collect();
        json!({
            "cluster": t.cluster,
            "revision": t.revision,
            "source": {
                "kind": self.snapshots.kind(),
                "up": self.snapshots.source_up(),
                "last_problem": self.snapshots.last_problem(),
            },
            // This gateway's own write fence (etcd mode) and what it acknowledges.
            "self_fence": self.snapshots.self_fence().status_json(),
            "acknowledged_revision": self.snapshots.acknowledged(),
            "local_idc": t.local_idc.map(|i| t.idc(i).name.to_string()),
            "shard_count": t.shard_count,
            "idcs": idcs,
            "overrides": overrides,
            "moves": crate::control::moves::status_json(&t.overrides, crate::control::moves::unix_now_ms()),
            "gateways": self.snapshots.gateways(),
            "leader": self.snapshots.leader(),
            "sets": sets,
            "tls": self.tls.as_ref().map(|c| c.status()),
            "breakers": self.admission.breakers_status(),
            "inflight_total": self.admission.total_inflight(),
        })
    }
}

/// `GET /topology`: the effective snapshot.
pub fn topology_json(t: &Topology) -> Value {
    json!({
        "revision": t.revision,
        "document": t.document,
        "overrides": t.overrides,
        "idcs": t.idcs.iter().map(|i| json!({"name": i.name.as_str(), "state": i.state.as_str()})).collect::<Vec<_>>(),
        "shards_served": t.idcs.iter().zip(t.shards_served()).map(|(i, n)| (i.name.to_string(), n)).collect::<BTreeMap<_, _>>(),
        "global_idc": t.global_idc().map(|i| t.idc(i).name.to_string()),
    })
}

/// The answer to "where does this key go and why", shared by `/explain` and the offline CLI.
pub fn explain_json(t: &Topology, key: &str, route: Option<&str>) -> Result<Value, String> {
    let route_id = match route {
        Some(name) => Some(
            t.route_by_name(name)
                .ok_or_else(|| format!("unknown route `{name}`"))?,
        ),
        None => None,
    };
    let name = |i: crate::control::topology::IdcId| t.idc(i).name.to_string();
    if let Some(r) = route_id.map(|id| t.route(id)).filter(|r| !r.sharded) {
        let serving = t.global_idc().map(name);
        return Ok(json!({
            "key": key,
            "route": r.name.as_str(),
            "shard": null,
            "home_idc": null,
            "serving_idc": serving,
            "reason": "route is not sharded: it goes to the local IDC, or the next active one",
            "revision": t.revision,
        }));
    }
    let shard = Shard::of_key(key.as_bytes(), t.shard_count);
    Ok(json!({
        "key": key,
        "route": route,
        "shard": shard.0,
        "home_idc": name(t.home(shard)),
        "serving_idc": t.serving(shard).map(name),
        "failover_order": t.failover_order(shard).iter().map(|&i| name(i)).collect::<Vec<_>>(),
        "reason": t.serving_reason(shard),
        "fenced": t.is_fenced(shard),
        "revision": t.revision,
    }))
}

fn explain(t: &Topology, query: &str) -> Response<ResponseBody> {
    let mut key = None;
    let mut route = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "key" => key = Some(v.into_owned()),
            "route" => route = Some(v.into_owned()),
            _ => {}
        }
    }
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_key",
            "give ?key=<sharding key>[&route=<name>]",
        );
    };
    match explain_json(t, &key, route.as_deref()) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => error(StatusCode::NOT_FOUND, "unknown_route", &e),
    }
}

pub mod console;
mod write;

/// The plain table of IDCs and sets (`/dashboard`), from before the console.
const DASHBOARD: &str = include_str!("admin/dashboard.html");

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn token_comparison() {
        assert!(same_token(b"s3cret", b"s3cret"));
        assert!(!same_token(b"s3cre", b"s3cret"));
        assert!(!same_token(b"s3cret!", b"s3cret"));
        assert!(!same_token(b"", b"s3cret"));
    }
}
