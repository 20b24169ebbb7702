//! The pool of one upstream address: idle HTTP/1.1 keep-alive connections and an in-flight
//! counter per (IDC, set, address), shared by every snapshot that lists it, and the lease a
//! request holds on it.
//!
//! A pooled connection has no task of its own: its state machine (hyper's HTTP/1.1 client
//! connection) is polled by the request that holds it, while the request waits for its head
//! and then from the response body's `poll_frame`. A request and its response cost no hop
//! to another task and back. Only an upgrade's connection runs in a task of its own, so that
//! it can hand itself over on a 101 while the relay holds it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::health::BackendHealth;
use super::tls::UpstreamTls;

/// The byte stream under an upstream connection: plain TCP, or TLS over it.
pub(crate) trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> UpstreamIo for T {}

type Driver = Pin<Box<Connection<TokioIo<Box<dyn UpstreamIo>>, RequestBody>>>;

/// One upstream HTTP/1.1 connection: the handle requests go out on and, unless it runs in a
/// task of its own (an upgrade), the connection's state machine that its user polls.
pub(crate) struct Conn {
    sender: SendRequest<RequestBody>,
    driver: Option<Driver>,
}

impl Conn {
    /// Closed: the backend or an error ended it (nothing more can be sent on it).
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Polled once without a task to wake: true when it is closed, the backend's close
    /// included when it has arrived.
    fn poll_closed(&mut self) -> bool {
        self.poll_drive(&mut Context::from_waker(Waker::noop()));
        self.is_closed()
    }

    /// Lets the connection read and write what it can now. False when it has no state
    /// machine to poll here (it ended, or it runs in its own task).
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> bool {
        poll_driver(&mut self.driver, cx)
    }

    /// Until the connection can take a request (an error: it closed first).
    pub(crate) async fn ready(&mut self) -> hyper::Result<()> {
        let Conn { sender, driver } = self;
        driving(driver, sender.ready()).await
    }

    /// Sends `req` and waits for the response head, the connection driven meanwhile. A
    /// request the connection never took comes back in the error.
    pub(crate) async fn send(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        let Conn { sender, driver } = self;
        let answer = sender.try_send_request(req);
        driving(driver, answer).await
    }
}

/// Drops the oldest idle connection when it is closed.
fn sweep_oldest(idle: &mut VecDeque<Conn>) {
    if idle.front_mut().is_some_and(Conn::poll_closed) {
        idle.pop_front();
    }
}

fn poll_driver(driver: &mut Option<Driver>, cx: &mut Context<'_>) -> bool {
    let Some(d) = driver else { return false };
    if let Poll::Ready(ended) = d.as_mut().poll(cx) {
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
        // Dropping the state machine closes the handle too: `is_closed` says so from now on.
        *driver = None;
    }
    true
}

/// `step` polled with the connection's state machine: the step first, then the connection
/// (which may complete it), then the step again.
async fn driving<F: Future>(driver: &mut Option<Driver>, step: F) -> F::Output {
    let mut step = std::pin::pin!(step);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = step.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        if poll_driver(driver, cx) {
            step.as_mut().poll(cx)
        } else {
            Poll::Pending
        }
    })
    .await
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
    /// handed out, and the oldest at each take and put (it goes when it closed), so that
    /// closed ones do not sit in the pool for long while traffic flows.
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
        sweep_oldest(&mut idle);
        while let Some(mut conn) = idle.pop_back() {
            if !conn.poll_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
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

/// The HTTP/1.1 client handshake over a connection. With `upgrades`, the connection runs in a
/// task of its own and a 101 hands it over (`hyper::upgrade::on`) instead of ending it;
/// otherwise its user drives it.
async fn handshake(io: Box<dyn UpstreamIo>, upgrades: bool) -> Result<Conn, String> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    if !upgrades {
        return Ok(Conn {
            sender,
            driver: Some(Box::pin(conn)),
        });
    }
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Conn {
        sender,
        driver: None,
    })
}

/// A backend's in-flight slot and, once the response head arrived, its connection. Dropping it
/// frees the slot (and closes the connection if it was not released).
pub struct Lease {
    backend: Arc<Backend>,
    pub(crate) conn: Option<Conn>,
    /// An upgraded connection belongs to its relay: it never goes back to the pool.
    pub(crate) reusable: bool,
}

impl Lease {
    pub(crate) fn new(backend: Arc<Backend>) -> Lease {
        backend.inflight.fetch_add(1, Ordering::Relaxed);
        Lease {
            backend,
            conn: None,
            reusable: true,
        }
    }

    /// The response ended cleanly: the connection can carry another request.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take().filter(|_| self.reusable) {
            self.backend.put_idle(conn);
        }
    }

    /// Drives the connection (the response body streams through it). False when there is
    /// nothing to drive here.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.conn.as_mut().is_some_and(|c| c.poll_drive(cx))
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
