//! deploy/ checked offline, in `make test`: every file parses; the Kubernetes manifests follow a
//! schema of the kinds they use and refer to each other correctly; the gateway accepts the
//! ConfigMap's bootstrap file the way the pod runs it; the image builds what the manifests run;
//! and, against a running gateway, the probes answer as the manifests expect and every metric,
//! label and value the alert rules and the Grafana dashboard use is one the gateway exports.
//! Each kind of check is also shown to fail on a deliberately broken copy.

mod deploy_support;
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use deploy_support::fixtures::*;
use deploy_support::k8s::{self, Object};
use deploy_support::promql::{Exports, Families};
use deploy_support::{load_deploy, read, Loaded};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use shardgate::config::SourceConfig;
use support::{get, keys_where, request, within, Cluster, Options};

/// Families only an event this test cannot cause honestly brings to life: checked against the
/// gateway's registry (name and labels), not against a running gateway's output.
const EVENT_ONLY: [(&str, &str); 2] = [
    (
        "shardgate_reforwarded",
        "needs a backend answering 421 with a newer owner epoch than the gateway's",
    ),
    (
        "shardgate_task_failures",
        "needs a background task to panic or end unasked",
    ),
];

#[test]
fn every_file_under_deploy_parses() {
    let (loaded, mut problems) = load_deploy();
    for l in &loaded {
        let path = l.path.display().to_string();
        for d in &l.docs {
            let kind = if d.get("apiVersion").is_some() && d.get("kind").is_some() {
                "kubernetes"
            } else if d.get("groups").is_some() {
                "rules"
            } else if d.get("panels").is_some() {
                "dashboard"
            } else {
                "unknown"
            };
            let expected =
                if path.starts_with("deploy/k8s/") || path.ends_with("servicemonitor.yaml") {
                    "kubernetes"
                } else if path == RULES {
                    "rules"
                } else if path == DASHBOARD {
                    "dashboard"
                } else {
                    "a known file"
                };
            if kind != expected {
                problems.push(format!(
                    "{path}: a {kind} document where {expected} is expected"
                ));
            }
        }
    }
    for must in [RULES, DASHBOARD, "deploy/k8s/kustomization.yaml"] {
        if !loaded.iter().any(|l| l.path == Path::new(must)) {
            problems.push(format!("{must} is missing"));
        }
    }
    assert!(problems.is_empty(), "deploy/:\n  {}", problems.join("\n  "));
}

/// The files a kustomization (and those it includes) applies.
fn kustomized(dir: &Path, loaded: &[Loaded], problems: &mut Vec<String>) -> BTreeSet<String> {
    let file = dir.join("kustomization.yaml");
    let Some(k) = loaded.iter().find(|l| l.path == file) else {
        problems.push(format!("{} is missing", file.display()));
        return BTreeSet::new();
    };
    let mut out = BTreeSet::from([file.display().to_string()]);
    for r in k.docs[0]["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let r = r.as_str().unwrap_or("");
        let path = dir.join(r);
        if deploy_support::repo().join(&path).is_dir() {
            out.extend(kustomized(&path, loaded, problems));
        } else if loaded.iter().any(|l| l.path == path) {
            out.insert(path.display().to_string());
        } else {
            problems.push(format!("{}: resource {r} does not exist", file.display()));
        }
    }
    out
}

#[test]
fn the_manifests_follow_the_schema_and_refer_to_each_other() {
    let loaded = parsed();
    let objects = objects(&loaded);
    let mut problems = k8s::problems(&objects);
    for (kind, name) in [
        ("Deployment", DEPLOYMENT),
        ("ConfigMap", "shardgate-config"),
        ("Secret", "shardgate"),
        ("Service", "shardgate"),
        ("Service", "shardgate-admin"),
        ("PodDisruptionBudget", "shardgate"),
        ("StatefulSet", "shardgate-etcd"),
        ("Service", "shardgate-etcd"),
        ("PodDisruptionBudget", "shardgate-etcd"),
        ("ServiceMonitor", "shardgate"),
    ] {
        if k8s::find(&objects, kind, name).is_none() {
            problems.push(format!("no {kind} {name}"));
        }
    }
    // `kubectl apply -k deploy/k8s` applies every manifest under deploy/k8s.
    let applied = kustomized(Path::new("deploy/k8s"), &loaded, &mut problems);
    for l in loaded.iter().filter(|l| l.path.starts_with("deploy/k8s")) {
        let path = l.path.display().to_string();
        if !applied.contains(&path) {
            problems.push(format!("{path} is in no kustomization's resources"));
        }
    }
    assert!(
        problems.is_empty(),
        "manifests:\n  {}",
        problems.join("\n  ")
    );
}

/// Each mutation breaks one thing; the schema check must name it.
#[test]
fn broken_manifests_are_caught() {
    type Break = fn(&mut Vec<Object>);
    let cases: Vec<(Break, &str)> = vec![
        (
            |o| o_mut(o, "Service", "shardgate")["spec"]["ports"][0]["targetPort"] = json!("proxi"),
            "targetPort \"proxi\" is not a container port",
        ),
        (
            |o| {
                o_mut(o, "Deployment", DEPLOYMENT)["spec"]["template"]["metadata"]["labels"]
                    ["app.kubernetes.io/component"] = json!("other")
            },
            "does not match the template's labels",
        ),
        (
            |o| container_mut(o)["livenessProbe"]["httpGet"]["port"] = json!("admim"),
            "livenessProbe.httpGet.port \"admim\" is not a port of the container",
        ),
        (
            |o| container_mut(o)["readinessProbe"] = Value::Null,
            "no readinessProbe",
        ),
        (
            |o| container_mut(o)["env"][1]["valueFrom"]["secretKeyRef"]["key"] = json!("nope"),
            "names key nope of Secret shardgate, which has no such key",
        ),
        (
            |o| container_mut(o)["securityContext"]["readOnlyRootFilesystem"] = json!(false),
            "readOnlyRootFilesystem is not true",
        ),
        (
            |o| container_mut(o)["securityContext"]["capabilities"]["drop"] = json!(["NET_RAW"]),
            "capabilities.drop does not hold ALL",
        ),
        (
            |o| container_mut(o)["args"] = json!(["--instance", "$(POD)"]),
            "`$(POD)` is not a variable of env",
        ),
        (
            |o| {
                o_mut(o, "PodDisruptionBudget", "shardgate")["spec"]["selector"]["matchLabels"]
                    ["app.kubernetes.io/component"] = json!("nope")
            },
            "matches 0 workloads",
        ),
        (
            |o| {
                o_mut(o, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]["volumes"][0]
                    ["configMap"]["name"] = json!("missing")
            },
            "names ConfigMap missing, not defined",
        ),
        (
            |o| o_mut(o, "ConfigMap", "shardgate-config")["metadata"]["namespace"] = json!("prod"),
            "namespace-agnostic",
        ),
        (
            |o| {
                o_mut(o, "ServiceMonitor", "shardgate")["spec"]["endpoints"][0]["authorization"]
                    ["credentials"]["key"] = json!("token")
            },
            "authorization credentials shardgate/token",
        ),
        (
            |o| o_mut(o, "StatefulSet", "shardgate-etcd")["spec"]["serviceName"] = json!("etcd"),
            "serviceName `etcd` is not a Service defined here",
        ),
        (
            |o| o_mut(o, "Deployment", DEPLOYMENT)["apiVersion"] = json!("apps/v1beta1"),
            "unknown apiVersion/kind `apps/v1beta1`/`Deployment`",
        ),
        (
            |o| container_mut(o)["image"] = json!("shardgate:latest"),
            "has no fixed tag",
        ),
    ];
    let objects = objects(&parsed());
    assert!(k8s::problems(&objects).is_empty());
    for (i, (brk, expected)) in cases.into_iter().enumerate() {
        let mut broken = objects.clone();
        brk(&mut broken);
        let problems = k8s::problems(&broken);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "case {i}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    }
}

fn o_mut<'a>(objects: &'a mut [Object], kind: &str, name: &str) -> &'a mut Value {
    k8s::object_mut(objects, kind, name)
}

fn container_mut(objects: &mut [Object]) -> &mut Value {
    let d = o_mut(objects, "Deployment", DEPLOYMENT);
    let list = d["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    list.iter_mut()
        .find(|c| c["name"] == CONTAINER)
        .expect("the gateway container")
}

#[test]
fn the_gateway_accepts_the_bootstrap_file_as_the_pod_runs_it() {
    let objects = objects(&parsed());
    let (d, c) = gateway_container(&objects);
    let pod = &d.pod()["spec"];
    let env = pod_env(&objects, c);
    // The environment variables the gateway reads, and no misspelt one.
    for name in env.keys().filter(|n| n.starts_with("SHARDGATE_")) {
        assert!(
            [
                "SHARDGATE_ADMIN_TOKEN",
                shardgate::control::etcd::PASSWORD_ENV
            ]
            .contains(&name.as_str()),
            "env {name} is not read by the gateway"
        );
    }
    let mut argv: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|f| c[*f].as_array().cloned().unwrap_or_default())
        .map(|a| expand(a.as_str().unwrap_or(""), &env))
        .collect();

    // --config names a file the ConfigMap volume provides.
    let at = argv
        .iter()
        .position(|a| a == "--config")
        .expect("serve --config")
        + 1;
    let config_path = Path::new(&argv[at]).to_path_buf();
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| {
            m.iter().find(|m| {
                config_path.parent() == Some(Path::new(m["mountPath"].as_str().unwrap_or("")))
            })
        })
        .expect("a volume mounted where --config points");
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
        .expect("the mounted volume");
    let cm = volume["configMap"]["name"]
        .as_str()
        .expect("a ConfigMap volume");
    let file = config_path
        .file_name()
        .and_then(|f| f.to_str())
        .expect("a file name");
    let text = data_value(&objects, "ConfigMap", cm, file);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let local = dir.path().join(file);
    std::fs::write(&local, text).expect("write the bootstrap file");
    argv[at] = local.display().to_string();
    // clap reads SHARDGATE_ADMIN_TOKEN as --admin-token; given as the flag, the test's own
    // environment stays as it is.
    argv.push("--admin-token".into());
    argv.push(env["SHARDGATE_ADMIN_TOKEN"].clone());

    let cli = shardgate::operator::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the gateway's command line {argv:?}: {e}"));
    let shardgate::operator::cli::Command::Serve(args) = cli.command else {
        panic!("the container does not run `shardgate serve`: {argv:?}");
    };
    let mut raw = args.into_raw().expect("the bootstrap file loads");
    if let Some(pw) = env
        .get(shardgate::control::etcd::PASSWORD_ENV)
        .filter(|p| !p.is_empty())
    {
        raw.etcd_password = Some(shardgate::control::etcd::Password(pw.clone()));
    }
    let config = raw
        .into_config()
        .unwrap_or_else(|e| panic!("the gateway refuses the ConfigMap's bootstrap: {e:#}"));

    let ports = k8s::container_ports(d);
    assert_eq!(
        Some(&u64::from(config.listen.port())),
        ports.get("proxy"),
        "proxy port"
    );
    assert!(
        config.listen.ip().is_unspecified(),
        "the proxy must listen on the pod's address"
    );
    assert_eq!(
        Some(&u64::from(config.admin.port())),
        ports.get("admin"),
        "admin port"
    );
    assert!(
        !config.admin.ip().is_loopback(),
        "the kubelet and Prometheus reach the admin listener"
    );
    assert!(config.admin_token.is_some());
    assert_eq!(
        config.instance.as_deref(),
        Some(POD_NAME),
        "instance = the pod's name"
    );
    assert!(config.local_idc.is_some(), "each gateway knows its IDC");

    // The etcd endpoints are the trial StatefulSet's members, on its client port.
    let SourceConfig::Etcd { access, cluster } = &config.source else {
        panic!("the manifests run the etcd source, got {:?}", config.source);
    };
    assert!(!cluster.is_empty());
    let sts = k8s::find(&objects, "StatefulSet", "shardgate-etcd").expect("the trial etcd");
    let svc = sts.v["spec"]["serviceName"].as_str().unwrap_or("");
    let replicas = sts.v["spec"]["replicas"].as_u64().unwrap_or(0);
    let client_port = k8s::find(&objects, "Service", svc)
        .and_then(|s| s.v["spec"]["ports"].as_array())
        .and_then(|p| p.iter().find(|p| p["name"] == "client"))
        .and_then(|p| p["port"].as_u64())
        .expect("the etcd Service's client port");
    let expected: Vec<String> = (0..replicas)
        .map(|i| format!("http://{}-{i}.{svc}:{client_port}", sts.name()))
        .collect();
    assert_eq!(access.endpoints, expected, "etcd endpoints");

    // The cache lives on a writable volume (the root file system is read-only).
    let cache = config.cache_dir.as_ref().expect("a cache dir");
    let cache_mount = c["volumeMounts"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| Path::new(m["mountPath"].as_str().unwrap_or("")) == cache)
        })
        .expect("a volume mounted at cache_dir");
    assert_ne!(cache_mount["readOnly"], true);
    let cache_volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == cache_mount["name"]))
        .expect("the cache volume");
    assert!(
        cache_volume["emptyDir"].is_object(),
        "cache_dir on an emptyDir"
    );

    // SIGTERM comes after preStop; drain must end before the kubelet kills the container.
    let pre_stop: u64 = c["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .filter(|c| c.first() == Some(&json!("sleep")))
        .and_then(|c| c.get(1)?.as_str()?.parse().ok())
        .expect("preStop: sleep N");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("a grace period");
    assert!(
        pre_stop + config.timeouts.drain.as_secs() < grace,
        "preStop {pre_stop} s + drain {:?} must fit in terminationGracePeriodSeconds {grace}",
        config.timeouts.drain
    );

    // The probes: /healthz needs no token; /readyz is asked with it, on the admin port.
    let live = &c["livenessProbe"]["httpGet"];
    assert_eq!(live["path"], "/healthz");
    assert_eq!(live["port"], "admin");
    let (shell, script) = readiness_script(c);
    assert_eq!(shell, "/bin/bash");
    for part in [
        format!("/dev/tcp/127.0.0.1/{}", config.admin.port()),
        "GET /readyz ".into(),
        "Authorization: Bearer %s".into(),
        "\"$SHARDGATE_ADMIN_TOKEN\"".into(),
    ] {
        assert!(
            script.contains(&part),
            "the readiness probe lacks {part:?}: {script}"
        );
    }
}

#[test]
fn the_image_runs_what_the_manifests_expect() {
    let objects = objects(&parsed());
    let (d, c) = gateway_container(&objects);
    let docker = read(Path::new("deploy/Dockerfile"));
    let lines: Vec<&str> = docker
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let from: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert!(from.len() >= 2, "a multi-stage build: {from:?}");
    assert!(
        from[0].contains("rust:"),
        "built with a Rust image: {}",
        from[0]
    );
    // The readiness probe runs /bin/bash and preStop runs sleep: a Debian base has both.
    let runtime = from.last().expect("a runtime stage");
    assert!(
        runtime.starts_with("FROM debian:"),
        "runtime stage {runtime}"
    );
    let builds: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("cargo build"))
        .collect();
    assert!(!builds.is_empty());
    for &i in &builds {
        assert!(
            lines[i].contains("--release") && lines[i].contains("--locked"),
            "{}",
            lines[i]
        );
    }
    // No protoc package: .cargo/config.toml's PROTOC (tools/run-protoc) is there first.
    assert!(!docker
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("protobuf-compiler")));
    for needed in [
        "COPY .cargo .cargo",
        "COPY tools tools",
        "COPY benches benches",
    ] {
        let at = lines
            .iter()
            .position(|l| *l == needed)
            .unwrap_or(usize::MAX);
        assert!(at < builds[0], "`{needed}` before the first cargo build");
    }
    // Cargo wants every declared bench and example file: they are all under benches/.
    let manifest: toml::Value = toml::from_str(&read(Path::new("Cargo.toml"))).expect("Cargo.toml");
    for b in manifest["bench"].as_array().cloned().unwrap_or_default() {
        let name = b["name"].as_str().unwrap_or("");
        let path = b
            .get("path")
            .and_then(|p| p.as_str())
            .map(str::to_owned)
            .unwrap_or(format!("benches/{name}.rs"));
        assert!(path.starts_with("benches/"), "bench {name} at {path}");
    }
    for e in manifest["example"].as_array().cloned().unwrap_or_default() {
        let path = e["path"].as_str().unwrap_or("");
        assert!(
            path.starts_with("benches/"),
            "example at {path} is not copied before the dependency build"
        );
    }
    // Every COPY source exists.
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(deploy_support::repo().join(src).exists(), "{l}: no {src}");
        }
    }
    let binary = c["command"][0].as_str().unwrap_or("");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("COPY --from=build") && l.ends_with(binary)),
        "the image installs {binary}, which the Deployment runs"
    );
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    let uid = d.pod()["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser");
    assert_eq!(
        user.split(':').next(),
        Some(uid.to_string().as_str()),
        "USER = runAsUser"
    );

    // The image the manifests name is the one `make image` tags.
    let make = read(Path::new("Makefile"));
    assert!(
        make.contains("IMAGE_REPO ?= shardgate\n"),
        "Makefile IMAGE_REPO"
    );
    assert!(
        make.contains("IMAGE ?= $(IMAGE_REPO):$(VERSION)\n"),
        "Makefile IMAGE"
    );
    assert!(
        make.contains("\t$(DOCKER) build -f deploy/Dockerfile -t $(IMAGE) .\n"),
        "make image"
    );
    assert!(
        make.contains("image-push: image\n\t$(DOCKER) push $(IMAGE)\n"),
        "make image-push"
    );
    assert_eq!(
        c["image"].as_str(),
        Some(format!("shardgate:{}", env!("CARGO_PKG_VERSION")).as_str()),
        "the Deployment runs the image of this version"
    );
    let ignore = read(Path::new(".dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        ".dockerignore keeps target/ out"
    );
}

#[test]
fn the_readme_names_every_deploy_file() {
    let readme = read(Path::new("deploy/README.md"));
    let missing: Vec<String> = deploy_support::files_under(&deploy_support::deploy_dir())
        .iter()
        .filter_map(|p| {
            p.strip_prefix("deploy")
                .ok()
                .map(|p| p.display().to_string())
        })
        .filter(|p| p != "README.md" && !readme.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/README.md does not mention {missing:?}"
    );
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_scrape_alerts_and_dashboard_work_against_a_running_gateway() {
    let loaded = parsed();
    let objects = objects(&loaded);
    let token = admin_token(&objects);
    let (d, c) = gateway_container(&objects);
    let manifest_admin_port = k8s::container_ports(d)["admin"];
    let t = token.clone();
    let cluster = Cluster::start_with(Options {
        cache_dir: true,
        // A fence long enough to see a fenced write however slow the machine is.
        extra_toml: "\n[failover]\nfence_ms = 8000\n".into(),
        tweak: support::ConfigTweak::new(move |c| c.admin_token = Some(t.clone())),
        ..Options::default()
    })
    .await;
    let admin = cluster.admin();
    let auth = bearer(&token);
    let admin_get = |path: &str, token: Option<&str>| {
        let headers: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
        support::send(admin, get(path, &headers))
    };

    // Liveness: the manifest's httpGet, no token.
    let live_path = c["livenessProbe"]["httpGet"]["path"].as_str().unwrap_or("");
    assert_eq!(admin_get(live_path, None).await.status, StatusCode::OK);
    // Readiness cannot be an httpGet without writing the token into the manifest ...
    assert_eq!(
        admin_get("/readyz", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    // ... so the exec probe asks with the token from the environment: run it as the kubelet would.
    let (shell, script) = readiness_script(c);
    let script_here = script.replace(
        &format!("/dev/tcp/127.0.0.1/{manifest_admin_port}"),
        &format!("/dev/tcp/127.0.0.1/{}", admin.port()),
    );
    assert_ne!(script, script_here, "the probe names the admin port");
    let probe = |token: String| {
        let (shell, script) = (shell.clone(), script_here.clone());
        async move {
            let status = tokio::process::Command::new(&shell)
                .arg("-c")
                .arg(&script)
                .env("SHARDGATE_ADMIN_TOKEN", token)
                .kill_on_drop(true)
                .status();
            within(Duration::from_secs(10), "the readiness probe", status)
                .await
                .expect("run the readiness probe")
        }
    };
    assert!(
        probe(token.clone()).await.success(),
        "ready gateway, right token: probe passes"
    );
    assert!(
        !probe("wrong".into()).await.success(),
        "wrong token: probe fails"
    );

    // Traffic and events, so that families and label values appear.
    for key in ["u-1", "u-2", "u-3", "u-4"] {
        let r = cluster.send(get("/orders", &[("x-user-id", key)])).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = cluster.send(get("/dead", &[("x-user-id", "u-1")])).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    // A drain of gz (home of shards 0-63): its writes are fenced during phase 1.
    let (status, body) = shardgate::operator::admin_client::post_json(
        &format!("http://{admin}"),
        "/override/idc/gz",
        Some(&token),
        &json!({"state": "draining", "reason": "deploy test", "by": "tests"}),
        Duration::from_secs(10),
    )
    .await
    .expect("drain gz");
    assert!(
        (200..300).contains(&status),
        "{status} {}",
        String::from_utf8_lossy(&body)
    );
    let key = &keys_where("deploy", 1, |s| s.0 <= 63)[0];
    let r = cluster
        .send(request(
            Method::POST,
            "/orders",
            &[("x-user-id", key)],
            "{}",
        ))
        .await;
    assert_eq!(
        r.header("x-shardgate-reason"),
        Some("fenced"),
        "{}",
        r.text()
    );
    // An invalid topology: rejected, counted.
    cluster.write_topology("this is not = [a topology");

    // The scrape, as the ServiceMonitor does it.
    let monitor = k8s::find(&objects, "ServiceMonitor", "shardgate").expect("the ServiceMonitor");
    let path = monitor.v["spec"]["endpoints"][0]["path"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let scrape = || async {
        let r = admin_get(&path, Some(&auth)).await;
        assert_eq!(r.status, StatusCode::OK);
        r.text()
    };
    assert_eq!(
        admin_get(&path, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let text = support::eventually("the invalid topology to be counted", || async {
        let text = scrape().await;
        text.contains("shardgate_topology_reloads_total{result=\"invalid\"}")
            .then_some(text)
    })
    .await;

    let ex = Exports {
        registered: registered(),
        live: Families::parse(&text),
        event_only: EVENT_ONLY.into_iter().collect(),
        jobs: k8s::scraped_services(&objects),
    };
    let mut problems = Vec::new();
    for (family, why) in EVENT_ONLY {
        if ex.live.sampled.contains(family) {
            problems.push(format!(
                "{family} was exported live: drop it from EVENT_ONLY ({why})"
            ));
        }
        if !ex.registered.types.contains_key(family) {
            problems.push(format!("{family} is not registered"));
        }
    }
    for f in ex.registered.types.keys() {
        if !ex.live.sampled.contains(f) && !ex.event_only.contains_key(f.as_str()) {
            problems.push(format!("{f} never appeared on the running gateway"));
        }
    }
    let (rules, dashboard) = rules_and_dashboard(&loaded);
    problems.extend(metric_problems(&rules, &dashboard, &ex));
    assert!(
        problems.is_empty(),
        "{}\n\nexported:\n{text}",
        problems.join("\n")
    );
    cluster.stop().await;
}

/// Each mutation breaks one thing in the rules or the dashboard; the checks must name it.
#[test]
fn broken_rules_and_panels_are_caught() {
    let loaded = parsed();
    let ex = offline_exports(&objects(&loaded));
    let (rules, dashboard) = rules_and_dashboard(&loaded);
    let base = metric_problems(&rules, &dashboard, &ex);
    assert!(base.is_empty(), "{}", base.join("\n"));

    type Edit = fn(&mut Value, &mut Value);
    fn alert<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
        v["groups"]
            .as_array_mut()
            .expect("groups")
            .iter_mut()
            .flat_map(|g| g["rules"].as_array_mut().expect("rules").iter_mut())
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
    }
    fn panel<'a>(d: &'a mut Value, title: &str) -> &'a mut Value {
        d["panels"]
            .as_array_mut()
            .expect("panels")
            .iter_mut()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title}"))
    }
    fn edit_expr(v: &mut Value, from: &str, to: &str) {
        let e = v["expr"].as_str().expect("expr").replace(from, to);
        assert_ne!(v["expr"], json!(e), "{from} is in {}", v["expr"]);
        v["expr"] = json!(e);
    }
    let cases: Vec<(Edit, &str)> = vec![
        (
            |r, _| {
                alert(r, "ShardgateIdcDown")
                    .as_object_mut()
                    .expect("a rule")
                    .remove("for");
            },
            "no `for:` duration",
        ),
        (
            |r, _| {
                edit_expr(
                    alert(r, "ShardgateIdcDown"),
                    "shardgate_idc_state",
                    "shardgate_idc_status",
                )
            },
            "`shardgate_idc_status` is not a metric the gateway registers",
        ),
        (
            |r, _| edit_expr(alert(r, "ShardgateBreakerOpen"), "idc, set)", "idc, pool)"),
            "aggregates by/without `pool`",
        ),
        (
            |r, _| edit_expr(alert(r, "ShardgateFencedWrites"), "\"fenced\"", "\"fence\""),
            "no such value seen",
        ),
        (
            |r, _| {
                edit_expr(
                    alert(r, "ShardgateScrapeFailing"),
                    "shardgate-admin",
                    "shardgate",
                )
            },
            "no scraped Service has that name",
        ),
        (
            |r, _| edit_expr(alert(r, "ShardgateSelfFenced"), "== 1", "== )"),
            "does not parse",
        ),
        (
            |r, _| alert(r, "ShardgateIdcDown")["labels"]["severity"] = json!("page"),
            "is not critical, warning or info",
        ),
        (
            |r, _| {
                alert(r, "ShardgateIdcDown")["annotations"]["runbook_url"] =
                    json!("docs/operations.md#no-such-heading")
            },
            "has no heading with anchor #no-such-heading",
        ),
        (
            |r, _| {
                alert(r, "ShardgateIdcDown")["annotations"]["summary"] =
                    json!("route {{ $labels.route }}")
            },
            "uses $labels.route",
        ),
        (
            |_, d| {
                edit_expr(
                    &mut panel(d, "p99 latency by route")["targets"][0],
                    "sum by (le, route)",
                    "sum by (route)",
                )
            },
            "without an `le` label",
        ),
        (
            |_, d| {
                edit_expr(
                    &mut panel(d, "Shards served by IDC")["targets"][0],
                    "$namespace",
                    "$cluster",
                )
            },
            "unknown dashboard variable `$cluster`",
        ),
        (
            |_, d| {
                panel(d, "Shards served by IDC")["targets"][0]["legendFormat"] = json!("{{route}}")
            },
            "legend uses {{route}}",
        ),
        (
            |_, d| panel(d, "Self-fenced gateways")["datasource"]["uid"] = json!("prom-1"),
            "datasource is not the dashboard's Prometheus variable",
        ),
        (
            |_, d| {
                let panels = d["panels"].as_array_mut().expect("panels");
                panels.retain(|p| p["title"] != "Background task failures");
            },
            "no panel shows shardgate_task_failures",
        ),
        (
            |r, _| {
                r["groups"]
                    .as_array_mut()
                    .expect("groups")
                    .retain(|g| g["name"] != "shardgate.fencing")
            },
            "no alert uses shardgate_self_fenced",
        ),
    ];
    for (i, (edit, expected)) in cases.into_iter().enumerate() {
        let (mut r, mut d) = (rules.clone(), dashboard.clone());
        edit(&mut r, &mut d);
        let problems = metric_problems(&r, &d, &ex);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "case {i}: expected a problem containing {expected:?}, got {problems:#?}"
        );
    }
}
