//! History pruning: the statements and the operations that run them.

use chrono::{DateTime, Utc};

use super::{Pending, Reply, pending, plain};
use crate::job::JobId;
use crate::run::RunId;
use crate::store::StoreError;
use crate::store::sql::{Tx, values};

/// History pruning, as the store queues it.
pub enum HistoryOp {
    PruneJob {
        job: JobId,
        keep_last: Option<u32>,
        older_than: Option<DateTime<Utc>>,
        limit: u32,
        reply: Reply<u64>,
    },
    PruneOld {
        older_than: DateTime<Utc>,
        limit: u32,
        reply: Reply<u64>,
    },
}

/// Applies one HistoryOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: HistoryOp) -> Pending {
    match op {
        HistoryOp::PruneJob {
            job,
            keep_last,
            older_than,
            limit,
            reply,
        } => pending(reply, plain(prune_job(tx, job, keep_last, older_than, limit))),
        HistoryOp::PruneOld {
            older_than,
            limit,
            reply,
        } => pending(reply, plain(prune_old(tx, older_than, limit))),
    }
}

/// Deletes up to `limit` finished runs of `job` beyond its `keep_last`
/// newest runs, or created before `older_than`.
fn prune_job(
    c: &mut dyn Tx,
    job: JobId,
    keep_last: Option<u32>,
    older_than: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u64, StoreError> {
    c.execute(
        "DELETE FROM runs WHERE id IN (\
           SELECT id FROM runs WHERE job_id = $1 AND status NOT IN ('queued', 'running') \
           AND (id < (SELECT id FROM runs WHERE job_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2) OR id < $3) \
           ORDER BY id LIMIT $4)",
        &values![
            job.to_string(),
            // No keep-last: an offset past any history keeps everything.
            keep_last.map_or(i64::MAX, |k| i64::from(k.max(1)) - 1),
            older_than.map(|t| RunId::boundary(t).to_string()),
            i64::from(limit),
        ],
    )
}

/// Deletes up to `limit` finished runs created before `older_than`, of jobs
/// without their own history age.
fn prune_old(c: &mut dyn Tx, older_than: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
    c.execute(
        "DELETE FROM runs WHERE id IN (\
           SELECT id FROM runs WHERE id < $1 AND status NOT IN ('queued', 'running') \
           AND job_id NOT IN (SELECT id FROM jobs WHERE history_max_age_ms IS NOT NULL) \
           ORDER BY id LIMIT $2)",
        &values![RunId::boundary(older_than).to_string(), i64::from(limit)],
    )
}

impl HistoryOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::PruneJob { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::PruneOld { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
