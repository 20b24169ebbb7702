//! The request path as routes see it and backends get it: percent-encoded unreserved
//! characters decoded, dot segments resolved and repeated slashes merged (RFC 3986 §6.2.2,
//! §5.2.4), so `/catalog/../orders` is `/orders` both to the route matcher and to the
//! backend. What backends disagree about is refused instead: an encoded slash or backslash
//! (`%2F`, `%5C`), a raw backslash, and a dot segment with parameters (`..;`).

use std::borrow::Cow;

use crate::util::hex_digit;

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: one backend splits there, another does not.
    EncodedSeparator,
    /// `\`: a separator on some servers.
    Backslash,
    /// `..;x` or `.;x`: a dot segment to some servers (Tomcat), a name to others.
    DotWithParameters,
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            PathError::EncodedSeparator => {
                "the path has an encoded slash or backslash (%2F, %5C), which backends read differently"
            }
            PathError::Backslash => "the path has a backslash",
            PathError::DotWithParameters => {
                "the path has a dot segment with parameters (`..;`)"
            }
        }
    }
}

/// The normalised form of `path` (borrowed when it already is). Paths that do not start with
/// `/` (`*`, a CONNECT's empty one) are left alone.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if !bytes.starts_with(b"/") || is_normal(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    let mut segments: Vec<&[u8]> = Vec::new();
    // Whether the path ends in a directory (`/a/`, `/a/.`, `/a/b/..`): the slash is kept.
    let mut directory = false;
    for segment in decoded[1..].split(|b| *b == b'/') {
        directory = true;
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            _ if segment.starts_with(b"..;") || segment.starts_with(b".;") => {
                return Err(PathError::DotWithParameters)
            }
            _ => {
                segments.push(segment);
                directory = false;
            }
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if directory || out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII was replaced by ASCII, at ASCII boundaries: still UTF-8.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PathError::EncodedSeparator)
}

/// The common case, checked in one pass: no `%`, no `\`, no empty segment and no segment
/// starting with a dot.
fn is_normal(bytes: &[u8]) -> bool {
    let mut after_slash = false;
    for &b in bytes {
        match b {
            b'%' | b'\\' => return false,
            b'/' | b'.' if after_slash => return false,
            _ => {}
        }
        after_slash = b == b'/';
    }
    true
}

/// Decodes `%XX` of unreserved characters (letters, digits, `-`, `.`, `_`, `~`); other escapes
/// stay as they are, except encoded separators, which are refused.
fn decode_unreserved(bytes: &[u8]) -> Result<Cow<'_, [u8]>, PathError> {
    if bytes.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex_digit(*h).zip(hex_digit(*l)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            Some(b'/' | b'\\') => return Err(PathError::EncodedSeparator),
            Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                out.push(c);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn dot_segments_repeated_slashes_and_unreserved_escapes_are_resolved() {
        for (input, want) in [
            ("/catalog/../orders/1", "/orders/1"),
            ("/catalog/%2e%2E/orders", "/orders"),
            ("/a/./b/.%2e/c", "/a/c"),
            ("/../../x", "/x"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("/..", "/"),
            ("/%7Euser/%41%62", "/~user/Ab"),
            // Reserved characters stay encoded; only the unreserved are decoded.
            ("/q/a%20b%3F%25", "/q/a%20b%3F%25"),
            ("/a/.well-known/x", "/a/.well-known/x"),
            ("/a/..x/y", "/a/..x/y"),
            ("/bad%zz/%4", "/bad%zz/%4"),
        ] {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/orders/42", "/a.b/c.d", "*", "", "/x;y=1"] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(b)) if b == p),
                "{p}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the path, the result is normal: no dot segment, no empty segment, nothing
        /// left to decode, and normalising it again changes nothing.
        #[test]
        fn the_result_is_normal_and_stable(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "", ".", "..", "%2e", "%2E%2e", "a", "b.c", "%41", "%20", "~", "..x", ";p",
                ]),
                0..8,
            )
        ) {
            let path = format!("/{}", parts.join("/"));
            if let Ok(once) = normalize(&path) {
                let segments: Vec<&str> = once[1..].split('/').collect();
                for (i, s) in segments.iter().enumerate() {
                    proptest::prop_assert!(*s != "." && *s != "..", "{path} -> {once}");
                    proptest::prop_assert!(
                        !s.is_empty() || i + 1 == segments.len(),
                        "{path} -> {once}"
                    );
                }
                proptest::prop_assert!(!once.to_ascii_lowercase().contains("%2e"), "{path} -> {once}");
                let twice = normalize(&once).map(|t| t.into_owned());
                proptest::prop_assert_eq!(twice, Ok(once.clone().into_owned()));
            }
        }
    }

    #[test]
    fn what_backends_disagree_on_is_refused() {
        for (input, err) in [
            ("/catalog/..%2Forders", PathError::EncodedSeparator),
            ("/catalog%2f..%2forders", PathError::EncodedSeparator),
            ("/a/%5C../b", PathError::EncodedSeparator),
            ("/a\\..\\b", PathError::Backslash),
            ("/catalog/..;/orders", PathError::DotWithParameters),
            ("/catalog/.;x/orders", PathError::DotWithParameters),
            ("/catalog/%2e%2e;/orders", PathError::DotWithParameters),
        ] {
            assert_eq!(normalize(input), Err(err), "{input}");
        }
    }
}
