//! The request-head gate in front of hyper on the proxy listener (request hygiene): each
//! HTTP/1.1 request head is held until it is complete and checked before hyper reads it.
//! hyper 1.x accepts a request with both `Content-Length` and `Transfer-Encoding` (it drops
//! the length, RFC 9112 §6.1) and answers an oversized head with a bare 431; the gate turns
//! both into a refusal with the standard JSON body by handing hyper, instead of the head, a
//! stand-in request marked [`REFUSED`] that the proxy answers (400 or 431) and that closes
//! the connection. Nothing of the refused request is ever read by hyper.
//!
//! To find the next head the gate follows each request's framing (fixed length or chunked).
//! It steps aside (passes bytes through untouched) on anything it does not understand, which
//! hyper then refuses itself, on HTTP/2, and once a connection really switched protocols: after
//! a head asking for an upgrade (or a CONNECT) the bytes behind it wait, unread, until the
//! handler's answer to it is known ([`Answers`]). A 101 (or a 2xx to CONNECT) turns the gate
//! off; any other answer, and the next head is gated like every other.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::util::http1::{chunked_last, decimal, head_end, hex};

/// The marker header of the stand-in request; its value names the refusal. A client sending
/// it itself only gets its own request refused. A name, not a string: every request is looked
/// up for it, and a string would be parsed into a name on each lookup.
pub const REFUSED: http::HeaderName = http::HeaderName::from_static("x-shardgate-refused");

/// The most header fields in one head (hyper's limit is set to the same, so the gate decides).
pub const MAX_HEADERS: usize = 100;

/// Why a head was refused (the marker's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Both `Content-Length` and `Transfer-Encoding`.
    BothLengths,
    /// `Content-Length` twice with different values.
    ConflictingLengths,
    /// Longer than `max_header_bytes`, or more than [`MAX_HEADERS`] fields.
    HeadTooLarge,
}

impl Refusal {
    pub fn marker(self) -> &'static str {
        match self {
            Refusal::BothLengths => "both-lengths",
            Refusal::ConflictingLengths => "conflicting-lengths",
            Refusal::HeadTooLarge => "head-too-large",
        }
    }

    pub fn from_marker(value: &[u8]) -> Refusal {
        match value {
            b"head-too-large" => Refusal::HeadTooLarge,
            b"conflicting-lengths" => Refusal::ConflictingLengths,
            _ => Refusal::BothLengths,
        }
    }

    fn stand_in(self) -> Vec<u8> {
        format!(
            "GET / HTTP/1.1\r\nhost: refused.invalid\r\nconnection: close\r\n{REFUSED}: {}\r\n\r\n",
            self.marker()
        )
        .into_bytes()
    }
}

/// What the handler answered on one connection, told by the listener as each response leaves
/// the handler (before hyper writes it). HTTP/1.1 answers requests in order, one at a time, so
/// the n-th answer is the answer to the n-th head the gate handed over. (On HTTP/2 the gate is
/// off and the counts mean nothing.)
#[derive(Debug, Default)]
pub struct Answers {
    /// Responses given so far.
    given: AtomicU64,
    /// The number of the last response that switched protocols.
    switched: AtomicU64,
    /// The gate's reader, while it waits for an answer.
    waiting: Mutex<Option<Waker>>,
}

impl Answers {
    /// Records the next response: `switched` when it is a 101, or a 2xx to a CONNECT.
    pub fn record(&self, switched: bool) {
        let n = self.given.load(Ordering::Acquire) + 1;
        // Before `given`: whoever sees answer n also sees whether it switched.
        if switched {
            self.switched.store(n, Ordering::Release);
        }
        self.given.store(n, Ordering::Release);
        if let Some(waker) = self.waiting.lock().ok().and_then(|mut w| w.take()) {
            waker.wake();
        }
    }

    /// Whether answer `n` switched protocols; `None` while it is not given.
    fn outcome(&self, n: u64) -> Option<bool> {
        (self.given.load(Ordering::Acquire) >= n)
            .then(|| self.switched.load(Ordering::Acquire) == n)
    }
}

/// Where in the byte stream the gate is (after a head: how its body is framed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Collecting a request head.
    Head,
    /// Passing a fixed-length body: bytes left.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Passing chunk data: bytes left.
    ChunkData(u64),
    /// The CRLF after chunk data.
    ChunkEnd,
    /// Trailer fields, up to an empty line.
    Trailers,
    /// After a head asking for an upgrade (and its body): holding what follows until the
    /// answer to that head says whether the connection switched protocols.
    Held,
    /// Passing everything through (HTTP/2, a switched connection, or bytes hyper will refuse
    /// itself).
    Off,
    /// A stand-in was handed over: nothing more is read from the client.
    Closed,
}

/// Longest chunk-size or trailer line the gate follows (longer: it steps aside).
const MAX_LINE: usize = 4096;

/// How much is read from the client at a time: what hyper's read buffer starts with. Read on
/// the stack, so an idle connection holds no read buffer of the gate's (DESIGN.md §11: 10,000
/// idle connections in under 50 MiB).
const READ_CHUNK: usize = 8 * 1024;

/// A buffer of the gate's (a head being collected, bytes not yet read by hyper) keeps up to
/// this much room once it is empty; past it, the room goes back to the allocator, so one large
/// head or body burst does not stay with an idle connection.
const KEEP_ROOM: usize = 1024;

/// Empties `buf`, giving its room back to the allocator when it holds more than [`KEEP_ROOM`].
fn clear_buffer(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_ROOM {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

#[derive(Debug)]
struct Scanner {
    state: State,
    max_head: usize,
    /// The head (or the current line) being collected.
    pending: Vec<u8>,
    /// How far `pending` was searched for the end of the head.
    searched: usize,
    /// Heads handed to hyper so far.
    heads: u64,
    /// The number of the head asking for an upgrade, while its answer is awaited.
    upgrade: Option<u64>,
}

impl Scanner {
    fn new(max_head: usize) -> Scanner {
        Scanner {
            state: State::Head,
            max_head,
            pending: Vec::new(),
            searched: 0,
            heads: 0,
            upgrade: None,
        }
    }

    /// Where the stream goes after a request's body: the next head, or, behind a head asking
    /// for an upgrade, a wait for its answer.
    fn after_body(&self) -> State {
        if self.upgrade.is_some() {
            State::Held
        } else {
            State::Head
        }
    }

    /// The answer to the head that asked for an upgrade is known: on a switch everything held
    /// (and all that follows) passes through; otherwise the held bytes are gated as the next
    /// head.
    fn resume(&mut self, switched: bool, out: &mut Vec<u8>) {
        self.upgrade = None;
        if switched {
            out.append(&mut self.pending);
            self.state = State::Off;
            return;
        }
        let held = std::mem::take(&mut self.pending);
        self.state = State::Head;
        self.searched = 0;
        self.feed(&held, out);
    }

    /// Consumes `input`, appending what hyper may read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Off => {
                    out.extend_from_slice(input);
                    return;
                }
                State::Closed => return,
                State::Held => {
                    self.pending.extend_from_slice(input);
                    return;
                }
                State::Fixed(left) | State::ChunkData(left) => {
                    let n = left.min(input.len() as u64) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => self.after_body(),
                        (State::Fixed(_), l) => State::Fixed(l),
                        (_, 0) => State::ChunkEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::ChunkEnd => {
                    let b = input[0];
                    out.push(b);
                    input = &input[1..];
                    match b {
                        b'\r' => {}
                        b'\n' => self.state = State::ChunkSize,
                        _ => self.state = State::Off,
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(line) = self.take_line(&mut input, out) else {
                        continue;
                    };
                    self.state = match self.state {
                        State::ChunkSize => match chunk_size(&line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        },
                        _ if line.iter().all(|b| *b == b'\r' || *b == b'\n') => self.after_body(),
                        _ => State::Trailers,
                    };
                }
                State::Head => match self.take_head(input, out) {
                    Some(rest) => input = rest,
                    None => return,
                },
            }
        }
    }

    /// A line of a chunked body (size line or trailer), passed through as it goes.
    fn take_line(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> Option<Vec<u8>> {
        let end = input.iter().position(|b| *b == b'\n');
        let n = end.map_or(input.len(), |i| i + 1);
        self.pending.extend_from_slice(&input[..n]);
        out.extend_from_slice(&input[..n]);
        *input = &input[n..];
        if end.is_some() {
            return Some(std::mem::take(&mut self.pending));
        }
        if self.pending.len() > MAX_LINE {
            self.pending.clear();
            self.state = State::Off;
        }
        None
    }

    /// Acts on what [`examine`] made of a head: hands it (or a stand-in) to `out` and sets
    /// the body's state. The head's bytes are `pending` when `in_pending`, else the start of
    /// `input`. Returns what of `input` follows the head; `None` when all of it was dealt
    /// with (still incomplete: kept in `pending`; or the gate stepped aside or closed).
    fn take_head<'i>(&mut self, input: &'i [u8], out: &mut Vec<u8>) -> Option<&'i [u8]> {
        let in_pending = !self.pending.is_empty();
        if in_pending {
            self.pending.extend_from_slice(input);
        }
        let bytes = if in_pending { &self.pending[..] } else { input };
        let verdict = examine(bytes, self.searched, self.max_head, |_| ());
        match verdict {
            Examined::Incomplete => {
                if !in_pending {
                    self.pending.extend_from_slice(input);
                }
                self.searched = self.pending.len();
                None
            }
            Examined::Head {
                len,
                state,
                upgrade,
                ..
            } => {
                out.extend_from_slice(&bytes[..len]);
                // The previous bytes held no complete head, so the head ends inside this
                // input and what follows it is the tail of `input`.
                let rest = bytes.len() - len;
                if in_pending {
                    clear_buffer(&mut self.pending);
                }
                self.searched = 0;
                self.heads += 1;
                if upgrade {
                    self.upgrade = Some(self.heads);
                }
                self.state = match state {
                    State::Head => self.after_body(),
                    body => body,
                };
                Some(&input[input.len() - rest.min(input.len())..])
            }
            Examined::Refused(refusal) => {
                self.refuse(refusal, out);
                None
            }
            Examined::StepAside => {
                // Not a request head the gate follows (HTTP/2's preface, bad bytes): hyper
                // gets it as it came and decides.
                if in_pending {
                    out.append(&mut self.pending);
                } else {
                    out.extend_from_slice(input);
                }
                self.state = State::Off;
                None
            }
        }
    }

    fn refuse(&mut self, refusal: Refusal, out: &mut Vec<u8>) {
        tracing::debug!(
            refusal = refusal.marker(),
            "request head refused by the gate"
        );
        self.pending = Vec::new();
        out.extend_from_slice(&refusal.stand_in());
        self.state = State::Closed;
    }
}

/// What the gate makes of the bytes of a head as far as they came.
pub(super) enum Examined<T> {
    /// No blank line yet, or only blank lines before the request line: wait for more.
    Incomplete,
    /// A head of `len` bytes that passes, the state its body puts the stream in, whether it
    /// asks for an upgrade, and what the caller made of the parsed head.
    Head {
        len: usize,
        state: State,
        upgrade: bool,
        parsed: T,
    },
    Refused(Refusal),
    /// Not a request head the gate follows: hyper decides.
    StepAside,
}

/// Examines the bytes of a head (searched for its end up to `searched` before); a head that
/// passes is handed, parsed, to `on_head` (the proxy listener's own HTTP/1.1 connection builds
/// its request there, from the one parse).
pub(super) fn examine<T>(
    bytes: &[u8],
    searched: usize,
    max_head: usize,
    on_head: impl FnOnce(&httparse::Request<'_, '_>) -> T,
) -> Examined<T> {
    // Empty lines before a request line are no head's end (RFC 9112 §2.2 lets a server skip
    // them): the search starts after them, whatever the client's cuts.
    let lead = bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let from = searched.saturating_sub(3).max(lead);
    let Some(end) = head_end(&bytes[from..]).map(|end| from + end) else {
        return if bytes.len() > max_head {
            Examined::Refused(Refusal::HeadTooLarge)
        } else {
            Examined::Incomplete
        };
    };
    // The size limit is decided before the syntax, as it is while the head is still coming:
    // the verdict must not depend on how the client cut its bytes.
    if end > max_head {
        return Examined::Refused(Refusal::HeadTooLarge);
    }
    // Uninitialised slots: httparse writes those it fills, and writing a hundred empty ones
    // first would cost more than the parse.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, bytes, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) if n > max_head => {
            Examined::Refused(Refusal::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(len)) => match framing(&req) {
            Ok((state, upgrade)) => Examined::Head {
                len,
                state,
                upgrade,
                parsed: on_head(&req),
            },
            Err(Some(refusal)) => Examined::Refused(refusal),
            Err(None) => Examined::StepAside,
        },
        // Blank lines before a request line: wait for the rest.
        Ok(httparse::Status::Partial) if bytes.len() <= max_head => Examined::Incomplete,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            Examined::Refused(Refusal::HeadTooLarge)
        }
        Err(_) => Examined::StepAside,
    }
}

/// The body framing of a complete head and whether it asks for an upgrade (an `Upgrade`
/// header or CONNECT: what hyper may switch protocols on), or why it is refused (`Err(None)`:
/// step aside).
fn framing(req: &httparse::Request<'_, '_>) -> Result<(State, bool), Option<Refusal>> {
    let mut length: Option<&[u8]> = None;
    let mut conflicting = false;
    let mut coding: Option<&[u8]> = None;
    let mut upgrade = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let v = h.value.trim_ascii();
            match length {
                Some(prev) if prev != v => conflicting = true,
                _ => length = Some(v),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coding = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if coding.is_some() && length.is_some() {
        return Err(Some(Refusal::BothLengths));
    }
    if conflicting {
        return Err(Some(Refusal::ConflictingLengths));
    }
    // What follows may be another protocol, but only once the answer says so: until then
    // the gate holds it (`State::Held`).
    let upgrade = upgrade || req.method == Some("CONNECT");
    framing_of_body(req, length, coding).map(|state| (state, upgrade))
}

/// The framing of a body from its `Content-Length` and `Transfer-Encoding`.
fn framing_of_body(
    req: &httparse::Request<'_, '_>,
    length: Option<&[u8]>,
    coding: Option<&[u8]>,
) -> Result<State, Option<Refusal>> {
    if let Some(coding) = coding {
        return match (req.version, chunked_last(coding)) {
            (Some(1), true) => Ok(State::ChunkSize),
            // hyper refuses these (400).
            _ => Err(None),
        };
    }
    match length {
        None => Ok(State::Head),
        Some(v) => match decimal(v) {
            Some(0) => Ok(State::Head),
            Some(n) => Ok(State::Fixed(n)),
            None => Err(None),
        },
    }
}

/// The size of a chunk from its size line (`1a;ext=x\r\n`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|b| *b == b';' || *b == b'\r' || *b == b'\n')
        .next()?
        .trim_ascii();
    if digits.len() > 15 {
        return None;
    }
    hex(digits)
}

/// The client connection as hyper reads it: heads pass through the [`Scanner`]; writes go
/// straight through.
pub struct Gate<I> {
    inner: I,
    scanner: Scanner,
    /// The handler's answers on this connection (shared with the listener's service).
    answers: std::sync::Arc<Answers>,
    /// Bytes cleared for hyper, not yet read by it, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
}

impl<I> Gate<I> {
    pub fn new(inner: I, max_head: usize, answers: std::sync::Arc<Answers>) -> Gate<I> {
        Gate {
            inner,
            scanner: Scanner::new(max_head),
            answers,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The client stream itself, for the listener's own HTTP/1.1 connection, which reads and
    /// checks heads itself and hands the gate a connection only from a request it leaves to
    /// hyper on ([`Gate::preload`]).
    pub(super) fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// Bytes already read from the client, given to the gate as if it had read them: the head
    /// the listener's own connection leaves to hyper, and what came behind it.
    pub(super) fn preload(&mut self, bytes: &[u8]) {
        self.scanner.feed(bytes, &mut self.out);
    }

    /// At a request boundary with nothing owed: no bytes held or waiting for hyper, and every
    /// head handed over answered (a resting connection loses nothing).
    pub fn at_rest(&self) -> bool {
        self.scanner.state == State::Head
            && self.scanner.pending.is_empty()
            && self.out_pos >= self.out.len()
            && self.answers.given.load(Ordering::Acquire) == self.scanner.heads
    }

    /// Gives the gate's buffers back to the allocator (a resting connection holds none).
    pub fn shed_buffers(&mut self) {
        if self.out_pos >= self.out.len() {
            (self.out, self.out_pos) = (Vec::new(), 0);
        }
        if self.scanner.pending.is_empty() {
            self.scanner.pending = Vec::new();
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Gate<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    clear_buffer(&mut this.out);
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.scanner.state {
                // hyper answers the stand-in and closes; nothing more is read. No waker is
                // needed: hyper's own write and close wake the connection.
                State::Closed => return Poll::Pending,
                State::Off => return Pin::new(&mut this.inner).poll_read(cx, buf),
                State::Held => {
                    // Nothing more is read from the client until the answer is known (the
                    // socket's buffer holds the rest). The waker goes in first, so an answer
                    // recorded between the two steps still wakes this reader.
                    if let Ok(mut waiting) = this.answers.waiting.lock() {
                        *waiting = Some(cx.waker().clone());
                    }
                    let outcome = match this.scanner.upgrade {
                        Some(n) => this.answers.outcome(n),
                        None => Some(false),
                    };
                    match outcome {
                        None => return Poll::Pending,
                        Some(switched) => {
                            this.scanner.resume(switched, &mut this.out);
                            continue;
                        }
                    }
                }
                _ => {}
            }
            // Uninitialised: `ReadBuf` hands out only what the read filled, and zeroing 8 KiB
            // on every read would cost more than the read's copy.
            let mut chunk = [const { std::mem::MaybeUninit::<u8>::uninit() }; READ_CHUNK];
            let mut raw = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if raw.filled().is_empty() {
                // End of stream: whatever was held goes to hyper, which sees it cut short.
                if this.scanner.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // A held head goes to hyper now; a chunk-size or trailer line was passed on
                // as it came, so handing it over again would make hyper read it twice.
                if this.scanner.state == State::Head {
                    this.out.append(&mut this.scanner.pending);
                } else {
                    this.scanner.pending.clear();
                }
                this.scanner.state = State::Off;
                continue;
            }
            this.scanner.feed(raw.filled(), &mut this.out);
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Gate<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; what hyper would read.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, State) {
        let mut s = Scanner::new(1024);
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            s.feed(piece, &mut out);
        }
        (out, s.state)
    }

    fn every_step(input: &[u8]) -> Vec<(Vec<u8>, State)> {
        (1..=input.len()).map(|step| run(input, step)).collect()
    }

    #[test]
    fn clean_pipelined_requests_pass_unchanged_however_they_are_split() {
        let input: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;ext=1\r\nabc\r\n0\r\nx-trailer: t\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        for (out, state) in every_step(input) {
            assert_eq!(out, input);
            assert_eq!(state, State::Head);
        }
    }

    #[test]
    fn both_lengths_anywhere_in_a_pipeline_become_the_stand_in() {
        let input: &[u8] = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /smuggle HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n";
        for (out, state) in every_step(input) {
            let text = String::from_utf8(out).unwrap();
            assert!(
                text.starts_with("GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"),
                "{text}"
            );
            assert!(
                text.ends_with("x-shardgate-refused: both-lengths\r\n\r\n"),
                "{text}"
            );
            assert!(
                !text.contains("smuggle") && !text.contains("admin"),
                "{text}"
            );
            assert_eq!(state, State::Closed);
        }
    }

    #[test]
    fn conflicting_lengths_and_big_heads_are_refused() {
        let (out, _) = run(
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\ncontent-length: 5\r\n\r\nabcd",
            7,
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("conflicting-lengths"));
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(2000));
        let (out, _) = run(big.as_bytes(), 100);
        assert!(String::from_utf8(out).unwrap().contains("head-too-large"));
        let (out, _) = run(big.as_bytes()[..1500].as_ref(), 100);
        assert!(
            String::from_utf8(out).unwrap().contains("head-too-large"),
            "an unfinished head past the limit is refused at once"
        );
    }

    #[test]
    fn http2_and_garbage_pass_through() {
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        let (out, state) = run(preface, 5);
        assert_eq!(out, preface);
        assert_eq!(state, State::Off);
        let (out, state) = run(b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n", 4);
        assert_eq!(out, b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n");
        assert_eq!(state, State::Off);
    }

    #[test]
    fn bytes_behind_an_upgrade_wait_for_its_answer() {
        let clean: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let upgrade: &[u8] =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let smuggle: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let input = [clean, upgrade, smuggle].concat();
        for step in 1..=input.len() {
            let mut s = Scanner::new(1024);
            let mut out = Vec::new();
            for piece in input.chunks(step) {
                s.feed(piece, &mut out);
            }
            assert_eq!(out, [clean, upgrade].concat(), "step {step}");
            assert_eq!((s.state, s.upgrade), (State::Held, Some(2)), "step {step}");
            // Not switched: what was held is the next head, and it is refused.
            s.resume(false, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.ends_with("both-lengths\r\n\r\n"), "{text}");
            assert_eq!(s.state, State::Closed);
        }

        // A body of the upgrade request passes first; then the wait.
        let with_body: &[u8] = b"POST /ws HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n";
        let (out, state) = run(with_body, 5);
        assert_eq!(
            out,
            &with_body[..with_body.len() - b"GET /b HTTP/1.1\r\n\r\n".len()]
        );
        assert_eq!(state, State::Held);

        // Switched: the held bytes and all that follows pass as they are.
        let frames: &[u8] = b"\x81\x85\x00\x00\x00\x00hello";
        let mut s = Scanner::new(1024);
        let mut out = Vec::new();
        s.feed(&[upgrade, frames].concat(), &mut out);
        assert_eq!(out, upgrade);
        s.resume(true, &mut out);
        s.feed(b"\r\n\r\nmore", &mut out);
        assert_eq!(out, [upgrade, frames, b"\r\n\r\nmore"].concat());
        assert_eq!(s.state, State::Off);

        // Not switched, nothing held: the next head is gated when it comes.
        let mut s = Scanner::new(1024);
        let mut out = Vec::new();
        s.feed(b"CONNECT x:443 HTTP/1.1\r\n\r\n", &mut out);
        assert_eq!(s.state, State::Held);
        s.resume(false, &mut out);
        assert_eq!(s.state, State::Head);
        s.feed(smuggle, &mut out);
        assert!(String::from_utf8(out).unwrap().contains("both-lengths"));
    }

    #[test]
    fn answers_are_numbered_in_order() {
        let a = Answers::default();
        assert_eq!(a.outcome(1), None);
        a.record(false);
        a.record(true);
        assert_eq!(a.outcome(1), Some(false));
        assert_eq!(a.outcome(2), Some(true));
        assert_eq!(a.outcome(3), None);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;x=y\r\n"), Some(0));
        assert_eq!(chunk_size(b"zz\r\n"), None);
        assert_eq!(chunk_size(b"\r\n"), None);
    }
}
