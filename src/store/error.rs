//! What the store answers when it cannot do what was asked, split by what
//! the caller does about it.
//!
//! A [`Conflict`] is an outcome: the request conflicts with what is stored
//! (a taken name, a stale version, a fire already claimed), and the caller
//! decides (answer 409, skip the fire, stop claiming). Everything else is a
//! failure of the store: shut down, data that does not decode (with what it
//! was, as data), a schema this binary does not know, the database itself
//! (classified by [`StorageFault`](super::StorageFault)), or a thread that
//! could not start. No driver type appears in it: [`DatabaseError`] keeps
//! the driver's error private to the store.

/// An outcome the caller handles: the request conflicts with what is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// No such job or run.
    #[error("not found")]
    NotFound,
    /// Another job already has this name.
    #[error("a job named `{0}` already exists")]
    NameTaken(String),
    /// Optimistic concurrency: the job changed since the caller read it.
    #[error("job version is {current}, not the expected {expected}")]
    VersionMismatch {
        /// What the caller expected.
        expected: i64,
        /// What is stored.
        current: i64,
    },
    /// A run for this job and scheduled instant already exists.
    #[error("a run for this fire already exists")]
    DuplicateFire,
    /// The job reached its `max_runs`: the run was recorded as skipped.
    #[error("the job reached its max_runs")]
    LimitReached,
    /// The run is already in a final state.
    #[error("the run already ended")]
    AlreadyFinal,
    /// Replicas: this incarnation's lease expired and another replica took
    /// its runs over; it may claim nothing more.
    #[error("this replica's lease expired: it was declared stopped by another replica")]
    Fenced,
    /// Replicas: another replica runs the job, and its overlap policy
    /// refused this fire (recorded as `skipped`).
    #[error("a run of this job is live on another replica")]
    Overlap,
}

/// Stored data that does not decode: what it was, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct Corruption {
    /// The value, named as an operator would look for it (`job 42 spec`,
    /// `runs.status`).
    pub what: String,
    /// What is wrong with it.
    pub detail: String,
}

impl Corruption {
    /// `what` could not be decoded because of `detail`.
    pub fn new(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

/// The database failed; the driver's error stays inside the store.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DatabaseError(Driver);

#[derive(Debug, thiserror::Error)]
enum Driver {
    #[error(transparent)]
    Sqlx(sqlx::Error),
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
}

impl DatabaseError {
    /// The SQLite error behind it, when the writer's connection failed.
    pub(super) fn sqlite(&self) -> Option<&rusqlite::Error> {
        match &self.0 {
            Driver::Sqlite(e) => Some(e),
            _ => None,
        }
    }

    /// The sqlx error behind it (reads, PostgreSQL).
    pub(super) fn sqlx(&self) -> Option<&sqlx::Error> {
        match &self.0 {
            Driver::Sqlx(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything that can go wrong in the store, by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An outcome the caller handles.
    #[error(transparent)]
    Conflict(#[from] Conflict),
    /// The writer task is gone (shutting down).
    #[error("the store is shut down")]
    Closed,
    /// Stored data that does not decode (corruption or a downgrade).
    #[error("stored data is invalid: {0}")]
    Corrupt(Corruption),
    /// A value of this binary could not be encoded for storage.
    #[error("cannot encode the {what}: {detail}")]
    Encode {
        /// The value.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The database's schema is not the one this binary needs (a newer
    /// binary migrated it).
    #[error("the database schema is version {applied:?}; this binary needs {expected:?}")]
    Schema {
        /// The newest migration applied.
        applied: Option<i64>,
        /// The newest migration this binary has.
        expected: Option<i64>,
    },
    /// The database could not be written: the disk is full, an I/O error,
    /// a lock held elsewhere (the write did not happen).
    #[error("the database cannot be written ({fault}): {detail}")]
    Unavailable {
        /// The cause.
        fault: super::StorageFault,
        /// The database's own message.
        detail: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Database(DatabaseError),
    /// A thread or runtime of the store could not be started.
    #[error("cannot start the store's {what}: {source}")]
    Start {
        /// Which.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether this is a failure of the store rather than an outcome.
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Conflict(_))
    }

    /// Stored data `what` does not decode because of `detail`.
    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::Corrupt(Corruption::new(what, detail))
    }

    /// A value could not be encoded.
    pub fn encode(what: &'static str, e: serde_json::Error) -> Self {
        Self::Encode {
            what,
            detail: e.to_string(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(DatabaseError(Driver::Sqlx(e)))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Database(DatabaseError(Driver::Sqlite(e)))
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Database(DatabaseError(Driver::Migrate(e)))
    }
}
