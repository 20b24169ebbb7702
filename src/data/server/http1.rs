//! The proxy listener's own HTTP/1.1 connection, for plain connections through the gate.
//!
//! hyper's HTTP/1 server copies each request through the gate into its own buffer, parses the
//! head a second time, dispatches it, and encodes the answer; here each head is read once into
//! one buffer and parsed once (the gate's [`gate::examine`]: its size, framing and smuggling
//! checks are the same), header values and fixed-length bodies are slices of that buffer, a
//! streamed body is decoded from it as the handler polls it (with the upstream client's
//! decoders), and an answer's head goes out with its first body bytes in one write.
//!
//! What is rare is left to hyper: a head the gate refuses or steps aside from, one asking for an
//! upgrade (or CONNECT), one with `Expect`, HTTP/2's preface, a target or header the `http`
//! types refuse. The gate is then given the bytes read so far ([`Gate::preload`]) and lent to
//! hyper as before; when that connection rests, the next request comes back here.
//!
//! Keep-alive follows RFC 9112 §9.3 (HTTP/1.1 unless `close`, HTTP/1.0 only with
//! `keep-alive`); a connection closes after an answer whose request body was not read whole
//! (what is already buffered is skipped), after a failed body, and once the listener drains.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING};
use http::Version;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::gate::{self, Examined, Gate, State};
use super::rest::Sending;
use super::Activity;
use crate::data::upstream::body::{BoxError, ResponseBody};
use crate::data::upstream::client_body::{ClientBody, WireBody, WireRead};
use crate::data::upstream::h1::{decode, Chunk, Decoded, Decoder, HeadLines};
use crate::util::http1::{decimal, put_line, ConnectionTokens, Names, JOINED_BODY};

/// Room made in the read buffer before a read.
const READ_SIZE: usize = 8 * 1024;
/// Room in a request's header map beyond the client's headers: an upgrade's two
/// (`upgrade::keep_upgrade_headers`). The gateway's own headers go beside the map
/// (`upstream::Stamp`), not into it.
const HEADER_ROOM: usize = 2;

/// The handler, as the connection calls it.
pub(super) type Call = Arc<
    dyn Fn(Request<ClientBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>
        + Send
        + Sync,
>;

/// The client stream the connection serves: what the gate is given by the listener.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// How a stretch of the connection's life ended.
pub(super) enum Ended {
    /// Nothing to do: the connection may rest (the buffer is empty, nothing is in flight).
    Rest,
    /// The client closed, an error, or an answer that ends the connection.
    Close,
    /// A request for hyper: the gate holds it (and what followed); lend the gate to hyper.
    Hyper,
}

/// What the connection shares with the body of the request in flight.
pub(super) struct Wire<I> {
    /// The client stream, while this connection serves it (hyper has it otherwise, or it
    /// rests).
    pub(super) gate: Option<Gate<I>>,
    /// Read from the client, not yet taken: a head, a body's bytes, pipelined requests.
    buf: BytesMut,
    /// The framing of the in-flight request's body while it is not read whole.
    body: Option<Decoder>,
    /// Requests parsed so far: a body of an earlier request reads nothing more.
    seq: u64,
    /// The body failed (malformed, cut short): the connection ends after the answer.
    broken: bool,
    /// The client closed its side with requests still buffered: they are answered, then the
    /// connection ends.
    ended: bool,
    /// The request's body handle was dropped with its body unread: nobody reads it now, so
    /// the wait for a hang-up may read (the bytes stay in the buffer for `finish_body`).
    abandoned: bool,
    /// The wait for a hang-up, parked while a body handle reads the connection; woken when
    /// the handle is dropped.
    parked: Option<Waker>,
    /// How far `buf` was searched for the end of a head.
    searched: usize,
    /// The parsed head's fields (name, where the value is in the buffer, its length); kept
    /// from one request to the next for its room.
    fields: Vec<(HeaderName, usize, usize)>,
    /// The client's header names, found again by comparison in each later head.
    names: Names,
}

impl<I> Wire<I> {
    /// The wire of one stretch of the connection's life, over its gate.
    pub(super) fn new(gate: Gate<I>) -> Wire<I> {
        Wire {
            gate: Some(gate),
            buf: BytesMut::new(),
            body: None,
            seq: 0,
            broken: false,
            ended: false,
            abandoned: false,
            parked: None,
            searched: 0,
            fields: Vec::new(),
            names: Names::default(),
        }
    }

    /// Whether any request was served in this stretch.
    pub(super) fn served(&self) -> bool {
        self.seq > 0
    }
}

pub(super) fn lock<I>(wire: &Mutex<Wire<I>>) -> MutexGuard<'_, Wire<I>> {
    // A panic while the lock was held cannot leave the buffer torn in a way that matters more
    // than closing: the connection goes on with what is there.
    wire.lock().unwrap_or_else(|e| e.into_inner())
}

/// The next request and what answering it needs; or why there is none.
type Next = Result<(Request<ClientBody>, Head), Ended>;

/// What the connection keeps of a request to answer it.
#[derive(Clone, Copy)]
struct Head {
    version: Version,
    head_method: bool,
    keep_alive: bool,
}

/// What the parse of a head found, before the buffer is cut.
struct Parsed {
    method: Method,
    /// Where the request target is in the buffer, and its length.
    target: (usize, usize),
    head: Head,
}

/// Serves requests until the connection should rest, close, or go to hyper.
pub(super) async fn serve<I: Io>(
    wire: &Arc<Mutex<Wire<I>>>,
    call: &Call,
    activity: &Arc<Activity>,
    shutdown: &mut watch::Receiver<bool>,
    max_head: usize,
) -> Ended {
    let mut out = Vec::new();
    // The drain's signal, waited on between requests; made once for the connection's stretch
    // here, not once per request. `draining` reads the value.
    let draining = shutdown.clone();
    let drain = shutdown.changed();
    tokio::pin!(drain);
    loop {
        let (req, head) =
            match next_request(wire, activity, &draining, drain.as_mut(), max_head).await {
                Ok(next) => next,
                Err(ended) => return ended,
            };
        let busy = activity.request_started();
        // A client that hangs up takes its request with it (as with hyper): the pipeline's
        // future is dropped, and with it the upstream exchange.
        let response = tokio::select! {
            biased;
            response = call(req) => response,
            () = hung_up(wire, max_head) => {
                tracing::debug!("the client closed its connection before the answer");
                return Ended::Close;
            }
        };
        drop(busy);
        // A request body that already failed ends the connection: the answer says so.
        let keep_alive = head.keep_alive && !*draining.borrow() && !lock(wire).broken;
        let (parts, mut body) = response.into_parts();
        let lines = body.take_lines();
        let body = Sending::new(body, activity.clone());
        // The answer's body may take long (a stream, a long poll): a client that hangs up
        // meanwhile ends it, and the upstream exchange with it. Pinned where it is made:
        // `select!` then holds a reference, not a copy of the answer's future.
        let answering = std::pin::pin!(respond(
            wire, parts, lines, body, head, keep_alive, &mut out
        ));
        let sent = tokio::select! {
            biased;
            sent = answering => sent,
            () = hung_up(wire, max_head) => {
                tracing::debug!("the client closed its connection during the answer");
                return Ended::Close;
            }
        };
        match sent {
            Ok(true) if finish_body(wire) => {}
            Ok(_) => return Ended::Close,
            Err(e) => {
                tracing::debug!(error = %e, "writing an answer to the client failed");
                return Ended::Close;
            }
        }
    }
}

/// Resolves when the client closes the connection (or it fails) while its request is in
/// flight or answered. Bytes that come meanwhile (pipelined requests) are kept in the buffer,
/// up to twice the head limit; a body being read is the body's to read, and its end its to
/// see (until its handle is dropped unread). A client that closes its side with requests
/// still buffered behind the one in flight (a half-close after pipelining) has them answered:
/// its end is noted and seen once the buffer is empty. One that closes with nothing buffered
/// is taken as gone, as hyper and nginx take it: the request in flight is dropped.
async fn hung_up<I: Io>(wire: &Mutex<Wire<I>>, max_head: usize) {
    poll_fn(|cx| {
        let mut w = lock(wire);
        loop {
            if w.body.is_some() && !w.abandoned {
                w.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if w.ended || w.buf.len() > 2 * max_head {
                return Poll::Pending;
            }
            match w.poll_fill(cx) {
                // Requests buffered (no body pending): a half-close after pipelining.
                Poll::Ready(Ok(0)) if !w.buf.is_empty() && w.body.is_none() => {
                    w.ended = true;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Reads and parses the next request head; or says why there is none.
async fn next_request<I: Io>(
    wire: &Arc<Mutex<Wire<I>>>,
    activity: &Activity,
    draining: &watch::Receiver<bool>,
    mut drain: Pin<&mut impl Future>,
    max_head: usize,
) -> Next {
    loop {
        {
            let mut w = lock(wire);
            if !w.buf.is_empty() {
                if let Some(next) = w.parse(wire, max_head) {
                    return next;
                }
            }
            // The client's end was seen (a half-close): nothing more comes.
            if w.ended || (w.buf.is_empty() && *draining.borrow()) {
                return Err(Ended::Close);
            }
        }
        let read = poll_fn(|cx| {
            let mut w = lock(wire);
            if w.buf.is_empty() && activity.rest_asked() {
                return Poll::Ready(Ok(None));
            }
            w.poll_fill(cx).map_ok(Some)
        });
        tokio::select! {
            biased;
            read = read => match read {
                Ok(Some(0)) | Err(_) => return Err(Ended::Close),
                Ok(Some(_)) => {}
                Ok(None) => return Err(Ended::Rest),
            },
            // The listener drains (or is gone, which `changed` says at once, every time): a
            // connection waiting for a head closes, even one whose head is still coming.
            _ = drain.as_mut() => return Err(Ended::Close),
        }
    }
}

impl<I: Io> Wire<I> {
    /// Reads what the client sent into the buffer: the bytes read (0 at its end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Wire { gate, buf, .. } = self;
        let Some(gate) = gate.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(gate.inner_mut()), cx, buf)
    }

    /// The request at the start of the buffer, when a whole head is there; `None` while it
    /// is not.
    fn parse(&mut self, shared: &Arc<Mutex<Wire<I>>>, max_head: usize) -> Option<Next> {
        let Wire {
            buf,
            fields,
            searched,
            names,
            ..
        } = self;
        fields.clear();
        let base = buf.as_ptr() as usize;
        let verdict = gate::examine(&buf[..], *searched, max_head, |req| {
            parse_head(req, base, fields, names)
        });
        let (len, state, parsed) = match verdict {
            Examined::Incomplete => {
                *searched = buf.len();
                return None;
            }
            Examined::Head {
                len,
                state,
                upgrade: false,
                parsed: Some(parsed),
            } => (len, state, parsed),
            _ => return Some(self.hand_over(None)),
        };
        self.searched = 0;
        let head = self.buf.split_to(len).freeze();
        let Some(request) = self.request(&head, &parsed) else {
            return Some(self.hand_over(Some(head)));
        };
        let body = match state {
            State::Head => ClientBody::Empty,
            State::Fixed(n) if n <= self.buf.len() as u64 => {
                ClientBody::Full(Some(self.buf.split_to(n as usize).freeze()))
            }
            State::Fixed(n) => self.stream_body(shared, Decoder::Length(n)),
            State::ChunkSize => self.stream_body(shared, Decoder::Chunked(Chunk::Size)),
            _ => return Some(self.hand_over(Some(head))),
        };
        self.seq += 1;
        Some(Ok((request.map(|()| body), parsed.head)))
    }

    /// The body of the request being parsed, read from the connection as it is polled.
    fn stream_body(&mut self, shared: &Arc<Mutex<Wire<I>>>, decoder: Decoder) -> ClientBody {
        self.body = Some(decoder);
        self.abandoned = false;
        let length = match decoder {
            Decoder::Length(n) => Some(n),
            _ => None,
        };
        ClientBody::Wire(WireBody::new(shared.clone(), self.seq + 1, length))
    }

    /// The request of a parsed head, its values slices of `head`; `None` when the `http` types
    /// refuse its target or a value (hyper then answers it).
    fn request(&mut self, head: &Bytes, parsed: &Parsed) -> Option<Request<()>> {
        let target = parsed.target;
        let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1)).ok()?;
        let mut headers = HeaderMap::with_capacity(self.fields.len() + HEADER_ROOM);
        for (name, at, len) in self.fields.drain(..) {
            let value = HeaderValue::from_maybe_shared(head.slice(at..at + len)).ok()?;
            headers.append(name, value);
        }
        let mut request = Request::new(());
        *request.method_mut() = parsed.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = parsed.head.version;
        *request.headers_mut() = headers;
        Some(request)
    }

    /// Gives the gate what was read (a head it will refuse, step aside from, or hold for an
    /// upgrade; then what followed), for hyper to serve.
    fn hand_over(&mut self, head: Option<Bytes>) -> Next {
        self.searched = 0;
        let rest = self.buf.split();
        if let Some(gate) = self.gate.as_mut() {
            if let Some(head) = head {
                gate.preload(&head);
            }
            gate.preload(&rest);
        }
        Err(Ended::Hyper)
    }
}

/// What the connection needs of a parsed head, with the places of its target and values in
/// the buffer starting at `base`; `None` for what is left to hyper (no parse of the `http`
/// types, `Expect`, a version other than 1.0 and 1.1).
fn parse_head(
    req: &httparse::Request<'_, '_>,
    base: usize,
    fields: &mut Vec<(HeaderName, usize, usize)>,
    names: &mut Names,
) -> Option<Parsed> {
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let path = req.path?;
    let version = match req.version? {
        1 => Version::HTTP_11,
        0 => Version::HTTP_10,
        _ => return None,
    };
    let mut tokens = ConnectionTokens::default();
    for h in req.headers.iter() {
        let name = names.name(h.name.as_bytes())?;
        if name == EXPECT {
            return None;
        }
        if name == CONNECTION {
            tokens.read(h.value);
        }
        fields.push((name, h.value.as_ptr() as usize - base, h.value.len()));
    }
    let keep_alive = tokens.keep_alive(version == Version::HTTP_11);
    let head_method = method == Method::HEAD;
    Some(Parsed {
        method,
        target: (path.as_ptr() as usize - base, path.len()),
        head: Head {
            version,
            head_method,
            keep_alive,
        },
    })
}

/// How an answer's body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body is written (HEAD, 1xx, 204, 304).
    None,
    /// This many bytes.
    Length(u64),
    Chunked,
    /// To the connection's close (HTTP/1.0 without a length).
    Close,
}

/// Writes an answer (the upstream head's header lines as they came, when it kept them, then
/// the map's); whether the connection may stay open after it.
async fn respond<I: Io>(
    wire: &Mutex<Wire<I>>,
    mut parts: http::response::Parts,
    lines: Option<HeadLines>,
    mut body: Sending<ResponseBody>,
    head: Head,
    mut keep_alive: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let status = parts.status;
    let headers = &mut parts.headers;
    let bodiless_status = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if status.is_informational() || status == StatusCode::NO_CONTENT {
        headers.remove(CONTENT_LENGTH);
        headers.remove(TRANSFER_ENCODING);
    }
    // The lines that decide the framing and the connection, found in one pass over the map
    // (each lookup by name would hash it).
    // Lines kept as they came carry neither `transfer-encoding` nor `connection`, and never
    // come with a bodiless status (`upstream::h1::plain_lines`).
    let mut coded = false;
    let mut length: Option<Option<u64>> = lines.as_ref().and_then(|l| l.length).map(Some);
    let mut dated = lines.as_ref().is_some_and(|l| l.dated);
    let mut tokens = ConnectionTokens::default();
    for (name, value) in headers.iter() {
        if *name == TRANSFER_ENCODING {
            coded = true;
        } else if *name == CONTENT_LENGTH {
            length.get_or_insert_with(|| decimal(value.as_bytes()));
        } else if *name == CONNECTION {
            tokens.read(value.as_bytes());
        } else if *name == DATE {
            dated = true;
        }
    }
    let mut framing = if coded {
        // Not one the gateway makes; framed as it says, when the client can read it.
        if head.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            headers.remove(TRANSFER_ENCODING);
            Framing::Close
        }
    } else if let Some(length) = length {
        match length {
            Some(n) => Framing::Length(n),
            None => {
                headers.remove(CONTENT_LENGTH);
                Framing::Close
            }
        }
    } else if bodiless_status || head.head_method {
        // A HEAD answer says only what the handler set: a length made up from its empty body
        // would claim the resource is empty.
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        Framing::Length(n)
    } else if head.version == Version::HTTP_11 {
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        Framing::Chunked
    } else {
        Framing::Close
    };
    if head.head_method || bodiless_status {
        framing = Framing::None;
    }
    if framing == Framing::Close {
        keep_alive = false;
    }
    keep_alive &= tokens.keep_alive(true);
    if !keep_alive && head.version == Version::HTTP_11 {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    } else if keep_alive && head.version == Version::HTTP_10 {
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if !dated {
        headers.insert(DATE, date::now());
    }
    let kept = lines.as_ref().map_or(&[][..], |l| &l.bytes[..]);
    encode_head(out, parts.version, status, kept, headers);

    if framing == Framing::None {
        drop(body);
        write_all(wire, &[out]).await?;
        return Ok(keep_alive);
    }
    // The head goes out with the first of the body when it is ready now.
    let mut pending_head = true;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        let frame = if pending_head {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    write_all(wire, &[out]).await?;
                    pending_head = false;
                    poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            }
        } else {
            poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        };
        // A small body that came whole with the head joins it in its buffer (`JOINED_BODY`).
        // The body is still polled to its end (its upstream connection goes back to the pool
        // then).
        if pending_head && matches!(framing, Framing::Length(_)) && left <= JOINED_BODY as u64 {
            let whole = match &frame {
                Some(Ok(f)) => f.data_ref().filter(|d| d.len() as u64 == left),
                _ => None,
            };
            if let Some(data) = whole {
                out.extend_from_slice(data);
                write_all(wire, &[out]).await?;
                (pending_head, left) = (false, 0);
                continue;
            }
        }
        let head_bytes: &[u8] = if pending_head { out } else { &[] };
        pending_head = false;
        let data = match frame {
            None => {
                return match framing {
                    Framing::Chunked => {
                        write_all(wire, &[head_bytes, b"0\r\n\r\n"]).await?;
                        Ok(keep_alive)
                    }
                    Framing::Length(_) if left != 0 => {
                        // The body ended short of its length: the client must not wait for
                        // the rest on a connection that goes on.
                        write_all(wire, &[head_bytes]).await?;
                        Ok(false)
                    }
                    _ => {
                        write_all(wire, &[head_bytes]).await?;
                        Ok(keep_alive)
                    }
                };
            }
            Some(Err(e)) => {
                // The body broke off (the backend failed mid-answer): the client sees the
                // answer cut short, not a complete one.
                write_all(wire, &[head_bytes]).await?;
                tracing::debug!(error = %e, "an answer's body failed while it was sent");
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers are not passed on.
                Err(_) => {
                    if !head_bytes.is_empty() {
                        write_all(wire, &[head_bytes]).await?;
                    }
                    continue;
                }
            },
        };
        match framing {
            Framing::Chunked if !data.is_empty() => {
                let size = chunk_size_line(data.len());
                write_all(wire, &[head_bytes, size.as_bytes(), &data, b"\r\n"]).await?;
            }
            Framing::Length(_) => {
                let n = (data.len() as u64).min(left) as usize;
                left -= n as u64;
                write_all(wire, &[head_bytes, &data[..n]]).await?;
                if n < data.len() {
                    // More than the length said: what fits was sent, the connection ends.
                    return Ok(false);
                }
            }
            _ => write_all(wire, &[head_bytes, &data]).await?,
        }
    }
}

/// A chunk-size line for `len` bytes.
fn chunk_size_line(len: usize) -> ChunkLine {
    let mut line = ChunkLine {
        bytes: [0; 18],
        start: 16,
    };
    line.bytes[16] = b'\r';
    line.bytes[17] = b'\n';
    let mut n = len;
    loop {
        line.start -= 1;
        line.bytes[line.start] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    line
}

struct ChunkLine {
    bytes: [u8; 18],
    start: usize,
}

impl ChunkLine {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// An answer's status line, the header lines `kept` as they came from upstream, and the
/// map's headers into `out` (emptied first).
fn encode_head(
    out: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    kept: &[u8],
    headers: &HeaderMap,
) {
    out.clear();
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(kept);
    for (name, value) in headers {
        put_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes all of `pieces`, in as few writes as the socket takes: one piece left goes by a plain
/// write (`send`), more by a vectored one (`writev`, dearer in the kernel: see `JOINED_BODY`).
async fn write_all<I: Io>(wire: &Mutex<Wire<I>>, pieces: &[&[u8]]) -> io::Result<()> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let mut written = 0;
    poll_fn(|cx| {
        while written < total {
            let mut slices = [io::IoSlice::new(&[]); 4];
            let mut n = 0;
            let mut skip = written;
            for piece in pieces {
                if skip >= piece.len() {
                    skip -= piece.len();
                    continue;
                }
                if n == slices.len() {
                    break;
                }
                slices[n] = io::IoSlice::new(&piece[skip..]);
                skip = 0;
                n += 1;
            }
            let mut w = lock(wire);
            let Some(gate) = w.gate.as_mut() else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let wrote = if n == 1 {
                Pin::new(gate).poll_write(cx, slices[0].as_ref())
            } else {
                Pin::new(gate).poll_write_vectored(cx, &slices[..n])
            };
            match wrote {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => written += k,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// After an answer: whether the request's body was read whole, skipping what of it is
/// already buffered (a connection whose body is still coming closes).
fn finish_body<I>(wire: &Mutex<Wire<I>>) -> bool {
    let mut w = lock(wire);
    let Wire {
        body, buf, broken, ..
    } = &mut *w;
    if *broken {
        return false;
    }
    let skipped = body.is_some();
    while let Some(decoder) = body.as_mut() {
        match decode(decoder, buf) {
            Ok(Decoded::Data(_)) => {}
            Ok(Decoded::Last(_) | Decoded::End) => *body = None,
            Ok(Decoded::More) | Err(_) => return false,
        }
    }
    if skipped {
        // A handle to the skipped body must not see a clean end of bytes it never read.
        w.seq += 1;
    }
    true
}

impl<I: Io> WireRead for Mutex<Wire<I>> {
    fn poll_body(&self, seq: u64, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        let mut w = lock(self);
        if w.seq != seq {
            return Poll::Ready(Some(Err("the request's connection moved on".into())));
        }
        loop {
            let Wire { body, buf, .. } = &mut *w;
            let Some(decoder) = body.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(decoder, buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(Decoded::Last(data)) => {
                    *body = None;
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Decoded::End) => {
                    *body = None;
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    w.broken = true;
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the request body is malformed: {e}"),
                    );
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match w.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    w.broken = true;
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before the body ended",
                    );
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    w.broken = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn body_ended(&self, seq: u64) -> bool {
        // A handle the connection moved past did not see its body end: not a clean end.
        let w = lock(self);
        w.seq == seq && w.body.is_none()
    }

    fn body_dropped(&self, seq: u64) {
        // Not waited for: a drop on the thread that holds the wire (inside its own code) must
        // not deadlock, and a missed note only delays noticing a hang-up to the answer's end.
        let Ok(mut w) = self.try_lock() else {
            return;
        };
        if w.seq == seq && w.body.is_some() {
            w.abandoned = true;
            if let Some(parked) = w.parked.take() {
                parked.wake();
            }
        }
    }
}

/// The `Date` of answers that carry none, formatted once a second.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    use http::HeaderValue;

    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }

    pub fn now() -> HeaderValue {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            match &cached.1 {
                Some(value) if cached.0 == second => value.clone(),
                _ => {
                    let value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                        .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
                    *cached = (second, Some(value.clone()));
                    value
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    type TestWire = Arc<Mutex<Wire<tokio::io::DuplexStream>>>;

    /// A fresh wire, the client's side of it, and a request with a streamed body parsed there.
    async fn streamed_request() -> (tokio::io::DuplexStream, TestWire, Request<ClientBody>) {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let gate = Gate::new(server, 4096, Arc::new(gate::Answers::default()));
        let wire = Arc::new(Mutex::new(Wire::new(gate)));
        client
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        loop {
            let parsed = lock(&wire).parse(&wire, 4096);
            if let Some(next) = parsed {
                let Ok((req, _)) = next else {
                    panic!("the head was handed over")
                };
                return (client, wire, req);
            }
            poll_fn(|cx| lock(&wire).poll_fill(cx)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_hang_up_is_seen_once_the_unread_body_is_dropped() {
        let (client, wire, req) = streamed_request().await;
        assert!(matches!(req.body(), ClientBody::Wire(_)));
        drop(client);
        // The body's handle reads the connection (and would see the close): the wait for a
        // hang-up leaves it alone.
        let waiting = hung_up(&wire, 4096);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(Duration::from_millis(200), waiting.as_mut()).await;
        assert!(early.is_err(), "the wait read under a live body handle");
        // Dropped unread (a handler that answers without the body): nobody reads now, and
        // the close, with body bytes still buffered, is a hang-up.
        drop(req);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the hang-up was not seen after the body was dropped");
    }

    #[tokio::test]
    async fn a_handle_the_connection_moved_past_is_not_a_clean_end() {
        // The client's side stays open: only the connection moving on is tested.
        let (_client, wire, req) = streamed_request().await;
        let (_, body) = req.into_parts();
        assert!(!http_body::Body::is_end_stream(&body));
        // The connection skips the body (its answer went out without it) and moves on.
        lock(&wire).seq += 1;
        assert!(
            !http_body::Body::is_end_stream(&body),
            "a skipped body looked whole"
        );
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex_with_crlf() {
        for len in [
            0usize,
            1,
            9,
            10,
            15,
            16,
            255,
            4096,
            65_535,
            1 << 40,
            usize::MAX,
        ] {
            let line = chunk_size_line(len);
            assert_eq!(line.as_bytes(), format!("{len:x}\r\n").as_bytes());
        }
    }

    #[test]
    fn an_answer_head_is_its_status_line_and_headers_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = b"left over".to_vec();
        encode_head(
            &mut out,
            Version::HTTP_11,
            StatusCode::NOT_FOUND,
            &[],
            &headers,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        // Upstream lines kept as they came go first, byte for byte, then the map's.
        encode_head(
            &mut out,
            Version::HTTP_11,
            StatusCode::OK,
            b"Server: idc-sim\r\nx-b:2\r\n",
            &headers,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nServer: idc-sim\r\nx-b:2\r\ncontent-type: text/plain\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        encode_head(
            &mut out,
            Version::HTTP_10,
            StatusCode::from_u16(599).unwrap_or_default(),
            &[],
            &HeaderMap::new(),
        );
        assert_eq!(out, b"HTTP/1.0 599 \r\n\r\n");
    }
}
