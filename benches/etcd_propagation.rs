//! Propagation of a topology change through etcd (DESIGN.md §11: a change served by every
//! gateway within 100 ms, p99, loopback), against a real etcd and three gateways:
//! - 100 writes of an edited 3-IDC document, each timed from just before the put to the moment
//!   every gateway has published that revision;
//! - the same with a 1,000-route / 16,384-shard document (each write parses the document and
//!   rebuilds that snapshot);
//! - with that document in place, 100 writes of an override key only (a degrade switch turned
//!   on and off): each rebuilds the snapshot from the document's earlier parse;
//! - the rebuild and the parse alone of that big document (what a change costs a gateway's CPU).
//!
//! `cargo bench --bench etcd_propagation`. Under `cargo test` it runs a few
//! writes as a smoke test. Skipped, saying so, when no `etcd` binary is installed.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly on purpose

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;

use std::time::{Duration, Instant};

use etcd_support::{start_gateway, Etcd, GatewayOptions, Idcs, CLUSTER};
use shardgate::control::topology::{
    build, build_with_previous, BuildContext, Overrides, RawTopology,
};
use shardgate::data::upstream::Upstreams;

const GATEWAYS: usize = 3;

mod common;

/// The 1,000-route / 16,384-shard document of `benches/routing.rs`, pinned to `pin_to`.
fn big_document(pin_to: &str) -> String {
    common::big_document(CLUSTER, pin_to, 17000)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: n={} median={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
    );
}

/// Times `writes` puts of two alternating values of the key `key` (relative to the cluster's
/// prefix): (until the first gateway serves each one, until every gateway does).
async fn propagation(
    etcd: &Etcd,
    gateways: &[shardgate::Running],
    key: &str,
    values: [&str; 2],
    writes: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut first = Vec::with_capacity(writes);
    let mut all = Vec::with_capacity(writes);
    for i in 0..writes {
        let watchers: Vec<_> = gateways.iter().map(|g| g.snapshots.subscribe()).collect();
        let started = Instant::now();
        let revision = etcd.put(key, values[i % 2]).await as u64;
        let mut pending = tokio::task::JoinSet::new();
        for mut w in watchers {
            pending.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), w.wait_for(|r| *r >= revision))
                    .await
                    .expect("every gateway applies the write within 10 s")
                    .expect("the gateway is running");
            });
        }
        let mut n = 0;
        while let Some(done) = pending.join_next().await {
            done.expect("a watcher task");
            if n == 0 {
                first.push(started.elapsed());
            }
            n += 1;
        }
        all.push(started.elapsed());
    }
    (first, all)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let writes = if bench { 100 } else { 3 };
    let etcd_installed = std::path::Path::new("/usr/bin/etcd").exists()
        || std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_ok();
    // A benchmark that measured nothing must not look like a pass (`cargo test
    // --all-targets` runs it once, as a smoke test).
    if !etcd_installed {
        eprintln!("etcd_propagation: no etcd binary: `make deps` installs etcd-server");
        std::process::exit(1);
    }

    // The rebuild a gateway does on every change, alone.
    let raw = RawTopology::parse(&big_document("sh")).unwrap();
    let ctx = BuildContext {
        revision: 1,
        local_idc: Some("sh".into()),
        ..BuildContext::default()
    };
    let upstreams = Upstreams::new();
    let mut rebuilds = Vec::new();
    for _ in 0..if bench { 30 } else { 2 } {
        let started = Instant::now();
        let t = build(raw.clone(), &Overrides::default(), &ctx, &upstreams).unwrap();
        rebuilds.push(started.elapsed());
        std::hint::black_box(t);
    }
    report(
        "rebuild 1000 routes / 16384 shards / 5 IDCs (parsed doc -> snapshot)",
        rebuilds,
    );
    // What a gateway does on a document change: the previous snapshot at hand (its pins went
    // elsewhere; the IDCs are the same, so the ring's walk is reused).
    let previous = build(
        RawTopology::parse(&big_document("bj")).unwrap(),
        &Overrides::default(),
        &ctx,
        &upstreams,
    )
    .unwrap();
    let mut rebuilds = Vec::new();
    for _ in 0..if bench { 30 } else { 2 } {
        let started = Instant::now();
        let t = build_with_previous(
            raw.clone(),
            &Overrides::default(),
            &ctx,
            &upstreams,
            Some(&previous),
        )
        .unwrap();
        rebuilds.push(started.elapsed());
        std::hint::black_box(t);
    }
    report(
        "rebuild of that document after a snapshot with other pins (the ring's walk reused)",
        rebuilds,
    );
    let text = big_document("sh");
    let mut parses = Vec::new();
    for _ in 0..if bench { 30 } else { 2 } {
        let started = Instant::now();
        std::hint::black_box(RawTopology::parse(&text).unwrap());
        parses.push(started.elapsed());
    }
    report(
        &format!("parse of that document ({} KiB of TOML)", text.len() / 1024),
        parses,
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let etcd = Etcd::start().await;
        let idcs = Idcs::start().await;
        let small = [
            idcs.document(&[("0-127", "sh")]),
            idcs.document(&[("0-127", "bj")]),
        ];
        etcd.put("topology", &small[0]).await;
        let mut gateways = Vec::new();
        for _ in 0..GATEWAYS {
            gateways.push(start_gateway(&etcd.url, GatewayOptions::default()).await);
        }
        let (first, all) =
            propagation(&etcd, &gateways, "topology", [&small[1], &small[0]], writes).await;
        let what = "propagation, 3 IDCs / 2 routes / 1024 shards";
        report(&format!("{what}, first gateway"), first);
        report(&format!("{what}, all {GATEWAYS} gateways"), all);

        let big = [big_document("bj"), big_document("sh")];
        let (first, all) =
            propagation(&etcd, &gateways, "topology", [&big[0], &big[1]], writes).await;
        let what = "propagation, 1000 routes / 16384 shards, document change (parse + rebuild)";
        report(&format!("{what}, first gateway"), first);
        report(&format!("{what}, all {GATEWAYS} gateways"), all);

        // The document stays; only an override key changes (what `shardgate degrade` writes).
        let degrade = [
            r#"{"on":true,"reason":"bench","by":"bench"}"#,
            r#"{"on":false,"reason":"bench","by":"bench"}"#,
        ];
        let (first, all) = propagation(
            &etcd,
            &gateways,
            "override/degrade/noncore",
            degrade,
            writes,
        )
        .await;
        let what = "propagation, 1000 routes / 16384 shards, override-only change (rebuild)";
        report(&format!("{what}, first gateway"), first);
        report(&format!("{what}, all {GATEWAYS} gateways"), all);
        for g in gateways {
            g.shutdown().await;
        }
    });
}
