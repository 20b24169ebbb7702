//! The `shardgate` command line (DESIGN.md §7): parse, call into the library, map the result to
//! an exit code (0 ok · 1 refused/invalid · 2 usage · 3 conflict · 4 unreachable · 5 timeout).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::config::{RawConfig, DEFAULT_ADMIN, DEFAULT_LISTEN};
use crate::control::topology::{self, BuildContext, Overrides};
use crate::telemetry::LogFormat;
use crate::util::encode_query;

mod admin;
mod etcd;
mod operator;
mod operator_admin;
pub use etcd::{DegradeArgs, EtcdArgs, EtcdSecurityArgs, PushArgs};
pub use operator::{DrainArgs, FailoverArgs, MoveArgs, OperatorArgs, RestoreArgs};

#[derive(Parser, Debug)]
#[command(
    name = "shardgate",
    version,
    about = "A multi-IDC active-active routing gateway: sharding key -> shard -> serving IDC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a gateway instance (proxy + admin listeners, topology from a file or etcd).
    Serve(ServeArgs),
    /// Self-contained demo: 3 simulated IDCs on loopback and a gateway on the file topology.
    Demo(DemoArgs),
    /// Validate a topology document: exit 0, or 1 with every problem listed.
    Validate {
        /// The topology TOML file.
        file: PathBuf,
    },
    /// Show a key's shard, home IDC, serving IDC and why (offline with --topology, else live).
    Explain(ExplainArgs),
    /// Show the IDCs (state, shards served), overrides and sets of a running gateway, or of
    /// the cluster with --etcd (with every gateway and its applied revision).
    Status(StatusArgs),
    /// Validate a topology, show what it changes (shards moving), then write it to etcd with
    /// a compare-and-swap.
    Push(PushArgs),
    /// Turn the degrade switch of a set or `route:<name>` on or off (etcd, or a file-mode
    /// gateway's admin API).
    Degrade(DegradeArgs),
    /// Planned drain of an IDC: its shards leave behind a write fence (etcd, or a file-mode
    /// gateway's admin API).
    Drain(DrainArgs),
    /// Emergency failover: mark an IDC down, its shards leave at once.
    Failover(FailoverArgs),
    /// Bring an IDC back: `warming`, its home shards return in steps over --warmup.
    Restore(RestoreArgs),
    /// Planned move of a shard range to another IDC, behind a write fence.
    Move(MoveArgs),
}

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Bootstrap configuration (TOML); the flags below override its fields.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Proxy listener [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin listener [default: 127.0.0.1:9901].
    #[arg(long)]
    pub admin: Option<String>,
    /// Topology file (the file source); reloaded on change and on SIGHUP.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// etcd endpoints, comma-separated (the etcd source).
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Cluster name under /shardgate/ in etcd.
    #[arg(long)]
    pub cluster: Option<String>,
    #[command(flatten)]
    pub etcd_security: EtcdSecurityArgs,
    /// This instance's name in etcd's gateway registry [default: <hostname>:<proxy port>].
    #[arg(long)]
    pub instance: Option<String>,
    /// This instance's IDC (where non-sharded routes go first).
    #[arg(long)]
    pub idc: Option<String>,
    /// Where operator overrides and the last good snapshot are kept.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// TLS certificate chain (PEM); replaces the config's [[tls.certs]]. Reloaded on change
    /// and on SIGHUP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A plain listener answering every request with a 308 redirect to https.
    #[arg(long)]
    pub redirect_http: Option<String>,
    /// Token required by the admin API (Authorization: Bearer).
    #[arg(long, env = "SHARDGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads [default: one per core].
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Topology file [default: config/topology.toml, else the embedded demo topology].
    #[arg(long)]
    pub topology: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// The gateway's admin API.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    pub admin: String,
    /// Admin token.
    #[arg(long, env = "SHARDGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The sharding key (user id, merchant id, order id …).
    pub key: String,
    /// Explain for this route (non-sharded routes go to the local IDC).
    #[arg(long)]
    pub route: Option<String>,
    /// Explain offline against a topology file instead of a live gateway.
    #[arg(long, conflicts_with = "etcd")]
    pub topology: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Exit codes of DESIGN.md §7.
pub mod exit {
    pub const OK: u8 = 0;
    pub const REFUSED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFLICT: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const TIMED_OUT: u8 = 5;
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo(args) => demo(args),
        Command::Validate { file } => validate(&file),
        Command::Explain(args) if args.etcd.given() => etcd::explain(args),
        Command::Explain(args) => explain(args),
        Command::Status(args) if args.etcd.given() => etcd::status(&args.etcd, args.admin.json),
        Command::Status(args) => status(args),
        Command::Push(args) => etcd::push(args),
        Command::Degrade(args) if args.etcd.given() => etcd::degrade(args),
        Command::Degrade(args) => admin::degrade(&args),
        Command::Drain(args) => operator::drain(args),
        Command::Failover(args) => operator::failover(args),
        Command::Restore(args) => operator::restore(args),
        Command::Move(args) => operator::move_range(args),
    };
    ExitCode::from(code)
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    // One worker: a current-thread runtime, measurably cheaper per request than the
    // multi-thread scheduler with one worker.
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    }
}

impl ServeArgs {
    /// The bootstrap file with the flags on top.
    pub fn into_raw(self) -> anyhow::Result<RawConfig> {
        let mut raw = match &self.config {
            Some(path) => RawConfig::load(path)?,
            None => RawConfig::default(),
        };
        if self.listen.is_some() {
            raw.listen = self.listen;
        }
        if self.admin.is_some() {
            raw.admin = self.admin;
        }
        if let Some(t) = self.topology {
            raw.topology = Some(t);
            raw.etcd.clear();
        }
        if !self.etcd.is_empty() {
            raw.etcd = self.etcd;
            raw.topology = None;
        }
        if self.cluster.is_some() {
            raw.cluster = self.cluster;
        }
        let s = self.etcd_security;
        match (s.etcd_cert, s.etcd_key) {
            (Some(cert), Some(key)) => {
                raw.etcd_cert = Some(cert);
                raw.etcd_key = Some(key);
            }
            (None, None) => {}
            _ => anyhow::bail!("--etcd-cert and --etcd-key go together"),
        }
        if s.etcd_ca.is_some() {
            raw.etcd_ca = s.etcd_ca;
        }
        if s.etcd_user.is_some() {
            raw.etcd_user = s.etcd_user;
        }
        raw.etcd_password = etcd::password_from_env();
        if self.instance.is_some() {
            raw.instance = self.instance;
        }
        if self.idc.is_some() {
            raw.idc = self.idc;
        }
        if self.cache_dir.is_some() {
            raw.cache_dir = self.cache_dir;
        }
        if self.admin_token.is_some() {
            raw.admin_token = self.admin_token;
        }
        if self.log_format.is_some() {
            raw.log_format = self.log_format;
        }
        if self.threads.is_some() {
            raw.threads = self.threads;
        }
        match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                raw.tls.certs = vec![crate::config::CertFiles {
                    cert,
                    key,
                    server_names: Vec::new(),
                }];
            }
            (None, None) => {}
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        }
        if self.redirect_http.is_some() {
            raw.tls.redirect_http = self.redirect_http;
        }
        Ok(raw)
    }
}

fn serve(args: ServeArgs) -> u8 {
    let config = match args.into_raw().and_then(RawConfig::into_config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardgate serve: {e:#}");
            return exit::REFUSED;
        }
    };
    crate::telemetry::init_tracing(config.log_format);
    let rt = match runtime(config.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardgate serve: cannot start the runtime: {e}");
            return exit::REFUSED;
        }
    };
    match rt.block_on(crate::run(config, crate::termination_signal())) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("shardgate serve: {e:#}");
            exit::REFUSED
        }
    }
}

fn demo(args: DemoArgs) -> u8 {
    crate::telemetry::init_tracing(LogFormat::Text);
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shardgate demo: {e}");
            return exit::REFUSED;
        }
    };
    let opts = crate::dev::demo::DemoOptions {
        listen: args.listen,
        admin: args.admin,
        topology: args.topology,
    };
    match rt.block_on(crate::dev::demo::run(opts)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("shardgate demo: {e:#}");
            exit::REFUSED
        }
    }
}

/// Loads and builds a topology file offline (no listeners, no connections).
fn build_offline(file: &std::path::Path) -> Result<topology::Topology, topology::Problems> {
    let doc = crate::control::source::read_document(file)?;
    let ctx = BuildContext {
        revision: 0,
        ..BuildContext::default()
    };
    topology::build(
        doc,
        &Overrides::default(),
        &ctx,
        &crate::data::upstream::Upstreams::new(),
    )
}

fn validate(file: &std::path::Path) -> u8 {
    match build_offline(file) {
        Ok(t) => {
            let served: Vec<String> = t
                .idcs
                .iter()
                .zip(t.shards_served())
                .map(|(i, n)| format!("{} {n}", i.name))
                .collect();
            println!(
                "{}: valid. cluster `{}`, {} IDCs, {} sets, {} routes, {} shards (home: {})",
                file.display(),
                t.cluster,
                t.idcs.len(),
                t.sets.len(),
                t.routes.len(),
                t.shard_count,
                served.join(", ")
            );
            exit::OK
        }
        Err(problems) => {
            eprintln!("{}: invalid, {problems}", file.display());
            exit::REFUSED
        }
    }
}

fn explain(args: ExplainArgs) -> u8 {
    let answer = match &args.topology {
        Some(file) => match build_offline(file) {
            Ok(t) => crate::operator::admin::explain_json(&t, &args.key, args.route.as_deref()),
            Err(p) => {
                eprintln!("{}: invalid, {p}", file.display());
                return exit::REFUSED;
            }
        },
        None => {
            let mut path = format!("/explain?key={}", encode_query(&args.key));
            if let Some(r) = &args.route {
                path.push_str(&format!("&route={}", encode_query(r)));
            }
            match admin_get(&args.admin, &path) {
                Ok(v) if v.get("error").is_some() => {
                    Err(v["detail"].as_str().unwrap_or("refused").to_owned())
                }
                Ok(v) => Ok(v),
                Err(code) => return code,
            }
        }
    };
    report_explain(answer, args.admin.json)
}

/// Prints an `explain` answer (JSON or the human form) and gives the exit code; shared by the
/// admin, offline and etcd paths.
fn report_explain(answer: Result<Value, String>, json: bool) -> u8 {
    match answer {
        Ok(v) if json => {
            println!("{v}");
            exit::OK
        }
        Ok(v) => {
            print_explain(&v);
            exit::OK
        }
        Err(e) => {
            eprintln!("shardgate explain: {e}");
            exit::REFUSED
        }
    }
}

/// The human form of an `explain` answer.
fn print_explain(v: &Value) {
    let s = |k: &str| match &v[k] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!("key          {}", s("key"));
    if v["route"] != Value::Null {
        println!("route        {}", s("route"));
    }
    println!("shard        {}", s("shard"));
    println!("home IDC     {}", s("home_idc"));
    println!("serving IDC  {}", s("serving_idc"));
    if let Some(order) = v["failover_order"].as_array() {
        let names: Vec<&str> = order.iter().filter_map(Value::as_str).collect();
        println!("failover     {}", names.join(" -> "));
    }
    println!("why          {}", s("reason"));
    println!("revision     {}", s("revision"));
}

fn status(args: StatusArgs) -> u8 {
    let v = match admin_get(&args.admin, "/status") {
        Ok(v) => v,
        Err(code) => return code,
    };
    if args.admin.json {
        println!("{v}");
        return exit::OK;
    }
    println!(
        "cluster {}  revision {}  source {} ({})",
        v["cluster"].as_str().unwrap_or("?"),
        v["revision"],
        v["source"]["kind"].as_str().unwrap_or("?"),
        if v["source"]["up"].as_bool() == Some(true) {
            "up"
        } else {
            "DOWN"
        }
    );
    if let Some(p) = v["source"]["last_problem"].as_str() {
        println!("last rejected topology: {p}");
    }
    println!();
    println!(
        "{:<10} {:<10} {:<8} {:>6} {:>12} {:>14}",
        "IDC", "STATE", "HEALTHY", "WEIGHT", "HOME SHARDS", "SERVED SHARDS"
    );
    for idc in v["idcs"].as_array().into_iter().flatten() {
        println!(
            "{:<10} {:<10} {:<8} {:>6} {:>12} {:>14}",
            idc["name"].as_str().unwrap_or("?"),
            idc["state"].as_str().unwrap_or("?"),
            if idc["healthy"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            idc["weight"].to_string(),
            idc["shards_home"].to_string(),
            idc["shards_served"].to_string(),
        );
    }
    if let Some(sets) = v["sets"].as_object() {
        println!();
        println!(
            "{:<12} {:>8} {:>9} {:>8} {:>10}",
            "SET", "PRIORITY", "IN-FLIGHT", "BUDGET", "DEGRADED"
        );
        for (name, s) in sets {
            let routes = s["degraded_routes"].as_array().map_or(0, Vec::len);
            let degraded = match (s["degraded"].as_bool() == Some(true), routes) {
                (true, _) => "set".to_owned(),
                (false, 0) => "no".to_owned(),
                (false, n) => format!("{n} routes"),
            };
            println!(
                "{:<12} {:>8} {:>9} {:>8} {:>10}",
                name,
                s["priority"].to_string(),
                s["inflight"].to_string(),
                s["max_inflight"].to_string(),
                degraded,
            );
        }
    }
    let tripped: Vec<String> = v["breakers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["state"] != "closed")
        .map(|b| {
            format!(
                "{}/{} {}",
                b["idc"].as_str().unwrap_or("?"),
                b["set"].as_str().unwrap_or("?"),
                b["state"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!();
    println!(
        "breakers: {}",
        if tripped.is_empty() {
            "all closed".to_owned()
        } else {
            tripped.join(", ")
        }
    );
    println!();
    operator::print_overrides_and_moves(&v);
    exit::OK
}

/// GET on the admin API, with a deadline. Errors are already printed; the exit code comes back.
fn admin_get(admin: &AdminArgs, path: &str) -> Result<Value, u8> {
    let rt = runtime(1).map_err(|_| exit::REFUSED)?;
    let result = rt.block_on(crate::operator::admin_client::get(
        &admin.admin,
        path,
        admin.admin_token.as_deref(),
        Duration::from_secs(3),
    ));
    match result {
        Ok((status, body)) => match serde_json::from_slice::<Value>(&body) {
            Ok(v) if status == 401 => {
                eprintln!(
                    "{}: {}",
                    admin.admin,
                    v["detail"].as_str().unwrap_or("unauthorized")
                );
                Err(exit::REFUSED)
            }
            Ok(v) => Ok(v),
            Err(_) => {
                eprintln!(
                    "{}{path}: answered {status} with a body that is not JSON",
                    admin.admin
                );
                Err(exit::REFUSED)
            }
        },
        Err(e) => {
            eprintln!("cannot reach the gateway at {}: {e}", admin.admin);
            Err(exit::UNREACHABLE)
        }
    }
}
