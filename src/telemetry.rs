//! Tracing set-up and every metric name (DESIGN.md §9), in one place.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<String>,
    pub set: Arc<String>,
    pub idc: Arc<String>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<String>,
    pub set: Arc<String>,
    pub idc: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdcSetLabels {
    pub idc: Arc<String>,
    pub set: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetLabels {
    pub set: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub set: Arc<String>,
    pub reason: &'static str,
}

/// A request sent again after a backend's 421: its route, the IDC that refused it and the
/// owner it named.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReforwardLabels {
    pub route: Arc<String>,
    pub from: Arc<String>,
    pub to: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdcLabels {
    pub idc: Arc<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub idc: Arc<String>,
    pub set: Arc<String>,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdcStateLabels {
    pub idc: Arc<String>,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionStateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 16,
    ))
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_duration: Family<IdcSetLabels, Histogram, fn() -> Histogram>,
    pub topology_revision: Gauge,
    pub topology_reloads: Family<ResultLabels, Counter>,
    pub topology_source_up: Gauge,
    /// 1 while this gateway fences its own writes (etcd mode: registration lost, unconfirmed
    /// or not caught up).
    pub self_fenced: Gauge,
    /// The revision this gateway acknowledges (its registration's `applied_revision`).
    pub acknowledged_revision: Gauge,
    pub shards_served: Family<IdcLabels, Gauge>,
    pub idc_state: Family<IdcStateLabels, Gauge>,
    pub inflight: Family<SetLabels, Gauge>,
    pub refused: Family<RefusedLabels, Counter>,
    pub reforwarded: Family<ReforwardLabels, Counter>,
    pub breaker_state: Family<IdcSetLabels, Gauge>,
    pub backend_healthy: Family<BackendLabels, Gauge>,
    pub idc_healthy: Family<IdcLabels, Gauge>,
    pub task_failures: Family<TaskLabels, Counter>,
    pub client_connections: Family<ConnectionStateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("shardgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route, set, serving IDC and status",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        registry.register(
            "request_duration_seconds",
            "Time from request head to response head, by route, set and IDC",
            request_duration.clone(),
        );
        let upstream_duration =
            Family::<IdcSetLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to answer with a response head, by IDC and set",
            upstream_duration.clone(),
        );
        let topology_revision = Gauge::default();
        registry.register(
            "topology_revision",
            "Revision of the topology snapshot being served",
            topology_revision.clone(),
        );
        let topology_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "topology_reloads",
            "Topology reloads by result (ok, invalid, error)",
            topology_reloads.clone(),
        );
        let topology_source_up = Gauge::default();
        registry.register(
            "topology_source_up",
            "1 while the topology source (file or etcd) can be read",
            topology_source_up.clone(),
        );
        let self_fenced = Gauge::default();
        registry.register(
            "self_fenced",
            "1 while this gateway refuses writes on sharded routes because it cannot be sure the cluster waits for it (etcd registration lost, unconfirmed, or not caught up)",
            self_fenced.clone(),
        );
        let acknowledged_revision = Gauge::default();
        registry.register(
            "acknowledged_revision",
            "The topology revision this gateway acknowledges: served, cached, and with no write admitted under an older snapshot still in flight",
            acknowledged_revision.clone(),
        );
        let shards_served = Family::<IdcLabels, Gauge>::default();
        registry.register(
            "shards_served",
            "Shards each IDC serves in the current snapshot",
            shards_served.clone(),
        );
        let idc_state = Family::<IdcStateLabels, Gauge>::default();
        registry.register(
            "idc_state",
            "1 for the IDC's current state, 0 for the others",
            idc_state.clone(),
        );
        let inflight = Family::<SetLabels, Gauge>::default();
        registry.register(
            "inflight",
            "Requests admitted and not yet answered (response head), by set",
            inflight.clone(),
        );
        let refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests the gateway refused, by set and reason (set_full, shed, rate_limited, degraded, circuit_open, fenced)",
            refused.clone(),
        );
        let reforwarded = Family::<ReforwardLabels, Counter>::default();
        registry.register(
            "reforwarded",
            "Requests sent again, once, to the owner a backend named in a 421 with a newer owner epoch, by route, refusing IDC (from) and owner (to)",
            reforwarded.clone(),
        );
        let breaker_state = Family::<IdcSetLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker per IDC and set: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let backend_healthy = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_healthy",
            "1 while the backend gets traffic (probes healthy and not ejected), by IDC, set and address",
            backend_healthy.clone(),
        );
        let idc_healthy = Family::<IdcLabels, Gauge>::default();
        registry.register(
            "idc_healthy",
            "1 while the IDC's core pool has at least min_healthy of its backends in service, in this gateway's view",
            idc_healthy.clone(),
        );
        let task_failures = Family::<TaskLabels, Counter>::default();
        registry.register(
            "task_failures",
            "Background tasks (source, health, failover, moves, leader, registry, listeners) that panicked or ended unasked, by task",
            task_failures.clone(),
        );
        let client_connections = Family::<ConnectionStateLabels, Gauge>::default();
        registry.register(
            "client_connections",
            "Open client connections on the proxy listener, by state: active (hyper serving it) or resting (HTTP/1.1 keep-alive with nothing to do, holding no buffers)",
            client_connections.clone(),
        );
        Metrics {
            registry,
            task_failures,
            client_connections,
            backend_healthy,
            idc_healthy,
            inflight,
            refused,
            reforwarded,
            breaker_state,
            requests,
            request_duration,
            upstream_duration,
            topology_revision,
            topology_reloads,
            topology_source_up,
            self_fenced,
            acknowledged_revision,
            shards_served,
            idc_state,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn reload(&self, result: &'static str) {
        self.topology_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` filters as usual; the access log is the target
/// `shardgate::access` (`RUST_LOG=info,shardgate::access=off` turns it off).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
