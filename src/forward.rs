//! Upstream forwarding: pooled HTTP/1.1 keep-alive connections per backend (one pool per
//! (IDC, set, address), shared across snapshots), power-of-two-choices on in-flight requests,
//! connect timeouts, and safe retries on another backend of the same IDC.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::admission::RetryBudget;
use crate::body::RequestBody;
use crate::tls::upstream::UpstreamTls;

type Sender = SendRequest<RequestBody>;

/// Idle connections kept per backend; more are closed when they come back.
const MAX_IDLE_PER_BACKEND: usize = 512;

/// One upstream address in one (IDC, set) pool. Its state outlives snapshots: a reload that
/// keeps the backend keeps its connections and counters.
pub struct Backend {
    pub idc: Arc<String>,
    pub set: Arc<String>,
    pub addr: SocketAddr,
    /// TLS to this backend (its IDC's `tls`), or plain TCP.
    tls: Option<Arc<UpstreamTls>>,
    inflight: AtomicU32,
    /// Passive outlier state: consecutive connect failures and the time (ms since the
    /// process epoch) until which the backend is avoided.
    connect_failures: AtomicU32,
    avoid_until_ms: AtomicU64,
    idle: Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("idc", &self.idc)
            .field("set", &self.set)
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("inflight", &self.inflight.load(Ordering::Relaxed))
            .finish()
    }
}

impl Backend {
    fn new(idc: &str, set: &str, addr: SocketAddr, tls: Option<Arc<UpstreamTls>>) -> Backend {
        Backend {
            idc: Arc::new(idc.to_owned()),
            set: Arc::new(set.to_owned()),
            addr,
            tls,
            inflight: AtomicU32::new(0),
            connect_failures: AtomicU32::new(0),
            avoid_until_ms: AtomicU64::new(0),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map_or(0, |v| v.len())
    }

    /// Avoided after connect failures, for a period that doubles with each failure (100 ms up
    /// to 10 s). Avoided backends are still tried when nothing else is left.
    pub fn avoided(&self) -> bool {
        self.avoid_until_ms.load(Ordering::Relaxed) > clock_ms()
    }

    fn record_connect_failure(&self) {
        let n = self.connect_failures.fetch_add(1, Ordering::Relaxed).min(7);
        let period = (100u64 << n).min(10_000);
        self.avoid_until_ms
            .store(clock_ms() + period, Ordering::Relaxed);
    }

    fn record_connect_success(&self) {
        if self.connect_failures.load(Ordering::Relaxed) != 0 {
            self.connect_failures.store(0, Ordering::Relaxed);
            self.avoid_until_ms.store(0, Ordering::Relaxed);
        }
    }

    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_idle(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE_PER_BACKEND {
                idle.push(sender);
            }
        }
    }

    /// A new connection: TCP, then the TLS handshake when the IDC asks for it, both within
    /// one connect timeout (a backend that accepts but never finishes the handshake is as
    /// unreachable as one that refuses).
    async fn connect(&self, timeout: Duration, upgrades: bool) -> Result<Sender, ForwardError> {
        match tokio::time::timeout(timeout, self.open(upgrades)).await {
            Ok(result) => result,
            Err(_) if self.tls.is_some() => Err(ForwardError::Connect(
                "connect and TLS handshake timed out".into(),
            )),
            Err(_) => Err(ForwardError::Connect("connect timed out".into())),
        }
    }

    async fn open(&self, upgrades: bool) -> Result<Sender, ForwardError> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| ForwardError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let stream = tls.connect(stream, self.addr).await.map_err(|e| {
                    ForwardError::Connect(format!("TLS handshake with {}: {e}", self.addr))
                })?;
                handshake(stream, upgrades).await
            }
            None => handshake(stream, upgrades).await,
        }
    }
}

/// The HTTP/1.1 client handshake over any connection; the connection task is spawned. With
/// `upgrades`, a 101 hands the connection over (`hyper::upgrade::on`) instead of ending it.
async fn handshake<IO>(io: IO, upgrades: bool) -> Result<Sender, ForwardError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ForwardError::Connect(e.to_string()))?;
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

fn clock_ms() -> u64 {
    use std::sync::OnceLock;
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// A backend's in-flight slot and, once the response head arrived, its connection. Dropping it
/// frees the slot (and closes the connection if it was not released).
pub struct Lease {
    backend: Arc<Backend>,
    sender: Option<Sender>,
    /// An upgraded connection belongs to its relay: it never goes back to the pool.
    reusable: bool,
}

impl Lease {
    fn new(backend: Arc<Backend>) -> Lease {
        backend.inflight.fetch_add(1, Ordering::Relaxed);
        Lease {
            backend,
            sender: None,
            reusable: true,
        }
    }

    /// The response ended cleanly: the connection can carry another request.
    pub fn release(mut self) {
        if let Some(sender) = self.sender.take().filter(|_| self.reusable) {
            self.backend.put_idle(sender);
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made: nothing was sent.
    #[error("upstream connect failed: {0}")]
    Connect(String),
    /// The exchange failed after the request was (possibly) sent.
    #[error("upstream exchange failed: {0}")]
    Protocol(String),
    /// The client's body went past the route's limit while it streamed upstream: the
    /// exchange was abandoned and the backend never got a whole request.
    #[error("the request body went past {0} bytes")]
    BodyTooLarge(u64),
}

/// The body limit that ended an exchange, if that is what ended it.
fn body_too_large(e: &hyper::Error) -> Option<u64> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(limit) = c.downcast_ref::<crate::body::BodyTooLarge>() {
            return Some(limit.0);
        }
        cause = c.source();
    }
    None
}

/// A backend's identity: (IDC, set, address, TLS identity or 0 for plain TCP).
type BackendKey = (String, String, SocketAddr, u64);

/// Registry of backends by identity, so that snapshots share pools.
#[derive(Default)]
pub struct Upstreams {
    backends: Mutex<HashMap<BackendKey, Weak<Backend>>>,
}

impl Upstreams {
    pub fn new() -> Upstreams {
        Upstreams::default()
    }

    /// The backend for this identity: the existing one while any snapshot holds it.
    pub fn backend(
        &self,
        idc: &str,
        set: &str,
        addr: SocketAddr,
        tls: Option<&Arc<UpstreamTls>>,
    ) -> Arc<Backend> {
        let tls = tls.cloned();
        let Ok(mut map) = self.backends.lock() else {
            return Arc::new(Backend::new(idc, set, addr, tls));
        };
        let key = (
            idc.to_owned(),
            set.to_owned(),
            addr,
            tls.as_ref().map_or(0, |t| t.id()),
        );
        if let Some(b) = map.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let b = Arc::new(Backend::new(idc, set, addr, tls));
        map.insert(key, Arc::downgrade(&b));
        b
    }
}

/// How one forward may behave.
#[derive(Clone, Copy)]
pub struct ForwardPolicy<'a> {
    pub connect_timeout: Duration,
    /// Extra attempts on other backends of the same pool.
    pub retries: u32,
    /// GET/HEAD/OPTIONS/PUT/DELETE…: may be sent again after a failure once sent.
    pub idempotent: bool,
    /// The set's retry budget: every retry spends from it, and none is made when it is empty,
    /// so a failing set cannot multiply its own load.
    pub retry_budget: Option<&'a RetryBudget<'a>>,
    /// An upgrade handshake: always a new connection, able to hand itself over on a 101,
    /// never pooled afterwards.
    pub upgrade: bool,
}

/// Picks the backend with fewer requests in flight out of two random ones, skipping those
/// already tried and, while others remain, those avoided after connect failures.
fn pick(pool: &[Arc<Backend>], tried: u64) -> Option<usize> {
    let usable = |i: usize, allow_avoided: bool| {
        (i >= 64 || tried & (1 << i) == 0) && (allow_avoided || !pool[i].avoided())
    };
    for allow_avoided in [false, true] {
        let candidates = (0..pool.len())
            .filter(|&i| usable(i, allow_avoided))
            .count();
        if candidates == 0 {
            continue;
        }
        let nth = |n: usize| (0..pool.len()).filter(|&i| usable(i, allow_avoided)).nth(n);
        if candidates == 1 {
            return nth(0);
        }
        let a = fastrand::usize(..candidates);
        let mut b = fastrand::usize(..candidates - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (nth(a)?, nth(b)?);
        return Some(if pool[b].inflight() < pool[a].inflight() {
            b
        } else {
            a
        });
    }
    None
}

/// Sends `req` to one backend of `pool`. Retries on another backend when nothing was sent
/// (connect failure, or a pooled connection that closed before taking the request), and, for
/// idempotent requests without a body, when the exchange failed before a response head.
/// On failure the request comes back when nothing of it was sent, so it may go elsewhere.
pub async fn forward(
    pool: &[Arc<Backend>],
    mut req: Request<RequestBody>,
    policy: ForwardPolicy<'_>,
) -> Result<(Response<Incoming>, Lease), (ForwardError, Option<Request<RequestBody>>)> {
    let mut tried: u64 = 0;
    let mut attempts_left = policy.retries + 1;
    let mut last_err = ForwardError::Connect("the pool has no backends".into());
    // A request without a body can be rebuilt for a retry after it was sent.
    let replayable = policy.idempotent && req.body().is_end_stream();
    while attempts_left > 0 {
        let Some(i) = pick(pool, tried) else { break };
        // Tries that sent nothing on a stale pooled connection are given back and are not
        // retries; every other attempt after the first is one.
        let is_retry = attempts_left <= policy.retries;
        if is_retry && !policy.retry_budget.is_none_or(RetryBudget::try_retry) {
            tracing::debug!(idc = %pool[i].idc, set = %pool[i].set, "retry budget spent: no retry");
            break;
        }
        if i < 64 {
            tried |= 1 << i;
        }
        attempts_left -= 1;
        let backend = &pool[i];
        let mut lease = Lease::new(backend.clone());
        lease.reusable = !policy.upgrade;
        let idle = if policy.upgrade {
            None
        } else {
            backend.take_idle()
        };
        let (mut sender, reused) = match idle {
            Some(s) => (s, true),
            None => match backend
                .connect(policy.connect_timeout, policy.upgrade)
                .await
            {
                Ok(s) => {
                    backend.record_connect_success();
                    (s, false)
                }
                Err(e) => {
                    backend.record_connect_failure();
                    tracing::debug!(backend = %backend.addr, idc = %backend.idc, error = %e, "upstream connect failed");
                    last_err = e;
                    continue;
                }
            },
        };
        if sender.ready().await.is_err() {
            // Closed while idle: nothing was sent; this try does not count.
            attempts_left += u32::from(reused);
            tried &= !(1u64.checked_shl(i as u32).unwrap_or(0));
            continue;
        }
        // The copy costs a header-map clone: only make it when a retry could use it.
        let can_retry = attempts_left > 0 && pick(pool, tried).is_some();
        let copy = (replayable && can_retry).then(|| clone_head(&req));
        match sender.try_send_request(req).await {
            Ok(resp) => {
                lease.sender = Some(sender);
                return Ok((resp, lease));
            }
            Err(mut e) => {
                let err = match body_too_large(e.error()) {
                    Some(limit) => ForwardError::BodyTooLarge(limit),
                    None => ForwardError::Protocol(e.error().to_string()),
                };
                match e.take_message() {
                    // Not sent: a stale pooled connection. Retry freely.
                    Some(back) => {
                        req = back;
                        if reused {
                            attempts_left += 1;
                            tried &= !(1u64.checked_shl(i as u32).unwrap_or(0));
                        }
                    }
                    None => match copy {
                        Some(c) => req = c,
                        None => return Err((err, None)),
                    },
                }
                last_err = err;
            }
        }
    }
    // Whatever failed last, `req` was not sent (or is a fresh copy): hand it back.
    let unsent = matches!(last_err, ForwardError::Connect(_)).then_some(req);
    Err((last_err, unsent))
}

fn clone_head(req: &Request<RequestBody>) -> Request<RequestBody> {
    let mut r = Request::new(RequestBody::Empty);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}
