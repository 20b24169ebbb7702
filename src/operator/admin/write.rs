//! Operator writes on the admin API in file mode (DESIGN.md §8): `POST /override/degrade/<target>`
//! `{"on","reason","by","force"}`, and in [`idc`](self::idc) the IDC states and fenced moves
//! (`POST /override/idc/<idc>`, `POST /move`) → checked against the live snapshot, kept
//! atomically in the cache dir's `overrides.json`, then republished by the file source;
//! answers once served.

use std::time::Duration;

use crate::data::server::ClientBody;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::json;

use super::{error, json_response, Admin};

mod idc;
use crate::control::topology::overrides::unix_now;
use crate::control::topology::DegradeOverride;
use crate::data::upstream::body::ResponseBody;
pub(super) use idc::{idc, move_range};

/// Admin request bodies are a few fields of JSON.
const MAX_BODY: usize = 64 * 1024;
/// Reading the body and waiting for the republished snapshot each have this long.
const DEADLINE: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct DegradeWrite {
    on: bool,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: String,
    /// Degrade `core` or a non-degradable set anyway (the CLI's `--force`).
    #[serde(default)]
    force: bool,
}

/// A path segment with `%XX` escapes decoded (the CLI escapes anything unusual in a target).
pub(super) fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&crate::util::percent_decode(s.as_bytes())).into_owned()
}

/// The request body, bounded in size and time; or the answer saying why not.
async fn read_body(req: Request<ClientBody>) -> Result<bytes::Bytes, Response<ResponseBody>> {
    match tokio::time::timeout(DEADLINE, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the body could not be read (or is over 64 KiB)",
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the body was too slow",
        )),
    }
}

pub(super) async fn degrade(
    admin: &Admin,
    target: &str,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let Some(store) = &admin.file_overrides else {
        return error(
            StatusCode::CONFLICT,
            "not_file_mode",
            "this gateway reads its topology from etcd: use `shardgate degrade --etcd …`",
        );
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let write: DegradeWrite = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("expected {{\"on\":bool,\"reason\",\"by\",\"force\"}}: {e}"),
            )
        }
    };
    let Some(topo) = admin.snapshots.current() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no topology snapshot yet",
        );
    };
    // Turning a switch off is always allowed; turning one on checks core and degradability.
    if let Err(why) =
        crate::operator::cluster::check_degrade_target(&topo, target, write.force || !write.on)
    {
        return error(StatusCode::CONFLICT, "refused", &why);
    }
    if store.path().is_none() {
        return error(
            StatusCode::CONFLICT,
            "no_cache_dir",
            "operator overrides are kept in --cache-dir, and this gateway has none",
        );
    }
    let value = DegradeOverride {
        on: write.on,
        reason: write.reason,
        by: write.by,
        at: unix_now(),
    };
    // Under the store's lock: the failover controller writes the same file.
    let kept = store.update(|o| {
        o.degrade.insert(target.to_owned(), value.clone());
    });
    if let Err(e) = kept {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "write_failed",
            &format!("cannot keep the override: {e}"),
        );
    }
    let mut revisions = admin.snapshots.subscribe();
    store.republish();
    let served = tokio::time::timeout(DEADLINE, async {
        loop {
            let now = admin.snapshots.current();
            if let Some(t) = now.filter(|t| t.overrides.degrade.get(target) == Some(&value)) {
                return t.revision;
            }
            if revisions.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    match served {
        Ok(revision) => json_response(
            StatusCode::OK,
            &json!({"target": target, "on": value.on, "revision": revision}),
        ),
        Err(_) => error(
            StatusCode::ACCEPTED,
            "not_yet_served",
            "the override is kept but the topology could not be republished yet (see /status)",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_are_percent_decoded() {
        assert_eq!(super::percent_decode("route:orders"), "route:orders");
        assert_eq!(super::percent_decode("a%20b%2"), "a b%2");
    }
}
