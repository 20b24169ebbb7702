//! Upper bounds on the document's numbers and a clean health path, checked with the rest of
//! validation: a value past them would overflow a deadline, a table or a probe's request line
//! long after the document was accepted (in every gateway at once).

use super::raw::RawTopology;
use super::Problem;

/// The longest duration the document may set (every `*_ms` field, and `warmup_s`): one day.
/// Longer is never what an operator means, and `now + u64::MAX ms` overflows a deadline.
pub const MAX_DURATION_MS: u64 = 86_400_000;

/// The most `[[shards.pins]]` entries: pins are ranges, so more than this is a generated
/// document gone wrong, and validating it would cost time in every gateway.
pub const MAX_PINS: usize = 65_536;

/// Pushes a problem for every bounded field past its bound; zeros are the `positive` checks'
/// business (build.rs), so a field is never reported twice.
pub(super) fn check(doc: &RawTopology, problems: &mut Vec<Problem>) {
    for (i, route) in doc.routes.iter().enumerate() {
        duration(
            problems,
            format!("routes[{i}].timeout_ms"),
            route.timeout_ms,
        );
    }
    for (i, idc) in doc.idcs.iter().enumerate() {
        let h = &idc.health;
        duration(
            problems,
            format!("idcs[{i}].health.interval_ms"),
            h.interval_ms,
        );
        duration(
            problems,
            format!("idcs[{i}].health.timeout_ms"),
            h.timeout_ms,
        );
        // The path goes into the probe's request line as it is: a CR or LF would let the
        // document write headers (or a second request) to every backend.
        if let Some(b) = h.path.bytes().find(|b| !b.is_ascii_graphic() || *b == b'#') {
            problems.push(Problem::new(
                format!("idcs[{i}].health.path"),
                format!(
                    "byte 0x{b:02x} is not allowed: printable ASCII only, without spaces or `#`"
                ),
            ));
        }
    }
    let f = &doc.failover;
    duration(problems, "failover.detect_ms", f.detect_ms);
    duration(problems, "failover.recover_ms", f.recover_ms);
    duration(problems, "failover.fence_ms", f.fence_ms);
    if f.warmup_s > MAX_DURATION_MS / 1000 {
        problems.push(Problem::new(
            "failover.warmup_s",
            format!("at most {} (one day)", MAX_DURATION_MS / 1000),
        ));
    }
    let b = &doc.isolation.breaker;
    duration(problems, "isolation.breaker.window_ms", b.window_ms);
    duration(problems, "isolation.breaker.open_ms", b.open_ms);
    if doc.shards.pins.len() > MAX_PINS {
        problems.push(Problem::new(
            "shards.pins",
            format!(
                "at most {MAX_PINS} pins, this document has {} (a pin is a range: `0-255`)",
                doc.shards.pins.len()
            ),
        ));
    }
}

fn duration(problems: &mut Vec<Problem>, at: impl Into<String>, ms: u64) {
    if ms > MAX_DURATION_MS {
        problems.push(Problem::new(
            at,
            format!("at most {MAX_DURATION_MS} (one day)"),
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;
    use crate::control::topology::{build, BuildContext, Overrides, Problems, Topology};
    use crate::data::upstream::Upstreams;

    const BASE: &str = r#"
cluster = "t"
shard_count = 1024
[sets.core]
[[idcs]]
name = "sh"
pools.core = ["127.0.0.1:7001"]
[[routes]]
name = "orders"
path_prefix = "/orders"
set = "core"
key = ["header:x-user-id"]
"#;

    fn build_text(text: &str) -> Result<Topology, Problems> {
        build(
            RawTopology::parse(text)?,
            &Overrides::default(),
            &BuildContext::default(),
            &Upstreams::new(),
        )
    }

    /// The problems of `BASE` with `edit` applied, as `field: reason` lines.
    fn problems(edit: impl Fn(&str) -> String) -> String {
        match build_text(&edit(BASE)) {
            Ok(_) => String::new(),
            Err(p) => p.to_string(),
        }
    }

    #[test]
    fn the_base_document_is_valid() {
        assert_eq!(problems(|d| d.to_owned()), "");
    }

    #[test]
    fn a_pin_past_the_largest_shard_count_is_a_problem_not_a_panic() {
        let text = problems(|d| {
            d.replace("shard_count = 1024", "shard_count = 2000000")
                + "[[shards.pins]]\nrange = \"1048576\"\nidc = \"sh\"\n"
        });
        assert!(
            text.contains("shard_count: must be between 1 and"),
            "{text}"
        );
        assert!(
            text.contains("shards.pins[0].range: `1048576` is outside"),
            "{text}"
        );
        // A range ending past the table, starting inside it.
        let text = problems(|d| {
            d.replace("shard_count = 1024", "shard_count = 4000000000")
                + "[[shards.pins]]\nrange = \"0-3999999999\"\nidc = \"sh\"\n"
        });
        assert!(text.contains("shards.pins[0].range"), "{text}");
        // The largest valid table still takes a pin on its last shard.
        let text = problems(|d| {
            d.replace("shard_count = 1024", "shard_count = 1048576")
                + "[[shards.pins]]\nrange = \"1048575\"\nidc = \"sh\"\n"
        });
        assert_eq!(text, "");
    }

    #[test]
    fn every_duration_is_bounded() {
        let over = MAX_DURATION_MS + 1;
        let text = problems(|d| {
            format!(
                "{}timeout_ms = {over}\n",
                d.replace(
                    "pools.core",
                    &format!(
                        "health = {{ interval_ms = {over}, timeout_ms = {over} }}\npools.core"
                    )
                )
            ) + &format!(
                "[failover]\ndetect_ms = {over}\nrecover_ms = {over}\nfence_ms = {over}\n\
                 warmup_s = {}\n[isolation.breaker]\nwindow_ms = {over}\nopen_ms = {over}\n",
                MAX_DURATION_MS / 1000 + 1
            )
        });
        for field in [
            "routes[0].timeout_ms",
            "idcs[0].health.interval_ms",
            "idcs[0].health.timeout_ms",
            "failover.detect_ms",
            "failover.recover_ms",
            "failover.fence_ms",
            "failover.warmup_s",
            "isolation.breaker.window_ms",
            "isolation.breaker.open_ms",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.contains(field) && l.contains("at most")),
                "`{field}` is not bounded:\n{text}"
            );
        }
        // At the bound, accepted (with a fence that covers the route, as validation wants).
        let text = problems(|d| {
            format!("{d}timeout_ms = {MAX_DURATION_MS}\n[failover]\nfence_ms = {MAX_DURATION_MS}\n")
        });
        assert_eq!(text, "");
    }

    #[test]
    fn the_largest_route_timeout_does_not_overflow_a_deadline() {
        let t = build_text(&format!(
            "{BASE}timeout_ms = {MAX_DURATION_MS}\n[failover]\nfence_ms = {MAX_DURATION_MS}\n"
        ))
        .unwrap();
        let timeout = t.routes[0].timeout;
        assert!(tokio::time::Instant::now().checked_add(timeout).is_some());
        assert!(std::time::Instant::now().checked_add(timeout).is_some());
    }

    #[test]
    fn the_number_of_pins_is_bounded() {
        let mut pins = String::new();
        for s in 0..=MAX_PINS {
            pins.push_str(&format!("[[shards.pins]]\nrange = \"{s}\"\nidc = \"sh\"\n"));
        }
        let text = problems(|d| d.replace("shard_count = 1024", "shard_count = 131072") + &pins);
        assert!(
            text.contains(&format!("shards.pins: at most {MAX_PINS}")),
            "{}",
            &text[..text.len().min(2000)]
        );
    }

    #[test]
    fn a_health_path_with_control_bytes_or_spaces_is_refused() {
        for bad in [
            "/healthz\\r\\nHost: evil",
            "/healthz\\nx: y",
            "/health z",
            "/healthz\\u0000",
            "/healthz\\u007f",
            "/héalth",
        ] {
            let text = problems(|d| {
                d.replace(
                    "pools.core",
                    &format!("health = {{ path = \"{bad}\" }}\npools.core"),
                )
            });
            assert!(
                text.contains("idcs[0].health.path"),
                "`{bad}` accepted: {text}"
            );
        }
        let text = problems(|d| {
            d.replace(
                "pools.core",
                "health = { path = \"/status/ready?full=1\" }\npools.core",
            )
        });
        assert_eq!(text, "");
    }
}
