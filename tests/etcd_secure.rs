//! etcd with TLS and auth (DESIGN.md §6, issue "a hardened edge"): a real etcd that serves
//! only TLS, requires client certificates (made at test time with rcgen) and has auth enabled
//! with a `root` user; the operator CLI pushes through it and a gateway serves from it. A wrong
//! password is a clear error and a not-ready gateway, never a panic.

#![allow(clippy::unwrap_used)]

mod etcd_support;

use std::sync::Arc;
use std::time::Duration;

use etcd_support::{
    admin, eventually, get, key_in, shardgate_with_env, within, write_file, Etcd, EtcdTls, Idcs,
    CLUSTER,
};
use shardgate::config::RawConfig;
use shardgate::control::etcd::Password;
use shardgate::Running;

const PASSWORD: &str = "s3cret-Pw";

async fn secure_etcd() -> (Etcd, Arc<EtcdTls>) {
    let tls = Arc::new(EtcdTls::generate());
    let mut etcd = Etcd::start_tls(tls.clone()).await;
    etcd.enable_auth(PASSWORD).await;
    (etcd, tls)
}

/// A gateway whose bootstrap config names the CA, the client certificate and the user.
async fn start_gateway(etcd: &Etcd, tls: &EtcdTls, password: &str) -> Running {
    let raw = RawConfig {
        etcd: vec![etcd.url.clone()],
        cluster: Some(CLUSTER.to_owned()),
        etcd_ca: Some(tls.ca.clone()),
        etcd_cert: Some(tls.client_cert.clone()),
        etcd_key: Some(tls.client_key.clone()),
        etcd_user: Some("root".into()),
        etcd_password: Some(Password(password.to_owned())),
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        ..RawConfig::default()
    };
    let mut config = raw.into_config().expect("a valid gateway configuration");
    config.timeouts.drain = Duration::from_secs(5);
    config.timeouts.etcd = Duration::from_secs(2);
    within(
        Duration::from_secs(20),
        "the gateway to start",
        shardgate::start(config),
    )
    .await
    .expect("the gateway starts")
}

fn cli_args<'a>(command: &'a str, etcd: &'a Etcd, flags: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![command, "--etcd", etcd.url.as_str(), "--cluster", CLUSTER];
    args.extend(flags.iter().map(String::as_str));
    args.extend(["--etcd-user", "root"]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_serve_through_etcd_with_tls_client_certificates_and_auth() {
    let (etcd, tls) = secure_etcd().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "topology.toml",
        &idcs.document(&[("0-1023", "bj")]),
    );
    let flags = tls.shardgate_flags();

    // The operator CLI pushes through TLS + auth, the password from the environment.
    let mut args = cli_args("push", &etcd, &flags);
    args.insert(1, &file);
    let out = shardgate_with_env(&args, &[("SHARDGATE_ETCD_PASSWORD", PASSWORD)]).await;
    assert_eq!(out.code, 0, "push failed: {}{}", out.stdout, out.stderr);
    assert!(
        etcd.get("topology").await.is_some(),
        "the document reached etcd"
    );

    let gw = start_gateway(&etcd, &tls, PASSWORD).await;
    let key = key_in(0, 1023);
    let answer = eventually("the gateway to serve from the secure etcd", || async {
        get(gw.proxy_addr, "/orders/1", &key)
            .await
            .ok()
            .filter(|a| a.status == 200)
    })
    .await;
    assert_eq!(answer.idc.as_deref(), Some("bj"));
    let (status, ready) = admin(gw.admin_addr, "/readyz").await;
    assert_eq!(status, 200, "{ready}");

    // A change made through the secure etcd reaches the gateway over its watch, and the
    // gateway registered itself (both need the authenticated, TLS connection).
    etcd.put("override/degrade/noncore", r#"{"on":true,"reason":"t"}"#)
        .await;
    eventually("the degrade switch to apply", || async {
        get(gw.proxy_addr, "/recs/1", &key)
            .await
            .ok()
            .filter(|a| a.status == 503)
    })
    .await;
    let out = shardgate_with_env(
        &cli_args("status", &etcd, &flags),
        &[("SHARDGATE_ETCD_PASSWORD", PASSWORD)],
    )
    .await;
    assert_eq!(out.code, 0, "status failed: {}", out.stderr);
    assert!(out.stdout.contains("bj"), "{}", out.stdout);
    eventually("the gateway's registration", || async {
        (!etcd.keys("gateway/").await.is_empty()).then_some(())
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_or_missing_credentials_are_clear_errors() {
    let (etcd, tls) = secure_etcd().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[])).await;
    let flags = tls.shardgate_flags();

    // The CLI: exit 4 (cannot use etcd) with the reason, not a panic.
    let out = shardgate_with_env(
        &cli_args("status", &etcd, &flags),
        &[("SHARDGATE_ETCD_PASSWORD", "wrong")],
    )
    .await;
    assert_eq!(out.code, 4, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("refused user `root`"),
        "stderr: {}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);

    // No CA for an https endpoint: a usage error that says what is missing.
    let out = shardgate_with_env(&["status", "--etcd", &etcd.url, "--cluster", CLUSTER], &[]).await;
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("--etcd-ca"), "{}", out.stderr);

    // The gateway: up, not ready, and /readyz says why; it keeps retrying.
    let gw = start_gateway(&etcd, &tls, "wrong").await;
    let (status, body) = eventually("/readyz to give the reason", || async {
        let (status, body) = admin(gw.admin_addr, "/readyz").await;
        body.as_str()
            .filter(|b| b.contains("refused user `root`"))
            .map(|_| (status, body.clone()))
    })
    .await;
    assert_eq!(status, 503, "{body}");
    let (status, _) = admin(gw.admin_addr, "/healthz").await;
    assert_eq!(status, 200, "the process is up");
    gw.shutdown().await;
}
