//! Why the database cannot be written, named by cause, and whether it can
//! be written now.
//!
//! A full disk once showed as "stored data is invalid" on every fire while
//! readiness stayed green: the cause must be named (an operator frees disk
//! space, fixes permissions or stops another process; none of those is
//! "corruption") and the state must be visible at once.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::StoreError;

/// A failure of the database itself (not of the data or the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageFault {
    /// No space left on the device (or the database hit its size limit).
    DiskFull,
    /// The operating system failed a read, write or sync.
    Io,
    /// Another process holds a lock the writer needs.
    Locked,
    /// The database or its directory is read-only.
    ReadOnly,
    /// The database file cannot be opened.
    CannotOpen,
    /// The database server cannot be reached (PostgreSQL).
    Unreachable,
    /// Any other failure of the database.
    Other,
}

impl StorageFault {
    /// Every fault (the metric's label set).
    pub const ALL: [Self; 7] = [
        Self::DiskFull,
        Self::Io,
        Self::Locked,
        Self::ReadOnly,
        Self::CannotOpen,
        Self::Unreachable,
        Self::Other,
    ];

    /// Stable text (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DiskFull => "disk_full",
            Self::Io => "io",
            Self::Locked => "locked",
            Self::ReadOnly => "read_only",
            Self::CannotOpen => "cannot_open",
            Self::Unreachable => "unreachable",
            Self::Other => "other",
        }
    }

    /// In words, for errors and readiness.
    pub fn describe(self) -> &'static str {
        match self {
            Self::DiskFull => "the disk is full",
            Self::Io => "an I/O error",
            Self::Locked => "the database is locked by another process",
            Self::ReadOnly => "the database is read-only",
            Self::CannotOpen => "the database file cannot be opened",
            Self::Unreachable => "the database server cannot be reached",
            Self::Other => "the database failed",
        }
    }

    /// The fault behind `e`, if it is a failure of the database itself.
    pub fn of(e: &StoreError) -> Option<Self> {
        match e {
            StoreError::Unavailable { fault, .. } => Some(*fault),
            StoreError::Database(e) => match (e.sqlite(), e.sqlx()) {
                (Some(rusqlite::Error::SqliteFailure(f, _)), _) => Some(Self::of_sqlite(f.code)),
                (_, Some(e)) => Some(Self::of_sqlx(e)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The fault if `e` means the database is out of service (a refused
    /// commit, or a statement it refused for a fault of its own — not a
    /// constraint of the data).
    pub fn outage(e: &StoreError) -> Option<Self> {
        match e {
            StoreError::Unavailable { fault, .. } => Some(*fault),
            _ => Self::of(e).filter(|f| *f != Self::Other),
        }
    }

    fn of_sqlite(code: rusqlite::ErrorCode) -> Self {
        use rusqlite::ErrorCode as C;
        match code {
            C::DiskFull => Self::DiskFull,
            C::SystemIoFailure => Self::Io,
            C::DatabaseBusy | C::DatabaseLocked => Self::Locked,
            C::ReadOnly => Self::ReadOnly,
            C::CannotOpen | C::PermissionDenied => Self::CannotOpen,
            _ => Self::Other,
        }
    }

    fn of_sqlx(e: &sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => Self::Unreachable,
            sqlx::Error::Database(d) => match d.code().as_deref() {
                // PostgreSQL's SQLSTATE classes: 53100 disk_full, 58030
                // io_error, 25006 read_only_sql_transaction, 55P03
                // lock_not_available.
                Some("53100") => Self::DiskFull,
                Some("58030") => Self::Io,
                Some("25006") => Self::ReadOnly,
                Some("55P03") => Self::Locked,
                _ => Self::Other,
            },
            _ => Self::Other,
        }
    }
}

impl std::fmt::Display for StorageFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Whether the writer's last commit went through; the writer sets it, the
/// readiness probe reads it.
#[derive(Debug, Default)]
pub struct Writability {
    failing: Mutex<Option<Failing>>,
}

/// Since when and why writes fail.
#[derive(Debug, Clone, Serialize)]
pub struct Failing {
    /// The cause.
    pub fault: StorageFault,
    /// The database's own message.
    pub detail: String,
    /// The first failure of this stretch.
    pub since: DateTime<Utc>,
}

impl Writability {
    /// A write failed; returns whether writes were fine until now.
    pub fn failed(&self, fault: StorageFault, detail: &str) -> bool {
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = failing.is_none();
        let since = failing.as_ref().map_or_else(Utc::now, |f| f.since);
        *failing = Some(Failing {
            fault,
            detail: detail.to_owned(),
            since,
        });
        first
    }

    /// A commit went through; returns the failure it ends, if any.
    pub fn succeeded(&self) -> Option<Failing> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// `None` while writes go through.
    pub fn failing(&self) -> Option<Failing> {
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
