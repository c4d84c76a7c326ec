//! Run writes, and the job counters that move with them in the same
//! transaction: the schedule cursor, the started-run count (`max_runs`) and
//! the consecutive-failure count (`auto_pause_after`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{Applied, is_foreign_key_violation, load_job};
use crate::job::JobId;
use crate::run::{Attempt, Incarnation, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::rows::{self, RUN_COLUMNS, attempt_log_json, ms};
use crate::store::{JobChange, StoreError};

/// Whether runs of this trigger count toward `max_runs` (manual runs do not).
fn counts_toward_limit(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Schedule | Trigger::CatchUp)
}

fn job_id(text: &str) -> Result<JobId, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("job id {text}")))
}

/// Claims one start under the job's `max_runs`. `Ok(Some(change))` when
/// this start used up the limit (the engine must stop firing the job).
fn claim_start(c: &Connection, job: JobId) -> Result<Option<JobChange>, StoreError> {
    let claimed: Option<(i64, Option<i64>)> = c
        .prepare_cached(
            "UPDATE jobs SET runs_started = runs_started + 1 \
             WHERE id = ? AND (max_runs IS NULL OR runs_started < max_runs) RETURNING runs_started, max_runs",
        )?
        .query_row(params![job.to_string()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((started, max)) = claimed else {
        return Err(StoreError::LimitReached);
    };
    if max == Some(started) {
        let job = load_job(c, job)?;
        return Ok(Some(JobChange::Upserted(Arc::new(job))));
    }
    Ok(None)
}

/// Turns a run that may not start (limit reached) into a `skipped` row.
fn skip_for_limit(c: &Connection, id: RunId, at: DateTime<Utc>, outbox: bool) -> Result<(), StoreError> {
    c.prepare_cached(
        "UPDATE runs SET status = 'skipped', reason = ?, started_at = NULL, ended_at = ?, \
         error = 'the job reached its max_runs' WHERE id = ?",
    )?
    .execute(params![Reason::LimitReached.as_str(), ms(at), id.to_string()])?;
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    Ok(())
}

/// Inserts a run; a scheduled fire also moves the job's cursor. A starting
/// scheduled run over the job's `max_runs` is stored as skipped and
/// reported as [`StoreError::LimitReached`].
pub(super) fn insert(c: &Connection, run: &Run, outbox: bool) -> Applied<()> {
    let result = c
        .prepare_cached(
            "INSERT INTO runs (id, job_id, job_name, scheduled_at, scheduled_until, fires, status, trigger, reason, \
             created_at, started_at, ended_at, attempts, exit_code, http_status, error, output, pid, pgid, \
             process_start_ticks, incarnation) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?) ON CONFLICT DO NOTHING",
        )?
        .execute(params![
            run.id.to_string(),
            run.job_id.to_string(),
            run.job_name,
            ms(run.scheduled_at),
            run.scheduled_until.map(ms),
            i64::from(run.fires),
            run.status.as_str(),
            run.trigger.as_str(),
            run.reason.map(|r| r.as_str()),
            ms(run.created_at),
            run.started_at.map(ms),
            run.ended_at.map(ms),
            i64::from(run.attempts),
            run.exit_code,
            run.http_status.map(i64::from),
            run.error,
            run.output,
            run.incarnation.to_string(),
        ]);
    match result {
        Ok(0) => return Err(StoreError::DuplicateFire),
        Ok(_) => {}
        // The job was deleted between the fire and this insert.
        Err(e) if is_foreign_key_violation(&e) => return Err(StoreError::NotFound),
        Err(e) => return Err(e.into()),
    }
    if outbox && run.status.is_final() {
        super::outbox::record_run(c, run.id, run.created_at)?;
    }
    if !counts_toward_limit(run.trigger) {
        return Ok(((), None));
    }
    // One statement moves the cursor and, for a starting run, claims a
    // start under `max_runs` (the common case of every scheduled fire).
    let starting = run.status == RunStatus::Running;
    let handled_until = run.scheduled_until.unwrap_or(run.scheduled_at);
    let counted: Option<(i64, Option<i64>)> = c
        .prepare_cached(
            "UPDATE jobs SET cursor_at = MAX(cursor_at, ?1), runs_started = runs_started + ?2 WHERE id = ?3 \
             RETURNING runs_started, max_runs",
        )?
        .query_row(
            params![ms(handled_until), i64::from(starting), run.job_id.to_string()],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let Some((started, max)) = counted.filter(|_| starting) else {
        return Ok(((), None));
    };
    match max {
        Some(max) if started > max => {
            c.prepare_cached("UPDATE jobs SET runs_started = runs_started - 1 WHERE id = ?")?
                .execute(params![run.job_id.to_string()])?;
            skip_for_limit(c, run.id, run.created_at, outbox)?;
            Err(StoreError::LimitReached)
        }
        Some(max) if started == max => {
            let job = load_job(c, run.job_id)?;
            Ok(((), Some(JobChange::Upserted(Arc::new(job)))))
        }
        _ => Ok(((), None)),
    }
}

/// Moves a queued run to running (same limit rule as [`insert`]).
pub(super) fn start(c: &Connection, id: RunId, at: DateTime<Utc>, outbox: bool) -> Applied<()> {
    let row: Option<(String, String)> = c
        .prepare_cached(
            "UPDATE runs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued' \
             RETURNING job_id, trigger",
        )?
        .query_row(params![ms(at), id.to_string()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    let Some((job, trigger)) = row else {
        return Err(final_or_missing(c, id));
    };
    let trigger: Trigger = trigger.parse().map_err(StoreError::Corrupt)?;
    let job = job_id(&job)?;
    if !counts_toward_limit(trigger) {
        return Ok(((), None));
    }
    match claim_start(c, job) {
        Ok(change) => Ok(((), change)),
        Err(StoreError::LimitReached) => {
            skip_for_limit(c, id, at, outbox)?;
            Err(StoreError::LimitReached)
        }
        Err(e) => Err(e),
    }
}

/// Records attempts so far while a run with retries goes on.
pub(super) fn record_attempt(
    c: &Connection,
    id: RunId,
    attempts: u32,
    log: &[Attempt],
) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE runs SET attempts = ?, attempt_log = ? WHERE id = ? AND status = 'running'")?
        .execute(params![
            i64::from(attempts),
            attempt_log_json(log),
            id.to_string()
        ])?;
    Ok(())
}

/// Records the process a command run started.
pub(super) fn record_process(
    c: &Connection,
    id: RunId,
    pid: i32,
    pgid: i32,
    start_ticks: Option<u64>,
) -> Result<(), StoreError> {
    c.prepare_cached("UPDATE runs SET pid = ?, pgid = ?, process_start_ticks = ? WHERE id = ?")?
        .execute(params![
            pid,
            pgid,
            start_ticks.and_then(|t| i64::try_from(t).ok()),
            id.to_string()
        ])?;
    Ok(())
}

pub(super) fn final_or_missing(c: &Connection, id: RunId) -> StoreError {
    let found = c
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?")
        .and_then(|mut s| s.query_row(params![id.to_string()], |_| Ok(())).optional());
    match found {
        Ok(Some(())) => StoreError::AlreadyFinal,
        Ok(None) => StoreError::NotFound,
        Err(e) => e.into(),
    }
}

/// Records a run's final state and moves the job's consecutive-failure
/// count; reaching `auto_pause_after` pauses the job in the same commit.
pub(super) fn finish(c: &Connection, id: RunId, o: Outcome, at: DateTime<Utc>, outbox: bool) -> Applied<()> {
    debug_assert!(o.status.is_final());
    let job: Option<String> = c
        .prepare_cached(
            "UPDATE runs SET status = ?, reason = ?, ended_at = ?, attempts = ?, exit_code = ?, http_status = ?, \
             error = ?, output = ?, attempt_log = COALESCE(?, attempt_log) \
             WHERE id = ? AND status IN ('queued', 'running') RETURNING job_id",
        )?
        .query_row(
            params![
                o.status.as_str(),
                o.reason.map(|r| r.as_str()),
                ms(at),
                i64::from(o.attempts),
                o.exit_code,
                o.http_status.map(i64::from),
                o.error,
                o.output,
                attempt_log_json(&o.attempt_log),
                id.to_string(),
            ],
            |row| row.get(0),
        )
        .optional()?;
    let Some(job) = job else {
        return Err(final_or_missing(c, id));
    };
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    let change = match o.status {
        RunStatus::Succeeded => {
            c.prepare_cached(
                "UPDATE jobs SET consecutive_failures = 0 WHERE id = ? AND consecutive_failures > 0",
            )?
            .execute(params![job])?;
            None
        }
        RunStatus::Failed | RunStatus::TimedOut => auto_pause(c, &job, at)?,
        _ => None,
    };
    Ok(((), change))
}

fn auto_pause(c: &Connection, job: &str, at: DateTime<Utc>) -> Result<Option<JobChange>, StoreError> {
    let counted: Option<(i64, Option<i64>, bool)> = c
        .prepare_cached(
            "UPDATE jobs SET consecutive_failures = consecutive_failures + 1 WHERE id = ? \
             RETURNING consecutive_failures, auto_pause_after, paused",
        )?
        .query_row(params![job], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    let Some((failures, limit, paused)) = counted else {
        return Ok(None);
    };
    match limit {
        Some(limit) if failures >= limit && !paused => {
            let note = format!("auto-paused after {failures} consecutive failed runs");
            c.prepare_cached(
                "UPDATE jobs SET paused = 1, pause_note = ?, version = version + 1, updated_at = ? WHERE id = ?",
            )?
            .execute(params![note, ms(at), job])?;
            tracing::warn!(job, failures, "job auto-paused");
            Ok(Some(JobChange::Upserted(Arc::new(load_job(c, job_id(job)?)?))))
        }
        _ => Ok(None),
    }
}

/// Marks every live run not owned by `current` as orphaned; returns them
/// as they were.
pub(super) fn orphan_foreign(
    c: &Connection,
    current: Incarnation,
    at: DateTime<Utc>,
    outbox: bool,
) -> Result<Vec<Run>, StoreError> {
    let runs = {
        let mut statement = c.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running') AND incarnation != ?"
        ))?;
        let mut found = statement.query(params![current.to_string()])?;
        let mut runs = Vec::new();
        while let Some(row) = found.next()? {
            runs.push(rows::run(row)?);
        }
        runs
    };
    for run in &runs {
        let error = format!(
            "the service incarnation {} that owned this {} run ended without recording its outcome",
            run.incarnation, run.status
        );
        orphan_if_live(c, run.id, at, &error, outbox)?;
    }
    Ok(runs)
}

/// Marks one run `orphaned` if it is still live; whether it was.
pub(super) fn orphan_if_live(
    c: &Connection,
    id: RunId,
    at: DateTime<Utc>,
    error: &str,
    outbox: bool,
) -> Result<bool, StoreError> {
    let changed = c
        .prepare_cached(
            "UPDATE runs SET status = 'orphaned', ended_at = ?, error = ? WHERE id = ? AND status IN ('queued', 'running')",
        )?
        .execute(params![ms(at), error, id.to_string()])?;
    let orphaned = changed == 1;
    if orphaned && outbox {
        super::outbox::record_run(c, id, at)?;
    }
    Ok(orphaned)
}

/// Deletes up to `limit` finished runs of `job` beyond its `keep_last`
/// newest runs, or created before `older_than`.
pub(super) fn prune_job(
    c: &Connection,
    job: JobId,
    keep_last: Option<u32>,
    older_than: Option<DateTime<Utc>>,
    limit: u32,
) -> Result<u64, StoreError> {
    let deleted = c
        .prepare_cached(
            "DELETE FROM runs WHERE id IN (\
               SELECT id FROM runs WHERE job_id = ?1 AND status NOT IN ('queued', 'running') \
               AND (id < (SELECT id FROM runs WHERE job_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2) OR id < ?3) \
               ORDER BY id LIMIT ?4)",
        )?
        .execute(params![
            job.to_string(),
            // No keep-last: an offset past any history keeps everything.
            keep_last.map_or(i64::MAX, |k| i64::from(k.max(1)) - 1),
            older_than.map(|t| RunId::boundary(t).to_string()),
            i64::from(limit),
        ])?;
    Ok(deleted as u64)
}

/// Deletes up to `limit` finished runs created before `older_than`, of jobs
/// without their own history age.
pub(super) fn prune_old(c: &Connection, older_than: DateTime<Utc>, limit: u32) -> Result<u64, StoreError> {
    let deleted = c
        .prepare_cached(
            "DELETE FROM runs WHERE id IN (\
               SELECT id FROM runs WHERE id < ? AND status NOT IN ('queued', 'running') \
               AND job_id NOT IN (SELECT id FROM jobs WHERE history_max_age_ms IS NOT NULL) \
               ORDER BY id LIMIT ?)",
        )?
        .execute(params![RunId::boundary(older_than).to_string(), i64::from(limit)])?;
    Ok(deleted as u64)
}
