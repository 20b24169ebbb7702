//! Operator IDC control (DESIGN.md §7): `drain IDC`, `failover IDC`, `restore IDC [--warmup]`
//! and `move RANGE --to IDC`, through etcd (`--etcd URL --cluster NAME`) or a file-mode
//! gateway's admin API (`--admin URL`). The checks are `crate::control::moves`'s in both modes; a
//! refusal exits 1 with the reason, `--wait` reports progress (exit 5 on timeout).

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::etcd::{against_cluster, code, parse_duration, EtcdArgs};
use super::{exit, runtime, AdminArgs};
use crate::control::moves::{self, majority_view, HealthView, Operator, Refused};
use crate::operator::cluster::writes::{self, MoveProgress};
use crate::operator::cluster::{live_topology, EtcdCluster, OpError};

/// What every operator command takes.
#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Why (kept with the override or move record).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who [default: $USER].
    #[arg(long)]
    pub by: Option<String>,
    /// How long --wait waits (e.g. 60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Without --etcd: the admin API of a gateway on a file topology.
    #[command(flatten)]
    pub admin: AdminArgs,
}

impl OperatorArgs {
    fn by(&self) -> String {
        self.by
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default()
    }
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The IDC to drain: its shards leave behind a write fence.
    pub idc: String,
    /// Return when the drain is applied and every live gateway serves the new owners.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub common: OperatorArgs,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The IDC to mark down: its shards' reads leave at once; their writes are fenced until
    /// every live gateway stopped writing to it and fence_ms passed.
    pub idc: String,
    /// Skip the write fence: writes go to the new owners at once. Only for an IDC proven dead
    /// (powered off, cut off from every client): if it still takes writes, a shard may get two
    /// writers.
    #[arg(long)]
    pub force_unfenced: bool,
    /// Return when the fence is lifted and every live gateway serves the change.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub common: OperatorArgs,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The IDC to bring back: its home shards return in steps.
    pub idc: String,
    /// Warm-up for this restore (e.g. 60s, 5m); 0 brings every home shard back in one fenced
    /// step [default: the topology's failover.warmup_s].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Return when every live gateway serves the change.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub common: OperatorArgs,
}

#[derive(Args, Debug)]
pub struct MoveArgs {
    /// Inclusive shard range (`0-63`, or one shard `7`).
    pub range: String,
    /// The new owner of the range.
    #[arg(long)]
    pub to: String,
    /// Return when the move is applied and every live gateway serves the new owner.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub common: OperatorArgs,
}

/// One operator command, whichever way it travels.
#[derive(Debug, Clone)]
enum Action {
    Drain(String),
    /// The IDC, and whether the write fence is skipped (`--force-unfenced`).
    Failover(String, bool),
    Restore(String, Option<Duration>),
    Move(String, String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Drain(_) => "drain",
            Action::Failover(..) => "failover",
            Action::Restore(..) => "restore",
            Action::Move(..) => "move",
        }
    }
}

pub fn drain(a: DrainArgs) -> u8 {
    run(Action::Drain(a.idc), a.wait, &a.common)
}

pub fn failover(a: FailoverArgs) -> u8 {
    run(Action::Failover(a.idc, a.force_unfenced), a.wait, &a.common)
}

pub fn restore(a: RestoreArgs) -> u8 {
    run(Action::Restore(a.idc, a.warmup), a.wait, &a.common)
}

pub fn move_range(a: MoveArgs) -> u8 {
    run(Action::Move(a.range, a.to), a.wait, &a.common)
}

fn run(action: Action, wait: bool, args: &OperatorArgs) -> u8 {
    if args.etcd.given() {
        against_cluster(action.name(), &args.etcd, async |c| {
            etcd_action(&c, &action, wait, args).await
        })
    } else {
        let Ok(rt) = runtime(1) else {
            eprintln!("shardgate {}: cannot start the runtime", action.name());
            return exit::REFUSED;
        };
        rt.block_on(super::operator_admin::admin_action(
            &action_parts(&action),
            wait,
            args,
        ))
    }
}

/// The action as the admin-mode half sees it (kept apart so each file stays small).
pub(super) struct Parts {
    pub command: &'static str,
    pub idc: Option<String>,
    pub warmup: Option<Duration>,
    pub range: Option<String>,
    pub to: Option<String>,
    pub unfenced: bool,
}

fn action_parts(a: &Action) -> Parts {
    let mut p = Parts {
        command: a.name(),
        idc: None,
        warmup: None,
        range: None,
        to: None,
        unfenced: false,
    };
    match a {
        Action::Drain(i) => p.idc = Some(i.clone()),
        Action::Failover(i, unfenced) => {
            p.idc = Some(i.clone());
            p.unfenced = *unfenced;
        }
        Action::Restore(i, w) => {
            p.idc = Some(i.clone());
            p.warmup = *w;
        }
        Action::Move(r, t) => {
            p.range = Some(r.clone());
            p.to = Some(t.clone());
        }
    }
    p
}

fn refusal(command: &str, r: &Refused) -> u8 {
    eprintln!("shardgate {command}: refused, nothing written: {r}");
    exit::REFUSED
}

/// Prints what a command did: the JSON object with `--json`, else `line`.
pub(super) fn report(json_out: bool, v: &Value, line: &str) {
    if json_out {
        println!("{v}");
    } else {
        println!("{line}");
    }
}

/// Shard ranges for a person: the first few, then a count.
pub(super) fn short_ranges(ranges: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = ranges
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if ranges.len() > SHOWN {
        s.push_str(&format!(", … ({} ranges)", ranges.len()));
    }
    if s.is_empty() {
        s.push_str("none");
    }
    s
}

/// Number of shards in `ranges` (as records keep them). Saturating: a record is JSON from etcd,
/// and its ranges may add up past any table.
pub(super) fn count_shards(ranges: &[String]) -> u32 {
    ranges
        .iter()
        .filter_map(|r| crate::control::topology::parse_range(r, u32::MAX).ok())
        .map(|(a, b)| b - a + 1)
        .fold(0u32, u32::saturating_add)
}

async fn etcd_action(c: &EtcdCluster, action: &Action, wait: bool, args: &OperatorArgs) -> u8 {
    let command = action.name();
    let listed = match c.read().await {
        Ok(l) => l,
        Err(e) => return code(command, &e),
    };
    let t = match live_topology(c.keys(), &listed) {
        Ok(t) => t,
        Err(p) => {
            eprintln!(
                "shardgate {command}: refused: no valid topology in etcd to check against: {p}"
            );
            return exit::REFUSED;
        }
    };
    let op = Operator::now(&args.reason, &args.by());
    let json_out = args.admin.json;
    match action {
        Action::Failover(idc, unfenced) => {
            let (value, record) = match moves::plan_failover(&t, idc, *unfenced, &op) {
                Ok(p) => p,
                Err(r) => return refusal(command, &r),
            };
            let with = record.as_ref().map(|(id, r)| (id.as_str(), r));
            let revision = match writes::write_idc(c, &listed, idc, &value, with).await {
                Ok(r) => r,
                Err(e) => return code(command, &e),
            };
            let Some((id, record)) = record else {
                let line = format!(
                    "failover {idc}: state down at revision {revision} ({}), unfenced: writes go to the new owners at once",
                    c.keys().idc_override(idc)
                );
                report(
                    json_out,
                    &json!({"command": command, "idc": idc, "state": "down", "revision": revision, "override": value, "fenced": false}),
                    &line,
                );
                if !wait {
                    return exit::OK;
                }
                return wait_served(c, command, revision, json_out, args).await;
            };
            let line = format!(
                "failover {idc}: state down, move/{id} fences the writes of its {} shards ({}) at revision {revision}\n\
                 reads go to the next IDC at once; writes resume there once every live gateway\n\
                 stopped writing to {idc} and fence_ms ({} ms) passed",
                count_shards(&record.ranges),
                short_ranges(&record.ranges),
                t.failover.fence.as_millis()
            );
            let v = json!({"command": command, "idc": idc, "state": "down", "move": id, "ranges": record.ranges, "revision": revision, "fenced": true});
            report(json_out, &v, &line);
            finish_etcd(c, command, &id, wait, args).await
        }
        Action::Restore(idc, warmup) => {
            let value = match moves::plan_restore(&t, idc, *warmup, &op) {
                Ok(v) => v,
                Err(r) => return refusal(command, &r),
            };
            let revision = match writes::write_idc(c, &listed, idc, &value, None).await {
                Ok(r) => r,
                Err(e) => return code(command, &e),
            };
            let line = format!(
                "restore {idc}: state warming at revision {revision} ({}), {}; each step is a fenced move driven by the leader",
                c.keys().idc_override(idc),
                match value.warmup_s {
                    Some(0) => "every home shard in one step".to_owned(),
                    Some(w) => format!("warm-up {w} s"),
                    None => format!("warm-up {} s", t.failover.warmup.as_secs()),
                }
            );
            report(
                json_out,
                &json!({"command": command, "idc": idc, "state": "warming", "revision": revision, "override": value}),
                &line,
            );
            if !wait {
                return exit::OK;
            }
            wait_served(c, command, revision, json_out, args).await
        }
        Action::Drain(idc) => {
            let (value, id, record) = match moves::plan_drain(&t, idc, &op) {
                Ok(p) => p,
                Err(r) => return refusal(command, &r),
            };
            let revision =
                match writes::write_idc(c, &listed, idc, &value, Some((&id, &record))).await {
                    Ok(r) => r,
                    Err(e) => return code(command, &e),
                };
            let line = format!(
                "drain {idc}: state draining, move/{id} fencing {} shards ({}) at revision {revision}\n\
                 writes to them get 503 fenced, reads stay with {idc}; the leader switches owners once\n\
                 every live gateway acknowledged the fence and fence_ms ({} ms) passed",
                count_shards(&record.ranges),
                short_ranges(&record.ranges),
                t.failover.fence.as_millis()
            );
            let v = json!({"command": command, "idc": idc, "move": id, "ranges": record.ranges, "revision": revision});
            report(json_out, &v, &line);
            finish_etcd(c, command, &id, wait, args).await
        }
        Action::Move(range, to) => {
            let view = cluster_view(&listed);
            let (id, record) = match moves::plan_move(&t, range, to, &view, &op) {
                Ok(p) => p,
                Err(r) => return refusal(command, &r),
            };
            let revision = match writes::write_move(c, &listed, &id, &record).await {
                Ok(r) => r,
                Err(e) => return code(command, &e),
            };
            let line = format!(
                "move {range} -> {to}: move/{id} fencing {} shards (from {}) at revision {revision}\n\
                 writes to them get 503 fenced, reads stay with the old owner; the leader switches\n\
                 owners once every live gateway acknowledged the fence and fence_ms passed",
                count_shards(&record.ranges),
                record.from.as_deref().unwrap_or("several IDCs"),
            );
            let v = json!({"command": command, "range": range, "to": to, "move": id, "from": record.from, "revision": revision});
            report(json_out, &v, &line);
            finish_etcd(c, command, &id, wait, args).await
        }
    }
}

/// `--wait` for a change with no move record: every live gateway serves `revision`.
async fn wait_served(
    c: &EtcdCluster,
    command: &str,
    revision: i64,
    json_out: bool,
    args: &OperatorArgs,
) -> u8 {
    if json_out {
        return match c.wait_applied(revision, args.timeout, |_| {}).await {
            Ok(_) => exit::OK,
            Err(e) => code(command, &e),
        };
    }
    super::etcd::wait(c, command, revision, args.timeout).await
}

/// The majority of the live gateways' health views (DESIGN.md §6).
fn cluster_view(listed: &crate::control::etcd::ClusterKeys) -> HealthView {
    let views: Vec<HealthView> = listed
        .gateways()
        .into_iter()
        .filter_map(|(_, r)| r.ok().map(|r| r.view))
        .collect();
    majority_view(&views)
}

async fn finish_etcd(
    c: &EtcdCluster,
    command: &str,
    id: &str,
    wait: bool,
    args: &OperatorArgs,
) -> u8 {
    if !wait {
        return exit::OK;
    }
    let json_out = args.admin.json;
    if !json_out {
        println!(
            "waiting up to {} ms for move/{id} to be applied by every live gateway",
            args.timeout.as_millis()
        );
    }
    let started = Instant::now();
    let result = writes::wait_move(c, id, args.timeout, |p| {
        if json_out {
            return;
        }
        let at = started.elapsed().as_millis();
        match p {
            MoveProgress::Fencing { acked, gateways } => println!(
                "  +{at:>5} ms  fencing: {acked}/{gateways} gateways serve the fence"
            ),
            MoveProgress::Applied {
                revision,
                applied,
                gateways,
            } => println!(
                "  +{at:>5} ms  applied at revision {revision}: {applied}/{gateways} gateways serve the new owner"
            ),
        }
    })
    .await;
    match result {
        Ok(_) => {
            if !json_out {
                println!("{command} done: move/{id} is applied everywhere");
            }
            exit::OK
        }
        Err(e @ OpError::Refused(_)) => {
            eprintln!("shardgate {command}: {e}");
            exit::REFUSED
        }
        Err(e) => code(command, &e),
    }
}

/// The overrides and move records of a `status` answer (admin or etcd), for a person.
pub(super) fn print_overrides_and_moves(v: &Value) {
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let overrides = v["overrides"].as_array().cloned().unwrap_or_default();
    if overrides.is_empty() {
        println!("overrides: none");
    } else {
        println!("overrides:");
        for o in &overrides {
            let val = &o["value"];
            let what = match val.get("state") {
                Some(state) => s(state),
                None => format!("on={}", s(&val["on"])),
            };
            println!(
                "  {:<22} {:<9} by {:<10} reason {}",
                s(&o["target"]),
                what,
                s(&val["by"]),
                s(&val["reason"])
            );
        }
    }
    let moves = v["moves"].as_array().cloned().unwrap_or_default();
    if moves.is_empty() {
        println!("moves: none");
        return;
    }
    println!("moves:");
    println!(
        "  {:<28} {:<8} {:<12} {:<6} {:<6} {:<12} {:>6}  NOTE",
        "ID", "KIND", "SHARDS", "FROM", "TO", "PHASE", "AGE"
    );
    for m in &moves {
        let ranges: Vec<String> = m["ranges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let shards = if ranges.len() == 1 {
            ranges[0].clone()
        } else {
            format!("{} shards", count_shards(&ranges))
        };
        println!(
            "  {:<28} {:<8} {:<12} {:<6} {:<6} {:<12} {:>5}s  {}",
            s(&m["id"]),
            s(&m["kind"]),
            shards,
            s(&m["from"]),
            s(&m["to"]),
            s(&m["phase"]),
            s(&m["age_s"]),
            m["note"].as_str().unwrap_or(""),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shard_counts_of_absurd_records_saturate() {
        let ranges = ["0-4294967294".to_owned(), "0-4294967294".to_owned()];
        assert_eq!(super::count_shards(&ranges), u32::MAX);
        assert_eq!(super::count_shards(&["0-9".into(), "20".into()]), 11);
    }
}
