//! The pool of one upstream address: idle HTTP/1.1 keep-alive connections and an in-flight
//! counter per (IDC, set, address), shared by every snapshot that lists it, and the lease a
//! request holds on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::RequestBody;
use super::health::BackendHealth;
use super::tls::UpstreamTls;

pub(crate) type Sender = SendRequest<RequestBody>;

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
    fn new(set: &str, health: Arc<BackendHealth>, tls: Option<Arc<UpstreamTls>>) -> Backend {
        Backend {
            idc: health.idc.clone(),
            set: Arc::new(set.to_owned()),
            addr: health.addr,
            tls,
            inflight: AtomicU32::new(0),
            health,
            idle: Mutex::new(Vec::new()),
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

    pub(crate) fn take_idle(&self) -> Option<Sender> {
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
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
        upgrades: bool,
    ) -> Result<Sender, String> {
        match tokio::time::timeout(timeout, self.open(upgrades)).await {
            Ok(result) => result,
            Err(_) if self.tls.is_some() => Err(format!(
                "{}: connect and TLS handshake timed out",
                self.addr
            )),
            Err(_) => Err(format!("{}: connect timed out", self.addr)),
        }
    }

    async fn open(&self, upgrades: bool) -> Result<Sender, String> {
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
                handshake(stream, upgrades).await
            }
            None => handshake(stream, upgrades).await,
        }
    }
}

/// The HTTP/1.1 client handshake over any connection; the connection task is spawned. With
/// `upgrades`, a 101 hands the connection over (`hyper::upgrade::on`) instead of ending it.
async fn handshake<IO>(io: IO, upgrades: bool) -> Result<Sender, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
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

/// A backend's in-flight slot and, once the response head arrived, its connection. Dropping it
/// frees the slot (and closes the connection if it was not released).
pub struct Lease {
    backend: Arc<Backend>,
    pub(crate) sender: Option<Sender>,
    /// An upgraded connection belongs to its relay: it never goes back to the pool.
    pub(crate) reusable: bool,
}

impl Lease {
    pub(crate) fn new(backend: Arc<Backend>) -> Lease {
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
