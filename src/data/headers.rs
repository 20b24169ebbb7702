//! Header hygiene on the way up and down (DESIGN.md §2): the gateway's own `x-shardgate-*`
//! headers, hop-by-hop stripping, `x-request-id`, `x-forwarded-*` and W3C `traceparent`.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const SHARD: HeaderName = HeaderName::from_static("x-shardgate-shard");
pub const IDC: HeaderName = HeaderName::from_static("x-shardgate-idc");
pub const EPOCH: HeaderName = HeaderName::from_static("x-shardgate-epoch");
/// The revision of the last change of the shard's owner (DESIGN.md §12): sent upstream, and
/// in a backend's 421 with the owner it knows (`OWNER`).
pub const OWNER_EPOCH: HeaderName = HeaderName::from_static("x-shardgate-owner-epoch");
/// In a backend's 421: the IDC that owns the shard as the backend knows it.
pub const OWNER: HeaderName = HeaderName::from_static("x-shardgate-owner");
/// Upstream, on a request sent again to the owner a backend named in its 421.
pub const REFORWARD: HeaderName = HeaderName::from_static("x-shardgate-reforward");
pub const REASON: HeaderName = HeaderName::from_static("x-shardgate-reason");
pub const SPILL: HeaderName = HeaderName::from_static("x-shardgate-spill");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A hop-by-hop header (RFC 9110 §7.6.1, and the legacy `proxy-connection`): matched on the
/// name's text. The upstream client keeps a response head's lines as they came only when none
/// is one of these (`upstream::h1::line_kind`, checked against this list by its tests).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
    )
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds those present; most messages carry none (nothing is
    // allocated then), and only what is there is removed (each removal hashes its name).
    let mut gone: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    if gone.is_empty() {
        return;
    }
    // Every `Connection` line counts: two lines are one comma-separated list (RFC 9110
    // §5.3), and a header named only on the second must not slip through.
    gone.extend(
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok()),
    );
    for name in gone {
        headers.remove(name);
    }
}

/// The request carries a header named `x-shardgate-*`: a pass over the names, no lookup.
pub fn has_gateway_headers(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().starts_with("x-shardgate-"))
}

/// Client-sent `x-shardgate-*` headers are dropped before routing: nobody outside can steer
/// routing, sets or spills.
pub fn strip_gateway_headers(headers: &mut HeaderMap) {
    // Nothing is allocated when there is none (the proxy calls this only when
    // `has_gateway_headers` found one).
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-shardgate-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// The request's id and trace context: the client's when valid, else new ones.
pub struct Ids {
    pub request_id: HeaderValue,
    /// `Some` when the gateway started the trace (the client's valid one is left in place).
    pub traceparent: Option<HeaderValue>,
}

impl Ids {
    /// One allocation at most: a new trace's request id is a slice of its `traceparent`'s
    /// buffer (the trace id), and every later copy of either is a reference-count increment.
    pub fn for_request(headers: &HeaderMap) -> Ids {
        // One pass over the lines finds both (two lookups would hash both names); the first
        // line of each counts, as a lookup would have found it.
        let (mut id_line, mut trace_line) = (None, None);
        for (name, value) in headers {
            match name.as_str() {
                "x-request-id" if id_line.is_none() => id_line = Some(value),
                "traceparent" if trace_line.is_none() => trace_line = Some(value),
                _ => {}
            }
        }
        let client_id = id_line.filter(|v| valid_request_id(v.as_bytes())).cloned();
        let client_trace = trace_line.is_some_and(|v| valid_traceparent(v.as_bytes()));
        if client_trace {
            return Ids {
                request_id: client_id.unwrap_or_else(|| {
                    let mut id = [0u8; 32];
                    hex_into(&fastrand::u128(1..).to_be_bytes(), &mut id);
                    shared_value(Bytes::from_owner(id))
                }),
                traceparent: None,
            };
        }
        // A new trace: its trace id doubles as the request id when the client sent none, so
        // logs and traces meet on one value.
        let trace = fastrand::u128(1..).to_be_bytes();
        let span = fastrand::u64(1..).to_be_bytes();
        let mut tp = [0u8; 55];
        tp[..3].copy_from_slice(b"00-");
        hex_into(&trace, &mut tp[3..35]);
        tp[35] = b'-';
        hex_into(&span, &mut tp[36..52]);
        tp[52..].copy_from_slice(b"-01");
        let tp = Bytes::from_owner(tp);
        Ids {
            request_id: client_id.unwrap_or_else(|| shared_value(tp.slice(3..35))),
            traceparent: Some(shared_value(tp)),
        }
    }
}

/// Lowercase hex made here is always a valid header value.
fn shared_value(bytes: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).unwrap_or(HeaderValue::from_static("0"))
}

/// A client's `x-request-id` is kept when it is short and printable.
fn valid_request_id(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

fn valid_traceparent(b: &[u8]) -> bool {
    // version(2)-trace(32)-parent(16)-flags(2)
    if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    hex(&b[0..2])
        && hex(&b[3..35])
        && hex(&b[36..52])
        && hex(&b[53..55])
        && &b[0..2] != b"ff"
        && b[3..35].iter().any(|&c| c != b'0')
        && b[36..52].iter().any(|&c| c != b'0')
}

/// The host a request is for, as the upstream's `Host`: its authority (HTTP/2 `:authority`,
/// an absolute-form target) or else its first `Host` line, port included.
pub fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<HeaderValue> {
    match uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => headers.get(http::header::HOST).cloned(),
    }
}

/// `x-forwarded-for` for the upstream, as one line: every line the client sent, in order, then
/// the client's address (already a header value).
pub fn forwarded_for(headers: &HeaderMap, client: &HeaderValue) -> HeaderValue {
    // Every line counts, as for `Connection`: a backend reading the list must see each hop,
    // not only the first line's. One lookup of the name, found or not.
    let mut joined: Vec<u8> = Vec::new();
    for prev in headers.get_all(FORWARDED_FOR) {
        let prev = prev.as_bytes().trim_ascii();
        if !prev.is_empty() {
            joined.extend_from_slice(prev);
            joined.extend_from_slice(b", ");
        }
    }
    if joined.is_empty() {
        return client.clone();
    }
    joined.extend_from_slice(client.as_bytes());
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| client.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-user-id", "7".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-user-id"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_goes() {
        // The fuzz checker's own list of them.
        for name in crate::dev::fuzz::HOP_BY_HOP {
            let name = HeaderName::from_static(name);
            let mut h = HeaderMap::new();
            h.insert(name.clone(), "x".parse().unwrap());
            h.insert("x-user-id", "7".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(&name), "{name} kept");
            assert!(h.contains_key("x-user-id"));
        }
        for kept in [
            "host",
            "content-length",
            "x-connection",
            "tee",
            "upgrade-insecure-requests",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(kept)), "{kept}");
        }
    }

    #[test]
    fn gateway_headers_from_clients_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x-shardgate-idc", "bj".parse().unwrap());
        h.insert("x-shardgate-shard", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        strip_gateway_headers(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn request_id_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(Ids::for_request(&h).request_id, "abc-123");
        h.append("x-request-id", "second-line".parse().unwrap());
        assert_eq!(
            Ids::for_request(&h).request_id,
            "abc-123",
            "the first line counts"
        );
        h.remove("x-request-id");
        h.insert("x-request-id", "has space".parse().unwrap());
        let fresh = Ids::for_request(&h).request_id;
        assert_eq!(fresh.len(), 32);
        assert!(fresh.as_bytes().iter().all(u8::is_ascii_hexdigit));
        assert_ne!(fresh, Ids::for_request(&h).request_id);
    }

    #[test]
    fn traceparent_kept_or_started() {
        let mut h = HeaderMap::new();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", good.parse().unwrap());
        assert!(Ids::for_request(&h).traceparent.is_none());
        h.insert("traceparent", "garbage".parse().unwrap());
        let ids = Ids::for_request(&h);
        let started = ids.traceparent.unwrap();
        assert!(valid_traceparent(started.as_bytes()), "{started:?}");
        // Without a client id, the request id is the new trace id.
        assert_eq!(&started.as_bytes()[3..35], ids.request_id.as_bytes());
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let client = HeaderValue::from_static("127.0.0.1");
        assert_eq!(forwarded_for(&h, &client), "127.0.0.1");
        h.insert(FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        assert_eq!(forwarded_for(&h, &client), "10.0.0.1, 127.0.0.1");
    }

    #[test]
    fn the_stamp_writes_the_gateways_header_names() {
        let v = || Some(HeaderValue::from_static("v"));
        let stamp = crate::data::upstream::Stamp {
            host: v(),
            forwarded_for: v(),
            forwarded_proto: v(),
            request_id: v(),
            traceparent: v(),
            shard: v(),
            idc: v().map(std::borrow::Cow::Owned),
            epoch: v().map(std::borrow::Cow::Owned),
            owner_epoch: v().map(std::borrow::Cow::Owned),
            spill: true,
            reforward: true,
        };
        let mut head = bytes::BytesMut::new();
        stamp.write_head_lines(&mut head, &HeaderMap::new(), |_| true);
        let names: Vec<String> = String::from_utf8_lossy(&head)
            .split_terminator("\r\n")
            .map(|line| line.split(": ").next().unwrap_or("").to_owned())
            .collect();
        let ours = [
            http::header::HOST,
            FORWARDED_HOST,
            FORWARDED_FOR,
            FORWARDED_PROTO,
            REQUEST_ID,
            TRACEPARENT,
            SHARD,
            IDC,
            EPOCH,
            OWNER_EPOCH,
            SPILL,
            REFORWARD,
        ];
        assert_eq!(names, ours.iter().map(|n| n.as_str()).collect::<Vec<_>>());
    }

    #[test]
    fn every_connection_line_counts() {
        let mut h = HeaderMap::new();
        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", "x-second , x-third".parse().unwrap());
        h.insert("x-second", "1".parse().unwrap());
        h.insert("x-third", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn every_forwarded_for_line_counts() {
        let mut h = HeaderMap::new();
        h.append(FORWARDED_FOR, "203.0.113.9".parse().unwrap());
        h.append(FORWARDED_FOR, " ".parse().unwrap());
        h.append(FORWARDED_FOR, "198.51.100.7, 192.0.2.1".parse().unwrap());
        assert_eq!(
            forwarded_for(&h, &HeaderValue::from_static("127.0.0.1")),
            "203.0.113.9, 198.51.100.7, 192.0.2.1, 127.0.0.1"
        );
    }
}
