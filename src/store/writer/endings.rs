//! How runs end: the final state, and in the same transaction the job's
//! standing (last run, last success and failure, the consecutive-failure
//! count) and the pause `auto_pause_after` asks for.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::notices::{Notice, record};
use super::runs::{final_or_missing, job_id};
use super::{Applied, load_job};
use crate::events::{Event as FeedEvent, Kind};
use crate::notification::Event;
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
         http_status = $6, error = $7, output = $8, attempt_log = COALESCE($9, attempt_log), stderr = $10 \
         WHERE id = $11 AND status IN ('queued', 'running') RETURNING job_id, scheduled_at, job_name";
    // SQLite numbers `$N` by first appearance: keep them in order.
    const SUCCEEDED: &str = "UPDATE jobs SET consecutive_failures = 0, last_run_id = $11, last_run_status = $1, \
         last_run_scheduled_at = r.scheduled_at, last_run_ended_at = $3, last_run_error = NULL, last_success_at = $3 \
         FROM r WHERE jobs.id = r.job_id";
    let with_it = shared && o.status == RunStatus::Succeeded;
    let sql = if with_it {
        // Two updates on disjoint rows: whether the job had failed before
        // (a recovery to report) comes back without reading it first.
        format!(
            "WITH r AS ({FINISH}), j AS ({SUCCEEDED} AND jobs.consecutive_failures = 0), \
             k AS ({SUCCEEDED} AND jobs.consecutive_failures > 0 RETURNING jobs.id) \
             SELECT job_id, scheduled_at, job_name, (SELECT COUNT(*) FROM k) FROM r"
        )
    } else {
        format!("{FINISH}, CAST(0 AS BIGINT)")
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
            o.stderr,
            id.to_string(),
        ],
        |row| Ok((row.text(0)?, row.int(1)?, row.text(2)?, row.int(3)? > 0)),
    )?;
    let Some((job, scheduled_at, job_name, recovered)) = ended else {
        return Err(final_or_missing(c, id));
    };
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    let job_key = job_id(&job)?;
    let kind = match status {
        RunStatus::Skipped => Kind::RunSkipped,
        RunStatus::Missed => Kind::RunMissed,
        RunStatus::Orphaned => Kind::RunOrphaned,
        _ => Kind::RunFinished,
    };
    let mut ended = FeedEvent::new(kind, at)
        .job(job_key)
        .name(job_name.clone())
        .run(id)
        .status(status.as_str());
    ended.detail.clone_from(&error);
    c.stage(ended);
    let health = |c: &mut dyn Tx, health: &str| {
        c.stage(
            FeedEvent::new(Kind::JobHealth, at)
                .job(job_key)
                .name(job_name.clone())
                .run(id)
                .status(health),
        );
    };
    let notice = |event, first, detail| Notice {
        event,
        job_id: &job,
        job_name: &job_name,
        run: Some(id),
        first,
        detail,
        at,
    };
    if with_it {
        if recovered {
            record(c, notice(Event::Recovery, true, None))?;
            health(c, "ok");
        }
        return Ok(((), None));
    }
    match status {
        RunStatus::Skipped => return Ok(((), None)),
        RunStatus::Missed => {
            record(c, notice(Event::Missed, true, error))?;
            return Ok(((), None));
        }
        RunStatus::Orphaned => record(c, notice(Event::Orphaned, true, error.clone()))?,
        _ => {}
    }
    let stood = match status {
        // The common case first: a success that ends no streak.
        RunStatus::Succeeded => match stand(c, &job, id, status, scheduled_at, at, None, true)? {
            Some(stood) => Some(stood),
            None => {
                let stood = stand(c, &job, id, status, scheduled_at, at, None, false)?;
                if stood.is_some() {
                    record(c, notice(Event::Recovery, true, None))?;
                    health(c, "ok");
                }
                stood
            }
        },
        _ => stand(c, &job, id, status, scheduled_at, at, error.clone(), false)?,
    };
    let Some(stood) = stood else { return Ok(((), None)) };
    if !matches!(status, RunStatus::Failed | RunStatus::TimedOut) {
        return Ok(((), None));
    }
    let first_failure = stood.failures == 1;
    if first_failure {
        health(c, "failing");
    }
    if first_failure || stood.every_failure {
        record(c, notice(Event::Failure, first_failure, error))?;
    }
    let paused = auto_pause(c, &job, &stood, at)?;
    if let Some(JobChange::Upserted(paused)) = &paused {
        let note = paused.pause_note.clone();
        let mut event = FeedEvent::new(Kind::JobPaused, at)
            .job(job_key)
            .name(job_name.clone());
        event.detail.clone_from(&note);
        c.stage(event);
        record(c, notice(Event::AutoPaused, true, note))?;
    }
    Ok(((), paused))
}

/// A success ended in a group: its job's id and name, and whether it
/// ended the job's failure streak (a recovery).
pub(super) struct Ended {
    pub job: String,
    pub name: String,
    pub recovered: bool,
}

/// A job's standing after a run's end, as the pause and the
/// notifications need it.
struct Stood {
    failures: i64,
    auto_pause_after: Option<i64>,
    paused: bool,
    /// The job asks to hear of every failure (a text match on its spec;
    /// the notifier checks the parsed spec).
    every_failure: bool,
}

/// Writes a run's end into its job's standing. `unbroken`: only if the
/// job has no failure streak (`None` otherwise, or when the job is gone).
#[expect(clippy::too_many_arguments, reason = "one statement's parameters")]
fn stand(
    c: &mut dyn Tx,
    job: &str,
    run: RunId,
    status: RunStatus,
    scheduled_at: i64,
    at: DateTime<Utc>,
    error: Option<String>,
    unbroken: bool,
) -> Result<Option<Stood>, StoreError> {
    let only = if unbroken {
        " AND consecutive_failures = 0"
    } else {
        ""
    };
    first(
        c,
        &format!(
            "UPDATE jobs SET last_run_id = $1, last_run_status = $2, last_run_scheduled_at = $3, \
             last_run_ended_at = $4, last_run_error = $5, \
             last_success_at = CASE WHEN $2 = 'succeeded' THEN $4 ELSE last_success_at END, \
             last_failure_at = CASE WHEN $2 IN ('failed', 'timed_out') THEN $4 ELSE last_failure_at END, \
             consecutive_failures = CASE WHEN $2 = 'succeeded' THEN 0 \
               WHEN $2 IN ('failed', 'timed_out') THEN consecutive_failures + 1 ELSE consecutive_failures END \
             WHERE id = $6{only} RETURNING consecutive_failures, auto_pause_after, paused, \
             CAST(CASE WHEN spec LIKE '%\"every_failure\":true%' THEN 1 ELSE 0 END AS BIGINT)"
        ),
        &values![run.to_string(), status.as_str(), scheduled_at, ms(at), error, job],
        |row| {
            Ok(Stood {
                failures: row.int(0)?,
                auto_pause_after: row.opt_int(1)?,
                paused: row.int(2)? != 0,
                every_failure: row.int(3)? != 0,
            })
        },
    )
}

/// How many successes [`finish_successes`] ends in one statement at most
/// (9 parameters each).
pub(super) const FINISH_GROUP: usize = 64;

/// Ends successful runs in one statement (shared database): their rows
/// are locked in id order, as orphaning locks them, so two writers cannot
/// deadlock; then their jobs' standing records the batch's last run of
/// each and their failure counts reset, runs before jobs as everywhere.
/// Returns the runs it ended (the others were final or gone).
pub(super) fn finish_successes<'a>(
    c: &mut dyn Tx,
    runs: impl Iterator<Item = (RunId, &'a Outcome, DateTime<Utc>)>,
) -> Result<HashMap<RunId, Ended>, StoreError> {
    let mut params = Vec::new();
    let mut rows = Vec::new();
    for (id, o, at) in runs {
        debug_assert_eq!(o.status, RunStatus::Succeeded);
        let n = params.len();
        let slots: Vec<String> = (n + 1..=n + 9).map(|i| format!("${i}")).collect();
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
            o.stderr.clone(),
        ]);
    }
    const STANDING: &str = "consecutive_failures = 0, last_run_id = l.id, last_run_status = 'succeeded', \
         last_run_scheduled_at = l.scheduled_at, last_run_ended_at = l.ended_at, last_run_error = NULL, \
         last_success_at = l.ended_at";
    let sql = format!(
        "WITH v (id, ended_at, attempts, exit_code, http_status, error, output, attempt_log, stderr) AS (VALUES {}), \
         locked AS (SELECT runs.id FROM runs JOIN v ON runs.id = v.id \
           WHERE runs.status IN ('queued', 'running') ORDER BY runs.id FOR NO KEY UPDATE OF runs), \
         r AS (UPDATE runs SET status = 'succeeded', reason = NULL, ended_at = v.ended_at, attempts = v.attempts, \
           exit_code = v.exit_code, http_status = v.http_status, error = v.error, output = v.output, \
           attempt_log = COALESCE(v.attempt_log, runs.attempt_log), stderr = v.stderr FROM v, locked \
           WHERE runs.id = v.id AND locked.id = v.id AND runs.status IN ('queued', 'running') \
           RETURNING runs.id, runs.job_id, runs.job_name, runs.scheduled_at, runs.ended_at), \
         l AS (SELECT DISTINCT ON (job_id) job_id, id, scheduled_at, ended_at FROM r \
           ORDER BY job_id, ended_at DESC, id DESC), \
         j AS (UPDATE jobs SET {STANDING} FROM l WHERE jobs.id = l.job_id AND jobs.consecutive_failures = 0), \
         k AS (UPDATE jobs SET {STANDING} FROM l WHERE jobs.id = l.job_id AND jobs.consecutive_failures > 0 \
           RETURNING l.id) \
         SELECT r.id, r.job_id, r.job_name, CAST(CASE WHEN r.id IN (SELECT id FROM k) THEN 1 ELSE 0 END AS BIGINT) FROM r",
        rows.join(", ")
    );
    let ended = all(c, &sql, &params, |row| {
        Ok((row.text(0)?, row.text(1)?, row.text(2)?, row.int(3)? != 0))
    })?;
    ended
        .into_iter()
        .map(|(id, job, name, recovered)| {
            let id = id
                .parse()
                .map_err(|_| StoreError::corrupt("run id", format!("`{id}` does not parse")))?;
            Ok((id, Ended { job, name, recovered }))
        })
        .collect()
}

fn auto_pause(
    c: &mut dyn Tx,
    job: &str,
    stood: &Stood,
    at: DateTime<Utc>,
) -> Result<Option<JobChange>, StoreError> {
    let failures = stood.failures;
    match stood.auto_pause_after {
        Some(limit) if failures >= limit && !stood.paused => {
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
