//! The console's sparklines: a short history of the gateway's own counters. Every `PERIOD` the
//! sampler reads the metrics (the very text `/metrics` serves) and keeps, per IDC, the request
//! rate, the error rate (5xx) and the p99 latency, plus refusals by set and reason, in-flight
//! requests by set and shards served by IDC, for the last `KEEP` samples (ten minutes).
//!
//! Reading the exported text rather than the metric families keeps one source of truth: the
//! console shows what Prometheus would scrape, and the metric code needs no second reader.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::telemetry::Metrics;

/// How often a sample is taken. Two seconds: a sparkline that moves while an operator watches,
/// at the cost of encoding the metrics once per period.
pub const PERIOD: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes at `PERIOD`.
pub const KEEP: usize = 300;

/// The counters of one reading, summed over the labels the console does not show.
#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    /// IDC → requests answered.
    requests: BTreeMap<String, f64>,
    /// IDC → requests answered with a 5xx.
    errors: BTreeMap<String, f64>,
    /// IDC → request-duration buckets `(le, cumulative count)`, ascending, `+Inf` last.
    buckets: BTreeMap<String, Vec<(f64, f64)>>,
    /// (set, reason) → requests refused.
    refused: BTreeMap<(String, String), f64>,
    /// Gauges, kept as read: IDC → shards served, set → requests in flight.
    shards_served: BTreeMap<String, f64>,
    inflight: BTreeMap<String, f64>,
}

/// One point of the history: rates over the period before it, gauges as read.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    /// Unix milliseconds (display only).
    at_ms: u64,
    idcs: BTreeMap<String, IdcPoint>,
    /// (set, reason) → refusals per second.
    refused: BTreeMap<(String, String), f64>,
    inflight: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct IdcPoint {
    rps: f64,
    errors_ps: f64,
    /// `None` when the IDC answered nothing in the period.
    p99_ms: Option<f64>,
    shards_served: Option<f64>,
}

/// A sample's labels, in the order written: (name, unescaped value).
type Labels<'a> = Vec<(&'a str, String)>;

/// Splits `name{a="x",b="y"} value` into the name, its labels and the value.
fn parse_line(line: &str) -> Option<(&str, Labels<'_>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, mut rest)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches(',');
        if rest.starts_with('}') || rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once("=\"")?;
        // The value runs to the first quote that is not escaped.
        let mut out = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => out.push('\n'),
                    c => out.push(c),
                },
                (_, c) => out.push(c),
            }
        };
        labels.push((key, out));
        rest = &after[end + 1..];
    }
    Some((name, labels, value))
}

fn label<'a>(labels: &'a [(&str, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// Reads the counters the console needs from the exported metrics text.
fn parse(text: &str) -> Totals {
    let mut t = Totals::default();
    for (name, labels, value) in text.lines().filter_map(parse_line) {
        let idc = || label(&labels, "idc").to_owned();
        match name {
            "shardgate_requests_total" => {
                *t.requests.entry(idc()).or_default() += value;
                if label(&labels, "status").starts_with('5') {
                    *t.errors.entry(idc()).or_default() += value;
                }
            }
            "shardgate_request_duration_seconds_bucket" => {
                let le = match label(&labels, "le") {
                    "+Inf" => f64::INFINITY,
                    le => match le.parse() {
                        Ok(le) => le,
                        Err(_) => continue,
                    },
                };
                let buckets = t.buckets.entry(idc()).or_default();
                match buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, n)) => *n += value,
                    None => buckets.push((le, value)),
                }
            }
            "shardgate_refused_total" => {
                let key = (
                    label(&labels, "set").to_owned(),
                    label(&labels, "reason").to_owned(),
                );
                *t.refused.entry(key).or_default() += value;
            }
            "shardgate_shards_served" => {
                t.shards_served.insert(idc(), value);
            }
            "shardgate_inflight" => {
                t.inflight.insert(label(&labels, "set").to_owned(), value);
            }
            _ => {}
        }
    }
    for buckets in t.buckets.values_mut() {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    t
}

/// The `q` quantile of the observations counted by cumulative `buckets` (ascending `le`,
/// `+Inf` last), interpolated linearly inside its bucket as Prometheus' `histogram_quantile`
/// does; the highest finite bound when it falls in `+Inf`. `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if count <= below {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below));
        }
        (lower, below) = (le, count);
    }
    Some(lower)
}

/// What happened between two readings `secs` apart. A counter that went backwards (a family
/// cleared) counts as nothing new.
fn point(before: &Totals, now: &Totals, secs: f64, at_ms: u64) -> Point {
    let secs = secs.max(1e-3);
    let delta = |a: Option<&f64>, b: f64| (b - a.copied().unwrap_or(0.0)).max(0.0);
    let mut idcs: BTreeMap<String, IdcPoint> = BTreeMap::new();
    let names: BTreeSet<&String> = now
        .requests
        .keys()
        .chain(now.shards_served.keys())
        .collect();
    for idc in names.into_iter().filter(|n| !n.is_empty()) {
        let requests = now.requests.get(idc).copied().unwrap_or(0.0);
        let errors = now.errors.get(idc).copied().unwrap_or(0.0);
        let buckets: Vec<(f64, f64)> = now
            .buckets
            .get(idc)
            .map(|b| {
                let old = before.buckets.get(idc);
                b.iter()
                    .map(|&(le, n)| {
                        let was = old.and_then(|o| o.iter().find(|(l, _)| *l == le));
                        (le, delta(was.map(|(_, n)| n), n))
                    })
                    .collect()
            })
            .unwrap_or_default();
        idcs.insert(
            idc.clone(),
            IdcPoint {
                rps: delta(before.requests.get(idc), requests) / secs,
                errors_ps: delta(before.errors.get(idc), errors) / secs,
                p99_ms: quantile(0.99, &buckets).map(|s| s * 1000.0),
                shards_served: now.shards_served.get(idc).copied(),
            },
        );
    }
    let refused = now
        .refused
        .iter()
        .map(|(k, &n)| (k.clone(), delta(before.refused.get(k), n) / secs))
        .collect();
    Point {
        at_ms,
        idcs,
        refused,
        inflight: now.inflight.clone(),
    }
}

#[derive(Default)]
struct Inner {
    last: Option<(Instant, Totals)>,
    points: VecDeque<Point>,
}

/// The kept samples. Shared by the sampler task and the admin listener; it outlives a
/// restarted sampler, which goes on from the last reading.
#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

impl History {
    pub fn new() -> Arc<History> {
        Arc::new(History::default())
    }

    /// Takes one reading of the metrics text: the first is only a baseline, every later one
    /// adds a point (the oldest goes beyond `KEEP`).
    fn record(&self, text: &str, now: Instant, at_ms: u64) {
        let totals = parse(text);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some((then, before)) = &inner.last {
            let secs = now.saturating_duration_since(*then).as_secs_f64();
            let p = point(before, &totals, secs, at_ms);
            inner.points.push_back(p);
            while inner.points.len() > KEEP {
                inner.points.pop_front();
            }
        }
        inner.last = Some((now, totals));
    }

    /// The sampler: one reading now and one every `PERIOD` until shutdown.
    pub async fn run(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::control::tasks::shutdown_requested(&mut shutdown) => return,
            }
            self.record(
                &metrics.encode(),
                Instant::now(),
                crate::control::moves::unix_now_ms(),
            );
        }
    }

    /// `GET /console/history`: one array per series, aligned with `t` (unix ms); `null` where
    /// a series has no value at that point.
    pub fn json(&self) -> Value {
        let Ok(inner) = self.inner.lock() else {
            return json!({"period_ms": PERIOD.as_millis() as u64, "t": []});
        };
        let points = &inner.points;
        let series = |f: &dyn Fn(&Point) -> Option<f64>| -> Vec<Value> {
            points.iter().map(|p| json!(f(p))).collect()
        };
        let idc_names: BTreeSet<&String> = points.iter().flat_map(|p| p.idcs.keys()).collect();
        let idcs: BTreeMap<&String, Value> = idc_names
            .into_iter()
            .map(|name| {
                let at = |p: &Point| p.idcs.get(name).copied();
                let v = json!({
                    "rps": series(&|p| at(p).map(|i| i.rps)),
                    "errors_ps": series(&|p| at(p).map(|i| i.errors_ps)),
                    "p99_ms": series(&|p| at(p).and_then(|i| i.p99_ms)),
                    "shards_served": series(&|p| at(p).and_then(|i| i.shards_served)),
                });
                (name, v)
            })
            .collect();
        let sets: BTreeSet<&String> = points.iter().flat_map(|p| p.inflight.keys()).collect();
        let inflight: BTreeMap<&String, Vec<Value>> = sets
            .into_iter()
            .map(|s| (s, series(&|p| p.inflight.get(s).copied())))
            .collect();
        // Refusals: the total so far (from the last reading) and the rate at each point.
        let mut refused: BTreeMap<&str, BTreeMap<&str, Value>> = BTreeMap::new();
        if let Some((_, last)) = &inner.last {
            for ((set, reason), total) in &last.refused {
                let key = (set.clone(), reason.clone());
                let rate = series(&|p| p.refused.get(&key).copied());
                refused
                    .entry(set)
                    .or_default()
                    .insert(reason, json!({"total": total, "rate": rate}));
            }
        }
        json!({
            "period_ms": PERIOD.as_millis() as u64,
            "t": points.iter().map(|p| p.at_ms).collect::<Vec<_>>(),
            "idcs": idcs,
            "inflight": inflight,
            "refused": refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metrics text as `Metrics::encode` writes it: requests by IDC and status, a latency
    /// histogram, refusals and gauges.
    fn text(sh_ok: u64, sh_5xx: u64, bj_ok: u64, slow: u64, fenced: u64) -> String {
        let fast = sh_ok + sh_5xx - slow;
        format!(
            "# HELP shardgate_requests Requests answered\n\
             # TYPE shardgate_requests counter\n\
             shardgate_requests_total{{route=\"orders\",set=\"core\",idc=\"sh\",status=\"200\"}} {sh_ok}\n\
             shardgate_requests_total{{route=\"orders\",set=\"core\",idc=\"sh\",status=\"503\"}} {sh_5xx}\n\
             shardgate_requests_total{{route=\"orders\",set=\"core\",idc=\"bj\",status=\"200\"}} {bj_ok}\n\
             shardgate_requests_total{{route=\"nowhere\",set=\"\",idc=\"\",status=\"404\"}} 7\n\
             shardgate_request_duration_seconds_bucket{{route=\"orders\",set=\"core\",idc=\"sh\",le=\"0.001\"}} {fast}\n\
             shardgate_request_duration_seconds_bucket{{route=\"orders\",set=\"core\",idc=\"sh\",le=\"0.002\"}} {fast}\n\
             shardgate_request_duration_seconds_bucket{{route=\"orders\",set=\"core\",idc=\"sh\",le=\"0.004\"}} {total}\n\
             shardgate_request_duration_seconds_bucket{{route=\"orders\",set=\"core\",idc=\"sh\",le=\"+Inf\"}} {total}\n\
             shardgate_request_duration_seconds_count{{route=\"orders\",set=\"core\",idc=\"sh\"}} {total}\n\
             shardgate_refused_total{{set=\"core\",reason=\"fenced\"}} {fenced}\n\
             shardgate_shards_served{{idc=\"sh\"}} 300\n\
             shardgate_shards_served{{idc=\"bj\"}} 724\n\
             shardgate_inflight{{set=\"core\"}} 3\n\
             # EOF\n",
            total = sh_ok + sh_5xx,
        )
    }

    #[test]
    fn labels_with_escapes_are_read() {
        let (name, labels, value) =
            parse_line(r#"shardgate_requests_total{route="a\"b\\c",idc="sh"} 12"#)
                .expect("a sample");
        assert_eq!(name, "shardgate_requests_total");
        assert_eq!(label(&labels, "route"), r#"a"b\c"#);
        assert_eq!(label(&labels, "idc"), "sh");
        assert_eq!(value, 12.0);
        assert_eq!(parse_line("# EOF"), None);
        assert_eq!(
            parse_line("shardgate_topology_revision 4"),
            Some(("shardgate_topology_revision", Vec::new(), 4.0))
        );
    }

    #[test]
    fn quantile_interpolates_like_prometheus() {
        // 100 observations: 90 under 1 ms, 10 between 1 and 2 ms.
        let b = [(0.001, 90.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        let q = quantile(0.99, &b).expect("observations");
        assert!((q - 0.0019).abs() < 1e-9, "{q}");
        assert_eq!(quantile(0.5, &b).map(|q| (q * 1e6).round()), Some(556.0));
        // Beyond the last finite bound: that bound.
        let b = [(0.001, 1.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.99, &b), Some(0.001));
        assert_eq!(quantile(0.99, &[(0.001, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.99, &[]), None);
    }

    #[test]
    fn the_history_holds_rates_errors_p99_and_refusals_per_period() {
        let h = History::default();
        let t0 = Instant::now();
        h.record(&text(100, 0, 50, 0, 0), t0, 1_000);
        assert_eq!(h.json()["t"], json!([]), "the first reading is a baseline");
        // Two seconds later: sh answered 200 more (10 of them 503, 4 slow), bj 20 more, 6
        // writes were fenced.
        h.record(&text(290, 10, 70, 4, 6), t0 + Duration::from_secs(2), 3_000);
        let v = h.json();
        assert_eq!(v["t"], json!([3_000]));
        assert_eq!(v["idcs"]["sh"]["rps"], json!([100.0]));
        assert_eq!(v["idcs"]["sh"]["errors_ps"], json!([5.0]));
        assert_eq!(v["idcs"]["bj"]["rps"], json!([10.0]));
        assert_eq!(
            v["idcs"]["bj"]["p99_ms"],
            json!([null]),
            "no latencies for bj"
        );
        assert_eq!(v["idcs"]["sh"]["shards_served"], json!([300.0]));
        // 200 new observations, 4 of them in (2 ms, 4 ms]: the 99th percentile is 2 ms
        // plus half of that bucket.
        let p99 = v["idcs"]["sh"]["p99_ms"][0].as_f64().expect("a p99");
        assert!((p99 - 3.0).abs() < 1e-9, "{p99}");
        assert_eq!(v["refused"]["core"]["fenced"]["total"], json!(6.0));
        assert_eq!(v["refused"]["core"]["fenced"]["rate"], json!([3.0]));
        assert_eq!(v["inflight"]["core"], json!([3.0]));
        assert!(
            v["idcs"].get("").is_none(),
            "requests with no IDC are left out"
        );
    }

    #[test]
    fn the_history_keeps_ten_minutes() {
        let h = History::default();
        let t0 = Instant::now();
        for i in 0..(KEEP as u64 + 20) {
            h.record(&text(i, 0, 0, 0, 0), t0 + PERIOD * i as u32, i);
        }
        let v = h.json();
        let t = v["t"].as_array().expect("times");
        assert_eq!(t.len(), KEEP);
        assert_eq!(t.last(), Some(&json!(KEEP as u64 + 19)));
        assert_eq!(KEEP as u128 * PERIOD.as_millis(), 600_000);
    }
}
