//! The operator commands that talk to the cluster through etcd (DESIGN.md §7): `push`,
//! `degrade`, and the `--etcd` forms of `status` and `explain`. Each prints what it did, or
//! why not, and returns its exit code (1 refused · 2 usage · 3 conflict · 4 unreachable ·
//! 5 timed out).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::{exit, report_explain, runtime, ExplainArgs};
use crate::control::etcd::{ClusterKeys, EtcdAccess, DEFAULT_TIMEOUT};
use crate::control::topology::overrides::unix_now;
use crate::control::topology::{DegradeOverride, Overrides, RawTopology, Shard};
use crate::operator::cluster::{
    self as cluster, build_effective, check_degrade_target, live_topology, plan_push, EtcdCluster,
    OpError, PushPlan,
};

#[derive(Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// Talk to the cluster through etcd (endpoints, comma-separated) instead of a gateway's
    /// admin API.
    #[arg(long, value_delimiter = ',', env = "SHARDGATE_ETCD")]
    pub etcd: Vec<String>,
    /// Cluster name under /shardgate/ in etcd.
    #[arg(long, env = "SHARDGATE_CLUSTER")]
    pub cluster: Option<String>,
    #[command(flatten)]
    pub security: EtcdSecurityArgs,
}

/// TLS and auth towards etcd, shared by `serve` and the operator commands.
#[derive(Args, Debug, Clone, Default)]
pub struct EtcdSecurityArgs {
    /// CA bundle (PEM) that signs etcd's server certificate: turns on TLS to etcd
    /// (https:// endpoints).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for etcd's client-certificate auth.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd auth); the password is read from SHARDGATE_ETCD_PASSWORD, never from a
    /// flag (flags are visible to every user in `ps`).
    #[arg(long)]
    pub etcd_user: Option<String>,
}

/// The etcd password from the environment, if set and not empty.
pub fn password_from_env() -> Option<crate::control::etcd::Password> {
    std::env::var(crate::control::etcd::PASSWORD_ENV)
        .ok()
        .filter(|p| !p.is_empty())
        .map(crate::control::etcd::Password)
}

impl EtcdArgs {
    pub fn given(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// Endpoints, TLS and credentials, with every problem in them listed.
    pub fn access(&self) -> Result<EtcdAccess, String> {
        let s = &self.security;
        let access = EtcdAccess {
            endpoints: self.etcd.clone(),
            ca: s.etcd_ca.clone(),
            cert: s.etcd_cert.clone(),
            key: s.etcd_key.clone(),
            user: s.etcd_user.clone().filter(|u| !u.is_empty()),
            password: password_from_env(),
        };
        let problems = access.problems();
        if problems.is_empty() {
            Ok(access)
        } else {
            Err(problems.join("; "))
        }
    }
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The topology TOML file.
    pub file: PathBuf,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Validate and show the diff, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Refuse when more than this percentage of shards would change serving IDC.
    #[arg(long, default_value = "25", value_parser = parse_percent)]
    pub max_move: f64,
    /// Push even when more than --max-move of the shards would move.
    #[arg(long)]
    pub force: bool,
    /// Write only if the live document is still at this mod_revision (as `--dry-run` shows),
    /// so a reviewed diff is the diff that gets applied.
    #[arg(long)]
    pub if_revision: Option<i64>,
    /// Return when every registered gateway serves the new revision (exit 5 after --timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct DegradeArgs {
    /// A set name (`noncore`) or `route:<name>`.
    pub target: String,
    /// Turn the switch on or off.
    #[arg(value_enum)]
    pub switch: Switch,
    /// Why (kept with the override).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who [default: $USER].
    #[arg(long)]
    pub by: Option<String>,
    /// Degrade `core`, or a non-degradable set or route, anyway.
    #[arg(long)]
    pub force: bool,
    /// Return when every registered gateway serves the change (exit 5 after --timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Without --etcd: the admin API of a gateway on a file topology.
    #[command(flatten)]
    pub admin: super::AdminArgs,
}

/// `30s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(|v| Duration::from_secs_f64(v * scale))
        .ok_or_else(|| format!("`{text}` is not a duration like 30s, 500ms or 2m"))
}

/// `25` or `25%`, between 0 and 100.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    text.trim()
        .trim_end_matches('%')
        .parse::<f64>()
        .ok()
        .filter(|v| (0.0..=100.0).contains(v))
        .ok_or_else(|| format!("`{text}` is not a percentage between 0 and 100"))
}

pub(super) fn code(command: &str, e: &OpError) -> u8 {
    eprintln!("shardgate {command}: {e}");
    match e {
        OpError::Unreachable(_) => exit::UNREACHABLE,
        OpError::Refused(_) => exit::REFUSED,
        OpError::Conflict { .. } | OpError::Changed(_) => exit::CONFLICT,
        OpError::TimedOut(_) => exit::TIMED_OUT,
    }
}

/// Runs an operator command against the cluster named by `args`.
pub(super) fn against_cluster<F>(command: &str, args: &EtcdArgs, f: F) -> u8
where
    F: AsyncFnOnce(EtcdCluster) -> u8,
{
    let Some(cluster) = args.cluster.as_deref().filter(|c| !c.is_empty()) else {
        eprintln!("shardgate {command}: give --etcd URL and --cluster NAME");
        return exit::USAGE;
    };
    if !args.given() {
        eprintln!("shardgate {command}: give --etcd URL (and --cluster NAME)");
        return exit::USAGE;
    }
    let access = match args.access() {
        Ok(a) => a,
        Err(problems) => {
            eprintln!("shardgate {command}: {problems}");
            return exit::USAGE;
        }
    };
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardgate {command}: cannot start the runtime: {e}");
            return exit::REFUSED;
        }
    };
    rt.block_on(async {
        match EtcdCluster::open(&access, cluster, DEFAULT_TIMEOUT).await {
            Ok(c) => f(c).await,
            Err(e) => code(command, &e),
        }
    })
}

pub fn push(args: PushArgs) -> u8 {
    let file = args.file.display().to_string();
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("shardgate push: cannot read {file}: {e}");
            return exit::REFUSED;
        }
    };
    // Validate before talking to etcd: a document with problems never reaches it.
    let local = RawTopology::parse(&text)
        .and_then(|doc| build_effective(doc, &Overrides::default(), 0, None));
    if let Err(problems) = local {
        eprintln!("{file}: invalid, nothing written. {problems}");
        return exit::REFUSED;
    }
    against_cluster("push", &args.etcd, async |c| {
        let listed = match c.read().await {
            Ok(l) => l,
            Err(e) => return code("push", &e),
        };
        let plan = match plan_push(c.keys(), c.name(), &listed, &text) {
            Ok(p) => p,
            Err(problems) => {
                eprintln!("{file}: refused, nothing written. {problems}");
                return exit::REFUSED;
            }
        };
        print_plan(&c, &listed, &plan);
        if plan.unchanged && args.if_revision.is_none() {
            println!("the live document is already this one: nothing to push");
            return exit::OK;
        }
        if plan.moved_percent > args.max_move && !args.force {
            eprintln!(
                "shardgate push: refused, nothing written: {:.1}% of shards would change serving IDC, more than --max-move {}%; check the diff above and push with --force to do it",
                plan.moved_percent, args.max_move
            );
            return exit::REFUSED;
        }
        let base = args.if_revision.unwrap_or(plan.base);
        if args.dry_run {
            println!(
                "dry run: nothing written (to write onto exactly this document: push --if-revision {base})"
            );
            return exit::OK;
        }
        let revision = match c.write_topology(&text, base).await {
            Ok(r) => r,
            Err(e) => return code("push", &e),
        };
        println!(
            "pushed {file} to {} at revision {revision}",
            c.keys().topology()
        );
        if args.wait {
            wait(&c, "push", revision, args.timeout).await
        } else {
            exit::OK
        }
    })
}

fn print_plan(c: &EtcdCluster, listed: &ClusterKeys, plan: &PushPlan) {
    println!(
        "cluster {} at {} (revision {})",
        c.name(),
        c.endpoints(),
        listed.revision
    );
    let Some(diff) = &plan.diff else {
        match &plan.live_problem {
            Some(p) => println!(
                "the live document (mod_revision {}) is not usable, so no diff: {p}",
                plan.base
            ),
            None => println!("first push to this cluster: no live document, no shard moves"),
        }
        print_home_shards(plan);
        return;
    };
    println!("against the live document (mod_revision {}):", plan.base);
    if diff.is_empty() {
        println!("  no change in routes, IDCs, settings or shard ownership");
        return;
    }
    let list = |label: &str, v: &[String]| {
        if !v.is_empty() {
            println!("  {label}: {}", v.join(", "));
        }
    };
    list("routes added", &diff.routes_added);
    list("routes removed", &diff.routes_removed);
    list("routes changed", &diff.routes_changed);
    list("IDCs added", &diff.idcs_added);
    list("IDCs removed", &diff.idcs_removed);
    list("settings changed", &diff.settings_changed);
    if let Some((a, b)) = diff.shard_count {
        println!("  shard_count: {a} -> {b} (every key moves)");
    }
    println!(
        "  shards changing serving IDC: {} of {} ({:.1}%)",
        diff.shards_moved(),
        plan.new.shard_count,
        plan.moved_percent
    );
    for ((from, to), n) in &diff.moved {
        let ranges = plan
            .moved_ranges
            .get(&(from.clone(), to.clone()))
            .map(|r| show_ranges(r))
            .unwrap_or_default();
        println!("    {from:>6} -> {to:<6} {n:>7}  {ranges}");
    }
}

fn print_home_shards(plan: &PushPlan) {
    let t = &plan.new;
    let served: Vec<String> = t
        .idcs
        .iter()
        .zip(t.shards_served())
        .map(|(i, n)| format!("{} {n}", i.name))
        .collect();
    println!(
        "  {} IDCs, {} routes, {} shards (served: {})",
        t.idcs.len(),
        t.routes.len(),
        t.shard_count,
        served.join(", ")
    );
}

fn show_ranges(ranges: &[(u32, u32)]) -> String {
    const SHOWN: usize = 6;
    let mut parts: Vec<String> = ranges
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if ranges.len() > SHOWN {
        parts.push(format!("… ({} ranges)", ranges.len()));
    }
    parts.join(", ")
}

pub(super) async fn wait(c: &EtcdCluster, command: &str, revision: i64, limit: Duration) -> u8 {
    println!(
        "waiting up to {} ms for every registered gateway to serve revision {revision}",
        limit.as_millis()
    );
    let progress = |p: &cluster::WaitProgress| {
        let behind: Vec<String> = p
            .behind
            .iter()
            .map(|(i, r)| format!("{i} at {r}"))
            .collect();
        if behind.is_empty() {
            println!(
                "  {}/{} gateways at revision >= {}",
                p.applied, p.gateways, p.revision
            );
        } else {
            println!(
                "  {}/{} gateways at revision >= {} (behind: {})",
                p.applied,
                p.gateways,
                p.revision,
                behind.join(", ")
            );
        }
    };
    match c.wait_applied(revision, limit, progress).await {
        Ok(p) if p.gateways == 0 => {
            println!("no gateway is registered: nothing to wait for");
            exit::OK
        }
        Ok(p) => {
            println!("all {} gateways serve revision {revision}", p.gateways);
            exit::OK
        }
        Err(e) => code(command, &e),
    }
}

pub fn degrade(args: DegradeArgs) -> u8 {
    against_cluster("degrade", &args.etcd, async |c| {
        let listed = match c.read().await {
            Ok(l) => l,
            Err(e) => return code("degrade", &e),
        };
        let live = match live_topology(c.keys(), &listed) {
            Ok(t) => t,
            Err(p) => {
                eprintln!("shardgate degrade: refused: no valid topology in etcd to check `{}` against: {p}", args.target);
                return exit::REFUSED;
            }
        };
        let on = args.switch == Switch::On;
        // Turning a switch off is always allowed; only turning one on needs the checks.
        if let Err(why) = check_degrade_target(&live, &args.target, args.force || !on) {
            eprintln!("shardgate degrade: refused, nothing written: {why}");
            return exit::REFUSED;
        }
        let value = DegradeOverride {
            on,
            reason: args.reason.clone(),
            by: args
                .by
                .clone()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default(),
            at: unix_now(),
        };
        let revision = match c.write_degrade(&args.target, &value).await {
            Ok(r) => r,
            Err(e) => return code("degrade", &e),
        };
        println!(
            "degrade {} {} at revision {revision} ({})",
            args.target,
            if on { "on" } else { "off" },
            c.keys().degrade_override(&args.target)
        );
        if args.wait {
            wait(&c, "degrade", revision, args.timeout).await
        } else {
            exit::OK
        }
    })
}

pub fn explain(args: ExplainArgs) -> u8 {
    against_cluster("explain", &args.etcd, async |c| {
        let listed = match c.read().await {
            Ok(l) => l,
            Err(e) => return code("explain", &e),
        };
        let t = match live_topology(c.keys(), &listed) {
            Ok(t) => t,
            Err(p) => {
                eprintln!("shardgate explain: no valid topology in etcd: {p}");
                return exit::REFUSED;
            }
        };
        report_explain(
            crate::operator::admin::explain_json(&t, &args.key, args.route.as_deref()),
            args.admin.json,
        )
    })
}

/// The cluster as `status --etcd --json` shows it.
pub fn status_json(c: &EtcdCluster, listed: &ClusterKeys) -> Value {
    let keys = c.keys();
    let live = live_topology(keys, listed);
    let content = listed.content_revision();
    let (idcs, problem) = match &live {
        Ok(t) => {
            let served = t.shards_served();
            let mut home = vec![0u32; t.idcs.len()];
            for s in 0..t.shard_count {
                home[t.home(Shard(s)).0 as usize] += 1;
            }
            let idcs: Vec<Value> = t
                .idcs
                .iter()
                .enumerate()
                .map(|(i, idc)| {
                    json!({
                        "name": idc.name.as_str(),
                        "state": idc.state.as_str(),
                        "reason": idc.state_reason,
                        "weight": idc.weight,
                        "shards_home": home[i],
                        "shards_served": served[i],
                    })
                })
                .collect();
            (idcs, None)
        }
        Err(p) => (Vec::new(), Some(p.to_string())),
    };
    let overrides = listed.overrides(keys).unwrap_or_default();
    let overrides: Vec<Value> = overrides
        .idcs
        .iter()
        .map(|(idc, o)| json!({"target": format!("idc/{idc}"), "value": o}))
        .chain(
            overrides
                .degrade
                .iter()
                .map(|(t, o)| json!({"target": format!("degrade/{t}"), "value": o})),
        )
        .collect();
    let moves = listed.overrides(keys).map_or_else(
        |_| {
            listed
                .moves()
                .into_iter()
                .map(|(id, v)| json!({"id": id, "value": v}))
                .collect()
        },
        |o| crate::control::moves::status_json(&o, crate::util::unix_now_ms()),
    );
    let gateways: Vec<Value> = listed
        .gateways()
        .into_iter()
        .map(|(instance, record)| match record {
            Ok(r) => json!({
                "instance": instance,
                "idc": r.idc,
                "addr": r.addr,
                "admin": r.admin,
                "applied_revision": r.applied_revision,
                "behind": (r.applied_revision as i64) < content,
                "view": r.view,
            }),
            Err(e) => json!({"instance": instance, "error": e, "behind": true}),
        })
        .collect();
    json!({
        "cluster": c.name(),
        "revision": listed.revision,
        "content_revision": content,
        "document_revision": listed.topology().map(|s| s.mod_revision),
        "source": {"kind": "etcd", "endpoints": c.endpoints()},
        "problem": problem,
        "idcs": idcs,
        "overrides": overrides,
        "moves": moves,
        "gateways": gateways,
        "leader": listed.leader(),
    })
}

pub fn status(args: &EtcdArgs, json_out: bool) -> u8 {
    against_cluster("status", args, async |c| {
        let listed = match c.read().await {
            Ok(l) => l,
            Err(e) => return code("status", &e),
        };
        let v = status_json(&c, &listed);
        if json_out {
            println!("{v}");
        } else {
            print_status(&v);
        }
        exit::OK
    })
}

fn print_status(v: &Value) {
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "cluster {}  revision {}  topology changed at {}  etcd {}",
        s(&v["cluster"]),
        s(&v["revision"]),
        s(&v["content_revision"]),
        s(&v["source"]["endpoints"])
    );
    println!("failover leader: {}", s(&v["leader"]));
    if let Some(p) = v["problem"].as_str() {
        println!("no usable topology: {p}");
    }
    let idcs = v["idcs"].as_array().cloned().unwrap_or_default();
    if !idcs.is_empty() {
        println!();
        println!(
            "{:<10} {:<10} {:>6} {:>12} {:>14}  REASON",
            "IDC", "STATE", "WEIGHT", "HOME SHARDS", "SERVED SHARDS"
        );
        for idc in &idcs {
            println!(
                "{:<10} {:<10} {:>6} {:>12} {:>14}  {}",
                s(&idc["name"]),
                s(&idc["state"]),
                s(&idc["weight"]),
                s(&idc["shards_home"]),
                s(&idc["shards_served"]),
                s(&idc["reason"]),
            );
        }
    }
    println!();
    super::operator::print_overrides_and_moves(v);
    println!();
    let gateways = v["gateways"].as_array().cloned().unwrap_or_default();
    if gateways.is_empty() {
        println!("gateways: none registered");
        return;
    }
    println!(
        "{:<28} {:<6} {:<22} {:>8}",
        "GATEWAY", "IDC", "ADDRESS", "APPLIED"
    );
    for g in &gateways {
        println!(
            "{:<28} {:<6} {:<22} {:>8}{}",
            s(&g["instance"]),
            s(&g["idc"]),
            s(&g["addr"]),
            s(&g["applied_revision"]),
            if g["behind"].as_bool() == Some(true) {
                "  BEHIND"
            } else {
                ""
            }
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn durations_and_percentages() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_percent("25%"), Ok(25.0));
        assert!(parse_percent("101").is_err());
    }

    #[test]
    fn ranges_are_shortened() {
        assert_eq!(show_ranges(&[(0, 3), (7, 7)]), "0-3, 7");
        let many: Vec<(u32, u32)> = (0..10).map(|i| (i * 2, i * 2)).collect();
        assert!(show_ranges(&many).ends_with("(10 ranges)"));
    }
}
