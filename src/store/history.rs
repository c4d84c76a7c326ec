//! Run history retention: what to prune and the pruning.

use chrono::{DateTime, Utc};

use super::{Ack, Inner, StoreError, writer};
use crate::job::JobId;
use crate::run::RunId;

/// Run history retention: what to prune and the pruning (`Store::history`).
pub struct History<'a> {
    pub(super) inner: &'a Inner,
}

impl History<'_> {
    /// Jobs with runs newer than `after`, and the newest run id seen.
    pub async fn jobs_with_runs_since(
        &self,
        after: Option<RunId>,
    ) -> Result<(Vec<JobId>, Option<RunId>), StoreError> {
        self.inner.reads.jobs_with_runs_since(after).await
    }

    /// Jobs whose policy overrides the history defaults: keep-last and
    /// max-age (milliseconds).
    pub async fn overrides(
        &self,
    ) -> Result<std::collections::HashMap<JobId, (Option<u32>, Option<i64>)>, StoreError> {
        self.inner.reads.history_overrides().await
    }

    /// Deletes up to `limit` finished runs of `job` that are beyond its
    /// `keep_last` newest runs or created before `older_than`; how many.
    pub fn prune_job(
        &self,
        job: JobId,
        keep_last: Option<u32>,
        older_than: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Ack<u64> {
        self.inner.write(|reply| {
            writer::Op::History(writer::HistoryOp::PruneJob {
                job,
                keep_last,
                older_than,
                limit,
                reply,
            })
        })
    }

    /// Deletes up to `limit` finished runs created before `older_than`, of
    /// jobs without their own `history.max_age`; how many.
    pub fn prune_old(&self, older_than: DateTime<Utc>, limit: u32) -> Ack<u64> {
        self.inner.write(|reply| {
            writer::Op::History(writer::HistoryOp::PruneOld {
                older_than,
                limit,
                reply,
            })
        })
    }
}
