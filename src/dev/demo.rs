//! `shardgate demo`: three simulated IDCs on loopback (one backend per IDC and set, as the
//! topology lists them) and a gateway on the file topology, with copy-paste `curl` lines.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::config::{Config, RawConfig};
use crate::control::topology::{RawTopology, Shard};
use crate::dev::sim::SimBackend;

/// The demo topology, embedded so that `demo` works from any directory.
pub const EMBEDDED_TOPOLOGY: &str = include_str!("../../config/topology.toml");

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub topology: Option<PathBuf>,
}

/// Where the demo's topology lives: the given file, `config/topology.toml` when run from the
/// repository, else the embedded copy written to a temporary file.
fn topology_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let local = PathBuf::from("config/topology.toml");
    if local.exists() {
        return Ok(local);
    }
    let dir = std::env::temp_dir().join(format!("shardgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("topology.toml");
    std::fs::write(&path, EMBEDDED_TOPOLOGY)?;
    Ok(path)
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let path = topology_path(opts.topology.as_deref())?;
    let doc = crate::control::source::read_document(&path)
        .map_err(|p| anyhow::anyhow!("{}: {p}", path.display()))?;

    let mut started = BTreeSet::new();
    let mut backends = Vec::new();
    // One ownership board for all: a write the gateway sends with a stale owner epoch is
    // refused (421) as a real service would.
    let owners = std::sync::Arc::new(crate::dev::sim::owners::Owners::new());
    for idc in &doc.idcs {
        for (set, addrs) in &idc.pools {
            for addr in addrs {
                let sa: SocketAddr = addr
                    .parse()
                    .with_context(|| format!("backend address `{addr}`"))?;
                if started.insert(sa) {
                    let b = SimBackend::start_on_board(sa, &idc.name, set, owners.clone())
                        .await
                        .with_context(|| {
                            format!(
                                "cannot start the simulated IDC {} ({set}) on {sa}",
                                idc.name
                            )
                        })?;
                    backends.push(b);
                }
            }
        }
    }

    let config = Config {
        listen: opts.listen,
        admin: opts.admin,
        // Operator overrides (`shardgate degrade … --admin`) need somewhere to be kept.
        cache_dir: Some(
            std::env::temp_dir().join(format!("shardgate-demo-{}", std::process::id())),
        ),
        local_idc: doc.idcs.first().map(|i| i.name.clone()),
        ..RawConfig {
            topology: Some(path.clone()),
            ..RawConfig::default()
        }
        .into_config()?
    };
    let running = crate::start(config).await?;
    print_tour(
        &doc,
        &path,
        running.proxy_addr,
        running.admin_addr,
        backends.len(),
        &running,
    );
    crate::termination_signal().await;
    running.shutdown().await;
    for b in backends {
        b.stop().await;
    }
    Ok(())
}

/// One user id per IDC, so the first three `curl` lines land in three different IDCs.
fn keys_per_idc(t: &crate::control::topology::Topology) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    for n in 1..10_000 {
        let key = format!("user-{n}");
        let shard = Shard::of_key(key.as_bytes(), t.shard_count);
        if let Some(idc) = t.serving(shard) {
            let name = t.idc(idc).name.to_string();
            if !found.iter().any(|(_, i)| *i == name) {
                found.push((key, name));
            }
        }
        if found.len() == t.idcs.len() {
            break;
        }
    }
    found
}

fn print_tour(
    doc: &RawTopology,
    path: &Path,
    proxy: SocketAddr,
    admin: SocketAddr,
    backends: usize,
    running: &crate::Running,
) {
    let Some(t) = running.snapshots.current() else {
        return;
    };
    println!();
    println!(
        "shardgate demo: cluster `{}`, {} IDCs ({}), {backends} simulated backends",
        doc.cluster,
        doc.idcs.len(),
        doc.idcs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  topology  {}  (edit it: the gateway reloads it live)",
        path.display()
    );
    println!("  proxy     http://{proxy}");
    println!("  admin     http://{admin}   (console at /, also /status /metrics /explain?key=)");
    println!();
    println!("Try these: each user id lands in a different IDC (see \"idc\" in the answer):");
    for (key, idc) in keys_per_idc(&t) {
        println!("  curl -s http://{proxy}/orders/1 -H 'x-user-id: {key}'    # -> {idc}");
    }
    println!();
    println!("And:");
    println!("  curl -s 'http://{proxy}/orders/1?user_id=user-1'             # key from the query");
    println!("  curl -si http://{proxy}/orders/1                               # no key: 400");
    println!("  curl -s http://{proxy}/catalog/items                           # global route: the local IDC");
    println!("  curl -s 'http://{admin}/explain?key=user-1'                    # where a key goes, and why");
    println!("  shardgate explain user-1 --admin http://{admin}");
    println!();
    println!("Ctrl-C stops the demo.");
}
