//! Operator commands against a file-mode gateway's admin API (`--admin URL`), for the
//! commands that write: `degrade`.

use std::time::Duration;

use serde_json::Value;

use super::{etcd, exit, runtime, DegradeArgs};
use crate::util::encode_segment_keeping_colon;

/// `degrade` against a file-mode gateway: `POST /override/degrade/<target>`. The gateway checks
/// the target against its live snapshot (core and non-degradable sets need `--force`).
pub fn degrade(args: &DegradeArgs) -> u8 {
    let on = args.switch == etcd::Switch::On;
    let body = serde_json::json!({
        "on": on,
        "reason": args.reason,
        "by": args.by.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_default(),
        "force": args.force,
    });
    let Ok(rt) = runtime(1) else {
        eprintln!("shardgate degrade: cannot start the runtime");
        return exit::REFUSED;
    };
    let admin = &args.admin;
    let path = format!(
        "/override/degrade/{}",
        encode_segment_keeping_colon(&args.target)
    );
    let result = rt.block_on(crate::operator::admin_client::post_json(
        &admin.admin,
        &path,
        admin.admin_token.as_deref(),
        &body,
        Duration::from_secs(10),
    ));
    let (status, answer) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot reach the gateway at {}: {e}", admin.admin);
            return exit::UNREACHABLE;
        }
    };
    let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    let detail = v["detail"].as_str().unwrap_or("");
    match status {
        200 => {
            if admin.json {
                println!("{v}");
            } else {
                println!(
                    "degrade {} {} at revision {} (gateway {})",
                    args.target,
                    if on { "on" } else { "off" },
                    v["revision"],
                    admin.admin
                );
            }
            exit::OK
        }
        202 => {
            eprintln!("shardgate degrade: {detail}");
            exit::TIMED_OUT
        }
        _ => {
            eprintln!("shardgate degrade: refused, nothing written ({status}): {detail}");
            exit::REFUSED
        }
    }
}
