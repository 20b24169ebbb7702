//! The operator commands against a real etcd (DESIGN.md §7): `push` (validation, diff,
//! --max-move, compare-and-swap, --wait), `degrade`, `status --etcd`, `explain --etcd`, and
//! their exit codes (1 refused · 3 conflict · 4 unreachable · 5 timed out).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod etcd_support;

use etcd_support::*;
use serde_json::Value;

fn etcd_args(url: &str) -> Vec<&str> {
    vec!["--etcd", url, "--cluster", CLUSTER]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_push_exits_1_with_every_problem_and_writes_nothing() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = idcs
        .document(&[("0-127", "nowhere")])
        .replace("set = \"noncore\"", "set = \"nosuchset\"");
    let file = write_file(dir.path(), "bad.toml", &bad);
    let out = push(&etcd.url, &file, &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("nowhere") && out.stderr.contains("nosuchset"),
        "every problem is listed: {}",
        out.stderr
    );
    assert!(etcd.get("topology").await.is_none(), "nothing written");

    let unparsable = write_file(dir.path(), "worse.toml", "shard_count = [");
    let out = push(&etcd.url, &unparsable, &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("line 1"), "{}", out.stderr);

    // A valid document for another cluster is refused too.
    let other = idcs
        .document(&[])
        .replace("cluster = \"itest\"", "cluster = \"other\"");
    let file = write_file(dir.path(), "other.toml", &other);
    let out = push(&etcd.url, &file, &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(etcd.get("topology").await.is_none(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_shows_the_diff_and_refuses_a_big_move_without_force() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = write_file(dir.path(), "a.toml", &idcs.document(&[("0-1023", "sh")]));
    let out = push(&etcd.url, &first, &[]).await;
    assert_eq!(
        out.code, 0,
        "first push to an empty cluster moves nothing: {out:?}"
    );
    assert!(out.stdout.contains("first push"), "{}", out.stdout);

    // Everything to bj: 100% of the shards move.
    let big = idcs.document(&[("0-1023", "bj")]);
    let big = write_file(dir.path(), "b.toml", &big);
    let out = push(&etcd.url, &big, &["--dry-run"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stdout.contains("sh -> bj"), "{}", out.stdout);
    assert!(
        out.stdout.contains("0-1023"),
        "ranges are shown: {}",
        out.stdout
    );
    assert!(out.stderr.contains("--max-move"), "{}", out.stderr);
    let out = push(&etcd.url, &big, &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let live = String::from_utf8(etcd.get("topology").await.unwrap()).unwrap();
    assert!(live.contains("idc = \"sh\""), "nothing written");

    let out = push(&etcd.url, &big, &["--dry-run", "--force"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("dry run"), "{}", out.stdout);
    let out = push(&etcd.url, &big, &["--max-move", "100"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let live = String::from_utf8(etcd.get("topology").await.unwrap()).unwrap();
    assert!(live.contains("idc = \"bj\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_pushes_from_one_base_one_wins_the_other_exits_3() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = write_file(dir.path(), "base.toml", &idcs.document(&[("0-63", "sh")]));
    assert_eq!(push(&etcd.url, &base, &[]).await.code, 0);
    let a = write_file(dir.path(), "a.toml", &idcs.document(&[("0-63", "bj")]));
    let b = write_file(dir.path(), "b.toml", &idcs.document(&[("0-63", "gz")]));

    // Both operators reviewed the diff against the same live document.
    let dry = push(&etcd.url, &a, &["--dry-run"]).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    let base_revision = dry
        .stdout
        .split("--if-revision ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("dry run names the revision to push onto")
        .to_owned();
    let onto = ["--if-revision", base_revision.as_str()];
    let (ra, rb) = tokio::join!(push(&etcd.url, &a, &onto), push(&etcd.url, &b, &onto),);
    let mut codes = [ra.code, rb.code];
    codes.sort_unstable();
    assert_eq!(codes, [0, 3], "exactly one wins: {ra:?} {rb:?}");
    let loser = if ra.code == 3 { &ra } else { &rb };
    assert!(loser.stderr.contains("conflict"), "{}", loser.stderr);
    let live = String::from_utf8(etcd.get("topology").await.unwrap()).unwrap();
    let winner = if ra.code == 0 { "bj" } else { "gz" };
    assert!(live.contains(&format!("idc = \"{winner}\"")), "{live}");

    // Without --if-revision, a push reads the live document and compares against it.
    let out = push(&etcd.url, &base, &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_wait_returns_when_every_gateway_applied_and_exits_5_on_a_stale_one() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = write_file(dir.path(), "a.toml", &idcs.document(&[("0-63", "sh")]));
    assert_eq!(push(&etcd.url, &first, &[]).await.code, 0);
    let g1 = start_gateway(&etcd.url, GatewayOptions::default()).await;
    let g2 = start_gateway(&etcd.url, GatewayOptions::default()).await;
    eventually("both gateways to register", || async {
        (etcd.keys("gateway/").await.len() == 2).then_some(())
    })
    .await;

    let next = write_file(dir.path(), "b.toml", &idcs.document(&[("0-63", "bj")]));
    let out = push(&etcd.url, &next, &["--wait", "--timeout", "15s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("all 2 gateways serve revision"),
        "{}",
        out.stdout
    );
    let pushed = String::from_utf8(etcd.get("topology").await.unwrap()).unwrap();
    assert!(pushed.contains("idc = \"bj\""));

    // A registration that never advances (a stuck gateway, held alive by its lease).
    let mut client = etcd.client().await;
    let lease = client.lease_grant(30, None).await.unwrap().id();
    client
        .put(
            format!("/shardgate/{CLUSTER}/gateway/stuck"),
            r#"{"idc":"sh","addr":"127.0.0.1:1","applied_revision":1,"view":{}}"#,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let last = write_file(dir.path(), "c.toml", &idcs.document(&[("0-63", "gz")]));
    let out = push(&etcd.url, &last, &["--wait", "--timeout", "1s"]).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("stuck"), "{}", out.stderr);

    let out = shardgate(&[&["status", "--json"][..], &etcd_args(&etcd.url)].concat()).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let gateways = v["gateways"].as_array().unwrap();
    assert_eq!(gateways.len(), 3, "{v}");
    let stuck = gateways.iter().find(|g| g["instance"] == "stuck").unwrap();
    assert_eq!(stuck["behind"], true);
    eventually("the live gateways to catch up", || async {
        let out = shardgate(&[&["status", "--json"][..], &etcd_args(&etcd.url)].concat()).await;
        let v: Value = serde_json::from_str(&out.stdout).ok()?;
        let behind = v["gateways"]
            .as_array()?
            .iter()
            .filter(|g| g["behind"] == true)
            .count();
        (behind == 1).then_some(())
    })
    .await;
    g1.shutdown().await;
    g2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_writes_the_override_and_refuses_core_without_force() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[])).await;
    let url = etcd.url.clone();
    let run = |args: Vec<&'static str>| {
        let url = url.clone();
        async move {
            let mut all: Vec<&str> = vec!["degrade"];
            all.extend(args);
            all.extend(["--etcd", url.as_str(), "--cluster", CLUSTER]);
            shardgate(&all).await
        }
    };
    let out = run(vec!["core", "on"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = run(vec!["route:orders", "on"]).await;
    assert_eq!(out.code, 1, "a route of a non-degradable set: {out:?}");
    let out = run(vec!["route:nope", "on", "--force"]).await;
    assert_eq!(out.code, 1, "unknown route: {out:?}");
    assert!(etcd.keys("override/").await.is_empty(), "nothing written");

    let out = run(vec![
        "noncore",
        "on",
        "--reason",
        "black friday",
        "--by",
        "carol",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value =
        serde_json::from_slice(&etcd.get("override/degrade/noncore").await.unwrap()).unwrap();
    assert_eq!(v["on"], true);
    assert_eq!(v["reason"], "black friday");
    assert_eq!(v["by"], "carol");
    let out = run(vec!["core", "on", "--force"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = run(vec!["noncore", "off"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value =
        serde_json::from_slice(&etcd.get("override/degrade/noncore").await.unwrap()).unwrap();
    assert_eq!(v["on"], false);

    let out = shardgate(&[&["status"][..], &etcd_args(&etcd.url)].concat()).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("degrade/core"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_explain_read_the_cluster_from_etcd() {
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    etcd.put("topology", &idcs.document(&[("0-1023", "gz")]))
        .await;
    let g = start_gateway(
        &etcd.url,
        GatewayOptions {
            instance: Some("gw-status".into()),
            idc: Some("sh".into()),
            ..GatewayOptions::default()
        },
    )
    .await;
    eventually("the gateway to register", || async {
        (!etcd.keys("gateway/").await.is_empty()).then_some(())
    })
    .await;

    let out = shardgate(&[&["status"][..], &etcd_args(&etcd.url)].concat()).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("gw-status"), "{}", out.stdout);
    assert!(
        out.stdout.contains("1024"),
        "gz serves every shard: {}",
        out.stdout
    );

    let out = shardgate(&[&["status", "--json"][..], &etcd_args(&etcd.url)].concat()).await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let gz = v["idcs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "gz")
        .unwrap();
    assert_eq!(gz["shards_served"], 1024);
    assert_eq!(v["gateways"][0]["instance"], "gw-status");
    assert_eq!(v["gateways"][0]["idc"], "sh");

    let out =
        shardgate(&[&["explain", "user-42", "--json"][..], &etcd_args(&etcd.url)].concat()).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["serving_idc"], "gz");
    assert_eq!(v["key"], "user-42");
    let out = shardgate(&[&["explain", "user-42"][..], &etcd_args(&etcd.url)].concat()).await;
    assert!(out.stdout.contains("serving IDC  gz"), "{}", out.stdout);
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_etcd_exits_4_and_missing_flags_exit_2() {
    let (_held, url) = refused_url();
    let dir = tempfile::tempdir().unwrap();
    let idcs = Idcs::start().await;
    let file = write_file(dir.path(), "a.toml", &idcs.document(&[]));
    let out = push(&url, &file, &[]).await;
    assert_eq!(out.code, 4, "{out:?}");
    for cmd in [
        vec!["status"],
        vec!["explain", "user-1"],
        vec!["degrade", "noncore", "on"],
    ] {
        let out = shardgate(&[&cmd[..], &etcd_args(&url)].concat()).await;
        assert_eq!(out.code, 4, "{cmd:?}: {out:?}");
    }
    let out = shardgate(&["push", &file, "--etcd", &url]).await;
    assert_eq!(out.code, 2, "no --cluster: {out:?}");
}
