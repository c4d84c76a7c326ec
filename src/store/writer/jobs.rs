//! Job writes: create, replace, pause/resume, delete.

use std::sync::Arc;

use super::{Pending, Reply, load_job, pending, upserted};
use crate::events::{Event, Kind};
use crate::job::{Job, JobDefinition, JobId};
use crate::store::Conflict;
use crate::store::JobChange;
use crate::store::rows::{ms, spec_json};
use crate::store::sql::savepoint;
use crate::store::sql::{Tx, all, is_unique_violation, values};
use crate::store::{NewJob, Replacement, StoreError};
use chrono::{DateTime, Utc};

/// The feed's event for a job as now stored.
fn job_event(kind: Kind, job: &Job) -> Event {
    Event::new(kind, job.updated_at)
        .job(job.id)
        .name(job.def.spec.name.clone())
}

/// The policy values the store acts on itself, copied into columns:
/// `max_runs`, `auto_pause_after`, history `keep_last` and `max_age` (ms).
struct Limits {
    max_runs: Option<i64>,
    auto_pause_after: Option<i64>,
    keep_last: Option<i64>,
    max_age_ms: Option<i64>,
}

fn limits(def: &JobDefinition) -> Limits {
    let policy = &def.policy;
    Limits {
        max_runs: policy.max_runs.and_then(|n| i64::try_from(n).ok()),
        auto_pause_after: policy.auto_pause_after.map(i64::from),
        keep_last: policy.history.keep_last.map(i64::from),
        max_age_ms: policy.history.max_age.map(|d| d.as_millis() as i64),
    }
}

fn write_labels(c: &mut dyn Tx, id: JobId, def: &JobDefinition) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM job_labels WHERE job_id = $1",
        &values![id.to_string()],
    )?;
    for (key, value) in &def.spec.labels {
        c.execute(
            "INSERT INTO job_labels (job_id, key, value) VALUES ($1, $2, $3)",
            &values![id.to_string(), key, value],
        )?;
    }
    Ok(())
}

pub(super) fn create(c: &mut dyn Tx, job: NewJob) -> Result<Arc<Job>, StoreError> {
    let name = job.def.spec.name.clone();
    let limits = limits(&job.def);
    let result = c.execute(
        "INSERT INTO jobs (id, name, spec, paused, pause_note, source, version, created_at, updated_at, cursor_at, \
         max_runs, auto_pause_after, history_keep_last, history_max_age_ms) \
         VALUES ($1, $2, $3, $4, NULL, $5, 1, $6, $6, $6, $7, $8, $9, $10)",
        &values![
            job.id.to_string(),
            &name,
            spec_json(&job.def.spec)?,
            job.paused,
            job.source.as_str(),
            ms(job.now),
            limits.max_runs,
            limits.auto_pause_after,
            limits.keep_last,
            limits.max_age_ms,
        ],
    );
    match result {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict(Conflict::NameTaken(name))),
        r => r?,
    };
    if !job.def.spec.labels.is_empty() {
        write_labels(c, job.id, &job.def)?;
    }
    let mut def = job.def;
    def.spec.paused = None;
    Ok(Arc::new(Job {
        id: job.id,
        def,
        paused: job.paused,
        pause_note: None,
        source: job.source,
        version: 1,
        created_at: job.now,
        updated_at: job.now,
        cursor_at: job.now,
        runs_started: 0,
    }))
}

pub(super) fn replace(c: &mut dyn Tx, r: Replacement) -> Result<Arc<Job>, StoreError> {
    let current = load_job(c, r.id)?;
    if let Some(expected) = r.expected_version
        && expected != current.version
    {
        return Err(StoreError::Conflict(Conflict::VersionMismatch {
            expected,
            current: current.version,
        }));
    }
    let paused = r.paused.unwrap_or(current.paused);
    // A new schedule, or a resume, starts from now: changes apply to the
    // next fire and never replay the past.
    let resumed = current.paused && !paused;
    let rescheduled = r.def.spec.schedule != current.def.spec.schedule || resumed;
    let cursor_at = if rescheduled { r.now } else { current.cursor_at };
    let pause_note = if paused { current.pause_note.clone() } else { None };
    let name = r.def.spec.name.clone();
    let limits = limits(&r.def);
    let result = c.execute(
        "UPDATE jobs SET name = $1, spec = $2, paused = $3, pause_note = $4, version = version + 1, \
         updated_at = $5, cursor_at = $6, max_runs = $7, auto_pause_after = $8, history_keep_last = $9, \
         history_max_age_ms = $10, consecutive_failures = CASE WHEN $11 = 1 THEN 0 ELSE consecutive_failures END \
         WHERE id = $12",
        &values![
            &name,
            spec_json(&r.def.spec)?,
            paused,
            pause_note,
            ms(r.now),
            ms(cursor_at),
            limits.max_runs,
            limits.auto_pause_after,
            limits.keep_last,
            limits.max_age_ms,
            resumed,
            r.id.to_string(),
        ],
    );
    match result {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict(Conflict::NameTaken(name))),
        r => r?,
    };
    write_labels(c, r.id, &r.def)?;
    load_job(c, r.id).map(Arc::new)
}

/// Pauses (keeping or setting a note) or resumes. Resuming moves the
/// cursor to `now` and clears the consecutive-failure count.
pub(super) fn set_paused(
    c: &mut dyn Tx,
    id: JobId,
    paused: bool,
    note: Option<String>,
    now: DateTime<Utc>,
) -> Result<(Arc<Job>, bool), StoreError> {
    let current = load_job(c, id)?;
    let note = if paused {
        note.or(current.pause_note.clone())
    } else {
        None
    };
    if current.paused == paused && current.pause_note == note {
        return Ok((Arc::new(current), false));
    }
    let resumed = current.paused && !paused;
    let cursor_at = if resumed { now } else { current.cursor_at };
    c.execute(
        "UPDATE jobs SET paused = $1, pause_note = $2, version = version + 1, updated_at = $3, cursor_at = $4, \
         consecutive_failures = CASE WHEN $5 = 1 THEN 0 ELSE consecutive_failures END WHERE id = $6",
        &values![paused, note, ms(now), ms(cursor_at), resumed, id.to_string()],
    )?;
    Ok((Arc::new(load_job(c, id)?), current.paused != paused))
}

pub(super) fn delete(c: &mut dyn Tx, id: JobId, at: DateTime<Utc>, outbox: bool) -> Result<(), StoreError> {
    if outbox {
        // The rows go with the job: report its live runs first.
        let live = all(
            c,
            "UPDATE runs SET status = 'cancelled', reason = 'job_deleted', ended_at = $1, \
             error = 'the job was deleted' WHERE job_id = $2 AND status IN ('queued', 'running') RETURNING id",
            &values![ms(at), id.to_string()],
            |row| row.text(0),
        )?;
        for run in live {
            let run = run
                .parse()
                .map_err(|_| StoreError::corrupt("run id", format!("`{run}` does not parse")))?;
            super::outbox::record_run(c, run, at)?;
        }
    }
    // Lock order, for replicas on one database: a run's end locks the run
    // and then its job; so does this, before the cascade (no deadlock).
    c.execute(
        "UPDATE runs SET status = status WHERE job_id = $1 AND status IN ('queued', 'running')",
        &values![id.to_string()],
    )?;
    let deleted = c.execute("DELETE FROM jobs WHERE id = $1", &values![id.to_string()])?;
    if deleted == 0 {
        Err(StoreError::Conflict(Conflict::NotFound))
    } else {
        Ok(())
    }
}

/// Job writes, as the store queues them.
pub enum JobOp {
    Create {
        job: NewJob,
        reply: Reply<Arc<Job>>,
    },
    Replace {
        replacement: Replacement,
        reply: Reply<Arc<Job>>,
    },
    SetPaused {
        id: JobId,
        paused: bool,
        note: Option<String>,
        now: DateTime<Utc>,
        reply: Reply<Arc<Job>>,
    },
    Delete {
        id: JobId,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
}

/// Applies one JobOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: JobOp, outbox: bool) -> Pending {
    match op {
        JobOp::Create { job, reply } => {
            let result = savepoint(tx, |c| create(c, job));
            if let Ok(job) = &result {
                tx.stage(job_event(Kind::JobCreated, job));
            }
            pending(reply, result.map(upserted))
        }
        JobOp::Replace { replacement, reply } => {
            let result = savepoint(tx, |c| replace(c, replacement));
            if let Ok(job) = &result {
                tx.stage(job_event(Kind::JobUpdated, job));
            }
            pending(reply, result.map(upserted))
        }
        JobOp::SetPaused {
            id,
            paused,
            note,
            now,
            reply,
        } => {
            let result = savepoint(tx, |c| set_paused(c, id, paused, note, now));
            if let Ok((job, true)) = &result {
                let kind = if job.paused {
                    Kind::JobPaused
                } else {
                    Kind::JobResumed
                };
                let mut event = job_event(kind, job);
                event.detail.clone_from(&job.pause_note);
                tx.stage(event);
            }
            pending(reply, result.map(|(job, _)| upserted(job)))
        }
        JobOp::Delete { id, at, reply } => {
            let result = delete(tx, id, at, outbox);
            if result.is_ok() {
                tx.stage(Event::new(Kind::JobDeleted, at).job(id));
            }
            pending(reply, result.map(|()| ((), Some(JobChange::Removed(id)))))
        }
    }
}

impl JobOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::Create { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Replace { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::SetPaused { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Delete { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
