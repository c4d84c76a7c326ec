//! Persistence: the narrow interface every other module uses.
//!
//! [`Store`] is the source of truth for jobs and runs, on SQLite (default)
//! or PostgreSQL, chosen by the database URL. Writes go through a single
//! writer thread that commits whatever is queued in one transaction (group
//! commit), so fires at thousands per second cost one fsync per batch and
//! never meet `SQLITE_BUSY`; reads use a separate pool (read-only SQLite
//! connections: WAL lets them run beside the writer). Statements are
//! written once, in SQL both databases accept (`sql`, `reads`). After a job write
//! commits, the writer publishes a [`JobChange`] in commit order, which is
//! how the engine learns about creates, updates, pauses and deletes without
//! polling and without races between concurrent API calls.

mod error;
pub mod fault;
mod point;
mod postgres;
mod reads;
mod replicas;
mod rows;
mod sql;
mod sqlite;
mod writer;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::job::{Job, JobDefinition, JobId, Source};
use crate::run::{Incarnation, Outcome, Run, RunId, RunStatus};

pub use self::error::{Conflict, Corruption, DatabaseError, StoreError};
pub use self::fault::{Failing, StorageFault};
pub use self::postgres::Notifications;
pub use self::replicas::Replica;
pub use self::sqlite::{SqliteOptions, Synchronous};
pub use self::writer::JOB_CHANNEL;
pub use self::writer::WriterTask;

/// A committed change to a job, published in commit order.
#[derive(Debug, Clone)]
pub enum JobChange {
    /// Created, replaced, paused or resumed.
    Upserted(Arc<Job>),
    /// Deleted.
    Removed(JobId),
    /// Replicas: these jobs changed on another replica; read them again.
    Stale(Vec<JobId>),
    /// Replicas: ownership changed or notifications may have been lost;
    /// re-read every job.
    Resync,
}

/// Addresses a job by id or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKey {
    /// By id.
    Id(JobId),
    /// By unique name.
    Name(String),
}

impl JobKey {
    /// A UUID is an id; anything else a name (names cannot be UUIDs).
    pub fn parse(text: &str) -> Self {
        match text.parse() {
            Ok(id) => Self::Id(id),
            Err(_) => Self::Name(text.to_owned()),
        }
    }
}

/// Filters for listing jobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Every `(key, value)` label must match.
    pub labels: Vec<(String, String)>,
    /// Only paused (or only active) jobs.
    pub paused: Option<bool>,
    /// Only jobs from this source.
    pub source: Option<Source>,
}

/// Filters for listing runs.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only this job's runs.
    pub job: Option<JobId>,
    /// Only runs in one of these statuses.
    pub statuses: Vec<RunStatus>,
}

/// A new job to insert.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Its id.
    pub id: JobId,
    /// Its validated definition.
    pub def: JobDefinition,
    /// Start paused.
    pub paused: bool,
    /// Who owns it.
    pub source: Source,
    /// Creation time (also the initial schedule cursor).
    pub now: DateTime<Utc>,
}

/// A replacement definition for an existing job.
#[derive(Debug, Clone)]
pub struct Replacement {
    /// The job.
    pub id: JobId,
    /// `If-Match`: fail unless the stored version is this one.
    pub expected_version: Option<i64>,
    /// The new definition.
    pub def: JobDefinition,
    /// New paused state, or keep.
    pub paused: Option<bool>,
    /// When.
    pub now: DateTime<Utc>,
}

/// One result waiting for the control backend.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    /// Position in commit order.
    pub seq: i64,
    /// `result` or `rejection`.
    pub kind: String,
    /// The JSON to upload.
    pub payload: String,
}

/// When a job last succeeded and last failed.
pub type LastOutcomes = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// A page of results and the cursor for the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Present when more items follow.
    pub next: Option<String>,
}

/// The commit acknowledgement of a submitted write.
///
/// Write methods enqueue their operation when *called*, not when the
/// returned future is first polled, so writes submitted in order from one
/// task commit in that order; awaiting the `Ack` waits for the commit.
#[must_use = "a write is only known to be durable once its Ack resolves"]
pub struct Ack<T>(AckState<T>);

enum AckState<T> {
    Waiting(oneshot::Receiver<Result<T, StoreError>>),
    Failed(Option<StoreError>),
}

impl<T> Ack<T> {
    fn waiting(rx: oneshot::Receiver<Result<T, StoreError>>) -> Self {
        Self(AckState::Waiting(rx))
    }

    fn failed(e: StoreError) -> Self {
        Self(AckState::Failed(Some(e)))
    }
}

impl<T> Future for Ack<T> {
    type Output = Result<T, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            AckState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
            AckState::Failed(e) => Poll::Ready(Err(e.take().unwrap_or(StoreError::Closed))),
        }
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// What every backend provides: the async read pool, the writer's queue
/// and the outbox signal; and what differs, in [`Backend`].
struct Inner {
    reads: reads::Pool,
    /// The writer's queue. Unbounded so that a write is enqueued
    /// synchronously when it is submitted, which is what makes the commit
    /// order equal the submission order (see [`Ack`]). Its producers are
    /// bounded upstream: fires by the schedule, API writes by the HTTP
    /// concurrency limit.
    writer: writer::Queue,
    outbox_signal: Arc<tokio::sync::Notify>,
    backend: Backend,
}

enum Backend {
    Sqlite(sqlite::Local),
    Postgres(postgres::Remote),
}

impl Inner {
    /// Enqueues a write now; the returned [`Ack`] resolves after its commit.
    fn write<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> writer::Op) -> Ack<T> {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(op(tx)) {
            Ack::waiting(rx)
        } else {
            Ack::failed(StoreError::Closed)
        }
    }
}

/// Fails unless the newest applied migration is the newest `migrator` has.
fn expect_schema(applied: Option<i64>, migrator: &sqlx::migrate::Migrator) -> Result<(), StoreError> {
    let expected = migrator.iter().map(|m| m.version).max();
    if applied != expected {
        return Err(StoreError::Schema { applied, expected });
    }
    Ok(())
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if missing) and migrates the database at `url`, and
    /// starts the writer; committed job changes are sent to `changes`.
    pub async fn open(
        options: &SqliteOptions,
        changes: mpsc::UnboundedSender<JobChange>,
    ) -> Result<(Self, writer::WriterTask), StoreError> {
        let (inner, task) = if postgres::is_postgres(&options.url) {
            postgres::open(options, changes).await?
        } else {
            sqlite::open(options, changes).await?
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            task,
        ))
    }

    /// Applies pending migrations and returns (used by `cronguard migrate`).
    pub async fn migrate_only(options: &SqliteOptions) -> Result<(), StoreError> {
        if postgres::is_postgres(&options.url) {
            postgres::migrate_only(options).await
        } else {
            sqlite::migrate_only(options).await
        }
    }

    // ---- jobs -----------------------------------------------------------

    /// Inserts a job; fails with [`StoreError::Conflict(Conflict::NameTaken)`] on a duplicate name.
    pub fn create_job(&self, job: NewJob) -> Ack<Arc<Job>> {
        self.inner.write(|reply| writer::Op::CreateJob { job, reply })
    }

    /// Replaces a job's definition, keeping its history and id.
    pub fn replace_job(&self, replacement: Replacement) -> Ack<Arc<Job>> {
        self.inner
            .write(|reply| writer::Op::ReplaceJob { replacement, reply })
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
        self.inner.write(|reply| writer::Op::SetPaused {
            id,
            paused,
            note,
            now,
            reply,
        })
    }

    /// Deletes a job and its run history. With the outbox on, its live
    /// runs are first recorded as `cancelled` (`job_deleted`) at `at` and
    /// queued for the backend, so their results are not lost with the rows.
    pub fn delete_job(&self, id: JobId, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::DeleteJob { id, at, reply })
    }

    /// One job by id or name.
    pub async fn get_job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        match (&self.inner.backend, key) {
            (Backend::Sqlite(local), _) => local.get_job(key),
            (Backend::Postgres(_), JobKey::Id(id)) => self.inner.reads.get_job_by("id", id.to_string()).await,
            (Backend::Postgres(_), JobKey::Name(name)) => {
                self.inner.reads.get_job_by("name", name.clone()).await
            }
        }
    }

    /// Jobs in id order after `cursor`, filtered.
    pub async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<JobId>,
        limit: u32,
    ) -> Result<Page<Job>, StoreError> {
        self.inner.reads.list_jobs(filter, cursor, limit).await
    }

    /// Every job, for the engine to schedule.
    pub async fn load_jobs(&self) -> Result<Vec<Arc<Job>>, StoreError> {
        self.inner.reads.load_jobs().await
    }

    /// What the engine keeps of every job (see [`crate::job::Timing`]).
    pub async fn load_timings(&self) -> Result<Vec<crate::job::Timing>, StoreError> {
        self.inner.reads.load_timings().await
    }

    /// The jobs with these ids (missing ones are left out).
    pub async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Arc<Job>>, StoreError> {
        self.inner.reads.get_jobs(ids).await
    }

    /// Counts of jobs: (active, paused).
    pub async fn count_jobs(&self) -> Result<(u64, u64), StoreError> {
        self.inner.reads.count_jobs().await
    }

    // ---- runs -----------------------------------------------------------

    /// Inserts a run. A scheduled or catch-up run also moves the job's
    /// schedule cursor to its scheduled time, in the same transaction, so a
    /// restart resumes exactly after the last recorded fire. Fails with
    /// [`StoreError::Conflict(Conflict::DuplicateFire)`] if the fire was already recorded.
    pub fn insert_run(&self, run: Run) -> Ack<()> {
        self.inner.write(|reply| writer::Op::InsertRun {
            run,
            guard: None,
            reply,
        })
    }

    /// Inserts a starting run like [`Store::insert_run`]; with replicas,
    /// only while fewer than `guard` runs of its job are live on other
    /// replicas (else it is recorded as skipped: [`StoreError::Conflict(Conflict::Overlap)`]).
    pub fn claim_run(&self, run: Run, guard: u32) -> Ack<()> {
        self.inner.write(|reply| writer::Op::InsertRun {
            run,
            guard: Some(guard),
            reply,
        })
    }

    /// Moves a queued run to running.
    pub fn start_run(&self, id: RunId, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::StartRun { id, at, reply })
    }

    /// Records the attempts of a run with retries while it goes on.
    pub fn record_attempt(&self, id: RunId, attempts: u32, log: Vec<crate::run::Attempt>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::RecordAttempt {
            id,
            attempts,
            log,
            reply,
        })
    }

    /// Records the process a command run started.
    pub fn record_process(&self, id: RunId, pid: i32, pgid: i32, start_ticks: Option<u64>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::RecordProcess {
            id,
            pid,
            pgid,
            start_ticks,
            reply,
        })
    }

    /// Records a run's final state; [`StoreError::Conflict(Conflict::AlreadyFinal)`] if it had one.
    pub fn finish_run(&self, id: RunId, outcome: Outcome, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::FinishRun {
            id,
            outcome,
            at,
            reply,
        })
    }

    /// Marks every live run not owned by `current` as orphaned and returns
    /// them as they were (with their recorded process). With replicas
    /// (`expired_before`), only runs of incarnations that stopped or whose
    /// lease expired (last heartbeat not later than `expired_before`).
    pub fn orphan_foreign_runs(
        &self,
        current: Incarnation,
        at: DateTime<Utc>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Ack<Vec<Run>> {
        self.inner.write(|reply| writer::Op::OrphanForeignRuns {
            current,
            at,
            expired_before,
            reply,
        })
    }

    /// Marks one run `orphaned` if it is still `queued` or `running`;
    /// resolves to whether it was.
    pub fn orphan_run_if_live(&self, id: RunId, at: DateTime<Utc>, error: String) -> Ack<bool> {
        self.inner
            .write(|reply| writer::Op::OrphanRunIfLive { id, at, error, reply })
    }

    /// Runs this incarnation has recorded as `queued` or `running`.
    pub async fn live_runs(&self, incarnation: Incarnation) -> Result<Vec<(RunId, JobId)>, StoreError> {
        self.inner.reads.live_runs(incarnation).await
    }

    /// The statuses of `ids` (missing ids are absent from the map).
    pub async fn run_statuses(
        &self,
        ids: &[RunId],
    ) -> Result<std::collections::HashMap<RunId, RunStatus>, StoreError> {
        self.inner.reads.run_statuses(ids).await
    }

    /// For each job: the end of its last successful run and of its last
    /// failed or timed-out run.
    pub async fn last_outcomes(
        &self,
        jobs: &[JobId],
    ) -> Result<std::collections::HashMap<JobId, LastOutcomes>, StoreError> {
        self.inner.reads.last_outcomes(jobs).await
    }

    /// Jobs with runs newer than `after`, and the newest run id seen.
    pub async fn jobs_with_runs_since(
        &self,
        after: Option<RunId>,
    ) -> Result<(Vec<JobId>, Option<RunId>), StoreError> {
        self.inner.reads.jobs_with_runs_since(after).await
    }

    /// Jobs whose policy overrides the history defaults: keep-last and
    /// max-age (milliseconds).
    pub async fn history_overrides(
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
        self.inner.write(|reply| writer::Op::PruneJob {
            job,
            keep_last,
            older_than,
            limit,
            reply,
        })
    }

    /// Deletes up to `limit` finished runs created before `older_than`, of
    /// jobs without their own `history.max_age`; how many.
    pub fn prune_old(&self, older_than: DateTime<Utc>, limit: u32) -> Ack<u64> {
        self.inner.write(|reply| writer::Op::PruneOld {
            older_than,
            limit,
            reply,
        })
    }

    /// One run.
    pub async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(local) => local.get_run(id),
            Backend::Postgres(_) => self.inner.reads.get_run(id).await,
        }
    }

    /// Runs newest first, before `cursor`, filtered.
    pub async fn list_runs(
        &self,
        filter: &RunFilter,
        cursor: Option<RunId>,
        limit: u32,
    ) -> Result<Page<Run>, StoreError> {
        self.inner.reads.list_runs(filter, cursor, limit).await
    }

    // ---- outbox (control backend) -----------------------------------------

    /// Queues a rejected backend job spec for upload.
    pub fn record_rejections(
        &self,
        rejections: Vec<crate::protocol::Rejection>,
        summary: crate::protocol::RejectionSummary,
    ) -> Ack<()> {
        self.inner.write(|reply| writer::Op::RecordRejections {
            rejections,
            summary,
            reply,
        })
    }

    /// Notified after every commit while the outbox is on (the uploader
    /// waits on it instead of polling).
    pub fn outbox_signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_signal.clone()
    }

    /// Deletes acknowledged outbox entries.
    pub fn outbox_delete(&self, seqs: Vec<i64>) -> Ack<u64> {
        self.inner.write(|reply| writer::Op::OutboxDelete { seqs, reply })
    }

    /// Drops the oldest outbox entries beyond `limit`; how many.
    pub fn outbox_trim(&self, limit: u64) -> Ack<u64> {
        self.inner.write(|reply| writer::Op::OutboxTrim { limit, reply })
    }

    /// The oldest `limit` outbox entries, in commit order.
    pub async fn outbox_peek(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.reads.outbox_peek(limit).await
    }

    /// Entries waiting, and when the oldest was written.
    pub async fn outbox_stats(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        self.inner.reads.outbox_stats().await
    }

    // ---- incarnations ---------------------------------------------------

    /// Records this process's start on `host`.
    pub fn register_incarnation(&self, id: Incarnation, host: String, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::RegisterIncarnation { id, host, at, reply })
    }

    /// Whether other instances may share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
    }

    /// Renews this replica's lease; `false` once it was declared stopped.
    pub async fn heartbeat(&self, id: Incarnation, at: DateTime<Utc>) -> Result<bool, StoreError> {
        self.inner.reads.heartbeat(id, at).await
    }

    /// Records that this replica began to leave.
    pub async fn leave(&self, id: Incarnation, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.reads.leave(id, at).await
    }

    /// Runs executing now, by incarnation.
    pub async fn running_by_incarnation(
        &self,
    ) -> Result<std::collections::HashMap<Incarnation, u64>, StoreError> {
        self.inner.reads.running_by_incarnation().await
    }

    /// Replicas not stopped whose last heartbeat is later than `cutoff`.
    pub async fn replicas(&self, cutoff: DateTime<Utc>) -> Result<Vec<Replica>, StoreError> {
        self.inner.reads.replicas(cutoff).await
    }

    /// Listens for job changes announced by replicas (PostgreSQL only).
    pub async fn listen(&self) -> Result<Option<Notifications>, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(remote) => remote.listen().await.map(Some),
        }
    }

    /// Records this process's clean stop.
    pub fn stop_incarnation(&self, id: Incarnation, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::StopIncarnation { id, at, reply })
    }

    /// Writes one row, to learn whether the database takes writes.
    pub fn probe(&self, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| writer::Op::Probe { at, reply })
    }

    /// `None` while the writer's commits go through; otherwise since when
    /// and why they fail.
    pub fn failing(&self) -> Option<Failing> {
        self.inner.writer.writability.failing()
    }

    /// Commits every write submitted before, then stops the writer; writes
    /// submitted after fail with [`StoreError::Closed`].
    pub fn close(&self) -> Ack<()> {
        self.inner.write(|reply| writer::Op::Close { reply })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.reads.ping().await
    }

    /// Readiness: the database file opens afresh and is fully migrated.
    pub async fn check_ready(&self) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(local) => local.check_ready().await,
            Backend::Postgres(remote) => remote.check_ready().await,
        }
    }

    /// Bytes the database occupies on disk (SQLite: file plus write-ahead
    /// log); `None` when the database cannot tell right now.
    pub async fn size_bytes(&self) -> Option<u64> {
        match &self.inner.backend {
            Backend::Sqlite(local) => Some(local.size_bytes()),
            Backend::Postgres(remote) => match remote.size_bytes().await {
                Ok(size) => Some(size),
                Err(e) => {
                    tracing::debug!(error = %e, "database size unavailable");
                    None
                }
            },
        }
    }
}
