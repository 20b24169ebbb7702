//! A request's body as a handler receives it: read by hyper (HTTP/2, TLS, upgrades and the
//! admin listener), or by the proxy listener's own HTTP/1.1 connection (`server::http1`). It
//! lives here, beside the body sent upstream, because the upstream client streams it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::body::BoxError;

/// The body of a request from a client.
pub enum ClientBody {
    /// Read by hyper.
    Hyper(Incoming),
    /// Read by the listener's own HTTP/1.1 connection, from the socket as it is polled.
    Wire(WireBody),
    /// Came whole with the head (a fixed length already read).
    Full(Option<Bytes>),
    /// No body.
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(inner) => Pin::new(inner)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            ClientBody::Wire(inner) => inner.poll_frame(cx),
            ClientBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(inner) => inner.is_end_stream(),
            ClientBody::Wire(inner) => inner.is_end_stream(),
            ClientBody::Full(b) => b.is_none(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(inner) => inner.size_hint(),
            ClientBody::Wire(inner) => inner.size_hint(),
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A connection a request body is read from as it is polled (the listener's own HTTP/1.1
/// connection), by the request's number on it: a body of an earlier request reads nothing.
pub trait WireRead: Send + Sync {
    fn poll_body(&self, seq: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>>;
    /// The body was read whole (false once the connection moved on: the handle cannot tell).
    fn body_ended(&self, seq: u64) -> bool;
    /// The handle was dropped, its body perhaps unread.
    fn body_dropped(&self, seq: u64);
}

/// A request body read from the client's connection as it is polled (by the handler's task,
/// or the upstream connection's).
pub struct WireBody {
    wire: Arc<dyn WireRead>,
    seq: u64,
    /// Its length, when it has one (for the size hint).
    length: Option<u64>,
    /// This handle saw its body end.
    ended: bool,
}

impl Drop for WireBody {
    fn drop(&mut self) {
        if !self.ended {
            self.wire.body_dropped(self.seq);
        }
    }
}

impl WireBody {
    pub fn new(wire: Arc<dyn WireRead>, seq: u64, length: Option<u64>) -> WireBody {
        WireBody {
            wire,
            seq,
            length,
            ended: false,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.wire.poll_body(self.seq, cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            // The last bytes: noted while the connection is still on this request.
            Poll::Ready(Some(Ok(_))) => self.ended = self.wire.body_ended(self.seq),
            _ => {}
        }
        polled.map(|r| r.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.wire.body_ended(self.seq)
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
