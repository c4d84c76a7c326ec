//! The outbox: results for the control backend, written in the same
//! commit as the state they describe, so a crash can neither lose a result
//! nor send one for a state that was never committed.

use super::{Pending, Reply, pending, plain};
use crate::protocol::{Rejection, RejectionSummary, RunResult};
use crate::run::RunId;
use crate::store::StoreError;
use crate::store::rows::{self, RUN_COLUMNS, ms};
use crate::store::sql::{Tx, first, values};
use chrono::{DateTime, Utc};

/// Queues the final state of run `id` (as now stored) for upload.
pub(super) fn record_run(c: &mut dyn Tx, id: RunId, at: DateTime<Utc>) -> Result<(), StoreError> {
    let found = first(
        c,
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
        &values![id.to_string()],
        |row| rows::run(row),
    )?;
    let Some(run) = found else { return Ok(()) };
    let payload =
        serde_json::to_string(&RunResult::from_run(&run)).map_err(|e| StoreError::encode("run result", e))?;
    insert(c, "result", &id.to_string(), &payload, at)
}

/// Queues the rejections of one job list for upload: the detailed ones
/// and their summary, in one commit.
pub(super) fn record_rejections(
    c: &mut dyn Tx,
    rejections: &[Rejection],
    summary: &RejectionSummary,
) -> Result<(), StoreError> {
    for rejection in rejections {
        let payload = serde_json::to_string(rejection).map_err(|e| StoreError::encode("rejection", e))?;
        insert(c, "rejection", &rejection.job, &payload, rejection.rejected_at)?;
    }
    let payload = serde_json::to_string(summary).map_err(|e| StoreError::encode("rejection summary", e))?;
    insert(c, "rejection_summary", "*", &payload, summary.rejected_at)
}

fn insert(c: &mut dyn Tx, kind: &str, key: &str, payload: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO outbox (kind, key, payload, created_at) VALUES ($1, $2, $3, $4)",
        &values![kind, key, payload, ms(at)],
    )?;
    Ok(())
}

/// Deletes acknowledged entries.
pub(super) fn delete(c: &mut dyn Tx, seqs: &[i64]) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for seq in seqs {
        deleted += c.execute("DELETE FROM outbox WHERE seq = $1", &values![*seq])?;
    }
    Ok(deleted)
}

/// Rejection reports kept at most, apart from `--outbox-limit`: run
/// results are never evicted to make room for them.
pub const MAX_REJECTION_ENTRIES: u64 = 1000;

/// Drops the oldest results beyond `limit` and the oldest rejection
/// reports beyond [`MAX_REJECTION_ENTRIES`]; how many were dropped.
pub(super) fn trim(c: &mut dyn Tx, limit: u64) -> Result<u64, StoreError> {
    let reports = c.execute(
        "DELETE FROM outbox WHERE seq IN \
         (SELECT seq FROM outbox WHERE kind <> 'result' ORDER BY seq DESC LIMIT $1 OFFSET $2)",
        &values![i64::MAX, i64::try_from(MAX_REJECTION_ENTRIES).unwrap_or(i64::MAX)],
    )?;
    let results = c.execute(
        "DELETE FROM outbox WHERE seq IN \
         (SELECT seq FROM outbox WHERE kind = 'result' ORDER BY seq DESC LIMIT $1 OFFSET $2)",
        &values![i64::MAX, i64::try_from(limit).unwrap_or(i64::MAX)],
    )?;
    Ok(reports + results)
}

/// Outbox writes, as the store queues them.
pub enum OutboxOp {
    RecordRejections {
        rejections: Vec<crate::protocol::Rejection>,
        summary: crate::protocol::RejectionSummary,
        reply: Reply<()>,
    },
    Delete {
        seqs: Vec<i64>,
        reply: Reply<u64>,
    },
    Trim {
        limit: u64,
        reply: Reply<u64>,
    },
}

/// Applies one OutboxOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: OutboxOp) -> Pending {
    match op {
        OutboxOp::RecordRejections {
            rejections,
            summary,
            reply,
        } => pending(reply, plain(record_rejections(tx, &rejections, &summary))),
        OutboxOp::Delete { seqs, reply } => pending(reply, plain(delete(tx, &seqs))),
        OutboxOp::Trim { limit, reply } => pending(reply, plain(trim(tx, limit))),
    }
}

impl OutboxOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::RecordRejections { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Delete { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Trim { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
