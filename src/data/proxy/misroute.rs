//! Misroute correction (DESIGN.md §12), the step after a backend answered: a 421 that names a
//! newer owner (`x-shardgate-owner`, `x-shardgate-owner-epoch`) sends the request again, once,
//! to that owner's pool, marked `x-shardgate-reforward: 1`. The backend's 421 says it did not
//! apply the request (the contract in docs/backends.md), so a write may go again too.
//!
//! A write's body is a stream: to send it twice it is read whole first, up to
//! [`KEPT_BODY_MAX`] with a declared length. A larger body, or one of unknown length, streams
//! as before and is not kept; a 421 for it is answered to the client (421 `misrouted`).

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt as _;

use super::{forward_error, Gateway};
use crate::control::topology::{IdcId, Route, Shard, Topology};
use crate::data::error::ProxyError;
use crate::data::forward::{forward, Answered, ForwardPolicy};
use crate::data::headers;
use crate::data::upstream::body::{BoxError, RequestBody, UpstreamBody};
use crate::data::upstream::Lease;
use crate::data::upstream::Stamp;
use crate::telemetry::ReforwardLabels;

/// The largest body read whole so a write can be sent again after a 421: small enough that
/// holding it costs little (one buffer per write in flight), large enough for most API calls.
pub const KEPT_BODY_MAX: u64 = 64 * 1024;

/// What a 421 from a backend leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Misdirected {
    /// Not about ownership, or about an owner epoch no newer than ours: the client gets the
    /// backend's answer unchanged.
    PassThrough,
    /// A newer owner this snapshot knows: send the request there once, with its epoch.
    Reforward { to: IdcId, epoch: u64 },
    /// A newer owner, but the request cannot go there: the client gets 421 `misrouted`.
    Refuse(String),
}

/// The rule (pure): `kept` says whether a copy of the request is at hand.
pub fn misdirected(topo: &Topology, shard: Shard, answer: &HeaderMap, kept: bool) -> Misdirected {
    let text = |name| answer.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let owner = text(headers::OWNER).map(str::trim);
    let epoch = text(headers::OWNER_EPOCH).and_then(|v| v.trim().parse::<u64>().ok());
    let (Some(owner), Some(epoch)) = (owner, epoch) else {
        return Misdirected::PassThrough;
    };
    if epoch <= topo.owner_epoch(shard) {
        return Misdirected::PassThrough;
    }
    let Some(to) = topo.idc_by_name(owner) else {
        return Misdirected::Refuse(format!(
            "shard {}: a backend names `{owner}` as its owner since epoch {epoch}, an IDC this gateway does not know",
            shard.0
        ));
    };
    if !kept {
        return Misdirected::Refuse(format!(
            "shard {}: its owner is {owner} since epoch {epoch}; the request's body (over {KEPT_BODY_MAX} bytes, or of unknown length) was not kept to send it there",
            shard.0
        ));
    }
    Misdirected::Reforward { to, epoch }
}

/// The body is the client's, with a declared length up to [`KEPT_BODY_MAX`]: one
/// [`keep_small_body`] reads whole.
pub fn small_body(req: &Request<RequestBody>) -> bool {
    matches!(req.body(), RequestBody::Client { .. })
        && req
            .body()
            .size_hint()
            .exact()
            .is_some_and(|n| n <= KEPT_BODY_MAX)
}

/// Reads a small body whole (declared length up to [`KEPT_BODY_MAX`]), so the request can be
/// sent again; anything else is left streaming. Bounded by `limit` in all.
pub async fn keep_small_body(
    req: Request<RequestBody>,
    limit: Duration,
) -> Result<Request<RequestBody>, ProxyError> {
    if !small_body(&req) {
        return Ok(req);
    }
    let (parts, body) = req.into_parts();
    let read = match tokio::time::timeout(limit, read_whole(body)).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => {
            return Err(
                match e.downcast_ref::<crate::data::upstream::body::BodyTooLarge>() {
                    Some(too_large) => ProxyError::PayloadTooLarge(too_large.0),
                    None => ProxyError::BadRequest("the request body broke off or stalled"),
                },
            )
        }
        Err(_) => return Err(ProxyError::BadRequest("the request body stalled")),
    };
    Ok(Request::from_parts(parts, RequestBody::Kept(Some(read))))
}

/// The body's bytes: a body that arrives in one frame (most small ones) is kept as that frame,
/// with no list of frames and no copy; one in several frames is joined in one buffer.
async fn read_whole(mut body: RequestBody) -> Result<Bytes, BoxError> {
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers: not sent again (nor were they by `collect().to_bytes()`)
        };
        match (&mut joined, first.take()) {
            (Some(j), _) => j.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(f)) => {
                let mut j = BytesMut::with_capacity(f.len() + data.len());
                j.extend_from_slice(&f);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(match joined {
        Some(j) => j.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// What answered the request in the end, when a 421 sent it to another IDC.
pub struct Reforwarded {
    pub resp: Response<UpstreamBody>,
    pub lease: Lease,
    pub idc: IdcId,
}

impl Gateway {
    /// After a 421 from `from` (the IDC the request was sent to): `Ok(None)` passes the 421 to
    /// the client as it is; `Ok(Some)` is the owner's answer to the request sent again.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn correct_misroute(
        &self,
        topo: &Topology,
        route: &Route,
        shard: Shard,
        from: &std::sync::Arc<String>,
        answer: &HeaderMap,
        copy: Option<(Request<RequestBody>, &Stamp<'_>)>,
        policy: ForwardPolicy<'_>,
    ) -> Result<Option<Reforwarded>, ProxyError> {
        let (to, epoch) = match misdirected(topo, shard, answer, copy.is_some()) {
            Misdirected::PassThrough => return Ok(None),
            Misdirected::Refuse(why) => return Err(ProxyError::Misrouted(why)),
            Misdirected::Reforward { to, epoch } => (to, epoch),
        };
        let Some((mut req, stamp)) = copy else {
            return Err(ProxyError::Misrouted(format!(
                "shard {}: the request was not kept",
                shard.0
            )));
        };
        let owner = topo.idc(to);
        tracing::info!(shard = shard.0, from = %from, to = %owner.name, epoch, our_epoch = topo.owner_epoch(shard), "a backend named a newer owner (421): sending the request there once");
        let stamp = Stamp {
            idc: Some(Cow::Borrowed(&owner.header)),
            owner_epoch: Some(Cow::Owned(HeaderValue::from(epoch))),
            reforward: true,
            ..stamp.clone()
        };
        self.metrics
            .reforwarded
            .get_or_create(&ReforwardLabels {
                route: route.name.clone(),
                from: from.clone(),
                to: owner.name.clone(),
            })
            .inc();
        let policy = ForwardPolicy {
            keep_copy: false,
            ..policy
        };
        let answered: Answered = match tokio::time::timeout_at(
            policy.deadline,
            forward(owner.pool(route.set), &mut req, &stamp, policy),
        )
        .await
        {
            Ok(Ok(answered)) => answered,
            Ok(Err((e, _))) => return Err(forward_error(e, route)),
            Err(_) => {
                return Err(forward_error(
                    crate::data::forward::ForwardError::Timeout,
                    route,
                ))
            }
        };
        let (resp, lease, _) = answered;
        // Never a second time: whoever is confused now, the client decides what to do.
        if resp.status() == StatusCode::MISDIRECTED_REQUEST {
            return Err(ProxyError::Misrouted(format!(
                "shard {}: {} (named the owner at epoch {epoch}) refused the request too",
                shard.0, owner.name
            )));
        }
        Ok(Some(Reforwarded {
            resp,
            lease,
            idc: to,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    fn topology() -> Topology {
        super::super::test_topology()
    }

    fn answer(owner: &str, epoch: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::OWNER, owner.parse().unwrap());
        h.insert(headers::OWNER_EPOCH, epoch.parse().unwrap());
        h
    }

    #[test]
    fn only_a_newer_known_owner_with_the_request_at_hand_is_tried() {
        let t = topology();
        let shard = Shard(3);
        assert_eq!(t.owner_epoch(shard), 7);
        let bj = t.idc_by_name("bj").unwrap();
        assert_eq!(
            misdirected(&t, shard, &answer("bj", "8"), true),
            Misdirected::Reforward { to: bj, epoch: 8 }
        );
        for older_or_same in ["7", "1", "0"] {
            assert_eq!(
                misdirected(&t, shard, &answer("bj", older_or_same), true),
                Misdirected::PassThrough
            );
        }
        for not_ours in [HeaderMap::new(), answer("bj", "soon"), answer("bj", "-9")] {
            assert_eq!(
                misdirected(&t, shard, &not_ours, true),
                Misdirected::PassThrough
            );
        }
        assert!(matches!(
            misdirected(&t, shard, &answer("nowhere", "8"), true),
            Misdirected::Refuse(why) if why.contains("nowhere")
        ));
        assert!(matches!(
            misdirected(&t, shard, &answer("bj", "8"), false),
            Misdirected::Refuse(why) if why.contains("not kept")
        ));
    }
}
