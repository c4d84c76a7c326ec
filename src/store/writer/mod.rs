//! The single writer: group commit of every write in the service.
//!
//! A dedicated thread owns the only write connection (for SQLite a
//! rusqlite connection: each statement runs on the calling thread, with no
//! hand-off per statement — see `docs/decisions.md`). It takes everything
//! queued, picks a batch (run starts first, see [`Lanes`]; up to
//! [`MAX_BATCH`]), applies it in one transaction and commits once. The
//! operations are written once against [`Tx`] in portable SQL. Callers get their
//! result only after the commit, so an acknowledged write is durable.
//! Operations that can fail on a constraint (job writes) run inside a
//! savepoint, so one rejected request never takes its neighbours in the
//! batch down with it.

mod claims;
mod endings;
mod history;
mod incarnations;
mod jobs;
mod lanes;
mod notices;
mod outbox;
mod pending;
mod run_ops;
mod runs;
mod staging;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as queue;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

pub use self::history::HistoryOp;
pub use self::incarnations::IncarnationOp;
pub use self::jobs::JobOp;
use self::lanes::Lanes;
pub use self::notices::{NoticeOp, Route, Settled};
pub use self::outbox::OutboxOp;
use self::pending::{Applied, CommitError, Pending, pending, plain};
pub use self::run_ops::RunOp;
use self::staging::{Staging, contained};
use super::fault::{StorageFault, Writability};
use super::rows::ms;
use super::sql::{Tx, first, values};
use super::{JobChange, StoreError};
use crate::job::{Job, JobId};
use crate::run::RunStatus;
use crate::store::Conflict;

/// Most operations committed in one transaction. Small enough that the
/// first runs of a burst of fires start after a short commit while the
/// rest are still being written (a commit costs little in WAL mode).
const MAX_BATCH: usize = 256;

/// Most operations in one transaction on a shared database (PostgreSQL):
/// job and housekeeping writes run in a savepoint there, and a transaction
/// with more than 64 subtransactions overflows PostgreSQL's per-backend
/// subtransaction cache, which slows snapshots on every connection.
const MAX_SHARED_BATCH: usize = 64;

/// How often the checkpointer moves the write-ahead log into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One queued write.
#[expect(
    clippy::large_enum_variant,
    reason = "run writes are most of every fire: boxing them would cost an allocation per fire to save a copy"
)]
pub enum Op {
    /// See [`JobOp`] (boxed: a job is large, and job writes are rare
    /// beside the run writes every fire makes).
    Jobs(Box<JobOp>),
    /// See [`RunOp`].
    Runs(RunOp),
    /// See [`HistoryOp`].
    History(HistoryOp),
    /// See [`OutboxOp`].
    Outbox(OutboxOp),
    /// See [`NoticeOp`].
    Notices(NoticeOp),
    /// See [`IncarnationOp`].
    Incarnations(IncarnationOp),
    /// Commit what came before, acknowledge, and stop.
    Close { reply: Reply<()> },
    /// Write one row, to learn whether the database takes writes.
    Probe { at: DateTime<Utc>, reply: Reply<()> },
}

impl Op {
    /// Answers the operation with `e` without applying it.
    fn fail(self, e: StoreError) {
        match self {
            Self::Jobs(op) => op.fail(e),
            Self::Runs(op) => op.fail(e),
            Self::History(op) => op.fail(e),
            Self::Outbox(op) => op.fail(e),
            Self::Notices(op) => op.fail(e),
            Self::Incarnations(op) => op.fail(e),
            Self::Close { reply } | Self::Probe { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// A successful run's end: on a shared database neighbours of this
    /// kind end in one statement ([`finish_successes`]).
    fn is_success_finish(&self) -> bool {
        matches!(self, Self::Runs(RunOp::Finish { outcome, .. }) if outcome.status == RunStatus::Succeeded)
    }

    /// Whether the operation may fail in the database for reasons other
    /// than a broken connection (constraints, or lock waits across
    /// replicas). Run writes may not: claims lock their job before
    /// inserting (no foreign-key failure), every writer locks runs before
    /// their job and jobs in id order (no deadlock). On PostgreSQL the
    /// others run in a savepoint; run writes skip its two round trips, the
    /// bulk of a fire's cost there.
    fn may_fail(&self) -> bool {
        !matches!(
            self,
            Self::Runs(
                RunOp::Insert { .. }
                    | RunOp::Start { .. }
                    | RunOp::Finish { .. }
                    | RunOp::RecordProcess { .. }
                    | RunOp::RecordAttempt { .. }
            )
        )
    }
}

/// The sending side of the writer's queue.
#[derive(Clone)]
pub struct Queue {
    tx: queue::Sender<Op>,
    depth: Arc<AtomicUsize>,
    /// Whether the writer's commits go through.
    pub writability: Arc<Writability>,
}

impl Queue {
    /// Enqueues `op`; `false` once the writer is gone.
    pub fn send(&self, op: Op) -> bool {
        self.depth.fetch_add(1, Ordering::Relaxed);
        let sent = self.tx.send(op).is_ok();
        if !sent {
            self.depth.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }
}

/// The write connection of a backend: a [`Tx`] that can also open and
/// end transactions.
pub trait WriteConn: Tx + Send {
    /// Opens a transaction that holds the write lock from its start.
    fn begin(&mut self) -> Result<(), StoreError>;
    /// Other writers share the database (PostgreSQL replicas): operations
    /// that may fail run in a savepoint ([`Op::may_fail`]), job changes
    /// are announced with NOTIFY, and run inserts lock their job first (see
    /// `runs::insert`).
    fn shared(&self) -> bool {
        false
    }
    /// Commits the open transaction.
    fn commit(&mut self) -> Result<(), StoreError> {
        self.execute("COMMIT", &[]).map(|_| ())
    }
    /// Rolls the open transaction back, if any.
    fn rollback(&mut self) {
        let _ = self.execute("ROLLBACK", &[]);
    }
    /// Closes the connection.
    fn close(self: Box<Self>);
}

impl WriteConn for Connection {
    fn begin(&mut self) -> Result<(), StoreError> {
        Tx::execute(self, "BEGIN IMMEDIATE", &[]).map(|_| ())
    }

    fn close(self: Box<Self>) {
        if let Err((_, e)) = Connection::close(*self) {
            tracing::warn!(error = %e, "closing the database connection failed");
        }
    }
}

/// The writer: owns the only write connection.
pub struct Writer {
    conn: Box<dyn WriteConn>,
    /// SQLite: a second connection for WAL checkpoints on their own
    /// thread, so a checkpoint (which syncs the database file) never delays
    /// a commit.
    checkpointer: Option<Connection>,
    rx: queue::Receiver<Op>,
    depth: Arc<AtomicUsize>,
    changes: mpsc::UnboundedSender<JobChange>,
    /// With the control backend: final run states are queued in the
    /// outbox, and this is notified after each commit.
    outbox: Option<Arc<tokio::sync::Notify>>,
    writability: Arc<Writability>,
    /// The live feed, and the events of the batch being committed.
    bus: Arc<crate::events::Bus>,
    staged: Vec<crate::events::Event>,
}

/// The writer, for the app to run and await at shutdown.
pub struct WriterTask(Writer);

impl WriterTask {
    /// Runs the writer thread until [`super::Store::close`] (or until
    /// every handle is dropped), committing what was queued before; then
    /// closes the connection (checkpointing the WAL). Later writes fail
    /// with `Closed`. Stamps `heartbeat` at least every second, so a commit
    /// that hangs (a stuck disk) shows in liveness.
    pub async fn run(
        self,
        heartbeat: std::sync::Arc<crate::health::Heartbeat>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) {
        let (done, finished) = oneshot::channel();
        let writer = self.0;
        let spawned = std::thread::Builder::new()
            .name("cronguard-writer".into())
            .spawn(move || {
                writer.run(&heartbeat, &metrics);
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = finished.await;
            }
            Err(e) => tracing::error!(error = %e, "could not start the database writer thread"),
        }
    }
}

impl Writer {
    pub(super) fn new(
        conn: Box<dyn WriteConn>,
        checkpointer: Option<Connection>,
        changes: mpsc::UnboundedSender<JobChange>,
        outbox: Option<Arc<tokio::sync::Notify>>,
        bus: Arc<crate::events::Bus>,
    ) -> (Self, Queue) {
        let (tx, rx) = queue::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let writability = Arc::new(Writability::default());
        let queue = Queue {
            tx,
            depth: depth.clone(),
            writability: writability.clone(),
        };
        (
            Self {
                conn,
                checkpointer,
                rx,
                depth,
                changes,
                outbox,
                writability,
                bus,
                staged: Vec::new(),
            },
            queue,
        )
    }

    pub(super) fn into_task(self) -> WriterTask {
        WriterTask(self)
    }

    fn take(&self, timeout: Duration) -> Result<Op, queue::RecvTimeoutError> {
        let op = self.rx.recv_timeout(timeout)?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Ok(op)
    }

    fn run(mut self, heartbeat: &crate::health::Heartbeat, metrics: &crate::metrics::Metrics) {
        metrics.store_write_faults(&StorageFault::ALL.map(StorageFault::as_str));
        // SQLite: commits never checkpoint; the checkpointer thread does,
        // until `_stop` is dropped with this function's end.
        let (_stop, stopped) = queue::channel::<()>();
        if let Some(conn) = self.checkpointer.take() {
            let ignore = &mut |_: &dyn super::rows::Columns| Ok(());
            if let Err(e) = self.conn.query("PRAGMA wal_autocheckpoint = 0", &[], ignore) {
                tracing::warn!(error = %e, "could not hand WAL checkpoints to the checkpointer");
            }
            let spawned = std::thread::Builder::new()
                .name("cronguard-checkpoint".into())
                .spawn(move || checkpoint(conn, stopped));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start the checkpointer; commits checkpoint themselves");
                let _ = self.conn.query("PRAGMA wal_autocheckpoint = 1000", &[], ignore);
            }
        }
        let mut lanes = Lanes::new(if self.conn.shared() {
            MAX_SHARED_BATCH
        } else {
            MAX_BATCH
        });
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            heartbeat.beat();
            if lanes.is_empty() {
                match self.take(Duration::from_secs(1)) {
                    Ok(op) => lanes.push(op),
                    Err(queue::RecvTimeoutError::Timeout) => continue,
                    Err(queue::RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(op) = self.take(Duration::ZERO) {
                lanes.push(op);
            }
            lanes.fill(&mut batch);
            let closing = matches!(batch.last(), Some(Op::Close { .. }));
            let started = Instant::now();
            let failed = self.commit(&mut batch, metrics);
            metrics.commit(
                started.elapsed(),
                failed.is_none(),
                self.depth.load(Ordering::Relaxed) + lanes.len(),
            );
            if closing {
                break;
            }
        }
        self.conn.close();
    }

    /// Applies and commits `batch`; the fault if the database refused the
    /// commit or one of its statements.
    fn commit(&mut self, batch: &mut Vec<Op>, metrics: &crate::metrics::Metrics) -> Option<StorageFault> {
        let mut done: Vec<Pending> = Vec::with_capacity(batch.len());
        let outbox = self.outbox.is_some();
        let shared = self.conn.shared();
        if shared {
            // Replicas lock job rows in job order: no deadlock between
            // two writers claiming fires of the same jobs. A start of a
            // queued run stays after every insert (its row may be one).
            batch.sort_by_key(|op| {
                match op {
                    Op::Runs(RunOp::Insert { run, .. }) => Some(run.job_id),
                    _ => None,
                }
                .map_or((1, None), |id| (0, Some(id)))
            });
        }
        let mut ops = batch.drain(..).peekable();
        let outcome = self.apply_all(&mut ops, &mut done, outbox, shared);
        let error = outcome.err().map(|e| {
            self.conn.rollback();
            CommitError {
                fault: StorageFault::of(&e).unwrap_or(StorageFault::Other),
                detail: e.to_string(),
            }
        });
        // A statement the database itself refused (a full disk fails the
        // insert before the commit) counts like a failed commit.
        let failure = error.clone().or_else(|| {
            done.iter().find_map(|d| {
                d.storage_fault
                    .clone()
                    .map(|(fault, detail)| CommitError { fault, detail })
            })
        });
        // Operations never applied (BEGIN, or a statement of the batch,
        // failed first) are answered with the failure: a dropped reply
        // would read as "shut down".
        let unreached = ops.len();
        for op in ops {
            op.fail(match &error {
                Some(e) => StoreError::Unavailable {
                    fault: e.fault,
                    detail: e.detail.clone(),
                },
                None => StoreError::Closed,
            });
        }
        self.observe(failure.as_ref(), done.len() + unreached, metrics);
        if error.is_none()
            && let Some(signal) = &self.outbox
        {
            signal.notify_one();
        }
        let staged = std::mem::take(&mut self.staged);
        if error.is_none() {
            self.bus.publish(staged);
        }
        for d in done {
            (d.finish)(error.as_ref(), &self.changes);
        }
        failure.map(|f| f.fault)
    }

    /// Begins, applies every operation of the batch in order, and commits.
    /// An error leaves the rest of `ops` unapplied. The batch's events are
    /// left in `self.staged`, to publish once the commit is known.
    fn apply_all(
        &mut self,
        ops: &mut std::iter::Peekable<std::vec::Drain<'_, Op>>,
        done: &mut Vec<Pending>,
        outbox: bool,
        shared: bool,
    ) -> Result<(), StoreError> {
        self.conn.begin()?;
        let tx = &mut Staging {
            conn: &mut *self.conn,
            events: &mut self.staged,
        };
        while let Some(op) = ops.next() {
            if shared && op.is_success_finish() && ops.peek().is_some_and(Op::is_success_finish) {
                // Consecutive successes end in one statement (order kept:
                // only neighbours are grouped).
                let mut group = vec![op];
                while group.len() < endings::FINISH_GROUP
                    && let Some(next) = ops.next_if(Op::is_success_finish)
                {
                    group.push(next);
                }
                done.extend(run_ops::finish_group(tx, group, outbox));
                continue;
            }
            let pending = if shared && op.may_fail() {
                contained(tx, op, outbox)?
            } else {
                apply(tx, op, outbox, shared)
            };
            done.push(pending);
        }
        if shared {
            notify(tx, done.iter().filter_map(|p| p.changed))?;
        }
        tx.conn.commit()
    }

    /// Logs and publishes a change of writability: one line when writes
    /// start failing, one when they work again, not one per write.
    fn observe(&self, failure: Option<&CommitError>, ops: usize, metrics: &crate::metrics::Metrics) {
        match failure {
            Some(f) => {
                metrics.store_write_failed(f.fault.as_str());
                if self.writability.failed(f.fault, &f.detail) {
                    tracing::error!(fault = f.fault.as_str(), error = %f.detail, ops, "the database cannot be written: {}", f.fault);
                } else {
                    tracing::debug!(fault = f.fault.as_str(), error = %f.detail, ops, "a write failed again");
                }
            }
            None => {
                if let Some(ended) = self.writability.succeeded() {
                    tracing::warn!(fault = ended.fault.as_str(), since = %ended.since, "the database can be written again");
                }
            }
        }
        metrics.set_store_writable(failure.is_none());
    }
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] (passive: never waits
/// for readers or the writer) until `stop` disconnects.
fn checkpoint(conn: Connection, stop: queue::Receiver<()>) {
    while let Err(queue::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

fn upserted(job: Arc<Job>) -> (Arc<Job>, Option<JobChange>) {
    let change = JobChange::Upserted(job.clone());
    (job, Some(change))
}

/// The channel on which replicas announce job changes (`docs/scaling.md`).
pub const JOB_CHANNEL: &str = "cronguard_jobs";

/// Announces changed jobs to the other replicas, delivered at commit: ids
/// separated by commas, several per notification (a payload holds at most
/// 8000 bytes).
fn notify(tx: &mut dyn Tx, changed: impl Iterator<Item = JobId>) -> Result<(), StoreError> {
    let mut payload = String::new();
    for id in changed {
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&id.to_string());
        if payload.len() > 7000 {
            tx.execute(
                "SELECT pg_notify($1, $2)",
                &values![JOB_CHANNEL, std::mem::take(&mut payload)],
            )?;
        }
    }
    if !payload.is_empty() {
        tx.execute("SELECT pg_notify($1, $2)", &values![JOB_CHANNEL, payload])?;
    }
    Ok(())
}

fn apply(tx: &mut dyn Tx, op: Op, outbox: bool, shared: bool) -> Pending {
    match op {
        Op::Jobs(op) => jobs::apply(tx, *op, outbox),
        Op::Runs(op) => run_ops::apply(tx, op, outbox, shared),
        Op::History(op) => history::apply(tx, op),
        Op::Outbox(op) => outbox::apply(tx, op),
        Op::Notices(op) => notices::apply(tx, op),
        Op::Incarnations(op) => incarnations::apply(tx, op),
        Op::Close { reply } => pending(reply, Ok(((), None))),
        Op::Probe { at, reply } => {
            let result = tx.execute(
                "INSERT INTO store_probe (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                &values![ms(at)],
            );
            pending(reply, plain(result.map(|_| ())))
        }
    }
}

/// Reads a job as the change feed publishes it.
fn load_job(c: &mut dyn Tx, id: JobId) -> Result<Job, StoreError> {
    static SQL: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!("SELECT {} FROM jobs WHERE id = $1", super::rows::JOB_COLUMNS));
    first(c, &SQL, &values![id.to_string()], |row| super::rows::job(row))?
        .ok_or(StoreError::Conflict(Conflict::NotFound))
}
