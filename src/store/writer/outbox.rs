//! The outbox: results for the control backend, written in the same
//! commit as the state they describe, so a crash can neither lose a result
//! nor send one for a state that was never committed.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use crate::run::RunId;
use crate::store::StoreError;
use crate::store::rows::{self, RUN_COLUMNS, ms};
use crate::sync::protocol::{Rejection, RunResult};

/// Queues the final state of run `id` (as now stored) for upload.
pub(super) fn record_run(c: &Connection, id: RunId, at: DateTime<Utc>) -> Result<(), StoreError> {
    let mut statement = c.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"))?;
    let mut found = statement.query(params![id.to_string()])?;
    let Some(row) = found.next()? else { return Ok(()) };
    let run = rows::run(row)?;
    let payload =
        serde_json::to_string(&RunResult::from_run(&run)).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    insert(c, "result", &id.to_string(), &payload, at)
}

/// Queues a rejected job spec for upload.
pub(super) fn record_rejection(c: &Connection, rejection: &Rejection) -> Result<(), StoreError> {
    let payload = serde_json::to_string(rejection).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    insert(c, "rejection", &rejection.job, &payload, rejection.rejected_at)
}

fn insert(c: &Connection, kind: &str, key: &str, payload: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
    c.prepare_cached("INSERT INTO outbox (kind, key, payload, created_at) VALUES (?, ?, ?, ?)")?
        .execute(params![kind, key, payload, ms(at)])?;
    Ok(())
}

/// Deletes acknowledged entries.
pub(super) fn delete(c: &Connection, seqs: &[i64]) -> Result<u64, StoreError> {
    let mut statement = c.prepare_cached("DELETE FROM outbox WHERE seq = ?")?;
    let mut deleted = 0;
    for seq in seqs {
        deleted += statement.execute(params![seq])? as u64;
    }
    Ok(deleted)
}

/// Drops the oldest entries beyond `limit`; how many were dropped.
pub(super) fn trim(c: &Connection, limit: u64) -> Result<u64, StoreError> {
    let dropped = c
        .prepare_cached(
            "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq DESC LIMIT -1 OFFSET ?)",
        )?
        .execute(params![i64::try_from(limit).unwrap_or(i64::MAX)])?;
    Ok(dropped as u64)
}
