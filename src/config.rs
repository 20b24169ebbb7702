//! Bootstrap configuration of one gateway instance (`serve --config FILE`, then flags on top):
//! listeners, local IDC, topology source, timeouts and limits. Raw serde types stay here; the
//! rest of the gateway sees only the validated `Config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::telemetry::LogFormat;

/// Where the topology comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    File(PathBuf),
    Etcd {
        /// Endpoints, TLS and credentials.
        access: EtcdAccess,
        cluster: String,
    },
}

/// Timeouts of DESIGN.md §10.
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub header_read: Duration,
    pub idle: Duration,
    pub request_body: Duration,
    pub upstream_connect: Duration,
    pub drain: Duration,
    /// Every etcd call (list, watch set-up, put, lease grant, keep-alive, revoke).
    pub etcd: Duration,
}

/// One certificate chain and its key (PEM files), with the SNI names it answers for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Exact names or `*.suffix` wildcards; the first certificate also answers every other name.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// TLS on the proxy listener.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The first is the default certificate.
    pub certs: Vec<CertFiles>,
    /// A plain listener answering every request with a 308 to https.
    pub redirect_http: Option<SocketAddr>,
}

/// Connection and protocol limits (DESIGN.md §10).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections on the proxy listener; one more is accepted and closed at once.
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    /// Streams a client may open and reset before the server has accepted them (the HTTP/2
    /// rapid-reset defence; hyper's default is 20).
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for a client's protocol errors before it closes the
    /// connection (hyper's default is 1024).
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            h2_max_concurrent_streams: 256,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub local_idc: Option<String>,
    pub source: SourceConfig,
    pub cache_dir: Option<PathBuf>,
    /// This instance's name in the etcd gateway registry (`gateway/<instance>`); default
    /// `<hostname>:<proxy port>`.
    pub instance: Option<String>,
    pub admin_token: Option<String>,
    pub log_format: LogFormat,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    pub timeouts: Timeouts,
    pub max_header_bytes: usize,
    pub limits: Limits,
    pub tls: Option<TlsConfig>,
    /// How often the file source and the TLS certificates looks at the file (it also reloads on SIGHUP).
    pub file_poll: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub idc: Option<String>,
    pub topology: Option<PathBuf>,
    #[serde(default)]
    pub etcd: Vec<String>,
    pub cluster: Option<String>,
    /// TLS to etcd: the CA bundle that signs its certificate, and a client certificate + key.
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    /// etcd auth: the user; the password comes from `SHARDGATE_ETCD_PASSWORD` or, for
    /// service managers that hand secrets over as files, `etcd_password_file`.
    pub etcd_user: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    /// Filled from the environment by `serve`, never from the file (a password in the
    /// bootstrap config would be one more copy of it).
    #[serde(skip)]
    pub etcd_password: Option<Password>,
    pub cache_dir: Option<PathBuf>,
    pub instance: Option<String>,
    pub admin_token: Option<String>,
    pub log_format: Option<LogFormat>,
    pub threads: Option<usize>,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub limits: RawLimits,
    /// Moved to the topology document; kept here only to say so (see `into_config`).
    #[serde(default)]
    pub isolation: Option<toml::Value>,
    #[serde(default)]
    pub tls: RawTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub certs: Vec<CertFiles>,
    pub redirect_http: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub header_read_ms: Option<u64>,
    pub idle_ms: Option<u64>,
    pub request_body_ms: Option<u64>,
    pub upstream_connect_ms: Option<u64>,
    pub drain_ms: Option<u64>,
    pub etcd_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub h2_max_concurrent_streams: Option<u32>,
    pub h2_max_pending_accept_reset_streams: Option<usize>,
    pub h2_max_local_error_reset_streams: Option<usize>,
}

/// The most open client connections a listener may be configured for: far above what a
/// process gets file descriptors for, and far below what the listener's semaphore can count
/// (past that it panics at start).
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// The longest bootstrap timeout: one day (a deadline of `now + u64::MAX ms` overflows).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

impl RawConfig {
    pub fn load(path: &Path) -> anyhow::Result<RawConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Validates and fills defaults. Every problem is listed at once, section by section.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut problems = Vec::new();
        let listen = parse_addr("listen", self.listen, DEFAULT_LISTEN, &mut problems);
        let admin = parse_addr("admin", self.admin, DEFAULT_ADMIN, &mut problems);
        let access = etcd_access(
            RawEtcdAccess {
                endpoints: self.etcd,
                ca: self.etcd_ca,
                cert: self.etcd_cert,
                key: self.etcd_key,
                user: self.etcd_user,
                password: self.etcd_password,
                password_file: self.etcd_password_file,
            },
            &mut problems,
        );
        let source = topology_source(self.topology, access, self.cluster, &mut problems);
        if !admin.ip().is_loopback() && self.admin_token.as_deref().is_none_or(str::is_empty) {
            problems.push(format!(
                "admin: {admin} is not a loopback address; set an admin token (--admin-token) to expose it"
            ));
        }
        let timeouts = timeouts(self.timeouts, &mut problems);
        if self.isolation.is_some() {
            // The knobs became part of the topology so that a reload (file or etcd) changes
            // them on every gateway without a restart.
            problems.push(
                "isolation: moved to the topology document: put this table in the topology \
                 (file or etcd) as [isolation] with [isolation.breaker] (docs/isolation.md), \
                 and remove it here"
                    .into(),
            );
        }
        let (max_header_bytes, limits) = limits(self.limits, &mut problems);
        let tls = tls(self.tls, &mut problems);
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
        }
        Ok(Config {
            listen,
            admin,
            local_idc: self.idc,
            source,
            cache_dir: self.cache_dir,
            instance: self.instance.filter(|i| !i.is_empty()),
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            log_format: self.log_format.unwrap_or_default(),
            threads: self.threads.unwrap_or(0),
            timeouts,
            max_header_bytes,
            limits,
            tls,
            file_poll: Duration::from_millis(500),
        })
    }
}

/// A listener address, or `default` when not given (and, with a problem, when unusable).
fn parse_addr(
    field: &str,
    v: Option<String>,
    default: &str,
    problems: &mut Vec<String>,
) -> SocketAddr {
    let text = v.unwrap_or_else(|| default.to_owned());
    text.parse::<SocketAddr>().unwrap_or_else(|_| {
        problems.push(format!("{field}: `{text}` is not an `ip:port` address"));
        default.parse().expect("default address parses")
    })
}

/// The etcd settings of `RawConfig`, taken out of it together.
struct RawEtcdAccess {
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password: Option<Password>,
    password_file: Option<PathBuf>,
}

/// etcd endpoints, TLS and credentials; the password from the environment, else its file.
/// Checked only when etcd is the source.
fn etcd_access(raw: RawEtcdAccess, problems: &mut Vec<String>) -> EtcdAccess {
    let etcd_tls_given =
        raw.ca.is_some() || raw.cert.is_some() || raw.user.is_some() || raw.password_file.is_some();
    if etcd_tls_given && raw.endpoints.is_empty() {
        problems.push(
            "etcd_ca/etcd_cert/etcd_key/etcd_user: only used with the etcd source (--etcd)".into(),
        );
    }
    let mut password = raw.password.filter(|p| !p.0.is_empty());
    if let (None, Some(file)) = (&password, &raw.password_file) {
        match std::fs::read_to_string(file) {
            Ok(text) => password = Some(Password(text.trim_end_matches(['\r', '\n']).to_owned())),
            Err(e) => problems.push(format!("etcd_password_file {}: {e}", file.display())),
        }
    }
    let access = EtcdAccess {
        endpoints: raw.endpoints,
        ca: raw.ca,
        cert: raw.cert,
        key: raw.key,
        user: raw.user.filter(|u| !u.is_empty()),
        password,
    };
    if !access.endpoints.is_empty() {
        problems.extend(access.problems());
    }
    access
}

/// A topology file or etcd (with a cluster name): exactly one.
fn topology_source(
    topology: Option<PathBuf>,
    access: EtcdAccess,
    cluster: Option<String>,
    problems: &mut Vec<String>,
) -> SourceConfig {
    match (topology, access.endpoints.is_empty(), cluster) {
        (Some(_), false, _) => {
            problems.push("topology and etcd: choose one topology source".into());
            SourceConfig::File(PathBuf::new())
        }
        (Some(file), true, _) => SourceConfig::File(file),
        (None, false, Some(cluster)) => SourceConfig::Etcd { access, cluster },
        (None, false, None) => {
            problems.push("etcd needs a cluster name (--cluster)".into());
            SourceConfig::File(PathBuf::new())
        }
        (None, true, _) => {
            problems.push(
                "no topology source: give --topology FILE or --etcd URL --cluster NAME".into(),
            );
            SourceConfig::File(PathBuf::new())
        }
    }
}

/// `[timeouts]`: each above 0 and at most a day.
fn timeouts(t: RawTimeouts, problems: &mut Vec<String>) -> Timeouts {
    let mut ms = |v: Option<u64>, default: u64, field: &str| {
        let v = v.unwrap_or(default);
        if v == 0 {
            problems.push(format!("timeouts.{field}: must be greater than 0"));
        } else if v > MAX_TIMEOUT_MS {
            problems.push(format!(
                "timeouts.{field}: at most {MAX_TIMEOUT_MS} (one day)"
            ));
        }
        Duration::from_millis(v.clamp(1, MAX_TIMEOUT_MS))
    };
    Timeouts {
        header_read: ms(t.header_read_ms, 10_000, "header_read_ms"),
        idle: ms(t.idle_ms, 60_000, "idle_ms"),
        request_body: ms(t.request_body_ms, 30_000, "request_body_ms"),
        upstream_connect: ms(t.upstream_connect_ms, 1_000, "upstream_connect_ms"),
        drain: ms(t.drain_ms, 30_000, "drain_ms"),
        etcd: ms(t.etcd_ms, 3_000, "etcd_ms"),
    }
}

/// `[limits]`: the largest request head, and the connection and HTTP/2 limits.
fn limits(l: RawLimits, problems: &mut Vec<String>) -> (usize, Limits) {
    let max_header_bytes = l.max_header_bytes.unwrap_or(64 * 1024);
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        problems.push("limits.max_header_bytes: must be between 8192 and 1048576".into());
    }
    let d = Limits::default();
    let limits = Limits {
        max_connections: l.max_connections.unwrap_or(d.max_connections),
        h2_max_concurrent_streams: l
            .h2_max_concurrent_streams
            .unwrap_or(d.h2_max_concurrent_streams),
        h2_max_pending_accept_reset_streams: l
            .h2_max_pending_accept_reset_streams
            .unwrap_or(d.h2_max_pending_accept_reset_streams),
        h2_max_local_error_reset_streams: l
            .h2_max_local_error_reset_streams
            .unwrap_or(d.h2_max_local_error_reset_streams),
    };
    if !(1..=MAX_CONNECTIONS).contains(&limits.max_connections) {
        problems.push(format!(
            "limits.max_connections: must be between 1 and {MAX_CONNECTIONS}"
        ));
    }
    if limits.h2_max_concurrent_streams == 0 {
        problems.push("limits.h2_max_concurrent_streams: must be greater than 0".into());
    }
    (max_header_bytes, limits)
}

/// `[tls]`: certificates (TLS is on when there is one) and the plain redirect listener.
fn tls(tls: RawTls, problems: &mut Vec<String>) -> Option<TlsConfig> {
    for (i, c) in tls.certs.iter().enumerate() {
        if c.cert.as_os_str().is_empty() || c.key.as_os_str().is_empty() {
            problems.push(format!("tls.certs[{i}]: needs both cert and key"));
        }
    }
    let redirect_http = tls.redirect_http.map(|text| {
        text.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.push(format!(
                "tls.redirect_http: `{text}` is not an `ip:port` address"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    });
    if redirect_http.is_some() && tls.certs.is_empty() {
        problems.push(
            "tls.redirect_http: redirects to https need TLS (--tls-cert/--tls-key or [[tls.certs]])"
                .into(),
        );
    }
    (!tls.certs.is_empty()).then_some(TlsConfig {
        certs: tls.certs,
        redirect_http,
    })
}

impl Config {
    /// A configuration for a file topology with every default: what tests and the demo start.
    pub fn for_file(topology: impl Into<PathBuf>) -> Config {
        RawConfig {
            topology: Some(topology.into()),
            ..RawConfig::default()
        }
        .into_config()
        .expect("the default configuration is valid")
    }
}

/// How to reach etcd: its endpoints, TLS (a CA bundle to trust, a client certificate to
/// present) and a user/password for etcd's auth. The same value serves the gateway's source,
/// its registration and the operator commands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    pub endpoints: Vec<String>,
    /// PEM bundle of the CAs that sign etcd's server certificate; TLS is on when it is set.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Password>,
}

/// A password: `Debug` prints `***`, so it never reaches a log line.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The environment variable that carries the etcd password: a flag's value would be visible
/// to every user of the machine in `ps`.
pub const PASSWORD_ENV: &str = "SHARDGATE_ETCD_PASSWORD";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_every_problem_at_once() {
        let c = Config::for_file("t.toml");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.timeouts.upstream_connect, Duration::from_secs(1));
        let raw: RawConfig =
            toml::from_str("listen = 'nope'\nadmin = '0.0.0.0:9901'\n[timeouts]\ndrain_ms = 0\n")
                .unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        assert!(err.contains("admin token"), "{err}");
        assert!(err.contains("drain_ms"), "{err}");
        assert!(err.contains("no topology source"), "{err}");
    }

    #[test]
    fn tls_certificates_and_redirect() {
        let raw: RawConfig = toml::from_str(
            "topology = 't.toml'\n[tls]\nredirect_http = '127.0.0.1:8081'\n\
             [[tls.certs]]\ncert = 'a.pem'\nkey = 'a.key'\n\
             [[tls.certs]]\ncert = 'b.pem'\nkey = 'b.key'\nserver_names = ['b.example', '*.b.example']\n",
        )
        .unwrap();
        let c = raw.into_config().unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.certs.len(), 2);
        assert_eq!(tls.certs[1].server_names, ["b.example", "*.b.example"]);
        assert_eq!(tls.redirect_http.unwrap().port(), 8081);

        let raw: RawConfig =
            toml::from_str("topology = 't.toml'\n[tls]\nredirect_http = '127.0.0.1:8081'\n")
                .unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(err.contains("need TLS"), "{err}");
    }

    #[test]
    fn etcd_tls_and_auth_problems_are_listed() {
        let raw: RawConfig = toml::from_str(
            "etcd = ['https://127.0.0.1:2379']\ncluster = 'c'\netcd_cert = 'c.pem'\n",
        )
        .unwrap();
        let raw = RawConfig {
            etcd_password: Some(Password("pw".into())),
            ..raw
        };
        let err = raw.into_config().unwrap_err().to_string();
        assert!(err.contains("etcd_cert and etcd_key"), "{err}");
        assert!(err.contains("needs etcd_ca"), "{err}");
        assert!(err.contains("is https"), "{err}");
        assert!(err.contains("without a user"), "{err}");
        assert!(!err.contains("pw"), "the password is never shown: {err}");

        let raw: RawConfig =
            toml::from_str("topology = 't.toml'\netcd_ca = '/nonexistent/ca.pem'\n").unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(err.contains("only used with the etcd source"), "{err}");

        let raw: RawConfig = toml::from_str(
            "etcd = ['https://127.0.0.1:2379']\ncluster = 'c'\netcd_ca = '/nonexistent/ca.pem'\n",
        )
        .unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(err.contains("etcd_ca /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let raw: RawConfig = toml::from_str(include_str!("../config/shardgate.toml")).unwrap();
        assert!(raw.isolation.is_none());
        raw.into_config().unwrap();
    }

    #[test]
    fn max_connections_and_timeouts_are_bounded() {
        // TOML's largest integer: past what a semaphore can count (it would panic at start).
        let raw: RawConfig = toml::from_str(
            "topology = 't.toml'\n[limits]\nmax_connections = 9223372036854775807\n\
             [timeouts]\nidle_ms = 9223372036854775807\n",
        )
        .unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "limits.max_connections: must be between 1 and {MAX_CONNECTIONS}"
            )),
            "{err}"
        );
        assert!(err.contains("timeouts.idle_ms: at most"), "{err}");
        // The bound itself is a limit the listener can hold.
        let raw: RawConfig = toml::from_str(&format!(
            "topology = 't.toml'\n[limits]\nmax_connections = {MAX_CONNECTIONS}\n"
        ))
        .unwrap();
        let c = raw.into_config().unwrap();
        let _ = tokio::sync::Semaphore::new(c.limits.max_connections);
    }

    #[test]
    fn an_isolation_table_says_where_it_moved() {
        let raw: RawConfig =
            toml::from_str("topology = 't.toml'\n[isolation]\nbreaker_open_ms = 250\n").unwrap();
        let err = raw.into_config().unwrap_err().to_string();
        assert!(
            err.contains("isolation: moved to the topology document"),
            "{err}"
        );
        assert!(err.contains("docs/isolation.md"), "{err}");
    }
}
