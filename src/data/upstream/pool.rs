//! The pool of one upstream address: idle HTTP/1.1 keep-alive connections and an in-flight
//! counter per (IDC, set, address), shared by every snapshot that lists it, and the lease a
//! request holds on it.
//!
//! A pooled connection has no task of its own: it is the gateway's own HTTP/1.1 client
//! (`h1`), polled by the request that holds it while it waits for the response head and then
//! from the response body's `poll_frame`. A request and its response cost no hop to another
//! task and back, and no channel. Only an upgrade's connection is hyper's, in a task of its
//! own, so that it can hand itself over on a 101 while the relay holds it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::body::{BodyTooLarge, RequestBody, UpstreamBody};
use super::h1::{Failure, Http1};
use super::health::BackendHealth;
use super::tls::UpstreamTls;
use super::Stamp;

/// The byte stream under an upstream connection: plain TCP, or TLS over it.
pub(crate) trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> UpstreamIo for T {}

/// One upstream HTTP/1.1 connection.
pub(crate) enum Conn {
    /// The gateway's own client, driven by the request that holds it (boxed once per
    /// connection: pools and leases move it by pointer).
    Lean(Box<Http1>),
    /// hyper's client, running in a task of its own: an upgrade handshake's, which a 101
    /// hands over to the relay.
    Upgradable(SendRequest<RequestBody>),
}

/// Why an exchange failed.
pub(crate) struct SendError {
    pub message: String,
    /// The client's body failed (broke off, stalled, went past its limit): not the backend's
    /// doing.
    pub client_fault: bool,
    /// The route's body limit, when that is what the client's body went past.
    pub body_limit: Option<u64>,
    /// Nothing was sent: the request is whole, to send elsewhere.
    pub unsent: bool,
    /// The connection closed before a byte of an answer (on a reused connection, a race
    /// with the backend's idle close rather than a failure of the backend).
    pub closed_early: bool,
}

impl Conn {
    /// Looked at without waiting: true when it cannot carry a request (the backend closed it,
    /// or it is mid-exchange).
    fn poll_closed(&mut self) -> bool {
        match self {
            Conn::Lean(h) => h.poll_closed(),
            Conn::Upgradable(sender) => sender.is_closed(),
        }
    }

    /// Until the connection can take a request (an error: it closed first). A pooled one was
    /// looked at as it was taken (`take_idle`), a new one is fresh: neither is read again.
    pub(crate) async fn ready(&mut self) -> Result<(), ()> {
        match self {
            Conn::Lean(h) => h.is_idle().then_some(()).ok_or(()),
            Conn::Upgradable(sender) => sender.ready().await.map_err(|_| ()),
        }
    }

    /// Sends `req` with the gateway's headers (`stamp`) and waits for the response head. `req`
    /// stays with the caller: whole when its body is not a stream (empty, or kept whole), so
    /// that it can be sent again; a streamed body is taken (an empty one is left in its place).
    pub(crate) async fn send(
        &mut self,
        req: &mut Request<RequestBody>,
        stamp: &Stamp<'_>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match self {
            Conn::Lean(h) => {
                let body = match req.body().try_clone() {
                    Some(copy) => copy,
                    None => std::mem::replace(req.body_mut(), RequestBody::Empty),
                };
                match h.send(req, stamp, body).await {
                    Ok(resp) => Ok(resp.map(UpstreamBody::Conn)),
                    Err(failure) => {
                        let (client_fault, body_limit) = match &failure {
                            Failure::Client(e) => (true, body_limit(&**e)),
                            _ => (false, None),
                        };
                        Err(SendError {
                            message: failure.to_string(),
                            client_fault,
                            body_limit,
                            unsent: false,
                            closed_early: matches!(failure, Failure::Closed),
                        })
                    }
                }
            }
            Conn::Upgradable(sender) => {
                // hyper's client encodes the map: the stamp goes into it (again, on a retry,
                // replacing what it put there). hyper takes the request: a copy stays when the
                // body allows one.
                stamp.fold_into(req.headers_mut());
                let copy = copy_request(req).unwrap_or_default();
                match sender.try_send_request(std::mem::replace(req, copy)).await {
                    Ok(resp) => Ok(resp.map(UpstreamBody::Hyper)),
                    Err(mut e) => {
                        let back = e.take_message();
                        let unsent = back.is_some();
                        if let Some(back) = back {
                            *req = back;
                        }
                        Err(SendError {
                            message: e.error().to_string(),
                            client_fault: e.error().is_user(),
                            body_limit: std::error::Error::source(e.error()).and_then(body_limit),
                            unsent,
                            closed_early: false,
                        })
                    }
                }
            }
        }
    }

    /// The response body read off this connection has ended (or there is none).
    pub(crate) fn body_ended(&self) -> bool {
        match self {
            Conn::Lean(h) => h.body_ended(),
            Conn::Upgradable(_) => true,
        }
    }

    /// The exact length of the response body read off this connection, when known.
    pub(crate) fn body_length(&self) -> Option<u64> {
        match self {
            Conn::Lean(h) => h.body_length(),
            Conn::Upgradable(_) => Some(0),
        }
    }

    /// The response body's next bytes (`Lean` only: an upgrade's body is hyper's).
    pub(crate) fn lean(&mut self) -> Option<&mut Http1> {
        match self {
            Conn::Lean(h) => Some(h),
            Conn::Upgradable(_) => None,
        }
    }
}

/// A copy of the request when its body is not a stream (`RequestBody::try_clone`).
fn copy_request(req: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    let mut r = Request::new(req.body().try_clone()?);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    Some(r)
}

/// The body limit in an error's chain, when the client's body went past it.
fn body_limit(e: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(limit) = c.downcast_ref::<BodyTooLarge>() {
            return Some(limit.0);
        }
        cause = c.source();
    }
    None
}

/// Drops the oldest idle connection when it is closed.
fn sweep_oldest(idle: &mut VecDeque<Conn>) {
    if idle.front_mut().is_some_and(Conn::poll_closed) {
        idle.pop_front();
    }
}

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
    /// Probe verdict and passive ejection, shared with every pool listing this address in
    /// this IDC.
    pub health: Arc<BackendHealth>,
    /// Idle connections, the most recently used at the back (handed out first). Nobody polls
    /// them while they wait, so a backend's close is seen when one is looked at: the one
    /// handed out, and the oldest each time one comes back (it goes when it closed), so that
    /// closed ones do not sit in the pool for long while traffic flows. Once per request,
    /// not at the take as well: the oldest is cold, and each look reads its state and its
    /// socket's readiness from memory no request touched since.
    idle: Mutex<VecDeque<Conn>>,
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
    fn new(set: &str, health: Arc<BackendHealth>, tls: Option<Arc<UpstreamTls>>) -> Backend {
        Backend {
            idc: health.idc.clone(),
            set: Arc::new(set.to_owned()),
            addr: health.addr,
            tls,
            inflight: AtomicU32::new(0),
            health,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The TLS its IDC asks for (the health probes speak it too).
    pub fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map_or(0, |v| v.len())
    }

    /// Gets no traffic now: its probes say unhealthy, or traffic ejected it. Avoided backends
    /// are never tried, even when nothing else is left: a dead pool is dead (no fail-open).
    pub fn avoided(&self) -> bool {
        !self.health.in_service()
    }

    /// The most recently used idle connection still open. Each is polled once before it is
    /// handed out, so one whose backend closed it while it sat idle (and said so) is seen
    /// closed and dropped here rather than tried.
    pub(crate) fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut conn) = idle.pop_back() {
            if !conn.poll_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: Conn) {
        let Conn::Lean(mut h) = conn else { return };
        if !h.reusable() {
            return;
        }
        h.recycle();
        let conn = Conn::Lean(h);
        if let Ok(mut idle) = self.idle.lock() {
            sweep_oldest(&mut idle);
            if idle.len() < MAX_IDLE_PER_BACKEND {
                idle.push_back(conn);
            }
        }
    }

    /// A new connection: TCP, then the TLS handshake when the IDC asks for it, both within
    /// one connect timeout (a backend that accepts but never finishes the handshake is as
    /// unreachable as one that refuses).
    pub(crate) async fn connect(&self, timeout: Duration, upgrades: bool) -> Result<Conn, String> {
        match tokio::time::timeout(timeout, self.open(upgrades)).await {
            Ok(result) => result,
            Err(_) if self.tls.is_some() => Err(format!(
                "{}: connect and TLS handshake timed out",
                self.addr
            )),
            Err(_) => Err(format!("{}: connect timed out", self.addr)),
        }
    }

    async fn open(&self, upgrades: bool) -> Result<Conn, String> {
        // The address is in the message for the log; clients never see it (error.rs).
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let stream = tls
                    .connect(stream, self.addr)
                    .await
                    .map_err(|e| format!("TLS handshake with {}: {e}", self.addr))?;
                handshake(Box::new(stream), upgrades).await
            }
            None => handshake(Box::new(stream), upgrades).await,
        }
    }
}

/// A new connection's client: the gateway's own, or with `upgrades` hyper's, in a task of
/// its own, so that a 101 hands it over (`hyper::upgrade::on`) instead of ending it.
async fn handshake(io: Box<dyn UpstreamIo>, upgrades: bool) -> Result<Conn, String> {
    if !upgrades {
        return Ok(Conn::Lean(Box::new(Http1::new(io))));
    }
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Conn::Upgradable(sender))
}

/// A backend's in-flight slot and, once the response head arrived, its connection. Dropping it
/// frees the slot (and closes the connection if it was not released).
pub struct Lease {
    backend: Arc<Backend>,
    pub(crate) conn: Option<Conn>,
}

impl Lease {
    pub(crate) fn new(backend: Arc<Backend>) -> Lease {
        backend.inflight.fetch_add(1, Ordering::Relaxed);
        Lease {
            backend,
            conn: None,
        }
    }

    /// The response ended cleanly: the connection can carry another request (an upgraded
    /// one belongs to its relay: `put_idle` keeps only the gateway's own HTTP/1.1 ones).
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.backend.put_idle(conn);
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

/// A backend's identity: (IDC, set, address, TLS identity or 0 for plain TCP).
type BackendKey = (String, String, SocketAddr, u64);

/// Registry of backends by identity, so that snapshots share pools, and of their health by
/// (IDC, address), so that the sets listing one address share one verdict.
#[derive(Default)]
pub struct Upstreams {
    backends: Mutex<HashMap<BackendKey, Weak<Backend>>>,
    health: Mutex<HashMap<(String, SocketAddr), Weak<BackendHealth>>>,
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
            return Arc::new(Backend::new(set, self.health(idc, addr), tls));
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
        let b = Arc::new(Backend::new(set, self.health(idc, addr), tls));
        map.insert(key, Arc::downgrade(&b));
        b
    }

    /// The health of this backend identity: the existing one while any backend holds it.
    fn health(&self, idc: &str, addr: SocketAddr) -> Arc<BackendHealth> {
        let Ok(mut map) = self.health.lock() else {
            return Arc::new(BackendHealth::new(idc, addr));
        };
        let key = (idc.to_owned(), addr);
        if let Some(h) = map.get(&key).and_then(Weak::upgrade) {
            return h;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let h = Arc::new(BackendHealth::new(idc, addr));
        map.insert(key, Arc::downgrade(&h));
        h
    }
}
