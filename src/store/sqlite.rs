//! The SQLite backend: connection setup, migrations, point reads and the
//! checks that depend on the file.
//!
//! Pitfalls handled here (see `../shared/STACK.md`): sqlx leaves SQLite in
//! rollback-journal mode with full sync unless told otherwise, so WAL and
//! the synchronous level are set explicitly; all writes go through one
//! connection owned by the writer task, so `SQLITE_BUSY` cannot arise
//! between our own writers.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::mpsc;

use super::point::PointReader;
use super::reads;
use super::rows::{self, JOB_COLUMNS, RUN_COLUMNS};
use super::writer::{Writer, WriterTask};
use super::{Backend, Inner, JobChange, JobKey, StoreError};
use crate::job::Job;
use crate::run::{Run, RunId};

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
        // 64 MiB of page cache (SQLite's default is 2 MiB): the writer
        // touches the job rows and the newest run pages of every firing
        // job, and a miss is a read() of the page from the OS.
        conn.pragma_update(None, "cache_size", -65536)?;
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

/// What only the SQLite backend has: the file and the point readers.
pub struct Local {
    point: PointReader,
    path: std::path::PathBuf,
}

/// Opens (creating if missing) and migrates the database, and builds the
/// writer; job changes are published to `changes` after each commit.
pub(super) async fn open(
    options: &SqliteOptions,
    changes: mpsc::UnboundedSender<JobChange>,
    bus: std::sync::Arc<crate::events::Bus>,
) -> Result<(Inner, WriterTask), StoreError> {
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
        Box::new(write),
        Some(checkpointer),
        changes,
        options.outbox.then(|| outbox_signal.clone()),
        bus.clone(),
    );
    let local = Local {
        point: PointReader::new(path.clone(), options.busy_timeout),
        path,
    };
    Ok((
        Inner {
            reads: reads::Pool::Sqlite(read),
            writer: queue,
            outbox_signal,
            bus,
            backend: Backend::Sqlite(local),
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

impl Local {
    pub(super) fn get_job(&self, key: &JobKey) -> Result<Option<Job>, StoreError> {
        static BY_ID: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"));
        static BY_NAME: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {JOB_COLUMNS} FROM jobs WHERE name = ?1"));
        match key {
            JobKey::Id(id) => self.point.one(&BY_ID, &id.to_string(), |row| rows::job(row)),
            JobKey::Name(name) => self.point.one(&BY_NAME, name, |row| rows::job(row)),
        }
    }

    pub(super) fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        static BY_ID: LazyLock<String> =
            LazyLock::new(|| format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"));
        self.point.one(&BY_ID, &id.to_string(), |row| rows::run(row))
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
        super::expect_schema(applied, &MIGRATOR)
    }
}
