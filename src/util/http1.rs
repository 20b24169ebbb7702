//! HTTP/1.1 message framing, as both ends of the gateway read it: the request-head gate on
//! the client side (`data::server::gate`) and the upstream client (`data::upstream::h1`).

/// A body up to this long that is whole when its head is written goes in the head's buffer,
/// on both sides (the listener's answers, the upstream client's kept request bodies): head and
/// body then leave in one plain `send`. Two pieces would take a `writev`, which under `perf`
/// cost the kernel about 0.6 µs more per call on this path.
pub const JOINED_BODY: usize = 4 * 1024;

/// One header line, `name: value\r\n`, onto a head being written.
pub fn put_line(head: &mut impl bytes::BufMut, name: &[u8], value: &[u8]) {
    head.put_slice(name);
    head.put_slice(b": ");
    head.put_slice(value);
    head.put_slice(b"\r\n");
}

/// Where the first blank line that ends a head (`\n\r\n` or `\n\n`) in `bytes` ends. Only
/// the line ends are visited (found a word at a time by `memchr`), not every byte.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|i| match bytes.get(i + 1) {
        Some(b'\n') => Some(i + 2),
        Some(b'\r') if bytes.get(i + 2) == Some(&b'\n') => Some(i + 3),
        _ => None,
    })
}

/// A `Content-Length` value: ASCII digits only (no sign, no blanks), within `u64`.
pub fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        let digit = d.is_ascii_digit().then(|| u64::from(d - b'0'))?;
        n.checked_mul(10)?.checked_add(digit)
    })
}

/// A chunk size: ASCII hex digits only, within `u64`.
pub fn hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let digit = crate::util::hex_digit(*d)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })
}

/// The last transfer coding of a `Transfer-Encoding` value is `chunked`.
pub fn chunked_last(coding: &[u8]) -> bool {
    coding
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The keep-alive tokens of every `Connection` line of a message (RFC 9112 §9.3), as both
/// ends of the gateway read them: the listener's own connection (a client's request) and the
/// upstream client (a backend's response).
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

impl ConnectionTokens {
    /// Notes the tokens of one `Connection` value.
    pub fn read(&mut self, value: &[u8]) {
        for token in value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            self.close |= token.eq_ignore_ascii_case(b"close");
            self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }

    /// Whether the connection stays open: never after `close` (on any line); with
    /// `keep-alive` (what an HTTP/1.0 peer must say); otherwise the version's default.
    pub fn keep_alive(self, default: bool) -> bool {
        !self.close && (self.keep_alive || default)
    }
}

/// The header names one connection has seen, kept so that each later head's names are
/// found by comparing bytes instead of parsed again (and, for names outside the standard
/// set, allocated again): a peer's heads repeat the same few names, spelt the same way and
/// mostly in the same order. So the search starts after the name found last, and a head
/// like the one before finds each of its names at the first comparison; the spellings sit
/// one after another in one buffer, not each in an allocation of its own, so a search reads
/// a few adjacent lines. Bounded: a peer that sends ever new names has the first
/// [`Names::LIMIT`] kept and the rest parsed, and only names of up to [`Names::LONGEST`]
/// bytes are kept.
#[derive(Debug, Default)]
pub struct Names {
    /// Each kept name's spelling, one after another.
    spelt: Vec<u8>,
    /// Each kept name: where its spelling is in `spelt`, and the name.
    seen: Vec<(std::ops::Range<u16>, http::HeaderName)>,
    /// Where the next search starts: after the name found last.
    next: usize,
}

impl Names {
    pub const LIMIT: usize = 32;
    /// Longer names are parsed each time, not kept: what a connection keeps stays small
    /// (at most 32 names of 64 bytes, twice) whatever its peer sends.
    pub const LONGEST: usize = 64;

    /// The name of a header line's `raw` name, or `None` when it is not a token.
    pub fn name(&mut self, raw: &[u8]) -> Option<http::HeaderName> {
        let kept = self.seen.len();
        let from = self.next.min(kept);
        // From `next` to the end, then from the start.
        for i in (from..kept).chain(0..from) {
            let (at, name) = &self.seen[i];
            if self.spelt.get(usize::from(at.start)..usize::from(at.end)) == Some(raw) {
                self.next = i + 1;
                return Some(name.clone());
            }
        }
        let name = http::HeaderName::from_bytes(raw).ok()?;
        if kept < Self::LIMIT && raw.len() <= Self::LONGEST {
            // At most 32 spellings of 64 bytes: offsets fit in 16 bits.
            let start = self.spelt.len() as u16;
            self.spelt.extend_from_slice(raw);
            self.seen
                .push((start..self.spelt.len() as u16, name.clone()));
            self.next = kept + 1;
        }
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether one `Connection` value leaves the connection open, over the version's default.
    fn connection_keeps(value: &[u8], default: bool) -> bool {
        let mut tokens = ConnectionTokens::default();
        tokens.read(value);
        tokens.keep_alive(default)
    }

    #[test]
    fn connection_tokens_decide_keep_alive_over_the_versions_default() {
        let cases: [(&[u8], bool, bool); 7] = [
            (b"close", true, false),
            (b"keep-alive", false, true),
            (b"Keep-Alive", false, true),
            (b"te, CLOSE", true, false),
            (b"keep-alive, close", true, false),
            (b"upgrade", true, true),
            (b"upgrade", false, false),
        ];
        for (value, default, want) in cases {
            assert_eq!(
                connection_keeps(value, default),
                want,
                "{:?} (default {default})",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn close_on_any_connection_line_ends_the_connection() {
        let mut tokens = ConnectionTokens::default();
        tokens.read(b"close");
        tokens.read(b"keep-alive");
        assert!(!tokens.keep_alive(true));
        assert!(!tokens.keep_alive(false));
        let mut tokens = ConnectionTokens::default();
        tokens.read(b"te");
        tokens.read(b"Keep-Alive");
        assert!(tokens.keep_alive(false));
    }

    #[test]
    fn kept_names_are_found_by_their_spelling_and_the_rest_parsed() {
        let mut names = Names::default();
        let first = names.name(b"X-Shard-Key").unwrap();
        assert_eq!(first.as_str(), "x-shard-key");
        assert_eq!(names.name(b"x-shard-KEY").unwrap(), first);
        assert_eq!(
            names.name(b"Content-Length").unwrap(),
            http::header::CONTENT_LENGTH
        );
        assert_eq!(
            names.name(b"content-length").unwrap(),
            http::header::CONTENT_LENGTH
        );
        // Same length, not the same name.
        assert_eq!(names.name(b"x-shard-kez").unwrap().as_str(), "x-shard-kez");
        assert!(names.name(b"bad name").is_none());
        assert!(names.name(b"").is_none());
        // A name kept is never matched by a non-token of its length.
        assert!(names.name(b"x-shard-ke\xff").is_none());
        assert!(names.name(b"x-shard-ke ").is_none());
        // A long name is right but not kept.
        let kept = names.seen.len();
        let long = "x-long".repeat(20);
        assert_eq!(names.name(long.as_bytes()).unwrap().as_str(), long);
        assert_eq!(names.seen.len(), kept);
        for i in 0..100 {
            let raw = format!("x-name-{i}");
            assert_eq!(names.name(raw.as_bytes()).unwrap().as_str(), raw);
        }
        assert_eq!(names.seen.len(), Names::LIMIT);
        // Past the limit, names are still right, only not kept.
        assert_eq!(names.name(b"X-Name-99").unwrap().as_str(), "x-name-99");
    }

    #[test]
    fn names_are_found_wherever_the_search_starts() {
        let mut names = Names::default();
        let spellings = ["Host", "X-Shard-Key", "Accept", "x-a", "X-B"];
        let parsed: Vec<_> = spellings
            .iter()
            .map(|s| names.name(s.as_bytes()).unwrap())
            .collect();
        // The same head again, in its order, backwards, and each name after every other.
        for order in [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 3, 1, 4]] {
            for i in order {
                for j in order {
                    assert_eq!(names.name(spellings[i].as_bytes()).unwrap(), parsed[i]);
                    assert_eq!(names.name(spellings[j].as_bytes()).unwrap(), parsed[j]);
                }
            }
        }
        assert_eq!(
            names.seen.len(),
            spellings.len(),
            "found again, not kept again"
        );
        // A prefix or extension of a kept spelling is another name.
        assert_eq!(names.name(b"X-Shard-Ke").unwrap().as_str(), "x-shard-ke");
        assert_eq!(names.name(b"x-ab").unwrap().as_str(), "x-ab");
        assert_eq!(names.name(b"Hos").unwrap().as_str(), "hos");
    }

    #[test]
    fn heads_end_at_their_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: x\n\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r"), None);
    }

    #[test]
    fn the_head_end_search_agrees_with_a_byte_by_byte_one() {
        // Every string of up to seven bytes over the three that matter.
        fn naive(bytes: &[u8]) -> Option<usize> {
            (0..bytes.len()).find_map(|i| match &bytes[i..] {
                [b'\n', b'\n', ..] => Some(i + 2),
                [b'\n', b'\r', b'\n', ..] => Some(i + 3),
                _ => None,
            })
        }
        let alphabet = [b'\r', b'\n', b'a'];
        let mut checked = 0;
        for len in 0..=7u32 {
            for mut code in 0..3usize.pow(len) {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = alphabet[code % 3];
                        code /= 3;
                        b
                    })
                    .collect();
                assert_eq!(head_end(&bytes), naive(&bytes), "{bytes:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3280);
    }

    #[test]
    fn lengths_are_plain_digits_within_u64() {
        assert_eq!(decimal(b"0"), Some(0));
        assert_eq!(decimal(b"0042"), Some(42));
        assert_eq!(decimal(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(decimal(b"18446744073709551616"), None);
        for bad in [&b""[..], b"+1", b"-1", b" 1", b"1 ", b"0x1", b"1,1"] {
            assert_eq!(decimal(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunk_sizes_are_plain_hex_within_u64() {
        assert_eq!(hex(b"0"), Some(0));
        assert_eq!(hex(b"1aF"), Some(0x1af));
        assert_eq!(hex(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(hex(b"10000000000000000"), None);
        for bad in [&b""[..], b"g", b" 1", b"1 ", b"-1", b"0x1"] {
            assert_eq!(hex(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_a_last_chunked_coding_counts() {
        assert!(chunked_last(b"chunked"));
        assert!(chunked_last(b"gzip, Chunked "));
        assert!(!chunked_last(b"chunked, gzip"));
        assert!(!chunked_last(b""));
    }
}
