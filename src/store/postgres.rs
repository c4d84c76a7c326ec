//! The PostgreSQL backend (`postgres://…` database URLs).
//!
//! The same statements as SQLite (see [`super::sql`]) on the same schema
//! (`migrations/postgres`). Reads go through an async sqlx pool. Writes go
//! through the same single-writer group commit as SQLite: the writer
//! thread owns one connection and a current-thread runtime that drives it,
//! so the operations stay synchronous code shared by both databases.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use tokio::sync::mpsc;

use super::reads::{self, Row, bound};
use super::rows::Columns;
use super::sql::{Tx, Value};
use super::writer::{WriteConn, Writer, WriterTask};
use super::{Backend, Inner, JobChange, SqliteOptions, StoreError};

/// Migrations for the PostgreSQL backend, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// What only the PostgreSQL backend has.
pub struct Remote {
    pool: sqlx::PgPool,
}

fn connect_options(options: &SqliteOptions) -> Result<PgConnectOptions, StoreError> {
    Ok(options
        .url
        .parse::<PgConnectOptions>()?
        .application_name("cronguard"))
}

/// Connects, migrates (sqlx holds an advisory lock while migrating, so
/// replicas starting together apply each migration once) and builds the
/// writer.
pub(super) async fn open(
    options: &SqliteOptions,
    changes: mpsc::UnboundedSender<JobChange>,
    bus: std::sync::Arc<crate::events::Bus>,
) -> Result<(Inner, WriterTask), StoreError> {
    let connect = connect_options(options)?;
    // One plain connection first: a pool retries a refused connection
    // until its acquire timeout and then reports only "pool timed out",
    // while the operator needs the cause (refused, unknown database,
    // authentication) at once.
    let mut first = PgConnection::connect_with(&connect).await?;
    MIGRATOR.run(&mut first).await?;
    first.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(options.read_connections.max(2))
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(connect.clone())
        .await?;
    let write = PgWrite::connect(connect).await?;
    let outbox_signal = std::sync::Arc::new(tokio::sync::Notify::new());
    let (writer, queue) = Writer::new(
        Box::new(write),
        None,
        changes,
        options.outbox.then(|| outbox_signal.clone()),
        bus.clone(),
    );
    Ok((
        Inner {
            reads: reads::Pool::Postgres(pool.clone()),
            writer: queue,
            outbox_signal,
            bus,
            backend: Backend::Postgres(Remote { pool }),
        },
        writer.into_task(),
    ))
}

pub(super) async fn migrate_only(options: &SqliteOptions) -> Result<(), StoreError> {
    let mut conn = PgConnection::connect_with(&connect_options(options)?).await?;
    MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    Ok(())
}

impl Remote {
    /// Readiness: a fresh connection (not a pooled one that may hide a
    /// server that stopped accepting) finds the schema at this binary's
    /// version.
    pub(super) async fn check_ready(&self) -> Result<(), StoreError> {
        let mut conn = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = true")
                .fetch_one(&mut conn)
                .await?;
        conn.close().await?;
        super::expect_schema(applied, &MIGRATOR)
    }

    /// A listener on the channel where replicas announce job changes.
    pub(super) async fn listen(&self) -> Result<Notifications, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(super::JOB_CHANNEL).await?;
        Ok(Notifications(listener))
    }

    /// The database's size on disk.
    pub(super) async fn size_bytes(&self) -> Result<u64, StoreError> {
        let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&self.pool)
            .await?;
        Ok(size.max(0) as u64)
    }
}

/// The writer's connection with the runtime that drives it on the writer
/// thread.
struct PgWrite {
    runtime: tokio::runtime::Runtime,
    conn: PgConnection,
}

impl PgWrite {
    /// Builds the runtime and connects on a helper thread: a runtime can
    /// neither be entered from, nor be dropped in, an async context.
    async fn connect(options: PgConnectOptions) -> Result<Self, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("cronguard-pg-connect".into())
            .spawn(move || {
                let made = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| StoreError::Start {
                        what: "writer runtime",
                        source,
                    })
                    .and_then(|runtime| {
                        let conn = runtime.block_on(PgConnection::connect_with(&options))?;
                        Ok(Self { runtime, conn })
                    });
                let _ = tx.send(made);
            })
            .map_err(|source| StoreError::Start {
                what: "writer thread",
                source,
            })?;
        rx.await.unwrap_or(Err(StoreError::Closed))
    }
}

impl Tx for PgWrite {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let q = bound!(sql.to_owned(), params.iter().cloned());
        Ok(self.runtime.block_on(q.execute(&mut self.conn))?.rows_affected())
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(&dyn Columns) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let q = bound!(sql.to_owned(), params.iter().cloned());
        let rows = self.runtime.block_on(q.fetch_all(&mut self.conn))?;
        for row in rows {
            each(&Row::Postgres(row))?;
        }
        Ok(())
    }
}

impl WriteConn for PgWrite {
    fn begin(&mut self) -> Result<(), StoreError> {
        self.execute("BEGIN", &[]).map(|_| ())
    }

    fn shared(&self) -> bool {
        true
    }

    fn close(self: Box<Self>) {
        let Self { runtime, conn } = *self;
        if let Err(e) = runtime.block_on(conn.close()) {
            tracing::warn!(error = %e, "closing the database connection failed");
        }
    }
}

/// Job changes announced by other replicas, as they arrive.
pub struct Notifications(sqlx::postgres::PgListener);

impl Notifications {
    /// The next announcement's payload; `None` when the connection was lost
    /// and made again (announcements in between were missed).
    pub async fn next(&mut self) -> Result<Option<String>, StoreError> {
        Ok(self.0.try_recv().await?.map(|n| n.payload().to_owned()))
    }
}
