//! Operator IDC control and fenced moves in file mode, on real sockets through the
//! `shardgate` binary and the admin API: drain with a write fence (writes 503 `fenced`, reads
//! from the old owner, then the new owner), move of a range, failover and restore, the
//! refusals (exit 1), and records that survive a gateway restart.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use support::{get, keys_where, request, run_shardgate, within, Cluster, Options, Output};

/// Runs the binary against the cluster's admin API: `shardgate <args> --admin URL`.
async fn shardgate(c: &Cluster, args: &[&str]) -> Output {
    let admin = format!("http://{}", c.admin());
    let mut all = args.to_vec();
    all.extend(["--admin", &admin, "--by", "tester"]);
    run_shardgate(&all, &[], Duration::from_secs(90)).await
}

/// A gateway keeping overrides in its cache dir, with this `fence_ms`. Shards 0-63 are
/// pinned to gz.
async fn cluster(fence_ms: u64) -> Cluster {
    Cluster::start_with(Options {
        cache_dir: true,
        extra_toml: format!("\n[failover]\nfence_ms = {fence_ms}\n"),
        ..Options::default()
    })
    .await
}

/// Polls `check` until it returns `Some`, for up to `limit` (moves wait for `fence_ms`).
async fn until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(limit, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn write(c: &Cluster, key: &str) -> support::Reply {
    c.send(request(
        Method::POST,
        "/orders",
        &[("x-user-id", key)],
        "{\"item\":1}",
    ))
    .await
}

async fn read(c: &Cluster, key: &str) -> support::Reply {
    c.send(get("/orders", &[("x-user-id", key)])).await
}

async fn status(c: &Cluster) -> Value {
    c.admin_get("/status").await.json()
}

fn idc_status<'a>(status: &'a Value, idc: &str) -> &'a Value {
    status["idcs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == idc)
        .unwrap()
}

fn move_phase(status: &Value, id: &str) -> Option<String> {
    status["moves"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["phase"].as_str().map(str::to_owned))
}

/// The move id a command printed (`move/<id>`).
fn printed_move_id(out: &Output) -> String {
    out.stdout
        .split("move/")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no move id printed: {out:?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_fences_writes_keeps_reads_at_the_old_owner_then_moves_the_shards() {
    // A long fence, so the test sees phase 1 however slow the machine is.
    let c = cluster(8000).await;
    let key = &keys_where("drain", 1, |s| s.0 <= 63)[0];
    let before = write(&c, key).await;
    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(before.idc(), "gz");

    let out = shardgate(&c, &["drain", "gz", "--reason", "maintenance"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("fencing"), "{}", out.stdout);
    let id = printed_move_id(&out);

    // Phase 1: writes are fenced, reads still go to gz.
    let fenced = write(&c, key).await;
    assert_eq!(
        fenced.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        fenced.text()
    );
    assert_eq!(fenced.header("x-shardgate-reason"), Some("fenced"));
    assert_eq!(fenced.header("retry-after"), Some("8"));
    assert_eq!(fenced.header("x-shardgate-idc"), Some("gz"));
    assert_eq!(fenced.json()["error"], "fenced");
    let r = read(&c, key).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.idc(), "gz", "reads keep flowing to the old owner");
    let s = status(&c).await;
    assert_eq!(move_phase(&s, &id).as_deref(), Some("fencing"), "{s}");
    assert_eq!(idc_status(&s, "gz")["state"], "draining");
    let metrics = c.admin_get("/metrics").await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shardgate_refused_total{")
                && l.contains("reason=\"fenced\"")
                && l.contains("set=\"core\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Writes to shards the drain does not touch are not fenced.
    let other = &keys_where("free", 1, |s| {
        c.topology()
            .serving(s)
            .is_some_and(|i| c.topology().idc(i).name.as_str() != "gz")
    })[0];
    assert_eq!(write(&c, other).await.status, StatusCode::OK);

    // Phase 2 after fence_ms: the new owner serves reads and writes; gz serves nothing.
    let new_owner = until(
        Duration::from_secs(40),
        "the drain to be applied",
        || async {
            let r = read(&c, key).await;
            (r.status == StatusCode::OK && r.idc() != "gz").then(|| r.idc())
        },
    )
    .await;
    let w = write(&c, key).await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    assert_eq!(w.idc(), new_owner);
    let s = status(&c).await;
    assert_eq!(move_phase(&s, &id).as_deref(), Some("applied"), "{s}");
    assert_eq!(idc_status(&s, "gz")["shards_served"], 0);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_of_a_range_with_wait_changes_its_owner() {
    let c = cluster(2000).await;
    let keys = keys_where("mv", 5, |s| s.0 <= 63);
    let outside = &keys_where("stay", 1, |s| s.0 > 63)[0];
    let outside_idc = read(&c, outside).await.idc();
    let out = shardgate(
        &c,
        &[
            "move",
            "0-63",
            "--to",
            "sh",
            "--wait",
            "--reason",
            "rebalance",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("applied"), "{}", out.stdout);
    for key in &keys {
        let r = write(&c, key).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.idc(), "sh", "{key}");
    }
    assert_eq!(
        read(&c, outside).await.idc(),
        outside_idc,
        "other shards stay"
    );
    let explain = c
        .admin_get(&format!("/explain?key={}", keys[0]))
        .await
        .json();
    assert_eq!(explain["home_idc"], "sh");
    assert!(
        explain["reason"]
            .as_str()
            .unwrap()
            .contains("moved by move/"),
        "{explain}"
    );
    // --json prints one object.
    let out = shardgate(&c, &["move", "64-65", "--to", "bj", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["to"], "bj");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_reads_at_once_writes_after_the_fence_and_restore_warms_up() {
    let c = cluster(2000).await;
    let key = &keys_where("fo", 1, |s| s.0 <= 63)[0];
    assert_eq!(read(&c, key).await.idc(), "gz");
    let out = shardgate(&c, &["failover", "gz", "--reason", "gz is on fire"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    assert!(id.starts_with("failover-gz-"), "{out:?}");
    // Reads go to the next IDC at once; writes wait behind the failover's fence until this
    // gateway has no write to gz in flight and fence_ms has passed.
    assert_ne!(read(&c, key).await.idc(), "gz");
    let s = status(&c).await;
    assert_eq!(idc_status(&s, "gz")["state"], "down");
    assert_eq!(idc_status(&s, "gz")["shards_served"], 0);
    assert_eq!(idc_status(&s, "gz")["reason"], "gz is on fire");
    // The write first, the phase after: a fence still up once the write was answered was up
    // while it was admitted (a fence only lifts), so the write must have been refused. (Read
    // first, the phase could lift between the read and the write.)
    let w = write(&c, key).await;
    if move_phase(&status(&c).await, &id).as_deref() == Some("fencing") {
        assert_eq!(w.status, StatusCode::SERVICE_UNAVAILABLE, "{}", w.text());
    }
    until(
        Duration::from_secs(20),
        "the failover fence to be lifted",
        || async {
            (move_phase(&status(&c).await, &id).as_deref() == Some("applied")).then_some(())
        },
    )
    .await;
    let w = write(&c, key).await;
    assert_eq!(w.status, StatusCode::OK, "{}", w.text());
    assert_ne!(w.idc(), "gz");

    let out = shardgate(&c, &["restore", "gz", "--warmup", "60s"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("warming"), "{}", out.stdout);
    let s = status(&c).await;
    assert_eq!(idc_status(&s, "gz")["state"], "warming");
    let kept = s["overrides"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["target"] == "idc/gz")
        .unwrap()
        .clone();
    assert_eq!(kept["value"]["warmup_s"], 60);
    assert_eq!(kept["value"]["by"], "tester");

    // One fenced step: the gateway fences gz's home shards, holds the fence, brings them
    // home, and the IDC is active again.
    let out = shardgate(&c, &["restore", "gz", "--warmup", "0"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    until(Duration::from_secs(30), "gz to be active again", || async {
        (idc_status(&status(&c).await, "gz")["state"] == "active").then_some(())
    })
    .await;
    assert_eq!(read(&c, key).await.idc(), "gz");
    let s = status(&c).await;
    let steps: Vec<&Value> = s["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["kind"] == "warmup")
        .collect();
    assert!(
        steps
            .iter()
            .any(|m| m["phase"] == "applied" && m["to"] == "gz"),
        "{s}"
    );
    let w = write(&c, key).await;
    assert_eq!((w.status, w.idc()), (StatusCode::OK, "gz".to_owned()));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_exit_1_and_write_nothing() {
    // A fence that outlasts the test: the first move stays open throughout.
    let c = cluster(600_000).await;
    let out = shardgate(&c, &["move", "0-63", "--to", "bj"]).await;
    assert_eq!(out.code, 0, "{out:?}");

    let refused = |out: &Output, why: &str| {
        assert_eq!(out.code, 1, "{out:?}");
        assert!(out.stderr.contains(why), "expected `{why}`: {}", out.stderr);
    };
    refused(
        &shardgate(&c, &["move", "10-20", "--to", "sh"]).await,
        "still moving",
    );
    // gz's shards 0-63 are in the open move, so a drain of gz is refused too.
    refused(&shardgate(&c, &["drain", "gz"]).await, "still moving");
    refused(
        &shardgate(&c, &["move", "0-5000", "--to", "sh"]).await,
        "outside",
    );
    refused(
        &shardgate(&c, &["move", "100-110", "--to", "nowhere"]).await,
        "unknown IDC",
    );
    assert_eq!(shardgate(&c, &["failover", "sh"]).await.code, 0);
    refused(
        &shardgate(&c, &["move", "100-110", "--to", "sh"]).await,
        "not active",
    );
    refused(&shardgate(&c, &["drain", "sh"]).await, "not active");
    refused(&shardgate(&c, &["restore", "bj"]).await, "active already");
    // sh down, gz's shards fenced: bj is the last active IDC but for gz; fail gz over and
    // bj is the last one.
    assert_eq!(shardgate(&c, &["failover", "gz"]).await.code, 0);
    refused(&shardgate(&c, &["drain", "bj"]).await, "last active IDC");
    refused(&shardgate(&c, &["failover", "bj"]).await, "last IDC");
    let s = status(&c).await;
    assert_eq!(idc_status(&s, "bj")["state"], "active");
    let kinds: Vec<&str> = s["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["kind"].as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "move").count(),
        1,
        "nothing refused was written: {s}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "failover").count(), 2, "{s}");

    // A gateway that is not there: exit 4.
    let (_port, addr) = support::refused_port();
    let admin = format!("http://{addr}");
    let out = run_shardgate(
        &["failover", "sh", "--admin", &admin],
        &[],
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(out.code, 4, "{out:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_and_open_moves_survive_a_restart() {
    let mut c = cluster(2000).await;
    let key = &keys_where("rs", 1, |s| s.0 <= 63)[0];
    let out = shardgate(&c, &["failover", "bj"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = shardgate(&c, &["move", "0-63", "--to", "sh"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let id = printed_move_id(&out);
    // Restart while the move is (most likely) still fencing: the new process finds the
    // record in its cache dir and drives it to the end.
    c.restart().await;
    let s = status(&c).await;
    assert_eq!(
        idc_status(&s, "bj")["state"],
        "down",
        "the failover was kept"
    );
    assert!(move_phase(&s, &id).is_some(), "the move was kept: {s}");
    until(
        Duration::from_secs(40),
        "the kept move to be applied",
        || async {
            (move_phase(&status(&c).await, &id).as_deref() == Some("applied")).then_some(())
        },
    )
    .await;
    assert_eq!(read(&c, key).await.idc(), "sh");
    c.restart().await;
    assert_eq!(
        read(&c, key).await.idc(),
        "sh",
        "applied moves are kept too"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_the_token_and_say_why_they_refuse() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        tweak: support::ConfigTweak::new(|cfg| cfg.admin_token = Some("s3cret".into())),
        ..Options::default()
    })
    .await;
    let base = format!("http://{}", c.admin());
    let post = |path: &'static str, token: Option<&'static str>, body: Value| {
        let base = base.clone();
        async move {
            let (status, body) = shardgate::operator::admin_client::post_json(
                &base,
                path,
                token,
                &body,
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let down = serde_json::json!({"state": "down", "reason": "r", "by": "b"});
    assert_eq!(post("/override/idc/sh", None, down.clone()).await.0, 401);
    assert_eq!(
        post("/override/idc/sh", Some("wrong"), down.clone())
            .await
            .0,
        401
    );
    let (status, v) = post(
        "/override/idc/sh",
        Some("s3cret"),
        serde_json::json!({"state": "sideways"}),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (422, Some("invalid")), "{v}");
    let (status, v) = post("/override/idc/nowhere", Some("s3cret"), down.clone()).await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = post(
        "/override/idc/sh",
        Some("s3cret"),
        serde_json::json!({"state": "warming"}),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (409, Some("refused")), "{v}");
    let (status, v) = post(
        "/move",
        Some("s3cret"),
        serde_json::json!({"range": "x-y", "to": "sh"}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    let (status, _) = post("/move", Some("s3cret"), serde_json::json!({"to": "sh"})).await;
    assert_eq!(status, 400, "a body without a range");
    assert_eq!(
        idc_status(
            &support::send(
                c.admin(),
                get("/status", &[("authorization", "Bearer s3cret")])
            )
            .await
            .json(),
            "sh"
        )["state"],
        "active"
    );

    // The CLI passes the token along; without it the gateway refuses (exit 1).
    let out = shardgate(&c, &["failover", "sh"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = shardgate(&c, &["failover", "sh", "--admin-token", "s3cret"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        idc_status(
            &support::send(
                c.admin(),
                get("/status", &[("authorization", "Bearer s3cret")])
            )
            .await
            .json(),
            "sh"
        )["state"],
        "down"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failovers_never_leave_the_gateway_without_an_idc() {
    let c = cluster(2000).await;
    assert_eq!(
        shardgate(&c, &["failover", "gz", "--force-unfenced"])
            .await
            .code,
        0
    );
    // sh and bj are the last two that can serve: two operators fail both over at once.
    for round in 0..5 {
        let (a, b) = tokio::join!(
            shardgate(&c, &["failover", "sh", "--force-unfenced"]),
            shardgate(&c, &["failover", "bj", "--force-unfenced"]),
        );
        let written = [&a, &b].iter().filter(|o| o.code == 0).count();
        assert!(written <= 1, "round {round}: both written: {a:?} {b:?}");
        for o in [&a, &b] {
            assert!([0, 1, 3].contains(&o.code), "round {round}: {o:?}");
        }
        let s = status(&c).await;
        let serving = ["sh", "bj", "gz"]
            .iter()
            .filter(|i| idc_status(&s, i)["state"] != "down")
            .count();
        assert!(serving >= 1, "round {round}: no IDC left: {s}");
        // Back to two that can serve: restore whichever went down (one fenced step).
        for idc in ["sh", "bj"] {
            if idc_status(&status(&c).await, idc)["state"] == "down" {
                let out = shardgate(&c, &["restore", idc, "--warmup", "0"]).await;
                assert_eq!(out.code, 0, "{out:?}");
                until(Duration::from_secs(30), "the restore to finish", || async {
                    (idc_status(&status(&c).await, idc)["state"] == "active").then_some(())
                })
                .await;
            }
        }
    }
    c.stop().await;
}
