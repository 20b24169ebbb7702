//! Entry points for fuzzing (`fuzz/`, cargo fuzz) and for replaying the committed corpus in
//! `make test` (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must never panic.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::forward::Upstreams;
use crate::topology::{build, BuildContext, Overrides, RawTopology, RequestView, Topology};

/// Parse, validate and build an arbitrary topology document; on success, route a few keys.
pub fn topology_document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = RawTopology::parse(text) else {
        return;
    };
    if let Ok(t) = build(
        raw,
        &Overrides::default(),
        &BuildContext::default(),
        &Upstreams::new(),
    ) {
        for key in ["", "user-1", "42"] {
            let shard = crate::topology::Shard::of_key(key.as_bytes(), t.shard_count);
            let _ = t.serving(shard);
            let _ = t.failover_order(shard);
            let _ = t.serving_reason(shard);
        }
        let _ = t.shards_served();
    }
}

/// The demo topology, built once, for routing arbitrary requests.
fn demo() -> Option<&'static Topology> {
    use std::sync::OnceLock;
    static DEMO: OnceLock<Option<Topology>> = OnceLock::new();
    DEMO.get_or_init(|| {
        let raw = RawTopology::parse(crate::demo::EMBEDDED_TOPOLOGY).ok()?;
        build(
            raw,
            &Overrides::default(),
            &BuildContext::default(),
            &Upstreams::new(),
        )
        .ok()
    })
    .as_ref()
}

/// Route an arbitrary request: the bytes are split into a method line, a request target and
/// `name: value` header lines (invalid parts are dropped, as hyper would refuse them).
pub fn request_routing(data: &[u8]) {
    let Some(t) = demo() else {
        return;
    };
    let mut lines = data.split(|&b| b == b'\n');
    let method = lines
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = lines
        .next()
        .and_then(|u| Uri::try_from(u).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    let view = RequestView {
        method: &method,
        uri: &uri,
        headers: &headers,
    };
    if let Ok(d) = t.decide(view) {
        // The decision must name things that exist.
        let _ = t.route(d.route);
        let _ = t.idc(d.idc);
    }
    let _ = crate::headers::Ids::for_request(&headers);
    let mut h = headers;
    crate::headers::strip_gateway_headers(&mut h);
    crate::headers::strip_hop_by_hop(&mut h);
}
