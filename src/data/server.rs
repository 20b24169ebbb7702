//! Listeners: accept → TLS (when configured; ALPN h2/http1.1) → hyper (HTTP/1.1, and HTTP/2 by
//! ALPN or prior knowledge) → a service, with a connection limit, header-read and header-size
//! limits, HTTP/2 stream limits, and graceful drain on shutdown.

pub mod gate;
mod http1;
mod redirect;
pub mod rest;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Limits;
use crate::data::tls::Tls;
pub use crate::data::upstream::client_body::ClientBody;
pub use redirect::{redirect, Redirect};

use crate::data::upstream::body::ResponseBody;
use rest::{ConnectionGauges, Counted, Lent, Readiness, Sending};

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
    /// handler answers with its JSON body. Plain connections through the gate rest when
    /// they have nothing to do ([`rest`]).
    pub head_gate: bool,
    /// Open connections by state, counted when set (the proxy listener).
    pub gauges: Option<ConnectionGauges>,
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
            gauges: None,
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
        req: Request<ClientBody>,
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
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, handler, settings, shutdown, None).await
}

/// [`serve`], with the accept loop on a thread of its own (the proxy listener). Connections
/// are still served by the runtime this is called on. What a connection keeps for its life
/// (its task, its state, its socket's registration) is then allocated by that thread, apart
/// from the buffers its requests use and free on the workers: when idle connections rest, the
/// memory of those buffers is whole free pages the allocator can give back, not holes between
/// live connections (DESIGN.md §11). Returns when the accept loop ends (or its thread failed).
pub async fn serve_accepting_apart<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    settings: ListenerSettings,
    shutdown: watch::Receiver<bool>,
) {
    let workers = tokio::runtime::Handle::current();
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listener to its accept thread");
            return;
        }
    };
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    // Dropped with this future (the listener's task aborted or panicked): the accept thread
    // then closes the listener and its connections, as the task itself would have.
    let (_abandon, abandoned) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("shardgate-accept".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the accept thread's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let apart = Some((workers, abandoned));
                        accept_loop(listener, handler, settings, shutdown, apart).await
                    }
                    Err(e) => tracing::error!(error = %e, "cannot register the listener"),
                }
            });
            let _ = done.send(());
        });
    if let Err(e) = thread {
        tracing::error!(error = %e, "cannot start the accept thread");
        return;
    }
    // An error here is the thread gone without saying so (a panic): the listener ended.
    let _ = finished.await;
}

/// The runtime that serves the connections of an accept loop running apart, and the signal
/// that the loop's owner is gone.
type Apart = (tokio::runtime::Handle, tokio::sync::oneshot::Receiver<()>);

/// Accepts and serves until `shutdown`. Apart: connections run on the given runtime (their
/// sockets registered there), and when the owner is gone the listener and its connections
/// close at once; otherwise they run on the current runtime.
async fn accept_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
    apart: Option<Apart>,
) {
    let (workers, mut abandoned) = match apart {
        Some((workers, abandoned)) => (Some(workers), Some(abandoned)),
        None => (None, None),
    };
    let abandoned = async move {
        match abandoned.as_mut() {
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(abandoned);
    let builders = Arc::new(Builders {
        first: builder(&settings),
        // A connection waking from rest goes on in HTTP/1.1: it spoke HTTP/1.1 before.
        woken: builder(&settings).http1_only(),
    });
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
            // Returning drops the listener and the connections' tasks with it.
            () = &mut abandoned => return,
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
        // Served by the workers: the socket is registered with their I/O driver.
        let stream = match &workers {
            None => stream,
            Some(workers) => match rehome(stream, workers) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot hand a connection to the workers");
                    continue;
                }
            },
        };
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
        // The handler as the listener's own HTTP/1.1 connection calls it (behind the gate).
        let call: Option<http1::Call> = settings.head_gate.then(|| {
            let (handler, client) = (handler.clone(), client.clone());
            Arc::new(move |req: Request<ClientBody>| {
                boxed(|| handler.clone().call(req, client.clone()))
                    as Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>
            }) as http1::Call
        });
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let busy = in_service.request_started();
            let in_body = in_service.clone();
            let connect = req.method() == http::Method::CONNECT;
            // Boxed: hyper moves the service future around, and the pipeline's future is
            // large; moving a pointer is cheaper than copying kilobytes per request.
            let call = boxed(|| {
                handler
                    .clone()
                    .call(req.map(ClientBody::Hyper), client.clone())
            });
            let told = told.clone();
            async move {
                let mut response = call.await;
                // hyper writes the map: header lines kept as they came go into it.
                if let Some(lines) = response.body_mut().take_lines() {
                    lines.fill(response.headers_mut());
                }
                if let Some(answers) = &told {
                    let status = response.status();
                    answers.record(
                        status == http::StatusCode::SWITCHING_PROTOCOLS
                            || (connect && status.is_success()),
                    );
                }
                drop(busy);
                Ok::<_, Infallible>(response.map(|body| Sending::new(body, in_body)))
            }
        });
        let io = ActivityIo {
            inner: stream,
            activity: activity.clone(),
        };
        let connection = Connection {
            builders: builders.clone(),
            shutdown: shutdown.clone(),
            counted: Counted::new(settings.gauges.clone()),
            activity,
            head: settings.header_read_timeout,
            idle: settings.idle_timeout,
            peer,
            gate: answers.map(|answers| (settings.max_header_bytes, answers)),
            call,
            _slot: slot,
        };
        // The task holds a pointer to the future of the path this connection takes, sized
        // for that path alone: 10,000 idle connections pay for their size (DESIGN.md §11).
        let task: Pin<Box<dyn Future<Output = ()> + Send>> = match settings.tls.clone() {
            None => connection.serve(io, service),
            Some(tls) => Box::pin(connection.serve_tls(tls, io, service)),
        };
        match &workers {
            None => connections.spawn(task),
            Some(workers) => connections.spawn_on(task, workers),
        };
    }
    drop(listener);
    // Every connection saw `shutdown` change: idle and resting ones close at once, busy ones
    // after their response (hyper's graceful shutdown).
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.drain, drained).await.is_err() {
        tracing::warn!(
            drain_ms = settings.drain.as_millis() as u64,
            open = connections.len(),
            "drain timeout: closing the connections still open"
        );
        connections.shutdown().await;
    }
}

/// hyper's connection settings: for a new connection (HTTP/1.1, or HTTP/2 by preface or
/// ALPN), and for one waking from rest.
struct Builders {
    first: auto::Builder<TokioExecutor>,
    woken: auto::Builder<TokioExecutor>,
}

/// A request's future, boxed: the box is made first and the future made into it (`make` is
/// called once the box exists). The pipeline's future is kilobytes: `Box::pin(future)` would
/// build it beside the box and copy it in.
fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// `stream`, registered with the I/O driver of `workers` instead of the current runtime's.
fn rehome(stream: TcpStream, workers: &tokio::runtime::Handle) -> io::Result<TcpStream> {
    let std = stream.into_std()?;
    let _entered = workers.enter();
    TcpStream::from_std(std)
}

/// One accepted connection, past TLS: served by hyper under the watchdog.
struct Connection {
    builders: Arc<Builders>,
    /// Turns true (or is dropped) when the listener shuts down.
    shutdown: watch::Receiver<bool>,
    counted: Counted,
    activity: Arc<Activity>,
    head: Duration,
    idle: Duration,
    peer: SocketAddr,
    /// The head limit and the handler's answers, when request heads go through the gate.
    gate: Option<(usize, Arc<gate::Answers>)>,
    /// The handler, for the listener's own HTTP/1.1 connection (behind the gate).
    call: Option<http1::Call>,
    /// The connection's place under the listener's limit.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// How one hyper connection ended.
enum Served {
    /// It finished (the client closed, an error, or the connection rested).
    Done,
    /// The watchdog or the shutdown ended it.
    Closed,
}

impl Connection {
    /// The TLS handshake, then the connection over it.
    async fn serve_tls<S>(self, tls: Tls, io: ActivityIo, service: S)
    where
        S: ConnService,
    {
        let peer = self.peer;
        // The handshake is part of the request head: it gets the same deadline.
        match tokio::time::timeout(self.head, tls.acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                self.activity.mark_boundary();
                self.serve(stream, service).await;
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    /// Serves the connection past TLS; boxed, sized for the path it takes.
    fn serve<I, S>(self, io: I, service: S) -> Pin<Box<dyn Future<Output = ()> + Send>>
    where
        I: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static,
        S: ConnService,
    {
        match self.gate.clone() {
            Some((max_head, answers)) if io.socket().is_some() => {
                // Made here, with the connection (on the accept thread), not on a worker.
                let home = Arc::new(Mutex::new(Some(gate::Gate::new(io, max_head, answers))));
                Box::pin(self.serve_resting(home, max_head, service))
            }
            Some((max_head, answers)) => {
                let gate = gate::Gate::new(io, max_head, answers);
                Box::pin(self.serve_once(gate, service))
            }
            None => Box::pin(self.serve_once(io, service)),
        }
    }

    /// One hyper connection for the connection's life.
    async fn serve_once<I, S>(mut self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: ConnService,
    {
        let activity = self.activity.clone();
        let closing = activity.closing_time(self.head, self.idle);
        tokio::pin!(closing);
        let conn = Box::pin(
            self.builders
                .first
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned(),
        );
        self.run(conn, closing.as_mut()).await;
    }

    /// A plain connection through the gate: it starts resting (no buffers until a request
    /// comes), is served by the listener's own HTTP/1.1 connection ([`http1`]) or, for what
    /// that leaves to hyper, by hyper, and rests again each time it has nothing to do
    /// ([`rest`]).
    async fn serve_resting<I, S>(mut self, home: rest::Home<I>, max_head: usize, service: S)
    where
        I: AsyncRead + AsyncWrite + Readiness + Unpin + Send + 'static,
        S: ConnService,
    {
        let activity = self.activity.clone();
        let closing = activity.closing_time(self.head, self.idle);
        tokio::pin!(closing);
        let call = self.call.clone();
        // The connection spoke HTTP/1.1 before (hyper served it, or the own connection did).
        let mut woken = false;
        loop {
            let Some(mut gate) = home.lock().ok().and_then(|mut h| h.take()) else {
                return;
            };
            gate.shed_buffers();
            self.counted.set_resting(true);
            tokio::select! {
                ready = rest::readable(&gate) => if ready.is_err() { return },
                () = closing.as_mut() => {
                    tracing::debug!(peer = %self.peer, "closing an idle client connection");
                    return;
                }
                _ = self.shutdown.changed() => return,
            }
            self.counted.set_resting(false);
            self.activity.wake();
            // A watchdog that was resting may be in a long tick: a fresh one, on short ticks
            // again, so that the connection can rest soon after this request.
            closing.set(activity.closing_time(self.head, self.idle));
            let gate = match &call {
                Some(call) => {
                    // Made for this stretch and dropped at its end, like its future (boxed:
                    // a resting connection's task holds neither).
                    let wire = Arc::new(Mutex::new(http1::Wire::new(gate)));
                    let serving = Box::pin(http1::serve(
                        &wire,
                        call,
                        &activity,
                        &mut self.shutdown,
                        max_head,
                    ));
                    let ended = tokio::select! {
                        ended = serving => Some(ended),
                        () = closing.as_mut() => None,
                    };
                    // Out of the wire: a body handle still held somewhere must not keep the
                    // socket open.
                    let (gate, served) = {
                        let mut w = http1::lock(&wire);
                        (w.gate.take(), w.served())
                    };
                    woken |= served;
                    match (ended, gate) {
                        (Some(http1::Ended::Rest), Some(gate)) => {
                            if let Ok(mut home) = home.lock() {
                                *home = Some(gate);
                            }
                            continue;
                        }
                        (Some(http1::Ended::Hyper), Some(gate)) => gate,
                        (None, _) => {
                            tracing::debug!(peer = %self.peer, "closing an idle client connection");
                            return;
                        }
                        _ => return,
                    }
                }
                None => gate,
            };
            let builder = if woken {
                &self.builders.woken
            } else {
                &self.builders.first
            };
            woken = true;
            // Boxed (no binding of it held across the wait), and dropped when it ends: a
            // resting connection keeps none of hyper's state.
            let conn = Box::pin(
                builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(Lent::new(gate, home.clone(), self.activity.clone())),
                        service.clone(),
                    )
                    .into_owned(),
            );
            if let Served::Closed = self.run(conn, closing.as_mut()).await {
                return;
            }
        }
    }

    /// Runs one hyper connection until it ends, the watchdog closes it, or the listener's
    /// shutdown has it finish what is in flight.
    async fn run<I, S>(
        &mut self,
        mut conn: Pin<Box<HyperConnection<I, S>>>,
        mut closing: Pin<&mut impl Future<Output = ()>>,
    ) -> Served
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: ConnService,
    {
        let mut draining = *self.shutdown.borrow();
        if draining {
            conn.as_mut().graceful_shutdown();
        }
        let peer = self.peer;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    }
                    return if draining { Served::Closed } else { Served::Done };
                }
                () = closing.as_mut() => {
                    tracing::debug!(%peer, "closing an idle client connection");
                    return Served::Closed;
                }
                _ = self.shutdown.changed(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The per-connection service the listener hands hyper: the handler behind the gate's
/// bookkeeping, answering with bodies counted while they are sent ([`Sending`]).
trait ConnService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Sending<ResponseBody>>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Sending<ResponseBody>>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// One hyper connection (HTTP/1.1, or HTTP/2 by preface or ALPN) over `I`.
type HyperConnection<I, S> = auto::UpgradeableConnection<'static, TokioIo<I>, S, TokioExecutor>;

/// What a connection has done, for the watchdog: reads and writes (counters, so the hot path
/// pays a relaxed add and no clock read), requests started and in flight, response bodies
/// being sent, and the read count at the last request boundary (more reads since then, with
/// nothing in flight, means a request head is arriving). The watchdog also asks a quiet
/// connection to rest ([`rest`]).
#[derive(Default)]
pub struct Activity {
    reads: AtomicU64,
    writes: AtomicU64,
    requests: AtomicU64,
    in_flight: AtomicU64,
    bodies: AtomicU64,
    boundary_reads: AtomicU64,
    rest: AtomicBool,
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
        self.rest.store(false, Ordering::Relaxed);
        Busy(self.clone())
    }

    fn body_started(&self) {
        self.bodies.fetch_add(1, Ordering::Relaxed);
    }

    fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::Relaxed);
    }

    /// No request in flight and no response body being sent.
    fn idle_between_requests(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.bodies.load(Ordering::Relaxed) == 0
    }

    /// The watchdog found the connection quiet: it may rest at its next request boundary.
    fn ask_rest(&self) {
        self.rest.store(true, Ordering::Relaxed);
    }

    fn rest_asked(&self) -> bool {
        self.rest.load(Ordering::Relaxed)
    }

    /// The connection woke from rest: bytes came.
    fn wake(&self) {
        self.rest.store(false, Ordering::Relaxed);
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
    /// - a request head still incomplete after `head` (slowloris);
    /// - no request in flight and no bytes moving for `idle` (keep-alive idle).
    ///
    /// It checks once per `min(head, idle)`, so each limit is kept to within one period; and,
    /// while the connection is awake, once per [`rest::REST_AFTER`] at most, asking it to rest
    /// once it was quiet that long. A request in flight is bounded by the route's own
    /// timeouts, not here.
    async fn closing_time(&self, head: Duration, idle: Duration) {
        let mut last_io = self.io();
        let mut quiet = Duration::ZERO;
        let mut arriving = Duration::ZERO;
        loop {
            let tick = if self.rest_asked() {
                head.min(idle)
            } else {
                head.min(idle).min(rest::REST_AFTER)
            };
            tokio::time::sleep(tick).await;
            let io = self.io();
            if self.in_flight.load(Ordering::Relaxed) > 0 {
                (last_io, quiet, arriving) = (io, Duration::ZERO, Duration::ZERO);
                continue;
            }
            let head_arriving =
                self.reads.load(Ordering::Relaxed) > self.boundary_reads.load(Ordering::Relaxed);
            arriving = if head_arriving {
                arriving + tick
            } else {
                Duration::ZERO
            };
            // Seen arriving at checks `head` apart at least.
            if arriving >= head + tick {
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
            if quiet >= rest::REST_AFTER && !head_arriving && !self.rest_asked() {
                self.ask_rest();
                // The connection is polled in this task: once more, now that it may rest.
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The client socket, counting reads and writes for the idle watchdog.
struct ActivityIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl Readiness for ActivityIo {
    fn socket(&self) -> Option<&TcpStream> {
        Some(&self.inner)
    }
}

impl Readiness for tokio_rustls::server::TlsStream<ActivityIo> {
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

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
