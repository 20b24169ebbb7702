//! The admin-API half of the operator IDC commands, for a gateway on a file topology:
//! `POST /override/idc/<idc>` and `POST /move`, then `--wait` by polling `/status` until the
//! move record is applied (exit 0) or rolled back (exit 1).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::exit;
use super::operator::{count_shards, report, short_ranges, OperatorArgs, Parts};
use crate::util::encode_segment;

/// One admin call's deadline: the gateway answers once the change is served (up to 5 s).
const CALL: Duration = Duration::from_secs(10);

async fn post(args: &OperatorArgs, path: &str, body: &Value) -> Result<(u16, Value), u8> {
    let admin = &args.admin;
    match crate::operator::admin_client::post_json(
        &admin.admin,
        path,
        admin.admin_token.as_deref(),
        body,
        CALL,
    )
    .await
    {
        Ok((status, answer)) => Ok((
            status,
            serde_json::from_slice(&answer).unwrap_or(Value::Null),
        )),
        Err(e) => {
            eprintln!("cannot reach the gateway at {}: {e}", admin.admin);
            Err(exit::UNREACHABLE)
        }
    }
}

pub(super) async fn admin_action(p: &Parts, wait: bool, args: &OperatorArgs) -> u8 {
    let command = p.command;
    let by = args
        .by
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let (path, body) = match (command, &p.idc) {
        ("move", _) => (
            "/move".to_owned(),
            json!({"range": p.range, "to": p.to, "reason": args.reason, "by": by}),
        ),
        (_, Some(idc)) => {
            let mut body = json!({"reason": args.reason, "by": by});
            body["state"] = json!(match command {
                "drain" => "draining",
                "failover" => "down",
                _ if p.warmup == Some(Duration::ZERO) => "active",
                _ => "warming",
            });
            if let Some(w) = p.warmup.filter(|w| !w.is_zero()) {
                body["warmup_s"] = json!(w.as_secs().max(1));
            }
            if p.unfenced {
                body["unfenced"] = json!(true);
            }
            (format!("/override/idc/{}", encode_segment(idc)), body)
        }
        _ => return exit::USAGE,
    };
    let (status, v) = match post(args, &path, &body).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let detail = v["detail"].as_str().unwrap_or("").to_owned();
    match status {
        200 => {}
        202 => {
            eprintln!("shardgate {command}: {detail}");
            return exit::TIMED_OUT;
        }
        412 => {
            eprintln!("shardgate {command}: conflict, nothing written: {detail}");
            return exit::CONFLICT;
        }
        _ => {
            eprintln!("shardgate {command}: refused, nothing written ({status}): {detail}");
            return exit::REFUSED;
        }
    }
    let json_out = args.admin.json;
    let ranges: Vec<String> = v["ranges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let gateway = &args.admin.admin;
    let line = match (command, v["move"].as_str()) {
        ("move", Some(id)) => format!(
            "move {} -> {}: move/{id} fencing {} shards (from {}) at revision {} (gateway {gateway})\n\
             writes to them get 503 fenced; reads stay with the old owner until fence_ms has passed",
            p.range.as_deref().unwrap_or("?"),
            p.to.as_deref().unwrap_or("?"),
            count_shards(&ranges),
            v["from"].as_str().unwrap_or("several IDCs"),
            v["revision"],
        ),
        ("failover", Some(id)) => format!(
            "failover {}: state down, move/{id} fences the writes of its {} shards ({}) at revision {} (gateway {gateway})\n\
             reads go to the next IDC at once; writes resume there once fence_ms has passed",
            p.idc.as_deref().unwrap_or("?"),
            count_shards(&ranges),
            short_ranges(&ranges),
            v["revision"],
        ),
        ("drain", Some(id)) => format!(
            "drain {}: state draining, move/{id} fencing {} shards ({}) at revision {} (gateway {gateway})\n\
             writes to them get 503 fenced; reads stay with {0} until fence_ms has passed",
            p.idc.as_deref().unwrap_or("?"),
            count_shards(&ranges),
            short_ranges(&ranges),
            v["revision"],
        ),
        _ => format!(
            "{command} {}: state {} at revision {} (gateway {gateway}){}",
            p.idc.as_deref().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["revision"],
            match body["warmup_s"].as_u64() {
                Some(w) => format!(", warm-up {w} s"),
                None => String::new(),
            }
        ),
    };
    report(json_out, &v, &line);
    // An IDC state is served when the gateway answers; a move has its phase 2 to wait for.
    match v["move"].as_str() {
        Some(id) if wait => wait_applied(args, command, id).await,
        _ => exit::OK,
    }
}

/// Polls `/status` until move `id` is applied (0) or rolled back (1); 5 after `--timeout`.
async fn wait_applied(args: &OperatorArgs, command: &str, id: &str) -> u8 {
    let admin = &args.admin;
    let json_out = admin.json;
    if !json_out {
        println!(
            "waiting up to {} ms for move/{id} to be applied",
            args.timeout.as_millis()
        );
    }
    let started = Instant::now();
    let deadline = started + args.timeout;
    let mut last = String::new();
    loop {
        let status = crate::operator::admin_client::get(
            &admin.admin,
            "/status",
            admin.admin_token.as_deref(),
            Duration::from_secs(3),
        )
        .await;
        if let Ok((200, body)) = status {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let record = v["moves"]
                .as_array()
                .and_then(|m| m.iter().find(|r| r["id"] == id))
                .cloned()
                .unwrap_or(Value::Null);
            let phase = record["phase"].as_str().unwrap_or("gone").to_owned();
            if phase != last && !json_out {
                println!(
                    "  +{:>5} ms  {phase} (revision {})",
                    started.elapsed().as_millis(),
                    v["revision"]
                );
            }
            match phase.as_str() {
                "applied" => {
                    if !json_out {
                        println!("{command} done: move/{id} is applied and served");
                    }
                    return exit::OK;
                }
                "rolled_back" => {
                    eprintln!(
                        "shardgate {command}: move/{id} was rolled back: {}",
                        record["note"].as_str().unwrap_or("")
                    );
                    return exit::REFUSED;
                }
                "gone" => {
                    eprintln!("shardgate {command}: move/{id} is no longer listed by the gateway");
                    return exit::REFUSED;
                }
                _ => {}
            }
            last = phase;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "shardgate {command}: move/{id} was not applied within {} ms (last seen: {last})",
                args.timeout.as_millis()
            );
            return exit::TIMED_OUT;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
