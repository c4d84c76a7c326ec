//! Portable statements: the writes are written once, in SQL that SQLite
//! and PostgreSQL both accept, against the [`Tx`] trait.
//!
//! Rules for the SQL (checked by running every test on both backends):
//! placeholders are `$1`, `$2`, … numbered in order of first appearance
//! (SQLite treats `$N` as a named parameter whose index is its order of
//! appearance, PostgreSQL as position N); booleans are stored as integers
//! and compared with `= 1`; no `MAX(a, b)`/`GREATEST` (use `CASE`); `LIMIT`
//! always comes with `OFFSET`'s companion limit; aggregates that must be
//! integers use `COUNT`, not `SUM` (PostgreSQL sums bigints as numeric).

use super::StoreError;
use super::rows::Columns;

/// A statement parameter. NULLs carry their type: PostgreSQL rejects a
/// NULL of the wrong type for a column.
#[derive(Debug, Clone)]
pub enum Value {
    /// An integer (also booleans, instants in ms).
    Int(Option<i64>),
    /// A text.
    Text(Option<String>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(Some(v))
    }
}

impl From<Option<i64>> for Value {
    fn from(v: Option<i64>) -> Self {
        Self::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Self::Int(Some(i64::from(v)))
    }
}

impl From<Option<i32>> for Value {
    fn from(v: Option<i32>) -> Self {
        Self::Int(v.map(i64::from))
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(Some(i64::from(v)))
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(Some(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(Some(v.to_owned()))
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(Some(v.clone()))
    }
}

impl From<Option<String>> for Value {
    fn from(v: Option<String>) -> Self {
        Self::Text(v)
    }
}

impl From<Option<&str>> for Value {
    fn from(v: Option<&str>) -> Self {
        Self::Text(v.map(str::to_owned))
    }
}

/// Builds a `[Value; N]` from expressions convertible into [`Value`].
macro_rules! values {
    ($($v:expr),* $(,)?) => {
        [$($crate::store::sql::Value::from($v)),*]
    };
}
pub(crate) use values;

/// One open transaction on the write connection, whichever database.
pub trait Tx {
    /// Runs a statement; how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError>;

    /// Runs a query and hands each row to `each`.
    fn query(
        &mut self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(&dyn Columns) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;

    /// Stages `event` for the live feed: published after the transaction
    /// commits, dropped if it does not (the writer's batches only).
    fn stage(&mut self, event: crate::events::Event) {
        let _ = event;
    }
}

/// The first row of a query, decoded.
pub fn first<T>(
    tx: &mut dyn Tx,
    sql: &str,
    params: &[Value],
    decode: impl FnOnce(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut decode = Some(decode);
    let mut found = None;
    tx.query(sql, params, &mut |row| {
        if let Some(decode) = decode.take() {
            found = Some(decode(row)?);
        }
        Ok(())
    })?;
    Ok(found)
}

/// Every row of a query, decoded.
pub fn all<T>(
    tx: &mut dyn Tx,
    sql: &str,
    params: &[Value],
    mut decode: impl FnMut(&dyn Columns) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut found = Vec::new();
    tx.query(sql, params, &mut |row| {
        found.push(decode(row)?);
        Ok(())
    })?;
    Ok(found)
}

/// Runs `f` inside a savepoint: all of its writes or none.
pub fn savepoint<T>(
    tx: &mut dyn Tx,
    f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    tx.execute("SAVEPOINT op", &[])?;
    match f(tx) {
        Ok(v) => {
            tx.execute("RELEASE SAVEPOINT op", &[])?;
            Ok(v)
        }
        Err(e) => {
            tx.execute("ROLLBACK TO SAVEPOINT op", &[])?;
            tx.execute("RELEASE SAVEPOINT op", &[])?;
            Err(e)
        }
    }
}

// ---- SQLite (rusqlite) ----

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Self::Int(v) => v.to_sql(),
            Self::Text(v) => v.to_sql(),
        }
    }
}

impl Tx for rusqlite::Connection {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, StoreError> {
        let changed = self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(changed as u64)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[Value],
        each: &mut dyn FnMut(&dyn Columns) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut statement = self.prepare_cached(sql)?;
        let mut rows = statement.query(rusqlite::params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
        Ok(())
    }
}

/// Whether `e` is a violation of a UNIQUE constraint, on either database.
pub fn is_unique_violation(e: &StoreError) -> bool {
    match e {
        StoreError::Database(e) => match (e.sqlite(), e.sqlx()) {
            (Some(rusqlite::Error::SqliteFailure(f, _)), _) => {
                f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            }
            (_, Some(e)) => e
                .as_database_error()
                .is_some_and(sqlx::error::DatabaseError::is_unique_violation),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `e` is a violation of a foreign key, on either database.
pub fn is_foreign_key_violation(e: &StoreError) -> bool {
    match e {
        StoreError::Database(e) => match (e.sqlite(), e.sqlx()) {
            (Some(rusqlite::Error::SqliteFailure(f, _)), _) => {
                f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY
            }
            (_, Some(e)) => e
                .as_database_error()
                .is_some_and(sqlx::error::DatabaseError::is_foreign_key_violation),
            _ => false,
        },
        _ => false,
    }
}
