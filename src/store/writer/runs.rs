//! Run writes, and the job counters that move with them in the same
//! transaction: the schedule cursor, the started-run count (`max_runs`) and
//! the job's standing (last run, last success and failure, the
//! consecutive-failure count that `auto_pause_after` reads).

use std::collections::HashSet;
use std::sync::Arc;

use super::claims;
use super::claims::Shared;
use super::{Applied, Pending, Reply, load_job, pending, plain};
use crate::job::JobId;
use crate::run::{Attempt, Incarnation, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::Conflict;
use crate::store::rows::{self, RUN_COLUMNS, attempt_log_json, ms};
use crate::store::sql::{Tx, Value, all, first, is_foreign_key_violation, values};
use crate::store::{JobChange, StoreError};
use chrono::{DateTime, Utc};

/// Whether runs of this trigger count toward `max_runs` (manual runs do not).
pub(super) fn counts_toward_limit(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Schedule | Trigger::CatchUp)
}

fn job_id(text: &str) -> Result<JobId, StoreError> {
    text.parse()
        .map_err(|_| StoreError::corrupt("job id", format!("`{text}` does not parse")))
}

/// Claims one start under the job's `max_runs`. `Ok(Some(change))` when
/// this start used up the limit (the engine must stop firing the job).
fn claim_start(c: &mut dyn Tx, job: JobId) -> Result<Option<JobChange>, StoreError> {
    let claimed = first(
        c,
        "UPDATE jobs SET runs_started = runs_started + 1 \
         WHERE id = $1 AND (max_runs IS NULL OR runs_started < max_runs) RETURNING runs_started, max_runs",
        &values![job.to_string()],
        |row| Ok((row.int(0)?, row.opt_int(1)?)),
    )?;
    let Some((started, max)) = claimed else {
        return Err(StoreError::Conflict(Conflict::LimitReached));
    };
    if max == Some(started) {
        let job = load_job(c, job)?;
        return Ok(Some(JobChange::Upserted(Arc::new(job))));
    }
    Ok(None)
}

/// Turns a run that may not start (limit reached) into a `skipped` row.
fn skip_for_limit(c: &mut dyn Tx, id: RunId, at: DateTime<Utc>, outbox: bool) -> Result<(), StoreError> {
    c.execute(
        "UPDATE runs SET status = 'skipped', reason = $1, started_at = NULL, ended_at = $2, \
         error = 'the job reached its max_runs' WHERE id = $3",
        &values![Reason::LimitReached.as_str(), ms(at), id.to_string()],
    )?;
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    Ok(())
}

pub(super) const INSERT_RUN: &str = "INSERT INTO runs (id, job_id, job_name, scheduled_at, scheduled_until, fires, status, \
     trigger, reason, created_at, started_at, ended_at, attempts, exit_code, http_status, error, output, pid, \
     pgid, process_start_ticks, incarnation) ";
pub(super) const RUN_VALUES: &str =
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, NULL, NULL, NULL, $18";

/// Inserts a run; a scheduled fire also moves the job's cursor. A starting
/// scheduled run over the job's `max_runs` is stored as skipped and
/// reported as [`Conflict::LimitReached`].
///
/// On a shared database (`shared`) this is a claim: see
/// [`super::claims::claim`].
pub(super) fn insert(c: &mut dyn Tx, run: &Run, outbox: bool, shared: Option<Shared>) -> Applied<()> {
    if let Some(shared) = shared {
        return super::claims::claim(c, run, outbox, shared.guard);
    }
    match c.execute(
        &format!("{INSERT_RUN} VALUES ({RUN_VALUES}) ON CONFLICT DO NOTHING"),
        &run_values(run),
    ) {
        Ok(0) => return Err(StoreError::Conflict(Conflict::DuplicateFire)),
        Ok(_) => {}
        // The job was deleted between the fire and this insert.
        Err(e) if is_foreign_key_violation(&e) => return Err(StoreError::Conflict(Conflict::NotFound)),
        Err(e) => return Err(e),
    }
    counters(c, run, outbox)
}

pub(super) fn run_values(run: &Run) -> Vec<Value> {
    Vec::from(values![
        run.id.to_string(),
        run.job_id.to_string(),
        &run.job_name,
        ms(run.scheduled_at),
        run.scheduled_until.map(ms),
        i64::from(run.fires),
        run.status.as_str(),
        run.trigger.as_str(),
        run.reason.map(crate::run::Reason::as_str),
        ms(run.created_at),
        run.started_at.map(ms),
        run.ended_at.map(ms),
        i64::from(run.attempts),
        run.exit_code,
        run.http_status.map(i64::from),
        run.error.clone(),
        run.output.clone(),
        run.incarnation.to_string(),
    ])
}

/// What moves with an inserted run: the outbox entry of a final row, the
/// job's cursor and its started-run count.
fn counters(c: &mut dyn Tx, run: &Run, outbox: bool) -> Applied<()> {
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
    let counted = first(
        c,
        "UPDATE jobs SET cursor_at = CASE WHEN cursor_at > $1 THEN cursor_at ELSE $1 END, \
         runs_started = runs_started + $2 WHERE id = $3 RETURNING runs_started, max_runs",
        &values![ms(handled_until), i64::from(starting), run.job_id.to_string()],
        |row| Ok((row.int(0)?, row.opt_int(1)?)),
    )?;
    let Some((started, max)) = counted.filter(|_| starting) else {
        return Ok(((), None));
    };
    limit(c, run, started, max, outbox)
}

/// After counting a start (`started` of the job's `max`): over the limit,
/// the count goes back and the run is stored as skipped
/// ([`Conflict::LimitReached`]); at it, the engine is told the job is
/// done.
pub(super) fn limit(c: &mut dyn Tx, run: &Run, started: i64, max: Option<i64>, outbox: bool) -> Applied<()> {
    match max {
        Some(max) if started > max => {
            c.execute(
                "UPDATE jobs SET runs_started = runs_started - 1 WHERE id = $1",
                &values![run.job_id.to_string()],
            )?;
            skip_for_limit(c, run.id, run.created_at, outbox)?;
            Err(StoreError::Conflict(Conflict::LimitReached))
        }
        Some(max) if started == max => {
            let job = load_job(c, run.job_id)?;
            Ok(((), Some(JobChange::Upserted(Arc::new(job)))))
        }
        _ => Ok(((), None)),
    }
}

/// Moves a queued run to running (same limit rule as [`insert`]).
pub(super) fn start(c: &mut dyn Tx, id: RunId, at: DateTime<Utc>, outbox: bool) -> Applied<()> {
    let row = first(
        c,
        "UPDATE runs SET status = 'running', started_at = $1 WHERE id = $2 AND status = 'queued' \
         RETURNING job_id, trigger",
        &values![ms(at), id.to_string()],
        |row| Ok((row.text(0)?, row.text(1)?)),
    )?;
    let Some((job, trigger)) = row else {
        return Err(final_or_missing(c, id));
    };
    let trigger: Trigger = trigger
        .parse()
        .map_err(|e| StoreError::corrupt("runs.trigger", e))?;
    let job = job_id(&job)?;
    if !counts_toward_limit(trigger) {
        return Ok(((), None));
    }
    match claim_start(c, job) {
        Ok(change) => Ok(((), change)),
        Err(StoreError::Conflict(Conflict::LimitReached)) => {
            skip_for_limit(c, id, at, outbox)?;
            Err(StoreError::Conflict(Conflict::LimitReached))
        }
        Err(e) => Err(e),
    }
}

/// Records attempts so far while a run with retries goes on.
pub(super) fn record_attempt(
    c: &mut dyn Tx,
    id: RunId,
    attempts: u32,
    log: &[Attempt],
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE runs SET attempts = $1, attempt_log = $2 WHERE id = $3 AND status = 'running'",
        &values![i64::from(attempts), attempt_log_json(log), id.to_string()],
    )?;
    Ok(())
}

/// Records the process a command run started.
pub(super) fn record_process(
    c: &mut dyn Tx,
    id: RunId,
    pid: i32,
    pgid: i32,
    start_ticks: Option<u64>,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE runs SET pid = $1, pgid = $2, process_start_ticks = $3 WHERE id = $4",
        &values![
            pid,
            pgid,
            start_ticks.and_then(|t| i64::try_from(t).ok()),
            id.to_string()
        ],
    )?;
    Ok(())
}

pub(super) fn final_or_missing(c: &mut dyn Tx, id: RunId) -> StoreError {
    let found = first(
        c,
        "SELECT 1 FROM runs WHERE id = $1",
        &values![id.to_string()],
        |_| Ok(()),
    );
    match found {
        Ok(Some(())) => StoreError::Conflict(Conflict::AlreadyFinal),
        Ok(None) => StoreError::Conflict(Conflict::NotFound),
        Err(e) => e,
    }
}

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

/// Marks every live run not owned by `current` as orphaned; returns them
/// as they were. With replicas (`expired_before`), only runs of
/// incarnations that are stopped or whose last heartbeat is not later than
/// `expired_before`; those incarnations are marked stopped first, which
/// fences them (their claims fail from now on).
pub(super) fn orphan_foreign(
    c: &mut dyn Tx,
    current: Incarnation,
    at: DateTime<Utc>,
    expired_before: Option<DateTime<Utc>>,
    outbox: bool,
) -> Result<Vec<Run>, StoreError> {
    let mut sql =
        format!("SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running') AND incarnation != $1");
    let mut params = Vec::from(values![current.to_string()]);
    if let Some(cutoff) = expired_before {
        c.execute(
            "UPDATE incarnations SET stopped_at = $1 WHERE stopped_at IS NULL AND heartbeat_at <= $2 AND id != $3",
            &values![ms(at), ms(cutoff), current.to_string()],
        )?;
        sql.push_str(" AND incarnation NOT IN (SELECT id FROM incarnations WHERE stopped_at IS NULL)");
    }
    // Run ids in order: replicas orphaning together lock rows in one order.
    sql.push_str(" ORDER BY id");
    let runs = all(c, &sql, &params, |row| rows::run(row))?;
    params.clear();
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
    c: &mut dyn Tx,
    id: RunId,
    at: DateTime<Utc>,
    error: &str,
    outbox: bool,
) -> Result<bool, StoreError> {
    let changed = c.execute(
        "UPDATE runs SET status = 'orphaned', ended_at = $1, error = $2 \
         WHERE id = $3 AND status IN ('queued', 'running')",
        &values![ms(at), error, id.to_string()],
    )?;
    let orphaned = changed == 1;
    if orphaned && outbox {
        super::outbox::record_run(c, id, at)?;
    }
    Ok(orphaned)
}

/// Run writes, as the store queues them.
pub enum RunOp {
    Insert {
        run: Run,
        /// Replicas: start only while fewer runs of the job than this are
        /// live on other replicas (the overlap policy across replicas).
        guard: Option<u32>,
        reply: Reply<()>,
    },
    Start {
        id: RunId,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    RecordAttempt {
        id: RunId,
        attempts: u32,
        log: Vec<Attempt>,
        reply: Reply<()>,
    },
    RecordProcess {
        id: RunId,
        pid: i32,
        pgid: i32,
        start_ticks: Option<u64>,
        reply: Reply<()>,
    },
    Finish {
        id: RunId,
        outcome: Outcome,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    OrphanForeign {
        current: Incarnation,
        at: DateTime<Utc>,
        /// Replicas: only runs of incarnations whose last heartbeat is not
        /// later than this (their lease expired), which are marked stopped.
        expired_before: Option<DateTime<Utc>>,
        reply: Reply<Vec<Run>>,
    },
    OrphanIfLive {
        id: RunId,
        at: DateTime<Utc>,
        error: String,
        reply: Reply<bool>,
    },
}

/// Applies one RunOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: RunOp, outbox: bool, shared: bool) -> Pending {
    match op {
        RunOp::Insert { run, guard, reply } => pending(
            reply,
            insert(tx, &run, outbox, shared.then_some(claims::Shared { guard })),
        ),
        RunOp::Start { id, at, reply } => pending(reply, start(tx, id, at, outbox)),
        RunOp::RecordAttempt {
            id,
            attempts,
            log,
            reply,
        } => pending(reply, plain(record_attempt(tx, id, attempts, &log))),
        RunOp::RecordProcess {
            id,
            pid,
            pgid,
            start_ticks,
            reply,
        } => pending(reply, plain(record_process(tx, id, pid, pgid, start_ticks))),
        RunOp::Finish {
            id,
            outcome,
            at,
            reply,
        } => pending(reply, finish(tx, id, outcome, at, outbox, shared)),
        RunOp::OrphanForeign {
            current,
            at,
            expired_before,
            reply,
        } => pending(
            reply,
            plain(orphan_foreign(tx, current, at, expired_before, outbox)),
        ),
        RunOp::OrphanIfLive { id, at, error, reply } => {
            pending(reply, plain(orphan_if_live(tx, id, at, &error, outbox)))
        }
    }
}

impl RunOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::Insert { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Start { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::RecordAttempt { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::RecordProcess { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Finish { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::OrphanForeign { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::OrphanIfLive { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
