//! Route matching and sharding-key extraction: pure functions over a request's method, host,
//! path, query and headers. The matcher is precomputed per snapshot (host map, then the longest
//! path prefix by segment), so the per-request cost does not grow with the number of routes.

pub mod path;

use std::borrow::Cow;

use rustc_hash::FxHashMap;

use http::{HeaderMap, HeaderName, Method};

use crate::util::percent_decode;

/// Index of a route in the snapshot's route list (`Topology::routes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteId(pub u32);

/// Longest sharding key we accept; longer values are refused with 400 (`invalid_key`).
pub const MAX_KEY_BYTES: usize = 256;

/// Where a route reads its sharding key from (`header:x-user-id`, `query:user_id`,
/// `cookie:uid`, `path:2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Query(String),
    Cookie(String),
    /// 1-based path segment: `/orders/42` → `path:2` = `42`.
    Path(usize),
}

impl KeySource {
    pub fn parse(text: &str) -> Result<KeySource, String> {
        let (kind, name) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not `kind:name` (header, query, cookie, path)"))?;
        if name.is_empty() {
            return Err(format!("`{text}` has an empty name"));
        }
        match kind {
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("`{name}` is not a valid header name")),
            "query" => Ok(KeySource::Query(name.to_owned())),
            "cookie" => Ok(KeySource::Cookie(name.to_owned())),
            "path" => match name.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(KeySource::Path(n)),
                _ => Err(format!("`path:{name}`: the segment number counts from 1")),
            },
            other => Err(format!(
                "unknown key source `{other}` (expected header, query, cookie or path)"
            )),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header:{h}"),
            KeySource::Query(q) => write!(f, "query:{q}"),
            KeySource::Cookie(c) => write!(f, "cookie:{c}"),
            KeySource::Path(n) => write!(f, "path:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    Missing,
    TooLong,
}

/// The sharding key of a request: the first source that is present and non-empty wins.
/// Query and path values are percent-decoded so that `?user_id=a%20b` and a header `a b`
/// land on the same shard.
pub fn extract_key<'a>(
    sources: &[KeySource],
    headers: &'a HeaderMap,
    path: &'a str,
    query: Option<&'a str>,
) -> Result<Cow<'a, [u8]>, KeyError> {
    for source in sources {
        let found: Option<Cow<'a, [u8]>> = match source {
            KeySource::Header(name) => headers
                .get(name)
                .map(|v| Cow::Borrowed(trim_ascii(v.as_bytes()))),
            KeySource::Query(name) => query.and_then(|q| query_value(q, name)),
            KeySource::Cookie(name) => cookie_value(headers, name).map(Cow::Borrowed),
            KeySource::Path(n) => path_segment(path.as_bytes(), *n).map(percent_decode),
        };
        if let Some(key) = found.filter(|k| !k.is_empty()) {
            if key.len() > MAX_KEY_BYTES {
                return Err(KeyError::TooLong);
            }
            return Ok(key);
        }
    }
    Err(KeyError::Missing)
}

/// The `n`-th non-empty segment of a path, counting from 1.
fn path_segment(path: &[u8], n: usize) -> Option<&[u8]> {
    let mut seen = 0;
    let mut start = 0;
    for i in 0..=path.len() {
        if i == path.len() || path[i] == b'/' {
            if i > start {
                seen += 1;
                if seen == n {
                    return Some(&path[start..i]);
                }
            }
            start = i + 1;
        }
    }
    None
}

fn trim_ascii(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, [u8]>> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k.as_bytes()).as_ref() == name.as_bytes() {
            // Form encoding: `+` is a space in query strings.
            if v.as_bytes().contains(&b'+') {
                let spaced: Vec<u8> = v
                    .bytes()
                    .map(|b| if b == b'+' { b' ' } else { b })
                    .collect();
                return Some(Cow::Owned(percent_decode(&spaced).into_owned()));
            }
            return Some(percent_decode(v.as_bytes()));
        }
    }
    None
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for header in headers.get_all(http::header::COOKIE) {
        for pair in header.as_bytes().split(|&b| b == b';') {
            let pair = trim_ascii(pair);
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if &pair[..eq] == name.as_bytes() {
                let v = trim_ascii(&pair[eq + 1..]);
                let v = v
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v);
                return Some(v);
            }
        }
    }
    None
}

/// What the matcher needs to know of a route.
#[derive(Debug, Clone)]
pub struct RouteRule {
    pub id: RouteId,
    pub host: String,
    pub path_prefix: String,
    /// Empty = any method.
    pub methods: Vec<Method>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Route(RouteId),
    /// A route has this path but not this method (405).
    MethodNotAllowed,
    NotFound,
}

/// Precomputed route table (Fx-hashed: keys are our own route prefixes, and a lookup costs a
/// few nanoseconds instead of SipHash's tens): exact host first, then `*`; within a host the longest path prefix
/// that ends on a segment boundary; within a prefix the first route whose methods allow it.
#[derive(Debug, Default)]
pub struct RouteMatcher {
    hosts: FxHashMap<String, PrefixTable>,
    any: PrefixTable,
}

#[derive(Debug, Default)]
struct PrefixTable {
    prefixes: FxHashMap<String, Vec<(Vec<Method>, RouteId)>>,
    /// `has_len[n]`: some prefix is `n` bytes long. Candidates of other lengths are skipped
    /// without hashing.
    has_len: Vec<bool>,
}

impl PrefixTable {
    fn insert(&mut self, prefix: &str, methods: Vec<Method>, id: RouteId) {
        let prefix = normalize_prefix(prefix);
        if self.has_len.len() <= prefix.len() {
            self.has_len.resize(prefix.len() + 1, false);
        }
        self.has_len[prefix.len()] = true;
        self.prefixes
            .entry(prefix.to_owned())
            .or_default()
            .push((methods, id));
    }

    fn find(&self, path: &str, method: &Method) -> Match {
        if self.prefixes.is_empty() {
            return Match::NotFound;
        }
        let mut candidate = normalize_prefix(path);
        let mut method_mismatch = false;
        loop {
            let len = candidate.len();
            if self.has_len.get(len).copied().unwrap_or(false) {
                if let Some(rules) = self.prefixes.get(candidate) {
                    for (methods, id) in rules {
                        if methods.is_empty() || methods.contains(method) {
                            return Match::Route(*id);
                        }
                    }
                    method_mismatch = true;
                }
            }
            if candidate == "/" {
                break;
            }
            candidate = match candidate.as_bytes().iter().rposition(|&b| b == b'/') {
                Some(0) | None => "/",
                Some(i) => &candidate[..i],
            };
        }
        if method_mismatch {
            Match::MethodNotAllowed
        } else {
            Match::NotFound
        }
    }
}

/// `/orders/` and `/orders` are the same prefix; the root stays `/`.
fn normalize_prefix(p: &str) -> &str {
    let mut end = p.len();
    while end > 0 && p.as_bytes()[end - 1] == b'/' {
        end -= 1;
    }
    let trimmed = &p[..end];
    if trimmed.is_empty() {
        "/"
    } else {
        trimmed
    }
}

impl RouteMatcher {
    pub fn new(rules: &[RouteRule]) -> RouteMatcher {
        let mut m = RouteMatcher::default();
        for rule in rules {
            let table = if rule.host == "*" {
                &mut m.any
            } else {
                m.hosts.entry(rule.host.to_ascii_lowercase()).or_default()
            };
            table.insert(&rule.path_prefix, rule.methods.clone(), rule.id);
        }
        m
    }

    /// `host` gives the request's host without port, any case; it is asked only when some
    /// route names a host (finding it is a header lookup).
    pub fn find<'h>(
        &self,
        host: impl FnOnce() -> Option<&'h str>,
        path: &str,
        method: &Method,
    ) -> Match {
        let mut exact = Match::NotFound;
        if let Some(host) = (!self.hosts.is_empty()).then(host).flatten() {
            let table = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                self.hosts.get(&host.to_ascii_lowercase())
            } else {
                self.hosts.get(host)
            };
            if let Some(table) = table {
                exact = table.find(path, method);
                if let Match::Route(_) = exact {
                    return exact;
                }
            }
        }
        match self.any.find(path, method) {
            Match::NotFound => exact,
            other => other,
        }
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute form) or the Host header,
/// without the port.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.host() {
        Some(h) => h,
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    match host.as_bytes().iter().rposition(|&b| b == b':') {
        Some(i) if host.as_bytes()[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u32, host: &str, prefix: &str, methods: &[Method]) -> RouteRule {
        RouteRule {
            id: RouteId(id),
            host: host.into(),
            path_prefix: prefix.into(),
            methods: methods.to_vec(),
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let m = RouteMatcher::new(&[
            rule(0, "*", "/", &[]),
            rule(1, "*", "/orders", &[]),
            rule(2, "*", "/orders/archive/", &[]),
        ]);
        assert_eq!(
            m.find(|| None, "/orders", &Method::GET),
            Match::Route(RouteId(1))
        );
        assert_eq!(
            m.find(|| None, "/orders/42", &Method::GET),
            Match::Route(RouteId(1))
        );
        assert_eq!(
            m.find(|| None, "/orders/archive/7", &Method::GET),
            Match::Route(RouteId(2))
        );
        // `/ordersX` is not under `/orders`.
        assert_eq!(
            m.find(|| None, "/ordersX", &Method::GET),
            Match::Route(RouteId(0))
        );
        assert_eq!(m.find(|| None, "/", &Method::GET), Match::Route(RouteId(0)));
    }

    #[test]
    fn exact_host_before_wildcard_and_405() {
        let m = RouteMatcher::new(&[
            rule(0, "api.example.com", "/pay", &[Method::POST]),
            rule(1, "*", "/users", &[Method::GET]),
        ]);
        assert_eq!(
            m.find(|| Some("API.example.com"), "/pay/1", &Method::POST),
            Match::Route(RouteId(0))
        );
        assert_eq!(
            m.find(|| Some("api.example.com"), "/pay/1", &Method::GET),
            Match::MethodNotAllowed
        );
        assert_eq!(
            m.find(|| Some("other"), "/pay", &Method::POST),
            Match::NotFound
        );
        assert_eq!(
            m.find(|| None, "/users", &Method::DELETE),
            Match::MethodNotAllowed
        );
        assert_eq!(
            m.find(|| Some("api.example.com"), "/users/1", &Method::GET),
            Match::Route(RouteId(1))
        );
    }

    #[test]
    fn key_sources_in_order() {
        let sources = vec![
            KeySource::parse("header:x-user-id").unwrap(),
            KeySource::parse("query:user_id").unwrap(),
            KeySource::parse("cookie:uid").unwrap(),
            KeySource::parse("path:2").unwrap(),
        ];
        let mut h = HeaderMap::new();
        assert_eq!(
            extract_key(&sources, &h, "/orders/42", None)
                .unwrap()
                .as_ref(),
            b"42"
        );
        h.insert("cookie", "a=1; uid=\"c7\"; b=2".parse().unwrap());
        assert_eq!(
            extract_key(&sources, &h, "/orders/42", None)
                .unwrap()
                .as_ref(),
            b"c7"
        );
        assert_eq!(
            extract_key(&sources, &h, "/orders/42", Some("x=1&user_id=a%20b+c"))
                .unwrap()
                .as_ref(),
            b"a b c"
        );
        h.insert("x-user-id", " u1 ".parse().unwrap());
        assert_eq!(
            extract_key(&sources, &h, "/orders/42", Some("user_id=q"))
                .unwrap()
                .as_ref(),
            b"u1"
        );
        let empty = HeaderMap::new();
        assert_eq!(
            extract_key(&sources, &empty, "/orders", None),
            Err(KeyError::Missing)
        );
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let mut h = HeaderMap::new();
        h.insert("x-user-id", long.parse().unwrap());
        assert_eq!(extract_key(&sources, &h, "/", None), Err(KeyError::TooLong));
    }

    #[test]
    fn key_source_syntax_errors_are_explained() {
        assert!(KeySource::parse("path:0")
            .unwrap_err()
            .contains("counts from 1"));
        assert!(KeySource::parse("body:x")
            .unwrap_err()
            .contains("unknown key source"));
        assert!(KeySource::parse("header")
            .unwrap_err()
            .contains("kind:name"));
    }

    #[test]
    fn host_without_port() {
        let h = HeaderMap::new();
        let uri: http::Uri = "http://Example.com:8080/x".parse().unwrap();
        assert_eq!(request_host(&uri, &h), Some("Example.com"));
        let mut h = HeaderMap::new();
        h.insert("host", "[::1]:80".parse().unwrap());
        assert_eq!(request_host(&"/x".parse().unwrap(), &h), Some("::1"));
        let mut h = HeaderMap::new();
        h.insert("host", "api.example.com:8443".parse().unwrap());
        assert_eq!(
            request_host(&"/x".parse().unwrap(), &h),
            Some("api.example.com")
        );
        h.insert("host", "api.example.com".parse().unwrap());
        assert_eq!(
            request_host(&"/x".parse().unwrap(), &h),
            Some("api.example.com")
        );
    }

    #[test]
    fn path_segments_count_from_one_and_skip_empty_ones() {
        assert_eq!(path_segment(b"/orders/42", 2), Some(&b"42"[..]));
        assert_eq!(path_segment(b"//orders//42/", 2), Some(&b"42"[..]));
        assert_eq!(path_segment(b"/orders", 1), Some(&b"orders"[..]));
        assert_eq!(path_segment(b"/orders", 2), None);
        assert_eq!(path_segment(b"/", 1), None);
    }
}
