//! Replays the fuzz corpus (`fuzz/corpus/*`, grown with `cargo fuzz` and minimized) through
//! the fuzz entry points, whose postconditions panic on a wrong answer, plus deterministic
//! mutations of each case, so `make test` checks the topology validator, the request-head
//! gate and header hygiene on hostile input without nightly tooling. The routing corpus is
//! also sent through a real gateway to simulated backends, and what reached each backend is
//! checked with the same postconditions. Coverage-guided runs use the same entry points:
//! `cd fuzz && cargo fuzz run request_head_gate` (see the Makefile's `fuzz`).

mod support;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use shardgate::control::topology::{build, BuildContext, IdcState, RawTopology};
use shardgate::data::upstream::Upstreams;
use shardgate::dev::fuzz::{Extras, EXTRAS_LINE};
use support::{ClientBody, Cluster};

/// Mutated inputs per target, spread over its cases (at least two each): the grown corpus
/// already holds the fuzzer's best mutations, so a few more per case suffice.
const MUTATIONS_PER_TARGET: usize = 3000;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn cases(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let cases: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            (name, std::fs::read(p).expect("corpus file"))
        })
        .collect();
    assert!(cases.len() >= 3, "the {target} corpus has too few cases");
    cases
}

/// Flips, inserts, deletes and splices bytes: cheap, deterministic, and good at breaking
/// parsers' assumptions about lengths and delimiters.
fn mutate(rng: &mut fastrand::Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.usize(1..8) {
        let at = rng.usize(..=v.len());
        match rng.u8(..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 => {
                let pool = b"\"=[]{}:,\n\r\\%-0";
                v.insert(at, pool[rng.usize(..pool.len())]);
            }
            2 if at < v.len() => {
                let end = (at + rng.usize(1..16)).min(v.len());
                v.drain(at..end);
            }
            3 if !other.is_empty() => {
                let from = rng.usize(..other.len());
                let end = (from + rng.usize(1..64)).min(other.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
            _ => v.insert(at, rng.u8(..)),
        }
    }
    v
}

/// Every case, then mutations of it; a failing postcondition names the case.
fn replay(target: &str, f: fn(&[u8])) {
    let cases = cases(target);
    let per_case = (MUTATIONS_PER_TARGET / cases.len()).max(2);
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for (i, (name, case)) in cases.iter().enumerate() {
        let other = &cases[(i + 1) % cases.len()].1;
        let mut inputs = vec![case.clone()];
        inputs.extend((0..per_case).map(|_| mutate(&mut rng, case, other)));
        for (m, input) in inputs.iter().enumerate() {
            if let Err(panic) = std::panic::catch_unwind(|| f(input)) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                panic!(
                    "{target}/{name} (mutation {m}, input {:?}): {why}",
                    String::from_utf8_lossy(&input[..input.len().min(400)])
                );
            }
        }
    }
}

#[test]
fn topology_document_corpus_and_mutations() {
    replay("topology_document", shardgate::dev::fuzz::topology_document);
}

#[test]
fn request_routing_corpus_and_mutations() {
    replay("request_routing", shardgate::dev::fuzz::request_routing);
}

#[test]
fn request_head_gate_corpus_and_mutations() {
    replay("request_head_gate", shardgate::dev::fuzz::request_head_gate);
}

/// The topology corpus reaches what the target is for: fenced moves, applied moves, warm-up,
/// a local IDC, down IDCs and big shard tables all build somewhere in it.
#[test]
fn topology_corpus_reaches_moves_warmup_local_idc_and_big_tables() {
    let (mut fenced, mut warming, mut local, mut down, mut big) = (0, 0, 0, 0, 0);
    for (_, case) in cases("topology_document") {
        let Ok(text) = std::str::from_utf8(&case) else {
            continue;
        };
        let (doc, extras) = match text.split_once(EXTRAS_LINE) {
            Some((doc, json)) => match serde_json::from_str::<Extras>(json) {
                Ok(e) => (doc, e),
                Err(_) => continue,
            },
            None => (text, Extras::default()),
        };
        let Ok(raw) = RawTopology::parse(doc) else {
            continue;
        };
        let ctx = BuildContext {
            revision: extras.revision,
            local_idc: extras.local_idc.clone(),
            running_shard_count: extras.running_shard_count,
        };
        let Ok(t) = build(raw, &extras.overrides, &ctx, &Upstreams::new()) else {
            continue;
        };
        fenced += usize::from(!t.fenced().is_empty());
        warming += usize::from(t.idcs.iter().any(|i| i.state == IdcState::Warming));
        down += usize::from(t.idcs.iter().any(|i| i.state == IdcState::Down));
        local += usize::from(t.local_idc.is_some());
        big += usize::from(t.shard_count >= 65_536);
    }
    for (what, n) in [
        ("a fenced move", fenced),
        ("a warming IDC", warming),
        ("a down IDC", down),
        ("a local IDC", local),
        ("a shard table of 65536 or more", big),
    ] {
        assert!(n > 0, "no case in the topology corpus builds with {what}");
    }
}

/// The gate corpus holds a case for each refusal and for a stream that passes whole.
#[test]
fn gate_corpus_reaches_every_refusal() {
    let mut seen = std::collections::BTreeSet::new();
    for (_, case) in cases("request_head_gate") {
        let Some(stream) = case.get(2..) else {
            continue;
        };
        let out = shardgate::dev::fuzz::through_gate(stream, stream.len(), 64 * 1024);
        let text = String::from_utf8_lossy(&out);
        let kind = ["both-lengths", "conflicting-lengths", "head-too-large"]
            .into_iter()
            .find(|m| text.ends_with(&format!("x-shardgate-refused: {m}\r\n\r\n")))
            .unwrap_or(if out == stream { "passed" } else { "other" });
        seen.insert(kind);
    }
    for kind in [
        "both-lengths",
        "conflicting-lengths",
        "head-too-large",
        "passed",
    ] {
        assert!(seen.contains(kind), "no gate case ends {kind}: {seen:?}");
    }
}

/// Headers the replay does not send as the case has them: framing (the client library frames
/// the empty body itself) and the simulated backend's test controls (holds, delays).
fn replayable(name: &http::HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "content-length" | "transfer-encoding" | "expect" | "host"
    ) && !name.as_str().starts_with("x-sim-")
}

/// Every routing case as a real request through a real gateway: what reached a simulated
/// backend carries none of the client's `x-shardgate-*` headers, no hop-by-hop header nor one
/// the client's `Connection` named, and the gateway's own routing headers with its values.
#[tokio::test]
async fn routing_corpus_through_a_real_gateway_keeps_header_hygiene() {
    let cluster = Cluster::start().await;
    let epoch = cluster.topology().revision.to_string();
    let mut reached = 0;
    for (name, case) in cases("request_routing") {
        let (method, uri, client) = shardgate::dev::fuzz::request_parts(&case);
        let Some(pq) = uri.path_and_query() else {
            continue;
        };
        let mut req: Request<ClientBody> =
            Request::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
        *req.method_mut() = method;
        // Sent in origin form; a target that only parses in another form is not sent.
        let Ok(origin) = pq.as_str().parse() else {
            continue;
        };
        *req.uri_mut() = origin;
        for (k, v) in client.iter().filter(|(k, _)| replayable(k)) {
            req.headers_mut().append(k.clone(), v.clone());
        }
        let sent = req.headers().clone();
        // A case the client library or the gateway refuses outright reached no backend.
        let Ok(reply) = support::try_send(cluster.proxy(), req).await else {
            continue;
        };
        let Ok(answer) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
            continue;
        };
        let Some(upstream) = answer["headers"].as_object() else {
            continue;
        };
        reached += 1;
        let names: Vec<String> = upstream.keys().cloned().collect();
        let get = |n: &str| upstream.get(n).and_then(|v| v.as_str()).map(str::to_owned);
        if let Some(wrong) = shardgate::dev::fuzz::upstream_violation(&sent, get, &names, true) {
            panic!("request_routing/{name}: {wrong} ({upstream:?})");
        }
        assert_eq!(
            upstream.get("x-shardgate-idc").and_then(|v| v.as_str()),
            answer["idc"].as_str(),
            "request_routing/{name}: x-shardgate-idc is not the IDC that answered"
        );
        assert_eq!(
            upstream.get("x-shardgate-epoch").and_then(|v| v.as_str()),
            Some(epoch.as_str()),
            "request_routing/{name}"
        );
        assert_eq!(
            upstream.get("x-shardgate-shard").and_then(|v| v.as_str()),
            reply.header("x-shardgate-shard"),
            "request_routing/{name}: the shard upstream is not the one answered"
        );
    }
    assert!(
        reached >= 3,
        "only {reached} routing cases reached a backend: the corpus no longer exercises forwarding"
    );
    cluster.stop().await;
}

/// Cases the targets' postconditions once rejected (`fuzz/regressions/`): a pin past the
/// clamped shard table panicked the validator, and a second `Connection` line's names reached
/// the upstream. Both are fixed; they stay as regressions.
#[test]
fn regressions_the_postconditions_once_caught_stay_fixed() {
    let mut failing = Vec::new();
    for (target, f) in [
        (
            "topology_document",
            shardgate::dev::fuzz::topology_document as fn(&[u8]),
        ),
        ("request_routing", shardgate::dev::fuzz::request_routing),
    ] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions")
            .join(target);
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a regression case").path();
            let case = std::fs::read(&path).expect("a regression file");
            if std::panic::catch_unwind(|| f(&case)).is_err() {
                failing.push(path.display().to_string());
            }
        }
    }
    assert!(failing.is_empty(), "still failing: {failing:#?}");
}
