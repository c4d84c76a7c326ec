//! Run writes as the store queues them, and their dispatch to the files
//! that own the statements: inserts, starts and records (`runs.rs`),
//! claims on a shared database (`claims.rs`), ends (`endings.rs`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::claims;
use super::endings::{Ended, finish, finish_successes};
use super::runs::{insert, orphan_foreign, orphan_if_live, record_attempt, record_process, start};
use super::{Op, Pending, Reply, pending, plain};
use crate::events::{Event, Kind};
use crate::run::{Attempt, Incarnation, Outcome, Run, RunId};
use crate::store::StoreError;
use crate::store::sql::Tx;

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
        RunOp::Insert { run, guard, reply } if shared => {
            pending(reply, claims::claim(tx, &run, outbox, guard))
        }
        RunOp::Insert { run, reply, .. } => pending(reply, insert(tx, &run, outbox)),
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

/// The feed's events of a success ended in a group: the run's end, and
/// its job's recovery when it ended a streak.
fn stage_success(tx: &mut dyn Tx, id: RunId, at: DateTime<Utc>, ended: &Ended) {
    let Ok(job) = ended.job.parse() else { return };
    let event = |kind, status| {
        Event::new(kind, at)
            .job(job)
            .name(ended.name.clone())
            .run(id)
            .status(status)
    };
    tx.stage(event(Kind::RunFinished, "succeeded"));
    if ended.recovered {
        tx.stage(event(Kind::JobHealth, "ok"));
    }
}

/// Ends a group of successful runs (shared database) in one statement;
/// a run it did not end (already final, gone) takes the one-by-one path,
/// which says why.
pub(super) fn finish_group(tx: &mut dyn Tx, group: Vec<Op>, outbox: bool) -> Vec<Pending> {
    let finishes: Vec<(RunId, Outcome, DateTime<Utc>, Reply<()>)> = group
        .into_iter()
        .filter_map(|op| match op {
            Op::Runs(RunOp::Finish {
                id,
                outcome,
                at,
                reply,
            }) => Some((id, outcome, at, reply)),
            _ => None,
        })
        .collect();
    let ended =
        finish_successes(tx, finishes.iter().map(|(id, o, at, _)| (*id, o, *at))).unwrap_or_else(|e| {
            // The transaction is lost with it: each run's own statement
            // below then fails with the database's error.
            tracing::error!(error = %e, runs = finishes.len(), "could not end a group of runs");
            HashMap::new()
        });
    finishes
        .into_iter()
        .map(|(id, outcome, at, reply)| {
            let Some(this) = ended.get(&id) else {
                return pending(reply, finish(tx, id, outcome, at, outbox, true));
            };
            let mut recorded = Ok(());
            if outbox {
                recorded = super::outbox::record_run(tx, id, at);
            }
            stage_success(tx, id, at, this);
            if recorded.is_ok() && this.recovered {
                recorded = super::notices::record(
                    tx,
                    super::notices::Notice {
                        event: crate::notification::Event::Recovery,
                        job_id: &this.job,
                        job_name: &this.name,
                        run: Some(id),
                        first: true,
                        detail: None,
                        at,
                    },
                );
            }
            pending(reply, plain(recorded))
        })
        .collect()
}
