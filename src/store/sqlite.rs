//! The SQLite implementation: connection setup, migrations and reads.
//!
//! Pitfalls handled here (see `../shared/STACK.md`): sqlx leaves SQLite in
//! rollback-journal mode with full sync unless told otherwise, so WAL and
//! the synchronous level are set explicitly; all writes go through one
//! connection owned by the writer task, so `SQLITE_BUSY` cannot arise
//! between our own writers.

use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Sqlite};
use tokio::sync::{mpsc, oneshot};

use super::point::PointReader;
use super::rows::{self, JOB_COLUMNS, RUN_COLUMNS};
use super::writer::{Op, Queue, Writer, WriterTask};
use super::{Ack, JobChange, JobFilter, JobKey, LastOutcomes, OutboxEntry, Page, RunFilter, StoreError};
use std::collections::HashMap;

use crate::job::{Job, JobId, Timing};
use crate::run::{Incarnation, Run, RunId, RunStatus};

/// Migrations for the SQLite backend, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How durable a commit is (SQLite `PRAGMA synchronous` in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Survives a crash or `kill -9` of the service; the last commits can
    /// be lost on power failure or a kernel crash.
    #[default]
    Normal,
    /// Also survives power failure, at one fsync per group commit.
    Full,
}

/// Where the database is and how to open it.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `sqlite://path`, `sqlite:path` or a plain file path.
    pub url: String,
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// How long a statement waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// Size of the read-only connection pool.
    pub read_connections: u32,
    /// Queue final run states for the control backend (outbox).
    pub outbox: bool,
}

impl SqliteOptions {
    /// Options for the file at `url` with defaults for the rest.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            outbox: false,
        }
    }

    /// The writer's connection (rusqlite), with the same settings as
    /// [`Self::connect_options`] gives the read pool.
    fn open_writer(&self, path: &std::path::Path) -> Result<rusqlite::Connection, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        let sync = match self.synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.busy_timeout(self.busy_timeout)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", sync)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn connect_options(&self) -> Result<SqliteConnectOptions, StoreError> {
        let url = if self.url.starts_with("sqlite:") {
            self.url.clone()
        } else {
            format!("sqlite://{}", self.url)
        };
        let sync = match self.synchronous {
            Synchronous::Normal => SqliteSynchronous::Normal,
            Synchronous::Full => SqliteSynchronous::Full,
        };
        Ok(SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(self.busy_timeout)
            .foreign_keys(true)
            .pragma("temp_store", "memory"))
    }
}

/// The SQLite store: a read pool and the writer's queue.
///
/// The queue is unbounded so that a write is enqueued synchronously when it
/// is submitted, which is what makes the commit order equal the submission
/// order (see [`super::Ack`]). Its producers are bounded upstream: fires by
/// the schedule, API writes by the HTTP concurrency limit.
pub struct SqliteStore {
    read: SqlitePool,
    point: PointReader,
    writer: Queue,
    path: std::path::PathBuf,
    pub(super) outbox_signal: std::sync::Arc<tokio::sync::Notify>,
}

impl SqliteStore {
    pub(super) async fn open(
        options: &SqliteOptions,
        changes: mpsc::UnboundedSender<JobChange>,
    ) -> Result<(Self, WriterTask), StoreError> {
        let connect = options.connect_options()?;
        let path = connect.get_filename().to_path_buf();
        let mut conn = SqliteConnection::connect_with(&connect).await?;
        MIGRATOR.run(&mut conn).await?;
        conn.close().await?;
        let write = options.open_writer(&path)?;
        let checkpointer = options.open_writer(&path)?;
        let read = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .min_connections(1)
            // A local file does not go stale like a network connection;
            // sqlx's default ping before every acquire costs a round trip
            // to the connection's thread per read.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(connect.read_only(true))
            .await?;
        let outbox_signal = std::sync::Arc::new(tokio::sync::Notify::new());
        let (writer, queue) = Writer::new(
            write,
            checkpointer,
            changes,
            options.outbox.then(|| outbox_signal.clone()),
        );
        Ok((
            Self {
                read,
                point: PointReader::new(path.clone(), options.busy_timeout),
                writer: queue,
                path,
                outbox_signal,
            },
            writer.into_task(),
        ))
    }

    pub(super) async fn migrate_only(options: &SqliteOptions) -> Result<(), StoreError> {
        let mut conn = SqliteConnection::connect_with(&options.connect_options()?).await?;
        MIGRATOR.run(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    /// Enqueues a write now; the returned [`Ack`] resolves after its commit.
    pub(super) fn write<T>(&self, op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Ack<T> {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(op(tx)) {
            Ack::waiting(rx)
        } else {
            Ack::failed(StoreError::Closed)
        }
    }

    pub(super) async fn get_job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        static BY_ID: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"));
        static BY_NAME: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE name = ?1"));
        match key {
            JobKey::Id(id) => self.point.one(&BY_ID, &id.to_string(), |row| rows::job(row)),
            JobKey::Name(name) => self.point.one(&BY_NAME, name, |row| rows::job(row)),
        }
    }

    pub(super) async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<JobId>,
        limit: u32,
    ) -> Result<Page<Job>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE 1=1"));
        if let Some(paused) = filter.paused {
            q.push(" AND j.paused = ").push_bind(paused);
        }
        if let Some(source) = filter.source {
            q.push(" AND j.source = ").push_bind(source.as_str());
        }
        if let Some(cursor) = cursor {
            q.push(" AND j.id > ").push_bind(cursor.to_string());
        }
        for (key, value) in &filter.labels {
            q.push(" AND EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = j.id AND l.key = ")
                .push_bind(key.clone())
                .push(" AND l.value = ")
                .push_bind(value.clone())
                .push(")");
        }
        q.push(" ORDER BY j.id LIMIT ").push_bind(i64::from(limit) + 1);
        let found = q.build().fetch_all(&self.read).await?;
        let mut items = found.iter().map(rows::job).collect::<Result<Vec<_>, _>>()?;
        let next = page_cursor(&mut items, limit, |j| j.id.to_string());
        Ok(Page { items, next })
    }

    pub(super) async fn load_jobs(&self) -> Result<Vec<Arc<Job>>, StoreError> {
        let found = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY id"
        )))
        .fetch_all(&self.read)
        .await?;
        let mut jobs = Vec::with_capacity(found.len());
        for row in &found {
            match rows::shared_job(row) {
                Ok(job) => jobs.push(job),
                // One undecodable row must not keep every other job from
                // firing; it is reported loudly instead.
                Err(e) => tracing::error!(error = %e, "skipping a stored job that does not decode"),
            }
        }
        Ok(jobs)
    }

    pub(super) async fn load_timings(&self) -> Result<Vec<Timing>, StoreError> {
        use futures_util::TryStreamExt;
        type Row = (String, String, bool, i64, i64, Option<i64>);
        // Streamed: a million rows never sit in memory at once.
        let mut rows = sqlx::query_as::<_, Row>(
            "SELECT id, spec, paused, cursor_at, runs_started, max_runs FROM jobs ORDER BY id",
        )
        .fetch(&self.read);
        let mut timings = Vec::new();
        while let Some((id, spec, paused, cursor_at, started, max_runs)) = rows.try_next().await? {
            let decoded = id
                .parse::<JobId>()
                .map_err(|_| format!("job id {id}"))
                .and_then(|job| {
                    let exhausted = max_runs.is_some_and(|max| started >= max);
                    let cursor = rows::instant(cursor_at).map_err(|e| e.to_string())?;
                    Timing::from_stored(job, &spec, paused, cursor, exhausted)
                });
            match decoded {
                Ok(timing) => timings.push(timing),
                // One undecodable row must not keep every other job from
                // firing; it is reported loudly instead.
                Err(e) => {
                    tracing::error!(job = %id, error = %e, "skipping a stored job that does not decode")
                }
            }
        }
        Ok(timings)
    }

    pub(super) async fn get_jobs(&self, ids: &[JobId]) -> Result<Vec<Arc<Job>>, StoreError> {
        let mut jobs = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ("));
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            q.push(")");
            for row in q.build().fetch_all(&self.read).await? {
                match rows::shared_job(&row) {
                    Ok(job) => jobs.push(job),
                    Err(e) => tracing::error!(error = %e, "skipping a stored job that does not decode"),
                }
            }
        }
        Ok(jobs)
    }

    pub(super) async fn count_jobs(&self) -> Result<(u64, u64), StoreError> {
        let (active, paused): (i64, i64) =
            sqlx::query_as("SELECT COALESCE(SUM(paused = 0), 0), COALESCE(SUM(paused = 1), 0) FROM jobs")
                .fetch_one(&self.read)
                .await?;
        Ok((active.max(0) as u64, paused.max(0) as u64))
    }

    pub(super) async fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        static BY_ID: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"));
        self.point.one(&BY_ID, &id.to_string(), |row| rows::run(row))
    }

    pub(super) async fn list_runs(
        &self,
        filter: &RunFilter,
        cursor: Option<RunId>,
        limit: u32,
    ) -> Result<Page<Run>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1=1"));
        if let Some(job) = filter.job {
            q.push(" AND job_id = ").push_bind(job.to_string());
        }
        if !filter.statuses.is_empty() {
            q.push(" AND status IN (");
            let mut list = q.separated(", ");
            for status in &filter.statuses {
                list.push_bind(status.as_str());
            }
            q.push(")");
        }
        if let Some(cursor) = cursor {
            q.push(" AND id < ").push_bind(cursor.to_string());
        }
        q.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(limit) + 1);
        let found = q.build().fetch_all(&self.read).await?;
        let mut items = found.iter().map(rows::run).collect::<Result<Vec<_>, _>>()?;
        let next = page_cursor(&mut items, limit, |r| r.id.to_string());
        Ok(Page { items, next })
    }

    pub(super) async fn live_runs(
        &self,
        incarnation: Incarnation,
    ) -> Result<Vec<(RunId, JobId)>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, job_id FROM runs WHERE status IN ('queued', 'running') AND incarnation = ?",
        )
        .bind(incarnation.to_string())
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(id, job)| {
                Ok((
                    id.parse()
                        .map_err(|_| StoreError::Corrupt(format!("run id {id}")))?,
                    job.parse()
                        .map_err(|_| StoreError::Corrupt(format!("job id {job}")))?,
                ))
            })
            .collect()
    }

    pub(super) async fn run_statuses(&self, ids: &[RunId]) -> Result<HashMap<RunId, RunStatus>, StoreError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let mut q = QueryBuilder::<Sqlite>::new("SELECT id, status FROM runs WHERE id IN (");
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            q.push(")");
            let rows: Vec<(String, String)> = q.build_query_as().fetch_all(&self.read).await?;
            for (id, status) in rows {
                let id = id
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("run id {id}")))?;
                let status = status.parse().map_err(StoreError::Corrupt)?;
                out.insert(id, status);
            }
        }
        Ok(out)
    }

    pub(super) async fn last_outcomes(
        &self,
        jobs: &[JobId],
    ) -> Result<HashMap<JobId, LastOutcomes>, StoreError> {
        let mut out = HashMap::with_capacity(jobs.len());
        for chunk in jobs.chunks(500) {
            let mut q = QueryBuilder::<Sqlite>::new(
                "SELECT job_id, MAX(CASE WHEN status = 'succeeded' THEN ended_at END), \
                 MAX(CASE WHEN status IN ('failed', 'timed_out') THEN ended_at END) \
                 FROM runs WHERE job_id IN (",
            );
            let mut list = q.separated(", ");
            for id in chunk {
                list.push_bind(id.to_string());
            }
            q.push(") GROUP BY job_id");
            let rows: Vec<(String, Option<i64>, Option<i64>)> =
                q.build_query_as().fetch_all(&self.read).await?;
            for (id, success, failure) in rows {
                let id = id
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("job id {id}")))?;
                let success = success.map(rows::instant).transpose()?;
                let failure = failure.map(rows::instant).transpose()?;
                out.insert(id, (success, failure));
            }
        }
        Ok(out)
    }

    pub(super) async fn jobs_with_runs_since(
        &self,
        after: Option<RunId>,
    ) -> Result<(Vec<JobId>, Option<RunId>), StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT job_id, MAX(id) FROM runs WHERE id > ? GROUP BY job_id")
                .bind(after.map(|a| a.to_string()).unwrap_or_default())
                .fetch_all(&self.read)
                .await?;
        let mut newest: Option<RunId> = None;
        let mut jobs = Vec::with_capacity(rows.len());
        for (job, max) in rows {
            jobs.push(
                job.parse()
                    .map_err(|_| StoreError::Corrupt(format!("job id {job}")))?,
            );
            let max: RunId = max
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("run id {max}")))?;
            newest = newest.max(Some(max));
        }
        Ok((jobs, newest))
    }

    pub(super) async fn history_overrides(
        &self,
    ) -> Result<HashMap<JobId, (Option<u32>, Option<i64>)>, StoreError> {
        let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT id, history_keep_last, history_max_age_ms FROM jobs \
             WHERE history_keep_last IS NOT NULL OR history_max_age_ms IS NOT NULL",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(id, keep, age)| {
                let id = id
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("job id {id}")))?;
                Ok((id, (keep.and_then(|k| u32::try_from(k).ok()), age)))
            })
            .collect()
    }

    pub(super) async fn outbox_peek(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows: Vec<(i64, String, String)> =
            sqlx::query_as("SELECT seq, kind, payload FROM outbox ORDER BY seq LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.read)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(seq, kind, payload)| OutboxEntry { seq, kind, payload })
            .collect())
    }

    pub(super) async fn outbox_stats(
        &self,
    ) -> Result<(u64, Option<chrono::DateTime<chrono::Utc>>), StoreError> {
        let (count, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), (SELECT created_at FROM outbox ORDER BY seq LIMIT 1) FROM outbox",
        )
        .fetch_one(&self.read)
        .await?;
        Ok((count.max(0) as u64, oldest.map(rows::instant).transpose()?))
    }

    /// Bytes on disk: the database file and its write-ahead log.
    pub(super) fn size_bytes(&self) -> u64 {
        let wal = {
            let mut p = self.path.clone().into_os_string();
            p.push("-wal");
            std::path::PathBuf::from(p)
        };
        [&self.path, &wal]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Readiness: a *fresh* read-only connection (so a database file that
    /// became unreadable or vanished is noticed even though the pool's
    /// connections still hold it open) that finds the schema migrated to
    /// the version this binary embeds.
    pub(super) async fn check_ready(&self) -> Result<(), StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(&self.path)
            .read_only(true)
            .create_if_missing(false);
        let mut conn = SqliteConnection::connect_with(&options).await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = 1")
                .fetch_one(&mut conn)
                .await?;
        conn.close().await?;
        let expected = MIGRATOR.iter().map(|m| m.version).max();
        if applied != expected {
            return Err(StoreError::Corrupt(format!(
                "schema version {applied:?}, this binary needs {expected:?}"
            )));
        }
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM _sqlx_migrations LIMIT 1")
            .fetch_optional(&self.read)
            .await?;
        Ok(())
    }
}

/// Trims the look-ahead row and returns the cursor for the next page.
fn page_cursor<T>(items: &mut Vec<T>, limit: u32, key: impl Fn(&T) -> String) -> Option<String> {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(key)
    } else {
        None
    }
}
