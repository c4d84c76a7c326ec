//! Orphaned work: runs whose owner vanished.
//!
//! At startup every run still recorded as `queued` or `running` by an
//! earlier incarnation is marked `orphaned` before anything fires, so a
//! crash never leaves a run that nobody accounts for, and a stale
//! "running" row can never block its job.

use chrono::{DateTime, Utc};

use crate::run::{Incarnation, Run};
use crate::store::{Store, StoreError};

/// Marks the previous incarnations' live runs as orphaned; returns them.
pub async fn reconcile_previous_incarnations(
    store: &Store,
    current: Incarnation,
    now: DateTime<Utc>,
) -> Result<Vec<Run>, StoreError> {
    let orphans = store.orphan_foreign_runs(current, now).await?;
    for run in &orphans {
        tracing::warn!(
            run = %run.id,
            job = %run.job_id,
            incarnation = %run.incarnation,
            status = %run.status,
            pid = run.pid,
            "run of a previous incarnation marked orphaned"
        );
    }
    Ok(orphans)
}
