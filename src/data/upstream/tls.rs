//! TLS towards backends (an IDC's `tls = { ca, server_name }` in the topology): one rustls
//! client configuration per IDC, built with the snapshot, trusting only that CA bundle and
//! offering ALPN `http/1.1` (the upstream side speaks HTTP/1.1).

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How to speak TLS to the backends of one IDC.
pub struct UpstreamTls {
    connector: TlsConnector,
    /// The name checked against the backend's certificate; `None`: its IP address.
    server_name: Option<ServerName<'static>>,
    /// Changes when the CA bundle's content or the name changes: part of a backend's identity,
    /// so a new CA gets new connections rather than reusing ones verified against the old.
    id: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("id", &self.id)
            .finish()
    }
}

/// Which field a problem belongs to, and the problem.
pub type TlsProblem = (&'static str, String);

impl UpstreamTls {
    /// Reads the CA bundle (PEM, at least one certificate) and checks the server name.
    pub fn load(ca: &str, server_name: Option<&str>) -> Result<UpstreamTls, TlsProblem> {
        if ca.is_empty() {
            return Err(("tls.ca", "needs the path of a PEM CA bundle".into()));
        }
        let pem = std::fs::read(Path::new(ca))
            .map_err(|e| ("tls.ca", format!("cannot read `{ca}`: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                (
                    "tls.ca",
                    format!("`{ca}` is not a PEM certificate bundle: {e}"),
                )
            })?;
        if certs.is_empty() {
            return Err(("tls.ca", format!("`{ca}` holds no certificate")));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ("tls.ca", format!("`{ca}`: unusable CA certificate: {e}")))?;
        }
        let server_name = match server_name {
            None => None,
            Some(name) => Some(ServerName::try_from(name.to_owned()).map_err(|_| {
                (
                    "tls.server_name",
                    format!("`{name}` is not a DNS name or IP address"),
                )
            })?),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ("tls", format!("TLS configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pem.hash(&mut hasher);
        server_name.hash(&mut hasher);
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            id: hasher.finish(),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The handshake over an open connection to `addr` (the caller bounds it in time).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        self.connector.connect(name, tcp).await
    }
}
