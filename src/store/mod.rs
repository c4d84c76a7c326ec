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
mod history;
mod incarnations;
mod jobs;
mod notices;
mod outbox;
mod point;
mod postgres;
mod reads;
mod replicas;
mod rows;
mod runs;
mod sql;
mod sqlite;
mod writer;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::job::{Job, JobDefinition, JobId, Source};
use crate::run::RunStatus;

pub use self::error::{Conflict, Corruption, DatabaseError, StoreError};
pub use self::fault::{Failing, StorageFault};
pub use self::history::History;
pub use self::incarnations::Incarnations;
pub use self::jobs::Jobs;
pub use self::notices::{Notice, NoticeFilter, Notices, Route, Settled};
pub use self::outbox::Outbox;
pub use self::postgres::Notifications;
pub use self::replicas::Replica;
pub use self::runs::Runs;
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
    /// The live feed the writer publishes committed changes to.
    bus: Arc<crate::events::Bus>,
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
        let bus = Arc::new(crate::events::Bus::new());
        let (inner, task) = if postgres::is_postgres(&options.url) {
            postgres::open(options, changes, bus).await?
        } else {
            sqlite::open(options, changes, bus).await?
        };
        Ok((
            Self {
                inner: Arc::new(inner),
            },
            task,
        ))
    }

    /// The jobs: definitions, pause state and the schedule cursor.
    pub fn jobs(&self) -> Jobs<'_> {
        Jobs { inner: &self.inner }
    }

    /// The runs: claims, starts, attempts, ends and orphaning.
    pub fn runs(&self) -> Runs<'_> {
        Runs { inner: &self.inner }
    }

    /// Run history retention: what to prune and the pruning.
    pub fn history(&self) -> History<'_> {
        History { inner: &self.inner }
    }

    /// The outbox of results and rejections for the control backend.
    pub fn outbox(&self) -> Outbox<'_> {
        Outbox { inner: &self.inner }
    }

    /// The live feed of committed changes (`GET /v1/events`); other
    /// parts publish what is not a commit (orphan detections, backend
    /// contact) to it too.
    pub fn events(&self) -> &Arc<crate::events::Bus> {
        &self.inner.bus
    }

    /// Notifications: recorded events, their destinations and delivery.
    pub fn notices(&self) -> Notices<'_> {
        Notices { inner: &self.inner }
    }

    /// Incarnations of the service: start and stop, and among replicas the lease, the live set and change notifications.
    pub fn incarnations(&self) -> Incarnations<'_> {
        Incarnations { inner: &self.inner }
    }

    /// Applies pending migrations and returns (used by `cronguard migrate`).
    pub async fn migrate_only(options: &SqliteOptions) -> Result<(), StoreError> {
        if postgres::is_postgres(&options.url) {
            postgres::migrate_only(options).await
        } else {
            sqlite::migrate_only(options).await
        }
    }

    /// Whether other instances may share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Postgres(_))
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
