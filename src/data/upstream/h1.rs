//! The upstream HTTP/1.1 exchange, without a dispatcher: a connection is a byte stream, a read
//! buffer and two small state machines (the request going out, the response coming in), all
//! polled by the request that holds the connection. The head goes out in one write with a
//! kept body (in the head's buffer up to `util::http1::JOINED_BODY`, a vectored write past
//! it). The response head is parsed once (`httparse`): when the gateway would change none of
//! its header lines, they are kept as they came ([`HeadLines`], a slice of the read buffer)
//! for the client's connection to write as they are; otherwise they go into a header map whose
//! values share the read buffer. The body is sliced from the same buffer as it arrives.
//!
//! Framing follows RFC 9112 as a client must read it, and refuses what a proxy must not pass
//! on: `Transfer-Encoding` with `Content-Length` is framed by the former and the latter is
//! dropped; conflicting or malformed lengths, `Transfer-Encoding` in HTTP/1.0, a head past
//! [`MAX_HEAD`] or [`MAX_HEADERS`], a malformed chunk are errors (a 502 for the client); a
//! response without a length is read to the close and its connection is not reused. 1xx
//! answers other than 101 are skipped; a connection that was not opened for an upgrade treats a
//! 101 as an error.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::io::AsyncWrite;

use super::body::{BoxError, RequestBody};
use super::pool::UpstreamIo;
use super::Stamp;
use crate::util::http1::{
    chunked_last, decimal, head_end, hex, put_line, ConnectionTokens, Names, JOINED_BODY,
};

/// Largest response head (status line and headers) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head.
pub const MAX_HEADERS: usize = 100;
/// Room in a response's header map beyond the backend's headers: the gateway adds its three to
/// every answer (`proxy::handle`), and a growth rehashes every entry.
const HEADER_ROOM: usize = 4;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;
/// Longest chunk-size line (with its extensions), and most trailer bytes skipped.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// What ended an exchange.
#[derive(Debug)]
pub enum Failure {
    /// The client's request body failed (it broke off, stalled, or went past its limit): not
    /// the backend's doing.
    Client(BoxError),
    /// Reading or writing the connection failed.
    Io(io::Error),
    /// The backend broke HTTP/1.1 (or closed the connection early).
    Protocol(&'static str),
    /// The connection closed (or was reset) before a byte of an answer: on a connection that
    /// sat idle in the pool, the backend closing it as the request left, not a failure of the
    /// backend.
    Closed,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Client(e) => write!(f, "the request body failed: {e}"),
            Failure::Io(e) => write!(f, "upstream connection: {e}"),
            Failure::Protocol(what) => write!(f, "upstream response: {what}"),
            Failure::Closed => write!(f, "the connection closed before a response head"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Client(e) => Some(&**e),
            Failure::Io(e) => Some(e),
            Failure::Protocol(_) | Failure::Closed => None,
        }
    }
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutFraming {
    /// This many bytes left to send.
    Length(u64),
    Chunked,
}

/// The request going out.
enum Sending {
    /// Nothing (more) to send once the outbox is written.
    Done,
    Body {
        body: RequestBody,
        framing: OutFraming,
    },
    /// It failed: the connection is not reused.
    Broken,
}

/// How a body is framed (a response's here; a request's on the proxy listener's own HTTP/1.1
/// connection, `server::http1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// To the connection's close.
    Eof,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to the empty line (bytes skipped so far).
    Trailers(usize),
}

/// The response coming in.
enum Receiving {
    Idle,
    /// Head received; the body is being read.
    Body(Decoder),
    /// The body ended.
    Done,
    /// It failed, or it was read to the close: the connection is not reused.
    Broken,
}

/// One upstream HTTP/1.1 connection.
pub struct Http1 {
    io: Box<dyn UpstreamIo>,
    read: BytesMut,
    /// Written before anything else: the head, a chunk's framing, a body's bytes.
    outbox: Outbox,
    sending: Sending,
    receiving: Receiving,
    /// The request was HEAD (its response has no body).
    head_request: bool,
    /// The backend lets the connection carry another exchange.
    keep_alive: bool,
    /// Bytes of the read buffer already searched for the end of a response head.
    scanned: usize,
    /// The backend's header names, found again by comparison in each later head.
    names: Names,
}

impl Http1 {
    pub fn new(io: Box<dyn UpstreamIo>) -> Http1 {
        Http1 {
            io,
            read: BytesMut::new(),
            outbox: Outbox::default(),
            sending: Sending::Done,
            receiving: Receiving::Idle,
            head_request: false,
            keep_alive: true,
            scanned: 0,
            names: Names::default(),
        }
    }

    /// Between exchanges with nothing left over: it can carry a request.
    pub fn is_idle(&self) -> bool {
        matches!(self.sending, Sending::Done)
            && matches!(self.receiving, Receiving::Idle)
            && self.outbox.is_empty()
            && self.read.is_empty()
            && self.keep_alive
    }

    /// Looked at without waiting: true when the backend closed it or sent bytes nobody asked
    /// for (either way it cannot be used).
    pub fn poll_closed(&mut self) -> bool {
        if !self.is_idle() {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // The room the next response is read into (a look that finds nothing reads nothing).
        self.read.reserve(READ_SIZE);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.read) {
            Poll::Pending => false,
            Poll::Ready(_) => {
                // End of stream, an error, or unasked-for bytes.
                self.keep_alive = false;
                true
            }
        }
    }

    /// The response ended and the connection can carry the next request.
    pub fn reusable(&self) -> bool {
        self.keep_alive
            && matches!(self.sending, Sending::Done)
            && matches!(self.receiving, Receiving::Done)
            && self.outbox.is_empty()
            && self.read.is_empty()
    }

    /// Resets a reusable connection for its next exchange.
    pub fn recycle(&mut self) {
        self.receiving = Receiving::Idle;
    }

    /// Sends a request (its head by reference: the caller keeps it, to send again elsewhere)
    /// and returns the response head once it arrived (1xx skipped), its header lines kept as
    /// they came when the gateway leaves them alone ([`HeadLines`]; its map is then empty).
    /// The request body keeps streaming afterwards, driven by [`Http1::poll_body`].
    pub async fn send<B>(
        &mut self,
        head: &Request<B>,
        stamp: &Stamp<'_>,
        body: RequestBody,
    ) -> Result<Response<Option<HeadLines>>, Failure> {
        self.head_request = head.method() == Method::HEAD;
        // A 2xx to CONNECT may turn the connection into a tunnel: it is never reused.
        self.keep_alive &= head.method() != Method::CONNECT;
        let (framing, joined) = self.encode_head(head, stamp, &body);
        self.sending = match framing {
            // The kept body went in the head's buffer.
            Some(_) if joined => Sending::Done,
            Some(framing) => match body {
                RequestBody::Kept(Some(data)) => {
                    // A kept body goes out with the head, in one write, and fills its length.
                    if let OutFraming::Length(1..) = self.queue_data(framing, data)? {
                        return Err(Failure::Client(
                            "the request body ended before its content-length".into(),
                        ));
                    }
                    if let OutFraming::Chunked = framing {
                        self.outbox.push(Bytes::from_static(b"0\r\n\r\n"));
                    }
                    Sending::Done
                }
                body => Sending::Body { body, framing },
            },
            None => Sending::Done,
        };
        self.receiving = Receiving::Idle;
        poll_fn(|cx| self.poll_head(cx)).await
    }

    /// The request line and headers into the outbox; the body's framing, `None` when none is
    /// sent, and whether the body went with them (a kept body of its length, up to
    /// `JOINED_BODY`, is written in the head's buffer). The lines are
    /// `Stamp::write_head_lines`'s: `host` first, the gateway's after the client's. The framing headers are the client's own, written from the framing: the
    /// request's `content-length` and `transfer-encoding` never go out as they came (an
    /// invalid length beside a chunked body would be the classic desync pair), and `expect` is
    /// not forwarded (the gateway answers the client's expectation itself and sends the body
    /// at once). As hyper's client framed them, so backends see what they saw before: a body
    /// known empty is sent as none (`content-length: 0` when the request declared a length); a
    /// body of known or declared length gets `content-length`; a streamed body of unknown
    /// length is chunked, except on GET, HEAD and CONNECT, which are sent without one.
    fn encode_head<B>(
        &mut self,
        req: &Request<B>,
        stamp: &Stamp<'_>,
        body: &RequestBody,
    ) -> (Option<OutFraming>, bool) {
        let headers = req.headers();
        let (method, uri) = (req.method(), req.uri());
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut size = method.as_str().len() + target.len() + 13 + 2 + stamp.encoded_len();
        let mut lines = FramingLines::default();
        for (name, value) in headers {
            size += name.as_str().len() + value.len() + 4;
            lines.read(name, value);
        }
        let length = |n: u64| Some((&b"content-length"[..], HeaderValue::from(n)));
        let (framing, added): (_, Option<(&[u8], HeaderValue)>) = if body.is_end_stream() {
            (None, lines.length_lines.then_some(0).and_then(length))
        } else if let Ok(Some(n)) = lines.length {
            (Some(OutFraming::Length(n)), length(n))
        } else if let Some(n) = body.size_hint().exact() {
            (Some(OutFraming::Length(n)), length(n))
        } else if matches!(*req.method(), Method::GET | Method::HEAD | Method::CONNECT) {
            (None, None)
        } else {
            let chunked = HeaderValue::from_static("chunked");
            (
                Some(OutFraming::Chunked),
                Some((b"transfer-encoding", chunked)),
            )
        };
        if let Some((name, value)) = &added {
            size += name.len() + value.len() + 4;
        }
        let joined = match (framing, body) {
            (Some(OutFraming::Length(n)), RequestBody::Kept(Some(data)))
                if data.len() as u64 == n && data.len() <= JOINED_BODY =>
            {
                Some(data)
            }
            _ => None,
        };
        size += joined.map_or(0, |data| data.len());
        let head = self.outbox.head_buffer(size);
        head.extend_from_slice(method.as_str().as_bytes());
        head.extend_from_slice(b" ");
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        stamp.write_head_lines(head, headers, |name| {
            *name != TRANSFER_ENCODING && *name != CONTENT_LENGTH && *name != http::header::EXPECT
        });
        if let Some((name, value)) = &added {
            put_line(head, name, value.as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        if let Some(data) = joined {
            head.extend_from_slice(data);
        }
        self.outbox.push_head();
        (framing, joined.is_some())
    }

    /// A body frame's bytes into the outbox, framed.
    fn queue_data(&mut self, framing: OutFraming, data: Bytes) -> Result<OutFraming, Failure> {
        if data.is_empty() {
            return Ok(framing);
        }
        match framing {
            OutFraming::Length(left) => {
                let Some(left) = left.checked_sub(data.len() as u64) else {
                    return Err(Failure::Client(
                        "the request body is longer than its content-length".into(),
                    ));
                };
                self.outbox.push(data);
                Ok(OutFraming::Length(left))
            }
            OutFraming::Chunked => {
                self.outbox
                    .push(Bytes::from(format!("{:x}\r\n", data.len()).into_bytes()));
                self.outbox.push(data);
                self.outbox.push(Bytes::from_static(b"\r\n"));
                Ok(OutFraming::Chunked)
            }
        }
    }

    /// Writes what is queued and moves the request body along. Ready once everything is sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        loop {
            if let Err(e) = ready!(self.outbox.poll_write(&mut self.io, cx)) {
                self.sending = Sending::Broken;
                self.outbox.queue.clear();
                return Poll::Ready(Err(Failure::Io(e)));
            }
            // Called only while sending (`still_sending`): `Done` here means all is written.
            let Sending::Body { body, framing } = &mut self.sending else {
                return Poll::Ready(Ok(()));
            };
            let framing = *framing;
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not forwarded
                    };
                    match self.queue_data(framing, data) {
                        // The declared length is sent: the exchange does not wait for the
                        // body's end (an HTTP/2 client may mark it late).
                        Ok(OutFraming::Length(0)) => self.sending = Sending::Done,
                        Ok(next) => {
                            if let Sending::Body { framing, .. } = &mut self.sending {
                                *framing = next;
                            }
                        }
                        Err(e) => {
                            self.sending = Sending::Broken;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Some(Err(e)) => {
                    self.sending = Sending::Broken;
                    return Poll::Ready(Err(Failure::Client(e)));
                }
                None => {
                    match framing {
                        OutFraming::Length(0) => {}
                        OutFraming::Length(_) => {
                            self.sending = Sending::Broken;
                            return Poll::Ready(Err(Failure::Client(
                                "the request body ended before its content-length".into(),
                            )));
                        }
                        OutFraming::Chunked => {
                            self.outbox.push(Bytes::from_static(b"0\r\n\r\n"));
                        }
                    }
                    self.sending = Sending::Done;
                }
            }
        }
    }

    /// Sends what it can, then reads until a final response head is parsed.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<Option<HeadLines>>, Failure>> {
        if self.still_sending() {
            match self.poll_send(cx) {
                // The backend may answer (say 413) and close before it read the whole
                // request: its answer, or its close, is what the read below reports.
                Poll::Ready(Err(Failure::Io(e))) => {
                    tracing::debug!(error = %e, "writing the request failed before an answer");
                    self.keep_alive = false;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        loop {
            match parse_head(
                &mut self.read,
                &mut self.scanned,
                &mut self.names,
                self.head_request,
            )? {
                Some(Parsed::Informational) => continue,
                Some(Parsed::Final(resp, decoder, keep_alive)) => {
                    self.keep_alive &= keep_alive;
                    self.receiving = match decoder {
                        Decoder::Length(0) => Receiving::Done,
                        Decoder::Eof => {
                            self.keep_alive = false;
                            Receiving::Body(Decoder::Eof)
                        }
                        d => Receiving::Body(d),
                    };
                    return Poll::Ready(Ok(resp));
                }
                None => {}
            }
            if self.read.len() >= MAX_HEAD {
                return Poll::Ready(Err(Failure::Protocol("the response head is too large")));
            }
            let nothing_read = self.read.is_empty();
            let filled = match ready!(self.poll_fill(cx)) {
                Ok(n) => n,
                // Reset before a byte of an answer: the backend dropped the connection.
                Err(Failure::Io(e))
                    if nothing_read && e.kind() == io::ErrorKind::ConnectionReset =>
                {
                    return Poll::Ready(Err(Failure::Closed));
                }
                Err(e) => return Poll::Ready(Err(e)),
            };
            if filled == 0 {
                self.keep_alive = false;
                return Poll::Ready(Err(if nothing_read {
                    Failure::Closed
                } else {
                    Failure::Protocol("the connection closed in the middle of a response head")
                }));
            }
        }
    }

    /// One read into the buffer: the bytes read, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Failure>> {
        self.read.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read).map_err(|e| {
            self.keep_alive = false;
            Failure::Io(e)
        })
    }

    /// The response's next body bytes; `None` at its end. The request body, if it is still
    /// streaming, is moved along first (a backend may answer before it read it all).
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Failure>>> {
        if self.still_sending() {
            // The backend has answered: if it stopped reading, or the client's body broke off
            // or went past its limit, sending stops and the answer is still read whole (the
            // connection is not reused).
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                tracing::debug!(error = %e, "the request body stopped after the response head");
                self.keep_alive = false;
            }
        }
        let result = self.poll_decode(cx);
        if let Poll::Ready(Some(Err(_))) = &result {
            self.receiving = Receiving::Broken;
        }
        result
    }

    fn poll_decode(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Failure>>> {
        loop {
            let decoder = match &mut self.receiving {
                Receiving::Body(d) => d,
                Receiving::Done | Receiving::Idle => return Poll::Ready(None),
                Receiving::Broken => {
                    return Poll::Ready(Some(Err(Failure::Protocol("the response broke off"))));
                }
            };
            match decode(decoder, &mut self.read)? {
                Decoded::Data(data) => return Poll::Ready(Some(Ok(data))),
                // The body is seen ended with its last bytes (a server writing a sized body
                // may not poll it again), and the connection goes back to its pool.
                Decoded::Last(data) => {
                    self.receiving = Receiving::Done;
                    return Poll::Ready(Some(Ok(data)));
                }
                Decoded::End => {
                    self.receiving = Receiving::Done;
                    return Poll::Ready(None);
                }
                Decoded::More => {}
            }
            if ready!(self.poll_fill(cx))? == 0 {
                if let Receiving::Body(Decoder::Eof) = self.receiving {
                    self.receiving = Receiving::Broken; // read to the close: never reused
                    self.keep_alive = false;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Failure::Protocol(
                    "the connection closed before the response body ended",
                ))));
            }
        }
    }

    /// Request bytes or body are still to go out (and sending has not failed).
    fn still_sending(&self) -> bool {
        match self.sending {
            Sending::Body { .. } => true,
            Sending::Done => !self.outbox.is_empty(),
            Sending::Broken => false,
        }
    }

    /// The response body has ended (or there is none).
    pub fn body_ended(&self) -> bool {
        !matches!(self.receiving, Receiving::Body(_))
    }

    /// The response body's exact length, when it is known.
    pub fn body_length(&self) -> Option<u64> {
        match self.receiving {
            Receiving::Body(Decoder::Length(n)) => Some(n),
            Receiving::Body(_) => None,
            _ => Some(0),
        }
    }
}

/// Bytes waiting to be written, in order: one piece by a plain write, more by one vectored
/// write when the connection takes them.
#[derive(Default)]
struct Outbox {
    queue: std::collections::VecDeque<Bytes>,
    /// Heads are encoded here; its memory is reused once the written head is dropped.
    head: BytesMut,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn head_buffer(&mut self, size: usize) -> &mut BytesMut {
        self.head.clear();
        self.head.reserve(size);
        &mut self.head
    }

    fn push_head(&mut self) {
        let head = self.head.split().freeze();
        self.queue.push_back(head);
    }

    fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queue.push_back(bytes);
        }
    }

    fn poll_write(
        &mut self,
        io: &mut Box<dyn UpstreamIo>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let n = if self.queue.len() > 1 && io.is_write_vectored() {
                let mut slices = [io::IoSlice::new(&[]); 4];
                let mut count = 0;
                for (slot, b) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = io::IoSlice::new(b);
                    count += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?
            } else {
                let first = self.queue.front().map_or(&[][..], |b| &b[..]);
                ready!(Pin::new(&mut *io).poll_write(cx, first))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(n);
        }
        Pin::new(&mut **io).poll_flush(cx)
    }

    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.queue.front_mut() else {
                return;
            };
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

enum Parsed {
    /// A 1xx (not 101): skipped.
    Informational,
    /// The final response head (its header lines kept as they came, when the gateway leaves
    /// them alone: then its map is empty), its body's framing, and whether the connection
    /// stays open.
    Final(Response<Option<HeadLines>>, Decoder, bool),
}

/// A response head at the start of `buf`, taken from it; `None` while it is incomplete.
fn parse_head(
    buf: &mut BytesMut,
    scanned: &mut usize,
    names: &mut Names,
    head_request: bool,
) -> Result<Option<Parsed>, Failure> {
    // The search resumes where the last one stopped (less the two bytes an end line may
    // straddle), so that a head arriving in many small reads is scanned once.
    let from = scanned.saturating_sub(2).min(buf.len());
    let Some(end) = head_end(&buf[from..]).map(|end| from + end) else {
        *scanned = buf.len();
        return Ok(None);
    };
    *scanned = 0;
    // The head's bytes become the header values' storage: no copy.
    let head = buf.split_to(end).freeze();
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        &head,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        Ok(_) => return Err(Failure::Protocol("the response head is malformed")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Failure::Protocol("the response has too many headers"))
        }
        Err(_) => return Err(Failure::Protocol("the response head is malformed")),
    }
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| Failure::Protocol("the response status is invalid"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Failure::Protocol("the backend switched protocols unasked"));
    }
    if status.is_informational() {
        return Ok(Some(Parsed::Informational));
    }
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut resp = Response::new(None);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    let mut tokens = ConnectionTokens::default();
    let lines = match plain_lines(status, &head, parsed.headers) {
        // Nothing in them to look up or change: no map is built, no `connection` line is
        // among them, and the framing comes from the one length line, if any.
        Some(kept) => {
            let lines = FramingLines {
                length_lines: kept.length.is_some(),
                length: Ok(kept.length),
                coding: None,
            };
            *resp.body_mut() = Some(kept);
            lines
        }
        None => {
            let mut headers = HeaderMap::with_capacity(parsed.headers.len() + HEADER_ROOM);
            let mut lines = FramingLines::default();
            for h in parsed.headers.iter() {
                let name = names
                    .name(h.name.as_bytes())
                    .ok_or(Failure::Protocol("a response header name is invalid"))?;
                let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
                    .map_err(|_| Failure::Protocol("a response header value is invalid"))?;
                if name == http::header::CONNECTION {
                    tokens.read(value.as_bytes());
                }
                lines.read(&name, &value);
                headers.append(name, value);
            }
            *resp.headers_mut() = headers;
            lines
        }
    };
    // `close` anywhere wins; HTTP/1.0 stays open only when it says keep-alive.
    let keep_alive = tokens.keep_alive(version == Version::HTTP_11);
    let decoder = framing(status, version, head_request, &lines, resp.headers_mut())?;
    Ok(Some(Parsed::Final(resp, decoder, keep_alive)))
}

/// A response head's header lines as the backend wrote them, passed on to an HTTP/1.1 client
/// as they are (`server::http1` writes them after its status line): no header map is built,
/// hashed and walked again on the way. Kept only for a head the gateway leaves alone; any
/// other goes into the response's header map (see [`plain_lines`]).
#[derive(Debug, Clone)]
pub struct HeadLines {
    /// The header lines, each ending in CRLF (the head's closing empty line not included).
    pub bytes: Bytes,
    /// The value of its one `content-length` line, if any.
    pub length: Option<u64>,
    /// It has a `date` line.
    pub dated: bool,
}

impl HeadLines {
    /// The lines into a header map (for a client the lines cannot go to as they are: one
    /// speaking HTTP/2, or through hyper's connection). Their values share the lines' bytes.
    pub fn fill(self, headers: &mut HeaderMap) {
        let bytes = &self.bytes;
        for line in bytes.split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = memchr::memchr(b':', line) else {
                continue;
            };
            let value = line[colon + 1..].trim_ascii();
            // Both checked as they were parsed; never fails, and a line that did would be
            // left out rather than passed on.
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_maybe_shared(bytes.slice_ref(value)),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// What the gateway does with a response header line of this name.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Plain,
    Length,
    Date,
    /// Removed or replaced on the way to the client: hop-by-hop (RFC 9110 §7.6.1), the
    /// gateway's own (`x-shardgate-*`, which the answer's stamp may replace) and
    /// `x-request-id` (replaced by the stamp).
    Changed,
}

/// The hop-by-hop names are `data::headers::is_hop_by_hop`'s (a test walks them through both),
/// the others the answer's stamp (`proxy::stamp_answer`) and `x-shardgate-*` at large.
fn line_kind(name: &[u8]) -> LineKind {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 if is("te") => LineKind::Changed,
        4 if is("date") => LineKind::Date,
        7 if is("trailer") || is("upgrade") => LineKind::Changed,
        10 if is("connection") || is("keep-alive") => LineKind::Changed,
        12 if is("x-request-id") => LineKind::Changed,
        14 if is("content-length") => LineKind::Length,
        16 if is("proxy-connection") => LineKind::Changed,
        17 if is("transfer-encoding") => LineKind::Changed,
        18 if is("proxy-authenticate") => LineKind::Changed,
        19 if is("proxy-authorization") => LineKind::Changed,
        n if n >= 12 && name[..12].eq_ignore_ascii_case(b"x-shardgate-") => LineKind::Changed,
        _ => LineKind::Plain,
    }
}

/// The head's header lines kept as they came, when the gateway would change none of them: no
/// header is hop-by-hop or one the gateway replaces, one `content-length` at most and plain
/// digits, no value empty, every line ending in CRLF straight after its value (no trailing
/// blanks, no bare LF), and a status whose answer is passed on as it is (not 204 or 304, whose
/// framing lines the listener drops, nor 421, whose owner headers the gateway reads).
fn plain_lines(
    status: StatusCode,
    head: &Bytes,
    headers: &[httparse::Header<'_>],
) -> Option<HeadLines> {
    if matches!(status.as_u16(), 204 | 304 | 421) {
        return None;
    }
    let (Some(first), Some(last)) = (headers.first(), headers.last()) else {
        return Some(HeadLines {
            bytes: Bytes::new(),
            length: None,
            dated: false,
        });
    };
    let base = head.as_ptr() as usize;
    let at = |s: &[u8]| s.as_ptr() as usize - base;
    let (mut length, mut dated) = (None, false);
    for (i, h) in headers.iter().enumerate() {
        match line_kind(h.name.as_bytes()) {
            LineKind::Plain => {}
            LineKind::Date => dated = true,
            LineKind::Length if length.is_none() => length = Some(decimal(h.value)?),
            LineKind::Length | LineKind::Changed => return None,
        }
        if h.value.is_empty() {
            return None;
        }
        let end = at(h.value) + h.value.len();
        if head.get(end..end + 2) != Some(b"\r\n") {
            return None;
        }
        let next = match headers.get(i + 1) {
            Some(next) => at(next.name.as_bytes()),
            // The head's closing empty line.
            None if head.len() == end + 4 => end + 2,
            None => return None,
        };
        if next != end + 2 {
            return None;
        }
    }
    let end = at(last.value) + last.value.len() + 2;
    Some(HeadLines {
        bytes: head.slice(at(first.name.as_bytes())..end),
        length,
        dated,
    })
}

/// The response body's framing (RFC 9112 §6.3, as a client), from its framing lines.
fn framing(
    status: StatusCode,
    version: Version,
    head_request: bool,
    lines: &FramingLines,
    headers: &mut HeaderMap,
) -> Result<Decoder, Failure> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Decoder::Length(0));
    }
    if let Some(chunked) = lines.coding {
        if version == Version::HTTP_10 {
            return Err(Failure::Protocol(
                "an HTTP/1.0 response has transfer-encoding",
            ));
        }
        // Transfer-Encoding frames it; a Content-Length beside it is dropped, never passed on.
        if lines.length_lines {
            headers.remove(CONTENT_LENGTH);
        }
        return Ok(if chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            Decoder::Eof
        });
    }
    match lines.length {
        Ok(Some(n)) => Ok(Decoder::Length(n)),
        Ok(None) => Ok(Decoder::Eof),
        Err(()) => Err(Failure::Protocol("the response content-length is invalid")),
    }
}

/// A head's framing lines, read as its lines go by: nothing is looked up in the map after.
struct FramingLines {
    /// A `Content-Length` line was seen.
    length_lines: bool,
    /// Every `Content-Length` value (lines and comma-separated) as one length: `None` when
    /// there is none, an error when one is not a number or two differ.
    length: Result<Option<u64>, ()>,
    /// `Transfer-Encoding` was seen: whether its last line's last coding is `chunked`.
    coding: Option<bool>,
}

impl Default for FramingLines {
    fn default() -> FramingLines {
        FramingLines {
            length_lines: false,
            length: Ok(None),
            coding: None,
        }
    }
}

impl FramingLines {
    fn read(&mut self, name: &http::HeaderName, value: &HeaderValue) {
        if *name == CONTENT_LENGTH {
            self.length_lines = true;
            self.length = self.length.and_then(|found| {
                value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .try_fold(found, |found, item| {
                        let n = decimal(item.trim_ascii()).ok_or(())?;
                        match found {
                            Some(f) if f != n => Err(()),
                            _ => Ok(Some(n)),
                        }
                    })
            });
        } else if *name == TRANSFER_ENCODING {
            self.coding = Some(chunked_last(value.as_bytes()));
        }
    }

    #[cfg(test)]
    fn of(headers: &HeaderMap) -> FramingLines {
        let mut lines = FramingLines::default();
        for (name, value) in headers {
            lines.read(name, value);
        }
        lines
    }
}

pub(crate) enum Decoded {
    Data(Bytes),
    /// The body's last bytes: it ends with them.
    Last(Bytes),
    End,
    /// Needs more bytes.
    More,
}

/// What follows a chunk's data when it was the last one: its CRLF, the last chunk and an
/// empty trailer section.
const TERMINATOR: &[u8] = b"\r\n0\r\n\r\n";

/// The next step of a body out of `buf`.
pub(crate) fn decode(decoder: &mut Decoder, buf: &mut BytesMut) -> Result<Decoded, Failure> {
    match decoder {
        Decoder::Length(0) => Ok(Decoded::End),
        Decoder::Length(left) => {
            if buf.is_empty() {
                return Ok(Decoded::More);
            }
            let n = (*left).min(buf.len() as u64) as usize;
            *left -= n as u64;
            let data = buf.split_to(n).freeze();
            Ok(if *left == 0 {
                Decoded::Last(data)
            } else {
                Decoded::Data(data)
            })
        }
        Decoder::Eof => {
            if buf.is_empty() {
                return Ok(Decoded::More);
            }
            Ok(Decoded::Data(buf.split().freeze()))
        }
        Decoder::Chunked(state) => decode_chunked(state, buf),
    }
}

fn decode_chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, Failure> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = find_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Decoded::More);
                };
                let line = &buf[..end];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                // What follows the size is nothing, or an extension (`;name=value`, blanks
                // allowed before the `;`), ignored.
                let rest = &line[digits..];
                let size = hex(&line[..digits])
                    .filter(|_| rest.is_empty() || rest.trim_ascii_start().starts_with(b";"))
                    .ok_or(Failure::Protocol("a chunk size is invalid"))?;
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = left.min(buf.len() as u64) as usize;
                let data = buf.split_to(n).freeze();
                if n as u64 != left {
                    *state = Chunk::Data(left - n as u64);
                    return Ok(Decoded::Data(data));
                }
                // The chunk is whole; when the end of the body is already read right behind
                // it (and nothing else), these are its last bytes.
                if buf[..] == *TERMINATOR {
                    buf.clear();
                    return Ok(Decoded::Last(data));
                }
                *state = Chunk::DataEnd;
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Failure::Protocol("a chunk does not end with CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers(skipped) => {
                let Some(end) = find_line(buf, MAX_TRAILERS.saturating_sub(skipped))? else {
                    return Ok(Decoded::More);
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(Decoded::End);
                }
                *state = Chunk::Trailers(skipped + end + 2);
            }
        }
    }
}

/// The length of the CRLF-terminated line at the start of `buf` (without the CRLF), `None`
/// while it is incomplete; an error past `limit` bytes or on a bare LF.
fn find_line(buf: &[u8], limit: usize) -> Result<Option<usize>, Failure> {
    match buf
        .iter()
        .take(limit.saturating_add(2))
        .position(|b| *b == b'\n')
    {
        Some(0) => Err(Failure::Protocol("a chunk line is malformed")),
        Some(i) if buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(Failure::Protocol("a chunk line is malformed")),
        None if buf.len() > limit => Err(Failure::Protocol("a chunk line is too long")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests;
