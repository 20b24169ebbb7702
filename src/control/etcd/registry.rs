//! The gateway registry (DESIGN.md §6): each instance keeps `gateway/<instance>` = JSON
//! `{"idc","addr","applied_revision","view"}` under a 5 s lease that it keeps alive. The key is
//! rewritten when the applied revision or the health view (`Health`) changes, revoked on
//! graceful shutdown (gone at once), and expires with the lease when the process dies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use tokio::sync::watch;

use super::{Backoff, Etcd, EtcdError, GatewayRecord, Keys};
use crate::control::health::Health;
use crate::control::source::Snapshots;
use crate::control::tasks::shutdown_requested;
use crate::control::topology::overrides::unix_now;

/// Lease TTL of a registration (DESIGN.md §6).
pub const LEASE_TTL_S: i64 = 5;

/// Keep-alives are sent this often: a fifth of the TTL, so that a few lost ones (or a slow
/// etcd) still renew the lease in time.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(1);

/// How often the registration is compared with this gateway's health view (rewritten only
/// when it changed).
const VIEW_EVERY: Duration = Duration::from_millis(100);

/// What this gateway registers as.
#[derive(Debug, Clone)]
pub struct Registration {
    pub access: super::EtcdAccess,
    pub cluster: String,
    pub instance: String,
    pub idc: Option<String>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Deadline of every etcd call.
    pub timeout: Duration,
}

impl Registry {
    fn fence_writes(&self) {
        self.snapshots.self_fence().unregistered();
        self.report_fence();
    }

    fn report_fence(&self) {
        let m = self.snapshots.metrics();
        m.self_fenced
            .set(i64::from(self.snapshots.self_fence().check().is_err()));
        m.acknowledged_revision
            .set(self.snapshots.acknowledged() as i64);
    }
}

/// The default instance name: `<hostname>:<proxy port>`.
pub fn default_instance(proxy_addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    format!("{host}:{}", proxy_addr.port())
}

pub struct Registry {
    registration: Registration,
    keys: Keys,
    snapshots: Arc<Snapshots>,
    /// Where the registration's `view` comes from.
    health: Arc<Health>,
    started_at: u64,
    /// The lease of the current session, revoked on shutdown.
    lease: Option<(Etcd, i64)>,
    /// Registered in the current session (a lost registration is logged once per outage).
    registered: bool,
}

impl Registry {
    pub fn new(
        registration: Registration,
        snapshots: Arc<Snapshots>,
        health: Arc<Health>,
    ) -> Registry {
        Registry {
            keys: Keys::new(&registration.cluster),
            registration,
            snapshots,
            health,
            started_at: unix_now(),
            lease: None,
            registered: false,
        }
    }

    fn record(&self) -> GatewayRecord {
        let topo = self.snapshots.current();
        GatewayRecord {
            idc: self.registration.idc.clone(),
            addr: self.registration.proxy_addr.to_string(),
            admin: self.registration.admin_addr.to_string(),
            // What this gateway truly applied: served, cached, and no write admitted under an
            // older snapshot still in flight (the fence acknowledgement the leader waits for).
            applied_revision: topo.as_ref().map_or(0, |_| self.snapshots.acknowledged()),
            view: self.health.idc_view(),
            started_at: self.started_at,
        }
    }

    /// Keeps the registration until `shutdown` turns true, then revokes it.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut revisions = self.snapshots.subscribe();
        let mut views = self.health.subscribe();
        let mut backoff = Backoff::new();
        let mut outage_logged = false;
        loop {
            let err = tokio::select! {
                err = self.session(&mut revisions, &mut views, &mut backoff) => err,
                _ = shutdown_requested(&mut shutdown) => break,
            };
            // Nothing renews the lease now: stop writing at once rather than at its deadline.
            self.fence_writes();
            if std::mem::take(&mut self.registered) || !outage_logged {
                tracing::warn!(instance = %self.registration.instance, error = %err, "gateway not registered in etcd; retrying");
                outage_logged = true;
            } else {
                tracing::debug!(instance = %self.registration.instance, error = %err, "still cannot register");
            }
            self.lease = None;
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown_requested(&mut shutdown) => break,
            }
        }
        self.fence_writes();
        if let Some((etcd, lease)) = self.lease.take() {
            let mut client = etcd.client();
            match etcd.call("lease revoke", client.lease_revoke(lease)).await {
                Ok(_) => {
                    tracing::info!(instance = %self.registration.instance, "gateway registration revoked")
                }
                Err(e) => {
                    tracing::warn!(instance = %self.registration.instance, error = %e, "could not revoke the registration; it expires with its lease")
                }
            }
        }
    }

    /// Grants a lease, writes the record and keeps both fresh; returns why it stopped.
    async fn session(
        &mut self,
        revisions: &mut watch::Receiver<u64>,
        views: &mut watch::Receiver<u64>,
        backoff: &mut Backoff,
    ) -> EtcdError {
        let r = &self.registration;
        let etcd = match Etcd::connect(&r.access, r.timeout).await {
            Ok(e) => e,
            Err(e) => return e,
        };
        let mut client = etcd.client();
        // The lease's TTL runs from when etcd granted it, which is after this instant: a
        // deadline counted from here is never later than etcd's.
        let mut renewed_from = Instant::now();
        let lease = match etcd
            .call("lease grant", client.lease_grant(LEASE_TTL_S, None))
            .await
        {
            Ok(l) => l.id(),
            Err(e) => return e,
        };
        self.lease = Some((etcd.clone(), lease));
        let (mut keeper, mut responses) = match etcd
            .call("lease keep-alive", client.lease_keep_alive(lease))
            .await
        {
            Ok(k) => k,
            Err(e) => return e,
        };
        let key = self.keys.gateway(&self.registration.instance);
        let mut written: Option<GatewayRecord> = None;
        let mut tick = tokio::time::interval(KEEP_ALIVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The health view is looked at this often, so the failover leader hears of a dead
        // IDC within a tenth of a second rather than at the next keep-alive.
        let mut look = tokio::time::interval(VIEW_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut notified = true;
        let mut view_notified = true;
        loop {
            let record = self.record();
            if written.as_ref() != Some(&record) {
                let value = match serde_json::to_vec(&record) {
                    Ok(v) => v,
                    Err(e) => return EtcdError(format!("cannot encode the registration: {e}")),
                };
                let put = client.put(
                    key.as_bytes(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                );
                let revision = match etcd.call("register", put).await {
                    Ok(r) => r.header().map_or(0, |h| h.revision()),
                    Err(e) => return e,
                };
                if written.is_none() {
                    tracing::info!(instance = %self.registration.instance, key = %key, revision, "gateway registered");
                    self.registered = true;
                    // Writes open once the source has applied etcd's events up to this
                    // registration: whatever the leader did while this gateway was not
                    // registered is then in its snapshot.
                    self.snapshots.self_fence().registered(
                        u64::try_from(revision).unwrap_or(u64::MAX - 1),
                        renewed_from,
                        Duration::from_secs(LEASE_TTL_S as u64),
                    );
                }
                written = Some(record);
                backoff.reset();
            }
            tokio::select! {
                _ = tick.tick() => {
                    renewed_from = Instant::now();
                    let renewed = etcd
                        .call("lease keep-alive", async {
                            keeper.keep_alive().await?;
                            responses.message().await
                        })
                        .await;
                    match renewed {
                        Ok(Some(resp)) if resp.ttl() > 0 => {
                            if written.is_some() {
                                self.snapshots.self_fence().renewed(
                                    renewed_from,
                                    Duration::from_secs(resp.ttl() as u64),
                                );
                            }
                        }
                        Ok(_) => return EtcdError("the registration lease expired".into()),
                        Err(e) => return e,
                    }
                }
                _ = look.tick() => self.report_fence(),
                changed = revisions.changed(), if notified => {
                    // A closed channel means no more publishes: rely on the tick from now on.
                    notified = changed.is_ok();
                }
                // The health view changed: rewrite the registration at once, so the cluster
                // sees this gateway's view without waiting for the next publish.
                changed = views.changed(), if view_notified => {
                    view_notified = changed.is_ok();
                }
            }
        }
    }
}
