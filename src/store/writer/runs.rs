//! Run writes, and the job counters that move with them in the same
//! transaction: the schedule cursor and the started-run count
//! (`max_runs`). How runs end is in `endings.rs`.

use std::sync::Arc;

use super::{Applied, load_job};
use crate::events::{Event, Kind};
use crate::job::JobId;
use crate::run::{Attempt, Incarnation, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::Conflict;
use crate::store::rows::{self, RUN_COLUMNS, attempt_log_json, ms};
use crate::store::sql::{Tx, Value, all, first, is_foreign_key_violation, values};
use crate::store::{JobChange, StoreError};
use chrono::{DateTime, Utc};

/// Whether runs of this trigger count toward `max_runs` (manual runs do not).
pub(super) fn counts_toward_limit(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Schedule | Trigger::CatchUp)
}

pub(super) fn job_id(text: &str) -> Result<JobId, StoreError> {
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
/// (On a shared database a run is claimed instead: see
/// [`super::claims::claim`].)
pub(super) fn insert(c: &mut dyn Tx, run: &Run, outbox: bool) -> Applied<()> {
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

/// What a newly stored run tells: its event on the live feed, and for a
/// `missed` one the job's notifications.
pub(super) fn inserted(c: &mut dyn Tx, run: &Run) -> Result<(), StoreError> {
    let kind = match run.status {
        RunStatus::Queued => Kind::RunQueued,
        RunStatus::Running => Kind::RunStarted,
        RunStatus::Skipped => Kind::RunSkipped,
        RunStatus::Missed => Kind::RunMissed,
        RunStatus::Orphaned => Kind::RunOrphaned,
        _ => Kind::RunFinished,
    };
    let mut event = Event::new(kind, run.created_at)
        .job(run.job_id)
        .name(run.job_name.clone())
        .run(run.id)
        .status(run.status.as_str());
    event.detail = run.error.as_deref().map(crate::standing::error_line);
    c.stage(event);
    if run.status != RunStatus::Missed {
        return Ok(());
    }
    let job_id = run.job_id.to_string();
    super::notices::record(
        c,
        super::notices::Notice {
            event: crate::notification::Event::Missed,
            job_id: &job_id,
            job_name: &run.job_name,
            run: Some(run.id),
            first: true,
            detail: run.error.as_deref().map(crate::standing::error_line),
            at: run.created_at,
        },
    )
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
    inserted(c, run)?;
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
         RETURNING job_id, trigger, job_name",
        &values![ms(at), id.to_string()],
        |row| Ok((row.text(0)?, row.text(1)?, row.text(2)?)),
    )?;
    let Some((job, trigger, name)) = row else {
        return Err(final_or_missing(c, id));
    };
    let trigger: Trigger = trigger
        .parse()
        .map_err(|e| StoreError::corrupt("runs.trigger", e))?;
    let job = job_id(&job)?;
    c.stage(
        Event::new(Kind::RunStarted, at)
            .job(job)
            .name(name)
            .run(id)
            .status("running"),
    );
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
    let job = first(
        c,
        "UPDATE runs SET attempts = $1, attempt_log = $2 WHERE id = $3 AND status = 'running' \
         RETURNING job_id, job_name",
        &values![i64::from(attempts), attempt_log_json(log), id.to_string()],
        |row| Ok((row.text(0)?, row.text(1)?)),
    )?;
    if let (Some((job, name)), Some(last)) = (job, log.last()) {
        let mut event = Event::new(Kind::RunAttempt, last.ended_at)
            .job(job_id(&job)?)
            .name(name)
            .run(id)
            .status(last.status.as_str());
        event.detail = last.error.as_deref().map(crate::standing::error_line);
        c.stage(event);
    }
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

/// Marks one run `orphaned` if it is still live (and records the event
/// for its job's notifications); whether it was.
pub(super) fn orphan_if_live(
    c: &mut dyn Tx,
    id: RunId,
    at: DateTime<Utc>,
    error: &str,
    outbox: bool,
) -> Result<bool, StoreError> {
    let orphaned = first(
        c,
        "UPDATE runs SET status = 'orphaned', ended_at = $1, error = $2 \
         WHERE id = $3 AND status IN ('queued', 'running') RETURNING job_id, job_name",
        &values![ms(at), error, id.to_string()],
        |row| Ok((row.text(0)?, row.text(1)?)),
    )?;
    let Some((job_id_text, job_name)) = orphaned else {
        return Ok(false);
    };
    if outbox {
        super::outbox::record_run(c, id, at)?;
    }
    c.stage(
        Event::new(Kind::RunOrphaned, at)
            .job(job_id(&job_id_text)?)
            .name(job_name.clone())
            .run(id)
            .status("orphaned")
            .detail(crate::standing::error_line(error)),
    );
    super::notices::record(
        c,
        super::notices::Notice {
            event: crate::notification::Event::Orphaned,
            job_id: &job_id_text,
            job_name: &job_name,
            run: Some(id),
            first: true,
            detail: Some(crate::standing::error_line(error)),
            at,
        },
    )?;
    Ok(true)
}

/// Why a run could not be started or ended: it is final already, or gone.
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
