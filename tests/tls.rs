//! TLS termination on a real socket, with a test CA made at test time: ALPN (h2 and
//! http/1.1), SNI choosing the certificate, x-forwarded-proto, certificate reload without
//! dropping connections, a bad certificate refused, the handshake deadline and the redirect
//! listener.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use shardgate::config::{CertFiles, TlsConfig};
use support::{get, within, ClientBody, Cluster, ConfigTweak, Options, Reply, REQUEST_DEADLINE};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

type Ca = CertifiedIssuer<'static, KeyPair>;

fn test_ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "shardgate test CA");
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key"))
        .expect("a self-signed CA")
}

/// A leaf certificate for `names`, signed by `ca`: (cert PEM, key PEM, cert DER).
fn leaf(ca: &Ca, names: &[&str]) -> (String, String, CertificateDer<'static>) {
    let key = KeyPair::generate().expect("a leaf key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = params.signed_by(&key, ca).expect("a signed leaf");
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

/// Writes a file by writing aside and renaming, as a certificate deploy tool would.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write a file");
    std::fs::rename(&tmp, path).expect("move a file in place");
}

/// Writes a certificate and its key into `dir` as `<name>.pem` and `<name>.key`.
fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        server_names: Vec::new(),
    };
    put(&files.key, key);
    put(&files.cert, cert);
    files
}

fn connector(ca: &Ca, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    connector_for(ca, alpn, rustls::DEFAULT_VERSIONS)
}

fn connector_for(
    ca: &Ca,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("the test CA as a root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("client protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects and handshakes with SNI `name`.
async fn handshake(
    addr: SocketAddr,
    ca: &Ca,
    name: &str,
    alpn: &[&[u8]],
) -> Result<TlsStream<TcpStream>, String> {
    within(REQUEST_DEADLINE, "a TLS handshake", async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        connector(ca, alpn)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    })
    .await
}

fn served_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .clone()
}

fn alpn(tls: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

/// An HTTP/1.1 or h2 sender on an established TLS stream, chosen by the ALPN outcome.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ClientBody>),
    H2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

async fn sender(tls: TlsStream<TcpStream>) -> Sender {
    let h2 = alpn(&tls).as_deref() == Some(b"h2");
    let io = TokioIo::new(tls);
    if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("an h2 handshake");
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("an HTTP/1.1 handshake");
        tokio::spawn(conn);
        Sender::H1(s)
    }
}

async fn exchange(s: &mut Sender, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut req = get(path, headers);
    let resp = within(REQUEST_DEADLINE, "an exchange over TLS", async {
        match s {
            Sender::H1(s) => {
                req.headers_mut()
                    .insert(http::header::HOST, host.parse().expect("a host value"));
                s.ready().await.expect("the connection is ready");
                s.send_request(req).await
            }
            Sender::H2(s) => {
                *req.uri_mut() = format!("https://{host}{path}").parse().expect("a URI");
                s.ready().await.expect("the connection is ready");
                s.send_request(req).await
            }
        }
    })
    .await
    .expect("an answer over TLS");
    let (parts, body) = resp.into_parts();
    let body = within(
        REQUEST_DEADLINE,
        "the body",
        http_body_util::BodyExt::collect(body),
    )
    .await
    .expect("the whole body")
    .to_bytes();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

fn tls_options(tls: TlsConfig) -> Options {
    Options {
        tweak: ConfigTweak::new(move |c| {
            c.tls = Some(tls.clone());
            c.file_poll = Duration::from_millis(50);
        }),
        ..Options::default()
    }
}

struct Pki {
    ca: Ca,
    dir: tempfile::TempDir,
}

fn pki() -> Pki {
    Pki {
        ca: test_ca(),
        dir: tempfile::tempdir().expect("a temporary directory"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http1_and_forwarded_proto_is_https() {
    let p = pki();
    let (cert, key, _) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert, &key);
    let c = Cluster::start_with(tls_options(TlsConfig {
        certs: vec![files],
        redirect_http: None,
    }))
    .await;

    let tls = handshake(c.proxy(), &p.ca, "gw.test", &[b"h2", b"http/1.1"])
        .await
        .expect("a TLS handshake");
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let mut s = sender(tls).await;
    let r = exchange(&mut s, "gw.test", "/orders", &[("x-user-id", "u1")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );

    let tls = handshake(c.proxy(), &p.ca, "gw.test", &[b"http/1.1"])
        .await
        .expect("a TLS handshake");
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    let mut s = sender(tls).await;
    let r = exchange(&mut s, "gw.test", "/orders", &[("x-user-id", "u2")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(
        r.upstream_header("x-forwarded-proto").as_deref(),
        Some("https")
    );
    // A second request on the same connection.
    let r = exchange(&mut s, "gw.test", "/orders", &[("x-user-id", "u3")]).await;
    assert_eq!(r.status, StatusCode::OK);

    // /status lists the loaded certificate.
    let status = c.admin_get("/status").await.json();
    assert_eq!(status["tls"]["certs"][0]["default"], true, "{status}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    let p = pki();
    let (a_cert, a_key, a_der) = leaf(&p.ca, &["a.test", "other.test"]);
    let (b_cert, b_key, b_der) = leaf(&p.ca, &["b.test", "x.w.test"]);
    let a = write_pair(p.dir.path(), "a", &a_cert, &a_key);
    let mut b = write_pair(p.dir.path(), "b", &b_cert, &b_key);
    b.server_names = vec!["b.test".into(), "*.w.test".into()];
    let c = Cluster::start_with(tls_options(TlsConfig {
        certs: vec![a, b],
        redirect_http: None,
    }))
    .await;
    for (sni, want) in [
        ("b.test", &b_der),
        ("x.w.test", &b_der),
        ("a.test", &a_der),
        ("other.test", &a_der),
    ] {
        let tls = handshake(c.proxy(), &p.ca, sni, &[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert_eq!(&served_cert(&tls), want, "SNI {sni}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_connections_and_bad_ones_are_refused() {
    let p = pki();
    let (cert1, key1, der1) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert1, &key1);
    let c = Cluster::start_with(tls_options(TlsConfig {
        certs: vec![files.clone()],
        redirect_http: None,
    }))
    .await;
    let tls = handshake(c.proxy(), &p.ca, "gw.test", &[b"http/1.1"])
        .await
        .expect("a TLS handshake");
    assert_eq!(served_cert(&tls), der1);
    let mut open = sender(tls).await;

    // Rotate: new handshakes see the new certificate.
    let (cert2, key2, der2) = leaf(&p.ca, &["gw.test"]);
    put(&files.key, &key2);
    put(&files.cert, &cert2);
    let (proxy, ca) = (c.proxy(), &p.ca);
    support::eventually("the new certificate to be served", || async {
        let tls = handshake(proxy, ca, "gw.test", &[b"http/1.1"]).await.ok()?;
        (served_cert(&tls) == der2).then_some(())
    })
    .await;
    // The connection opened before the rotation still works.
    let r = exchange(&mut open, "gw.test", "/orders", &[("x-user-id", "u1")]).await;
    assert_eq!(r.status, StatusCode::OK);

    // A certificate that does not match its key is refused; the previous one keeps serving.
    let (cert3, _key3, _) = leaf(&p.ca, &["gw.test"]);
    put(&files.cert, &cert3);
    let admin = c.admin();
    let problem = support::eventually("the bad certificate to be refused", || async move {
        let status = support::send(admin, get("/status", &[])).await.json();
        status["tls"]["last_error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(problem.contains("gw.pem"), "{problem}");
    let tls = handshake(c.proxy(), &p.ca, "gw.test", &[b"http/1.1"])
        .await
        .expect("a TLS handshake");
    assert_eq!(served_cert(&tls), der2);
    let r = exchange(&mut open, "gw.test", "/orders", &[("x-user-id", "u2")]).await;
    assert_eq!(r.status, StatusCode::OK);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_certificate_is_refused_naming_the_file() {
    let p = pki();
    let err = shardgate::data::tls::Tls::load(vec![write_pair(
        p.dir.path(),
        "bad2",
        "not a certificate",
        "not a key",
    )])
    .expect_err("an unusable certificate is refused")
    .to_string();
    assert!(err.contains("bad2.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_by_the_handshake_deadline() {
    let p = pki();
    let (cert, key, _) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert, &key);
    let tls = TlsConfig {
        certs: vec![files],
        redirect_http: None,
    };
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(move |c| {
            c.tls = Some(tls.clone());
            c.timeouts.header_read = Duration::from_millis(200);
        }),
        ..Options::default()
    })
    .await;
    let mut tcp = TcpStream::connect(c.proxy()).await.expect("connect");
    let mut buf = [0u8; 64];
    // The gateway closes the connection: EOF or a reset, never a hang.
    let read = within(REQUEST_DEADLINE, "the gateway to close", tcp.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_redirects_to_https() {
    let p = pki();
    let (cert, key, _) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert, &key);
    let c = Cluster::start_with(tls_options(TlsConfig {
        certs: vec![files],
        redirect_http: Some("127.0.0.1:0".parse().expect("an address")),
    }))
    .await;
    let redirect = c.running().redirect_addr.expect("a redirect listener");
    let r = support::send(
        redirect,
        get(
            "/orders/1?x=2",
            &[("host", "shop.example"), ("x-user-id", "u1")],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        r.header("location"),
        Some(format!("https://shop.example:{}/orders/1?x=2", c.proxy().port()).as_str())
    );
    assert_eq!(c.total_hits(), 0);
    c.stop().await;
}

/// Set in the child process that runs [`sighup_reloads_the_certificates`]'s body alone.
#[cfg(unix)]
const SIGHUP_CHILD: &str = "SHARDGATE_TEST_SIGHUP_CHILD";

/// SIGHUP goes to a whole process: this test runs its body in a child process of this test
/// binary that runs nothing else, and signals only that child, so no gateway of another test
/// ever sees the signal.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates() {
    if std::env::var_os(SIGHUP_CHILD).is_some() {
        sighup_reloads_the_certificates_here().await;
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let run = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "sighup_reloads_the_certificates",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(SIGHUP_CHILD, "1")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(Duration::from_secs(60), "the SIGHUP test's process", run)
        .await
        .expect("run the test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the SIGHUP test failed in its process ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(unix)]
async fn sighup_reloads_the_certificates_here() {
    let p = pki();
    let (cert1, key1, der1) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert1, &key1);
    let tls = TlsConfig {
        certs: vec![files.clone()],
        redirect_http: None,
    };
    // Polling every hour: only the signal can make the gateway look at the files.
    let c = Cluster::start_with(Options {
        tweak: ConfigTweak::new(move |c| {
            c.tls = Some(tls.clone());
            c.file_poll = Duration::from_secs(3600);
        }),
        ..Options::default()
    })
    .await;
    let first = handshake(c.proxy(), &p.ca, "gw.test", &[b"http/1.1"])
        .await
        .expect("a TLS handshake");
    assert_eq!(served_cert(&first), der1);

    let (cert2, key2, der2) = leaf(&p.ca, &["gw.test"]);
    put(&files.key, &key2);
    put(&files.cert, &cert2);
    // The gateway has installed its SIGHUP handler (the file source and the certificates
    // both listen), so the signal reloads instead of ending the process. This process runs
    // this test alone (see above).
    let pid = std::process::id().to_string();
    let (proxy, ca, want) = (c.proxy(), &p.ca, &der2);
    support::eventually("SIGHUP to load the new certificate", || {
        let pid = pid.clone();
        async move {
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .is_ok_and(|s| s.success());
            assert!(sent, "kill -HUP failed");
            let tls = handshake(proxy, ca, "gw.test", &[b"http/1.1"]).await.ok()?;
            (served_cert(&tls) == *want).then_some(())
        }
    })
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_clients_are_served() {
    let p = pki();
    let (cert, key, _) = leaf(&p.ca, &["gw.test"]);
    let files = write_pair(p.dir.path(), "gw", &cert, &key);
    let c = Cluster::start_with(tls_options(TlsConfig {
        certs: vec![files],
        redirect_http: None,
    }))
    .await;
    for (version, want) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tcp = TcpStream::connect(c.proxy()).await.expect("connect");
        let name = ServerName::try_from("gw.test").expect("a server name");
        let tls = within(
            REQUEST_DEADLINE,
            "a TLS handshake",
            connector_for(&p.ca, &[b"h2"], &[version]).connect(name, tcp),
        )
        .await
        .expect("a TLS handshake");
        assert_eq!(tls.get_ref().1.protocol_version(), Some(want));
        let mut s = sender(tls).await;
        let r = exchange(&mut s, "gw.test", "/orders", &[("x-user-id", "u1")]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    c.stop().await;
}
