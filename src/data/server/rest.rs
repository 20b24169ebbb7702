//! Resting connections (DESIGN.md §11: 10,000 idle keep-alive connections in under 50 MiB).
//!
//! hyper's HTTP/1.1 server keeps a read buffer (8–16 KiB) and a write buffer (8 KiB) for the
//! whole life of a connection, and gives no way to free them between requests. A plain
//! HTTP/1.1 connection on the proxy listener that has had nothing to do for [`REST_AFTER`]
//! therefore *rests*: hyper is shown the end of the stream at a request boundary, closes its
//! side cleanly (nothing is written to the client), and the gate with the socket comes back
//! home ([`Lent`]). The connection then waits for readable bytes with no buffer at all; the
//! next request wakes it and a new hyper connection (HTTP/1.1 only) takes it from there. The
//! client sees one keep-alive connection throughout.
//!
//! A connection rests only where nothing can be lost: the gate holds no bytes and has every
//! head it handed over answered, no request is in flight, no response body is being sent, no
//! write is waiting on the client, and the socket has nothing to read. Connections through TLS
//! (whose session state lives in the stream) and HTTP/2 ones do not rest.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::gate::Gate;
use super::Activity;
use crate::telemetry::{ConnectionStateLabels, Metrics};

/// How long a connection has nothing to do before it rests (within one more such period: the
/// watchdog decides at its ticks).
pub const REST_AFTER: Duration = Duration::from_secs(1);

/// A client stream that may rest: its socket, when everything the connection has to read is
/// in it (a plain TCP connection); `None` when it is not (TLS keeps decrypted bytes and session
/// state in the stream), and the connection never rests.
pub trait Readiness {
    fn socket(&self) -> Option<&TcpStream>;
}

impl<I: Readiness> Readiness for Gate<I> {
    fn socket(&self) -> Option<&TcpStream> {
        self.inner().socket()
    }
}

/// Resolves when the socket behind `gate` has bytes to read (or was closed); at once, with an
/// error, for a stream that cannot rest.
/// (The future holds the socket, not the gate: it is `Send` without the gate being `Sync`.)
pub fn readable<I: Readiness>(gate: &Gate<I>) -> impl Future<Output = io::Result<()>> + '_ {
    let socket = gate.socket();
    async move {
        match socket {
            Some(socket) => socket.readable().await,
            None => Err(io::ErrorKind::Unsupported.into()),
        }
    }
}

/// Where a lent gate comes back to when its connection rests.
pub type Home<I> = Arc<Mutex<Option<Gate<I>>>>;

/// The gate as one hyper connection reads and writes it. When the connection is asked to rest
/// ([`Activity::ask_rest`]) and may, a read that finds nothing is told "end of stream"; hyper
/// then closes its side, and when it drops this the gate goes back `home`.
pub struct Lent<I> {
    gate: Option<Gate<I>>,
    home: Home<I>,
    activity: Arc<Activity>,
    /// The last write or flush found the client not reading.
    write_blocked: bool,
    /// hyper was shown the end of the stream: its close must not reach the socket.
    resting: bool,
}

impl<I> Lent<I> {
    pub fn new(gate: Gate<I>, home: Home<I>, activity: Arc<Activity>) -> Lent<I> {
        Lent {
            gate: Some(gate),
            home,
            activity,
            write_blocked: false,
            resting: false,
        }
    }

    fn may_rest(&self) -> bool {
        self.activity.rest_asked()
            && !self.write_blocked
            && self.gate.as_ref().is_some_and(Gate::at_rest)
            && self.activity.idle_between_requests()
    }
}

impl<I> Drop for Lent<I> {
    fn drop(&mut self) {
        if self.resting {
            if let (Some(gate), Ok(mut home)) = (self.gate.take(), self.home.lock()) {
                *home = Some(gate);
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lent<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.resting {
            return Poll::Ready(Ok(()));
        }
        let Some(gate) = this.gate.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(&mut *gate).poll_read(cx, buf) {
            Poll::Pending if this.may_rest() => {
                // Nothing to read, nothing held, nothing owed: hyper sees a clean end at a
                // request boundary and closes without writing.
                this.resting = true;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> Lent<I> {
    fn gate(&mut self) -> io::Result<Pin<&mut Gate<I>>> {
        match self.gate.as_mut() {
            Some(gate) => Ok(Pin::new(gate)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn note<T>(&mut self, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.write_blocked = polled.is_pending();
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Lent<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.gate()?.poll_write(cx, buf);
        this.note(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.gate()?.poll_write_vectored(cx, bufs);
        this.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = this.gate()?.poll_flush(cx);
        this.note(polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.resting {
            // hyper's close of a resting connection: the socket stays open for the client.
            return Poll::Ready(Ok(()));
        }
        this.gate()?.poll_shutdown(cx)
    }
}

/// A response body as the listener hands it to hyper: counted while hyper sends it, so that
/// a connection never rests in the middle of a response whose body is slow to come.
pub struct Sending<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Sending<B> {
    pub fn new(body: B, activity: Arc<Activity>) -> Sending<B> {
        activity.body_started();
        Sending { body, activity }
    }
}

impl<B> Drop for Sending<B> {
    fn drop(&mut self) {
        self.activity.body_ended();
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Sending<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The proxy listener's connection gauges (`shardgate_client_connections{state}`).
#[derive(Debug, Clone)]
pub struct ConnectionGauges {
    pub active: Gauge,
    pub resting: Gauge,
}

impl ConnectionGauges {
    pub fn new(metrics: &Metrics) -> ConnectionGauges {
        let gauge = |state| {
            metrics
                .client_connections
                .get_or_create(&ConnectionStateLabels { state })
                .clone()
        };
        ConnectionGauges {
            active: gauge("active"),
            resting: gauge("resting"),
        }
    }
}

/// One connection's place in [`ConnectionGauges`], moved between states and taken out when
/// the connection ends.
pub struct Counted {
    gauges: Option<ConnectionGauges>,
    resting: bool,
}

impl Counted {
    pub fn new(gauges: Option<ConnectionGauges>) -> Counted {
        if let Some(g) = &gauges {
            g.active.inc();
        }
        Counted {
            gauges,
            resting: false,
        }
    }

    pub fn set_resting(&mut self, resting: bool) {
        if resting == self.resting {
            return;
        }
        if let Some(g) = &self.gauges {
            let (from, to) = if resting {
                (&g.active, &g.resting)
            } else {
                (&g.resting, &g.active)
            };
            from.dec();
            to.inc();
        }
        self.resting = resting;
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(g) = &self.gauges {
            if self.resting {
                g.resting.dec();
            } else {
                g.active.dec();
            }
        }
    }
}

/// How often the memory release looks at the connection gauges.
const RELEASE_CHECK: Duration = Duration::from_secs(5);

/// How many fewer active connections than at the last release (or the peak since) make a
/// release worth it: each gave back hyper's buffers, 16–24 KiB.
const RELEASE_AFTER: i64 = 1_000;

/// Gives the memory of connections that went to rest or closed back to the system: glibc keeps
/// the pages of freed buffers resident while small allocations of live connections sit
/// between them. Runs until `shutdown`.
pub async fn release_memory(gauges: ConnectionGauges, mut shutdown: watch::Receiver<bool>) {
    let mut peak = gauges.active.get();
    let mut ticks = tokio::time::interval(RELEASE_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.changed() => return,
        }
        let active = gauges.active.get();
        peak = peak.max(active);
        if peak - active >= RELEASE_AFTER {
            // The allocator's locks are held while it walks its heaps: off the workers.
            let released = tokio::task::spawn_blocking(heap_trim::release_free_memory).await;
            tracing::debug!(
                from = peak,
                to = active,
                ?released,
                "released the memory of connections that rested or closed"
            );
            peak = active;
        }
    }
}
