//! The single writer: group commit of every write in the service.
//!
//! The task takes the first queued operation, then everything else already
//! queued (up to [`MAX_BATCH`]), applies them in one `BEGIN IMMEDIATE`
//! transaction and commits once. Callers get their result only after the
//! commit, so an acknowledged write is durable. Operations that can fail on
//! a constraint (job writes) run inside a savepoint, so one rejected
//! request never takes its neighbours in the batch down with it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::rows::{self, JOB_COLUMNS, RUN_COLUMNS, ms, spec_json};
use super::{JobChange, NewJob, Replacement, StoreError};
use crate::job::{Job, JobDefinition, JobId};
use crate::run::{Incarnation, Outcome, Run, RunId, RunStatus, Trigger};

/// Most operations committed in one transaction.
const MAX_BATCH: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One queued write.
pub enum Op {
    CreateJob {
        job: NewJob,
        reply: Reply<Arc<Job>>,
    },
    ReplaceJob {
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
    DeleteJob {
        id: JobId,
        reply: Reply<()>,
    },
    InsertRun {
        run: Run,
        reply: Reply<()>,
    },
    StartRun {
        id: RunId,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    RecordProcess {
        id: RunId,
        pid: i32,
        pgid: i32,
        start_ticks: Option<u64>,
        reply: Reply<()>,
    },
    FinishRun {
        id: RunId,
        outcome: Outcome,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    OrphanRunIfLive {
        id: RunId,
        at: DateTime<Utc>,
        error: String,
        reply: Reply<bool>,
    },
    OrphanForeignRuns {
        current: Incarnation,
        at: DateTime<Utc>,
        reply: Reply<Vec<Run>>,
    },
    RegisterIncarnation {
        id: Incarnation,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    /// Commit what came before, acknowledge, and stop.
    Close {
        reply: Reply<()>,
    },
    StopIncarnation {
        id: Incarnation,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
}

/// What to do once the batch's commit is known: reply, publish changes.
type Pending = Box<dyn FnOnce(Option<&str>, &mpsc::UnboundedSender<JobChange>) + Send>;

fn pending<T: Send + 'static>(
    reply: Reply<T>,
    result: Result<T, StoreError>,
    change: Option<JobChange>,
) -> Pending {
    Box::new(move |commit_error, changes| match commit_error {
        Some(e) => {
            let _ = reply.send(Err(StoreError::Corrupt(format!("commit failed: {e}"))));
        }
        None => {
            if result.is_ok()
                && let Some(change) = change
            {
                // The engine may be restarting; the change is then
                // covered by its reload from the store.
                let _ = changes.send(change);
            }
            let _ = reply.send(result);
        }
    })
}

/// The writer: owns the only write connection.
pub struct Writer {
    conn: SqliteConnection,
    rx: mpsc::UnboundedReceiver<Op>,
    changes: mpsc::UnboundedSender<JobChange>,
}

/// The writer's future, for the app to own and await at shutdown.
pub struct WriterTask(Writer);

impl WriterTask {
    /// Runs until [`super::Store::close`] (or until every handle is
    /// dropped), committing what was queued before; then closes the
    /// connection (checkpointing the WAL). Later writes fail with `Closed`.
    /// Stamps `heartbeat` at least every second, so a commit that hangs
    /// (a stuck disk) shows in liveness.
    pub async fn run(
        self,
        heartbeat: std::sync::Arc<crate::health::Heartbeat>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) {
        let mut w = self.0;
        let mut batch = Vec::with_capacity(64);
        loop {
            heartbeat.beat();
            let first = match tokio::time::timeout(std::time::Duration::from_secs(1), w.rx.recv()).await {
                Ok(Some(op)) => op,
                Ok(None) => break,
                Err(_) => continue,
            };
            batch.push(first);
            while batch.len() < MAX_BATCH && !matches!(batch.last(), Some(Op::Close { .. })) {
                match w.rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let closing = matches!(batch.last(), Some(Op::Close { .. }));
            let started = std::time::Instant::now();
            let ok = w.commit(&mut batch).await;
            metrics.commit(started.elapsed(), ok, w.rx.len());
            if closing {
                break;
            }
        }
        if let Err(e) = w.conn.close().await {
            tracing::warn!(error = %e, "closing the database connection failed");
        }
    }
}

impl Writer {
    pub(super) fn new(
        conn: SqliteConnection,
        rx: mpsc::UnboundedReceiver<Op>,
        changes: mpsc::UnboundedSender<JobChange>,
    ) -> Self {
        Self { conn, rx, changes }
    }

    pub(super) fn into_task(self) -> WriterTask {
        WriterTask(self)
    }

    /// Applies and commits `batch`; `false` if the commit failed.
    async fn commit(&mut self, batch: &mut Vec<Op>) -> bool {
        let mut done: Vec<Pending> = Vec::with_capacity(batch.len());
        let outcome = async {
            let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
            for op in batch.drain(..) {
                done.push(apply(&mut tx, op).await);
            }
            tx.commit().await
        }
        .await;
        let error = outcome.err().map(|e| {
            tracing::error!(error = %e, ops = done.len(), "group commit failed");
            e.to_string()
        });
        // Ops never reached (BEGIN failed) are dropped: their callers see
        // `Closed`-like errors from the dropped reply channel.
        batch.clear();
        for d in done {
            d(error.as_deref(), &self.changes);
        }
        error.is_none()
    }
}

async fn apply(tx: &mut Transaction<'_, Sqlite>, op: Op) -> Pending {
    match op {
        Op::CreateJob { job, reply } => {
            let result = savepoint(tx, |c| Box::pin(create_job(c, job))).await;
            let change = result.as_ref().ok().map(|j| JobChange::Upserted(j.clone()));
            pending(reply, result, change)
        }
        Op::ReplaceJob { replacement, reply } => {
            let result = savepoint(tx, |c| Box::pin(replace_job(c, replacement))).await;
            let change = result.as_ref().ok().map(|j| JobChange::Upserted(j.clone()));
            pending(reply, result, change)
        }
        Op::SetPaused {
            id,
            paused,
            note,
            now,
            reply,
        } => {
            let result = savepoint(tx, |c| Box::pin(set_paused(c, id, paused, note, now))).await;
            let change = result.as_ref().ok().map(|j| JobChange::Upserted(j.clone()));
            pending(reply, result, change)
        }
        Op::DeleteJob { id, reply } => {
            let result = sqlx::query("DELETE FROM jobs WHERE id = ?")
                .bind(id.to_string())
                .execute(&mut **tx)
                .await
                .map_err(StoreError::from)
                .and_then(|r| {
                    if r.rows_affected() == 0 {
                        Err(StoreError::NotFound)
                    } else {
                        Ok(())
                    }
                });
            let change = result.as_ref().ok().map(|()| JobChange::Removed(id));
            pending(reply, result, change)
        }
        Op::InsertRun { run, reply } => pending(reply, insert_run(tx, &run).await, None),
        Op::StartRun { id, at, reply } => {
            let result = sqlx::query(
                "UPDATE runs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
            )
            .bind(ms(at))
            .bind(id.to_string())
            .execute(&mut **tx)
            .await;
            let result = match result {
                Ok(r) if r.rows_affected() == 1 => Ok(()),
                Ok(_) => Err(final_or_missing(tx, id).await),
                Err(e) => Err(e.into()),
            };
            pending(reply, result, None)
        }
        Op::RecordProcess {
            id,
            pid,
            pgid,
            start_ticks,
            reply,
        } => {
            let result =
                sqlx::query("UPDATE runs SET pid = ?, pgid = ?, process_start_ticks = ? WHERE id = ?")
                    .bind(pid)
                    .bind(pgid)
                    .bind(start_ticks.and_then(|t| i64::try_from(t).ok()))
                    .bind(id.to_string())
                    .execute(&mut **tx)
                    .await
                    .map(|_| ())
                    .map_err(StoreError::from);
            pending(reply, result, None)
        }
        Op::FinishRun {
            id,
            outcome,
            at,
            reply,
        } => pending(reply, finish_run(tx, id, outcome, at).await, None),
        Op::OrphanForeignRuns { current, at, reply } => {
            pending(reply, orphan_foreign_runs(tx, current, at).await, None)
        }
        Op::OrphanRunIfLive { id, at, error, reply } => {
            let result = sqlx::query(
                "UPDATE runs SET status = 'orphaned', ended_at = ?, error = ? \
                 WHERE id = ? AND status IN ('queued', 'running')",
            )
            .bind(ms(at))
            .bind(error)
            .bind(id.to_string())
            .execute(&mut **tx)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(StoreError::from);
            pending(reply, result, None)
        }
        Op::RegisterIncarnation { id, at, reply } => {
            let result = sqlx::query(
                "INSERT INTO incarnations (id, pid, version, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id.to_string())
            .bind(i64::from(std::process::id()))
            .bind(env!("CARGO_PKG_VERSION"))
            .bind(ms(at))
            .bind(ms(at))
            .execute(&mut **tx)
            .await
            .map(|_| ())
            .map_err(StoreError::from);
            pending(reply, result, None)
        }
        Op::StopIncarnation { id, at, reply } => {
            let result = sqlx::query("UPDATE incarnations SET stopped_at = ? WHERE id = ?")
                .bind(ms(at))
                .bind(id.to_string())
                .execute(&mut **tx)
                .await
                .map(|_| ())
                .map_err(StoreError::from);
            pending(reply, result, None)
        }
        Op::Close { reply } => pending(reply, Ok(()), None),
    }
}

/// Runs `f` inside a savepoint: all of its writes or none.
async fn savepoint<T>(
    tx: &mut Transaction<'_, Sqlite>,
    f: impl for<'c> FnOnce(&'c mut SqliteConnection) -> futures_util::future::BoxFuture<'c, Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut sp = tx.begin().await?;
    match f(&mut sp).await {
        Ok(v) => {
            sp.commit().await?;
            Ok(v)
        }
        Err(e) => {
            sp.rollback().await?;
            Err(e)
        }
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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

async fn create_job(c: &mut SqliteConnection, job: NewJob) -> Result<Arc<Job>, StoreError> {
    let name = job.def.spec.name.clone();
    let result = sqlx::query(
        "INSERT INTO jobs (id, name, spec, paused, pause_note, source, version, created_at, updated_at, cursor_at) \
         VALUES (?, ?, ?, ?, NULL, ?, 1, ?, ?, ?)",
    )
    .bind(job.id.to_string())
    .bind(&name)
    .bind(spec_json(&job.def.spec)?)
    .bind(job.paused)
    .bind(job.source.as_str())
    .bind(ms(job.now))
    .bind(ms(job.now))
    .bind(ms(job.now))
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
    }))
}

async fn load_job(c: &mut SqliteConnection, id: JobId) -> Result<Job, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
    )))
    .bind(id.to_string())
    .fetch_optional(&mut *c)
    .await?
    .ok_or(StoreError::NotFound)?;
    rows::job(&row)
}

async fn replace_job(c: &mut SqliteConnection, r: Replacement) -> Result<Arc<Job>, StoreError> {
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
    let rescheduled = r.def.spec.schedule != current.def.spec.schedule || (current.paused && !paused);
    let cursor_at = if rescheduled { r.now } else { current.cursor_at };
    let pause_note = if paused { current.pause_note.clone() } else { None };
    let name = r.def.spec.name.clone();
    let result = sqlx::query(
        "UPDATE jobs SET name = ?, spec = ?, paused = ?, pause_note = ?, version = version + 1, \
         updated_at = ?, cursor_at = ? WHERE id = ?",
    )
    .bind(&name)
    .bind(spec_json(&r.def.spec)?)
    .bind(paused)
    .bind(&pause_note)
    .bind(ms(r.now))
    .bind(ms(cursor_at))
    .bind(r.id.to_string())
    .execute(&mut *c)
    .await;
    match result {
        Err(e) if is_unique_violation(&e) => return Err(StoreError::NameTaken(name)),
        r => r?,
    };
    write_labels(c, r.id, &r.def).await?;
    let mut def = r.def;
    def.spec.paused = None;
    Ok(Arc::new(Job {
        def,
        paused,
        pause_note,
        version: current.version + 1,
        updated_at: r.now,
        cursor_at,
        ..current
    }))
}

async fn set_paused(
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
    let cursor_at = if current.paused && !paused {
        now
    } else {
        current.cursor_at
    };
    sqlx::query(
        "UPDATE jobs SET paused = ?, pause_note = ?, version = version + 1, updated_at = ?, cursor_at = ? WHERE id = ?",
    )
    .bind(paused)
    .bind(&note)
    .bind(ms(now))
    .bind(ms(cursor_at))
    .bind(id.to_string())
    .execute(&mut *c)
    .await?;
    Ok(Arc::new(Job {
        paused,
        pause_note: note,
        version: current.version + 1,
        updated_at: now,
        cursor_at,
        ..current
    }))
}

async fn insert_run(tx: &mut Transaction<'_, Sqlite>, run: &Run) -> Result<(), StoreError> {
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
    if matches!(run.trigger, Trigger::Schedule | Trigger::CatchUp) {
        let handled_until = run.scheduled_until.unwrap_or(run.scheduled_at);
        sqlx::query("UPDATE jobs SET cursor_at = MAX(cursor_at, ?) WHERE id = ?")
            .bind(ms(handled_until))
            .bind(run.job_id.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

async fn final_or_missing(tx: &mut Transaction<'_, Sqlite>, id: RunId) -> StoreError {
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

async fn finish_run(
    tx: &mut Transaction<'_, Sqlite>,
    id: RunId,
    o: Outcome,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    debug_assert!(o.status.is_final());
    let result = sqlx::query(
        "UPDATE runs SET status = ?, reason = ?, ended_at = ?, attempts = ?, exit_code = ?, http_status = ?, \
         error = ?, output = ? WHERE id = ? AND status IN ('queued', 'running')",
    )
    .bind(o.status.as_str())
    .bind(o.reason.map(|r| r.as_str()))
    .bind(ms(at))
    .bind(i64::from(o.attempts))
    .bind(o.exit_code)
    .bind(o.http_status.map(i64::from))
    .bind(&o.error)
    .bind(&o.output)
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    if result.rows_affected() == 1 {
        Ok(())
    } else {
        Err(final_or_missing(tx, id).await)
    }
}

async fn orphan_foreign_runs(
    tx: &mut Transaction<'_, Sqlite>,
    current: Incarnation,
    at: DateTime<Utc>,
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
        sqlx::query("UPDATE runs SET status = ?, ended_at = ?, error = ? WHERE id = ?")
            .bind(RunStatus::Orphaned.as_str())
            .bind(ms(at))
            .bind(error)
            .bind(run.id.to_string())
            .execute(&mut **tx)
            .await?;
    }
    Ok(runs)
}
