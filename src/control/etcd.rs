//! etcd as the cluster's source of truth (DESIGN.md §6). This file holds what every etcd user
//! shares: the key layout under `/shardgate/<cluster>/`, a connection whose every call has a
//! deadline, and the cluster's keys read into one value ([`ClusterKeys`]).
//!
//! - [`source`]: the gateway's reload path in etcd mode: list once, one watch, rebuild and
//!   publish the whole snapshot on every change; reconnect, resume or re-list as needed.
//! - [`cache`]: the last good snapshot on disk, so a gateway boots while etcd is down.
//! - [`registry`]: `gateway/<instance>` under a lease, carrying the applied revision.
//! - [`leader`]: the elected failover decider: majority health decisions, fenced moves.
//! - The operator side (read the cluster, push with compare-and-swap, degrade, wait) is
//!   [`crate::operator::cluster`].

pub mod cache;
pub mod leader;
pub mod registry;
pub mod source;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions, WatchOptions,
    WatchStream,
};
use serde::{Deserialize, Serialize};

use crate::control::topology::overrides::{MovePhase, MoveRecord};
use crate::control::topology::{
    DegradeOverride, IdcOverride, Overrides, Problem, Problems, RawTopology,
};

/// The default deadline of one etcd call (DESIGN.md §10).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// HTTP/2 pings on the connection: a watch that waits for events has no deadline of its own,
/// so a peer that vanished without closing the connection is noticed by these instead. Not
/// more often: etcd drops clients that ping more often than every 5 s (`too_many_pings`).
const PING_INTERVAL: Duration = Duration::from_secs(10);

/// The keys of one cluster (DESIGN.md §6).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// What a key under the cluster's prefix is, by its name relative to the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Topology,
    IdcOverride(String),
    DegradeOverride(String),
    Move(String),
    Gateway(String),
    Leader,
    Unknown,
}

impl KeyKind {
    pub fn of(relative: &str) -> KeyKind {
        if relative == "topology" {
            return KeyKind::Topology;
        }
        // The election keeps one key per candidate under `leader/`.
        if relative == "leader" || relative.starts_with("leader/") {
            return KeyKind::Leader;
        }
        let named = |prefix: &str| {
            relative
                .strip_prefix(prefix)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        if let Some(n) = named("override/idc/") {
            KeyKind::IdcOverride(n)
        } else if let Some(n) = named("override/degrade/") {
            KeyKind::DegradeOverride(n)
        } else if let Some(n) = named("move/") {
            KeyKind::Move(n)
        } else if let Some(n) = named("gateway/") {
            KeyKind::Gateway(n)
        } else {
            KeyKind::Unknown
        }
    }

    /// Part of the effective snapshot (document + overrides + moves): a change rebuilds it.
    /// Gateway registrations and the leader key are not: rebuilding on them would make every
    /// gateway's registration update trigger a rebuild everywhere, forever.
    pub fn shapes_snapshot(&self) -> bool {
        matches!(
            self,
            KeyKind::Topology
                | KeyKind::IdcOverride(_)
                | KeyKind::DegradeOverride(_)
                | KeyKind::Move(_)
        )
    }
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            prefix: format!("/shardgate/{cluster}/"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn topology(&self) -> String {
        format!("{}topology", self.prefix)
    }

    pub fn idc_override(&self, idc: &str) -> String {
        format!("{}override/idc/{idc}", self.prefix)
    }

    pub fn degrade_override(&self, target: &str) -> String {
        format!("{}override/degrade/{target}", self.prefix)
    }

    pub fn move_record(&self, id: &str) -> String {
        format!("{}move/{id}", self.prefix)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn gateway(&self, instance: &str) -> String {
        format!("{}gateway/{instance}", self.prefix)
    }

    /// The key's name relative to the prefix, when it is a UTF-8 key under it.
    pub fn relative<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }
}

/// One stored value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

impl Stored {
    /// The value read as JSON of type `T`. The error says what it should have been: `what`
    /// ("a move record") gives "not a move record: <serde's reason>".
    pub fn decode<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<T, String> {
        serde_json::from_slice(&self.value).map_err(|e| format!("not {what}: {e}"))
    }
}

/// `gateway/<instance>`: what each gateway reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    #[serde(default)]
    pub idc: Option<String>,
    /// The proxy listener.
    #[serde(default)]
    pub addr: String,
    /// The admin listener.
    #[serde(default)]
    pub admin: String,
    /// Revision of the snapshot it serves.
    #[serde(default)]
    pub applied_revision: u64,
    /// IDC name → healthy, as this gateway sees it.
    #[serde(default)]
    pub view: BTreeMap<String, bool>,
    #[serde(default)]
    pub started_at: u64,
}

/// Every key of one cluster, by name relative to the prefix, as of `revision`.
#[derive(Debug, Clone, Default)]
pub struct ClusterKeys {
    /// The etcd revision this view reflects.
    pub revision: i64,
    pub keys: BTreeMap<String, Stored>,
}

impl ClusterKeys {
    /// A transaction guard: nothing under `relative` (a prefix) was created or changed since
    /// this view was read. (A removal leaves no revision behind: guard such a key itself.)
    pub fn unchanged_under(&self, keys: &Keys, relative: &str) -> etcd_client::Compare {
        etcd_client::Compare::mod_revision(
            format!("{}{relative}", keys.prefix()),
            etcd_client::CompareOp::Less,
            self.revision + 1,
        )
        .with_prefix()
    }

    pub fn topology(&self) -> Option<&Stored> {
        self.keys.get("topology")
    }

    /// The document's text and its parse, or why there is none.
    pub fn document(&self, keys: &Keys) -> Result<(String, RawTopology), Problems> {
        let Some(stored) = self.topology() else {
            return Err(Problems(vec![Problem::new(
                keys.topology(),
                "no topology document in etcd yet (write one with `shardgate push`)",
            )]));
        };
        let text = String::from_utf8(stored.value.clone()).map_err(|_| {
            Problems(vec![Problem::new(
                keys.topology(),
                "the value is not UTF-8",
            )])
        })?;
        let doc = RawTopology::parse(&text)?;
        Ok((text, doc))
    }

    /// The overrides, every unreadable one listed as a problem.
    pub fn overrides(&self, keys: &Keys) -> Result<Overrides, Problems> {
        let mut overrides = Overrides::default();
        let mut problems = Vec::new();
        for (name, stored) in &self.keys {
            let kind = KeyKind::of(name);
            // The revisions that decide owner epochs (`topology::epochs`): the document, IDC
            // overrides and move records.
            if matches!(
                kind,
                KeyKind::Topology | KeyKind::IdcOverride(_) | KeyKind::Move(_)
            ) {
                overrides
                    .revisions
                    .insert(name.clone(), stored.mod_revision.max(0) as u64);
            }
            let at = || format!("{}{name}", keys.prefix());
            match kind {
                KeyKind::IdcOverride(idc) => {
                    match stored
                        .decode::<IdcOverride>(r#"an IDC override ({"state","reason","by"})"#)
                    {
                        Ok(o) => {
                            overrides.idcs.insert(idc, o);
                        }
                        Err(e) => problems.push(Problem::new(at(), e)),
                    }
                }
                KeyKind::DegradeOverride(target) => {
                    match stored
                        .decode::<DegradeOverride>(r#"a degrade override ({"on","reason","by"})"#)
                    {
                        Ok(o) => {
                            overrides.degrade.insert(target, o);
                        }
                        Err(e) => problems.push(Problem::new(at(), e)),
                    }
                }
                KeyKind::Move(id) => {
                    match stored
                        .decode::<MoveRecord>(r#"a move record ({"kind","ranges","phase",…})"#)
                    {
                        Ok(mut record) => {
                            if record.phase == MovePhase::Fencing || record.fence_revision == 0 {
                                record.fence_revision = stored.mod_revision.max(0) as u64;
                            }
                            overrides.moves.insert(id, record);
                        }
                        Err(e) => problems.push(Problem::new(at(), e)),
                    }
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(overrides)
        } else {
            Err(Problems(problems))
        }
    }

    /// Registered gateways by instance name; an unreadable record is reported as such.
    pub fn gateways(&self) -> Vec<(String, Result<GatewayRecord, String>)> {
        self.keys
            .iter()
            .filter_map(|(name, stored)| match KeyKind::of(name) {
                KeyKind::Gateway(instance) => Some((
                    instance,
                    serde_json::from_slice(&stored.value).map_err(|e| e.to_string()),
                )),
                _ => None,
            })
            .collect()
    }

    /// Move records, as stored.
    pub fn moves(&self) -> Vec<(String, serde_json::Value)> {
        self.keys
            .iter()
            .filter_map(|(name, stored)| match KeyKind::of(name) {
                KeyKind::Move(id) => Some((
                    id,
                    serde_json::from_slice(&stored.value).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&stored.value).into())
                    }),
                )),
                _ => None,
            })
            .collect()
    }

    /// The elected failover leader's instance name: the election's value on the candidate key
    /// created first (a candidate key is written once, so its mod revision is its creation).
    pub fn leader(&self) -> Option<String> {
        self.keys
            .iter()
            .filter(|(name, _)| name.starts_with("leader/"))
            .min_by_key(|(_, s)| s.mod_revision)
            .map(|(_, s)| String::from_utf8_lossy(&s.value).into_owned())
    }

    /// The newest revision among the keys that shape the snapshot: a gateway that applied less
    /// than this has not seen the latest document or override.
    pub fn content_revision(&self) -> i64 {
        self.keys
            .iter()
            .filter(|(name, _)| KeyKind::of(name).shapes_snapshot())
            .map(|(_, s)| s.mod_revision)
            .max()
            .unwrap_or(0)
    }
}

/// An etcd call that failed or did not answer in time. Never fatal: callers retry or report.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EtcdError(pub String);

pub use crate::config::{EtcdAccess, Password, PASSWORD_ENV};

impl EtcdAccess {
    pub fn new(endpoints: Vec<String>) -> EtcdAccess {
        EtcdAccess {
            endpoints,
            ..EtcdAccess::default()
        }
    }

    /// Everything wrong with it, listed at once (files are read here, so a bad path or a bad
    /// PEM is reported at start-up rather than on the first reconnect).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let tls = self.ca.is_some() || self.cert.is_some();
        if self.cert.is_some() != self.key.is_some() {
            problems.push("etcd_cert and etcd_key: give both or neither".into());
        }
        if self.cert.is_some() && self.ca.is_none() {
            problems.push("etcd_cert: a client certificate needs etcd_ca (TLS to etcd)".into());
        }
        for e in &self.endpoints {
            let e = e.trim();
            if tls && e.starts_with("http://") {
                problems.push(format!(
                    "etcd: `{e}` is plain http but etcd_ca/etcd_cert ask for TLS (use https://)"
                ));
            }
            if self.ca.is_none() && e.starts_with("https://") {
                problems.push(format!(
                    "etcd: `{e}` is https; give the CA bundle that signs etcd's certificate (etcd_ca, --etcd-ca)"
                ));
            }
        }
        if self.password.is_some() && self.user.as_deref().is_none_or(str::is_empty) {
            problems.push(format!(
                "etcd password given ({PASSWORD_ENV}) without a user (etcd_user, --etcd-user)"
            ));
        }
        if let Err(e) = self.tls_options() {
            problems.push(e.0);
        }
        problems
    }

    /// The rustls client configuration (through tonic), when TLS is on.
    fn tls_options(&self) -> Result<Option<TlsOptions>, EtcdError> {
        let Some(ca) = &self.ca else {
            return Ok(None);
        };
        let read = |what: &str, path: &PathBuf| {
            let pem = std::fs::read(path)
                .map_err(|e| EtcdError(format!("{what} {}: {e}", path.display())))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
                return Err(EtcdError(format!(
                    "{what} {}: not a PEM file",
                    path.display()
                )));
            }
            Ok(pem)
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd_ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(
                read("etcd_cert", cert)?,
                read("etcd_key", key)?,
            ));
        }
        Ok(Some(tls))
    }
}

/// A connection to etcd whose every call has the same deadline.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    timeout: Duration,
    endpoints: String,
}

impl Etcd {
    /// Connects lazily: an unreachable etcd shows up on the first call, within its deadline.
    /// With a user it authenticates at once, so a wrong password is this call's error.
    pub async fn connect(access: &EtcdAccess, timeout: Duration) -> Result<Etcd, EtcdError> {
        let endpoints: Vec<&str> = access
            .endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        let shown = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(EtcdError("no etcd endpoint given (--etcd URL)".into()));
        }
        let mut options = ConnectOptions::default()
            .with_connect_timeout(timeout)
            .with_keep_alive(PING_INTERVAL, timeout);
        if let Some(tls) = access.tls_options()? {
            options = options.with_tls(tls);
        }
        if let Some(user) = access.user.as_deref().filter(|u| !u.is_empty()) {
            // etcd's auth tokens expire (5 min by default): a long-running gateway must get a
            // new one rather than fail every call after that.
            options = options
                .with_user(user, access.password.clone().unwrap_or_default().0)
                .with_auto_token_refresh(true);
        }
        let client =
            match tokio::time::timeout(timeout, Client::connect(&endpoints, Some(options))).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(EtcdError(connect_failure(&shown, access, &e))),
                Err(_) => {
                    return Err(EtcdError(format!(
                        "cannot reach etcd at {shown}: no answer within {} ms",
                        timeout.as_millis()
                    )))
                }
            };
        Ok(Etcd {
            client,
            timeout,
            endpoints: shown,
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A handle for one call (the client is cheap to clone; calls take it by `&mut`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd call under the deadline, naming it in the error.
    pub async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(EtcdError(format!(
                "etcd at {}: {what} failed: {e}",
                self.endpoints
            ))),
            Err(_) => Err(EtcdError(format!(
                "etcd at {}: {what}: no answer within {} ms",
                self.endpoints,
                self.timeout.as_millis()
            ))),
        }
    }

    /// Reads every key of the cluster at one revision.
    pub async fn list(&self, keys: &Keys) -> Result<ClusterKeys, EtcdError> {
        let mut client = self.client();
        let resp = self
            .call(
                "list",
                client.get(keys.prefix(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut listed = ClusterKeys {
            revision,
            keys: BTreeMap::new(),
        };
        for kv in resp.kvs() {
            if let Some(name) = keys.relative(kv.key()) {
                listed.keys.insert(
                    name.to_owned(),
                    Stored {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                );
            }
        }
        Ok(listed)
    }

    /// etcd's current revision (a count-only read of the document key).
    pub async fn revision(&self, keys: &Keys) -> Result<i64, EtcdError> {
        let mut client = self.client();
        let resp = self
            .call(
                "read the revision",
                client.get(keys.topology(), Some(GetOptions::new().with_count_only())),
            )
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Opens the one watch on the cluster's prefix, from `revision` on.
    pub async fn watch(&self, keys: &Keys, revision: i64) -> Result<WatchStream, EtcdError> {
        let mut client = self.client();
        self.call(
            "watch",
            client.watch(
                keys.prefix(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision),
                ),
            ),
        )
        .await
    }
}

/// Says whether etcd refused the credentials or could not be reached at all: the operator's
/// fix differs (the password, or the network).
fn connect_failure(shown: &str, access: &EtcdAccess, e: &etcd_client::Error) -> String {
    if let (Some(user), etcd_client::Error::GRpcStatus(status)) = (&access.user, e) {
        let m = status.message();
        if m.contains("authentication failed") || m.contains("user name") || m.contains("auth") {
            return format!(
                "etcd at {shown} refused user `{user}`: {m} (check --etcd-user and {PASSWORD_ENV})"
            );
        }
    }
    format!("cannot reach etcd at {shown}: {e}")
}

/// Capped exponential backoff with jitter between reconnect attempts (cap 2 s, DESIGN.md §6).
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    pub const CAP: Duration = Duration::from_secs(2);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The next delay: doubles up to the cap; jittered into its upper half so that many
    /// gateways losing etcd together do not come back in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        d.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn key_kinds() {
        let keys = Keys::new("demo");
        assert_eq!(keys.topology(), "/shardgate/demo/topology");
        let rel = keys
            .relative(b"/shardgate/demo/override/degrade/route:orders")
            .unwrap();
        assert_eq!(
            KeyKind::of(rel),
            KeyKind::DegradeOverride("route:orders".into())
        );
        assert_eq!(
            KeyKind::of("override/idc/sh"),
            KeyKind::IdcOverride("sh".into())
        );
        assert_eq!(KeyKind::of("gateway/gw-1"), KeyKind::Gateway("gw-1".into()));
        assert_eq!(KeyKind::of("move/7"), KeyKind::Move("7".into()));
        assert_eq!(KeyKind::of("leader"), KeyKind::Leader);
        assert_eq!(KeyKind::of("leader/694d7a1b"), KeyKind::Leader);
        assert_eq!(KeyKind::of("override/idc/"), KeyKind::Unknown);
        assert!(keys.relative(b"/shardgate/other/topology").is_none());
        assert!(KeyKind::Topology.shapes_snapshot());
        assert!(!KeyKind::Gateway("x".into()).shapes_snapshot());
    }

    #[test]
    fn overrides_and_problems_from_keys() {
        let keys = Keys::new("c");
        let mut ck = ClusterKeys::default();
        let put = |ck: &mut ClusterKeys, k: &str, v: &str, rev: i64| {
            ck.keys.insert(
                k.into(),
                Stored {
                    value: v.as_bytes().to_vec(),
                    mod_revision: rev,
                },
            );
        };
        put(
            &mut ck,
            "override/idc/sh",
            r#"{"state":"down","reason":"x"}"#,
            5,
        );
        put(&mut ck, "override/degrade/noncore", r#"{"on":true}"#, 6);
        put(&mut ck, "gateway/g1", r#"{"applied_revision":9}"#, 9);
        put(
            &mut ck,
            "move/m1",
            r#"{"kind":"move","ranges":["0-63"],"to":"bj","phase":"fencing"}"#,
            8,
        );
        let o = ck.overrides(&keys).unwrap();
        assert_eq!(o.moves["m1"].fence_revision, 8);
        assert_eq!(o.moves["m1"].phase, MovePhase::Fencing);
        assert_eq!(o.idcs["sh"].state, crate::control::topology::IdcState::Down);
        assert!(o.degrade["noncore"].on);
        assert_eq!(ck.content_revision(), 8);
        assert_eq!(ck.gateways()[0].1.as_ref().unwrap().applied_revision, 9);
        assert!(ck.document(&keys).is_err());
        put(&mut ck, "override/idc/bj", "nope", 7);
        let p = ck.overrides(&keys).unwrap_err();
        assert_eq!(p.0.len(), 1);
        assert!(p.0[0].at.ends_with("override/idc/bj"), "{p}");
        assert!(
            p.0[0]
                .reason
                .starts_with(r#"not an IDC override ({"state","reason","by"}): "#),
            "{p}"
        );
        put(&mut ck, "move/m2", "[]", 10);
        put(&mut ck, "override/degrade/core", "1", 11);
        let p = ck.overrides(&keys).unwrap_err();
        assert_eq!(p.0.len(), 3, "{p}");
        assert!(p.0.iter().any(|p| p.at.ends_with("move/m2")
            && p.reason
                .starts_with(r#"not a move record ({"kind","ranges","phase",…}): "#)));
        assert!(p.0.iter().any(|p| p.at.ends_with("override/degrade/core")
            && p.reason
                .starts_with(r#"not a degrade override ({"on","reason","by"}): "#)));
    }

    #[test]
    fn a_stored_value_decodes_or_says_what_it_should_be() {
        let stored = |v: &str| Stored {
            value: v.as_bytes().to_vec(),
            mod_revision: 1,
        };
        let n: u32 = stored("7").decode("a number").unwrap();
        assert_eq!(n, 7);
        let e = stored("x").decode::<u32>("a number").unwrap_err();
        assert!(e.starts_with("not a number: expected value"), "{e}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = b.next_delay();
            assert!(last <= Backoff::CAP);
        }
        assert!(last >= Backoff::CAP / 2);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
