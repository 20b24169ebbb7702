//! One `shardgate serve` process of a history scenario: started on free ports with its own
//! relay to etcd and its own `--cache-dir`; signals by PID, kill -9 and restart, and what its
//! `/status` says.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::CHANGE_DEADLINE;
use crate::etcd_support::{free_port, within, Etcd, Relay, CLUSTER};

/// One `shardgate serve` process in etcd mode, behind its own relay to etcd.
pub struct Gateway {
    pub name: String,
    pub idc: String,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub relay: Relay,
    cache_dir: TempDir,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Gateway {
    pub(super) async fn start(
        name: &str,
        idc: &str,
        etcd: &Etcd,
        logs: &std::path::Path,
    ) -> Gateway {
        let mut g = Gateway {
            name: name.to_owned(),
            idc: idc.to_owned(),
            proxy: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            relay: Relay::start(etcd.client_addr).await,
            cache_dir: tempfile::tempdir().unwrap(),
            log: logs.join(format!("{name}.log")),
            child: None,
        };
        g.spawn();
        g
    }

    /// Starts the process (again) on the same ports and cache directory.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["serve", "--etcd", &self.relay.url, "--cluster", CLUSTER])
            .args(["--instance", &self.name, "--idc", &self.idc])
            .args(["--listen", &self.proxy.to_string()])
            .args(["--admin", &self.admin.to_string()])
            .arg("--cache-dir")
            .arg(self.cache_dir.path())
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start a shardgate process");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("a running gateway")
    }

    /// Sends `signal` (`STOP`, `CONT`) with kill(1), by PID.
    pub async fn signal(&self, signal: &str) {
        let status = within(
            Duration::from_secs(5),
            "kill(1)",
            tokio::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string())
                .status(),
        )
        .await
        .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// kill -9, and reaps it.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("a running gateway");
        child.start_kill().unwrap();
        within(
            Duration::from_secs(10),
            "a killed gateway to exit",
            child.wait(),
        )
        .await
        .unwrap();
    }

    /// Starts it again from its `--cache-dir`.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart a gateway that was killed");
        self.spawn();
    }

    /// The revision the gateway serves, from its `/status` (None: no answer, or no snapshot).
    pub async fn revision(&self) -> Option<u64> {
        let (status, body) = shardgate::operator::admin_client::get(
            &format!("http://{}", self.admin),
            "/status",
            None,
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| v["revision"].as_u64()).flatten()
    }

    /// Waits until a first start serves `revision` or later. A free port found at random can
    /// be taken by another test before the process binds it: then the process exits, and it is
    /// started again on other ports (at most three times).
    pub(super) async fn started(&mut self, revision: u64) {
        for _ in 0..3 {
            let exited = tokio::time::timeout(CHANGE_DEADLINE, async {
                loop {
                    if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                        return true;
                    }
                    if self.revision().await.is_some_and(|r| r >= revision) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            match exited {
                Ok(false) => return,
                Ok(true) => {
                    self.proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    self.admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    self.spawn();
                }
                Err(_) => break,
            }
        }
        self.serves(revision).await;
    }

    /// Waits until it serves a snapshot of `revision` or later.
    pub async fn serves(&self, revision: u64) {
        let waited = tokio::time::timeout(CHANGE_DEADLINE, async {
            while self.revision().await.is_none_or(|r| r < revision) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "timed out after {CHANGE_DEADLINE:?} waiting for {} to serve revision {revision} (it serves {:?}); its log:\n{}",
                self.name,
                self.revision().await,
                self.log()
            );
        }
    }

    /// (shards served, home shards, state) of `idc` in its `/status`.
    pub async fn shards_of(&self, idc: &str) -> Option<(u64, u64, String)> {
        let (status, body) = shardgate::operator::admin_client::get(
            &format!("http://{}", self.admin),
            "/status",
            None,
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        let i = v["idcs"].as_array()?.iter().find(|i| i["name"] == idc)?;
        (status == 200).then_some((
            i["shards_served"].as_u64()?,
            i["shards_home"].as_u64()?,
            i["state"].as_str()?.to_owned(),
        ))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until a (re)started gateway answers on its admin listener with a snapshot (from its
/// cache, when etcd is out of reach).
pub async fn wait_answering(g: &Gateway) {
    let what = format!("{} to answer", g.name);
    within(CHANGE_DEADLINE, &what, async {
        while g.revision().await.is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
