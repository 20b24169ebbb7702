//! TLS to backends (an IDC's `tls = { ca, server_name }`): the gateway connects with rustls,
//! trusting only that CA bundle, checking the configured name (or the backend's IP), offering
//! ALPN http/1.1. The backend here is a real TLS server on 127.0.0.1 with a certificate made
//! at test time (rcgen).

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shardgate::Running;
use support::{eventually, get, send};
use tokio::net::TcpListener;

type Ca = CertifiedIssuer<'static, KeyPair>;

fn test_ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// What the TLS backend saw of each connection: (SNI, ALPN).
type Seen = Arc<Mutex<Vec<(Option<String>, Option<Vec<u8>>)>>>;

/// A TLS backend whose certificate (for `names`, signed by `ca`) answers every request with
/// `tls-backend <path>`; the handshakes it saw are recorded.
async fn tls_backend(ca: &Ca, names: &[&str]) -> (SocketAddr, Seen) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = params.signed_by(&key, ca).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()];
    let private = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, private)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                record.lock().unwrap().push((
                    conn.server_name().map(str::to_owned),
                    conn.alpn_protocol().map(<[u8]>::to_vec),
                ));
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = format!("tls-backend {}", req.uri().path());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn topology(backend: SocketAddr, tls: &str) -> String {
    format!(
        "cluster = \"t\"\n[sets.core]\n\n[[idcs]]\nname = \"far\"\npools.core = [\"{backend}\"]\n{tls}\n\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nset = \"core\"\nsharded = false\ntimeout_ms = 5000\n\n[failover]\nfence_ms = 5000\n"
    )
}

async fn gateway(dir: &Path, text: &str) -> Running {
    support::gateway_on_topology(dir, text, |config| {
        config.timeouts.drain = Duration::from_secs(2)
    })
    .await
}

fn write_ca(dir: &Path, ca: &Ca) -> String {
    let path = dir.join("upstream-ca.pem");
    std::fs::write(&path, ca.pem()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idc_with_tls_is_reached_over_tls_with_its_ca_and_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca("upstream CA");
    let (backend, seen) = tls_backend(&ca, &["api.far.internal"]).await;
    let ca_path = write_ca(dir.path(), &ca);
    let tls = format!("tls = {{ ca = \"{ca_path}\", server_name = \"api.far.internal\" }}");
    let gw = gateway(dir.path(), &topology(backend, &tls)).await;

    for i in 0..3 {
        let reply = send(gw.proxy_addr, get(&format!("/api/{i}"), &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), format!("tls-backend /api/{i}"));
    }
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the backend saw TLS handshakes");
    for (sni, alpn) in &seen {
        assert_eq!(sni.as_deref(), Some("api.far.internal"));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_server_name_the_backend_ip_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca("upstream CA");
    let (backend, seen) = tls_backend(&ca, &["127.0.0.1"]).await;
    let ca_path = write_ca(dir.path(), &ca);
    let gw = gateway(
        dir.path(),
        &topology(backend, &format!("tls = {{ ca = \"{ca_path}\" }}")),
    )
    .await;
    let reply = send(gw.proxy_addr, get("/api/ip", &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "tls-backend /api/ip");
    // An IP address is never sent as SNI.
    assert_eq!(seen.lock().unwrap()[0].0, None);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_not_signed_by_the_ca_or_not_named_is_a_502() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = test_ca("trusted CA");
    let other = test_ca("another CA");
    // Signed by another CA.
    let (stranger, _) = tls_backend(&other, &["api.far.internal"]).await;
    let ca_path = write_ca(dir.path(), &trusted);
    let tls = format!("tls = {{ ca = \"{ca_path}\", server_name = \"api.far.internal\" }}");
    let gw = gateway(dir.path(), &topology(stranger, &tls)).await;
    let reply = send(gw.proxy_addr, get("/api/x", &[])).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(
        reply.json()["error"],
        "upstream_connect",
        "{}",
        reply.text()
    );
    gw.shutdown().await;

    // Signed by the right CA, for another name.
    let (misnamed, _) = tls_backend(&trusted, &["other.internal"]).await;
    let gw = gateway(dir.path(), &topology(misnamed, &tls)).await;
    let reply = send(gw.proxy_addr, get("/api/x", &[])).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    gw.shutdown().await;

    // A plain backend behind an IDC that asks for TLS: never spoken to in clear text.
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4096];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let gw = gateway(dir.path(), &topology(plain_addr, &tls)).await;
    let reply = send(gw.proxy_addr, get("/api/secret", &[])).await;
    assert!(
        reply.status == StatusCode::BAD_GATEWAY || reply.status == StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.status
    );
    let got = got.lock().unwrap().clone();
    assert!(
        !String::from_utf8_lossy(&got).contains("/api/secret"),
        "the request went out in clear text"
    );
    gw.shutdown().await;
}

/// Fast probes that give up on a backend after two failures, so a handful of cycles decides.
const FAST_PROBES: &str =
    "health = { path = \"/healthz\", interval_ms = 50, timeout_ms = 2000, rise = 1, fall = 2 }";

/// The one backend of the `far` IDC's core pool in the gateway's current snapshot.
fn far_backend(gw: &Running) -> Arc<shardgate::data::upstream::Backend> {
    let t = gw.snapshots.current().unwrap();
    t.idcs[0].pools[0][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_idc_stays_in_service_through_many_probe_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca("upstream CA");
    let (backend, seen) = tls_backend(&ca, &["api.far.internal"]).await;
    let ca_path = write_ca(dir.path(), &ca);
    let tls = format!(
        "tls = {{ ca = \"{ca_path}\", server_name = \"api.far.internal\" }}\n{FAST_PROBES}"
    );
    let gw = gateway(dir.path(), &topology(backend, &tls)).await;
    let far = far_backend(&gw);

    // Ten probe cycles: with fall = 2, plaintext probes would have called it dead long before.
    eventually("ten health probes of the TLS backend", || {
        let n = far.health.probes();
        async move { (n >= 10).then_some(()) }
    })
    .await;
    assert!(
        far.health.probe_healthy(),
        "the probes call the TLS backend unhealthy"
    );
    assert_eq!(gw.health.idc_healthy("far"), Some(true));
    let reply = send(gw.proxy_addr, get("/api/after-probes", &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "tls-backend /api/after-probes");
    // The probes spoke TLS with the IDC's server name, like the traffic.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 10, "only {} TLS handshakes", seen.len());
    assert!(seen
        .iter()
        .all(|(sni, _)| sni.as_deref() == Some("api.far.internal")));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_the_idc_ca_does_not_trust_fails_its_probes() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = test_ca("trusted CA");
    let other = test_ca("another CA");
    let (stranger, _) = tls_backend(&other, &["api.far.internal"]).await;
    let ca_path = write_ca(dir.path(), &trusted);
    let tls = format!(
        "tls = {{ ca = \"{ca_path}\", server_name = \"api.far.internal\" }}\n{FAST_PROBES}"
    );
    let gw = gateway(dir.path(), &topology(stranger, &tls)).await;
    let far = far_backend(&gw);
    // No request is sent, so no passive ejection: the probes alone decide.
    eventually("the probes to call the untrusted backend unhealthy", || {
        let down = !far.health.probe_healthy();
        async move { down.then_some(()) }
    })
    .await;
    assert!(!far.health.ejected(), "only the probes were to judge it");
    eventually("the IDC to be unhealthy in the gateway's view", || {
        let healthy = gw.health.idc_healthy("far");
        async move { (healthy == Some(false)).then_some(()) }
    })
    .await;
    gw.shutdown().await;
}

#[test]
fn an_unreadable_ca_or_bad_server_name_is_listed_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let text = format!(
        "cluster = \"t\"\n[sets.core]\n\
         [[idcs]]\nname = \"a\"\npools.core = [\"127.0.0.1:1\"]\ntls = {{ ca = \"/nonexistent/ca.pem\" }}\n\
         [[idcs]]\nname = \"b\"\npools.core = [\"127.0.0.1:2\"]\ntls = {{ ca = \"{}\" }}\n\
         [[idcs]]\nname = \"c\"\npools.core = [\"127.0.0.1:3\"]\ntls = {{ ca = \"{}\", server_name = \"not a name\" }}\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nset = \"core\"\nsharded = false\n",
        not_pem.display(),
        write_ca(dir.path(), &test_ca("ok")),
    );
    let path = dir.path().join("t.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("idcs[0].tls.ca"), "{all}");
    assert!(all.contains("cannot read `/nonexistent/ca.pem`"), "{all}");
    assert!(all.contains("idcs[1].tls.ca"), "{all}");
    assert!(all.contains("idcs[2].tls.server_name"), "{all}");
}
