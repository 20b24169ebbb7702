//! shardgate: a multi-IDC active-active routing gateway. It reads a sharding key from each
//! request, maps it to a shard (`crc32_ieee(key) % shard_count`) and forwards the request to
//! the IDC that serves that shard now.
//!
//! The request path, module by module:
//! - [`server`]: accept → TLS ([`tls`]: rustls, ALPN, SNI, reloaded certificates) → the
//!   request-head gate ([`server::gate`]: both lengths, oversized heads) → hyper (HTTP/1.1,
//!   h2) with connection, header and stream limits and graceful drain.
//! - [`proxy`]: the pipeline: request id, header hygiene, one snapshot load, decide, forward.
//! - [`route`]: route matching and sharding-key extraction (pure).
//! - [`admission`]: set budgets, priority shedding, rate limits, degrade switches, circuit
//!   breakers: admit → permit or refusal (state keyed by name, outlives snapshots).
//! - [`topology`]: the immutable snapshot: validation, shard/serving tables, diff.
//! - [`forward`]: pooled upstream connections per (IDC, set, backend) among the backends in
//!   service, TLS to an IDC that asks for it ([`tls::upstream`]), retries, passive outlier
//!   signals.
//! - [`upgrade`]: WebSocket upgrades on routes that allow them: 101, then bytes both ways.
//! - [`health`]: active probes + passive ejection → which backends get traffic, and this
//!   gateway's IDC health view (`/status`, metrics, the etcd registration).
//! - [`body`]: streaming bodies with idle deadlines; connections back to the pool.
//! - [`headers`]: the gateway's headers, hop-by-hop stripping, ids and tracing headers.
//! - [`error`]: the one request-path error and its status mapping.
//!
//! The reload path: [`source`] (topology file + overrides) → `topology::build` → one
//! `ArcSwap` store → every later request sees the new snapshot; in-flight ones keep theirs.
//! In etcd mode [`etcd`] is the source: one watch on `/shardgate/<cluster>/` feeds the same
//! `Snapshots::publish`, the last good snapshot is cached on disk, and each gateway registers
//! itself (`gateway/<instance>`) with the revision it serves.
//!
//! Planned moves and operator IDC control live in [`moves`]: the checks of `drain`, `move`,
//! `failover`, `restore`, and the phase function of a fenced move with its file-mode driver.
//!
//! Who decides IDC states: [`failover`] (pure rules with hysteresis; in file mode a
//! controller on this gateway's own view), and in etcd mode the elected leader
//! (`etcd::leader`) deciding from the majority of gateways' views and driving fenced moves.
//!
//! Around them: [`admin`] (health, metrics, status, explain), [`telemetry`] (tracing and
//! metric names), [`config`] (bootstrap), [`cli`] (operator commands), [`sim`] (simulated IDC
//! backends for the demo and the tests, their ledger and the history checker), [`demo`].

pub mod admin;
pub mod admin_client;
pub mod admission;
pub mod body;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod etcd;
pub mod failover;
pub mod forward;
#[doc(hidden)]
pub mod fuzz;
pub mod headers;
pub mod health;
pub mod moves;
pub mod proxy;
pub mod route;
pub mod server;
pub mod sim;
pub mod source;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, SourceConfig};
use crate::proxy::{Gateway, ProxySettings};
use crate::server::{Handler, ListenerSettings};
use crate::source::{FileSource, Snapshots};
use crate::telemetry::Metrics;

impl Handler for Gateway {
    async fn call(
        self: Arc<Self>,
        req: http::Request<hyper::body::Incoming>,
        peer: server::Peer,
    ) -> http::Response<body::ResponseBody> {
        self.handle(req, peer.ip_header).await
    }
}

/// A started gateway instance.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The plain listener redirecting to https, when configured.
    pub redirect_addr: Option<SocketAddr>,
    pub snapshots: Arc<Snapshots>,
    /// This gateway's health view.
    pub health: Arc<health::Health>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns
    /// when every listener is done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds the listeners, loads the topology and starts serving. Fails, saying why, when the
/// configuration or the first topology cannot be used.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut file_overrides = None;
    let snapshots = match &config.source {
        SourceConfig::File(path) => {
            let snapshots = Arc::new(Snapshots::new(
                "file",
                config.local_idc.clone(),
                metrics.clone(),
            ));
            let mut file =
                FileSource::new(path.clone(), config.cache_dir.as_deref(), snapshots.clone());
            file_overrides = Some(file.overrides_handle());
            file.load().map_err(|problems| {
                anyhow::anyhow!("topology {} is invalid: {problems}", path.display())
            })?;
            tasks.push(tokio::spawn(
                file.run(config.file_poll, shutdown_rx.clone()),
            ));
            snapshots
        }
        SourceConfig::Etcd { access, cluster } => {
            let snapshots = Arc::new(Snapshots::new(
                "etcd",
                config.local_idc.clone(),
                metrics.clone(),
            ));
            let settings = etcd::source::EtcdSettings {
                access: access.clone(),
                cluster: cluster.clone(),
                timeout: config.timeouts.etcd,
                cache_dir: config.cache_dir.clone(),
            };
            let mut source = etcd::source::EtcdSource::new(settings, snapshots.clone());
            source.load_cache();
            let first = source.first_attempt();
            tasks.push(tokio::spawn(source.run(shutdown_rx.clone())));
            // Start with etcd's view when etcd answers in time; otherwise with the cached
            // snapshot (or none: not ready, and /readyz says why) until it does. Never block
            // on etcd for longer than a call's deadline or two.
            let _ = tokio::time::timeout(config.timeouts.etcd * 2, first).await;
            snapshots
        }
    };

    let health = health::Health::new(snapshots.clone(), metrics.clone());
    tasks.push(tokio::spawn(health.clone().run(shutdown_rx.clone())));
    if let Some(store) = &file_overrides {
        // The single instance decides alone, from its own health view: IDC states (woken by
        // every change of the view) and its own fenced moves (in etcd mode the leader does
        // both).
        let view: health::ViewSource = {
            let health = health.clone();
            Arc::new(move || health.idc_view())
        };
        let controller = failover::controller::FileController::new(
            snapshots.clone(),
            store.clone(),
            view.clone(),
            Some(health.subscribe()),
        );
        tasks.push(tokio::spawn(controller.run(shutdown_rx.clone())));
        tasks.push(tokio::spawn(moves::driver::run(
            snapshots.clone(),
            store.clone(),
            view,
            shutdown_rx.clone(),
        )));
    }
    // Warm-up steps (and override expiry) change the serving table with time alone.
    tasks.push(tokio::spawn(
        snapshots.clone().run_timed_rebuilds(shutdown_rx.clone()),
    ));

    // Certificates are loaded before any listener is bound, so a bad one fails the start.
    let tls = match &config.tls {
        Some(t) => {
            let tls = tls::Tls::load(t.certs.clone())?;
            tasks.push(tokio::spawn(
                tls.certificates()
                    .run(config.file_poll, shutdown_rx.clone()),
            ));
            Some(tls)
        }
        None => None,
    };
    let proxy_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on {} (--admin)", config.admin))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if let SourceConfig::Etcd { access, cluster } = &config.source {
        let instance = config
            .instance
            .clone()
            .unwrap_or_else(|| etcd::registry::default_instance(proxy_addr));
        let leader = etcd::leader::Leader::new(
            etcd::leader::LeaderSettings {
                access: access.clone(),
                cluster: cluster.clone(),
                instance: instance.clone(),
                timeout: config.timeouts.etcd,
            },
            snapshots.clone(),
        );
        tasks.push(tokio::spawn(leader.run(shutdown_rx.clone())));
        let registration = etcd::registry::Registration {
            access: access.clone(),
            cluster: cluster.clone(),
            instance,
            idc: config.local_idc.clone(),
            proxy_addr,
            admin_addr,
            timeout: config.timeouts.etcd,
        };
        let registry =
            etcd::registry::Registry::new(registration, snapshots.clone(), health.clone());
        tasks.push(tokio::spawn(registry.run(shutdown_rx.clone())));
    }

    let settings = ListenerSettings {
        header_read_timeout: config.timeouts.header_read,
        idle_timeout: config.timeouts.idle,
        max_header_bytes: config.max_header_bytes,
        drain: config.timeouts.drain,
        limits: config.limits.clone(),
        tls: None,
        head_gate: false,
    };
    let certificates = tls.as_ref().map(tls::Tls::certificates);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let proxy_settings = ListenerSettings {
        tls,
        head_gate: true,
        ..settings.clone()
    };
    let admission = Arc::new(admission::Admission::new(metrics.clone()));
    let gateway = Arc::new(Gateway {
        topology: snapshots.cell(),
        metrics: metrics.clone(),
        admission: admission.clone(),
        local_idc_header: config
            .local_idc
            .as_deref()
            .and_then(|i| http::HeaderValue::from_str(i).ok()),
        settings: ProxySettings {
            connect_timeout: config.timeouts.upstream_connect,
            body_timeout: config.timeouts.request_body,
            upgrade_idle: config.timeouts.idle,
            scheme,
        },
    });
    tasks.push(tokio::spawn(server::serve(
        proxy_listener,
        gateway,
        proxy_settings,
        shutdown_rx.clone(),
    )));
    let mut redirect_addr = None;
    if let Some(addr) = config.tls.as_ref().and_then(|t| t.redirect_http) {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (redirect_http)"))?;
        redirect_addr = Some(listener.local_addr()?);
        let redirect = Arc::new(tls::Redirect {
            https_port: proxy_addr.port(),
        });
        tasks.push(tokio::spawn(server::serve(
            listener,
            redirect,
            settings.clone(),
            shutdown_rx.clone(),
        )));
    }
    let admin = Arc::new(admin::Admin {
        snapshots: snapshots.clone(),
        metrics,
        admission,
        health: health.clone(),
        file_overrides,
        token: config.admin_token.clone(),
        tls: certificates,
    });
    tasks.push(tokio::spawn(server::serve(
        admin_listener,
        admin,
        settings,
        shutdown_rx,
    )));
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, tls = scheme == "https", redirect = ?redirect_addr, "shardgate serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        redirect_addr,
        snapshots,
        health,
        shutdown: shutdown_tx,
        tasks,
    })
}

/// Runs until `stop` resolves, then shuts down gracefully.
pub async fn run(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(config).await?;
    stop.await;
    tracing::info!("shutting down: no new connections, draining in-flight requests");
    running.shutdown().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
