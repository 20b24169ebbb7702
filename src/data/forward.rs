//! Upstream forwarding: power-of-two-choices on in-flight requests among the backends of a pool
//! in service (healthy and not ejected: no fail-open), connect timeouts, safe retries on another
//! backend of the same IDC, and the passive outlier signals (connect errors, timeouts, 5xx)
//! that feed backend health. The pools themselves are `upstream`'s.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body as _;

use crate::data::upstream::body::{RequestBody, UpstreamBody};
use crate::data::upstream::Stamp;
use crate::data::upstream::{Backend, Lease};

/// Where a retry is paid for: asked once before each retry, and no retry is made when it says
/// no. The set's retry budget (`admission`) is the one the proxy hands in.
pub trait RetryBudget: Sync {
    fn try_retry(&self) -> bool;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made: nothing was sent.
    #[error("upstream connect failed: {0}")]
    Connect(String),
    /// The exchange failed after the request was (possibly) sent.
    #[error("upstream exchange failed: {0}")]
    Protocol(String),
    /// No backend of the pool is in service: nothing was tried (no fail-open).
    #[error("no backend of the pool is in service (failing health checks or ejected)")]
    NoneInService,
    /// No response head before the route's deadline.
    #[error("the upstream did not answer in time")]
    Timeout,
    /// The client's body went past the route's limit while it streamed upstream: the
    /// exchange was abandoned and the backend never got a whole request.
    #[error("the request body went past {0} bytes")]
    BodyTooLarge(u64),
    /// The client's body broke off or stalled while it streamed upstream: the client's
    /// failure, not the backend's (no health or breaker count).
    #[error("the request body broke off or stalled: {0}")]
    ClientBody(String),
}

/// How one forward may behave.
#[derive(Clone, Copy)]
pub struct ForwardPolicy<'a> {
    pub connect_timeout: Duration,
    /// When the route's time is up: an exchange still waiting for its response head then is a
    /// timeout, counted against the backend.
    pub deadline: tokio::time::Instant,
    /// Extra attempts on other backends of the same pool.
    pub retries: u32,
    /// GET/HEAD/OPTIONS/PUT/DELETE…: may be sent again after a failure once sent.
    pub idempotent: bool,
    /// The set's retry budget: every retry spends from it, and none is made when it is empty,
    /// so a failing set cannot multiply its own load.
    pub retry_budget: Option<&'a dyn RetryBudget>,
    /// An upgrade handshake: always a new connection, able to hand itself over on a 101,
    /// never pooled afterwards.
    pub upgrade: bool,
    /// Keep the request whole (its head, and its body when empty or kept whole) and say so
    /// with the answer: a backend's 421 sends it again to the owner it names
    /// (`proxy::misroute`). Never used for a retry of a non-idempotent request.
    pub keep_copy: bool,
}

/// A backend's answer, the lease on its connection, and whether the request is still whole to
/// send again (`ForwardPolicy::keep_copy`, or a replayable request).
pub type Answered = (Response<UpstreamBody>, Lease, bool);

/// Picks the backend with fewer requests in flight out of two random ones, among those in
/// service and not yet tried. `None` when none is left: backends out of service are never
/// tried (no fail-open to dead backends).
fn pick(pool: &[Arc<Backend>], tried: u64) -> Option<usize> {
    let usable = |i: usize| (i >= 64 || tried & (1 << i) == 0) && !pool[i].avoided();
    // One pass to count them, keeping the first: a pool with one usable backend (or none)
    // is not looked through again.
    let (mut candidates, mut first) = (0, None);
    for i in (0..pool.len()).filter(|&i| usable(i)) {
        first = first.or(Some(i));
        candidates += 1;
    }
    let nth = |n: usize| (0..pool.len()).filter(|&i| usable(i)).nth(n);
    match candidates {
        0 => None,
        1 => first,
        _ => {
            let a = fastrand::usize(..candidates);
            let mut b = fastrand::usize(..candidates - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a)?, nth(b)?);
            Some(if pool[b].inflight() < pool[a].inflight() {
                b
            } else {
                a
            })
        }
    }
}

/// Sends `req`, with the gateway's headers in `stamp`, to one backend of `pool`. Retries on
/// another backend when nothing was sent (connect failure, or a pooled connection that closed
/// before taking the request), and, for idempotent requests without a body, when the exchange
/// failed before a response head.
/// Only backends in service are tried. The request stays the caller's (borrowed, not moved
/// through each phase's future); on failure, forward says whether it can still be sent:
/// nothing of it was sent, or it is idempotent and bodiless (its head is whole).
pub async fn forward(
    pool: &[Arc<Backend>],
    req: &mut Request<RequestBody>,
    stamp: &Stamp<'_>,
    policy: ForwardPolicy<'_>,
) -> Result<Answered, (ForwardError, bool)> {
    let mut tried: u64 = 0;
    let mut attempts_left = policy.retries + 1;
    let mut last_err = if pool.is_empty() {
        ForwardError::Connect("the pool has no backends".into())
    } else {
        ForwardError::NoneInService
    };
    // A request without a body can be rebuilt for a retry after it was sent.
    let replayable = policy.idempotent && req.body().is_end_stream();
    while attempts_left > 0 {
        let Some(i) = pick(pool, tried) else { break };
        // Tries that sent nothing on a stale pooled connection are given back and are not
        // retries; every other attempt after the first is one.
        let is_retry = attempts_left <= policy.retries;
        if is_retry && !policy.retry_budget.is_none_or(|b| b.try_retry()) {
            tracing::debug!(idc = %pool[i].idc, set = %pool[i].set, "retry budget spent: no retry");
            break;
        }
        if i < 64 {
            tried |= 1 << i;
        }
        attempts_left -= 1;
        let backend = &pool[i];
        let mut lease = Lease::new(backend.clone());
        let idle = if policy.upgrade {
            None
        } else {
            backend.take_idle()
        };
        let (mut conn, reused) = match idle {
            Some(s) => (s, true),
            // Boxed: a new connection is the rare path, and its future (TCP, TLS, handshake)
            // would otherwise sit in every request's state.
            None => match Box::pin(backend.connect(policy.connect_timeout, policy.upgrade)).await {
                Ok(s) => (s, false),
                Err(e) => {
                    backend.health.record_connect_failure();
                    tracing::debug!(backend = %backend.addr, idc = %backend.idc, error = %e, "upstream connect failed");
                    last_err = ForwardError::Connect(e);
                    continue;
                }
            },
        };
        if conn.ready().await.is_err() {
            // Closed while idle: nothing was sent; this try does not count.
            attempts_left += u32::from(reused);
            tried &= !(1u64.checked_shl(i as u32).unwrap_or(0));
            continue;
        }
        // The request stays the caller's while it is sent (`Conn::send`), whole when its body
        // is not a stream: besides a retry here, the caller may replay a replayable one in the
        // shard's new serving IDC when a failover happened while it was in flight, and with
        // `keep_copy` the answer says it is whole even when it is not replayable here, for a
        // backend's 421 to send it to another IDC (never a retry here).
        let resendable = req.body().is_resendable();
        let sent = {
            // Pinned where it is made: the timer holds a reference, not a copy of the future.
            let send = std::pin::pin!(conn.send(req, stamp));
            tokio::time::timeout_at(policy.deadline, send).await
        };
        let Ok(sent) = sent else {
            // The route's time is up with no answer: a timeout against this backend.
            backend
                .health
                .record_failure(last_in_service(pool, backend));
            return Err((ForwardError::Timeout, false));
        };
        match sent {
            Ok(resp) => {
                // Passive outlier detection: a 5xx is a failure of the backend, anything else
                // (4xx included: the business answering) ends a run of failures.
                if resp.status().is_server_error() {
                    backend
                        .health
                        .record_failure(last_in_service(pool, backend));
                } else {
                    backend.health.record_success();
                }
                lease.conn = Some(conn);
                let kept = (replayable || policy.keep_copy) && resendable;
                return Ok((resp, lease, kept));
            }
            Err(e) => {
                let err = match (e.body_limit, e.client_fault) {
                    (Some(limit), _) => ForwardError::BodyTooLarge(limit),
                    (None, true) => ForwardError::ClientBody(e.message),
                    (None, false) => ForwardError::Protocol(e.message),
                };
                // A broken exchange is the backend's failure unless the client's body broke it,
                // or a connection from the pool was closed as the request left (the backend's
                // idle close racing it).
                let backend_failed =
                    matches!(err, ForwardError::Protocol(_)) && !(reused && e.closed_early);
                if e.unsent {
                    // Not sent: a stale pooled connection. Retry freely.
                    if reused {
                        attempts_left += 1;
                        tried &= !(1u64.checked_shl(i as u32).unwrap_or(0));
                    }
                } else {
                    if backend_failed {
                        backend
                            .health
                            .record_failure(last_in_service(pool, backend));
                    }
                    // A replayable request is bodiless: it is still whole.
                    if !replayable {
                        return Err((err, false));
                    }
                }
                last_err = err;
            }
        }
    }
    // Whatever failed last, `req` was not sent, or is replayable and whole: it can go again.
    Err((last_err, true))
}

/// No other backend of `pool` is in service (answers never eject the last one).
fn last_in_service(pool: &[Arc<Backend>], backend: &Arc<Backend>) -> bool {
    !pool
        .iter()
        .any(|b| !Arc::ptr_eq(&b.health, &backend.health) && !b.avoided())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::data::upstream::Upstreams;

    #[test]
    fn pick_skips_backends_out_of_service_and_never_fails_open() {
        let up = Upstreams::new();
        let pool: Vec<Arc<Backend>> = (1..=3)
            .map(|p| up.backend("sh", "core", SocketAddr::from(([127, 0, 0, 1], p)), None))
            .collect();
        pool[0].health.record_connect_failure();
        for _ in 0..50 {
            let i = pick(&pool, 0).unwrap();
            assert_ne!(i, 0, "an ejected backend was picked");
        }
        // Tried 1: only 2 is left.
        assert_eq!(pick(&pool, 0b010), Some(2));
        pool[2].health.record_connect_failure();
        assert_eq!(pick(&pool, 0b010), None);
        pool[1].health.record_connect_failure();
        assert_eq!(pick(&pool, 0), None, "a dead pool gets no traffic");
    }

    #[test]
    fn sets_listing_one_address_share_its_health() {
        let up = Upstreams::new();
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let core = up.backend("sh", "core", addr, None);
        let noncore = up.backend("sh", "noncore", addr, None);
        let other_idc = up.backend("bj", "core", addr, None);
        assert!(Arc::ptr_eq(&core.health, &noncore.health));
        assert!(!Arc::ptr_eq(&core.health, &other_idc.health));
        core.health.record_connect_failure();
        assert!(noncore.avoided());
        assert!(!other_idc.avoided());
    }
}
