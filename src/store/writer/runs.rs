//! Run writes, and the job counters that move with them in the same
//! transaction: the schedule cursor, the started-run count (`max_runs`) and
//! the consecutive-failure count (`auto_pause_after`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite, Transaction};

use super::{Applied, load_job};
use crate::job::JobId;
use crate::run::{Attempt, Incarnation, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::rows::{self, RUN_COLUMNS, attempt_log_json, ms};
use crate::store::{JobChange, StoreError};

/// Whether runs of this trigger count toward `max_runs` (manual runs do not).
fn counts_toward_limit(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Schedule | Trigger::CatchUp)
}

/// Claims one start under the job's `max_runs`. `Ok(Some(change))` when
/// this start used up the limit (the engine must stop firing the job).
async fn claim_start(tx: &mut Transaction<'_, Sqlite>, job: JobId) -> Result<Option<JobChange>, StoreError> {
    let row = sqlx::query(
        "UPDATE jobs SET runs_started = runs_started + 1 \
         WHERE id = ? AND (max_runs IS NULL OR runs_started < max_runs) RETURNING runs_started, max_runs",
    )
    .bind(job.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(StoreError::LimitReached);
    };
    let started: i64 = row.try_get(0)?;
    let max: Option<i64> = row.try_get(1)?;
    if max == Some(started) {
        let job = load_job(tx, job).await?;
        return Ok(Some(JobChange::Upserted(Arc::new(job))));
    }
    Ok(None)
}

/// Turns a run that may not start (limit reached) into a `skipped` row.
async fn skip_for_limit(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    at: DateTime<Utc>,
    outbox: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE runs SET status = 'skipped', reason = ?, started_at = NULL, ended_at = ?, \
         error = 'the job reached its max_runs' WHERE id = ?",
    )
    .bind(Reason::LimitReached.as_str())
    .bind(ms(at))
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    if outbox {
        super::outbox::record_run(tx, id, at).await?;
    }
    Ok(())
}

/// Inserts a run; a scheduled fire also moves the job's cursor. A starting
/// scheduled run over the job's `max_runs` is stored as skipped and
/// reported as [`StoreError::LimitReached`].
pub(super) async fn insert(tx: &mut Transaction<'_, Sqlite>, run: &Run, outbox: bool) -> Applied<()> {
    let result = sqlx::query(
        "INSERT INTO runs (id, job_id, job_name, scheduled_at, scheduled_until, fires, status, trigger, reason, \
         created_at, started_at, ended_at, attempts, exit_code, http_status, error, output, pid, pgid, \
         process_start_ticks, incarnation) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?) ON CONFLICT DO NOTHING",
    )
    .bind(run.id.to_string())
    .bind(run.job_id.to_string())
    .bind(&run.job_name)
    .bind(ms(run.scheduled_at))
    .bind(run.scheduled_until.map(ms))
    .bind(i64::from(run.fires))
    .bind(run.status.as_str())
    .bind(run.trigger.as_str())
    .bind(run.reason.map(|r| r.as_str()))
    .bind(ms(run.created_at))
    .bind(run.started_at.map(ms))
    .bind(run.ended_at.map(ms))
    .bind(i64::from(run.attempts))
    .bind(run.exit_code)
    .bind(run.http_status.map(i64::from))
    .bind(&run.error)
    .bind(&run.output)
    .bind(run.incarnation.to_string())
    .execute(&mut **tx)
    .await;
    match result {
        Ok(r) if r.rows_affected() == 0 => return Err(StoreError::DuplicateFire),
        Ok(_) => {}
        // The job was deleted between the fire and this insert.
        Err(sqlx::Error::Database(d)) if d.is_foreign_key_violation() => return Err(StoreError::NotFound),
        Err(e) => return Err(e.into()),
    }
    if counts_toward_limit(run.trigger) {
        let handled_until = run.scheduled_until.unwrap_or(run.scheduled_at);
        sqlx::query("UPDATE jobs SET cursor_at = MAX(cursor_at, ?) WHERE id = ?")
            .bind(ms(handled_until))
            .bind(run.job_id.to_string())
            .execute(&mut **tx)
            .await?;
    }
    if outbox && run.status.is_final() {
        super::outbox::record_run(tx, run.id, run.created_at).await?;
    }
    let mut change = None;
    if run.status == RunStatus::Running && counts_toward_limit(run.trigger) {
        match claim_start(tx, run.job_id).await {
            Ok(c) => change = c,
            Err(StoreError::LimitReached) => {
                skip_for_limit(tx, run.id, run.created_at, outbox).await?;
                return Err(StoreError::LimitReached);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(((), change))
}

/// Moves a queued run to running (same limit rule as [`insert`]).
pub(super) async fn start(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    at: DateTime<Utc>,
    outbox: bool,
) -> Applied<()> {
    let row = sqlx::query(
        "UPDATE runs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued' \
         RETURNING job_id, trigger",
    )
    .bind(ms(at))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(final_or_missing(tx, id).await);
    };
    let job: String = row.try_get(0)?;
    let trigger: String = row.try_get(1)?;
    let trigger: Trigger = trigger.parse().map_err(StoreError::Corrupt)?;
    let job: JobId = job
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("job id {job}")))?;
    if !counts_toward_limit(trigger) {
        return Ok(((), None));
    }
    match claim_start(tx, job).await {
        Ok(change) => Ok(((), change)),
        Err(StoreError::LimitReached) => {
            skip_for_limit(tx, id, at, outbox).await?;
            Err(StoreError::LimitReached)
        }
        Err(e) => Err(e),
    }
}

/// Records attempts so far while a run with retries goes on.
pub(super) async fn record_attempt(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    attempts: u32,
    log: &[Attempt],
) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET attempts = ?, attempt_log = ? WHERE id = ? AND status = 'running'")
        .bind(i64::from(attempts))
        .bind(attempt_log_json(log))
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records the process a command run started.
pub(super) async fn record_process(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    pid: i32,
    pgid: i32,
    start_ticks: Option<u64>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE runs SET pid = ?, pgid = ?, process_start_ticks = ? WHERE id = ?")
        .bind(pid)
        .bind(pgid)
        .bind(start_ticks.and_then(|t| i64::try_from(t).ok()))
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) async fn final_or_missing(tx: &mut Transaction<'_, Sqlite>, id: RunId) -> StoreError {
    match sqlx::query("SELECT 1 FROM runs WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await
    {
        Ok(Some(_)) => StoreError::AlreadyFinal,
        Ok(None) => StoreError::NotFound,
        Err(e) => e.into(),
    }
}

/// Records a run's final state and moves the job's consecutive-failure
/// count; reaching `auto_pause_after` pauses the job in the same commit.
pub(super) async fn finish(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    o: Outcome,
    at: DateTime<Utc>,
    outbox: bool,
) -> Applied<()> {
    debug_assert!(o.status.is_final());
    let row = sqlx::query(
        "UPDATE runs SET status = ?, reason = ?, ended_at = ?, attempts = ?, exit_code = ?, http_status = ?, \
         error = ?, output = ?, attempt_log = COALESCE(?, attempt_log) \
         WHERE id = ? AND status IN ('queued', 'running') RETURNING job_id",
    )
    .bind(o.status.as_str())
    .bind(o.reason.map(|r| r.as_str()))
    .bind(ms(at))
    .bind(i64::from(o.attempts))
    .bind(o.exit_code)
    .bind(o.http_status.map(i64::from))
    .bind(&o.error)
    .bind(&o.output)
    .bind(attempt_log_json(&o.attempt_log))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else {
        return Err(final_or_missing(tx, id).await);
    };
    let job: String = row.try_get(0)?;
    if outbox {
        super::outbox::record_run(tx, id, at).await?;
    }
    let change = match o.status {
        RunStatus::Succeeded => {
            sqlx::query("UPDATE jobs SET consecutive_failures = 0 WHERE id = ? AND consecutive_failures > 0")
                .bind(&job)
                .execute(&mut **tx)
                .await?;
            None
        }
        RunStatus::Failed | RunStatus::TimedOut => auto_pause(tx, &job, at).await?,
        _ => None,
    };
    Ok(((), change))
}

async fn auto_pause(
    tx: &mut Transaction<'_, Sqlite>,
    job: &str,
    at: DateTime<Utc>,
) -> Result<Option<JobChange>, StoreError> {
    let row = sqlx::query(
        "UPDATE jobs SET consecutive_failures = consecutive_failures + 1 WHERE id = ? \
         RETURNING consecutive_failures, auto_pause_after, paused",
    )
    .bind(job)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let failures: i64 = row.try_get(0)?;
    let limit: Option<i64> = row.try_get(1)?;
    let paused: bool = row.try_get(2)?;
    match limit {
        Some(limit) if failures >= limit && !paused => {
            let note = format!("auto-paused after {failures} consecutive failed runs");
            sqlx::query(
                "UPDATE jobs SET paused = 1, pause_note = ?, version = version + 1, updated_at = ? WHERE id = ?",
            )
            .bind(&note)
            .bind(ms(at))
            .bind(job)
            .execute(&mut **tx)
            .await?;
            tracing::warn!(job, failures, "job auto-paused");
            let id: JobId = job
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("job id {job}")))?;
            Ok(Some(JobChange::Upserted(Arc::new(load_job(tx, id).await?))))
        }
        _ => Ok(None),
    }
}

/// Marks every live run not owned by `current` as orphaned; returns them
/// as they were.
pub(super) async fn orphan_foreign(
    tx: &mut Transaction<'_, Sqlite>,
    current: Incarnation,
    at: DateTime<Utc>,
    outbox: bool,
) -> Result<Vec<Run>, StoreError> {
    let found = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running') AND incarnation != ?"
    )))
    .bind(current.to_string())
    .fetch_all(&mut **tx)
    .await?;
    let runs = found.iter().map(rows::run).collect::<Result<Vec<_>, _>>()?;
    for run in &runs {
        let error = format!(
            "the service incarnation {} that owned this {} run ended without recording its outcome",
            run.incarnation, run.status
        );
        orphan_if_live(tx, run.id, at, &error, outbox).await?;
    }
    Ok(runs)
}

/// Marks one run `orphaned` if it is still live; whether it was.
pub(super) async fn orphan_if_live(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    at: DateTime<Utc>,
    error: &str,
    outbox: bool,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE runs SET status = 'orphaned', ended_at = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')",
    )
    .bind(ms(at))
    .bind(error)
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    let orphaned = r.rows_affected() == 1;
    if orphaned && outbox {
        super::outbox::record_run(tx, id, at).await?;
    }
    Ok(orphaned)
}

/// Deletes up to `limit` finished runs of `job` beyond its `keep_last`
/// newest runs, or created before `older_than`.
pub(super) async fn prune_job(
    tx: &mut Transaction<'_, Sqlite>,
    job: JobId,
    keep_last: Option<u32>,
    older_than: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "DELETE FROM runs WHERE id IN (\
           SELECT id FROM runs WHERE job_id = ?1 AND status NOT IN ('queued', 'running') \
           AND (id < (SELECT id FROM runs WHERE job_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2) OR id < ?3) \
           ORDER BY id LIMIT ?4)",
    )
    .bind(job.to_string())
    // No keep-last: an offset past any history keeps everything.
    .bind(keep_last.map_or(i64::MAX, |k| i64::from(k.max(1)) - 1))
    .bind(older_than.map(|t| RunId::boundary(t).to_string()))
    .bind(i64::from(limit))
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}

/// Deletes up to `limit` finished runs created before `older_than`, of jobs
/// without their own history age.
pub(super) async fn prune_old(
    tx: &mut Transaction<'_, Sqlite>,
    older_than: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "DELETE FROM runs WHERE id IN (\
           SELECT id FROM runs WHERE id < ? AND status NOT IN ('queued', 'running') \
           AND job_id NOT IN (SELECT id FROM jobs WHERE history_max_age_ms IS NOT NULL) \
           ORDER BY id LIMIT ?)",
    )
    .bind(RunId::boundary(older_than).to_string())
    .bind(i64::from(limit))
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}
