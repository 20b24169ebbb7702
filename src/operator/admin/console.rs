//! The live operator console at admin `/` (docs/operations.md, "The console"): a static page
//! compiled into the binary (`console/index.html`, `console.js`, `console.css`) that reads
//! `/status`, `/explain`, the shard map (`/console/map`) and a short history of the gateway's
//! own counters (`/console/history`, kept by [`history`]'s sampler), and acts through the
//! admin write endpoints with the admin token, as the CLI does.

pub mod history;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::{error, json_response, Admin};
use crate::control::topology::{parse_range, Shard, Topology};
use crate::data::upstream::body::ResponseBody;

pub use history::History;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Self only: the page loads its own script and style, talks to its own origin, and cannot be
/// framed (an operator's click must not be someone else's).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page, its script and its style: they hold no cluster data, so they are served without
/// the token. That is what lets a browser open the page at all (it cannot send a bearer token
/// on a navigation); the page then asks for the token and sends it on every read and action,
/// and those follow the admin rules.
pub fn is_shell(path: &str) -> bool {
    matches!(path, "/" | "/console/console.js" | "/console/console.css")
}

fn asset(content_type: &'static str, body: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary brings a new page: never keep an old one.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The console's paths (after the admin's token check); `None` for any other path.
pub(super) fn serve(admin: &Admin, path: &str) -> Option<Response<ResponseBody>> {
    Some(match path {
        "/" => asset("text/html; charset=utf-8", INDEX),
        "/console/console.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "/console/console.css" => asset("text/css; charset=utf-8", STYLE),
        "/console/history" => json_response(StatusCode::OK, &admin.console.json()),
        "/console/map" => match admin.snapshots.current() {
            Some(t) => json_response(StatusCode::OK, &map_json(&t)),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "no topology snapshot yet",
            ),
        },
        _ => return None,
    })
}

/// Inclusive runs `[a, b]` of the shards in `0..n` for which `member` holds.
fn runs(n: u32, member: impl Fn(u32) -> bool) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for s in (0..n).filter(|&s| member(s)) {
        match out.last_mut() {
            Some(run) if run[1] + 1 == s => run[1] = s,
            _ => out.push([s, s]),
        }
    }
    out
}

/// `GET /console/map`: every shard's serving and home IDC (indexes into `idcs`; -1 when no
/// IDC can serve it), the fenced shards, and the open moves with their shard runs: what the
/// map draws, fetched again whenever `/status` shows a new revision.
pub fn map_json(t: &Topology) -> Value {
    let n = t.shard_count;
    let serving: Vec<i32> = (0..n)
        .map(|s| t.serving(Shard(s)).map_or(-1, |i| i32::from(i.0)))
        .collect();
    let home: Vec<u16> = (0..n).map(|s| t.home(Shard(s)).0).collect();
    let moves: Vec<Value> = t
        .overrides
        .moves
        .iter()
        .filter(|(_, r)| r.phase.is_open())
        .map(|(id, r)| {
            let shards: Vec<[u32; 2]> = r
                .ranges
                .iter()
                .filter_map(|text| parse_range(text, n).ok())
                .map(|(a, b)| [a, b])
                .collect();
            json!({
                "id": id,
                "kind": r.kind.as_str(),
                "phase": r.phase.as_str(),
                "from": r.from,
                "to": r.to,
                "shards": shards,
                "fence_revision": r.fence_revision,
                "fenced_at_ms": r.fenced_at_ms,
            })
        })
        .collect();
    json!({
        "revision": t.revision,
        "shard_count": n,
        "idcs": t.idcs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        "serving": serving,
        "home": home,
        "fenced": runs(n, |s| t.is_fenced(Shard(s))),
        "moves": moves,
        "fence_ms": t.failover.fence.as_millis() as u64,
        "warmup_s": t.failover.warmup.as_secs(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly on purpose

    use super::*;
    use crate::control::topology::overrides::{MoveKind, MovePhase, MoveRecord};
    use crate::control::topology::{
        build, BuildContext, IdcOverride, IdcState, Overrides, RawTopology,
    };
    use crate::data::upstream::Upstreams;

    /// 16 shards: 0-7 pinned to sh, 8-15 to bj; sh fails over to bj.
    fn topo(overrides: &Overrides) -> Topology {
        let doc = "cluster = \"t\"\nshard_count = 16\n[sets.core]\n\
            [[idcs]]\nname = \"sh\"\npools.core = [\"127.0.0.1:7000\"]\n\
            [[idcs]]\nname = \"bj\"\npools.core = [\"127.0.0.1:7001\"]\n\
            [[shards.pins]]\nrange = \"0-7\"\nidc = \"sh\"\n\
            [[shards.pins]]\nrange = \"8-15\"\nidc = \"bj\"\n\
            [[routes]]\nname = \"orders\"\npath_prefix = \"/orders\"\nset = \"core\"\nkey = [\"header:x-user-id\"]\n";
        let ctx = BuildContext {
            revision: 7,
            ..BuildContext::default()
        };
        build(
            RawTopology::parse(doc).unwrap(),
            overrides,
            &ctx,
            &Upstreams::new(),
        )
        .unwrap()
    }

    #[test]
    fn the_map_has_every_shards_owners_fence_and_moves() {
        let t = topo(&Overrides::default());
        let v = map_json(&t);
        assert_eq!(v["revision"], 7);
        assert_eq!(v["idcs"], json!(["sh", "bj"]));
        let halves = json!([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(v["serving"], halves);
        assert_eq!(v["home"], halves);
        assert_eq!(v["fenced"], json!([]));
        assert_eq!(v["moves"], json!([]));

        // sh down, and a move of 9-10 to sh still fencing (over an earlier one, applied): sh's
        // shards are served by bj, the moving ones are fenced and listed with their move; the
        // finished record is not listed.
        let mut o = Overrides::default();
        o.idcs.insert(
            "sh".into(),
            IdcOverride {
                state: IdcState::Down,
                reason: "test".into(),
                by: "me".into(),
                at: 1,
                expires_at: None,
                at_ms: 0,
                warmup_s: None,
                warmup_step: None,
            },
        );
        let record = |phase| MoveRecord {
            kind: MoveKind::Move,
            ranges: vec!["9-10".into()],
            from: Some("bj".into()),
            to: Some("sh".into()),
            phase,
            fence_revision: 6,
            fenced_at_ms: 1_000,
            reason: String::new(),
            by: String::new(),
            at: 1,
            finished_at: None,
            note: String::new(),
            step: None,
        };
        o.moves.insert("move/a".into(), record(MovePhase::Fencing));
        o.moves.insert("move/b".into(), record(MovePhase::Applied));
        let t = topo(&o);
        let v = map_json(&t);
        assert_eq!(v["serving"], json!(vec![1; 16]));
        // The applied record made sh the owner of 9-10.
        let homes = json!([0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(v["home"], homes);
        assert_eq!(v["fenced"], json!([[9, 10]]));
        assert_eq!(v["moves"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(v["moves"][0]["id"], "move/a");
        assert_eq!(v["moves"][0]["shards"], json!([[9, 10]]));
        assert_eq!(v["moves"][0]["phase"], "fencing");
    }

    #[test]
    fn runs_collapse_neighbours() {
        assert_eq!(runs(10, |s| s != 3 && s < 8), vec![[0, 2], [4, 7]]);
        assert_eq!(runs(4, |_| true), vec![[0, 3]]);
        assert!(runs(4, |_| false).is_empty());
        assert_eq!(runs(5, |s| s % 2 == 1), vec![[1, 1], [3, 3]]);
    }

    #[test]
    fn only_the_page_and_its_assets_are_public() {
        for path in ["/", "/console/console.js", "/console/console.css"] {
            assert!(is_shell(path), "{path}");
        }
        for path in ["/console/map", "/console/history", "/status", "/console/"] {
            assert!(!is_shell(path), "{path}");
        }
    }

    #[test]
    fn the_page_loads_nothing_but_its_own_assets() {
        // Under a self-only CSP an inline script or style would not run: none may be there.
        assert!(!INDEX.contains("<script>"), "inline script in index.html");
        assert!(!INDEX.contains("style="), "inline style in index.html");
        assert!(!INDEX.contains("<style"), "inline style in index.html");
        for asset in [INDEX, SCRIPT, STYLE] {
            assert!(!asset.contains("http://"), "an absolute URL in an asset");
            assert!(!asset.contains("https://"), "an absolute URL in an asset");
        }
        assert!(INDEX.contains(r#"src="console/console.js""#));
        assert!(INDEX.contains(r#"href="console/console.css""#));
    }
}
