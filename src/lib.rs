//! shardgate: a multi-IDC active-active routing gateway. It reads a sharding key from each
//! request, maps it to a shard (`crc32_ieee(key) % shard_count`) and forwards the request to
//! the IDC that serves that shard now.
//!
//! # Module map
//!
//! The crate is grouped by role, one directory each, and imports go one way (no module imports
//! one that imports it back; `tests/layout.rs` checks it):
//!
//! ```text
//!  dev        sim · demo · fuzz
//!  operator   cli · admin (API and console) · admin_client · cluster (etcd reads and writes)
//!  data       server, tls → proxy → admission · forward · upgrade · error · headers
//!  control    etcd (source, registry, leader) · failover · moves · health · source ·
//!             self_fence · tasks · topology (the snapshot: plain *Spec values)
//!  low level  data::route (pure matching) · data::upstream (pools, leases, the HTTP/1.1
//!             client, bodies, backend health, upstream TLS)
//!  base       config · telemetry · util
//! ```
//!
//! The request path ([`data`]): [`data::server`] accepts, terminates TLS ([`data::tls`]),
//! gates the request head ([`data::server::gate`]) and serves HTTP/1.1 and h2 with hyper;
//! [`data::proxy`] strips client `x-shardgate-*` headers, loads one snapshot, decides the route,
//! shard and serving IDC ([`data::route`] on the snapshot's tables), admits it
//! ([`data::admission`]), checks the write fences, and exchanges with a backend
//! ([`data::forward`] over [`data::upstream`]'s pools); a backend's 421 naming a newer owner
//! sends the request there once ([`data::proxy::misroute`]).
//!
//! The reload path ([`control`]): a source ([`control::source`] for the file,
//! [`control::etcd`] for one etcd watch) builds a [`control::topology::Topology`] and publishes
//! it through `Snapshots` (one `ArcSwap`); requests in flight keep theirs. Fenced owner changes
//! (drains, moves, failovers, warm-up steps) are [`control::moves`]' phase function, driven by
//! the file driver or the elected leader ([`control::etcd::leader`]), which decides IDC states
//! with [`control::failover`] from [`control::health`]'s views. A write also needs this
//! gateway's own fence open ([`control::self_fence`]). Every background task runs supervised
//! ([`control::tasks`]).
//!
//! The operator side ([`operator`]): the CLI, the admin listener with its console, and the
//! etcd writes operators make. [`dev`] holds the simulated IDCs, the demo and the fuzz entry
//! points.

pub mod config;
pub mod control;
pub mod data;
pub mod dev;
pub mod operator;
pub mod telemetry;
pub mod util;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, SourceConfig};
use crate::control::source::{FileSource, Snapshots};
use crate::data::proxy::{Gateway, ProxySettings};
use crate::data::server::{Handler, ListenerSettings};
use crate::telemetry::Metrics;

impl Handler for Gateway {
    /// The pipeline's own future, not one wrapped around it: a wrapper would hold the request
    /// a second time and copy it into the pipeline's when first polled.
    fn call(
        self: Arc<Self>,
        req: http::Request<data::server::ClientBody>,
        peer: data::server::Peer,
    ) -> impl std::future::Future<Output = http::Response<data::upstream::body::ResponseBody>> + Send
    {
        self.handle(req, peer.ip_header)
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
    pub health: Arc<control::health::Health>,
    /// Its supervised background tasks (which are down, and why).
    pub tasks: Arc<control::tasks::Tasks>,
    shutdown: watch::Sender<bool>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns
    /// when every listener is done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.tasks.join().await;
    }
}

/// Binds the listeners, loads the topology and starts serving. Fails, saying why, when the
/// configuration or the first topology cannot be used.
///
/// Every background task runs supervised ([`tasks`]). Restarted when it dies: those that
/// rebuild all they need from shared state (the published snapshot, the backends' health,
/// the overrides store, etcd); each says below why that is safe. Never restarted: the
/// listeners, which own their socket and their open connections.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tasks = control::tasks::Tasks::new(metrics.clone(), shutdown_rx.clone());
    let up = Startup {
        metrics,
        tasks,
        shutdown: shutdown_rx,
    };

    let (snapshots, file_overrides) = match &config.source {
        SourceConfig::File(path) => {
            let (snapshots, overrides) = up.file_source(&config, path)?;
            (snapshots, Some(overrides))
        }
        SourceConfig::Etcd { access, cluster } => {
            (up.etcd_source(&config, access, cluster).await, None)
        }
    };
    let health = up.health(&snapshots);
    if let Some(store) = &file_overrides {
        up.file_deciders(&snapshots, store, &health);
    }
    // Certificates are loaded before any listener is bound, so a bad one fails the start.
    let tls = up.certificates(&config)?;
    let proxy_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on {} (--admin)", config.admin))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if let SourceConfig::Etcd { access, cluster } = &config.source {
        up.etcd_membership(
            &config, access, cluster, proxy_addr, admin_addr, &snapshots, &health,
        );
    }
    let redirect_addr = up
        .listeners(
            &config,
            Listeners {
                proxy: proxy_listener,
                admin: admin_listener,
                proxy_addr,
                admin_addr,
            },
            tls,
            &snapshots,
            &health,
            file_overrides,
        )
        .await?;
    Ok(Running {
        proxy_addr,
        admin_addr,
        redirect_addr,
        snapshots,
        health,
        tasks: up.tasks,
        shutdown: shutdown_tx,
    })
}

/// What every step of [`start`] shares: the metrics, the supervisor of the background tasks,
/// and the shutdown signal they all watch.
struct Startup {
    metrics: Arc<Metrics>,
    tasks: Arc<control::tasks::Tasks>,
    shutdown: watch::Receiver<bool>,
}

/// The two listeners bound by [`start`], with their addresses.
struct Listeners {
    proxy: TcpListener,
    admin: TcpListener,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Startup {
    /// File mode: the first load must succeed; the source then polls the file.
    fn file_source(
        &self,
        config: &Config,
        path: &std::path::Path,
    ) -> anyhow::Result<(Arc<Snapshots>, Arc<control::source::FileOverrides>)> {
        let snapshots = Arc::new(Snapshots::new(
            "file",
            config.local_idc.clone(),
            self.metrics.clone(),
        ));
        let mut file = FileSource::new(
            path.to_path_buf(),
            config.cache_dir.as_deref(),
            snapshots.clone(),
        );
        let overrides = file.overrides_handle();
        let file_overrides = overrides.clone();
        file.load().map_err(|problems| {
            anyhow::anyhow!("topology {} is invalid: {problems}", path.display())
        })?;
        // Restartable: the file and the overrides store are the whole state; a new source
        // keeps the overrides handle and counts revisions on from the published one.
        let (path, poll, shutdown, published) = (
            path.to_path_buf(),
            config.file_poll,
            self.shutdown.clone(),
            snapshots.clone(),
        );
        let mut first = Some(file);
        self.tasks.spawn_restarting("file_source", move || {
            let source = first.take().unwrap_or_else(|| {
                FileSource::resume(path.clone(), overrides.clone(), published.clone())
            });
            source.run(poll, shutdown.clone())
        });
        Ok((snapshots, file_overrides))
    }

    /// etcd mode: the cached snapshot first, then etcd's view when it answers in time.
    async fn etcd_source(
        &self,
        config: &Config,
        access: &control::etcd::EtcdAccess,
        cluster: &str,
    ) -> Arc<Snapshots> {
        let snapshots = Snapshots::new("etcd", config.local_idc.clone(), self.metrics.clone());
        let snapshots = Arc::new(match config.cache_dir {
            Some(_) => snapshots.with_cache(),
            None => snapshots,
        });
        let settings = control::etcd::source::EtcdSettings {
            access: access.clone(),
            cluster: cluster.to_owned(),
            timeout: config.timeouts.etcd,
            cache_dir: config.cache_dir.clone(),
        };
        let mut source =
            control::etcd::source::EtcdSource::new(settings.clone(), snapshots.clone());
        source.load_cache();
        let first = source.first_attempt();
        // Restartable: a new source lists the prefix again, as it does after a compaction,
        // and publishes what etcd holds; the last good snapshot serves meanwhile.
        let (shutdown, published) = (self.shutdown.clone(), snapshots.clone());
        let mut initial = Some(source);
        self.tasks.spawn_restarting("etcd_source", move || {
            let source = initial.take().unwrap_or_else(|| {
                control::etcd::source::EtcdSource::new(settings.clone(), published.clone())
            });
            source.run(shutdown.clone())
        });
        // Start with etcd's view when etcd answers in time; otherwise with the cached
        // snapshot (or none: not ready, and /readyz says why) until it does. Never block
        // on etcd for longer than a call's deadline or two.
        let _ = tokio::time::timeout(config.timeouts.etcd * 2, first).await;
        snapshots
    }

    /// Active probes and passive ejection over the published snapshot's backends.
    fn health(&self, snapshots: &Arc<Snapshots>) -> Arc<control::health::Health> {
        let health = control::health::Health::new(snapshots.clone(), self.metrics.clone());
        // Restartable: probe verdicts and ejections live in the backends' shared health, so
        // a new task only starts the probes again (the dead one's are aborted with it).
        let (probes, shutdown) = (health.clone(), self.shutdown.clone());
        self.tasks
            .spawn_restarting("health", move || probes.clone().run(shutdown.clone()));
        health
    }

    /// File mode: the single instance decides alone, from its own health view: IDC states
    /// (woken by every change of the view) and its own fenced moves (in etcd mode the leader
    /// does both).
    fn file_deciders(
        &self,
        snapshots: &Arc<Snapshots>,
        store: &Arc<control::source::FileOverrides>,
        health: &Arc<control::health::Health>,
    ) {
        let view: control::health::ViewSource = {
            let health = health.clone();
            Arc::new(move || health.idc_view())
        };
        // Restartable: its decisions are written to the overrides store; a new controller
        // only forgets how long an IDC has looked unhealthy, which delays a failover by up
        // to `detect_ms` and never hastens one.
        let (snapshots_c, store_c, view_c, health_c, shutdown) = (
            snapshots.clone(),
            store.clone(),
            view.clone(),
            health.clone(),
            self.shutdown.clone(),
        );
        self.tasks.spawn_restarting("failover_controller", move || {
            control::failover::controller::FileController::new(
                snapshots_c.clone(),
                store_c.clone(),
                view_c.clone(),
                Some(health_c.subscribe()),
            )
            .run(shutdown.clone())
        });
        // Restartable: a move's phase and fence time are in its record, so a new driver
        // takes every open move up where the records say it is.
        let (snapshots_d, store_d, shutdown) =
            (snapshots.clone(), store.clone(), self.shutdown.clone());
        self.tasks.spawn_restarting("move_driver", move || {
            control::moves::driver::run(
                snapshots_d.clone(),
                store_d.clone(),
                view.clone(),
                shutdown.clone(),
            )
        });
    }

    /// The proxy listener's certificates, when TLS is configured, watched for changes.
    fn certificates(&self, config: &Config) -> anyhow::Result<Option<data::tls::Tls>> {
        let Some(t) = &config.tls else {
            return Ok(None);
        };
        let tls = data::tls::Tls::load(t.certs.clone())?;
        // Restartable: the loaded set stays in place; a new watcher compares the files
        // from now on.
        let (certificates, poll, shutdown) =
            (tls.certificates(), config.file_poll, self.shutdown.clone());
        self.tasks.spawn_restarting("certificates", move || {
            certificates.clone().run(poll, shutdown.clone())
        });
        Ok(Some(tls))
    }

    /// etcd mode: the leader election (and, when elected, the cluster's decisions) and this
    /// gateway's registration.
    #[allow(clippy::too_many_arguments)] // start's pieces, each used once
    fn etcd_membership(
        &self,
        config: &Config,
        access: &control::etcd::EtcdAccess,
        cluster: &str,
        proxy_addr: SocketAddr,
        admin_addr: SocketAddr,
        snapshots: &Arc<Snapshots>,
        health: &Arc<control::health::Health>,
    ) {
        let instance = config
            .instance
            .clone()
            .unwrap_or_else(|| control::etcd::registry::default_instance(proxy_addr));
        let leader_settings = control::etcd::leader::LeaderSettings {
            access: access.clone(),
            cluster: cluster.to_owned(),
            instance: instance.clone(),
            timeout: config.timeouts.etcd,
        };
        // Restartable: leadership is an etcd lease, moves are records in etcd. The dead
        // task's session ends with it (its lease expires), and a new campaign takes over,
        // here or on another gateway, from what etcd holds, as after any lost leadership.
        let (snapshots_l, shutdown) = (snapshots.clone(), self.shutdown.clone());
        self.tasks.spawn_restarting("leader", move || {
            control::etcd::leader::Leader::new(leader_settings.clone(), snapshots_l.clone())
                .run(shutdown.clone())
        });
        let registration = control::etcd::registry::Registration {
            access: access.clone(),
            cluster: cluster.to_owned(),
            instance,
            idc: config.local_idc.clone(),
            proxy_addr,
            admin_addr,
            timeout: config.timeouts.etcd,
        };
        // Restartable: a new registry writes the same key under a new lease; the dead
        // task's lease runs out on its own.
        let (snapshots_r, health_r, shutdown) =
            (snapshots.clone(), health.clone(), self.shutdown.clone());
        self.tasks.spawn_restarting("registry", move || {
            control::etcd::registry::Registry::new(
                registration.clone(),
                snapshots_r.clone(),
                health_r.clone(),
            )
            .run(shutdown.clone())
        });
    }

    /// The proxy, the https redirect (when configured) and the admin listener, serving.
    /// Returns the redirect's address.
    async fn listeners(
        &self,
        config: &Config,
        bound: Listeners,
        tls: Option<data::tls::Tls>,
        snapshots: &Arc<Snapshots>,
        health: &Arc<control::health::Health>,
        file_overrides: Option<Arc<control::source::FileOverrides>>,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let settings = ListenerSettings {
            header_read_timeout: config.timeouts.header_read,
            idle_timeout: config.timeouts.idle,
            max_header_bytes: config.max_header_bytes,
            drain: config.timeouts.drain,
            limits: config.limits.clone(),
            tls: None,
            head_gate: false,
            gauges: None,
        };
        let certificates = tls.as_ref().map(data::tls::Tls::certificates);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let proxy_settings = ListenerSettings {
            tls,
            head_gate: true,
            gauges: Some(data::server::rest::ConnectionGauges::new(&self.metrics)),
            ..settings.clone()
        };
        if let Some(gauges) = proxy_settings.gauges.clone() {
            let shutdown = self.shutdown.clone();
            self.tasks.spawn_restarting("memory_release", move || {
                data::server::rest::release_memory(gauges.clone(), shutdown.clone())
            });
        }
        let admission = Arc::new(data::admission::Admission::new(self.metrics.clone()));
        let gateway = Arc::new(Gateway {
            topology: snapshots.cell(),
            self_fence: snapshots.self_fence(),
            metrics: self.metrics.clone(),
            request_metrics: data::proxy::metrics::RequestMetrics::new(self.metrics.clone()),
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
        // Never restarted (nor the other listeners): a listener owns its socket and its open
        // connections, both gone with it. The gateway stays not ready instead, so that it is
        // replaced.
        self.tasks.spawn_once(
            "proxy_listener",
            data::server::serve_accepting_apart(
                bound.proxy,
                gateway,
                proxy_settings,
                self.shutdown.clone(),
            ),
        );
        let mut redirect_addr = None;
        if let Some(addr) = config.tls.as_ref().and_then(|t| t.redirect_http) {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (redirect_http)"))?;
            redirect_addr = Some(listener.local_addr()?);
            let redirect = Arc::new(data::server::Redirect {
                https_port: bound.proxy_addr.port(),
            });
            self.tasks.spawn_once(
                "redirect_listener",
                data::server::serve(listener, redirect, settings.clone(), self.shutdown.clone()),
            );
        }
        // Restartable: the samples live in the shared history; a new sampler goes on from the
        // last reading.
        let console = operator::admin::console::History::new();
        {
            let (history, metrics, shutdown) =
                (console.clone(), self.metrics.clone(), self.shutdown.clone());
            self.tasks.spawn_restarting("console_sampler", move || {
                history.clone().run(metrics.clone(), shutdown.clone())
            });
        }
        let admin = Arc::new(operator::admin::Admin {
            snapshots: snapshots.clone(),
            metrics: self.metrics.clone(),
            admission,
            health: health.clone(),
            file_overrides,
            token: config.admin_token.clone(),
            tls: certificates,
            tasks: self.tasks.clone(),
            console,
        });
        self.tasks.spawn_once(
            "admin_listener",
            data::server::serve(bound.admin, admin, settings, self.shutdown.clone()),
        );
        tracing::info!(proxy = %bound.proxy_addr, admin = %bound.admin_addr, tls = scheme == "https", redirect = ?redirect_addr, "shardgate serving");
        Ok(redirect_addr)
    }
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
