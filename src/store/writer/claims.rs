//! Claims: run inserts on a database shared by replicas. The run row is
//! the claim — a unique `(job, scheduled_at)` row inserted once, fenced by
//! the claiming incarnation and guarded by the overlap policy across
//! replicas (`docs/scaling.md`, `docs/decisions.md`).

use super::Applied;
use super::runs::{self, INSERT_RUN, RUN_VALUES};
use crate::run::{Reason, Run, RunStatus};
use crate::store::Conflict;
use crate::store::StoreError;
use crate::store::rows::ms;
use crate::store::sql::{Tx, Value, first, values};

/// Inserts `run` on a shared database (replicas), in two round trips.
///
/// The first statement locks the job's row (`FOR NO KEY UPDATE`, the lock
/// an `UPDATE` takes: run inserts' foreign-key checks do not wait on it),
/// so a concurrent delete on
/// another replica makes this [`Conflict::NotFound`] and claims of one
/// job by two replicas are serialised; for a scheduled or catch-up fire
/// it also moves the cursor and counts the start (the common case of
/// every fire), and returns the cursor it had so that a refused claim can
/// put it back. The insert is its own statement after it: its snapshot is
/// then taken after the lock, so the overlap guard sees the runs another
/// replica committed while this one waited (one statement would check a
/// snapshot from before the wait). The insert requires that this
/// incarnation was not declared stopped ([`Conflict::Fenced`]) and, with
/// a guard, that the job has fewer live runs on other replicas than the
/// guard: otherwise the fire is recorded as `skipped` (`overlap`) and
/// reported as [`Conflict::Overlap`].
pub(super) fn claim(c: &mut dyn Tx, run: &Run, outbox: bool, guard: Option<u32>) -> Applied<()> {
    let counted = runs::counts_toward_limit(run.trigger);
    let starting = counted && run.status == RunStatus::Running;
    let job = run.job_id.to_string();
    let locked = first(
        c,
        "UPDATE jobs AS j SET cursor_at = CASE WHEN $1 = 0 OR o.cursor_at > $2 THEN o.cursor_at ELSE $2 END, \
         runs_started = o.runs_started + $3 \
         FROM (SELECT id, cursor_at, runs_started FROM jobs WHERE id = $4 FOR NO KEY UPDATE) AS o \
         WHERE j.id = o.id RETURNING o.cursor_at, j.runs_started, j.max_runs",
        &values![
            i64::from(counted),
            ms(run.scheduled_until.unwrap_or(run.scheduled_at)),
            i64::from(starting),
            &job
        ],
        |row| Ok((row.opt_int(0)?, row.int(1)?, row.opt_int(2)?)),
    )?;
    let Some((cursor, started, max)) = locked else {
        return Err(StoreError::Conflict(Conflict::NotFound));
    };
    let mut values = runs::run_values(run);
    let mut sql = format!(
        "{INSERT_RUN} SELECT {RUN_VALUES} WHERE EXISTS \
         (SELECT 1 FROM incarnations WHERE id = $18 AND stopped_at IS NULL)"
    );
    if let Some(guard) = guard {
        sql.push_str(
            " AND (SELECT COUNT(*) FROM runs WHERE job_id = $2 AND status IN ('queued', 'running') \
             AND incarnation != $18) < $19",
        );
        values.push(Value::from(i64::from(guard)));
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    if c.execute(&sql, &values)? == 0 {
        if counted {
            // Refused: the cursor and the count go back to what they were
            // (a fenced replica must not move the cursor of a job another
            // replica now plans from it).
            c.execute(
                "UPDATE jobs SET cursor_at = $1, runs_started = runs_started - $2 WHERE id = $3",
                &values![cursor, i64::from(starting), &job],
            )?;
        }
        return contested(c, run, outbox);
    }
    if outbox && run.status.is_final() {
        super::outbox::record_run(c, run.id, run.created_at)?;
    }
    runs::inserted(c, run)?;
    if !starting {
        return Ok(((), None));
    }
    runs::limit(c, run, started, max, outbox)
}

/// Why a claim inserted nothing: the fire was claimed already, this
/// incarnation was fenced, or (guarded) another replica runs the job, in
/// which case the fire is recorded as skipped.
fn contested(c: &mut dyn Tx, run: &Run, outbox: bool) -> Applied<()> {
    let (claimed, alive) = first(
        c,
        "SELECT (SELECT COUNT(*) FROM runs WHERE job_id = $1 AND scheduled_at = $2 \
           AND trigger IN ('schedule', 'catch_up') AND $3 IN ('schedule', 'catch_up')), \
         (SELECT COUNT(*) FROM incarnations WHERE id = $4 AND stopped_at IS NULL)",
        &values![
            run.job_id.to_string(),
            ms(run.scheduled_at),
            run.trigger.as_str(),
            run.incarnation.to_string()
        ],
        |row| Ok((row.int(0)?, row.int(1)?)),
    )?
    .unwrap_or((0, 0));
    if claimed > 0 {
        return Err(StoreError::Conflict(Conflict::DuplicateFire));
    }
    if alive == 0 {
        return Err(StoreError::Conflict(Conflict::Fenced));
    }
    let mut skipped = run.clone();
    skipped.status = RunStatus::Skipped;
    skipped.reason = Some(Reason::Overlap);
    skipped.started_at = None;
    skipped.ended_at = Some(run.created_at);
    skipped.error = Some("a run of this job is live on another replica".to_owned());
    claim(c, &skipped, outbox, None)?;
    Err(StoreError::Conflict(Conflict::Overlap))
}
