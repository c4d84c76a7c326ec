//! The jobs: definitions, pause state and the schedule cursor.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Ack, Backend, Inner, JobFilter, JobKey, NewJob, Page, Replacement, StoreError, writer};
use crate::job::{Job, JobId};
use crate::standing::Standing;

/// The jobs: definitions, pause state and the schedule cursor (`Store::jobs`).
pub struct Jobs<'a> {
    pub(super) inner: &'a Inner,
}

impl Jobs<'_> {
    /// Inserts a job; fails with [`Conflict::NameTaken`](super::Conflict::NameTaken) on a duplicate name.
    pub fn create(&self, job: NewJob) -> Ack<Arc<Job>> {
        self.inner
            .write(|reply| writer::Op::Jobs(Box::new(writer::JobOp::Create { job, reply })))
    }

    /// Replaces a job's definition, keeping its history and id.
    pub fn replace(&self, replacement: Replacement) -> Ack<Arc<Job>> {
        self.inner
            .write(|reply| writer::Op::Jobs(Box::new(writer::JobOp::Replace { replacement, reply })))
    }

    /// Pauses (with an optional note) or resumes a job. Resuming moves the
    /// schedule cursor to `now`: fires due while paused are not replayed.
    pub fn set_paused(
        &self,
        id: JobId,
        paused: bool,
        note: Option<String>,
        now: DateTime<Utc>,
    ) -> Ack<Arc<Job>> {
        self.inner.write(|reply| {
            writer::Op::Jobs(Box::new(writer::JobOp::SetPaused {
                id,
                paused,
                note,
                now,
                reply,
            }))
        })
    }

    /// Deletes a job and its run history. With the outbox on, its live
    /// runs are first recorded as `cancelled` (`job_deleted`) at `at` and
    /// queued for the backend, so their results are not lost with the rows.
    pub fn delete(&self, id: JobId, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::Jobs(Box::new(writer::JobOp::Delete { id, at, reply })))
    }

    /// One job by id or name.
    pub async fn get(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        match (&self.inner.backend, key) {
            (Backend::Sqlite(local), _) => local.get_job(key),
            (Backend::Postgres(_), JobKey::Id(id)) => self.inner.reads.get_job_by("id", id.to_string()).await,
            (Backend::Postgres(_), JobKey::Name(name)) => {
                self.inner.reads.get_job_by("name", name.clone()).await
            }
        }
    }

    /// Jobs in id order after `cursor`, filtered.
    pub async fn list(
        &self,
        filter: &JobFilter,
        cursor: Option<JobId>,
        limit: u32,
    ) -> Result<Page<Job>, StoreError> {
        self.inner.reads.list_jobs(filter, cursor, limit).await
    }

    /// Every job, for the engine to schedule.
    pub async fn load_all(&self) -> Result<Vec<Arc<Job>>, StoreError> {
        self.inner.reads.load_jobs().await
    }

    /// What the engine keeps of every job (see [`crate::job::Timing`]).
    pub async fn timings(&self) -> Result<Vec<crate::job::Timing>, StoreError> {
        self.inner.reads.load_timings().await
    }

    /// The jobs with these ids (missing ones are left out).
    pub async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Arc<Job>>, StoreError> {
        self.inner.reads.get_jobs(ids).await
    }

    /// The standing of the jobs with these ids (missing ones are left
    /// out): their last run, last success and failure, and failure count,
    /// kept on their rows as their runs end.
    pub async fn standings(&self, ids: &[JobId]) -> Result<HashMap<JobId, Standing>, StoreError> {
        self.inner.reads.standings(ids).await
    }

    /// The standing of every job.
    pub async fn all_standings(&self) -> Result<HashMap<JobId, Standing>, StoreError> {
        self.inner.reads.all_standings().await
    }

    /// Counts of jobs: (active, paused).
    pub async fn count(&self) -> Result<(u64, u64), StoreError> {
        self.inner.reads.count_jobs().await
    }
}
