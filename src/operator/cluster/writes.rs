//! The etcd side of operator IDC control and fenced moves: the writes of `drain`, `failover`,
//! `restore` and `move` (each one transaction that writes nothing, exit 3, if the keys it was
//! checked against changed meanwhile) and the `--wait` of a move. Phase 2 of a move is driven
//! by the elected leader (`etcd::leader`).

use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::control::etcd::{ClusterKeys, Etcd, EtcdError, Keys};
use crate::control::topology::overrides::{MovePhase, MoveRecord};
use crate::control::topology::IdcOverride;
use crate::operator::cluster::{EtcdCluster, OpError};

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, OpError> {
    serde_json::to_vec(v).map_err(|e| OpError::Refused(format!("cannot encode: {e}")))
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

/// `drain`, `failover`, `restore`: writes `override/idc/<idc>`, with the move record that goes
/// with it (`drain`, a fenced `failover`) in the same transaction, if no IDC override and no
/// move record changed since the checks read them. Returns the revision of the write.
pub async fn write_idc(
    c: &EtcdCluster,
    listed: &ClusterKeys,
    idc: &str,
    value: &IdcOverride,
    record: Option<(&str, &MoveRecord)>,
) -> Result<i64, OpError> {
    let keys = c.keys();
    let guards = vec![
        idc_unchanged(keys, listed, idc),
        listed.unchanged_under(keys, "move/"),
        // The checks that count IDC states (never the last active IDC) hold when two
        // operators act at once. (shardgate never removes an override, only rewrites it.)
        listed.unchanged_under(keys, "override/idc/"),
    ];
    let mut ops = vec![TxnOp::put(keys.idc_override(idc), encode(value)?, None)];
    if let Some((id, r)) = record {
        ops.push(TxnOp::put(keys.move_record(id), encode(r)?, None));
    }
    let txn = Txn::new().when(guards).and_then(ops);
    commit(c.etcd(), "write the IDC override", txn)
        .await?
        .ok_or_else(|| {
            changed(&format!(
                "an IDC override or a move record ({})",
                keys.idc_override(idc)
            ))
        })
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
        .when([listed.unchanged_under(keys, "move/")])
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
            let record: MoveRecord = stored
                .decode("a move record")
                .map_err(|e| OpError::Refused(format!("move/{id} is {e}")))?;
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
