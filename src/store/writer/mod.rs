//! The single writer: group commit of every write in the service.
//!
//! The task takes the first queued operation, then everything else already
//! queued (up to [`MAX_BATCH`]), applies them in one `BEGIN IMMEDIATE`
//! transaction and commits once. Callers get their result only after the
//! commit, so an acknowledged write is durable. Operations that can fail on
//! a constraint (job writes) run inside a savepoint, so one rejected
//! request never takes its neighbours in the batch down with it.

mod jobs;
mod outbox;
mod runs;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteConnection;
use sqlx::{Connection, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::rows::ms;
use super::{JobChange, NewJob, Replacement, StoreError};
use crate::job::{Job, JobId};
use crate::run::{Attempt, Incarnation, Outcome, Run, RunId};

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
        at: DateTime<Utc>,
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
    PruneJob {
        job: JobId,
        keep_last: Option<u32>,
        older_than: Option<DateTime<Utc>>,
        limit: u32,
        reply: Reply<u64>,
    },
    PruneOld {
        older_than: DateTime<Utc>,
        limit: u32,
        reply: Reply<u64>,
    },
    RecordRejection {
        rejection: crate::sync::protocol::Rejection,
        reply: Reply<()>,
    },
    OutboxDelete {
        seqs: Vec<i64>,
        reply: Reply<u64>,
    },
    OutboxTrim {
        limit: u64,
        reply: Reply<u64>,
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

/// What an operation produced: the caller's value and, once committed, the
/// job change to publish.
type Applied<T> = Result<(T, Option<JobChange>), StoreError>;

fn pending<T: Send + 'static>(reply: Reply<T>, applied: Applied<T>) -> Pending {
    let (result, change) = match applied {
        Ok((value, change)) => (Ok(value), change),
        Err(e) => (Err(e), None),
    };
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
    /// With the control backend: final run states are queued in the
    /// outbox, and this is notified after each commit.
    outbox: Option<Arc<tokio::sync::Notify>>,
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
        outbox: Option<Arc<tokio::sync::Notify>>,
    ) -> Self {
        Self {
            conn,
            rx,
            changes,
            outbox,
        }
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
                done.push(apply(&mut tx, op, self.outbox.is_some()).await);
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
        if error.is_none()
            && let Some(signal) = &self.outbox
        {
            signal.notify_one();
        }
        for d in done {
            d(error.as_deref(), &self.changes);
        }
        error.is_none()
    }
}

fn upserted(job: Arc<Job>) -> (Arc<Job>, Option<JobChange>) {
    let change = JobChange::Upserted(job.clone());
    (job, Some(change))
}

fn plain<T>(result: Result<T, StoreError>) -> Applied<T> {
    result.map(|v| (v, None))
}

async fn apply(tx: &mut Transaction<'_, Sqlite>, op: Op, outbox: bool) -> Pending {
    match op {
        Op::CreateJob { job, reply } => {
            let result = savepoint(tx, |c| Box::pin(jobs::create(c, job))).await;
            pending(reply, result.map(upserted))
        }
        Op::ReplaceJob { replacement, reply } => {
            let result = savepoint(tx, |c| Box::pin(jobs::replace(c, replacement))).await;
            pending(reply, result.map(upserted))
        }
        Op::SetPaused {
            id,
            paused,
            note,
            now,
            reply,
        } => {
            let result = savepoint(tx, |c| Box::pin(jobs::set_paused(c, id, paused, note, now))).await;
            pending(reply, result.map(upserted))
        }
        Op::DeleteJob { id, at, reply } => {
            let result = jobs::delete(tx, id, at, outbox).await;
            pending(reply, result.map(|()| ((), Some(JobChange::Removed(id)))))
        }
        Op::InsertRun { run, reply } => pending(reply, runs::insert(tx, &run, outbox).await),
        Op::StartRun { id, at, reply } => pending(reply, runs::start(tx, id, at, outbox).await),
        Op::RecordAttempt {
            id,
            attempts,
            log,
            reply,
        } => pending(reply, plain(runs::record_attempt(tx, id, attempts, &log).await)),
        Op::RecordProcess {
            id,
            pid,
            pgid,
            start_ticks,
            reply,
        } => pending(
            reply,
            plain(runs::record_process(tx, id, pid, pgid, start_ticks).await),
        ),
        Op::FinishRun {
            id,
            outcome,
            at,
            reply,
        } => pending(reply, runs::finish(tx, id, outcome, at, outbox).await),
        Op::OrphanForeignRuns { current, at, reply } => {
            pending(reply, plain(runs::orphan_foreign(tx, current, at, outbox).await))
        }
        Op::OrphanRunIfLive { id, at, error, reply } => pending(
            reply,
            plain(runs::orphan_if_live(tx, id, at, &error, outbox).await),
        ),
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
            pending(reply, plain(result))
        }
        Op::StopIncarnation { id, at, reply } => {
            let result = sqlx::query("UPDATE incarnations SET stopped_at = ? WHERE id = ?")
                .bind(ms(at))
                .bind(id.to_string())
                .execute(&mut **tx)
                .await
                .map(|_| ())
                .map_err(StoreError::from);
            pending(reply, plain(result))
        }
        Op::PruneJob {
            job,
            keep_last,
            older_than,
            limit,
            reply,
        } => pending(
            reply,
            plain(runs::prune_job(tx, job, keep_last, older_than, limit).await),
        ),
        Op::PruneOld {
            older_than,
            limit,
            reply,
        } => pending(reply, plain(runs::prune_old(tx, older_than, limit).await)),
        Op::RecordRejection { rejection, reply } => {
            pending(reply, plain(outbox::record_rejection(tx, &rejection).await))
        }
        Op::OutboxDelete { seqs, reply } => pending(reply, plain(outbox::delete(tx, &seqs).await)),
        Op::OutboxTrim { limit, reply } => pending(reply, plain(outbox::trim(tx, limit).await)),
        Op::Close { reply } => pending(reply, Ok(((), None))),
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

/// Reads a job as the change feed publishes it.
async fn load_job(c: &mut SqliteConnection, id: JobId) -> Result<Job, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM jobs WHERE id = ?",
        super::rows::JOB_COLUMNS
    )))
    .bind(id.to_string())
    .fetch_optional(&mut *c)
    .await?
    .ok_or(StoreError::NotFound)?;
    super::rows::job(&row)
}
