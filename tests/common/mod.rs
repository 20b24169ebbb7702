//! What every test support module needs: bounded waits (`within`, `eventually`) and the one
//! way to run the `shardgate` binary. Included by `tests/support` and `tests/etcd_support` as
//! `#[path = "../common/mod.rs"] mod common;`; the including module says how long a polled
//! condition may take (its `POLL_DEADLINE`).

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use super::POLL_DEADLINE;

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, failing the test after `POLL_DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(POLL_DEADLINE, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// What a `shardgate` command did.
#[derive(Debug)]
pub struct Output {
    /// The exit code, -1 when killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `shardgate` binary with `args` and these environment variables, failing the
/// test (the command killed) after `limit`. The settings a developer's shell may carry
/// (`SHARDGATE_ETCD`, `SHARDGATE_CLUSTER`, the etcd password, the admin token) are removed
/// first, so a command sees only what the test gives it.
pub async fn run_shardgate(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(args)
        .env_remove("SHARDGATE_ETCD")
        .env_remove("SHARDGATE_CLUSTER")
        .env_remove("SHARDGATE_ETCD_PASSWORD")
        .env_remove("SHARDGATE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(limit, "a shardgate command", child)
        .await
        .expect("run shardgate");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
