//! The operator console at admin `/` in a real headless Chromium (tests/support/browser.rs):
//! the page loads under its CSP and draws every shard in its serving IDC's colour, the cells
//! of a drained IDC change colour, an action taken through the page (token, click, confirm)
//! changes `/status`, and an endpoint's refusal is shown as the endpoint said it. In etcd mode
//! (a real etcd) the page lists every gateway with its applied revision and the leader.
//!
//! `make console-screenshot` runs the ignored `console_screenshot` here, which writes
//! docs/console.png.

// Both support modules include tests/common: one test needs a file-mode cluster and an etcd one.
#[allow(clippy::duplicate_mod)]
mod etcd_support;
#[allow(clippy::duplicate_mod)]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{json, Value};
use shardgate::control::topology::Shard;
use support::browser::{base64_decode, Browser, Page};
use support::{get, request, send, Cluster, ConfigTweak, Options};

const TOKEN: &str = "s3cret";

fn with_token() -> Option<ConfigTweak> {
    ConfigTweak::new(|c| c.admin_token = Some(TOKEN.into()))
}

/// A POST to the admin listener with the token.
async fn admin_post(c: &Cluster, path: &str, body: Value) -> support::Reply {
    send(
        c.admin(),
        request(
            Method::POST,
            path,
            &[
                ("content-type", "application/json"),
                ("authorization", &format!("Bearer {TOKEN}")),
            ],
            body.to_string(),
        ),
    )
    .await
}

async fn admin_status(c: &Cluster) -> Value {
    let auth = format!("Bearer {TOKEN}");
    send(c.admin(), get("/status", &[("authorization", &auth)]))
        .await
        .json()
}

/// Opens the console of `c` and waits until it has drawn the map of the current revision.
async fn open_console(c: &Cluster, browser: &Browser) -> Page {
    let mut page = browser.page().await;
    page.navigate(&format!("http://{}/", c.admin())).await;
    page
}

async fn wait_for_map(page: &mut Page, revision: u64) {
    page.wait_for(
        &format!("the console to draw revision {revision}"),
        &format!(
            "window.shardgate && shardgate.state.map && shardgate.state.map.revision === {revision} \
             && shardgate.state.status && shardgate.state.status.revision === {revision} \
             && !shardgate.state.mapDirty"
        ),
    )
    .await;
}

/// The colour the page drew at the centre of every shard's cell, as `#rrggbb`.
async fn drawn_colours(page: &mut Page) -> Vec<String> {
    let v = page
        .value(
            "Array.from({length: shardgate.state.map.shard_count}, (_, s) => shardgate.pixel(s))",
        )
        .await;
    v.as_array()
        .expect("one colour per shard")
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The colour the page gives each IDC, checked to be distinct.
async fn idc_colours(page: &mut Page) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for idc in support::IDCS {
        let c = page.value(&format!("shardgate.colourOf('{idc}')")).await;
        out.insert(idc.to_owned(), c.as_str().unwrap_or_default().to_owned());
    }
    let distinct: std::collections::BTreeSet<&String> = out.values().collect();
    assert_eq!(distinct.len(), out.len(), "IDC colours: {out:?}");
    out
}

/// What the served snapshot says: every shard's serving IDC.
fn serving_idcs(c: &Cluster) -> Vec<String> {
    let t = c.topology();
    (0..t.shard_count)
        .map(|s| {
            t.serving(Shard(s))
                .map_or_else(|| "none".to_owned(), |i| t.idc(i).name.to_string())
        })
        .collect()
}

#[test]
fn cdp_screenshots_are_decoded() {
    assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
    assert_eq!(base64_decode("aGVsbG8h").as_deref(), Some(&b"hello!"[..]));
    assert_eq!(base64_decode("aA==").as_deref(), Some(&b"h"[..]));
    assert_eq!(base64_decode("a*=="), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_loads_and_draws_every_shard_in_its_serving_idcs_colour() {
    let c = Cluster::start().await;
    // The page and its assets: self-only CSP, nothing inline, nothing from elsewhere.
    let r = c.admin_get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    let csp = r.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    for asset in ["/console/console.js", "/console/console.css"] {
        assert_eq!(c.admin_get(asset).await.status, StatusCode::OK, "{asset}");
    }
    // The map endpoint says what the snapshot says.
    let map = c.admin_get("/console/map").await.json();
    let names: Vec<String> = serde_json::from_value(map["idcs"].clone()).expect("IDC names");
    let serving = serving_idcs(&c);
    for (s, idc) in serving.iter().enumerate() {
        let i = map["serving"][s].as_i64().expect("a serving index");
        assert_eq!(&names[i as usize], idc, "shard {s}");
    }
    assert_eq!(map["fenced"], json!([]));

    let browser = Browser::launch(1400, 1000).await;
    let mut page = open_console(&c, &browser).await;
    wait_for_map(&mut page, c.topology().revision).await;
    let colours = idc_colours(&mut page).await;
    let drawn = drawn_colours(&mut page).await;
    assert_eq!(drawn.len(), 1024);
    for (s, idc) in serving.iter().enumerate() {
        assert_eq!(drawn[s], colours[idc], "shard {s} is served by {idc}");
    }
    // One card per IDC, in the topology's order, each with its state.
    let cards = page
        .value("[...document.querySelectorAll('#idcs .idc')].map(e => e.dataset.idc + ' ' + e.querySelector('.badge').textContent)")
        .await;
    assert_eq!(cards, json!(["sh active", "bj active", "gz active"]));
    // File mode: no gateways panel.
    assert_eq!(
        page.value("document.getElementById('cluster-panel').classList.contains('hidden')")
            .await,
        json!(true)
    );

    // Hovering a cell names its shard, serving and home IDC.
    let shard = 100u32;
    let (x, y) = {
        let v = page
            .value(&format!(
                "(() => {{ const r = document.getElementById('map').getBoundingClientRect(); \
                 const p = shardgate.cellCentre({shard}); return [r.x + p.x, r.y + p.y]; }})()"
            ))
            .await;
        (v[0].as_f64().unwrap_or(0.0), v[1].as_f64().unwrap_or(0.0))
    };
    page.mouse("mouseMoved", x, y).await;
    let tip = page
        .wait_for(
            "the tooltip",
            "(() => { const t = document.getElementById('tip'); return t.classList.contains('hidden') ? null : t.textContent; })()",
        )
        .await;
    let t = c.topology();
    let tip = tip.as_str().unwrap_or_default();
    assert!(tip.contains(&format!("shard {shard}")), "{tip}");
    assert!(
        tip.contains(&format!("serving {}", serving[shard as usize])),
        "{tip}"
    );
    let home = t.idc(t.home(Shard(shard))).name.to_string();
    assert!(tip.contains(&format!("home    {home}")), "{tip}");

    // The key box: the explain answer, and that key's cell highlighted.
    let key = "user-42";
    let want = Shard::of_key(key.as_bytes(), 1024).0;
    page.type_into("#key-input", key).await;
    page.click("#key-go").await;
    let highlighted = page
        .wait_for(
            "the key's cell to be highlighted",
            "shardgate.state.highlight",
        )
        .await;
    assert_eq!(highlighted, json!(want));
    let text = page
        .value("document.getElementById('explain').textContent")
        .await;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains(&format!("shard {want}")), "{text}");
    assert!(
        text.contains(&format!("serving {}", c.serving_idc_of(key))),
        "{text}"
    );

    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    browser.close().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_idc_recolours_its_cells() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        tweak: with_token(),
        ..Options::default()
    })
    .await;
    let browser = Browser::launch(1400, 1000).await;
    let mut page = open_console(&c, &browser).await;
    // The token is given to the page as an operator would, before it can read anything.
    page.wait_for(
        "the page to ask for the token",
        "!document.getElementById('token-dialog').classList.contains('hidden')",
    )
    .await;
    page.type_into("#token-input", TOKEN).await;
    page.click("#token-save").await;
    wait_for_map(&mut page, c.topology().revision).await;
    let colours = idc_colours(&mut page).await;
    let before = serving_idcs(&c);
    let drained: Vec<usize> = (0..before.len()).filter(|&s| before[s] == "sh").collect();
    assert!(!drained.is_empty());
    let drawn = drawn_colours(&mut page).await;
    for &s in &drained {
        assert_eq!(drawn[s], colours["sh"], "shard {s} before the drain");
    }

    // Drain `sh` through the admin API (not the page).
    let r = admin_post(
        &c,
        "/override/idc/sh",
        json!({"state": "draining", "by": "test"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Phase 1: its shards are fenced and outlined as moving, on the map endpoint.
    let auth = format!("Bearer {TOKEN}");
    let map = send(c.admin(), get("/console/map", &[("authorization", &auth)]))
        .await
        .json();
    let moving: u64 = map["moves"]
        .as_array()
        .expect("moves")
        .iter()
        .flat_map(|m| m["shards"].as_array().cloned().unwrap_or_default())
        .map(|r| r[1].as_u64().unwrap_or(0) + 1 - r[0].as_u64().unwrap_or(0))
        .sum();
    let fenced: u64 = map["fenced"]
        .as_array()
        .expect("fenced runs")
        .iter()
        .map(|r| r[1].as_u64().unwrap_or(0) + 1 - r[0].as_u64().unwrap_or(0))
        .sum();
    let sh_index = map["idcs"]
        .as_array()
        .and_then(|a| a.iter().position(|n| n == "sh"))
        .expect("sh in the map") as i64;
    if map["moves"].as_array().is_some_and(|m| !m.is_empty()) {
        assert_eq!(moving, drained.len() as u64, "{map}");
        assert_eq!(fenced, drained.len() as u64, "{map}");
    } else {
        // Only if the fence was already over (a very slow machine): then it is applied.
        let served_by_sh = map["serving"]
            .as_array()
            .expect("serving")
            .iter()
            .filter(|i| i.as_i64() == Some(sh_index))
            .count();
        assert_eq!(served_by_sh, 0, "{map}");
    }

    // Phase 2: once the new owners are published, every cell of `sh` changes colour within a
    // bounded wait, to its new serving IDC's.
    let sh = serde_json::to_string(&colours["sh"]).expect("JSON");
    let list = serde_json::to_string(&drained).expect("JSON");
    page.wait_for(
        "every drained shard to change colour",
        &format!("{list}.every(s => shardgate.pixel(s) !== {sh})"),
    )
    .await;
    let after = serving_idcs(&c);
    let drawn = drawn_colours(&mut page).await;
    for &s in &drained {
        assert_ne!(after[s], "sh", "shard {s}");
        assert_eq!(
            drawn[s], colours[&after[s]],
            "shard {s} now served by {}",
            after[s]
        );
    }
    let badge = page
        .value("document.querySelector('.idc[data-idc=sh] .badge').textContent")
        .await;
    assert_eq!(badge, json!("draining"));
    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    browser.close().await;
    c.stop().await;
}

/// Gives the page the token, then takes `action` on `target` through the page: click, give a
/// reason, confirm. Returns the text the page shows for the answer.
async fn act(page: &mut Page, action: &str, target: &str, reason: &str) -> (u16, String) {
    let attr = if action.starts_with("degrade") {
        "set"
    } else {
        "idc"
    };
    let before = page
        .value("document.querySelectorAll('#action-log li').length")
        .await;
    page.click(&format!(
        "button[data-action='{action}'][data-{attr}='{target}']"
    ))
    .await;
    page.wait_for(
        "the confirmation",
        "!document.getElementById('confirm-dialog').classList.contains('hidden')",
    )
    .await;
    page.type_into("#confirm-reason", reason).await;
    page.click("#confirm-yes").await;
    page.wait_for(
        "the action's answer",
        &format!("document.querySelectorAll('#action-log li').length > {before}"),
    )
    .await;
    let v = page
        .value("(() => { const r = document.getElementById('action-result'); return [Number(r.dataset.status), r.textContent]; })()")
        .await;
    (
        v[0].as_u64().unwrap_or(0) as u16,
        v[1].as_str().unwrap_or_default().to_owned(),
    )
}

async fn log_in(page: &mut Page, c: &Cluster) {
    page.wait_for(
        "the page to ask for the token",
        "!document.getElementById('token-dialog').classList.contains('hidden')",
    )
    .await;
    // Nothing of the cluster is shown without it.
    assert_eq!(
        page.value("document.getElementById('cluster').textContent")
            .await,
        json!("…")
    );
    page.type_into("#token-input", TOKEN).await;
    page.click("#token-save").await;
    wait_for_map(page, c.topology().revision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_through_the_page_changes_status() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        tweak: with_token(),
        ..Options::default()
    })
    .await;
    // With a token, only the page and its assets load without it; every read needs it.
    for (path, want) in [
        ("/", 200),
        ("/console/console.js", 200),
        ("/console/console.css", 200),
        ("/console/map", 401),
        ("/console/history", 401),
        ("/status", 401),
        ("/dashboard", 401),
    ] {
        assert_eq!(c.admin_get(path).await.status.as_u16(), want, "{path}");
    }
    let browser = Browser::launch(1400, 1000).await;
    let mut page = open_console(&c, &browser).await;
    log_in(&mut page, &c).await;

    // Cancelling the confirmation sends nothing.
    page.click("button[data-action='failover'][data-idc='gz']")
        .await;
    page.click("#confirm-no").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = admin_status(&c).await;
    assert_eq!(st["overrides"], json!([]), "{st}");

    let (status, text) = act(&mut page, "failover", "gz", "rack power lost").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("POST /override/idc/gz") && text.contains("200"),
        "{text}"
    );
    let st = admin_status(&c).await;
    let gz = st["idcs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == "gz"))
        .cloned()
        .expect("gz in /status");
    assert_eq!(gz["state"], "down", "{st}");
    let o = st["overrides"]
        .as_array()
        .and_then(|a| a.iter().find(|o| o["target"] == "idc/gz"))
        .cloned()
        .expect("the override of gz");
    assert_eq!(o["value"]["reason"], "rack power lost", "{o}");
    assert_eq!(o["value"]["by"], "console", "{o}");
    // And the page follows: the card says down, with who and why.
    page.wait_for(
        "the gz card to say down",
        "document.querySelector('.idc[data-idc=gz] .badge').textContent === 'down'",
    )
    .await;
    let who = page
        .value("document.querySelector('.idc[data-idc=gz]').textContent")
        .await;
    assert!(
        who.as_str().is_some_and(|w| w.contains("rack power lost")),
        "{who}"
    );
    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    browser.close().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_shows_in_the_page_as_the_endpoint_said_it() {
    let c = Cluster::start_with(Options {
        cache_dir: true,
        tweak: with_token(),
        ..Options::default()
    })
    .await;
    let browser = Browser::launch(1400, 1000).await;
    let mut page = open_console(&c, &browser).await;
    log_in(&mut page, &c).await;
    let revision = c.topology().revision;

    // Degrading `core` without force is refused (409), as `shardgate degrade core on` is.
    let (status, text) = act(&mut page, "degrade-on", "core", "try it").await;
    assert_eq!(status, 409, "{text}");
    // The same request from here: the page shows that very answer, body and all.
    let direct = admin_post(
        &c,
        "/override/degrade/core",
        json!({"on": true, "reason": "try it", "by": "console"}),
    )
    .await;
    assert_eq!(direct.status, StatusCode::CONFLICT);
    assert!(text.contains("409 Conflict"), "{text}");
    assert!(
        text.ends_with(&direct.text()),
        "the page shows\n{text}\nthe endpoint says\n{}",
        direct.text()
    );
    assert_eq!(
        page.value("document.getElementById('action-result').classList.contains('refused')")
            .await,
        json!(true)
    );
    // Nothing changed.
    assert_eq!(c.topology().revision, revision);
    let st = admin_status(&c).await;
    assert_eq!(st["sets"]["core"]["degraded"], false, "{st}");

    // A second refusal, from the IDC checks: failing over an IDC that is down already.
    let (status, _) = act(&mut page, "failover", "sh", "first").await;
    assert_eq!(status, 200);
    let (status, text) = act(&mut page, "failover", "sh", "again").await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("down already"), "{text}");
    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    browser.close().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_etcd_mode_the_console_lists_the_gateways_and_the_leader() {
    use etcd_support::{start_gateway, Etcd, GatewayOptions, Idcs};
    let etcd = Etcd::start().await;
    let idcs = Idcs::start().await;
    let revision = etcd.put("topology", &idcs.document(&[])).await as u64;
    let gateway = |instance: &str, idc: &str| GatewayOptions {
        instance: Some(instance.into()),
        idc: Some(idc.into()),
        ..GatewayOptions::default()
    };
    let a = start_gateway(&etcd.url, gateway("gw-a", "sh")).await;
    let b = start_gateway(&etcd.url, gateway("gw-b", "bj")).await;
    // Both registered, at the topology's revision or later, and a leader elected, as gateway
    // a's /status sees them.
    let status = support::eventually("gateway a to see both gateways and a leader", || async {
        let st = send(a.admin_addr, get("/status", &[])).await.json();
        let applied = st["gateways"].as_array().map_or(0, |g| {
            g.iter()
                .filter(|g| g["applied_revision"].as_u64() >= Some(revision))
                .count()
        });
        (applied == 2 && st["leader"].is_string()).then_some(st)
    })
    .await;
    let leader = status["leader"].as_str().unwrap_or_default().to_owned();

    let browser = Browser::launch(1400, 1000).await;
    let mut page = browser.page().await;
    page.navigate(&format!("http://{}/", a.admin_addr)).await;
    let rows = page
        .wait_for(
            "the gateways panel to list both gateways",
            "(() => { const rows = [...document.querySelectorAll('#gateways tbody tr')]; \
             return !document.getElementById('cluster-panel').classList.contains('hidden') \
             && rows.length === 2 ? rows.map(r => [r.dataset.instance, r.cells[0].textContent, \
             r.cells[1].textContent, Number(r.cells[3].textContent)]) : null; })()",
        )
        .await;
    let rows = rows.as_array().cloned().unwrap_or_default();
    let instances: Vec<&str> = rows.iter().filter_map(|r| r[0].as_str()).collect();
    assert_eq!(instances, ["gw-a", "gw-b"], "{rows:?}");
    for r in &rows {
        let instance = r[0].as_str().unwrap_or_default();
        let shown = r[1].as_str().unwrap_or_default();
        // The leader is starred, and only the leader.
        assert_eq!(
            shown.starts_with('★'),
            instance == leader,
            "{rows:?} leader {leader}"
        );
        assert!(r[3].as_u64() >= Some(revision), "{rows:?}");
    }
    assert_eq!(rows[0][2], "sh");
    assert_eq!(rows[1][2], "bj");
    let shown_leader = page
        .value("document.getElementById('leader').textContent")
        .await;
    assert_eq!(shown_leader, json!(format!("leader {leader}")));
    // In etcd mode the page only shows: no action buttons, and a note saying where to act.
    let actions = page
        .value("[...document.querySelectorAll('button[data-action]')].filter(b => b.offsetParent !== null).length")
        .await;
    assert_eq!(actions, json!(0));
    let note = page
        .value("document.getElementById('actions-note').textContent")
        .await;
    assert!(
        note.as_str().is_some_and(|n| n.contains("--etcd")),
        "{note}"
    );
    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    browser.close().await;
    a.shutdown().await;
    b.shutdown().await;
    drop(idcs);
}

/// Writes docs/console.png (or `$SHARDGATE_CONSOLE_SCREENSHOT`): the console of a three-IDC
/// cluster under traffic, with `sh` failed over, a range moving behind its fence, `noncore`
/// degraded and a key looked up. `make console-screenshot` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/console.png; run by `make console-screenshot`"]
async fn console_screenshot() {
    let path = std::env::var("SHARDGATE_CONSOLE_SCREENSHOT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console.png").into());
    let c = Cluster::start_with(Options {
        cache_dir: true,
        // A long fence, so the moving range is still fenced when the picture is taken.
        extra_toml: "\n[failover]\nfence_ms = 60000\n".into(),
        ..Options::default()
    })
    .await;
    let proxy = c.proxy();
    // Traffic: reads and writes on many keys, a few to a dead pool (502s, an open breaker).
    let traffic = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            let key = format!("user-{}", i % 5000);
            let req = match i % 10 {
                0 => request(
                    Method::POST,
                    "/orders",
                    &[("x-user-id", &key)],
                    "{\"item\":1}",
                ),
                1 if i % 30 == 1 => get("/dead", &[("x-user-id", &key)]),
                2 => get("/recommendations", &[("x-user-id", &key)]),
                _ => get("/orders", &[("x-user-id", &key)]),
            };
            let _ = support::try_send(proxy, req).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(12)).await;
    let post = |path: &'static str, body: Value| {
        let admin = c.admin();
        async move {
            let r = send(
                admin,
                request(
                    Method::POST,
                    path,
                    &[("content-type", "application/json")],
                    body.to_string(),
                ),
            )
            .await;
            assert!(r.status.is_success(), "{path}: {}", r.text());
        }
    };
    post(
        "/override/idc/sh",
        // Unfenced (an IDC proven dead): its failover record would otherwise hold the long
        // fence below over its shards, and the move after it would be refused.
        json!({"state": "down", "unfenced": true, "reason": "power loss in hall 2", "by": "oncall"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    post(
        "/move",
        json!({"range": "64-127", "to": "gz", "reason": "rebalance", "by": "oncall"}),
    )
    .await;
    post(
        "/override/degrade/noncore",
        json!({"on": true, "reason": "protect core", "by": "oncall"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;

    let browser = Browser::launch(1500, 1200).await;
    let mut page = open_console(&c, &browser).await;
    wait_for_map(&mut page, c.topology().revision).await;
    page.wait_for(
        "the sparklines to have a history",
        "shardgate.state.history && shardgate.state.history.t.length > 5",
    )
    .await;
    page.type_into("#key-input", "user-42").await;
    page.click("#key-go").await;
    page.wait_for("the key's cell", "shardgate.state.highlight !== null")
        .await;
    page.value("window.scrollTo(0, 0)").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    page.screenshot(std::path::Path::new(&path), 1500).await;
    assert!(page.exceptions.is_empty(), "{:?}", page.exceptions);
    traffic.abort();
    browser.close().await;
    c.stop().await;
}
