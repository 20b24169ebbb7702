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
//! hyper then refuses itself, on HTTP/2, and after an upgrade or CONNECT request.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The marker header of the stand-in request; its value names the refusal. A client sending
/// it itself only gets its own request refused.
pub const REFUSED: &str = "x-shardgate-refused";

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

/// Where in the byte stream the gate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
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
    /// Passing everything through (HTTP/2, an upgrade, or bytes hyper will refuse itself).
    Off,
    /// A stand-in was handed over: nothing more is read from the client.
    Closed,
}

/// Longest chunk-size or trailer line the gate follows (longer: it steps aside).
const MAX_LINE: usize = 4096;

#[derive(Debug)]
struct Scanner {
    state: State,
    max_head: usize,
    /// The head (or the current line) being collected.
    pending: Vec<u8>,
    /// How far `pending` was searched for the end of the head.
    searched: usize,
}

impl Scanner {
    fn new(max_head: usize) -> Scanner {
        Scanner {
            state: State::Head,
            max_head,
            pending: Vec::new(),
            searched: 0,
        }
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
                State::Fixed(left) | State::ChunkData(left) => {
                    let n = left.min(input.len() as u64) as usize;
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => State::Head,
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
                        _ if line.iter().all(|b| *b == b'\r' || *b == b'\n') => State::Head,
                        _ => State::Trailers,
                    };
                }
                State::Head => {
                    let fresh = input.len();
                    self.pending.extend_from_slice(input);
                    // The previous bytes held no complete head, so the head ends inside this
                    // input and what follows it is the tail of `input`.
                    match self.check_head(out) {
                        Some(rest) => input = &input[fresh - rest.min(fresh)..],
                        None => return,
                    }
                }
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

    /// With the head complete: hands it (or a stand-in) to `out`, sets the body's state and
    /// returns how many bytes followed it. `None`: still incomplete, or the gate stepped
    /// aside or closed (the held bytes are dealt with).
    fn check_head(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        // Empty lines before a request line are no head's end (RFC 9112 §2.2 lets a server
        // skip them): the search starts after them, whatever the client's cuts.
        let lead = self
            .pending
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let from = self.searched.saturating_sub(3).max(lead);
        let ended = head_end(&self.pending[from..]).map(|end| from + end);
        self.searched = self.pending.len();
        let Some(end) = ended else {
            if self.pending.len() > self.max_head {
                self.refuse(Refusal::HeadTooLarge, out);
            }
            return None;
        };
        // The size limit is decided before the syntax, as it is while the head is still
        // coming: the verdict must not depend on how the client cut its bytes.
        if end > self.max_head {
            self.refuse(Refusal::HeadTooLarge, out);
            return None;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let verdict = match req.parse(&self.pending) {
            Ok(httparse::Status::Complete(n)) if n > self.max_head => {
                Err(Some(Refusal::HeadTooLarge))
            }
            Ok(httparse::Status::Complete(n)) => framing(&req).map(|state| (n, state)),
            // Blank lines before a request line: wait for the rest.
            Ok(httparse::Status::Partial) if self.pending.len() <= self.max_head => return None,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                Err(Some(Refusal::HeadTooLarge))
            }
            Err(_) => Err(None),
        };
        match verdict {
            Ok((n, state)) => {
                let rest = self.pending.len() - n;
                out.extend_from_slice(&self.pending[..n]);
                self.pending.clear();
                self.searched = 0;
                self.state = state;
                Some(rest)
            }
            Err(Some(refusal)) => {
                self.refuse(refusal, out);
                None
            }
            Err(None) => {
                // Not a request head the gate follows (HTTP/2's preface, bad bytes): hyper
                // gets it as it came and decides.
                out.append(&mut self.pending);
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

/// Where the first blank line that ends a head (`\n\r\n` or `\n\n`) in `bytes` ends.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).enumerate().find_map(|(i, w)| {
        if w == b"\n\n" {
            Some(i + 2)
        } else if w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n') {
            Some(i + 3)
        } else {
            None
        }
    })
}

/// The body framing of a complete head, or why it is refused (`Err(None)`: step aside).
fn framing(req: &httparse::Request<'_, '_>) -> Result<State, Option<Refusal>> {
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
    if upgrade || req.method == Some("CONNECT") {
        // What follows may be another protocol: the gate steps aside after this head (hyper
        // still parses whatever comes next if the upgrade is refused).
        return Ok(State::Off);
    }
    if let Some(coding) = coding {
        let last = coding
            .rsplit(|b| *b == b',')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        return match (req.version, last.eq_ignore_ascii_case(b"chunked")) {
            (Some(1), true) => Ok(State::ChunkSize),
            // hyper refuses these (400).
            _ => Err(None),
        };
    }
    match length {
        None => Ok(State::Head),
        Some(v) => match std::str::from_utf8(v).ok().and_then(|v| {
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse::<u64>().ok())
                .flatten()
        }) {
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
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// The client connection as hyper reads it: heads pass through the [`Scanner`]; writes go
/// straight through.
pub struct Gate<I> {
    inner: I,
    scanner: Scanner,
    /// Bytes cleared for hyper, not yet read by it, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    buf: Box<[u8]>,
}

impl<I> Gate<I> {
    pub fn new(inner: I, max_head: usize) -> Gate<I> {
        Gate {
            inner,
            scanner: Scanner::new(max_head),
            out: Vec::new(),
            out_pos: 0,
            buf: vec![0u8; 16 * 1024].into_boxed_slice(),
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
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.scanner.state {
                // hyper answers the stand-in and closes; nothing more is read. No waker is
                // needed: hyper's own write and close wake the connection.
                State::Closed => return Poll::Pending,
                State::Off => return Pin::new(&mut this.inner).poll_read(cx, buf),
                _ => {}
            }
            let mut raw = ReadBuf::new(&mut this.buf);
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
            let filled = raw.filled().len();
            this.scanner.feed(&this.buf[..filled], &mut this.out);
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
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;x=y\r\n"), Some(0));
        assert_eq!(chunk_size(b"zz\r\n"), None);
        assert_eq!(chunk_size(b"\r\n"), None);
    }
}
