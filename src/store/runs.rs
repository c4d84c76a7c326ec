//! The runs: claims, starts, attempts, ends and orphaning.

use chrono::{DateTime, Utc};

use super::{Ack, Backend, Inner, Page, RunFilter, StoreError, writer};
use crate::job::JobId;
use crate::run::{Incarnation, Outcome, Run, RunId, RunStatus};

/// The runs: claims, starts, attempts, ends and orphaning (`Store::runs`).
pub struct Runs<'a> {
    pub(super) inner: &'a Inner,
}

impl Runs<'_> {
    /// Inserts a run. A scheduled or catch-up run also moves the job's
    /// schedule cursor to its scheduled time, in the same transaction, so a
    /// restart resumes exactly after the last recorded fire. Fails with
    /// [`Conflict::DuplicateFire`](super::Conflict::DuplicateFire) if the fire was already recorded.
    pub fn insert(&self, run: Run) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::Insert {
                run,
                guard: None,
                reply,
            })
        })
    }

    /// Inserts a starting run like [`Runs::insert`]; with replicas,
    /// only while fewer than `guard` runs of its job are live on other
    /// replicas (else it is recorded as skipped: [`Conflict::Overlap`](super::Conflict::Overlap)).
    pub fn claim(&self, run: Run, guard: u32) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::Insert {
                run,
                guard: Some(guard),
                reply,
            })
        })
    }

    /// Moves a queued run to running.
    pub fn start(&self, id: RunId, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::Runs(writer::RunOp::Start { id, at, reply }))
    }

    /// Records the attempts of a run with retries while it goes on.
    pub fn record_attempt(&self, id: RunId, attempts: u32, log: Vec<crate::run::Attempt>) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::RecordAttempt {
                id,
                attempts,
                log,
                reply,
            })
        })
    }

    /// Records the process a command run started.
    pub fn record_process(&self, id: RunId, pid: i32, pgid: i32, start_ticks: Option<u64>) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::RecordProcess {
                id,
                pid,
                pgid,
                start_ticks,
                reply,
            })
        })
    }

    /// Records a run's final state; [`Conflict::AlreadyFinal`](super::Conflict::AlreadyFinal) if it had one.
    pub fn finish(&self, id: RunId, outcome: Outcome, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::Finish {
                id,
                outcome,
                at,
                reply,
            })
        })
    }

    /// Marks every live run not owned by `current` as orphaned and returns
    /// them as they were (with their recorded process). With replicas
    /// (`expired_before`), only runs of incarnations that stopped or whose
    /// lease expired (last heartbeat not later than `expired_before`).
    pub fn orphan_foreign(
        &self,
        current: Incarnation,
        at: DateTime<Utc>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Ack<Vec<Run>> {
        self.inner.write(|reply| {
            writer::Op::Runs(writer::RunOp::OrphanForeign {
                current,
                at,
                expired_before,
                reply,
            })
        })
    }

    /// Marks one run `orphaned` if it is still `queued` or `running`;
    /// resolves to whether it was.
    pub fn orphan_if_live(&self, id: RunId, at: DateTime<Utc>, error: String) -> Ack<bool> {
        self.inner
            .write(|reply| writer::Op::Runs(writer::RunOp::OrphanIfLive { id, at, error, reply }))
    }

    /// Runs this incarnation has recorded as `queued` or `running`.
    pub async fn live(&self, incarnation: Incarnation) -> Result<Vec<(RunId, JobId)>, StoreError> {
        self.inner.reads.live_runs(incarnation).await
    }

    /// The statuses of `ids` (missing ids are absent from the map).
    pub async fn statuses(
        &self,
        ids: &[RunId],
    ) -> Result<std::collections::HashMap<RunId, RunStatus>, StoreError> {
        self.inner.reads.run_statuses(ids).await
    }

    /// One run.
    pub async fn get(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(local) => local.get_run(id),
            Backend::Postgres(_) => self.inner.reads.get_run(id).await,
        }
    }

    /// Runs newest first, before `cursor`, filtered.
    pub async fn list(
        &self,
        filter: &RunFilter,
        cursor: Option<RunId>,
        limit: u32,
    ) -> Result<Page<Run>, StoreError> {
        self.inner.reads.list_runs(filter, cursor, limit).await
    }
}
