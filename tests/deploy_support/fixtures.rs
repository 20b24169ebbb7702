//! What the tests of tests/deploy.rs read out of deploy/ and the gateway: the parsed objects,
//! the gateway's container and the environment the kubelet gives it, its readiness script,
//! every metric family the gateway registers, and the checks of the alert rules and the
//! dashboard together.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;
use shardgate::telemetry::*;

use super::k8s::{self, Object};
use super::promql::{self, Exports, Families};
use super::{load_deploy, loaded_file, Loaded};

pub const DEPLOYMENT: &str = "shardgate";
pub const CONTAINER: &str = "shardgate";
pub const RULES: &str = "deploy/prometheus/alerts.yml";
pub const DASHBOARD: &str = "deploy/grafana/shardgate.json";

pub fn parsed() -> Vec<Loaded> {
    let (loaded, problems) = load_deploy();
    assert!(problems.is_empty(), "deploy/:\n  {}", problems.join("\n  "));
    loaded
}

/// Every Kubernetes object under deploy/ (documents with an apiVersion).
pub fn objects(loaded: &[Loaded]) -> Vec<Object> {
    loaded
        .iter()
        .flat_map(|l| {
            l.docs
                .iter()
                .filter(|d| d.get("apiVersion").is_some())
                .map(|d| Object {
                    file: l.path.display().to_string(),
                    v: d.clone(),
                })
        })
        .collect()
}

/// The gateway container of the Deployment.
pub fn gateway_container(objects: &[Object]) -> (&Object, &Value) {
    let d = k8s::find(objects, "Deployment", DEPLOYMENT).expect("the gateway Deployment");
    let c = d
        .containers()
        .into_iter()
        .find(|c| c["name"] == CONTAINER)
        .expect("the gateway container");
    (d, c)
}

/// A string value of a Secret or ConfigMap.
pub fn data_value(objects: &[Object], kind: &str, name: &str, key: &str) -> String {
    let o = k8s::find(objects, kind, name).unwrap_or_else(|| panic!("no {kind} {name}"));
    o.v["stringData"][key]
        .as_str()
        .or_else(|| o.v["data"][key].as_str())
        .unwrap_or_else(|| panic!("{kind} {name} has no key {key}"))
        .to_owned()
}

/// The admin token the manifests give the gateways.
pub fn admin_token(objects: &[Object]) -> String {
    data_value(objects, "Secret", "shardgate", "admin-token")
}

/// The pod's name in the test: what the downward API gives `POD_NAME`.
pub const POD_NAME: &str = "shardgate-7c9d5f6b8d-x2x7q";

/// The container's environment as the kubelet sets it (fieldRef and secretKeyRef resolved).
pub fn pod_env(objects: &[Object], c: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().unwrap_or("").to_owned();
        let from = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
            POD_NAME.to_owned()
        } else if let Some(s) = from["secretKeyRef"]["name"].as_str() {
            let key = from["secretKeyRef"]["key"].as_str().unwrap_or("");
            data_value(objects, "Secret", s, key)
        } else {
            panic!("env {name}: a source this test does not resolve: {e}");
        };
        env.insert(name, value);
    }
    env
}

/// `$(VAR)` expanded as Kubernetes does in command and args.
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// The readiness probe's shell and script (`[shell, "-c", script]`).
pub fn readiness_script(c: &Value) -> (String, String) {
    let cmd = c["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readiness probe");
    assert_eq!(cmd.len(), 3, "[shell, -c, script]: {cmd:?}");
    assert_eq!(cmd[1], "-c");
    (
        cmd[0].as_str().unwrap_or("").to_owned(),
        cmd[2].as_str().unwrap_or("").to_owned(),
    )
}

/// Every family the gateway registers, each touched once so that it shows with its labels.
/// A new family in telemetry.rs is added here, and the dashboard must then show it.
pub fn registered() -> Families {
    let m = Metrics::new();
    let s = |x: &str| Arc::new(x.to_owned());
    m.requests
        .get_or_create(&RequestLabels {
            route: s("r"),
            set: s("s"),
            idc: s("i"),
            status: 200,
        })
        .inc();
    let route = RouteLabels {
        route: s("r"),
        set: s("s"),
        idc: s("i"),
    };
    m.request_duration.get_or_create(&route).observe(0.01);
    let idc_set = IdcSetLabels {
        idc: s("i"),
        set: s("s"),
    };
    m.upstream_duration.get_or_create(&idc_set).observe(0.01);
    m.breaker_state.get_or_create(&idc_set).set(0);
    m.topology_reloads
        .get_or_create(&ResultLabels { result: "ok" })
        .inc();
    m.shards_served
        .get_or_create(&IdcLabels { idc: s("i") })
        .set(1);
    m.idc_healthy
        .get_or_create(&IdcLabels { idc: s("i") })
        .set(1);
    m.idc_state
        .get_or_create(&IdcStateLabels {
            idc: s("i"),
            state: "active",
        })
        .set(1);
    m.inflight.get_or_create(&SetLabels { set: s("s") }).set(0);
    m.refused
        .get_or_create(&RefusedLabels {
            set: s("s"),
            reason: "shed",
        })
        .inc();
    m.reforwarded
        .get_or_create(&ReforwardLabels {
            route: s("r"),
            from: s("a"),
            to: s("b"),
        })
        .inc();
    m.backend_healthy
        .get_or_create(&BackendLabels {
            idc: s("i"),
            set: s("s"),
            backend: "127.0.0.1:1".into(),
        })
        .set(1);
    m.task_failures
        .get_or_create(&TaskLabels { task: "health" })
        .inc();
    Families::parse(&m.encode())
}

pub fn rules_and_dashboard(loaded: &[Loaded]) -> (Value, Value) {
    (
        loaded_file(loaded, RULES).docs[0].clone(),
        loaded_file(loaded, DASHBOARD).docs[0].clone(),
    )
}

/// Checks the rules and the dashboard against `ex`; returns every problem.
pub fn metric_problems(rules: &Value, dashboard: &Value, ex: &Exports) -> Vec<String> {
    let (mut problems, alert_series) = promql::alert_problems(rules, ex);
    let (dash_problems, dash_series) = promql::dashboard_problems(dashboard, ex);
    problems.extend(dash_problems.into_iter().map(|p| format!("dashboard: {p}")));
    let families = |series: &BTreeSet<String>| -> BTreeSet<String> {
        series
            .iter()
            .filter_map(|s| ex.registered.resolve(s).map(|(f, _)| f))
            .collect()
    };
    // What the issue asks the alerts to watch: IDC down, gateway behind, breaker open,
    // fenced writes (self-fenced and refused `fenced`), task failures.
    let alerted = families(&alert_series);
    for f in [
        "shardgate_idc_state",
        "shardgate_topology_revision",
        "shardgate_acknowledged_revision",
        "shardgate_breaker_state",
        "shardgate_self_fenced",
        "shardgate_refused",
        "shardgate_task_failures",
    ] {
        if !alerted.contains(f) {
            problems.push(format!("no alert uses {f}"));
        }
    }
    let shown = families(&dash_series);
    for f in ex.registered.types.keys() {
        if !shown.contains(f) {
            problems.push(format!("dashboard: no panel shows {f}"));
        }
    }
    problems
}

/// Exports as a running gateway would show them, without one: the registry, plus the label
/// values the rules and the dashboard match on.
pub fn offline_exports(objects: &[Object]) -> Exports {
    let registered = registered();
    let mut live = registered.clone();
    let mut add = |family: &str, label: &str, values: &[&str]| {
        live.values
            .entry((family.into(), label.into()))
            .or_default()
            .extend(values.iter().map(|v| v.to_string()));
    };
    let states: Vec<&str> = shardgate::control::topology::IdcState::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    add("shardgate_idc_state", "state", &states);
    add("shardgate_refused", "reason", &["fenced"]);
    add("shardgate_topology_reloads", "result", &["invalid"]);
    add("shardgate_requests", "status", &["502"]);
    Exports {
        registered,
        live,
        event_only: BTreeMap::new(),
        jobs: k8s::scraped_services(objects),
    }
}
