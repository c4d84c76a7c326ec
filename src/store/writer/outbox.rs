//! The outbox: results for the control backend, written in the same
//! commit as the state they describe, so a crash can neither lose a result
//! nor send one for a state that was never committed.

use chrono::{DateTime, Utc};
use sqlx::{Sqlite, Transaction};

use crate::run::RunId;
use crate::store::StoreError;
use crate::store::rows::{self, RUN_COLUMNS, ms};
use crate::sync::protocol::{Rejection, RunResult};

/// Queues the final state of run `id` (as now stored) for upload.
pub(super) async fn record_run(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = ?"
    )))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let run = rows::run(&row)?;
    let payload =
        serde_json::to_string(&RunResult::from_run(&run)).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    insert(tx, "result", &id.to_string(), &payload, at).await
}

/// Queues a rejected job spec for upload.
pub(super) async fn record_rejection(
    tx: &mut Transaction<'_, Sqlite>,
    rejection: &Rejection,
) -> Result<(), StoreError> {
    let payload = serde_json::to_string(rejection).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    insert(tx, "rejection", &rejection.job, &payload, rejection.rejected_at).await
}

async fn insert(
    tx: &mut Transaction<'_, Sqlite>,
    kind: &str,
    key: &str,
    payload: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO outbox (kind, key, payload, created_at) VALUES (?, ?, ?, ?)")
        .bind(kind)
        .bind(key)
        .bind(payload)
        .bind(ms(at))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Deletes acknowledged entries (every `seq` up to and including `upto`
/// among `seqs`).
pub(super) async fn delete(tx: &mut Transaction<'_, Sqlite>, seqs: &[i64]) -> Result<u64, StoreError> {
    let mut deleted = 0;
    for chunk in seqs.chunks(500) {
        let mut q = sqlx::QueryBuilder::<Sqlite>::new("DELETE FROM outbox WHERE seq IN (");
        let mut list = q.separated(", ");
        for seq in chunk {
            list.push_bind(*seq);
        }
        q.push(")");
        deleted += q.build().execute(&mut **tx).await?.rows_affected();
    }
    Ok(deleted)
}

/// Drops the oldest entries beyond `limit`; how many were dropped.
pub(super) async fn trim(tx: &mut Transaction<'_, Sqlite>, limit: u64) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq DESC LIMIT -1 OFFSET ?)",
    )
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}
