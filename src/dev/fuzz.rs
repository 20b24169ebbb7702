//! Entry points for fuzzing (`fuzz/`, cargo fuzz) and for replaying the committed corpus in
//! `make test` (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, must never panic, and
//! panics on purpose when a postcondition of the code under test does not hold: a fuzzer
//! that only looks for crashes finds few of the bugs that matter in a gateway.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;
use tokio::io::{AsyncRead, ReadBuf};

use crate::control::topology::{
    build, BuildContext, IdcState, Overrides, RawTopology, RequestView, Shard, Topology,
};
use crate::data::server::gate::{Gate, Refusal, MAX_HEADERS};
use crate::data::upstream::Upstreams;

/// Separates a topology document from the build's extra input in a `topology_document` case:
/// the document's TOML, then this line, then JSON [`Extras`]. The line is a TOML comment, so a
/// case without extras is a plain document.
pub const EXTRAS_LINE: &str = "\n#%extras\n";

/// What a snapshot is built with besides the document: operator overrides (IDC states with
/// warm-up steps, degrade switches, move records in any phase) and the build context (local
/// IDC, the running shard count). Lets the fuzzer reach moves, warm-up and the local IDC. (A
/// `now` in older cases is ignored: no snapshot depends on the clock.)
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Extras {
    pub overrides: Overrides,
    pub local_idc: Option<String>,
    pub running_shard_count: Option<u32>,
    pub revision: u64,
}

/// How many shards of a big table are checked one by one (all of a small one).
const CHECKED_SHARDS: u32 = 4096;

/// Parse, validate and build an arbitrary topology document with arbitrary overrides.
///
/// Postconditions: an invalid document lists at least one problem, each with a place and a
/// reason; a valid one builds the same snapshot twice, and every shard is homed and served by
/// IDCs that exist, never by a `down` IDC, along a failover order that starts at home.
pub fn topology_document(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (doc_text, extras) = match text.split_once(EXTRAS_LINE) {
        Some((doc, json)) => match serde_json::from_str::<Extras>(json) {
            Ok(extras) => (doc, extras),
            Err(_) => return,
        },
        None => (text, Extras::default()),
    };
    let raw = match RawTopology::parse(doc_text) {
        Ok(raw) => raw,
        Err(problems) => {
            check_problems(&problems);
            return;
        }
    };
    let ctx = BuildContext {
        revision: extras.revision,
        local_idc: extras.local_idc.clone(),
        running_shard_count: extras.running_shard_count,
    };
    let built = build(raw.clone(), &extras.overrides, &ctx, &Upstreams::new());
    let t = match built {
        Ok(t) => t,
        Err(problems) => {
            check_problems(&problems);
            return;
        }
    };
    check_topology(&t, &extras);
    // The same input builds the same snapshot: gateways that read the same etcd state must
    // serve every shard from the same IDC.
    let again = build(raw, &extras.overrides, &ctx, &Upstreams::new());
    let Ok(again) = again else {
        panic!("the same document and overrides built once and failed once");
    };
    for s in sample_shards(t.shard_count) {
        assert_eq!(
            (t.home(s), t.serving(s), t.is_fenced(s)),
            (again.home(s), again.serving(s), again.is_fenced(s)),
            "shard {} differs between two builds of the same input",
            s.0
        );
    }
}

fn check_problems(problems: &crate::control::topology::Problems) {
    assert!(!problems.0.is_empty(), "refused without naming a problem");
    for p in &problems.0 {
        assert!(
            !p.at.is_empty() && !p.reason.is_empty(),
            "a problem without place or reason: {p:?}"
        );
    }
    let listed = problems.to_string();
    assert!(listed.contains(&problems.0.len().to_string()), "{listed}");
}

/// Every shard when there are few, else a spread of them including both ends.
fn sample_shards(count: u32) -> impl Iterator<Item = Shard> {
    let step = (count / CHECKED_SHARDS).max(1);
    (0..count)
        .step_by(step as usize)
        .chain(std::iter::once(count - 1))
        .map(Shard)
}

fn check_topology(t: &Topology, extras: &Extras) {
    assert!(t.shard_count > 0, "a snapshot with no shards");
    let idcs = t.idcs.len();
    assert!(idcs > 0, "a snapshot with no IDC");
    for s in sample_shards(t.shard_count) {
        let home = t.home(s);
        assert!((home.0 as usize) < idcs, "shard {} homed nowhere", s.0);
        let order = t.failover_order(s);
        assert!(
            order.iter().all(|i| (i.0 as usize) < idcs),
            "shard {}: failover order names an unknown IDC",
            s.0
        );
        if let Some(serving) = t.serving(s) {
            assert!((serving.0 as usize) < idcs, "shard {} served nowhere", s.0);
            assert_ne!(
                t.idc(serving).state,
                IdcState::Down,
                "shard {} is served by down IDC {}",
                s.0,
                t.idc(serving).name
            );
        }
        let _ = t.serving_reason(s);
    }
    let served = t.shards_served();
    assert_eq!(served.len(), idcs, "shards_served is not indexed by IDC");
    assert!(
        served.iter().map(|&n| u64::from(n)).sum::<u64>() <= u64::from(t.shard_count),
        "more shards served than exist"
    );
    if let Some(global) = t.global_idc() {
        assert_ne!(
            t.idc(global).state,
            IdcState::Down,
            "global routes go to a down IDC"
        );
    }
    match (&extras.local_idc, t.local_idc) {
        (Some(name), Some(id)) => assert_eq!(t.idc(id).name.as_str(), name.as_str()),
        (None, Some(_)) => panic!("a local IDC appeared from nowhere"),
        _ => {}
    }
    if !t.fenced().is_empty() {
        assert!(
            t.overrides.moves.values().any(|m| m.phase.is_open()),
            "shards fenced without a move in phase 1"
        );
    }
    for key in ["", "user-1", "42"] {
        let shard = Shard::of_key(key.as_bytes(), t.shard_count);
        assert!(shard.0 < t.shard_count);
    }
}

/// The demo topology, built once, for routing arbitrary requests.
fn demo() -> Option<&'static Topology> {
    use std::sync::OnceLock;
    static DEMO: OnceLock<Option<Topology>> = OnceLock::new();
    DEMO.get_or_init(|| {
        let raw = RawTopology::parse(crate::dev::demo::EMBEDDED_TOPOLOGY).ok()?;
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

/// An arbitrary request as a `request_routing` case describes it: a method line, a request
/// target and `name: value` header lines (invalid parts are dropped, as hyper would refuse
/// them). Public so that the corpus replay can send the same requests through a real gateway.
pub fn request_parts(data: &[u8]) -> (Method, Uri, HeaderMap) {
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
    (method, uri, headers)
}

/// The headers the gateway itself sets on an upstream request (DESIGN.md §2): a header of
/// these names upstream is the gateway's, whatever the client sent.
pub const GATEWAY_SET: [&str; 10] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "traceparent",
    "x-shardgate-shard",
    "x-shardgate-idc",
    "x-shardgate-epoch",
    "x-shardgate-owner-epoch",
];

/// The hop-by-hop headers no upstream request may carry.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Checks an upstream request's headers against the client's (DESIGN.md §2): no client
/// `x-shardgate-*` header survives, no hop-by-hop header nor one the client's `Connection`
/// named, and (when `routed`) the gateway's own headers are there. Returns what is wrong.
pub fn upstream_violation(
    client: &HeaderMap,
    upstream: impl Fn(&str) -> Option<String>,
    upstream_names: &[String],
    routed: bool,
) -> Option<String> {
    for name in upstream_names {
        let name = name.as_str();
        if name.starts_with("x-shardgate-")
            && !GATEWAY_SET.contains(&name)
            && client.contains_key(name)
        {
            return Some(format!("the client's `{name}` reached the upstream"));
        }
        if HOP_BY_HOP.contains(&name) {
            return Some(format!("hop-by-hop `{name}` reached the upstream"));
        }
    }
    // Every `Connection` line names headers that must go.
    let named = client
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !GATEWAY_SET.contains(&t.as_str()))
        .collect::<Vec<_>>();
    for name in named {
        if upstream(&name).is_some() {
            return Some(format!(
                "`{name}`, named in the client's Connection, reached the upstream"
            ));
        }
    }
    for name in ["x-shardgate-idc", "x-shardgate-epoch", "x-request-id"] {
        if routed && upstream(name).is_none() {
            return Some(format!("the gateway's `{name}` is missing upstream"));
        }
    }
    None
}

/// Route an arbitrary request and rewrite its headers for the upstream as the proxy does
/// (strip the client's `x-shardgate-*`, strip hop-by-hop, add the gateway's headers).
///
/// Postconditions: a decision names a route and an IDC that exist and a shard below
/// `shard_count`, sharded exactly when the route is; the upstream headers pass
/// [`upstream_violation`]; the request id is the client's valid one or a fresh one.
pub fn request_routing(data: &[u8]) {
    let Some(t) = demo() else {
        return;
    };
    let (method, uri, client) = request_parts(data);
    let ids = crate::data::headers::Ids::for_request(&client);
    assert!(
        !ids.request_id.is_empty() && ids.request_id.len() <= 128,
        "request id {:?}",
        ids.request_id
    );
    let mut h = client.clone();
    crate::data::headers::strip_gateway_headers(&mut h);
    let view = RequestView {
        method: &method,
        uri: &uri,
        headers: &h,
    };
    let decision = t.decide(view).ok();
    if let Some(d) = &decision {
        let route = t.route(d.route);
        assert!(
            route.methods.is_empty() || route.methods.contains(&method),
            "route {} took a method it does not allow",
            route.name
        );
        assert!((d.idc.0 as usize) < t.idcs.len());
        if let Some(shard) = d.shard {
            assert!(route.sharded, "unsharded route {} got a shard", route.name);
            assert!(shard.0 < t.shard_count);
        }
    }
    // What goes upstream: the request's authority, the hop-by-hop strip and the gateway's
    // stamp, as `proxy::Gateway::upstream_request` makes them, and the lines the upstream
    // encoder writes from them (an undecided request goes nowhere).
    use crate::data::headers;
    let Some(d) = &decision else {
        return;
    };
    let host = headers::request_authority(&uri, &h);
    headers::strip_hop_by_hop(&mut h);
    let client_ip = HeaderValue::from_static("127.0.0.1");
    let stamp = crate::data::proxy::stamp(t, d, host, &h, &client_ip, &ids, "http");
    let mut head = bytes::BytesMut::new();
    stamp.write_head_lines(&mut head, &h, |_| true);
    let lines: Vec<(String, String)> = String::from_utf8_lossy(&head)
        .split_terminator("\r\n")
        .map(|line| {
            let (name, value) = line.split_once(": ").unwrap_or((line, ""));
            (name.to_owned(), value.to_owned())
        })
        .collect();
    let names: Vec<String> = lines.iter().map(|(n, _)| n.clone()).collect();
    let get = |name: &str| {
        lines
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    if let Some(wrong) = upstream_violation(&client, get, &names, true) {
        panic!("{wrong}");
    }
    // Each of the gateway's headers goes once, and hyper's client (the stamp folded into the
    // map) sends what the encoder writes.
    let mut folded = h.clone();
    stamp.fold_into(&mut folded);
    for name in GATEWAY_SET {
        let written: Vec<&str> = lines
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if name != "traceparent" || stamp.traceparent.is_some() {
            assert!(
                written.len() <= 1,
                "`{name}` went upstream {} times",
                written.len()
            );
        }
        let in_map: Vec<String> = folded
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        assert_eq!(
            written, in_map,
            "`{name}`: the encoder and the folded map differ"
        );
    }
    let xff = get(headers::FORWARDED_FOR.as_str()).unwrap_or_default();
    assert!(
        xff.ends_with("127.0.0.1"),
        "x-forwarded-for does not end with the client"
    );
}

/// The maximum head size the gate is fuzzed with: small, so oversized heads are reachable.
pub const GATE_MAX_HEAD: usize = 512;

/// A client connection that hands over its bytes `step` at a time, then ends.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        let (now, rest) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// What hyper would read through the gate from a client that sends `data` in pieces of
/// `step` bytes, with hyper reading `read` bytes at a time.
pub fn through_gate(data: &[u8], step: usize, read: usize) -> Vec<u8> {
    // Every request is answered without switching protocols (no backend upgrades here): the
    // gate keeps checking every head, the strictest case for what reaches hyper.
    let answers = std::sync::Arc::new(crate::data::server::gate::Answers::default());
    for _ in 0..=data.len() {
        answers.record(false);
    }
    let mut gate = Gate::new(
        Pieces {
            data,
            step: step.max(1),
        },
        GATE_MAX_HEAD,
        answers,
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buf = vec![0u8; read.max(1)];
    // Each read returns at least one byte, or ends: bounded by the input's length, plus one
    // stand-in and the end.
    for _ in 0..data.len() + 1024 {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut gate).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return out,
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(e)) => panic!("the gate failed on an in-memory stream: {e}"),
            // Only a refused connection waits for nothing (the client's stream never pends).
            Poll::Pending => return out,
        }
    }
    panic!("the gate kept producing bytes past its input");
}

/// The stand-in request the gate hands hyper for `refusal`.
fn stand_in(refusal: Refusal) -> String {
    format!(
        "GET / HTTP/1.1\r\nhost: refused.invalid\r\nconnection: close\r\n{}: {}\r\n\r\n",
        crate::data::server::gate::REFUSED,
        refusal.marker()
    )
}

/// The request-head gate on an arbitrary client stream: the first byte picks the size of the
/// pieces the client sends, the second the size of hyper's reads, the rest is the stream.
///
/// Postconditions: what hyper reads does not depend on how the stream was cut; it is the
/// stream itself, or a prefix of it ending where a refused head starts followed by exactly
/// one stand-in; and a refusal is justified by that head (both lengths, two different
/// lengths, or longer than the limit).
pub fn request_head_gate(data: &[u8]) {
    let [step, read, stream @ ..] = data else {
        return;
    };
    let whole = through_gate(stream, stream.len(), 64 * 1024);
    let cut = through_gate(stream, usize::from(*step), usize::from(*read) * 8 + 1);
    assert!(
        whole == cut,
        "what hyper reads depends on how the stream was cut (pieces of {step}, reads of {})",
        usize::from(*read) * 8 + 1
    );
    for r in [
        Refusal::BothLengths,
        Refusal::ConflictingLengths,
        Refusal::HeadTooLarge,
    ] {
        assert_eq!(Refusal::from_marker(r.marker().as_bytes()), r);
    }
    if whole == stream {
        return;
    }
    let refusal = [
        Refusal::BothLengths,
        Refusal::ConflictingLengths,
        Refusal::HeadTooLarge,
    ]
    .into_iter()
    .find(|r| whole.ends_with(stand_in(*r).as_bytes()));
    let Some(refusal) = refusal else {
        panic!(
            "hyper reads bytes the client never sent: {:?}",
            String::from_utf8_lossy(&whole)
        );
    };
    let passed = &whole[..whole.len() - stand_in(refusal).len()];
    assert!(
        stream.starts_with(passed),
        "hyper reads a changed stream before the refusal"
    );
    let refused = &stream[passed.len()..];
    if let Err(why) = refusal_justified(refusal, refused) {
        panic!(
            "{} refusal of {:?}: {why}",
            refusal.marker(),
            String::from_utf8_lossy(&refused[..refused.len().min(600)])
        );
    }
}

/// Whether the head at the start of `bytes` deserves `refusal`, judged by httparse alone.
fn refusal_justified(refusal: Refusal, bytes: &[u8]) -> Result<(), String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let parsed = req.parse(bytes);
    let values = |name: &str| -> Vec<Vec<u8>> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii().to_vec())
            .collect()
    };
    match (refusal, parsed) {
        (Refusal::HeadTooLarge, Err(httparse::Error::TooManyHeaders)) => Ok(()),
        (Refusal::HeadTooLarge, Ok(httparse::Status::Complete(n))) if n > GATE_MAX_HEAD => Ok(()),
        // No head ended within the limit (what follows may not even parse).
        (Refusal::HeadTooLarge, _) if head_len(bytes).is_none_or(|n| n > GATE_MAX_HEAD) => Ok(()),
        (Refusal::HeadTooLarge, p) => Err(format!("a head within the limit ({p:?})")),
        (Refusal::BothLengths, Ok(httparse::Status::Complete(_))) => {
            if !values("content-length").is_empty() && !values("transfer-encoding").is_empty() {
                Ok(())
            } else {
                Err("it does not carry both lengths".into())
            }
        }
        (Refusal::ConflictingLengths, Ok(httparse::Status::Complete(_))) => {
            let mut lengths = values("content-length");
            lengths.dedup();
            lengths.sort();
            lengths.dedup();
            if lengths.len() > 1 {
                Ok(())
            } else {
                Err("its lengths agree".into())
            }
        }
        (_, p) => Err(format!("not a complete head ({p:?})")),
    }
}

/// The length of the head at the start of `bytes`, through the blank line that ends it
/// (empty lines before the request line are part of no head's end).
fn head_len(bytes: &[u8]) -> Option<usize> {
    let lead = bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    (lead..bytes.len()).find_map(|i| {
        if bytes[i] != b'\n' {
            return None;
        }
        match (bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b'\n'), _) => Some(i + 2),
            (Some(b'\r'), Some(b'\n')) => Some(i + 3),
            _ => None,
        }
    })
}
