//! Replica membership statements (PostgreSQL replicas, `docs/scaling.md`).
//!
//! A heartbeat is one autocommit statement on the read pool, not a write
//! through the group-commit writer: it must not wait behind a batch of
//! fires, and it must hold its row lock for one statement only, so replicas
//! never wait on each other's heartbeats.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::StoreError;
use super::reads::{Pool, Query};
use super::rows::{Columns, instant, ms};
use crate::run::Incarnation;

/// One live replica as recorded in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its incarnation.
    pub id: Incarnation,
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// It is shutting down: it fires nothing new.
    pub leaving: bool,
}

impl Pool {
    /// Renews `id`'s lease; `false` if the incarnation was declared stopped
    /// (its lease expired and another replica took its runs over).
    pub async fn heartbeat(&self, id: Incarnation, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut q = Query::new("UPDATE incarnations SET heartbeat_at = ");
        q.bind(ms(at))
            .push(" WHERE stopped_at IS NULL AND id = ")
            .bind(id.to_string())
            .push(" RETURNING id");
        Ok(self.first(q).await?.is_some())
    }

    /// Records that `id` began to leave: its jobs go to the others now.
    pub async fn leave(&self, id: Incarnation, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut q = Query::new("UPDATE incarnations SET leaving_at = ");
        q.bind(ms(at))
            .push(" WHERE id = ")
            .bind(id.to_string())
            .push(" RETURNING id");
        self.first(q).await?;
        Ok(())
    }

    /// Runs executing now, by incarnation.
    pub async fn running_by_incarnation(&self) -> Result<HashMap<Incarnation, u64>, StoreError> {
        let q = Query::new(
            "SELECT incarnation, COUNT(*) FROM runs WHERE status = 'running' GROUP BY incarnation",
        );
        let mut out = HashMap::new();
        for row in self.all(q).await? {
            if let Ok(id) = row.text(0)?.parse() {
                out.insert(Incarnation(id), row.int(1)?.max(0) as u64);
            }
        }
        Ok(out)
    }

    /// Incarnations not stopped whose heartbeat is later than `cutoff`.
    pub async fn replicas(&self, cutoff: DateTime<Utc>) -> Result<Vec<Replica>, StoreError> {
        let mut q = Query::new(
            "SELECT id, host, pid, started_at, heartbeat_at, leaving_at FROM incarnations \
             WHERE stopped_at IS NULL AND heartbeat_at > ",
        );
        q.bind(ms(cutoff)).push(" ORDER BY id");
        let rows = self.all(q).await?;
        rows.iter()
            .map(|row| {
                let id = row.text(0)?;
                Ok(Replica {
                    id: Incarnation(id.parse().map_err(|_| {
                        StoreError::corrupt("incarnation id", format!("`{id}` does not parse"))
                    })?),
                    host: row.text(1)?,
                    pid: row.int(2)?,
                    started_at: instant(row.int(3)?)?,
                    heartbeat_at: instant(row.int(4)?)?,
                    leaving: row.opt_int(5)?.is_some(),
                })
            })
            .collect()
    }
}
