//! IDC states and fenced moves on the admin API in file mode: `POST /override/idc/<idc>`
//! `{"state","reason","by","warmup_s"?}` (failover = `down`, restore = `warming` or `active`,
//! drain = `draining` plus its `drain` record) and `POST /move` `{"range","to","reason","by"}`.
//! Refusals answer 409 (the cluster's state) or 422 (the request), with the reason.

use crate::data::server::ClientBody;
use http::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{read_body, DEADLINE};
use crate::control::moves::{self, Operator, Refused};
use crate::control::source::FileOverrides;
use crate::control::topology::overrides::MoveRecord;
use crate::control::topology::{IdcOverride, Overrides, Topology};
use crate::data::upstream::body::ResponseBody;
use crate::operator::admin::{error, json_response, Admin};

#[derive(Deserialize)]
struct IdcWrite {
    state: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: String,
    /// `warming` only: this restore's warm-up in seconds (0: every home shard in one step).
    #[serde(default)]
    warmup_s: Option<u64>,
    /// `down` only: skip the write fence (`failover --force-unfenced`, an IDC proven dead).
    #[serde(default)]
    unfenced: bool,
}

#[derive(Deserialize)]
struct MoveWrite {
    range: String,
    to: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: String,
}

/// The override to keep (`None`: remove it) and the move record that goes with it (drain).
type Plan = (Option<IdcOverride>, Option<(String, MoveRecord)>);

fn refused(r: Refused) -> Response<ResponseBody> {
    match r {
        Refused::Invalid(why) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", &why),
        Refused::Conflict(why) => error(StatusCode::CONFLICT, "refused", &why),
    }
}

/// The store and the live snapshot a write is checked against, or why there are none.
#[allow(clippy::result_large_err)] // the error is the answer itself
fn preconditions(
    admin: &Admin,
) -> Result<(&FileOverrides, std::sync::Arc<Topology>), Response<ResponseBody>> {
    let Some(store) = admin.file_overrides.as_deref() else {
        return Err(error(
            StatusCode::CONFLICT,
            "not_file_mode",
            "this gateway reads its topology from etcd: use the command with --etcd URL --cluster NAME",
        ));
    };
    if store.path().is_none() {
        return Err(error(
            StatusCode::CONFLICT,
            "no_cache_dir",
            "operator overrides are kept in --cache-dir, and this gateway has none",
        ));
    }
    let Some(topo) = admin.snapshots.current() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no topology snapshot yet",
        ));
    };
    Ok((store, topo))
}

/// Fence revisions order applied moves: after every record kept so far, and after this
/// snapshot (the file source's revision restarts with the process; the records do not).
fn next_fence_revision(overrides: &Overrides, topo: &Topology) -> u64 {
    let kept = overrides
        .moves
        .values()
        .map(|r| r.fence_revision)
        .max()
        .unwrap_or(0);
    kept.max(topo.revision) + 1
}

/// Whether the kept overrides changed since `checked` in a way that can void a plan's checks:
/// an IDC's state changed, or a move record was opened. (A record that ended only frees
/// shards, and degrade switches do not bear on IDC control.)
fn moved_on(checked: &Overrides, kept: &Overrides) -> bool {
    let state = |o: &Overrides, idc: &str| o.idcs.get(idc).map(|x| x.state);
    let idcs = checked.idcs.keys().chain(kept.idcs.keys());
    let states_changed = idcs
        .into_iter()
        .any(|i| state(checked, i) != state(kept, i));
    let opened = kept.moves.iter().any(|(id, r)| {
        r.phase.is_open() && checked.moves.get(id).is_none_or(|c| !c.phase.is_open())
    });
    states_changed || opened
}

/// Writes `change` into the kept overrides, republishes, and waits until the snapshot
/// satisfies `served`; answers 200 with `answer` and the revision, or 202 if it takes too long.
async fn keep_and_serve(
    admin: &Admin,
    store: &FileOverrides,
    checked_against: &Topology,
    change: impl FnOnce(&mut Overrides),
    served: impl Fn(&Topology) -> bool,
    mut answer: serde_json::Value,
) -> Response<ResponseBody> {
    let guard = store.lock();
    let mut overrides = store.read();
    // The plan was checked against the published snapshot: if the kept overrides moved on
    // since (another operator, the failover controller, the move driver), its checks (never
    // the last active IDC, no overlapping move) may no longer hold. Nothing is written; the
    // operator runs the command again (the CLI's exit 3), as with etcd's compare-and-swap.
    if moved_on(&checked_against.overrides, &overrides) {
        drop(guard);
        return error(
            StatusCode::PRECONDITION_FAILED,
            "changed",
            "the overrides changed since this command was checked; nothing was written (run it again)",
        );
    }
    change(&mut overrides);
    let written = store.write(&overrides);
    drop(guard);
    if let Err(e) = written {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "write_failed",
            &format!("cannot keep the override: {e}"),
        );
    }
    let mut revisions = admin.snapshots.subscribe();
    store.republish();
    let done = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(t) = admin.snapshots.current().filter(|t| served(t)) {
                return t.revision;
            }
            if revisions.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    match done {
        Ok(revision) => {
            answer["revision"] = json!(revision);
            json_response(StatusCode::OK, &answer)
        }
        Err(_) => error(
            StatusCode::ACCEPTED,
            "not_yet_served",
            "the change is kept but the topology could not be republished yet (see /status)",
        ),
    }
}

pub(in crate::operator::admin) async fn idc(
    admin: &Admin,
    idc: &str,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let (store, topo) = match preconditions(admin) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let write: IdcWrite = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!(
                    "expected {{\"state\":\"down|warming|active|draining\",\"reason\",\"by\",\"warmup_s\"}}: {e}"
                ),
            )
        }
    };
    let op = Operator::now(&write.reason, &write.by);
    let idc = idc.to_owned();
    let plan: Result<Plan, Refused> = match write.state.as_str() {
        "down" => moves::plan_failover(&topo, &idc, write.unfenced, &op).map(|(o, r)| (Some(o), r)),
        "warming" => {
            let warmup = write.warmup_s.map(std::time::Duration::from_secs);
            moves::plan_restore(&topo, &idc, warmup, &op).map(|o| (Some(o), None))
        }
        "active" => moves::plan_restore(&topo, &idc, Some(std::time::Duration::ZERO), &op)
            .map(|o| (Some(o), None)),
        "draining" => {
            moves::plan_drain(&topo, &idc, &op).map(|(o, id, r)| (Some(o), Some((id, r))))
        }
        other => Err(Refused::Invalid(format!(
            "`{other}` is not a state an operator sets (down, warming, active, draining)"
        ))),
    };
    let (value, record) = match plan {
        Ok(p) => p,
        Err(r) => return refused(r),
    };
    let answer = json!({
        "idc": idc,
        "state": value.as_ref().map_or("active", |v| v.state.as_str()),
        "move": record.as_ref().map(|(id, _)| id.clone()),
        "ranges": record.as_ref().map(|(_, r)| r.ranges.clone()),
    });
    let move_id = record.as_ref().map(|(id, _)| id.clone());
    let expected = value.clone();
    keep_and_serve(
        admin,
        store,
        &topo,
        |o| {
            match &value {
                Some(v) => o.idcs.insert(idc.clone(), v.clone()),
                None => o.idcs.remove(&idc),
            };
            if let Some((id, mut r)) = record {
                r.fence_revision = next_fence_revision(o, &topo);
                o.moves.insert(id, r);
            }
        },
        |t| {
            t.overrides.idcs.get(&idc) == expected.as_ref()
                && move_id
                    .as_ref()
                    .is_none_or(|id| t.overrides.moves.contains_key(id))
        },
        answer,
    )
    .await
}

pub(in crate::operator::admin) async fn move_range(
    admin: &Admin,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let (store, topo) = match preconditions(admin) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let write: MoveWrite = match serde_json::from_slice(&body) {
        Ok(w) => w,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("expected {{\"range\":\"0-63\",\"to\":\"<idc>\",\"reason\",\"by\"}}: {e}"),
            )
        }
    };
    let op = Operator::now(&write.reason, &write.by);
    // This gateway's own view decides whether the target is healthy (file mode has no other).
    let view = admin.health.idc_view();
    let (id, record) = match moves::plan_move(&topo, &write.range, &write.to, &view, &op) {
        Ok(p) => p,
        Err(r) => return refused(r),
    };
    let answer = json!({
        "move": id,
        "ranges": record.ranges,
        "from": record.from,
        "to": record.to,
    });
    let key = id.clone();
    keep_and_serve(
        admin,
        store,
        &topo,
        |o| {
            let mut record = record;
            record.fence_revision = next_fence_revision(o, &topo);
            o.moves.insert(id, record);
        },
        |t| t.overrides.moves.contains_key(&key),
        answer,
    )
    .await
}
