//! Listeners: accept → TLS (when configured; ALPN h2/http1.1) → hyper (HTTP/1.1, and HTTP/2 by
//! ALPN or prior knowledge) → a service, with a connection limit, header-read and header-size
//! limits, HTTP/2 stream limits, and graceful drain on shutdown.

pub mod gate;
mod redirect;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Limits;
use crate::data::tls::Tls;
pub use redirect::{redirect, Redirect};

use crate::data::upstream::body::ResponseBody;

/// How often a listener at its connection limit says so.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Connection-level settings of a listener.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Limit for a request head to arrive; also how long a new connection may stay silent.
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight and no bytes moving is closed after
    /// this long.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish once shutdown starts.
    pub drain: Duration,
    pub limits: Limits,
    /// TLS termination; `None` serves plain HTTP.
    pub tls: Option<Tls>,
    /// Request heads go through the [`gate`] (the proxy listener): both `Content-Length` and
    /// `Transfer-Encoding`, conflicting lengths and oversized heads become a refusal the
    /// handler answers with its JSON body.
    pub head_gate: bool,
}

impl ListenerSettings {
    /// Plain HTTP with the default limits.
    pub fn plain(header_read_timeout: Duration, idle_timeout: Duration, drain: Duration) -> Self {
        ListenerSettings {
            header_read_timeout,
            idle_timeout,
            max_header_bytes: 64 * 1024,
            drain,
            limits: Limits::default(),
            tls: None,
            head_gate: false,
        }
    }
}

/// The client end of a connection, made once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client IP as a header value, for `x-forwarded-for`: formatted once per connection
    /// rather than once per request.
    pub ip_header: http::HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip_header = http::HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or(http::HeaderValue::from_static("unknown"));
        Peer { addr, ip_header }
    }
}

/// A request handler: the proxy pipeline or the admin API.
pub trait Handler: Send + Sync + 'static {
    fn call(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> impl Future<Output = Response<ResponseBody>> + Send;
}

fn builder(settings: &ListenerSettings) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // hyper's own header timer also runs between keep-alive requests, which would make
        // every idle connection close at the header limit; the connection watchdog below
        // enforces both limits instead.
        .header_read_timeout(None)
        // Behind the gate, heads past the limit never reach hyper (the gate refuses them with
        // the JSON body); hyper's buffer then only needs room for a head and what follows it.
        .max_buf_size(if settings.head_gate {
            settings.max_header_bytes * 2
        } else {
            settings.max_header_bytes
        })
        .max_headers(gate::MAX_HEADERS)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_concurrent_streams(settings.limits.h2_max_concurrent_streams)
        // The rapid-reset defence (CVE-2023-44487): a client opening and cancelling streams
        // faster than they are served gets the connection closed.
        .max_pending_accept_reset_streams(settings.limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(settings.limits.h2_max_local_error_reset_streams);
    b
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and gives open
/// connections `settings.drain` to finish what they are doing.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&settings));
    let graceful = GracefulShutdown::new();
    // One permit per open connection: past the limit a connection is accepted and closed at
    // once, which a client sees as a reset rather than a hang in the backlog.
    // Clamped as well as validated (config.rs): settings made in code skip the validation.
    let slots = Arc::new(Semaphore::new(
        settings.limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let (mut refused, mut last_warning) = (0u64, None::<std::time::Instant>);
    // Connection tasks, so those still open when the drain time is up can be closed.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            // At most one warning per interval, so a flood does not also flood the log.
            refused += 1;
            if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_WARNING_INTERVAL) {
                tracing::warn!(
                    limit = settings.limits.max_connections,
                    refused,
                    "connection limit reached: new connections are closed at once"
                );
                (refused, last_warning) = (0, Some(std::time::Instant::now()));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let activity = Arc::new(Activity::default());
        let in_service = activity.clone();
        let client = Peer::new(peer);
        // What the handler answered, for the gate (which holds the bytes behind a head asking
        // for an upgrade until it knows whether the connection switched protocols).
        let answers = settings
            .head_gate
            .then(|| Arc::new(gate::Answers::default()));
        let told = answers.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = in_service.request_started();
            let connect = req.method() == http::Method::CONNECT;
            // Boxed: hyper moves the service future around, and the pipeline's future is
            // large; moving a pointer is cheaper than copying kilobytes per request.
            let call = Box::pin(handler.clone().call(req, client.clone()));
            let told = told.clone();
            async move {
                let response = call.await;
                if let Some(answers) = &told {
                    let status = response.status();
                    answers.record(
                        status == http::StatusCode::SWITCHING_PROTOCOLS
                            || (connect && status.is_success()),
                    );
                }
                drop(busy);
                Ok::<_, Infallible>(response)
            }
        });
        let io = ActivityIo {
            inner: stream,
            activity: activity.clone(),
        };
        let connection = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            activity,
            head: settings.header_read_timeout,
            idle: settings.idle_timeout,
            peer,
            gate: answers.map(|answers| (settings.max_header_bytes, answers)),
        };
        let tls = settings.tls.clone();
        // The futures below are boxed, each sized for the path this connection takes: inline,
        // every connection's task would be as large as the largest of them (a TLS handshake,
        // hyper on a TLS stream), which 10,000 idle connections pay in memory (DESIGN.md §11).
        connections.spawn(async move {
            match tls {
                None => connection.serve(io, service).await,
                Some(tls) => {
                    // The handshake is part of the request head: it gets the same deadline.
                    let handshake = Box::pin(tokio::time::timeout(
                        connection.head,
                        tls.acceptor.accept(io),
                    ))
                    .await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            connection.activity.mark_boundary();
                            connection.serve(stream, service).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(settings.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_ms = settings.drain.as_millis() as u64,
            open = connections.len(),
            "drain timeout: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

/// One accepted connection, past TLS: served by hyper under the watchdog.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    activity: Arc<Activity>,
    head: Duration,
    idle: Duration,
    peer: SocketAddr,
    /// The head limit and the handler's answers, when request heads go through the gate.
    gate: Option<(usize, Arc<gate::Answers>)>,
}

impl Connection {
    async fn serve<I, S, B>(self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match self.gate.clone() {
            Some((max_head, answers)) => {
                Box::pin(self.serve_io(gate::Gate::new(io, max_head, answers), service)).await
            }
            None => Box::pin(self.serve_io(io, service)).await,
        }
    }

    async fn serve_io<I, S, B>(self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = self.watcher.watch(conn);
        let peer = self.peer;
        tokio::select! {
            result = conn => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            }
            () = self.activity.closing_time(self.head, self.idle) => {
                tracing::debug!(%peer, "closing an idle client connection");
            }
        }
    }
}

/// What a connection has done, for the watchdog: reads and writes (counters, so the hot path
/// pays a relaxed add and no clock read), requests started and in flight, and the read count
/// at the last request boundary (more reads since then, with nothing in flight, means a
/// request head is arriving).
#[derive(Default)]
struct Activity {
    reads: AtomicU64,
    writes: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    boundary_reads: AtomicU64,
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        a.boundary_reads
            .store(a.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn request_started(self: &Arc<Self>) -> Busy {
        self.boundary_reads
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self.clone())
    }

    /// A request boundary with nothing in flight: the bytes read so far (a TLS handshake)
    /// are not a request head arriving.
    fn mark_boundary(&self) {
        self.boundary_reads
            .store(self.reads.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn io(&self) -> u64 {
        self.reads.load(Ordering::Relaxed) + self.writes.load(Ordering::Relaxed)
    }

    /// Resolves when the connection should be closed (DESIGN.md §10):
    /// - a new connection silent for `head` (it connected and said nothing);
    /// - a request head still incomplete after one to two `head` periods (slowloris);
    /// - no request in flight and no bytes moving for `idle` (keep-alive idle).
    ///
    /// It checks once per `min(head, idle)`, so each limit is kept to within one period. A
    /// request in flight is bounded by the route's own timeouts, not here.
    async fn closing_time(&self, head: Duration, idle: Duration) {
        let tick = head.min(idle);
        let mut last_io = self.io();
        let mut quiet = Duration::ZERO;
        let mut head_ticks = 0u32;
        loop {
            tokio::time::sleep(tick).await;
            let io = self.io();
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                (last_io, quiet, head_ticks) = (io, Duration::ZERO, 0);
                continue;
            }
            let head_arriving =
                self.reads.load(Ordering::Relaxed) > self.boundary_reads.load(Ordering::Relaxed);
            head_ticks = if head_arriving { head_ticks + 1 } else { 0 };
            if head_ticks >= 2 {
                return;
            }
            if io == last_io {
                quiet += tick;
            } else {
                (last_io, quiet) = (io, Duration::ZERO);
            }
            let limit = if self.requests.load(Ordering::Relaxed) == 0 {
                head
            } else {
                idle
            };
            if quiet >= limit {
                return;
            }
        }
    }
}

/// The client socket, counting reads and writes for the idle watchdog.
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl ActivityIo {}

impl AsyncRead for ActivityIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for ActivityIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.writes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.writes.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
