//! The supervisor's interface: what other loops and the API send it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use utoipa::ToSchema;

use crate::job::{Job, JobId};
use crate::run::{Outcome, Reason, Run, RunId, Trigger};
use crate::store::StoreError;

/// A request to run, or to account for, one fire of a job.
#[derive(Debug, Clone)]
pub struct Fire {
    /// The job as it was when the fire came due.
    pub job: Arc<Job>,
    /// Nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// Scheduled plus jitter: when it should start.
    pub due_at: DateTime<Utc>,
    /// Why it exists.
    pub trigger: Trigger,
    /// When set, record a `missed` row instead of running.
    pub missed: Option<Missed>,
}

/// A range of fires recorded as one `missed` row.
#[derive(Debug, Clone, Copy)]
pub struct Missed {
    /// Why they were missed.
    pub reason: Reason,
    /// The last fire of the range (the first is the fire's `scheduled_at`).
    pub until: DateTime<Utc>,
    /// How many fires the range holds.
    pub fires: u32,
}

/// Why a manual trigger was refused.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The service is shutting down.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// Storing the run failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What is live right now, for status and orphan detection.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Snapshot {
    /// Runs executing now.
    pub running: Vec<LiveRun>,
    /// Runs waiting (queue_one, cancel_running, or the global limit).
    pub queued: Vec<LiveRun>,
    /// Tasks in the supervisor's set (equals `running` unless something is
    /// wrong: see orphan detection).
    pub tasks: usize,
}

/// One live run as the supervisor sees it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LiveRun {
    /// The run.
    pub run: RunId,
    /// Its job.
    pub job: JobId,
    /// Its job's name.
    pub job_name: String,
    /// Nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// Why it exists.
    pub trigger: Trigger,
    /// When it should have ended at the latest (timeout plus kill grace);
    /// absent for queued runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
}

pub(super) enum Command {
    Fires(Vec<Fire>),
    Trigger {
        job: Arc<Job>,
        force: bool,
        reply: oneshot::Sender<Result<Run, TriggerError>>,
    },
    Cancel {
        run: RunId,
        reply: oneshot::Sender<bool>,
    },
    JobRemoved(JobId),
    Snapshot(oneshot::Sender<Snapshot>),
    Abort {
        run: RunId,
        outcome: Option<Outcome>,
        reply: oneshot::Sender<bool>,
    },
}

/// Sends work to the supervisor; cheap to clone.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    pub(super) tx: mpsc::UnboundedSender<Command>,
}

impl SupervisorHandle {
    /// Hands due fires over (from the engine).
    pub fn fire(&self, fires: Vec<Fire>) {
        if !fires.is_empty() && self.tx.send(Command::Fires(fires)).is_err() {
            tracing::warn!("fires arrived after the supervisor stopped");
        }
    }

    /// Runs a job now (manual trigger), subject to its overlap policy
    /// unless `force`; the returned run is as stored (`running`, `queued`
    /// or `skipped`).
    pub async fn trigger(&self, job: Arc<Job>, force: bool) -> Result<Run, TriggerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Trigger { job, force, reply })
            .map_err(|_| TriggerError::ShuttingDown)?;
        rx.await.map_err(|_| TriggerError::ShuttingDown)?
    }

    /// Cancels a live run; `false` if this service has no such live run.
    pub async fn cancel(&self, run: RunId) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Cancel { run, reply }).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// A job was deleted: cancel its live runs, drop its queued one.
    pub fn job_removed(&self, id: JobId) {
        let _ = self.tx.send(Command::JobRemoved(id));
    }

    /// Aborts a live run's task (orphan kind 3); `outcome`, when given, is
    /// recorded for the run. `false` if no such task.
    pub async fn abort(&self, run: RunId, outcome: Option<Outcome>) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Abort { run, outcome, reply }).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// What is live now; `None` once the supervisor stopped.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot(reply)).ok()?;
        rx.await.ok()
    }
}
