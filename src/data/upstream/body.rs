//! Streaming bodies in both directions. Nothing is buffered whole: frames pass through as they
//! arrive, under an idle deadline between frames (the timer is armed only when a frame is not
//! ready at once, so small bodies cost no timer). Upstream connections go back to their pool
//! when the response body ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::client_body::ClientBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::data::upstream::{HeadLines, Lease};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub struct BodyTimeout(&'static str);

impl fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} body stalled past its idle timeout", self.0)
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that went past its route's `max_body_bytes` (the limit).
#[derive(Debug)]
pub struct BodyTooLarge(pub u64);

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body larger than {} bytes", self.0)
    }
}

impl std::error::Error for BodyTooLarge {}

/// An idle deadline between frames, armed lazily.
pub struct IdleTimer {
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(idle: Duration) -> IdleTimer {
        IdleTimer { idle, sleep: None }
    }

    /// Called when the inner body is pending: true once the deadline has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        sleep.as_mut().poll(cx).is_ready()
    }

    /// Progress was made: the next wait gets a full idle period.
    fn reset(&mut self) {
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(Instant::now() + self.idle);
        }
    }
}

/// The body sent upstream: the client's body (streamed), a small body read whole and kept (so
/// the request can be sent again after a 421, `proxy::misroute`), or nothing.
pub enum RequestBody {
    Client {
        inner: ClientBody,
        timer: IdleTimer,
        /// Bytes still allowed (`u64::MAX`: no limit) and the limit, for the error.
        allowed: u64,
        limit: u64,
    },
    /// Read whole before it was sent; `None` once sent. A copy shares the bytes.
    Kept(Option<Bytes>),
    Empty,
}

impl RequestBody {
    pub fn client(inner: ClientBody, idle: Duration, limit: Option<u64>) -> RequestBody {
        let limit = limit.unwrap_or(u64::MAX);
        RequestBody::Client {
            inner,
            timer: IdleTimer::new(idle),
            allowed: limit,
            limit,
        }
    }

    /// A copy to send again, when the body is not a stream (empty, or kept whole).
    pub fn try_clone(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Kept(b) => Some(RequestBody::Kept(b.clone())),
            RequestBody::Client { .. } => None,
        }
    }
}

/// Nothing: what a request keeps in place of a streamed body that was sent.
impl Default for RequestBody {
    fn default() -> RequestBody {
        RequestBody::Empty
    }
}

impl RequestBody {
    /// Can be sent again: not a stream (empty, or kept whole).
    pub fn is_resendable(&self) -> bool {
        !matches!(self, RequestBody::Client { .. })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Kept(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Client {
                inner,
                timer,
                allowed,
                limit,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(frame) => {
                    timer.reset();
                    if let Some(Ok(f)) = &frame {
                        let len = f.data_ref().map_or(0, |d| d.len() as u64);
                        match allowed.checked_sub(len) {
                            Some(left) => *allowed = left,
                            None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge(*limit))))),
                        }
                    }
                    Poll::Ready(frame)
                }
                Poll::Pending if timer.expired(cx) => {
                    Poll::Ready(Some(Err(Box::new(BodyTimeout("request")))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Kept(b) => b.is_none(),
            RequestBody::Client { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Kept(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Client { inner, .. } => inner.size_hint(),
        }
    }
}

/// An upstream response's body as it comes off the exchange.
pub enum UpstreamBody {
    /// Read from the connection the lease holds (the gateway's own HTTP/1.1 client), with
    /// the head's header lines when they are passed on as they came.
    Conn(Option<HeadLines>),
    /// hyper's (an upgrade handshake's connection answered without switching).
    Hyper(Incoming),
}

/// The body sent to the client: an upstream response (streamed) or a gateway-made one.
pub enum ResponseBody {
    Upstream {
        inner: UpstreamBody,
        timer: IdleTimer,
        /// The upstream connection; back to its pool when the body ends.
        lease: Option<Lease>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(inner: UpstreamBody, idle: Duration, lease: Lease) -> ResponseBody {
        let mut body = ResponseBody::Upstream {
            inner,
            timer: IdleTimer::new(idle),
            lease: Some(lease),
        };
        if body.is_end_stream() {
            if let ResponseBody::Upstream { lease, .. } = &mut body {
                if let Some(l) = lease.take() {
                    l.release();
                }
            }
        }
        body
    }

    /// The upstream head's header lines kept as they came, taken out: the client's connection
    /// writes them, or puts them in the response's header map ([`HeadLines::fill`]).
    pub fn take_lines(&mut self) -> Option<HeadLines> {
        match self {
            ResponseBody::Upstream {
                inner: UpstreamBody::Conn(lines),
                ..
            } => lines.take(),
            _ => None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        let b = bytes.into();
        ResponseBody::Full((!b.is_empty()).then_some(b))
    }

    pub fn empty() -> ResponseBody {
        ResponseBody::Full(None)
    }
}

/// The next frame of an upstream body: from the lease's connection, or hyper's body.
fn poll_upstream(
    inner: &mut UpstreamBody,
    lease: &mut Option<Lease>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match inner {
        UpstreamBody::Hyper(body) => Pin::new(body)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into))),
        UpstreamBody::Conn(_) => match lease.as_mut().and_then(|l| l.conn.as_mut()?.lean()) {
            Some(conn) => conn
                .poll_body(cx)
                .map(|f| f.map(|r| r.map(Frame::data).map_err(Into::into))),
            None => Poll::Ready(None),
        },
    }
}

/// The upstream body has no more frames.
fn upstream_ended(inner: &UpstreamBody, lease: &Option<Lease>) -> bool {
    match inner {
        UpstreamBody::Hyper(body) => body.is_end_stream(),
        UpstreamBody::Conn(_) => lease
            .as_ref()
            .and_then(|l| l.conn.as_ref())
            .is_none_or(|c| c.body_ended()),
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Upstream {
                inner,
                timer,
                lease,
            } => {
                match poll_upstream(inner, lease, cx) {
                    Poll::Ready(None) => {
                        if let Some(l) = lease.take() {
                            l.release();
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        timer.reset();
                        if upstream_ended(inner, lease) {
                            if let Some(l) = lease.take() {
                                l.release();
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // The connection is broken: dropping the lease closes it.
                        lease.take();
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Pending if timer.expired(cx) => {
                        lease.take();
                        Poll::Ready(Some(Err(Box::new(BodyTimeout("response")))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(d) => d.is_none(),
            ResponseBody::Upstream { inner, lease, .. } => upstream_ended(inner, lease),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Upstream {
                inner: UpstreamBody::Hyper(body),
                ..
            } => body.size_hint(),
            ResponseBody::Upstream { lease, .. } => {
                match lease.as_ref().and_then(|l| l.conn.as_ref()) {
                    Some(c) => c
                        .body_length()
                        .map_or_else(SizeHint::default, SizeHint::with_exact),
                    None => SizeHint::with_exact(0),
                }
            }
        }
    }
}
