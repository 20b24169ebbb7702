//! The real `shardgate` binary as an operator runs it: SIGTERM stops it accepting, lets the
//! request in flight finish, and it exits 0 (DESIGN.md §10: graceful drain on SIGTERM).

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `shardgate serve` process on the cluster's topology file, ports 0, JSON logs.
struct Process {
    child: Child,
    proxy: SocketAddr,
    /// The rest of its log, kept for a failure message.
    log: tokio::task::JoinHandle<Vec<String>>,
}

impl Process {
    async fn start(c: &Cluster) -> Process {
        let topology = c.topology_path.to_string_lossy().into_owned();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args([
                "serve",
                "--topology",
                &topology,
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the shardgate binary");
        let stderr = child.stderr.take().expect("its stderr");
        let mut lines = BufReader::new(stderr).lines();
        // Its addresses come from the one log line that names them.
        let proxy = within(
            Duration::from_secs(20),
            "the process to log its addresses",
            async {
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if v["message"] == "shardgate serving" {
                        return v["proxy"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                            .unwrap_or_else(|| panic!("no proxy address in {line}"));
                    }
                }
                panic!("the process ended before serving");
            },
        )
        .await;
        // Keep reading, so the process never blocks on a full pipe.
        let log = tokio::spawn(async move {
            let mut rest = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                rest.push(line);
            }
            rest
        });
        Process { child, proxy, log }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the process is running").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -{name} {pid} failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_and_exits_0() {
    let c = Cluster::start().await;
    let mut p = Process::start(&c).await;
    let key = "drain-me";
    let serving = c.serving_idc_of(key);
    let backend = c.sim(&serving, "core");

    // A request the backend holds until the test releases it.
    let proxy = p.proxy;
    let slow = tokio::spawn(try_send(
        proxy,
        get("/orders", &[("x-user-id", key), ("x-sim-hold", "1")]),
    ));
    eventually("the request to be held by its backend", || async {
        (backend.held() == 1).then_some(())
    })
    .await;

    p.signal("TERM");
    // Draining: the listener is closed, so a new connection is refused, while the held
    // request is still in flight.
    eventually("the proxy listener to close", || async {
        tokio::net::TcpStream::connect(proxy)
            .await
            .err()
            .map(|_| ())
    })
    .await;
    assert_eq!(backend.held(), 1, "the request in flight was not cut");
    assert!(
        p.child.try_wait().expect("the process status").is_none(),
        "the process exited with a request in flight"
    );

    backend.release_held();
    let reply = within(REQUEST_DEADLINE, "the request in flight", slow)
        .await
        .expect("the request task")
        .expect("the request in flight is answered during the drain");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.idc(), serving);

    let status = within(
        Duration::from_secs(20),
        "the process to exit",
        p.child.wait(),
    )
    .await
    .expect("the process status");
    let log = within(Duration::from_secs(5), "the rest of its log", p.log)
        .await
        .expect("the log reader");
    assert_eq!(status.code(), Some(0), "{status}: {log:#?}");
    assert!(
        log.iter().any(|l| l.contains("shutdown complete")),
        "{log:#?}"
    );
    c.stop().await;
}
