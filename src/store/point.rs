//! Point reads (one row by its key) on the caller's thread.
//!
//! sqlx runs every SQLite statement on a worker thread per connection and
//! hands the rows back over a channel: two thread wake-ups per query. For
//! `GET /v1/jobs/{id}` that hand-off was the largest cost of the request
//! (a third of the service's CPU in context switches under load, measured
//! with `perf`; see `docs/performance.md`). A lookup by primary key or
//! unique index on a local file takes microseconds — less than decoding
//! the request — so these reads run inline on the async task, on a small
//! pool of read-only rusqlite connections with cached statements. Anything
//! that may scan (lists, history, loads) stays on the sqlx pool.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::StoreError;

/// Connections kept for reuse; more may exist briefly under concurrency.
const KEEP: usize = 8;

/// A pool of read-only connections used for point reads.
pub struct PointReader {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl PointReader {
    pub fn new(path: PathBuf, busy_timeout: Duration) -> Self {
        Self {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }

    /// Runs `sql` with `key` and decodes the one row it finds, if any.
    pub fn one<T>(
        &self,
        sql: &str,
        key: &str,
        decode: impl FnOnce(&rusqlite::Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = (|| {
            let mut stmt = conn.prepare_cached(sql)?;
            // The closure's error type must be rusqlite's; a decode error is
            // carried out through the Ok side and unwrapped below.
            let found = stmt.query_row([key], |row| Ok(decode(row))).optional()?;
            found.transpose()
        })();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < KEEP {
            idle.push(conn);
        }
        result
    }
}
