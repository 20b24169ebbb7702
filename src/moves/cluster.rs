//! The etcd side of operator IDC control and fenced moves: the writes of `drain`, `failover`,
//! `restore` and `move` (each one transaction that writes nothing, exit 3, if the keys it was
//! checked against changed meanwhile), the `--wait` of a move, and one pass of the etcd-mode
//! driver, which the elected leader runs (and the tests run in its place).

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{finish, majority_view, next_step, target_can_serve, unix_now_ms, HealthView, Step};
use crate::etcd::ops::{live_topology, EtcdCluster, OpError};
use crate::etcd::{ClusterKeys, Etcd, EtcdError, KeyKind, Keys};
use crate::topology::overrides::{unix_now, MovePhase, MoveRecord};
use crate::topology::{IdcOverride, IdcState};

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, OpError> {
    serde_json::to_vec(v).map_err(|e| OpError::Refused(format!("cannot encode: {e}")))
}

/// Nothing under `move/` was created or changed since `listed` was read.
fn moves_unchanged(keys: &Keys, listed: &ClusterKeys) -> Compare {
    Compare::mod_revision(
        format!("{}move/", keys.prefix()),
        CompareOp::Less,
        listed.revision + 1,
    )
    .with_prefix()
}

/// The IDC's override is still what was read (absent: mod_revision 0).
fn idc_unchanged(keys: &Keys, listed: &ClusterKeys, idc: &str) -> Compare {
    let seen = listed
        .keys
        .get(&format!("override/idc/{idc}"))
        .map_or(0, |s| s.mod_revision);
    Compare::mod_revision(keys.idc_override(idc), CompareOp::Equal, seen)
}

async fn commit(etcd: &Etcd, what: &str, txn: Txn) -> Result<Option<i64>, EtcdError> {
    let mut client = etcd.client();
    let resp = etcd.call(what, client.txn(txn)).await?;
    Ok(resp
        .succeeded()
        .then(|| resp.header().map_or(0, |h| h.revision())))
}

fn changed(what: &str) -> OpError {
    OpError::Changed(format!(
        "{what} changed since it was read; nothing was written (run the command again)"
    ))
}

/// `failover` / `restore`: writes `override/idc/<idc>` (or removes it: `None`) if it is still
/// what was read. Returns the revision of the write.
pub async fn write_idc(
    c: &EtcdCluster,
    listed: &ClusterKeys,
    idc: &str,
    value: Option<&IdcOverride>,
) -> Result<i64, OpError> {
    let key = c.keys().idc_override(idc);
    let op = match value {
        Some(v) => TxnOp::put(key.clone(), encode(v)?, None),
        None => TxnOp::delete(key.clone(), None),
    };
    let txn = Txn::new()
        .when([idc_unchanged(c.keys(), listed, idc)])
        .and_then([op]);
    commit(c.etcd(), "write the IDC override", txn)
        .await?
        .ok_or_else(|| changed(&key))
}

/// `drain`: the `draining` override and the `drain` record in one transaction, if neither the
/// override nor any move record changed since the checks read them.
pub async fn write_drain(
    c: &EtcdCluster,
    listed: &ClusterKeys,
    idc: &str,
    value: &IdcOverride,
    id: &str,
    record: &MoveRecord,
) -> Result<i64, OpError> {
    let keys = c.keys();
    let txn = Txn::new()
        .when([
            idc_unchanged(keys, listed, idc),
            moves_unchanged(keys, listed),
        ])
        .and_then([
            TxnOp::put(keys.idc_override(idc), encode(value)?, None),
            TxnOp::put(keys.move_record(id), encode(record)?, None),
        ]);
    commit(c.etcd(), "write the drain", txn)
        .await?
        .ok_or_else(|| changed(&format!("{} or a move record", keys.idc_override(idc))))
}

/// `move`: the record in phase `fencing`, if no move record changed since the checks.
pub async fn write_move(
    c: &EtcdCluster,
    listed: &ClusterKeys,
    id: &str,
    record: &MoveRecord,
) -> Result<i64, OpError> {
    let keys = c.keys();
    let txn = Txn::new()
        .when([moves_unchanged(keys, listed)])
        .and_then([TxnOp::put(keys.move_record(id), encode(record)?, None)]);
    commit(c.etcd(), "write the move", txn)
        .await?
        .ok_or_else(|| changed("a move record"))
}

/// What `--wait` has seen of a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveProgress {
    /// Phase 1: `acked` of `gateways` live gateways serve the fence.
    Fencing { acked: usize, gateways: usize },
    /// Phase 2 written at `revision`; `applied` of `gateways` serve it.
    Applied {
        revision: i64,
        applied: usize,
        gateways: usize,
    },
}

/// Waits until move record `id` is applied and every live gateway serves it. `Refused` (exit
/// 1) when it was rolled back, `TimedOut` (exit 5) after `limit`.
pub async fn wait_move(
    c: &EtcdCluster,
    id: &str,
    limit: Duration,
    mut progress: impl FnMut(&MoveProgress),
) -> Result<MoveProgress, OpError> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        let listed = match c.read().await {
            Ok(l) => Some(l),
            // A blip while waiting is not the end of the wait: the deadline decides.
            Err(OpError::Unreachable(_)) if Instant::now() < deadline => None,
            Err(e) => return Err(e),
        };
        if let Some(listed) = listed {
            let Some(stored) = listed.keys.get(&format!("move/{id}")) else {
                return Err(OpError::Refused(format!("move/{id} is gone from etcd")));
            };
            let record: MoveRecord = serde_json::from_slice(&stored.value)
                .map_err(|e| OpError::Refused(format!("move/{id} is not a move record: {e}")))?;
            let gateways: Vec<u64> = listed
                .gateways()
                .into_iter()
                .map(|(_, r)| r.map_or(0, |r| r.applied_revision))
                .collect();
            let at_least = |rev: i64| gateways.iter().filter(|a| **a as i64 >= rev).count();
            let now = match record.phase {
                MovePhase::RolledBack => {
                    return Err(OpError::Refused(format!(
                        "move/{id} was rolled back: {}",
                        record.note
                    )))
                }
                MovePhase::Fencing => MoveProgress::Fencing {
                    acked: at_least(stored.mod_revision),
                    gateways: gateways.len(),
                },
                MovePhase::Applied => MoveProgress::Applied {
                    revision: stored.mod_revision,
                    applied: at_least(stored.mod_revision),
                    gateways: gateways.len(),
                },
            };
            if last.as_ref() != Some(&now) {
                progress(&now);
            }
            if let MoveProgress::Applied {
                applied, gateways, ..
            } = now
            {
                if applied == gateways {
                    return Ok(now);
                }
            }
            last = Some(now);
        }
        if Instant::now() >= deadline {
            return Err(OpError::TimedOut(format!(
                "move/{id} was not applied by every live gateway within {} ms (last seen: {last:?})",
                limit.as_millis()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One pass of the etcd-mode driver (the elected leader calls it on a timer): every `fencing`
/// record is decided with [`next_step`] — acknowledged when every registered gateway's
/// `applied_revision` reaches the record's revision, the target judged by the majority of the
/// gateways' health views — and a decision is written with a compare-and-swap on the record's
/// mod_revision, so two drivers never both act. Rolling back a drain removes its `draining`
/// override in the same transaction. Returns the decisions that were written.
pub async fn drive_once(etcd: &Etcd, keys: &Keys) -> Result<Vec<(String, Step)>, EtcdError> {
    let listed = etcd.list(keys).await?;
    // The leader calls this on a timer: with no open record, skip building the snapshot.
    let any_open = listed
        .overrides(keys)
        .is_ok_and(|o| o.moves.values().any(|r| r.phase.is_open()));
    if !any_open {
        return Ok(Vec::new());
    }
    let Ok(t) = live_topology(keys, &listed) else {
        // No usable topology: nothing can be judged; the records wait (or time out later).
        return Ok(Vec::new());
    };
    let gateways = listed.gateways();
    let views: Vec<HealthView> = gateways
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|r| r.view.clone()))
        .collect();
    let view = majority_view(&views);
    let now_ms = unix_now_ms();
    let mut done = Vec::new();
    for (name, stored) in &listed.keys {
        let KeyKind::Move(id) = KeyKind::of(name) else {
            continue;
        };
        let Some(record) = t.overrides.moves.get(&id) else {
            continue;
        };
        if record.phase != MovePhase::Fencing {
            continue;
        }
        let all_acked = gateways.iter().all(|(_, r)| {
            r.as_ref()
                .is_ok_and(|r| r.applied_revision as i64 >= stored.mod_revision)
        });
        let step = next_step(
            record,
            now_ms,
            t.failover.fence,
            all_acked,
            target_can_serve(&t, record, &view),
        );
        if step == Step::Wait {
            continue;
        }
        let mut after = t.overrides.clone();
        if !finish(&mut after, &id, &step, unix_now()) {
            continue;
        }
        let Some(new) = after.moves.get(&id) else {
            continue;
        };
        let value = serde_json::to_vec(new).map_err(|e| EtcdError(e.to_string()))?;
        let mut when = vec![Compare::mod_revision(
            keys.move_record(&id),
            CompareOp::Equal,
            stored.mod_revision,
        )];
        let mut ops = vec![TxnOp::put(keys.move_record(&id), value, None)];
        if let (Step::RollBack(_), Some(from)) = (&step, record.from.as_deref()) {
            let was_draining = t
                .overrides
                .idcs
                .get(from)
                .is_some_and(|o| o.state == IdcState::Draining);
            if was_draining && !after.idcs.contains_key(from) {
                when.push(idc_unchanged(keys, &listed, from));
                ops.push(TxnOp::delete(keys.idc_override(from), None));
            }
        }
        let txn = Txn::new().when(when).and_then(ops);
        if commit(etcd, "advance a move", txn).await?.is_some() {
            match &step {
                Step::Apply => {
                    tracing::info!(id = %id, "move applied: the new owner is published and the fence lifted")
                }
                Step::RollBack(why) => {
                    tracing::warn!(id = %id, why = %why, "move rolled back: the fence is lifted, the owner did not change")
                }
                Step::Wait => {}
            }
            done.push((id, step));
        }
    }
    Ok(done)
}
