//! The request pipeline (DESIGN.md §2), in order:
//! request id → strip client `x-shardgate-*` → load the snapshot once → decide (route, key,
//! shard, serving IDC) → admit (set budget, shedding, rate limit, degrade switch, breaker) →
//! build the upstream request → forward (retry in the IDC, spill reads to
//! the next IDC when the serving one cannot be reached) → response headers → metrics + one
//! access-log event. A backend's 421 naming a newer shard owner sends the request there once
//! ([`misroute`]); after a failed attempt [`hop`] decides whether it spills, is replayed in
//! the shard's new IDC, or stops.

pub mod hop;
pub mod metrics;
pub mod misroute;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::data::server::ClientBody;
use arc_swap::ArcSwapOption;
use http::header::HeaderValue;
use http::{Method, Request, Response, Uri, Version};

use self::hop::NextHop;
use self::metrics::RequestMetrics;
use crate::control::topology::{
    Decision, IdcId, IdcState, RequestView, RouteError, RouteId, SetId, Shard, Topology,
    WriteInFlight,
};
use crate::data::admission::{Admission, Permit, Refusal};
use crate::data::error::ProxyError;
use crate::data::forward::{forward, Answered, ForwardError, ForwardPolicy};
use crate::data::headers;
use crate::data::upgrade;
use crate::data::upstream::body::{RequestBody, ResponseBody, UpstreamBody};
use crate::data::upstream::{Lease, Stamp};
use crate::telemetry::{Metrics, RouteLabels};

/// Settings of the data path that do not come from the topology.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    /// Idle time allowed between frames of a client's request body.
    pub body_timeout: Duration,
    /// An upgraded (WebSocket) connection with no byte moving either way is closed after
    /// this long (`timeouts.idle_ms`).
    pub upgrade_idle: Duration,
    /// `x-forwarded-proto` for requests on this listener.
    pub scheme: &'static str,
}

/// What every request handler shares: the one snapshot, metrics, settings.
pub struct Gateway {
    pub topology: Arc<ArcSwapOption<Topology>>,
    /// This gateway's own write fence (etcd mode: closed while its registration is unsure).
    pub self_fence: Arc<crate::control::self_fence::SelfFence>,
    pub metrics: Arc<Metrics>,
    /// The request path's metric handles, resolved once per snapshot.
    pub request_metrics: RequestMetrics,
    /// Set budgets, rate limits, degrade switches and breakers (state outlives snapshots).
    pub admission: Arc<Admission>,
    pub settings: ProxySettings,
    /// This instance's IDC (`--idc`), if set, as a header value.
    pub local_idc_header: Option<HeaderValue>,
}

/// What one request did, for metrics and the access log.
struct Outcome {
    /// The route matched, in the request's snapshot (its name and set's name are read there).
    route_id: Option<RouteId>,
    /// The IDC that answered, and its id in the request's snapshot (`None` when the answer
    /// came from another snapshot's IDC) for its metric handles.
    idc: Option<Arc<String>>,
    idc_id: Option<IdcId>,
    /// The serving IDC's name as a header value (precomputed in the snapshot).
    idc_header: Option<HeaderValue>,
    shard: Option<u32>,
    shard_header: Option<HeaderValue>,
    spilled: bool,
    /// `x-shardgate-reason` of a gateway refusal (set_full, shed, degraded, …).
    reason: Option<&'static str>,
}

impl Outcome {
    /// The matched route's name and its set's, in `topo` (the request's snapshot).
    fn route_and_set<'t>(
        &self,
        topo: Option<&'t Topology>,
    ) -> Option<(&'t Arc<String>, &'t Arc<String>)> {
        let (topo, id) = (topo?, self.route_id?);
        let route = topo.route(id);
        Some((&route.name, &topo.set(route.set).name))
    }

    /// The IDC that answers: its name, its id in the request's snapshot (`None` for another
    /// snapshot's IDC) and its header value.
    fn served_by(&mut self, name: &Arc<String>, id: Option<IdcId>, header: &HeaderValue) {
        self.idc = Some(name.clone());
        self.idc_id = id;
        self.idc_header = Some(header.clone());
    }
}

/// Where a forwarded request was answered.
struct Landed {
    idc: Arc<String>,
    /// The IDC's id in the request's snapshot (`None` when `moved`).
    idc_id: Option<IdcId>,
    idc_header: HeaderValue,
    /// Spilled to the next IDC (a read).
    spilled: bool,
    /// Replayed in the shard's new serving IDC (a newer snapshot).
    moved: bool,
}

/// What admission gave a decided request.
struct Admitted {
    /// The set's in-flight slot, and its breaker's verdict on the exchange.
    permit: Permit,
    /// A read sent straight to this IDC: its serving IDC's breaker is open over a dead pool.
    spill_first: Option<IdcId>,
    /// A write on a sharded route, counted in flight under the snapshot.
    write_in_flight: Option<WriteInFlight>,
}

/// A WebSocket handshake's `Upgrade` header and the client's side of the connection.
type ClientUpgrade = Option<(HeaderValue, hyper::upgrade::OnUpgrade)>;

/// A request made ready for its backend by `prepare`. Used where `prepare` wrote it, not taken
/// apart into locals: each of those would be a copy of its part (the request and the stamp
/// are some 600 bytes) into the pipeline's future.
struct Prepared<'a, 't> {
    upstream: Request<RequestBody>,
    stamp: Stamp<'t>,
    upgrade: ClientUpgrade,
    policy: ForwardPolicy<'a>,
}

/// A decided, admitted request on its way upstream: what the exchange and the answer share.
struct Trip<'a> {
    snapshot: &'a Arc<Topology>,
    decision: &'a Decision,
    route: &'a crate::control::topology::Route,
    /// GET, HEAD or OPTIONS.
    safe: bool,
    policy: ForwardPolicy<'a>,
    /// Admission sent the read straight to this IDC (see `Admitted`).
    spill_first: Option<IdcId>,
}

const EMPTY: &str = "";

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn is_idempotent(m: &Method) -> bool {
    is_safe(m) || matches!(*m, Method::PUT | Method::DELETE | Method::TRACE)
}

/// The set's retry budget pays for `forward`'s retries.
impl crate::data::forward::RetryBudget for crate::data::admission::RetryBudget<'_> {
    fn try_retry(&self) -> bool {
        crate::data::admission::RetryBudget::try_retry(self)
    }
}

impl Gateway {
    /// `client_ip` is the connection's peer address as a header value, for `x-forwarded-for`.
    /// Not an `async fn`: one moves its arguments from the future's captures into locals of
    /// its own when first polled (a copy of the request, and room for it twice); the block
    /// below uses its captures in place.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn handle(
        self: Arc<Self>,
        mut req: Request<ClientBody>,
        client_ip: HeaderValue,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        async move {
            let start = Instant::now();
            let ids = headers::Ids::for_request(req.headers());
            let request_id = ids.request_id.clone();
            // A head the connection's gate refused arrives as a stand-in carrying the reason
            // (checked before the client's `x-shardgate-*` headers are stripped; the marker is one
            // of them, so a request without any is not looked up for it).
            let marked = headers::has_gateway_headers(req.headers());
            let refused = marked
                .then(|| req.headers().get(crate::data::server::gate::REFUSED))
                .flatten()
                .map(|v| {
                    refusal_error(crate::data::server::gate::Refusal::from_marker(
                        v.as_bytes(),
                    ))
                });
            if marked {
                headers::strip_gateway_headers(req.headers_mut());
            }
            let mut outcome = Outcome {
                idc: None,
                route_id: None,
                idc_id: None,
                idc_header: None,
                shard: None,
                shard_header: None,
                spilled: false,
                reason: None,
            };
            // A refused head is answered under no snapshot. The response is made where it
            // stays (no pair with the snapshot to take apart again).
            let snapshot = if refused.is_some() {
                None
            } else {
                self.topology.load_full()
            };
            let mut resp = match (refused, &snapshot) {
                (Some(refusal), _) => refusal.to_response(&request_id),
                (None, Some(topo)) => match self
                    .route_and_forward(topo, &mut req, &client_ip, &ids, &mut outcome)
                    .await
                {
                    Ok(resp) => resp,
                    Err(e) => failed(e, topo, &mut outcome, &request_id),
                },
                (None, None) => ProxyError::NoServingIdc(
                    "any request: no topology snapshot is loaded yet".into(),
                )
                .to_response(&request_id),
            };

            self.stamp_answer(resp.headers_mut(), &mut outcome, &request_id);
            self.record(
                &outcome,
                resp.status().as_u16(),
                start,
                &request_id,
                snapshot.as_deref(),
            );
            resp
        }
    }

    /// The gateway's headers on every answer: the IDC that answered (or, for a refusal before
    /// one was chosen, this gateway's), the shard, the request id.
    fn stamp_answer(
        &self,
        h: &mut http::HeaderMap,
        outcome: &mut Outcome,
        request_id: &HeaderValue,
    ) {
        // The three below, in one growth of the map at most.
        h.reserve(3);
        if let Some(idc) = outcome
            .idc_header
            .take()
            .or_else(|| self.local_idc_header.clone())
        {
            h.insert(headers::IDC, idc);
        }
        match outcome.shard_header.take() {
            Some(v) => {
                h.insert(headers::SHARD, v);
            }
            None => {
                if let Some(shard) = outcome.shard {
                    h.insert(headers::SHARD, HeaderValue::from(shard));
                }
            }
        }
        h.insert(headers::REQUEST_ID, request_id.clone());
    }

    /// A request under a snapshot, phase by phase: decide (route, key, shard, IDC) → admit
    /// (fences, body limit, set budget and breaker) → prepare the upstream request → exchange
    /// (spilling or replaying across IDCs, within the route's timeout) → breaker verdict →
    /// answer (a 421 corrected, an upgrade switched, the response head cleaned).
    async fn route_and_forward(
        &self,
        snapshot: &Arc<Topology>,
        req: &mut Request<ClientBody>,
        client_ip: &HeaderValue,
        ids: &headers::Ids,
        outcome: &mut Outcome,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let topo: &Topology = snapshot;
        let decision = self.decide(topo, req, outcome)?;
        let route = topo.route(decision.route);

        // The set's in-flight slot is held by `permit` until this function returns, that is
        // until the response head is handed to the client: the budget bounds requests waiting
        // on backends (what a slow set piles up); streaming bodies are bounded by the backend
        // connection they hold, not by the set budget.
        let Admitted {
            permit,
            spill_first,
            write_in_flight,
        } = self.admit(snapshot, req, &decision)?;
        let budget = permit.retry_budget();
        let safe = is_safe(req.method());
        // Kept as the result `prepare` wrote, its request borrowed from there (see `Prepared`).
        let mut prepared = self.prepare(
            topo,
            req,
            &decision,
            spill_first,
            &budget,
            client_ip,
            ids,
            outcome,
        );
        let Prepared {
            upstream,
            stamp,
            upgrade,
            policy,
        } = match prepared {
            Ok(ref mut p) => p,
            Err(e) => return Err(e),
        };
        if policy.keep_copy && misroute::small_body(upstream) {
            // Boxed: reading a body whole is a wait most requests do not have.
            *upstream = Box::pin(misroute::keep_small_body(
                std::mem::take(upstream),
                self.settings.body_timeout,
            ))
            .await?;
        }

        // Checked again as the write leaves (admission may have waited on the body or the
        // budget): a gateway cut from etcd meanwhile does not send it. A process paused
        // after this point is the backend's owner-epoch check's to catch (docs/backends.md).
        if let (Some(shard), Some(_)) = (decision.shard, &write_in_flight) {
            self.self_fence
                .check()
                .map_err(|why| self.self_fenced(topo, route.set, shard, why))?;
        }

        let trip = Trip {
            snapshot,
            decision: &decision,
            route,
            safe,
            policy: *policy,
            spill_first,
        };
        // Set when the serving IDC's pool had no backend in service: nothing was sent there.
        let mut serving_dead = false;
        // The deadline each attempt's answer is awaited under (`forward`): the same instant,
        // not a second reading of the clock. The exchange is pinned where it is made and the
        // timer holds a reference to it: a future moved into the timer is copied whole (its
        // size, about 2 KB, not what it holds yet) each time it moves.
        let result = {
            let exchange = std::pin::pin!(self.exchange(&trip, upstream, stamp, &mut serving_dead));
            tokio::time::timeout_at(trip.policy.deadline, exchange).await
        };
        // A pool with no backend in service was not called at all: health already keeps
        // traffic off it, and counting its spilled reads would open the breaker and refuse
        // reads that the spill serves.
        if !serving_dead {
            permit.record(breaker_failure(&result, spill_first));
        }
        let ((mut resp, mut lease, kept), landed) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Err(forward_error(e, route)),
            Err(_) => return Err(ProxyError::UpstreamTimeout(route.timeout.as_millis() as u64)),
        };
        if landed.spilled || landed.moved {
            outcome.served_by(&landed.idc, landed.idc_id, &landed.idc_header);
            outcome.spilled = landed.spilled;
        }
        if let (http::StatusCode::MISDIRECTED_REQUEST, Some(shard)) =
            (resp.status(), decision.shard)
        {
            // Boxed: a 421 is rare, and its second exchange would otherwise sit in every
            // request's state.
            let again = Box::pin(self.correct_misroute(
                topo,
                route,
                shard,
                &landed.idc,
                resp.headers(),
                kept.then(|| (std::mem::take(upstream), &*stamp)),
                trip.policy,
            ))
            .await?;
            if let Some(owner) = again {
                (resp, lease) = (owner.resp, owner.lease);
                let at = topo.idc(owner.idc);
                outcome.served_by(&at.name, Some(owner.idc), &at.header);
            }
        }
        Ok(self.answer(&trip, resp, lease, &landed, upgrade.take(), write_in_flight))
    }

    /// Decide: the request's target checked and its path normalised, then the route, shard
    /// and serving IDC, noted in `outcome`.
    fn decide(
        &self,
        topo: &Topology,
        req: &mut Request<ClientBody>,
        outcome: &mut Outcome,
    ) -> Result<Decision, ProxyError> {
        check_authority(req)?;
        normalize_path(req)?;
        let decision = topo
            .decide(RequestView {
                method: req.method(),
                uri: req.uri(),
                headers: req.headers(),
            })
            .map_err(|e| self.route_error(topo, e, outcome))?;
        outcome.shard = decision.shard.map(|s| s.0);
        outcome.route_id = Some(decision.route);
        let at = topo.idc(decision.idc);
        outcome.served_by(&at.name, Some(decision.idc), &at.header);
        Ok(decision)
    }

    /// Admit: the write fences, the route's body limit, then the set's budget and breaker.
    fn admit(
        &self,
        snapshot: &Arc<Topology>,
        req: &Request<ClientBody>,
        decision: &Decision,
    ) -> Result<Admitted, ProxyError> {
        let topo: &Topology = snapshot;
        let route = topo.route(decision.route);
        // The write fence (§5): while a planned move is in phase 1 its shards take reads
        // (at the old owner) but no writes, so the new owner never sees a write the old one
        // has not replicated. One bit test, only for requests that may write.
        // A write also needs this gateway's own fence open (etcd mode): the leader moves
        // owners without waiting for a gateway whose registration is gone, so such a gateway
        // must not write. Every write on a sharded route is counted in flight under this
        // snapshot until its exchange is over: the gateway acknowledges a newer revision (a
        // fence) only once no write admitted before it is still on its way.
        let mut write_in_flight = None;
        if let Some(shard) = decision.shard {
            if !is_safe(req.method()) {
                if topo.is_fenced(shard) {
                    return Err(self.fenced(topo, route.set, shard));
                }
                self.self_fence
                    .check()
                    .map_err(|why| self.self_fenced(topo, route.set, shard, why))?;
                write_in_flight = Some(WriteInFlight::new(snapshot.clone()));
            }
        }

        // A declared length past the limit is refused before anything is sent; a streamed
        // body is counted as it goes (`RequestBody`).
        if let Some(max) = route.max_body_bytes {
            if http_body::Body::size_hint(req.body()).lower() > max {
                return Err(ProxyError::PayloadTooLarge(max));
            }
        }

        // A read whose serving IDC's breaker is open while its pool has no backend in service
        // at all spills at once (§5: reads spill when the serving pool is known dead), admitted
        // by the target's breaker instead. An open breaker over a pool that still answers
        // refuses (503 `circuit_open`), as does every other refusal.
        let (permit, spill_first) = match self.admission.admit(topo, decision.route, decision.idc) {
            Ok(p) => (p, None),
            Err(refusal @ Refusal::CircuitOpen { .. }) => {
                let dead = || {
                    let pool = topo.idc(decision.idc).pool(route.set);
                    pool.iter().all(|b| b.avoided())
                };
                let target = (is_safe(req.method()) && dead())
                    .then(|| spill_target(topo, decision, decision.idc, route.set))
                    .flatten();
                let Some(n) = target else {
                    return Err(ProxyError::Refused(refusal));
                };
                let permit = self
                    .admission
                    .admit(topo, decision.route, n)
                    .map_err(ProxyError::Refused)?;
                (permit, Some(n))
            }
            Err(refusal) => return Err(ProxyError::Refused(refusal)),
        };
        Ok(Admitted {
            permit,
            spill_first,
            write_in_flight,
        })
    }

    /// Prepare: the upstream request (the spill and upgrade headers), the client's side of an
    /// upgrade, and the forward policy (which says whether a small body is kept for a 421).
    /// Not async: the one wait it could have, a small body read whole, is the caller's, so
    /// the request's pieces are not held in a future of their own.
    #[allow(clippy::too_many_arguments)] // the request's pieces, each used once
    fn prepare<'a, 't>(
        &self,
        topo: &'t Topology,
        req: &mut Request<ClientBody>,
        decision: &Decision,
        spill_first: Option<IdcId>,
        budget: &'a crate::data::admission::RetryBudget<'a>,
        client_ip: &HeaderValue,
        ids: &headers::Ids,
        outcome: &mut Outcome,
    ) -> Result<Prepared<'a, 't>, ProxyError> {
        let route = topo.route(decision.route);
        // A WebSocket handshake on a route that allows it keeps its upgrade headers and gets a
        // connection of its own; elsewhere they are stripped with the other hop-by-hop headers
        // and the request goes upstream as a plain GET.
        let upgrade = if route.websocket && upgrade::is_websocket_upgrade(req) {
            req.headers()
                .get(http::header::UPGRADE)
                .cloned()
                .map(|v| (v, hyper::upgrade::on(&mut *req)))
        } else {
            None
        };
        let method = req.method().clone();
        let (mut upstream, mut stamp) =
            self.upstream_request(topo, req, decision, client_ip, ids, outcome)?;
        // A sharded request may meet a backend that knows a newer owner (421): its small body
        // is kept to be sent there (`misroute`; read whole by the caller).
        let keep_copy = decision.shard.is_some() && upgrade.is_none();
        if let Some(n) = spill_first {
            stamp.idc = Some(Cow::Borrowed(&topo.idc(n).header));
            stamp.spill = true;
        }
        if let Some((value, _)) = &upgrade {
            upgrade::keep_upgrade_headers(upstream.headers_mut(), value.clone());
        }
        let policy = ForwardPolicy {
            connect_timeout: self.settings.connect_timeout,
            deadline: tokio::time::Instant::now() + route.timeout,
            retries: route.retries,
            idempotent: is_idempotent(&method),
            retry_budget: Some(budget),
            upgrade: upgrade.is_some(),
            keep_copy,
        };
        Ok(Prepared {
            upstream,
            stamp,
            upgrade,
            policy,
        })
    }

    /// Exchange: the request is sent to its serving IDC (or the IDC admission spilled it to),
    /// and after each failed attempt where [`hop::next_hop`] says: the next IDC, the IDC a
    /// newer snapshot serves it from, or nowhere. `serving_dead` is set when the serving IDC's
    /// pool had no backend in service: nothing was sent there.
    async fn exchange(
        &self,
        trip: &Trip<'_>,
        upstream: &mut Request<RequestBody>,
        stamp: &mut Stamp<'_>,
        serving_dead: &mut bool,
    ) -> Result<(Answered, Landed), ForwardError> {
        let (topo, decision, route) = (&**trip.snapshot, trip.decision, trip.route);
        let mut idc = trip.spill_first.unwrap_or(decision.idc);
        let mut set = route.set;
        let mut spilled = trip.spill_first.is_some();
        // A newer snapshot this request was re-routed by (see below), once.
        let mut moved: Option<Arc<Topology>> = None;
        loop {
            let t: &Topology = moved.as_deref().unwrap_or(topo);
            let pool = t.idc(idc).pool(set);
            let sent_at = Instant::now();
            let (err, resendable) = match forward(pool, upstream, stamp, trip.policy).await {
                Ok(answered) => {
                    let at = t.idc(idc);
                    self.request_metrics
                        .upstream(t, idc, set, sent_at.elapsed().as_secs_f64());
                    let landed = Landed {
                        idc: at.name.clone(),
                        idc_id: moved.is_none().then_some(idc),
                        idc_header: at.header.clone(),
                        spilled,
                        moved: moved.is_some(),
                    };
                    return Ok((answered, landed));
                }
                Err(failed) => failed,
            };
            if !spilled && moved.is_none() {
                *serving_dead = matches!(err, ForwardError::NoneInService);
            }
            // Nothing of the answer reached the client yet: the request may still go elsewhere.
            let attempt = hop::Attempt {
                resendable,
                spilled,
                moved: moved.is_some(),
                safe: trip.safe,
                idempotent: trip.policy.idempotent,
            };
            let next = hop::next_hop(
                &err,
                attempt,
                || spill_target(t, decision, idc, set),
                || self.moved_to(t, decision, idc, route, !trip.safe),
            );
            match (next, resendable) {
                (NextHop::Spill(n), true) => {
                    tracing::debug!(from = %t.idc(idc).name, to = %t.idc(n).name, "spilling a read to the next IDC");
                    stamp.idc = Some(Cow::Owned(t.idc(n).header.clone()));
                    stamp.spill = true;
                    idc = n;
                    spilled = true;
                }
                (NextHop::Replay((latest, n, s)), true) => {
                    tracing::debug!(from = %t.idc(idc).name, to = %latest.idc(n).name, revision = latest.revision, "replaying an idempotent request in the shard's new serving IDC");
                    stamp.idc = Some(Cow::Owned(latest.idc(n).header.clone()));
                    stamp.epoch = Some(Cow::Owned(latest.epoch_header.clone()));
                    if let Some(v) = decision.shard.and_then(|s| latest.owner_epoch_header(s)) {
                        stamp.owner_epoch = Some(Cow::Owned(v.clone()));
                    }
                    idc = n;
                    set = s;
                    moved = Some(latest);
                }
                _ => return Err(err),
            }
        }
    }

    /// Answer (once the IDC that answered is noted and a 421 naming a newer owner corrected):
    /// an upgrade switched, or the upstream response head cleaned for the client. Not async,
    /// like `prepare`: the exchange's result is not held in a future of its own.
    fn answer(
        &self,
        trip: &Trip<'_>,
        resp: Response<UpstreamBody>,
        lease: Lease,
        landed: &Landed,
        upgrade: ClientUpgrade,
        write_in_flight: Option<WriteInFlight>,
    ) -> Response<ResponseBody> {
        let (decision, route) = (trip.decision, trip.route);
        if let Some((_, client)) = upgrade {
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                // An upgraded connection on a sharded route carries writes for as long as it
                // lives: it counts as a write in flight under this snapshot, and is closed as
                // soon as its shard is fenced or served by another IDC.
                let owner = decision.shard.map(|shard| {
                    let guard = write_in_flight
                        .unwrap_or_else(|| WriteInFlight::new(trip.snapshot.clone()));
                    (shard, landed.idc.clone(), guard)
                });
                return self.switch_protocols(resp, client, lease, owner);
            }
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, ResponseBody::upstream(body, route.timeout, lease))
    }

    /// After the request failed in `from`: the newest snapshot, when it serves the request's
    /// shard (or, unsharded, its global traffic) from another IDC, with that IDC and the
    /// route's set there.
    fn moved_to(
        &self,
        topo: &Topology,
        d: &Decision,
        from: IdcId,
        route: &crate::control::topology::Route,
        write: bool,
    ) -> Option<(Arc<Topology>, IdcId, crate::control::topology::SetId)> {
        let latest = self.topology.load_full()?;
        // A write (PUT, DELETE) is replayed only where a fresh one would be admitted: not
        // into a fence, and not past this gateway's own fence.
        if write
            && (d.shard.is_some_and(|s| latest.is_fenced(s)) || self.self_fence.check().is_err())
        {
            return None;
        }
        let now = match d.shard {
            // A reshard renumbers shards: the old number means nothing in the new snapshot.
            Some(shard) if latest.shard_count == topo.shard_count => latest.serving(shard)?,
            Some(_) => return None,
            None => latest.global_idc()?,
        };
        if latest.idc(now).name == topo.idc(from).name {
            return None;
        }
        let set = latest.route(latest.route_by_name(&route.name)?).set;
        (latest.set(set).name == topo.set(route.set).name).then_some((latest.clone(), now, set))
    }

    /// The backend switched protocols: answer the client's handshake with its 101 and relay
    /// bytes between the two connections once hyper hands them over.
    fn switch_protocols(
        &self,
        mut resp: Response<UpstreamBody>,
        client: hyper::upgrade::OnUpgrade,
        lease: Lease,
        owner: Option<(Shard, Arc<String>, WriteInFlight)>,
    ) -> Response<ResponseBody> {
        let upstream = hyper::upgrade::on(&mut resp);
        let cell = self.topology.clone();
        let ownership_moves = async move {
            let Some((shard, idc, guard)) = owner else {
                return std::future::pending().await;
            };
            upgrade::until_moved(&cell, shard, &idc).await;
            tracing::info!(shard = shard.0, idc = %idc, "closing an upgraded connection: its shard is fenced or moved");
            drop(guard);
        };
        let (mut parts, _) = resp.into_parts();
        let protocol = parts.headers.get(http::header::UPGRADE).cloned();
        headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = protocol {
            upgrade::keep_upgrade_headers(&mut parts.headers, protocol);
        }
        parts.version = Version::HTTP_11;
        tokio::spawn(upgrade::relay(
            client,
            upstream,
            self.settings.upgrade_idle,
            lease,
            ownership_moves,
        ));
        Response::from_parts(parts, ResponseBody::empty())
    }

    /// A clean re-serialisation of the client's request for the upstream: origin-form URI,
    /// HTTP/1.1, hop-by-hop headers gone; the gateway's headers in the stamp beside it.
    fn upstream_request<'t>(
        &self,
        topo: &'t Topology,
        req: &mut Request<ClientBody>,
        decision: &Decision,
        client_ip: &HeaderValue,
        ids: &headers::Ids,
        outcome: &mut Outcome,
    ) -> Result<(Request<RequestBody>, Stamp<'t>), ProxyError> {
        let route_limit = topo.route(decision.route).max_body_bytes;
        // Taken from the pipeline's state, which keeps an empty request in its place: the
        // client's request is borrowed through the phases, not moved into each one's future.
        let (mut parts, body) =
            std::mem::replace(req, Request::new(ClientBody::Empty)).into_parts();
        // Read before the hop-by-hop strip: a `Connection` naming `host` does not unset it.
        let host = headers::request_authority(&parts.uri, &parts.headers);
        headers::strip_hop_by_hop(&mut parts.headers);
        let stamp = stamp(
            topo,
            decision,
            host,
            &parts.headers,
            client_ip,
            ids,
            self.settings.scheme,
        );
        outcome.shard_header.clone_from(&stamp.shard);

        // Origin form; the path and query bytes are shared, not copied.
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(uri_parts)
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;
        parts.version = Version::HTTP_11;
        let body = if body_is_empty(&parts.method, &body) {
            RequestBody::Empty
        } else {
            RequestBody::client(body, self.settings.body_timeout, route_limit)
        };
        Ok((Request::from_parts(parts, body), stamp))
    }

    /// The refusal of a write while this gateway's own fence is closed, counted like a
    /// fenced write (`x-shardgate-reason: fenced`); `/status` says why.
    fn self_fenced(
        &self,
        topo: &Topology,
        set: SetId,
        shard: Shard,
        why: crate::control::self_fence::Closed,
    ) -> ProxyError {
        self.request_metrics.fenced(topo, set);
        ProxyError::Refused(Refusal::SelfFenced {
            shard: shard.0,
            why: why.as_str(),
            retry_after_s: 1,
        })
    }

    /// The refusal of a fenced write, counted in `shardgate_refused_total`.
    fn fenced(&self, topo: &Topology, set: SetId, shard: Shard) -> ProxyError {
        self.request_metrics.fenced(topo, set);
        let retry_after_s = (topo.failover.fence.as_millis().div_ceil(1000) as u32).max(1);
        ProxyError::Refused(Refusal::Fenced {
            shard: shard.0,
            retry_after_s,
        })
    }

    fn route_error(&self, topo: &Topology, e: RouteError, outcome: &mut Outcome) -> ProxyError {
        let name = |id| topo.route(id).name.to_string();
        let mut note_route = |id| outcome.route_id = Some(id);
        match e {
            RouteError::NoRoute => ProxyError::NoRoute,
            RouteError::MethodNotAllowed => ProxyError::MethodNotAllowed,
            RouteError::MissingKey(id) => {
                note_route(id);
                ProxyError::MissingKey(name(id))
            }
            RouteError::KeyTooLong(id) => {
                note_route(id);
                ProxyError::InvalidKey {
                    route: name(id),
                    why: "longer than 256 bytes",
                }
            }
            RouteError::NoServingIdc(id, shard) => {
                note_route(id);
                outcome.shard = shard.map(|s| s.0);
                ProxyError::NoServingIdc(match shard {
                    Some(s) => format!("shard {}", s.0),
                    None => format!("route `{}`", name(id)),
                })
            }
        }
    }

    fn record(
        &self,
        o: &Outcome,
        status: u16,
        start: Instant,
        request_id: &HeaderValue,
        snapshot: Option<&Topology>,
    ) {
        let elapsed = start.elapsed();
        let names = o.route_and_set(snapshot);
        match (snapshot, o.route_id, o.idc_id) {
            (Some(topo), Some(route), Some(idc)) => {
                self.request_metrics
                    .request(topo, route, idc, status, elapsed.as_secs_f64());
            }
            _ => {
                let empty = || Arc::new(String::new());
                let labels = RouteLabels {
                    route: names.map_or_else(empty, |n| n.0.clone()),
                    set: names.map_or_else(empty, |n| n.1.clone()),
                    idc: o.idc.clone().unwrap_or_else(empty),
                };
                self.request_metrics
                    .request_by_labels(labels, status, elapsed.as_secs_f64());
            }
        }
        tracing::info!(
            target: "shardgate::access",
            route = names.map_or(EMPTY, |n| n.0.as_str()),
            set = names.map_or(EMPTY, |n| n.1.as_str()),
            shard = o.shard,
            idc = o.idc.as_deref().map_or(EMPTY, |s| s.as_str()),
            status,
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or(EMPTY),
            topology_rev = snapshot.map(|t| t.revision),
            spilled = o.spilled,
            reason = o.reason.unwrap_or(EMPTY),
        );
    }
}

/// A request's failure as its answer, noted in `outcome`; a failure whose detail the client
/// is not shown (the backend's address, the underlying error) is logged for the operator.
fn failed(
    e: ProxyError,
    topo: &Topology,
    outcome: &mut Outcome,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    outcome.reason = e.reason();
    if let Some(error) = e.hidden_detail() {
        tracing::warn!(
            route = outcome
                .route_and_set(Some(topo))
                .map_or(EMPTY, |n| n.0.as_str()),
            idc = outcome.idc.as_deref().map_or(EMPTY, |s| s.as_str()),
            request_id = request_id.to_str().unwrap_or(EMPTY),
            error,
            "upstream failed"
        );
    }
    e.to_response(request_id)
}

/// Whether an exchange counts against the breaker of the serving IDC's set. System failures
/// only: no connection, a broken exchange, a timeout, or a 5xx the backend chose. A 4xx is the
/// business answering, a body over the route's limit or broken off is the client's doing, and an answer from
/// another IDC means the serving IDC could not serve it. (A read spilled at once past an open
/// breaker answers to the target's breaker.)
fn breaker_failure(
    result: &Result<Result<(Answered, Landed), ForwardError>, tokio::time::error::Elapsed>,
    spill_first: Option<IdcId>,
) -> bool {
    match result {
        Ok(Ok(((resp, _, _), landed))) => {
            (landed.spilled && spill_first.is_none())
                || landed.moved
                || resp.status().is_server_error()
        }
        // The client's body failing is no system failure (DESIGN.md §5).
        Ok(Err(ForwardError::BodyTooLarge(_) | ForwardError::ClientBody(_))) => false,
        _ => true,
    }
}

/// How a failed upstream exchange is answered.
fn forward_error(e: ForwardError, route: &crate::control::topology::Route) -> ProxyError {
    match e {
        ForwardError::Connect(e) => ProxyError::UpstreamConnect(e),
        ForwardError::NoneInService => ProxyError::NoneInService,
        ForwardError::Protocol(e) => ProxyError::UpstreamProtocol(e),
        ForwardError::BodyTooLarge(max) => ProxyError::PayloadTooLarge(max),
        ForwardError::ClientBody(_) => {
            ProxyError::BadRequest("the request body broke off or stalled")
        }
        ForwardError::Timeout => ProxyError::UpstreamTimeout(route.timeout.as_millis() as u64),
    }
}

/// The answer to a head the gate refused.
fn refusal_error(refusal: crate::data::server::gate::Refusal) -> ProxyError {
    use crate::data::server::gate::Refusal;
    match refusal {
        Refusal::HeadTooLarge => ProxyError::HeaderTooLarge,
        Refusal::BothLengths => ProxyError::BadRequest(
            "the request has both Content-Length and Transfer-Encoding (a request smuggling pattern)",
        ),
        Refusal::ConflictingLengths => {
            ProxyError::BadRequest("the request has conflicting Content-Length values")
        }
    }
}

/// A request without a body is sent without one (no chunked framing upstream).
fn body_is_empty(method: &Method, body: &ClientBody) -> bool {
    use http_body::Body;
    body.is_end_stream()
        || (matches!(*method, Method::GET | Method::HEAD) && body.size_hint().exact() == Some(0))
}

/// The next IDC in the shard's failover order (or the global order) that is active and has a
/// backend in service for the set.
fn spill_target(
    topo: &Topology,
    d: &Decision,
    from: IdcId,
    set: crate::control::topology::SetId,
) -> Option<IdcId> {
    let order: Vec<IdcId> = match d.shard {
        Some(shard) => topo.failover_order(shard).to_vec(),
        None => (0..topo.idcs.len() as u16).map(IdcId).collect(),
    };
    let pos = order.iter().position(|&i| i == from).unwrap_or(0);
    order
        .iter()
        .cycle()
        .skip(pos + 1)
        .take(order.len().saturating_sub(1))
        .copied()
        .find(|&i| {
            i != from
                && topo.idc(i).state == IdcState::Active
                && topo.idc(i).pool(set).iter().any(|b| !b.avoided())
        })
}

/// Routes match, and backends get, the normalised path (`route::path`): `/catalog/../orders`
/// is `/orders` for both, so no path reaches a backend through another route's decision.
fn normalize_path<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let path = match crate::data::route::path::normalize(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(path)) => path,
        Err(e) => return Err(ProxyError::BadRequest(e.reason())),
    };
    let target = match req.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let unusable = || ProxyError::BadRequest("the request path cannot be normalised");
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(target).map_err(|_| unusable())?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| unusable())?;
    Ok(())
}

/// Absolute-form confusion: a request target naming one host and a `Host` header naming
/// another could be routed by one and served by the other, so it is refused (RFC 9112 §3.2.2
/// lets a server prefer the target; a gateway that routes by host must not guess). HTTP/2
/// requests carry `:authority` in the target, and a `Host` beside it must agree the same way.
fn check_authority<B>(req: &Request<B>) -> Result<(), ProxyError> {
    // Looked up only for a target with an authority (absolute form, HTTP/2): most have none.
    let Some(target) = req.uri().authority() else {
        return Ok(());
    };
    let Some(host) = req.headers().get(http::header::HOST) else {
        return Ok(());
    };
    if host
        .as_bytes()
        .eq_ignore_ascii_case(target.as_str().as_bytes())
    {
        Ok(())
    } else {
        Err(ProxyError::BadRequest(
            "the request target's authority and the Host header disagree",
        ))
    }
}

/// The gateway's headers for a request decided under `topo` (DESIGN.md §2): `host` is the
/// request's authority (read before the hop-by-hop strip), `headers` the client's after it.
pub(crate) fn stamp<'t>(
    topo: &'t Topology,
    decision: &Decision,
    host: Option<HeaderValue>,
    headers: &http::HeaderMap,
    client_ip: &HeaderValue,
    ids: &headers::Ids,
    scheme: &'static str,
) -> Stamp<'t> {
    Stamp {
        host,
        forwarded_for: Some(headers::forwarded_for(headers, client_ip)),
        forwarded_proto: Some(HeaderValue::from_static(scheme)),
        request_id: Some(ids.request_id.clone()),
        traceparent: ids.traceparent.clone(),
        shard: decision.shard.map(|s| topo.shard_header(s)),
        idc: Some(Cow::Borrowed(&topo.idc(decision.idc).header)),
        epoch: Some(Cow::Borrowed(&topo.epoch_header)),
        owner_epoch: decision
            .shard
            .and_then(|s| topo.owner_epoch_header(s))
            .map(Cow::Borrowed),
        spill: false,
        reforward: false,
    }
}

/// The two-IDC topology the pipeline's unit tests share: `sh` and `bj`, 16 shards, one `orders`
/// route in set `core` keyed by `x-user-id`, revision 7.
#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
fn test_topology() -> Topology {
    use crate::control::topology::{build, BuildContext, Overrides, RawTopology};
    let doc = RawTopology::parse(
        "cluster = \"t\"\nshard_count = 16\n[sets.core]\n\
         [[idcs]]\nname = \"sh\"\npools.core = [\"127.0.0.1:7001\"]\n\
         [[idcs]]\nname = \"bj\"\npools.core = [\"127.0.0.1:7002\"]\n\
         [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\n",
    )
    .unwrap();
    let ctx = BuildContext {
        revision: 7,
        ..BuildContext::default()
    };
    build(
        doc,
        &Overrides::default(),
        &ctx,
        &crate::data::upstream::Upstreams::new(),
    )
    .unwrap()
}
