//! A small schema of the Kubernetes kinds deploy/ uses, and the references between objects:
//! selectors that match pod templates, Service target ports that name container ports, probes
//! on declared ports, ConfigMaps and Secrets (and their keys) that exist, the hardening every
//! container must have. Not the API server's validation: what a mistake in these files is
//! likely to break.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The kinds the manifests may hold, with their API version.
pub const KINDS: [(&str, &str); 8] = [
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("policy/v1", "PodDisruptionBudget"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
];

/// One object of a manifest and the file it came from.
#[derive(Clone, Debug)]
pub struct Object {
    pub file: String,
    pub v: Value,
}

impl Object {
    pub fn kind(&self) -> &str {
        self.v["kind"].as_str().unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.v["metadata"]["name"].as_str().unwrap_or("")
    }

    fn id(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.file)
    }

    /// The pod template of a workload.
    pub fn pod(&self) -> &Value {
        &self.v["spec"]["template"]
    }

    pub fn containers(&self) -> Vec<&Value> {
        self.pod()["spec"]["containers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
}

pub fn is_workload(o: &Object) -> bool {
    matches!(o.kind(), "Deployment" | "StatefulSet")
}

pub fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// A selector (`matchLabels` or a Service's plain map) matches these labels.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The workloads whose pods `selector` selects.
fn selected<'a>(objects: &'a [Object], selector: &BTreeMap<String, String>) -> Vec<&'a Object> {
    objects
        .iter()
        .filter(|o| is_workload(o) && selects(selector, &str_map(&o.pod()["metadata"]["labels"])))
        .collect()
}

/// A DNS-1123 label: what object, port and container names must be.
fn dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Container ports by name, of every container of a workload.
pub fn container_ports(o: &Object) -> BTreeMap<String, u64> {
    o.containers()
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["containerPort"].as_u64()?)))
        .collect()
}

/// A probe's or a Service's port (a name or a number) resolved against container ports.
fn resolve_port(port: &Value, ports: &BTreeMap<String, u64>) -> Option<u64> {
    match port {
        Value::String(name) => ports.get(name).copied(),
        Value::Number(n) => n.as_u64().filter(|n| ports.values().any(|p| p == n)),
        _ => None,
    }
}

/// The keys a Secret or ConfigMap defines.
fn keys_of(o: &Object) -> BTreeSet<String> {
    ["data", "stringData", "binaryData"]
        .iter()
        .flat_map(|f| str_map(&o.v[*f]).into_keys())
        .collect()
}

/// Every problem of these objects, against the schema and each other.
pub fn problems(objects: &[Object]) -> Vec<String> {
    let mut p = Vec::new();
    let mut seen = BTreeSet::new();
    for o in objects {
        let api = o.v["apiVersion"].as_str().unwrap_or("");
        if !KINDS.contains(&(api, o.kind())) {
            p.push(format!(
                "{}: unknown apiVersion/kind `{api}`/`{}`",
                o.file,
                o.kind()
            ));
            continue;
        }
        if o.kind() == "Kustomization" {
            continue;
        }
        if !dns_label(o.name(), 63) {
            p.push(format!("{}: metadata.name is not a DNS label", o.id()));
        }
        if !seen.insert((o.kind().to_owned(), o.name().to_owned())) {
            p.push(format!("{}: defined twice", o.id()));
        }
        if o.v["metadata"].get("namespace").is_some() {
            p.push(format!(
                "{}: sets metadata.namespace (the manifests are namespace-agnostic)",
                o.id()
            ));
        }
        if !str_map(&o.v["metadata"]["labels"]).contains_key("app.kubernetes.io/name") {
            p.push(format!("{}: no app.kubernetes.io/name label", o.id()));
        }
        if matches!(o.kind(), "ConfigMap" | "Secret") && keys_of(o).is_empty() {
            p.push(format!("{}: no data", o.id()));
        }
        match o.kind() {
            "Secret" if o.v["type"].as_str() != Some("Opaque") => {
                p.push(format!("{}: type is not Opaque", o.id()));
            }
            "Deployment" | "StatefulSet" => workload(o, objects, &mut p),
            "Service" => service(o, objects, &mut p),
            "PodDisruptionBudget" => pdb(o, objects, &mut p),
            "ServiceMonitor" => service_monitor(o, objects, &mut p),
            _ => {}
        }
    }
    p
}

fn workload(o: &Object, objects: &[Object], p: &mut Vec<String>) {
    let id = o.id();
    let spec = &o.v["spec"];
    let selector = str_map(&spec["selector"]["matchLabels"]);
    let labels = str_map(&o.pod()["metadata"]["labels"]);
    if !selects(&selector, &labels) {
        p.push(format!(
            "{id}: spec.selector.matchLabels does not match the template's labels"
        ));
    }
    if spec["replicas"].as_u64().unwrap_or(0) < 2 {
        p.push(format!("{id}: fewer than 2 replicas"));
    }
    let pod = &o.pod()["spec"];
    if pod["automountServiceAccountToken"] != Value::Bool(false) {
        p.push(format!(
            "{id}: automountServiceAccountToken is not false (nothing here talks to the API)"
        ));
    }
    let pod_sc = &pod["securityContext"];
    if pod_sc["seccompProfile"]["type"] != "RuntimeDefault" {
        p.push(format!("{id}: no RuntimeDefault seccomp profile"));
    }
    let volumes: BTreeMap<String, &Value> = pod["volumes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v)))
                .collect()
        })
        .unwrap_or_default();
    let claims: BTreeSet<String> = spec["volumeClaimTemplates"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, v) in &volumes {
        if let Some(cm) = v["configMap"]["name"].as_str() {
            if find(objects, "ConfigMap", cm).is_none() {
                p.push(format!(
                    "{id}: volume {name} names ConfigMap {cm}, not defined"
                ));
            }
        }
        if let Some(s) = v["secret"]["secretName"].as_str() {
            if find(objects, "Secret", s).is_none() {
                p.push(format!("{id}: volume {name} names Secret {s}, not defined"));
            }
        }
    }
    if o.kind() == "StatefulSet" {
        let svc = spec["serviceName"].as_str().unwrap_or("");
        match find(objects, "Service", svc) {
            None => p.push(format!(
                "{id}: serviceName `{svc}` is not a Service defined here"
            )),
            Some(s) => {
                if s.v["spec"]["clusterIP"] != "None" {
                    p.push(format!("{id}: its Service {svc} is not headless"));
                }
                if !selects(&str_map(&s.v["spec"]["selector"]), &labels) {
                    p.push(format!("{id}: its Service {svc} does not select its pods"));
                }
            }
        }
    }
    let containers = o.containers();
    if containers.is_empty() {
        p.push(format!("{id}: no containers"));
    }
    for c in containers {
        container(&id, c, pod_sc, &volumes, &claims, objects, p);
    }
}

fn container(
    id: &str,
    c: &Value,
    pod_sc: &Value,
    volumes: &BTreeMap<String, &Value>,
    claims: &BTreeSet<String>,
    objects: &[Object],
    p: &mut Vec<String>,
) {
    let name = c["name"].as_str().unwrap_or("");
    let id = format!("{id} container {name}");
    if !dns_label(name, 63) {
        p.push(format!("{id}: name is not a DNS label"));
    }
    let image = c["image"].as_str().unwrap_or("");
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
    if tag.is_empty() || tag == "latest" || tag.contains('/') {
        p.push(format!("{id}: image `{image}` has no fixed tag"));
    }
    let res = &c["resources"];
    for (what, v) in [
        ("requests.cpu", &res["requests"]["cpu"]),
        ("requests.memory", &res["requests"]["memory"]),
        ("limits.memory", &res["limits"]["memory"]),
    ] {
        if v.is_null() {
            p.push(format!("{id}: no resources.{what}"));
        }
    }
    let sc = &c["securityContext"];
    if sc["allowPrivilegeEscalation"] != Value::Bool(false) {
        p.push(format!("{id}: allowPrivilegeEscalation is not false"));
    }
    if sc["readOnlyRootFilesystem"] != Value::Bool(true) {
        p.push(format!("{id}: readOnlyRootFilesystem is not true"));
    }
    let drops_all = sc["capabilities"]["drop"]
        .as_array()
        .is_some_and(|d| d.iter().any(|c| c == "ALL"));
    if !drops_all {
        p.push(format!("{id}: capabilities.drop does not hold ALL"));
    }
    if sc["runAsNonRoot"] != Value::Bool(true) && pod_sc["runAsNonRoot"] != Value::Bool(true) {
        p.push(format!("{id}: runAsNonRoot is not true"));
    }

    let mut ports = BTreeMap::new();
    for port in c["ports"].as_array().cloned().unwrap_or_default() {
        let pname = port["name"].as_str().unwrap_or("");
        if !dns_label(pname, 15) {
            p.push(format!(
                "{id}: port `{pname}` has no name of at most 15 lowercase characters"
            ));
        }
        match port["containerPort"].as_u64() {
            Some(n) if (1..=65535).contains(&n) => {
                if ports.insert(pname.to_owned(), n).is_some() {
                    p.push(format!("{id}: port name {pname} used twice"));
                }
            }
            _ => p.push(format!(
                "{id}: port {pname}: containerPort is not a port number"
            )),
        }
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        let pr = &c[probe];
        if pr.is_null() {
            p.push(format!("{id}: no {probe}"));
        } else if !pr["httpGet"].is_null() {
            if !pr["httpGet"]["path"]
                .as_str()
                .is_some_and(|s| s.starts_with('/'))
            {
                p.push(format!(
                    "{id}: {probe}.httpGet.path is not an absolute path"
                ));
            }
            if resolve_port(&pr["httpGet"]["port"], &ports).is_none() {
                p.push(format!(
                    "{id}: {probe}.httpGet.port {} is not a port of the container",
                    pr["httpGet"]["port"]
                ));
            }
        } else if !pr["exec"].is_null() {
            if pr["exec"]["command"].as_array().is_none_or(Vec::is_empty) {
                p.push(format!("{id}: {probe}.exec.command is empty"));
            }
        } else {
            p.push(format!("{id}: {probe} is neither httpGet nor exec"));
        }
    }

    let mut defined_env = BTreeSet::new();
    for e in c["env"].as_array().cloned().unwrap_or_default() {
        let ename = e["name"].as_str().unwrap_or("").to_owned();
        let from = &e["valueFrom"];
        for (what, kind) in [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")] {
            let r = &from[what];
            if r.is_null() {
                continue;
            }
            let (oname, key) = (
                r["name"].as_str().unwrap_or(""),
                r["key"].as_str().unwrap_or(""),
            );
            match find(objects, kind, oname) {
                None => p.push(format!(
                    "{id}: env {ename} names {kind} {oname}, not defined"
                )),
                Some(obj) if !keys_of(obj).contains(key) => p.push(format!(
                    "{id}: env {ename} names key {key} of {kind} {oname}, which has no such key"
                )),
                Some(_) => {}
            }
        }
        if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            if ![
                "metadata.name",
                "metadata.namespace",
                "status.podIP",
                "spec.nodeName",
            ]
            .contains(&path)
            {
                p.push(format!("{id}: env {ename}: unexpected fieldPath {path}"));
            }
        }
        defined_env.insert(ename);
    }
    // $(VAR) in command and args: Kubernetes expands only variables defined in env.
    for arg in ["command", "args"]
        .iter()
        .flat_map(|f| c[*f].as_array().cloned().unwrap_or_default())
    {
        let arg = arg.as_str().unwrap_or("");
        for var in arg.split("$(").skip(1).filter_map(|s| s.split_once(')')) {
            if !defined_env.contains(var.0) {
                p.push(format!("{id}: `$({})` is not a variable of env", var.0));
            }
        }
    }
    for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
        let vname = m["name"].as_str().unwrap_or("");
        if !volumes.contains_key(vname) && !claims.contains(vname) {
            p.push(format!(
                "{id}: mounts volume {vname}, which the pod does not define"
            ));
        }
        if !m["mountPath"].as_str().is_some_and(|s| s.starts_with('/')) {
            p.push(format!("{id}: volume {vname} has no absolute mountPath"));
        }
    }
}

fn service(o: &Object, objects: &[Object], p: &mut Vec<String>) {
    let id = o.id();
    let selector = str_map(&o.v["spec"]["selector"]);
    let workloads = selected(objects, &selector);
    let [w] = workloads[..] else {
        p.push(format!(
            "{id}: its selector matches {} workloads, not exactly one",
            workloads.len()
        ));
        return;
    };
    let ports = container_ports(w);
    let list = o.v["spec"]["ports"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        p.push(format!("{id}: no ports"));
    }
    for port in list {
        let pname = port["name"].as_str().unwrap_or("");
        if !dns_label(pname, 15) {
            p.push(format!("{id}: port without a name"));
        }
        if !port["port"]
            .as_u64()
            .is_some_and(|n| (1..=65535).contains(&n))
        {
            p.push(format!("{id}: port {pname}: `port` is not a port number"));
        }
        if resolve_port(&port["targetPort"], &ports).is_none() {
            p.push(format!(
                "{id}: port {pname}: targetPort {} is not a container port of {}",
                port["targetPort"],
                w.id()
            ));
        }
    }
}

fn pdb(o: &Object, objects: &[Object], p: &mut Vec<String>) {
    let id = o.id();
    let spec = &o.v["spec"];
    let workloads = selected(objects, &str_map(&spec["selector"]["matchLabels"]));
    let [w] = workloads[..] else {
        p.push(format!(
            "{id}: its selector matches {} workloads, not exactly one",
            workloads.len()
        ));
        return;
    };
    let replicas = w.v["spec"]["replicas"].as_u64().unwrap_or(1);
    match (
        spec["maxUnavailable"].as_u64(),
        spec["minAvailable"].as_u64(),
    ) {
        (Some(max), None) if max >= 1 && max < replicas => {}
        (None, Some(min)) if min >= 1 && min < replicas => {}
        _ => p.push(format!(
            "{id}: needs one of maxUnavailable/minAvailable, between 1 and {} replicas - 1",
            w.id()
        )),
    }
}

fn service_monitor(o: &Object, objects: &[Object], p: &mut Vec<String>) {
    let id = o.id();
    let selector = str_map(&o.v["spec"]["selector"]["matchLabels"]);
    let services: Vec<&Object> = objects
        .iter()
        .filter(|s| {
            s.kind() == "Service" && selects(&selector, &str_map(&s.v["metadata"]["labels"]))
        })
        .collect();
    if services.is_empty() {
        p.push(format!("{id}: selects no Service"));
    }
    for e in o.v["spec"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let port = e["port"].as_str().unwrap_or("");
        for s in &services {
            let names: Vec<&str> = s.v["spec"]["ports"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            if !names.contains(&port) {
                p.push(format!(
                    "{id}: endpoint port {port} is not a port of {}",
                    s.id()
                ));
            }
        }
        let cred = &e["authorization"]["credentials"];
        let (sname, key) = (
            cred["name"].as_str().unwrap_or(""),
            cred["key"].as_str().unwrap_or(""),
        );
        match find(objects, "Secret", sname) {
            Some(s) if keys_of(s).contains(key) => {}
            _ => p.push(format!(
                "{id}: endpoint {port}: authorization credentials {sname}/{key} are not a Secret key defined here"
            )),
        }
    }
}

/// The Services a ServiceMonitor scrapes: their names are the scrape's `job` label.
pub fn scraped_services(objects: &[Object]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in objects.iter().filter(|o| o.kind() == "ServiceMonitor") {
        let selector = str_map(&m.v["spec"]["selector"]["matchLabels"]);
        for s in objects.iter().filter(|o| o.kind() == "Service") {
            if selects(&selector, &str_map(&s.v["metadata"]["labels"])) {
                out.insert(s.name().to_owned());
            }
        }
    }
    out
}

/// An object's JSON, mutable, for the tests that break copies on purpose.
pub fn object_mut<'a>(objects: &'a mut [Object], kind: &str, name: &str) -> &'a mut Value {
    objects
        .iter_mut()
        .find(|o| o.kind() == kind && o.name() == name)
        .map(|o| &mut o.v)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}
