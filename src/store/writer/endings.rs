//! How runs end: the final state, and in the same transaction the job's
//! standing (last run, last success and failure, the consecutive-failure
//! count) and the pause `auto_pause_after` asks for.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::runs::{final_or_missing, job_id};
use super::{Applied, load_job};
use crate::run::{Outcome, RunId, RunStatus};
use crate::store::rows::{attempt_log_json, ms};
use crate::store::sql::{Tx, all, first, values};
use crate::store::{JobChange, StoreError};

/// Records a run's final state and, on its job's row, the job's standing
/// (last run, last success or failure, the consecutive-failure count);
/// reaching `auto_pause_after` pauses the job in the same commit.
///
/// On a shared database a success is one statement (the standing rides on
/// the run's update), a round trip less for the bulk of every fire; on
/// SQLite statements cost no round trip and stay two.
pub(super) fn finish(
    c: &mut dyn Tx,
    id: RunId,
    o: Outcome,
    at: DateTime<Utc>,
    outbox: bool,
    shared: bool,
) -> Applied<()> {
    debug_assert!(o.status.is_final());
    const FINISH: &str = "UPDATE runs SET status = $1, reason = $2, ended_at = $3, attempts = $4, exit_code = $5, \
         http_status = $6, error = $7, output = $8, attempt_log = COALESCE($9, attempt_log) \
         WHERE id = $10 AND status IN ('queued', 'running') RETURNING job_id, scheduled_at";
    let with_it = shared && o.status == RunStatus::Succeeded;
    let sql = if with_it {
        format!(
            "WITH r AS ({FINISH}), j AS (UPDATE jobs SET consecutive_failures = 0, last_run_id = $10, \
             last_run_status = $1, last_run_scheduled_at = r.scheduled_at, last_run_ended_at = $3, \
             last_run_error = NULL, last_success_at = $3 FROM r WHERE jobs.id = r.job_id) \
             SELECT job_id, scheduled_at FROM r"
        )
    } else {
        FINISH.to_owned()
    };
    let status = o.status;
    let error = o.error.as_deref().map(crate::standing::error_line);
    let ended = first(
        c,
        &sql,
        &values![
            o.status.as_str(),
            o.reason.map(crate::run::Reason::as_str),
            ms(at),
            i64::from(o.attempts),
            o.exit_code,
            o.http_status.map(i64::from),
            o.error,
            o.output,
            attempt_log_json(&o.attempt_log),
            id.to_string(),
        ],
        |row| Ok((row.text(0)?, row.int(1)?)),
    )?;
    let Some((job, scheduled_at)) = ended else {
        return Err(final_or_missing(c, id));
    };
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    if with_it || matches!(status, RunStatus::Skipped | RunStatus::Missed) {
        return Ok(((), None));
    }
    let failures = stand(c, &job, id, status, scheduled_at, at, error)?;
    match failures {
        Some(counted) if matches!(status, RunStatus::Failed | RunStatus::TimedOut) => {
            Ok(((), auto_pause(c, &job, counted, at)?))
        }
        _ => Ok(((), None)),
    }
}

/// Writes a run's end into its job's standing; returns the job's
/// consecutive failures, its `auto_pause_after` and whether it is paused.
fn stand(
    c: &mut dyn Tx,
    job: &str,
    run: RunId,
    status: RunStatus,
    scheduled_at: i64,
    at: DateTime<Utc>,
    error: Option<String>,
) -> Result<Option<(i64, Option<i64>, bool)>, StoreError> {
    first(
        c,
        "UPDATE jobs SET last_run_id = $1, last_run_status = $2, last_run_scheduled_at = $3, \
         last_run_ended_at = $4, last_run_error = $5, \
         last_success_at = CASE WHEN $2 = 'succeeded' THEN $4 ELSE last_success_at END, \
         last_failure_at = CASE WHEN $2 IN ('failed', 'timed_out') THEN $4 ELSE last_failure_at END, \
         consecutive_failures = CASE WHEN $2 = 'succeeded' THEN 0 \
           WHEN $2 IN ('failed', 'timed_out') THEN consecutive_failures + 1 ELSE consecutive_failures END \
         WHERE id = $6 RETURNING consecutive_failures, auto_pause_after, paused",
        &values![run.to_string(), status.as_str(), scheduled_at, ms(at), error, job],
        |row| Ok((row.int(0)?, row.opt_int(1)?, row.int(2)? != 0)),
    )
}

/// How many successes [`finish_successes`] ends in one statement at most
/// (8 parameters each).
pub(super) const FINISH_GROUP: usize = 64;

/// Ends successful runs in one statement (shared database): their rows
/// are locked in id order, as orphaning locks them, so two writers cannot
/// deadlock; then their jobs' standing records the batch's last run of
/// each and their failure counts reset, runs before jobs as everywhere. Returns the runs it ended; the others were final or gone.
pub(super) fn finish_successes<'a>(
    c: &mut dyn Tx,
    runs: impl Iterator<Item = (RunId, &'a Outcome, DateTime<Utc>)>,
) -> Result<HashSet<RunId>, StoreError> {
    let mut params = Vec::new();
    let mut rows = Vec::new();
    for (id, o, at) in runs {
        debug_assert_eq!(o.status, RunStatus::Succeeded);
        let n = params.len();
        let slots: Vec<String> = (n + 1..=n + 8).map(|i| format!("${i}")).collect();
        rows.push(format!("({})", slots.join(", ")));
        params.extend(values![
            id.to_string(),
            ms(at),
            i64::from(o.attempts),
            o.exit_code,
            o.http_status.map(i64::from),
            o.error.clone(),
            o.output.clone(),
            attempt_log_json(&o.attempt_log),
        ]);
    }
    let sql = format!(
        "WITH v (id, ended_at, attempts, exit_code, http_status, error, output, attempt_log) AS (VALUES {}), \
         locked AS (SELECT runs.id FROM runs JOIN v ON runs.id = v.id \
           WHERE runs.status IN ('queued', 'running') ORDER BY runs.id FOR NO KEY UPDATE OF runs), \
         r AS (UPDATE runs SET status = 'succeeded', reason = NULL, ended_at = v.ended_at, attempts = v.attempts, \
           exit_code = v.exit_code, http_status = v.http_status, error = v.error, output = v.output, \
           attempt_log = COALESCE(v.attempt_log, runs.attempt_log) FROM v, locked \
           WHERE runs.id = v.id AND locked.id = v.id AND runs.status IN ('queued', 'running') \
           RETURNING runs.id, runs.job_id, runs.scheduled_at, runs.ended_at), \
         l AS (SELECT DISTINCT ON (job_id) job_id, id, scheduled_at, ended_at FROM r \
           ORDER BY job_id, ended_at DESC, id DESC), \
         j AS (UPDATE jobs SET consecutive_failures = 0, last_run_id = l.id, last_run_status = 'succeeded', \
           last_run_scheduled_at = l.scheduled_at, last_run_ended_at = l.ended_at, last_run_error = NULL, \
           last_success_at = l.ended_at FROM l WHERE jobs.id = l.job_id) \
         SELECT id FROM r",
        rows.join(", ")
    );
    let ended = all(c, &sql, &params, |row| row.text(0))?;
    ended
        .iter()
        .map(|id| {
            id.parse()
                .map_err(|_| StoreError::corrupt("run id", format!("`{id}` does not parse")))
        })
        .collect()
}

fn auto_pause(
    c: &mut dyn Tx,
    job: &str,
    (failures, limit, paused): (i64, Option<i64>, bool),
    at: DateTime<Utc>,
) -> Result<Option<JobChange>, StoreError> {
    match limit {
        Some(limit) if failures >= limit && !paused => {
            let note = format!("auto-paused after {failures} consecutive failed runs");
            c.execute(
                "UPDATE jobs SET paused = 1, pause_note = $1, version = version + 1, updated_at = $2 WHERE id = $3",
                &values![note, ms(at), job],
            )?;
            tracing::warn!(job, failures, "job auto-paused");
            Ok(Some(JobChange::Upserted(Arc::new(load_job(c, job_id(job)?)?))))
        }
        _ => Ok(None),
    }
}
