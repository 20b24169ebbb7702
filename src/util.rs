//! Small helpers more than one module needs and none owns: the wall clock in Unix
//! milliseconds, percent-encoding of URL parts (both ways), and HTTP/1.1 framing ([`http1`]).

use std::borrow::Cow;

pub mod http1;

/// Unix milliseconds now (0 if the clock is before 1970). Wall-clock times recorded for
/// display, warm-up steps and fences; decisions that must not jump use monotonic clocks.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One segment of a URL path: ASCII letters, digits, `-`, `_` and `.` stay, every other
/// byte becomes `%XX`. An IDC name, say, cannot change the path it is put in.
pub fn encode_segment(s: &str) -> String {
    encode(s, |_| false)
}

/// [`encode_segment`] that also keeps `:`, so that a degrade target (`route:NAME`) stays
/// readable in the admin's path and logs; `:` is allowed in a path segment (RFC 3986 `pchar`).
pub fn encode_segment_keeping_colon(s: &str) -> String {
    encode(s, |b| b == b':')
}

/// A query component, form-encoded (`application/x-www-form-urlencoded`: a space is `+`).
pub fn encode_query(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn encode(s: &str, also_keep: impl Fn(u8) -> bool) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b if also_keep(b) => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes `%XX`; malformed escapes are kept as they are. Borrows when there is no `%`.
pub fn percent_decode(input: &[u8]) -> Cow<'_, [u8]> {
    if !input.contains(&b'%') {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex_digit(input[i + 1]), hex_digit(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    Cow::Owned(out)
}

/// The value of one hexadecimal digit (either case).
pub fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_escape_all_but_unreserved_bytes() {
        assert_eq!(encode_segment("sh-1_a.b"), "sh-1_a.b");
        assert_eq!(encode_segment("a b/c:d"), "a%20b%2Fc%3Ad");
        assert_eq!(encode_segment("é"), "%C3%A9");
        assert_eq!(
            encode_segment_keeping_colon("route:a b/c"),
            "route:a%20b%2Fc"
        );
    }

    #[test]
    fn queries_are_form_encoded() {
        assert_eq!(encode_query("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(encode_query("k-1_2.3*"), "k-1_2.3*");
    }

    #[test]
    fn percent_decode_keeps_malformed_escapes() {
        assert!(matches!(percent_decode(b"plain"), Cow::Borrowed(_)));
        assert_eq!(percent_decode(b"a%2Fb").as_ref(), b"a/b");
        assert_eq!(percent_decode(b"a%2fb%41").as_ref(), b"a/bA");
        assert_eq!(percent_decode(b"100%").as_ref(), b"100%");
        assert_eq!(percent_decode(b"%zz%4").as_ref(), b"%zz%4");
    }

    #[test]
    fn decoding_undoes_encoding() {
        for s in ["route:orders", "a b/c?d", "日本", "%41"] {
            let encoded = encode_segment(s);
            assert_eq!(percent_decode(encoded.as_bytes()).as_ref(), s.as_bytes());
        }
    }
}
