//! Header hygiene on the way up and down (DESIGN.md §2): the gateway's own `x-shardgate-*`
//! headers, hop-by-hop stripping, `x-request-id`, `x-forwarded-*` and W3C `traceparent`.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const SHARD: HeaderName = HeaderName::from_static("x-shardgate-shard");
pub const IDC: HeaderName = HeaderName::from_static("x-shardgate-idc");
pub const EPOCH: HeaderName = HeaderName::from_static("x-shardgate-epoch");
pub const REASON: HeaderName = HeaderName::from_static("x-shardgate-reason");
pub const SPILL: HeaderName = HeaderName::from_static("x-shardgate-spill");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(http::header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
}

/// Client-sent `x-shardgate-*` headers are dropped before routing: nobody outside can steer
/// routing, sets or spills.
pub fn strip_gateway_headers(headers: &mut HeaderMap) {
    // Fast path: most requests carry none.
    if !headers
        .keys()
        .any(|k| k.as_str().starts_with("x-shardgate-"))
    {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-shardgate-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// A client's `x-request-id` is kept when it is short and printable; otherwise a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            return v.clone();
        }
    }
    let id = fastrand::u128(..);
    HeaderValue::from_str(&format!("{id:032x}")).unwrap_or(HeaderValue::from_static("0"))
}

/// Keeps a valid W3C `traceparent`, else starts a new trace.
pub fn traceparent(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(v) = headers.get(TRACEPARENT) {
        if valid_traceparent(v.as_bytes()) {
            return None; // keep the client's
        }
    }
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    HeaderValue::from_str(&format!("00-{trace:032x}-{span:016x}-01")).ok()
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

/// Appends the client address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr) {
    let value = match headers.get(FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(FORWARDED_FOR, v);
    }
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
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&h));
    }

    #[test]
    fn traceparent_kept_or_started() {
        let mut h = HeaderMap::new();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", good.parse().unwrap());
        assert!(traceparent(&h).is_none());
        h.insert("traceparent", "garbage".parse().unwrap());
        let started = traceparent(&h).unwrap();
        assert!(valid_traceparent(started.as_bytes()));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.1".parse().unwrap());
        assert_eq!(h[FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
    }
}
