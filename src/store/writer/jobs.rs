//! Job writes: create, replace, pause/resume, delete.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Sqlite, Transaction};

use super::load_job;
use crate::job::{Job, JobDefinition, JobId};
use crate::store::rows::{ms, spec_json};
use crate::store::{NewJob, Replacement, StoreError};

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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

async fn write_labels(c: &mut SqliteConnection, id: JobId, def: &JobDefinition) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM job_labels WHERE job_id = ?")
        .bind(id.to_string())
        .execute(&mut *c)
        .await?;
    for (key, value) in &def.spec.labels {
        sqlx::query("INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)")
            .bind(id.to_string())
            .bind(key)
            .bind(value)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

pub(super) async fn create(c: &mut SqliteConnection, job: NewJob) -> Result<Arc<Job>, StoreError> {
    let name = job.def.spec.name.clone();
    let limits = limits(&job.def);
    let result = sqlx::query(
        "INSERT INTO jobs (id, name, spec, paused, pause_note, source, version, created_at, updated_at, cursor_at, \
         max_runs, auto_pause_after, history_keep_last, history_max_age_ms) \
         VALUES (?, ?, ?, ?, NULL, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(job.id.to_string())
    .bind(&name)
    .bind(spec_json(&job.def.spec)?)
    .bind(job.paused)
    .bind(job.source.as_str())
    .bind(ms(job.now))
    .bind(ms(job.now))
    .bind(ms(job.now))
    .bind(limits.max_runs)
    .bind(limits.auto_pause_after)
    .bind(limits.keep_last)
    .bind(limits.max_age_ms)
    .execute(&mut *c)
    .await;
    match result {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::NameTaken(name)),
        r => r?,
    };
    write_labels(c, job.id, &job.def).await?;
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

pub(super) async fn replace(c: &mut SqliteConnection, r: Replacement) -> Result<Arc<Job>, StoreError> {
    let current = load_job(c, r.id).await?;
    if let Some(expected) = r.expected_version
        && expected != current.version
    {
        return Err(StoreError::VersionMismatch {
            expected,
            current: current.version,
        });
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
    let result = sqlx::query(
        "UPDATE jobs SET name = ?, spec = ?, paused = ?, pause_note = ?, version = version + 1, \
         updated_at = ?, cursor_at = ?, max_runs = ?, auto_pause_after = ?, history_keep_last = ?, \
         history_max_age_ms = ?, consecutive_failures = CASE WHEN ? THEN 0 ELSE consecutive_failures END \
         WHERE id = ?",
    )
    .bind(&name)
    .bind(spec_json(&r.def.spec)?)
    .bind(paused)
    .bind(&pause_note)
    .bind(ms(r.now))
    .bind(ms(cursor_at))
    .bind(limits.max_runs)
    .bind(limits.auto_pause_after)
    .bind(limits.keep_last)
    .bind(limits.max_age_ms)
    .bind(resumed)
    .bind(r.id.to_string())
    .execute(&mut *c)
    .await;
    match result {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::NameTaken(name)),
        r => r?,
    };
    write_labels(c, r.id, &r.def).await?;
    load_job(c, r.id).await.map(Arc::new)
}

/// Pauses (keeping or setting a note) or resumes. Resuming moves the
/// cursor to `now` and clears the consecutive-failure count.
pub(super) async fn set_paused(
    c: &mut SqliteConnection,
    id: JobId,
    paused: bool,
    note: Option<String>,
    now: DateTime<Utc>,
) -> Result<Arc<Job>, StoreError> {
    let current = load_job(c, id).await?;
    let note = if paused {
        note.or(current.pause_note.clone())
    } else {
        None
    };
    if current.paused == paused && current.pause_note == note {
        return Ok(Arc::new(current));
    }
    let resumed = current.paused && !paused;
    let cursor_at = if resumed { now } else { current.cursor_at };
    sqlx::query(
        "UPDATE jobs SET paused = ?, pause_note = ?, version = version + 1, updated_at = ?, cursor_at = ?, \
         consecutive_failures = CASE WHEN ? THEN 0 ELSE consecutive_failures END WHERE id = ?",
    )
    .bind(paused)
    .bind(&note)
    .bind(ms(now))
    .bind(ms(cursor_at))
    .bind(resumed)
    .bind(id.to_string())
    .execute(&mut *c)
    .await?;
    load_job(c, id).await.map(Arc::new)
}

pub(super) async fn delete(
    tx: &mut Transaction<'_, Sqlite>,
    id: JobId,
    at: DateTime<Utc>,
    outbox: bool,
) -> Result<(), StoreError> {
    if outbox {
        // The rows go with the job: report its live runs first.
        let live: Vec<(String,)> = sqlx::query_as(
            "UPDATE runs SET status = 'cancelled', reason = 'job_deleted', ended_at = ?, \
             error = 'the job was deleted' WHERE job_id = ? AND status IN ('queued', 'running') RETURNING id",
        )
        .bind(ms(at))
        .bind(id.to_string())
        .fetch_all(&mut **tx)
        .await?;
        for (run,) in live {
            let run = run
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("run id {run}")))?;
            super::outbox::record_run(tx, run, at).await?;
        }
    }
    let r = sqlx::query("DELETE FROM jobs WHERE id = ?")
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    if r.rows_affected() == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}
