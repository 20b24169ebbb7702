//! The topology document exactly as users write it (DESIGN.md §4): serde types only.
//! Nothing here is trusted; `validate` turns it into a `Topology` or a list of problems.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const DEFAULT_SHARD_COUNT: u32 = 1024;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawTopology {
    #[serde(default)]
    pub cluster: String,
    #[serde(default = "default_shard_count")]
    pub shard_count: u32,
    /// Lets a push change `shard_count` against the running snapshot (every key moves).
    #[serde(default)]
    pub allow_reshard: bool,
    #[serde(default)]
    pub sets: BTreeMap<String, RawSet>,
    #[serde(default)]
    pub idcs: Vec<RawIdc>,
    #[serde(default)]
    pub shards: RawShards,
    #[serde(default)]
    pub failover: RawFailover,
    #[serde(default)]
    pub isolation: RawIsolation,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

fn default_shard_count() -> u32 {
    DEFAULT_SHARD_COUNT
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawSet {
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u32,
    #[serde(default)]
    pub degradable: bool,
}

fn default_max_inflight() -> u32 {
    1024
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIdc {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub failover_to: Vec<String>,
    #[serde(default)]
    pub health: RawHealth,
    /// set name → backend addresses (`host:port`).
    #[serde(default)]
    pub pools: BTreeMap<String, Vec<String>>,
    /// TLS to this IDC's backends (cross-IDC links), when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawUpstreamTls>,
}

/// `tls = { ca = "/path/ca.pem", server_name = "..." }` on an IDC.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// PEM bundle of the CAs that sign the backends' certificates (the only ones trusted).
    pub ca: String,
    /// The name checked against the backends' certificates (and sent as SNI); default: each
    /// backend's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn default_weight() -> u32 {
    100
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_health_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: default_health_path(),
            interval_ms: default_health_interval(),
            timeout_ms: default_health_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

fn default_health_path() -> String {
    "/healthz".to_owned()
}
fn default_health_interval() -> u64 {
    500
}
fn default_health_timeout() -> u64 {
    300
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawShards {
    #[serde(default)]
    pub pins: Vec<RawPin>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPin {
    /// `"A-B"` inclusive at both ends, or a single shard `"A"`.
    pub range: String,
    pub idc: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    #[serde(default = "default_detect_ms")]
    pub detect_ms: u64,
    #[serde(default = "default_recover_ms")]
    pub recover_ms: u64,
    #[serde(default)]
    pub auto_failback: bool,
    #[serde(default = "default_min_healthy")]
    pub min_healthy: f64,
    #[serde(default = "default_warmup_s")]
    pub warmup_s: u64,
    #[serde(default = "default_fence_ms")]
    pub fence_ms: u64,
}

impl Default for RawFailover {
    fn default() -> Self {
        RawFailover {
            detect_ms: default_detect_ms(),
            recover_ms: default_recover_ms(),
            auto_failback: false,
            min_healthy: default_min_healthy(),
            warmup_s: default_warmup_s(),
            fence_ms: default_fence_ms(),
        }
    }
}

fn default_detect_ms() -> u64 {
    1500
}
fn default_recover_ms() -> u64 {
    10_000
}
fn default_min_healthy() -> f64 {
    0.5
}
fn default_warmup_s() -> u64 {
    60
}
fn default_fence_ms() -> u64 {
    2000
}

/// `[isolation]`: shedding threshold, retry budget and breaker knobs (DESIGN.md §5 defaults).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawIsolation {
    #[serde(default = "default_shed_start")]
    pub shed_start: f64,
    #[serde(default = "default_retry_ratio")]
    pub retry_ratio: f64,
    #[serde(default = "default_retry_reserve")]
    pub retry_reserve: u32,
    #[serde(default)]
    pub breaker: RawBreaker,
}

impl Default for RawIsolation {
    fn default() -> Self {
        RawIsolation {
            shed_start: default_shed_start(),
            retry_ratio: default_retry_ratio(),
            retry_reserve: default_retry_reserve(),
            breaker: RawBreaker::default(),
        }
    }
}

fn default_shed_start() -> f64 {
    0.7
}
fn default_retry_ratio() -> f64 {
    0.2
}
fn default_retry_reserve() -> u32 {
    10
}

/// `[isolation.breaker]`: the circuit breaker of every (IDC, set).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    #[serde(default = "default_consecutive")]
    pub consecutive: u32,
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_failure_ratio")]
    pub failure_ratio: f64,
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    #[serde(default = "default_open_ms")]
    pub open_ms: u64,
    #[serde(default = "default_probes")]
    pub probes: u32,
}

impl Default for RawBreaker {
    fn default() -> Self {
        RawBreaker {
            consecutive: default_consecutive(),
            min_requests: default_min_requests(),
            failure_ratio: default_failure_ratio(),
            window_ms: default_window_ms(),
            open_ms: default_open_ms(),
            probes: default_probes(),
        }
    }
}

fn default_consecutive() -> u32 {
    5
}
fn default_min_requests() -> u32 {
    20
}
fn default_failure_ratio() -> f64 {
    0.5
}
fn default_window_ms() -> u64 {
    10_000
}
fn default_open_ms() -> u64 {
    5000
}
fn default_probes() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub set: String,
    #[serde(default = "default_true")]
    pub sharded: bool,
    #[serde(default)]
    pub key: Vec<String>,
    #[serde(default = "default_on_missing_key")]
    pub on_missing_key: String,
    #[serde(default = "default_route_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Largest request body forwarded; larger gets 413. Unset: no limit.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub fallback: Option<RawFallback>,
    /// Proxies WebSocket upgrades (HTTP/1.1 `Connection: upgrade` + `Upgrade: websocket`).
    /// Off: the upgrade headers are stripped and the request goes upstream as a plain GET.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub websocket: bool,
}

fn default_host() -> String {
    "*".to_owned()
}
fn default_path_prefix() -> String {
    "/".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_on_missing_key() -> String {
    "reject".to_owned()
}
fn default_route_timeout() -> u64 {
    1000
}
fn default_retries() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub rps: u32,
    #[serde(default)]
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    #[serde(default = "default_fallback_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default = "default_fallback_content_type")]
    pub content_type: String,
    #[serde(default)]
    pub retry_after_s: Option<u32>,
}

fn default_fallback_status() -> u16 {
    503
}
fn default_fallback_content_type() -> String {
    "application/json".to_owned()
}

impl RawTopology {
    /// Parses TOML text. A syntax or type error is one problem naming the line and column.
    pub fn parse(text: &str) -> Result<RawTopology, super::Problems> {
        toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let (line, col) = line_col(text, span.start);
                    format!("line {line}, column {col}")
                })
                .unwrap_or_else(|| "document".to_owned());
            // Some parser errors carry no message (a bare CR in a comment): a problem must
            // still say what is wrong.
            let reason = match e.message().trim() {
                "" => "not valid TOML here".to_owned(),
                m => m.to_owned(),
            };
            super::Problems(vec![super::Problem::new(at, reason)])
        })
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}
