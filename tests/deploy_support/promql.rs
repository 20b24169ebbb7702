//! The metric side of deploy/: the Prometheus text a gateway exports, parsed into families
//! (type, label names, label values seen), and every PromQL expression of the alert rules and
//! the Grafana dashboard parsed (promql-parser) and walked: each metric name must be a family
//! the gateway exports, each label it matches, groups by or joins on must exist there, and a
//! literal label value must be one a running gateway was seen to export.

use std::collections::{BTreeMap, BTreeSet};

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, LabelModifier, VectorMatchCardinality};
use serde_json::Value;

/// Labels the scrape adds to every series (Prometheus's own, and a Kubernetes ServiceMonitor's).
pub const TARGET_LABELS: [&str; 7] = [
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "endpoint",
    "container",
];

/// Series Prometheus makes itself for every scrape target.
pub const PROMETHEUS_SERIES: [&str; 1] = ["up"];

/// Metric families in the Prometheus text format.
#[derive(Debug, Default, Clone)]
pub struct Families {
    /// Family name → type (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
    /// Family name → label names of its samples (`le` excluded).
    pub labels: BTreeMap<String, BTreeSet<String>>,
    /// (family, label) → values seen.
    pub values: BTreeMap<(String, String), BTreeSet<String>>,
    /// Families with at least one sample.
    pub sampled: BTreeSet<String>,
}

impl Families {
    pub fn parse(text: &str) -> Families {
        let mut f = Families::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some((name, ty)) = rest.split_once(' ') {
                    f.types.insert(name.to_owned(), ty.trim().to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name, labels) = match line.split_once('{') {
                Some((name, rest)) => (name, rest.rsplit_once('}').map(|(l, _)| l).unwrap_or("")),
                None => (line.split(' ').next().unwrap_or(""), ""),
            };
            let Some((family, _)) = f.resolve(name) else {
                continue;
            };
            f.sampled.insert(family.clone());
            let names = f.labels.entry(family.clone()).or_default();
            for (k, v) in split_labels(labels) {
                if k == "le" {
                    continue;
                }
                names.insert(k.clone());
                f.values.entry((family.clone(), k)).or_default().insert(v);
            }
        }
        f
    }

    /// The family a series name belongs to (`x_total` of counter `x`, `x_bucket` of histogram
    /// `x`, …), and whether the series is a histogram's buckets.
    pub fn resolve(&self, series: &str) -> Option<(String, bool)> {
        if matches!(
            self.types.get(series).map(String::as_str),
            Some("gauge" | "unknown")
        ) {
            return Some((series.to_owned(), false));
        }
        for (suffix, ty) in [
            ("_total", "counter"),
            ("_created", "counter"),
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
        ] {
            if let Some(stem) = series.strip_suffix(suffix) {
                if self.types.get(stem).map(String::as_str) == Some(ty) {
                    return Some((stem.to_owned(), suffix == "_bucket"));
                }
            }
        }
        None
    }
}

/// `a="x",b="y"` → pairs (the gateway's values hold no `",`).
fn split_labels(text: &str) -> Vec<(String, String)> {
    text.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.trim().to_owned(), v.trim_end_matches('"').to_owned()))
        })
        .collect()
}

/// What expressions are checked against.
pub struct Exports {
    /// Every family the gateway registers, each touched once so that its labels show.
    pub registered: Families,
    /// What a running gateway exported after the test drove traffic and events through it.
    pub live: Families,
    /// Families only an event the test cannot cause honestly brings to life, and why; they
    /// are checked against `registered` alone.
    pub event_only: BTreeMap<&'static str, &'static str>,
    /// Values the scrape's `job` label can have (the Services a ServiceMonitor scrapes).
    pub jobs: BTreeSet<String>,
}

/// What one expression uses and yields.
#[derive(Default, Debug)]
pub struct Analysis {
    pub problems: Vec<String>,
    /// Series names it selects.
    pub metrics: BTreeSet<String>,
    /// Labels its result series carry (for `{{ $labels.x }}` and legends).
    pub output: BTreeSet<String>,
}

/// Parses and checks one PromQL expression.
pub fn analyse(expr: &str, ex: &Exports) -> Analysis {
    let mut a = Analysis::default();
    match parser::parse(expr) {
        Ok(e) => a.output = walk(&e, ex, &mut a),
        Err(e) => a.problems.push(format!("does not parse: {e}")),
    }
    a
}

fn labels_of(m: &LabelModifier) -> Vec<String> {
    m.labels().labels.clone()
}

/// Walks an expression, checking as it goes; returns the labels of its result.
fn walk(e: &Expr, ex: &Exports, a: &mut Analysis) -> BTreeSet<String> {
    match e {
        Expr::VectorSelector(vs) => selector(vs.name.as_deref(), &vs.matchers.matchers, ex, a),
        Expr::MatrixSelector(ms) => {
            selector(ms.vs.name.as_deref(), &ms.vs.matchers.matchers, ex, a)
        }
        Expr::Paren(p) => walk(&p.expr, ex, a),
        Expr::Unary(u) => walk(&u.expr, ex, a),
        Expr::Subquery(s) => walk(&s.expr, ex, a),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
        Expr::Call(c) => {
            let mut out = BTreeSet::new();
            for arg in &c.args.args {
                let labels = walk(arg, ex, a);
                if out.is_empty() {
                    out = labels;
                }
            }
            if c.func.name == "histogram_quantile" {
                if !out.contains("le") {
                    a.problems
                        .push("histogram_quantile over series without an `le` label".into());
                }
                out.remove("le");
            }
            out
        }
        Expr::Aggregate(ag) => {
            if let Some(p) = &ag.param {
                walk(p, ex, a);
            }
            let inner = walk(&ag.expr, ex, a);
            match &ag.modifier {
                None => BTreeSet::new(),
                Some(m) => {
                    for l in labels_of(m) {
                        if !inner.contains(&l) {
                            a.problems.push(format!(
                                "aggregates by/without `{l}`, a label its input does not have ({inner:?})"
                            ));
                        }
                    }
                    match m {
                        LabelModifier::Include(l) => l.labels.iter().cloned().collect(),
                        LabelModifier::Exclude(l) => inner
                            .into_iter()
                            .filter(|x| !l.labels.contains(x))
                            .collect(),
                    }
                }
            }
        }
        Expr::Binary(b) => {
            let lhs = walk(&b.lhs, ex, a);
            let rhs = walk(&b.rhs, ex, a);
            let Some(m) = &b.modifier else {
                return if lhs.is_empty() { rhs } else { lhs };
            };
            if let Some(matching) = &m.matching {
                for l in labels_of(matching) {
                    if !lhs.contains(&l) || !rhs.contains(&l) {
                        a.problems.push(format!(
                            "joins on/ignoring `{l}`, a label one side does not have"
                        ));
                    }
                }
            }
            match &m.card {
                VectorMatchCardinality::OneToMany(extra) => rhs
                    .into_iter()
                    .chain(extra.labels.iter().cloned())
                    .collect(),
                VectorMatchCardinality::ManyToOne(extra) => lhs
                    .into_iter()
                    .chain(extra.labels.iter().cloned())
                    .collect(),
                _ if lhs.is_empty() => rhs,
                _ => lhs,
            }
        }
    }
}

/// Checks a selector: a known series, label names of its family, literal values seen live.
fn selector(
    name: Option<&str>,
    matchers: &[Matcher],
    ex: &Exports,
    a: &mut Analysis,
) -> BTreeSet<String> {
    let target: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    let Some(name) = name else {
        a.problems.push("a selector without a metric name".into());
        return target;
    };
    a.metrics.insert(name.to_owned());
    let mut known = target.clone();
    let family = if PROMETHEUS_SERIES.contains(&name) {
        None
    } else {
        match ex.registered.resolve(name) {
            None => {
                a.problems
                    .push(format!("`{name}` is not a metric the gateway registers"));
                return target;
            }
            Some((family, bucket)) => {
                if !ex.live.sampled.contains(&family) {
                    match ex.event_only.get(family.as_str()) {
                        Some(_) => {}
                        None => a.problems.push(format!(
                            "`{name}`: family {family} never appeared on the running gateway"
                        )),
                    }
                }
                known.extend(
                    ex.registered
                        .labels
                        .get(&family)
                        .cloned()
                        .unwrap_or_default(),
                );
                if bucket {
                    known.insert("le".into());
                }
                Some(family)
            }
        }
    };
    for m in matchers {
        if m.name == "__name__" {
            continue;
        }
        if !known.contains(&m.name) {
            a.problems
                .push(format!("`{name}` has no label `{}`", m.name));
            continue;
        }
        if m.name == "job" && matches!(m.op, MatchOp::Equal) && !ex.jobs.contains(&m.value) {
            a.problems.push(format!(
                "`{name}{{job=\"{}\"}}`: no scraped Service has that name ({:?})",
                m.value, ex.jobs
            ));
        }
        let Some(family) = &family else { continue };
        if target.contains(&m.name) {
            // Deployment-specific values (namespace, pod, …) cannot be checked here.
            continue;
        }
        let seen = ex
            .live
            .values
            .get(&(family.clone(), m.name.clone()))
            .cloned()
            .unwrap_or_default();
        let ok = match &m.op {
            MatchOp::Equal => seen.contains(&m.value),
            MatchOp::Re(re) => seen.iter().any(|v| re.is_match(v)),
            // A negative matcher excludes; any value is fine, none has to exist.
            MatchOp::NotEqual | MatchOp::NotRe(_) => true,
        };
        if !ok {
            a.problems.push(format!(
                "`{name}{{{}{}\"{}\"}}`: no such value seen on the running gateway (seen: {seen:?})",
                m.name, m.op, m.value
            ));
        }
    }
    known
}

/// `{{ $labels.x }}` (alert annotations) or `{{x}}` (Grafana legends) in a template.
pub fn template_labels(text: &str) -> Vec<String> {
    text.split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(inner, _)| inner.trim())
        .filter_map(|inner| match inner.strip_prefix("$labels.") {
            Some(l) => Some(l.to_owned()),
            None if inner.starts_with('$') => None,
            None => Some(inner.to_owned()),
        })
        .collect()
}

/// Prometheus durations: `30s`, `1m`, `1h30m`.
pub fn is_duration(s: &str) -> bool {
    let mut digits = false;
    let mut any = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits = true;
        } else if digits && "smhdwy".contains(c) {
            if c == 'm' && chars.peek() == Some(&'s') {
                chars.next();
            }
            digits = false;
            any = true;
        } else {
            return false;
        }
    }
    any && !digits
}

/// Every problem of a Prometheus rules file; also the series names its alerts use.
pub fn alert_problems(rules: &Value, ex: &Exports) -> (Vec<String>, BTreeSet<String>) {
    let mut p = Vec::new();
    let mut used = BTreeSet::new();
    let mut names = BTreeSet::new();
    let Some(groups) = rules["groups"].as_array().filter(|g| !g.is_empty()) else {
        return (vec!["no `groups`".into()], used);
    };
    for g in groups {
        let gname = g["name"].as_str().unwrap_or("");
        let Some(list) = g["rules"].as_array().filter(|r| !r.is_empty()) else {
            p.push(format!("group `{gname}`: no rules"));
            continue;
        };
        for r in list {
            let alert = r["alert"].as_str().unwrap_or("");
            let id = format!("alert `{alert}` (group {gname})");
            if alert.is_empty() || !alert.starts_with(|c: char| c.is_ascii_uppercase()) {
                p.push(format!(
                    "{id}: every rule is an alert with a CamelCase name"
                ));
            }
            if !names.insert(alert.to_owned()) {
                p.push(format!("{id}: defined twice"));
            }
            let Some(expr) = r["expr"].as_str() else {
                p.push(format!("{id}: no expr"));
                continue;
            };
            let a = analyse(expr, ex);
            p.extend(a.problems.iter().map(|x| format!("{id}: {x}")));
            used.extend(a.metrics.iter().cloned());
            if !r["for"].as_str().is_some_and(is_duration) {
                p.push(format!("{id}: no `for:` duration"));
            }
            match r["labels"]["severity"].as_str() {
                Some("critical" | "warning" | "info") => {}
                other => p.push(format!(
                    "{id}: labels.severity {other:?} is not critical, warning or info"
                )),
            }
            let ann = &r["annotations"];
            for field in ["summary", "description", "runbook_url"] {
                if ann[field].as_str().is_none_or(str::is_empty) {
                    p.push(format!("{id}: no annotations.{field}"));
                }
            }
            if let Some(link) = ann["runbook_url"].as_str() {
                if let Some(x) = super::doc_link_problem(link) {
                    p.push(format!("{id}: runbook {x}"));
                }
            }
            for field in ["summary", "description"] {
                for l in template_labels(ann[field].as_str().unwrap_or("")) {
                    if !a.output.contains(&l) {
                        p.push(format!(
                            "{id}: annotations.{field} uses $labels.{l}, which the expression's result does not have ({:?})",
                            a.output
                        ));
                    }
                }
            }
        }
    }
    (p, used)
}

/// Grafana's variables in an expression replaced by values PromQL parses: its interval
/// variables by a duration, the dashboard's own variables by `.*` (they sit in regex matchers).
/// An unknown variable is a problem.
fn substitute(expr: &str, vars: &BTreeSet<String>, p: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let len = body
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(body.len());
        let name = &body[..len];
        rest = &body[len + usize::from(braced)..];
        match name {
            "__rate_interval" | "__interval" | "__range" => out.push_str("5m"),
            v if vars.contains(v) => out.push_str(".*"),
            v => {
                p.push(format!("unknown dashboard variable `${v}`"));
                out.push_str(".*");
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every problem of a Grafana dashboard; also the series names its panels use.
pub fn dashboard_problems(d: &Value, ex: &Exports) -> (Vec<String>, BTreeSet<String>) {
    let mut p = Vec::new();
    let mut used = BTreeSet::new();
    for field in ["title", "uid"] {
        if d[field].as_str().is_none_or(str::is_empty) {
            p.push(format!("no {field}"));
        }
    }
    let variables = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let vars: BTreeSet<String> = variables
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    let datasource_var = variables
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .and_then(|v| v["name"].as_str())
        .map(|n| format!("${{{n}}}"));
    if datasource_var.is_none() {
        p.push("no Prometheus datasource variable".into());
    }
    for v in variables.iter().filter(|v| v["type"] == "query") {
        let vname = v["name"].as_str().unwrap_or("");
        let def = v["definition"].as_str().unwrap_or("");
        let Some((sel, label)) = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .and_then(|s| s.rsplit_once(','))
        else {
            p.push(format!(
                "variable {vname}: not label_values(selector, label)"
            ));
            continue;
        };
        let a = analyse(&substitute(sel, &vars, &mut p), ex);
        p.extend(a.problems.iter().map(|x| format!("variable {vname}: {x}")));
        if !a.output.contains(label.trim()) {
            p.push(format!(
                "variable {vname}: its series have no label {label}"
            ));
        }
    }
    let panels = d["panels"].as_array().cloned().unwrap_or_default();
    if panels.is_empty() {
        p.push("no panels".into());
    }
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("");
        let id = format!("panel `{title}`");
        if !panel["id"].as_u64().is_some_and(|i| ids.insert(i)) {
            p.push(format!("{id}: no id, or an id used twice"));
        }
        let g = &panel["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap_or(99), g["w"].as_u64().unwrap_or(99));
        if g["h"].as_u64().is_none() || g["y"].as_u64().is_none() || x + w > 24 {
            p.push(format!("{id}: gridPos is not inside the 24-column grid"));
        }
        if panel["type"] == "row" {
            continue;
        }
        if panel["datasource"]["uid"].as_str() != datasource_var.as_deref() {
            p.push(format!(
                "{id}: datasource is not the dashboard's Prometheus variable"
            ));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            p.push(format!("{id}: no targets"));
        }
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            let a = analyse(&substitute(expr, &vars, &mut p), ex);
            p.extend(a.problems.iter().map(|x| format!("{id}: {x}")));
            used.extend(a.metrics.iter().cloned());
            for l in template_labels(t["legendFormat"].as_str().unwrap_or("")) {
                if !a.output.contains(&l) {
                    p.push(format!(
                        "{id}: legend uses {{{{{l}}}}}, a label the query's result does not have ({:?})",
                        a.output
                    ));
                }
            }
        }
    }
    (p, used)
}
