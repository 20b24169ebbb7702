//! TLS termination (DESIGN.md §2, first step after accept): rustls, TLS 1.2 and 1.3 only, ALPN
//! `h2` and `http/1.1`, a certificate chosen by SNI. Certificates are reloaded from disk on
//! change and on SIGHUP: a resolver reads the current set from one `ArcSwap`, so a reload
//! changes only later handshakes and never touches an open connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::config::CertFiles;
use crate::control::source::{hangup_signal, recv_hangup, stamp, Stamp};

/// One certificate as loaded, for logs and `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedCert {
    pub cert: PathBuf,
    pub server_names: Vec<String>,
    /// Certificates in the chain, the end-entity one first.
    pub chain_len: usize,
    pub default: bool,
}

/// The certificates in force: the first is the default (no SNI, or a name none lists).
#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    /// Exact names (lower case) and `*.suffix` wildcards, each to its certificate.
    by_name: HashMap<String, Arc<CertifiedKey>>,
    loaded: Vec<LoadedCert>,
}

impl CertSet {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.by_name.get(&name) {
            return k.clone();
        }
        // A wildcard covers exactly one label, as in certificate matching.
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.by_name.get(&format!("*.{parent}")) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

#[derive(Debug)]
struct Resolver(Arc<ArcSwap<CertSet>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

/// The TLS side of the proxy listener: the acceptor handshakes use, and the certificate files
/// it reloads.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<Certificates>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("certs", &self.certs.loaded())
            .finish()
    }
}

/// The certificate files and the set last loaded from them.
pub struct Certificates {
    files: Vec<CertFiles>,
    current: Arc<ArcSwap<CertSet>>,
    /// Why the last reload was refused, until one succeeds.
    last_error: std::sync::Mutex<Option<String>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads every certificate now; fails, saying which file and why, when one cannot be used.
    pub fn load(files: Vec<CertFiles>) -> anyhow::Result<Tls> {
        let provider = provider();
        let set = load_set(&files, &provider)?;
        let current = Arc::new(ArcSwap::from_pointee(set));
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| anyhow::anyhow!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(current.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let certs = Arc::new(Certificates {
            files,
            current,
            last_error: std::sync::Mutex::new(None),
        });
        for c in certs.loaded() {
            tracing::info!(cert = %c.cert.display(), names = ?c.server_names, default = c.default, chain = c.chain_len, "TLS certificate loaded");
        }
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certs,
        })
    }

    pub fn certificates(&self) -> Arc<Certificates> {
        self.certs.clone()
    }
}

impl Certificates {
    /// What is loaded now.
    pub fn loaded(&self) -> Vec<LoadedCert> {
        self.current.load().loaded.clone()
    }

    /// What `/status` shows: the certificates in force and the last refused reload.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "certs": self.loaded(),
            "last_error": self.last_error.lock().ok().and_then(|e| e.clone()),
        })
    }

    /// Reads every file again and swaps the new set in; on any problem the old set stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = load_set(&self.files, &provider());
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        if let Ok(mut last) = self.last_error.lock() {
            *last = error;
        }
        self.current.store(Arc::new(result?));
        Ok(())
    }

    fn stamps(&self) -> Vec<Option<Stamp>> {
        self.files
            .iter()
            .flat_map(|f| [stamp(&f.cert), stamp(&f.key)])
            .collect()
    }

    /// Polls the files and listens for SIGHUP until `shutdown` turns true. A file that changed
    /// (or a SIGHUP) reloads the whole set; a bad set is logged and the old one kept.
    pub async fn run(self: Arc<Self>, poll: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = hangup_signal();
        let mut seen = self.stamps();
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = recv_hangup(&mut hangup) => true,
                _ = shutdown.changed() => return,
            };
            if *shutdown.borrow() {
                return;
            }
            let now = self.stamps();
            if !forced && now == seen {
                continue;
            }
            // Remembered even when the load fails, so a bad file is reported once, not on
            // every tick; the next change (or SIGHUP) tries again.
            seen = now;
            match self.reload() {
                Ok(()) => {
                    for c in self.loaded() {
                        tracing::info!(cert = %c.cert.display(), names = ?c.server_names, default = c.default, chain = c.chain_len, "TLS certificate reloaded");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "TLS certificates rejected; the previous ones keep serving");
                }
            }
        }
    }
}

fn load_set(files: &[CertFiles], provider: &CryptoProvider) -> anyhow::Result<CertSet> {
    let mut default = None;
    let mut by_name = HashMap::new();
    let mut loaded = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let key = load_certified(&f.cert, &f.key, provider)?;
        for name in &f.server_names {
            by_name
                .entry(name.to_ascii_lowercase())
                .or_insert_with(|| key.clone());
        }
        loaded.push(LoadedCert {
            cert: f.cert.clone(),
            server_names: f.server_names.clone(),
            chain_len: key.cert.len(),
            default: i == 0,
        });
        default.get_or_insert(key);
    }
    let default = default.ok_or_else(|| anyhow::anyhow!("no TLS certificate given"))?;
    Ok(CertSet {
        default,
        by_name,
        loaded,
    })
}

fn load_certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read a PEM certificate chain: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in the file", cert.display());
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("{}: cannot read a PEM private key: {e}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        anyhow::anyhow!(
            "{} with {}: unusable certificate and key: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        let signer = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".into()])
            .unwrap()
            .self_signed(&signer)
            .unwrap();
        let der = PrivateKeyDer::try_from(signer.serialize_der()).unwrap();
        Arc::new(CertifiedKey::from_der(vec![cert.der().clone()], der, &provider()).unwrap())
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let (d, a, w) = (key(), key(), key());
        let set = CertSet {
            default: d.clone(),
            by_name: HashMap::from([("a.test".into(), a.clone()), ("*.w.test".into(), w.clone())]),
            loaded: Vec::new(),
        };
        assert!(Arc::ptr_eq(&set.pick(None), &d));
        assert!(Arc::ptr_eq(&set.pick(Some("A.Test")), &a));
        assert!(Arc::ptr_eq(&set.pick(Some("x.w.test")), &w));
        assert!(Arc::ptr_eq(&set.pick(Some("y.x.w.test")), &d));
        assert!(Arc::ptr_eq(&set.pick(Some("other.test")), &d));
    }
}
