//! The history scenarios (docs/failover.md, "Checking the promise: the history checker"): a
//! real etcd, two real gateway processes each behind its own relay to etcd, simulated IDCs
//! keeping one ledger, mixed GET/POST load through both gateways; then a fault during a change
//! of owner. Each scenario ends by checking the history and asserting that no shard was ever
//! written by two IDCs at once (`shardgate::dev::sim::history`), printing its report.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;
mod history_support;

use history_support::Run;
use shardgate::dev::sim::history::Report;

fn assert_clean(name: &str, report: &Report) {
    assert!(
        report.violations.is_empty(),
        "scenario {name}: {} violations (the report is printed above)",
        report.violations.len()
    );
    assert!(
        report.writes > 0,
        "scenario {name}: no write was applied\n{report}"
    );
}

/// A gateway cut from etcd (watch and lease) while sh's shards move to bj: once its lease
/// expires the leader no longer waits for it, so it must stop writing by its old snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_cut_from_etcd_during_a_move() {
    let name = "partition";
    let run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    let (leader, cut) = run.leader_and_follower().await;
    run.load(1.0).await;
    run.gateway(&cut).relay.cut();
    let (phase, revision) = run.fenced(&["move", "0-3", "--to", "bj"]).await;
    println!("[{name}] move ended {phase} at revision {revision}");
    run.all_serve(&[&leader], revision).await;
    run.load(2.0).await;
    run.gateway(&cut).relay.restore();
    run.all_serve(&[&cut], revision).await;
    run.load(0.5).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}

/// A gateway frozen (SIGSTOP) past its lease while sh is drained, then resumed: requests it
/// had queued, and those it takes before it catches up, must not reach the old owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_past_its_lease_during_a_drain() {
    let name = "sigstop-gateway";
    let mut run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    let (leader, stopped) = run.leader_and_follower().await;
    run.load(1.0).await;
    run.gateway(&stopped).signal("STOP").await;
    let (phase, revision) = run.fenced(&["drain", "sh"]).await;
    println!("[{name}] drain ended {phase} at revision {revision}");
    run.all_serve(&[&leader], revision).await;
    run.burst(&stopped, 0, 20);
    run.load(1.0).await;
    run.gateway(&stopped).signal("CONT").await;
    run.all_serve(&[&stopped], revision).await;
    run.load(1.0).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}

/// The leader frozen past its lease while a move is fencing: the other gateway takes over and
/// finishes it; the old leader, resumed, must neither write by its old snapshot nor undo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_stopped_past_its_lease_during_a_move() {
    let name = "sigstop-leader";
    let mut run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    let (leader, other) = run.leader_and_follower().await;
    run.load(1.0).await;
    run.gateway(&leader).signal("STOP").await;
    let (phase, revision) = run.fenced(&["move", "4-7", "--to", "gz"]).await;
    println!("[{name}] move ended {phase} at revision {revision}");
    run.all_serve(&[&other], revision).await;
    run.burst(&leader, 4, 20);
    run.load(1.0).await;
    run.gateway(&leader).signal("CONT").await;
    run.all_serve(&[&leader], revision).await;
    run.load(1.0).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}

/// A gateway killed (-9) and restarted from its `--cache-dir` while cut from etcd, after sh's
/// shards moved: the cached snapshot predates the move, so it must not write by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restarted_from_cache_while_cut_after_a_move() {
    let name = "kill9-cache";
    let mut run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    let (leader, killed) = run.leader_and_follower().await;
    run.load(1.0).await;
    run.gateway_mut(&killed).kill9().await;
    run.gateway(&killed).relay.cut();
    let (phase, revision) = run.fenced(&["move", "0-3", "--to", "gz"]).await;
    println!("[{name}] move ended {phase} at revision {revision}");
    run.all_serve(&[&leader], revision).await;
    run.gateway_mut(&killed).restart();
    let cached = run.gateway(&killed);
    history_support::wait_answering(cached).await;
    run.load(2.0).await;
    run.gateway(&killed).relay.restore();
    run.all_serve(&[&killed], revision).await;
    run.load(0.5).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}

/// `failover` of an IDC that is alive and taking writes: the gateways must not switch at
/// different instants with both IDCs writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_of_an_idc_that_is_still_alive() {
    let name = "failover-alive";
    let run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    run.load(1.0).await;
    let revision = run.change(&["failover", "sh"]).await;
    run.all_serve(&["gw-a", "gw-b"], revision).await;
    run.all_see_none_at("sh").await;
    run.load(2.0).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}

/// Drain, restore with warm-up, move, failover and restore with warm-up, one after the other
/// under load from both gateways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_move_failover_and_restore_with_warmup_under_load() {
    let name = "operations";
    let run = Run::start(name, &[("gw-a", "bj"), ("gw-b", "gz")]).await;
    let all = ["gw-a", "gw-b"];
    run.load(1.0).await;
    let (phase, revision) = run.fenced(&["drain", "gz"]).await;
    println!("[{name}] drain ended {phase} at revision {revision}");
    run.all_serve(&all, revision).await;
    run.load(1.0).await;
    let revision = run.change(&["restore", "gz", "--warmup", "5s"]).await;
    run.all_serve(&all, revision).await;
    // The warm-up's steps, under load, until gz serves its home shards again.
    run.all_see_home_at("gz").await;
    run.load(1.0).await;
    let (phase, revision) = run.fenced(&["move", "0-1", "--to", "gz"]).await;
    println!("[{name}] move ended {phase} at revision {revision}");
    run.all_serve(&all, revision).await;
    run.load(1.0).await;
    let revision = run.change(&["failover", "bj"]).await;
    run.all_serve(&all, revision).await;
    run.all_see_none_at("bj").await;
    run.load(1.0).await;
    let revision = run.change(&["restore", "bj", "--warmup", "5s"]).await;
    run.all_serve(&all, revision).await;
    run.all_see_home_at("bj").await;
    run.load(1.0).await;
    let report = run.finish().await;
    assert_clean(name, &report);
}
