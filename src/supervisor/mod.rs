//! The run supervisor: the one owner of every run in this process.
//!
//! Runs execute as tasks in one `JoinSet` owned by the supervisor loop, each
//! with its own cancellation. The supervisor decides admission (overlap
//! policy, global concurrency limit, lateness), records every decision, and
//! observes every task's end — including panics, which become `failed` runs
//! with the panic message. Nothing it starts can outlive it: at shutdown it
//! waits up to the grace period, cancels what is left, and aborts (killing
//! process groups) what ignores cancellation.
//!
//! Its writes are *submitted* synchronously in decision order (see
//! [`crate::store::Ack`]), so a queued run's row always commits before the
//! update that starts it, and a skip is recorded even if nobody awaits it.

mod admission;
mod running;
mod task;
mod unrecorded;

#[cfg(test)]
#[cfg(feature = "fault-injection")]
mod tests;


use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use self::admission::{Admission, admit};
pub use self::task::{Begin, NotStarted, Planned, RunCancel, TaskContext, TaskEnd};
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::job::{Job, JobId};
use crate::loops::panic_message;
use crate::run::{Incarnation, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::Conflict;
use crate::store::{StorageFault, StoreError};

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

enum Command {
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
    tx: mpsc::UnboundedSender<Command>,
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

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Most runs executing at once, over all jobs; further runs wait
    /// (`queued`) and start in order as slots free up.
    pub max_running: usize,
    /// How long shutdown waits for running runs before cancelling them.
    pub shutdown_grace: Duration,
    /// This process's incarnation, stamped on every run.
    pub incarnation: Incarnation,
}

struct Live {
    job: Arc<Job>,
    cancel: RunCancel,
    scheduled_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    deadline: DateTime<Utc>,
    trigger: Trigger,
    task: tokio::task::AbortHandle,
    /// Recorded if the task is aborted (stuck runs).
    abort_outcome: Option<Outcome>,
}

struct Waiting {
    run_id: RunId,
    fire: Fire,
    cancel: RunCancel,
}

#[derive(Default)]
struct Slots {
    running: Vec<RunId>,
    /// The job's own queued run (`queue_one`, `cancel_running`).
    queued: Option<Waiting>,
    /// Replayed fires (`catch_up: all`), started oldest first, one after
    /// another, before any newer queued fire.
    catch_up: VecDeque<Waiting>,
}

impl Slots {
    fn is_idle(&self) -> bool {
        self.running.is_empty() && self.queued.is_none() && self.catch_up.is_empty()
    }

    fn waiting(&self) -> impl Iterator<Item = &Waiting> {
        self.catch_up.iter().chain(self.queued.iter())
    }
}

/// Whether a fire's lateness is judged against the misfire grace: replayed
/// catch-up fires are late by definition and were chosen to run.
fn judged_late(trigger: Trigger) -> bool {
    trigger == Trigger::Schedule
}

/// The supervisor loop and everything it owns.
pub struct Supervisor {
    ctx: TaskContext,
    config: SupervisorConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    tasks: JoinSet<TaskEnd>,
    by_task: HashMap<tokio::task::Id, RunId>,
    live: HashMap<RunId, Live>,
    jobs: HashMap<JobId, Slots>,
    /// Runs admitted but waiting for a global slot, oldest first.
    backlog: VecDeque<Waiting>,
    /// Writes of decisions (skipped, missed, queued, cancelled rows).
    recorders: JoinSet<()>,
    /// Fires the database refused to record, until it takes writes again.
    unrecorded: unrecorded::Unrecorded,
    /// Decision rows the database refused, sent back by their recorders.
    refused_tx: mpsc::UnboundedSender<Run>,
    refused_rx: mpsc::UnboundedReceiver<Run>,
}

impl Supervisor {
    /// A supervisor and the handle to reach it.
    pub fn new(ctx: TaskContext, config: SupervisorConfig) -> (Self, SupervisorHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (refused_tx, refused_rx) = mpsc::unbounded_channel();
        let supervisor = Self {
            ctx,
            config,
            rx,
            tasks: JoinSet::new(),
            by_task: HashMap::new(),
            live: HashMap::new(),
            jobs: HashMap::new(),
            backlog: VecDeque::new(),
            recorders: JoinSet::new(),
            unrecorded: unrecorded::Unrecorded::default(),
            refused_tx,
            refused_rx,
        };
        (supervisor, SupervisorHandle { tx })
    }

    /// Serves commands and task ends until `shutdown` (or the channel
    /// closes), stamping `heartbeat` at least every second. Restartable: all
    /// state lives in `self`, so a panic here loses no task.
    pub async fn serve(&mut self, shutdown: &CancellationToken, heartbeat: &Heartbeat, faults: &Faults) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                Some(result) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => self.task_ended(result),
                Some(_) = self.recorders.join_next(), if !self.recorders.is_empty() => {}
                Some(row) = self.refused_rx.recv() => self.unrecorded.keep(row),
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = tick.tick() => self.record_unrecorded(),
            }
        }
    }

    /// Once the database takes writes again, records the fires it refused
    /// as one `missed` row per job.
    fn record_unrecorded(&mut self) {
        if self.unrecorded.is_empty() || self.ctx.store.failing().is_some() {
            return;
        }
        for row in self.unrecorded.take_rows() {
            self.record(row, None);
        }
        for fire in self.unrecorded.take() {
            tracing::warn!(
                job = %fire.job.id,
                from = %fire.scheduled_at,
                until = ?fire.missed.map(|m| m.until),
                fires = fire.missed.map_or(0, |m| m.fires),
                "recording the fires the database refused as missed"
            );
            let row = self.new_row(
                RunId::at(self.ctx.clock.now()),
                &fire,
                RunStatus::Missed,
                Some(Reason::StoreUnavailable),
            );
            self.record(row, None);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Fires(fires) => {
                for fire in fires {
                    self.admit(fire, None);
                }
            }
            Command::Trigger { job, force, reply } => {
                let now = self.ctx.clock.now();
                let fire = Fire {
                    job,
                    scheduled_at: now,
                    due_at: now,
                    trigger: Trigger::Manual,
                    missed: None,
                };
                if force {
                    // Explicitly past the overlap policy (global limit holds).
                    self.start_or_backlog(RunId::at(now), fire, None, Some(reply));
                } else {
                    self.admit(fire, Some(reply));
                }
            }
            Command::Cancel { run, reply } => {
                let _ = reply.send(self.cancel(run, Reason::Requested));
            }
            Command::JobRemoved(id) => {
                if let Some(slots) = self.jobs.get_mut(&id) {
                    // Their rows went with the job (cascade); nothing to record.
                    slots.queued = None;
                    slots.catch_up.clear();
                    for run in slots.running.clone() {
                        self.cancel(run, Reason::JobDeleted);
                    }
                }
                self.backlog.retain(|w| w.fire.job.id != id);
            }
            Command::Snapshot(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Abort { run, outcome, reply } => {
                let found = match self.live.get_mut(&run) {
                    Some(live) => {
                        live.abort_outcome = outcome;
                        live.task.abort();
                        true
                    }
                    None => false,
                };
                let _ = reply.send(found);
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let view = |run: RunId, job: &Job, scheduled_at, trigger, deadline| LiveRun {
            run,
            job: job.id,
            job_name: job.name().to_owned(),
            scheduled_at,
            trigger,
            deadline,
        };
        Snapshot {
            running: self
                .live
                .iter()
                .map(|(id, l)| view(*id, &l.job, l.scheduled_at, l.trigger, Some(l.deadline)))
                .collect(),
            queued: self
                .jobs
                .values()
                .flat_map(Slots::waiting)
                .chain(self.backlog.iter())
                .map(|w| view(w.run_id, &w.fire.job, w.fire.scheduled_at, w.fire.trigger, None))
                .collect(),
            tasks: self.tasks.len(),
        }
    }

    fn new_row(&self, id: RunId, fire: &Fire, status: RunStatus, reason: Option<Reason>) -> Run {
        let now = self.ctx.clock.now();
        Run {
            id,
            job_id: fire.job.id,
            job_name: fire.job.name().to_owned(),
            scheduled_at: fire.scheduled_at,
            scheduled_until: fire.missed.map(|m| m.until),
            fires: fire.missed.map_or(1, |m| m.fires),
            status,
            trigger: fire.trigger,
            reason,
            created_at: now,
            started_at: (status == RunStatus::Running).then_some(now),
            ended_at: status.is_final().then_some(now),
            attempts: 0,
            exit_code: None,
            http_status: None,
            error: None,
            output: None,
            pid: None,
            pgid: None,
            process_start_ticks: None,
            incarnation: self.config.incarnation,
            attempt_log: Vec::new(),
        }
    }

    /// Records a decision row; replies with it once committed.
    fn record(&mut self, run: Run, reply: Option<oneshot::Sender<Result<Run, TriggerError>>>) {
        let ack = self.ctx.store.runs().insert(run.clone());
        let metrics = self.ctx.metrics.clone();
        let refused = self.refused_tx.clone();
        self.recorders.spawn(async move {
            let result = ack.await;
            match &result {
                Ok(()) => {
                    // Fires the database refused were counted when refused.
                    if let (RunStatus::Skipped | RunStatus::Missed, Some(reason)) = (run.status, run.reason)
                        && reason != Reason::StoreUnavailable
                    {
                        metrics.fire_not_run(run.status, reason, run.fires);
                    }
                }
                Err(StoreError::Conflict(Conflict::DuplicateFire)) => {
                    tracing::debug!(job = %run.job_id, scheduled_at = %run.scheduled_at, "fire already recorded");
                }
                Err(StoreError::Conflict(Conflict::NotFound)) => {}
                // The writer logs an outage of the database once; the row
                // is written again once it takes writes (a client that
                // asked gets the error instead).
                Err(e) if StorageFault::outage(e).is_some() => {
                    tracing::debug!(job = %run.job_id, error = %e, "could not record a {} fire", run.status);
                    if reply.is_none() && run.status.is_final() {
                        let _ = refused.send(run.clone());
                    }
                }
                Err(e) => tracing::error!(job = %run.job_id, error = %e, "could not record a {} fire", run.status),
            }
            if let Some(reply) = reply {
                let _ = reply.send(result.map(|()| run).map_err(TriggerError::from));
            }
        });
    }

    fn admit(&mut self, fire: Fire, reply: Option<oneshot::Sender<Result<Run, TriggerError>>>) {
        let run_id = RunId::at(self.ctx.clock.now());
        if let Some(missed) = fire.missed {
            let row = self.new_row(run_id, &fire, RunStatus::Missed, Some(missed.reason));
            return self.record(row, reply);
        }
        let policy = &fire.job.def.policy;
        let now = self.ctx.clock.now();
        if judged_late(fire.trigger) && too_late(now, fire.due_at, policy.misfire_grace) {
            let row = self.new_row(run_id, &fire, RunStatus::Missed, Some(Reason::Misfire));
            return self.record(row, reply);
        }
        let limit = admission::limit(policy);
        let slots = self.jobs.entry(fire.job.id).or_default();
        // What other replicas may run of this job beside what runs here.
        let guard = u32::try_from(limit.saturating_sub(slots.running.len()).max(1)).unwrap_or(u32::MAX);
        if fire.trigger == Trigger::CatchUp {
            if slots.running.len() < limit && slots.catch_up.is_empty() {
                return self.start_or_backlog(run_id, fire, Some(guard), reply);
            }
            let row = self.new_row(run_id, &fire, RunStatus::Queued, None);
            self.record(row, reply);
            let waiting = Waiting {
                run_id,
                fire,
                cancel: RunCancel::default(),
            };
            let job_id = waiting.fire.job.id;
            self.jobs.entry(job_id).or_default().catch_up.push_back(waiting);
            return;
        }
        match admit(policy, slots.running.len(), slots.queued.is_some()) {
            Admission::Start => self.start_or_backlog(run_id, fire, Some(guard), reply),
            Admission::Skip(reason) => {
                let row = self.new_row(run_id, &fire, RunStatus::Skipped, Some(reason));
                self.record(row, reply);
            }
            Admission::Queue {
                displace,
                cancel_running,
            } => {
                let job_id = fire.job.id;
                if displace && let Some(old) = self.jobs.get_mut(&job_id).and_then(|s| s.queued.take()) {
                    self.finish_unstarted(
                        old.run_id,
                        Outcome::cancelled(Reason::Replaced, "replaced by a newer fire"),
                    );
                }
                let row = self.new_row(run_id, &fire, RunStatus::Queued, None);
                self.record(row, reply);
                let waiting = Waiting {
                    run_id,
                    fire,
                    cancel: RunCancel::default(),
                };
                self.jobs.entry(job_id).or_default().queued = Some(waiting);
                if cancel_running {
                    let running = self
                        .jobs
                        .get(&job_id)
                        .map(|s| s.running.clone())
                        .unwrap_or_default();
                    for run in running {
                        self.cancel(run, Reason::Replaced);
                    }
                }
            }
        }
    }

    /// Starts now, or queues behind the global limit. `guard` (all but
    /// forced runs): how many runs of the job other replicas may have live
    /// for this one to start (see [`crate::store::Runs::claim`]).
    fn start_or_backlog(
        &mut self,
        run_id: RunId,
        fire: Fire,
        guard: Option<u32>,
        reply: Option<oneshot::Sender<Result<Run, TriggerError>>>,
    ) {
        if self.live.len() < self.config.max_running {
            let row = self.new_row(run_id, &fire, RunStatus::Running, None);
            let ack = match guard {
                Some(guard) => self.ctx.store.runs().claim(row.clone(), guard),
                None => self.ctx.store.runs().insert(row.clone()),
            };
            let begin = Begin::Submitted(ack);
            let reply = reply.map(|r| (r, row));
            self.spawn(run_id, fire, begin, RunCancel::default(), reply);
        } else {
            let row = self.new_row(run_id, &fire, RunStatus::Queued, None);
            self.record(row, reply);
            self.backlog.push_back(Waiting {
                run_id,
                fire,
                cancel: RunCancel::default(),
            });
        }
    }

    fn spawn(
        &mut self,
        run_id: RunId,
        fire: Fire,
        begin: Begin,
        cancel: RunCancel,
        reply: Option<(oneshot::Sender<Result<Run, TriggerError>>, Run)>,
    ) {
        let planned = Planned {
            job: fire.job.clone(),
            run_id,
            scheduled_at: fire.scheduled_at,
            due_at: fire.due_at,
            trigger: fire.trigger,
            begin,
            cancel: cancel.clone(),
            reply,
        };
        let handle = self.tasks.spawn(task::run(self.ctx.clone(), planned));
        self.by_task.insert(handle.id(), run_id);
        self.jobs.entry(fire.job.id).or_default().running.push(run_id);
        let now = self.ctx.clock.now();
        let policy = &fire.job.def.policy;
        // Every attempt may use its timeout and kill grace, plus the waits
        // between attempts: past that, the run is stuck (orphan kind 3).
        let attempts = policy.retry.max_attempts;
        let budget = (fire.job.def.action.timeout() + policy.kill_grace)
            .saturating_mul(attempts)
            .saturating_add(policy.retry.worst_case_delays());
        let deadline = now + chrono::TimeDelta::from_std(budget).unwrap_or(chrono::TimeDelta::MAX);
        self.live.insert(
            run_id,
            Live {
                job: fire.job,
                cancel,
                scheduled_at: fire.scheduled_at,
                started_at: now,
                deadline,
                trigger: fire.trigger,
                task: handle,
                abort_outcome: None,
            },
        );
        self.ctx.metrics.set_running(self.live.len());
    }

    /// Starts a run that was waiting (its `queued` row already submitted).
    fn start_waiting(&mut self, w: Waiting) {
        let now = self.ctx.clock.now();
        if judged_late(w.fire.trigger) && too_late(now, w.fire.due_at, w.fire.job.def.policy.misfire_grace) {
            let mut outcome = Outcome::failed("waited longer than the misfire grace");
            outcome.status = RunStatus::Missed;
            outcome.reason = Some(Reason::Misfire);
            outcome.attempts = 0;
            self.ctx
                .metrics
                .fire_not_run(RunStatus::Missed, Reason::Misfire, 1);
            return self.finish_unstarted(w.run_id, outcome);
        }
        let begin = Begin::Submitted(self.ctx.store.runs().start(w.run_id, now));
        self.spawn(w.run_id, w.fire, begin, w.cancel, None);
    }

    /// Records the end of a run that never started (queued, then dropped).
    fn finish_unstarted(&mut self, run_id: RunId, mut outcome: Outcome) {
        outcome.attempts = 0;
        let ack = self
            .ctx
            .store
            .runs()
            .finish(run_id, outcome, self.ctx.clock.now());
        self.recorders.spawn(async move {
            if let Err(e) = ack.await
                && !matches!(e, StoreError::Conflict(Conflict::NotFound))
            {
                tracing::error!(run = %run_id, error = %e, "could not record the end of a queued run");
            }
        });
    }

    fn cancel(&mut self, run: RunId, reason: Reason) -> bool {
        if let Some(live) = self.live.get(&run) {
            live.cancel.cancel(reason);
            return true;
        }
        // A queued run: drop it from its queue and record it.
        let queued = self
            .jobs
            .values_mut()
            .find_map(|s| {
                s.queued.take_if(|w| w.run_id == run).or_else(|| {
                    let at = s.catch_up.iter().position(|w| w.run_id == run)?;
                    s.catch_up.remove(at)
                })
            })
            .or_else(|| {
                let at = self.backlog.iter().position(|w| w.run_id == run)?;
                self.backlog.remove(at)
            });
        match queued {
            Some(w) => {
                self.finish_unstarted(w.run_id, Outcome::cancelled(reason, "cancelled while queued"));
                true
            }
            None => false,
        }
    }

    fn task_ended(&mut self, result: Result<(tokio::task::Id, TaskEnd), tokio::task::JoinError>) {
        let (task_id, end) = match result {
            Ok((id, end)) => (id, Ok(end)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some(run_id) = self.by_task.remove(&task_id) else {
            tracing::error!(task = %task_id, "a task ended that the supervisor did not know");
            return;
        };
        let mut live = self.live.remove(&run_id);
        match end {
            Ok(TaskEnd::Finished(_)) => {}
            Ok(TaskEnd::NotStarted(why)) => match why {
                NotStarted::Conflict(Conflict::DuplicateFire) => {
                    tracing::debug!(run = %run_id, "fire already recorded by an earlier attempt");
                }
                NotStarted::Conflict(Conflict::NotFound) => {
                    tracing::debug!(run = %run_id, "job deleted before its run started");
                }
                NotStarted::Conflict(Conflict::LimitReached) => {
                    tracing::info!(run = %run_id, "the job reached its max_runs; fire recorded as skipped");
                    self.ctx
                        .metrics
                        .fire_not_run(RunStatus::Skipped, Reason::LimitReached, 1);
                }
                NotStarted::Conflict(Conflict::Overlap) => {
                    tracing::info!(run = %run_id, "a run of the job is live on another replica; fire recorded as skipped");
                    self.ctx
                        .metrics
                        .fire_not_run(RunStatus::Skipped, Reason::Overlap, 1);
                }
                NotStarted::Conflict(Conflict::Fenced) => {
                    tracing::warn!(run = %run_id, "this replica was fenced; the fire is left to the others");
                }
                NotStarted::Outage(fault) => {
                    // The writer logs the outage once; the fires are
                    // counted here and recorded when it ends.
                    tracing::debug!(run = %run_id, fault = fault.as_str(), "the database refused a run; it did not start");
                    if let Some(live) = live.as_ref().filter(|l| l.trigger != Trigger::Manual) {
                        self.unrecorded.add(live.job.clone(), live.scheduled_at);
                        self.ctx
                            .metrics
                            .fire_not_run(RunStatus::Missed, Reason::StoreUnavailable, 1);
                    }
                }
                NotStarted::Conflict(c) => {
                    tracing::error!(run = %run_id, error = %c, "a run could not be recorded and did not start");
                }
                NotStarted::Failed(e) => {
                    tracing::error!(run = %run_id, error = %e, "a run could not be recorded and did not start");
                }
            },
            // Aborted by `abort_all`, which recorded the run already.
            Err(e) if e.is_cancelled() && live.is_none() => {}
            // Aborted as an orphan (kind 3): record what the reaper decided.
            Err(e) if e.is_cancelled() && live.as_ref().is_some_and(|l| l.abort_outcome.is_some()) => {
                let now = self.ctx.clock.now();
                let outcome = live
                    .as_mut()
                    .and_then(|l| l.abort_outcome.take())
                    .unwrap_or_else(|| Outcome::failed("aborted"));
                if let Some(live) = &live {
                    self.ctx
                        .metrics
                        .run_finished(live.trigger, outcome.status, live.started_at, now);
                }
                let ack = self.ctx.store.runs().finish(run_id, outcome, now);
                self.recorders.spawn(async move {
                    match ack.await {
                        Ok(()) | Err(StoreError::Conflict(Conflict::NotFound | Conflict::AlreadyFinal)) => {}
                        Err(e) => {
                            tracing::error!(run = %run_id, error = %e, "could not record an aborted run");
                        }
                    }
                });
            }
            Err(e) => {
                let message = if e.is_panic() {
                    format!("the action panicked: {}", panic_message(e.into_panic()))
                } else {
                    "the run's task was aborted".to_owned()
                };
                tracing::error!(run = %run_id, error = %message, "run task failed");
                let now = self.ctx.clock.now();
                if let Some(live) = &live {
                    self.ctx
                        .metrics
                        .run_finished(live.trigger, RunStatus::Failed, live.started_at, now);
                }
                let ack = self
                    .ctx
                    .store
                    .runs()
                    .finish(run_id, Outcome::failed(message), now);
                self.recorders.spawn(async move {
                    if let Err(e) = ack.await {
                        tracing::error!(run = %run_id, error = %e, "could not record a panicked run");
                    }
                });
            }
        }
        self.ctx.metrics.set_running(self.live.len());
        if let Some(live) = live {
            let job_id = live.job.id;
            if let Some(slots) = self.jobs.get_mut(&job_id) {
                slots.running.retain(|r| *r != run_id);
                // Waiting runs start as soon as the job has room: replayed
                // fires first (they are older), then the queued one.
                let next = if slots.running.len() < admission::limit(&live.job.def.policy) {
                    slots.catch_up.pop_front()
                } else {
                    None
                };
                let next = next.or_else(|| slots.running.is_empty().then(|| slots.queued.take()).flatten());
                if let Some(next) = next {
                    self.start_waiting(next);
                }
            }
            if self.jobs.get(&job_id).is_some_and(Slots::is_idle) {
                self.jobs.remove(&job_id);
            }
        }
        while self.live.len() < self.config.max_running {
            let Some(next) = self.backlog.pop_front() else {
                break;
            };
            self.start_waiting(next);
        }
    }

    /// Stops admitting, waits up to the shutdown grace for running runs,
    /// cancels the rest, aborts what ignores cancellation, and records
    /// every final state. `kill_now` (a second signal) skips the waiting.
    pub async fn drain(&mut self, kill_now: CancellationToken) {
        // Stop admitting: close the channel; nothing queued starts any more.
        self.rx.close();
        let queued: Vec<Waiting> = self
            .jobs
            .values_mut()
            .flat_map(|s| s.catch_up.drain(..).chain(s.queued.take()).collect::<Vec<_>>())
            .chain(self.backlog.drain(..))
            .collect();
        for w in queued {
            self.finish_unstarted(
                w.run_id,
                Outcome::cancelled(Reason::Shutdown, "the service shut down"),
            );
        }
        while let Ok(cmd) = self.rx.try_recv() {
            if let Command::Trigger { reply, .. } = cmd {
                let _ = reply.send(Err(TriggerError::ShuttingDown));
            }
        }
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        let mut cancelled = false;
        let max_kill_grace = self
            .live
            .values()
            .map(|l| l.job.def.policy.kill_grace)
            .max()
            .unwrap_or_default();
        let hard_stop =
            tokio::time::sleep(self.config.shutdown_grace + max_kill_grace + Duration::from_millis(500));
        tokio::pin!(hard_stop);
        loop {
            tokio::select! {
                result = self.tasks.join_next_with_id() => match result {
                    Some(result) => self.task_ended(result),
                    None => break,
                },
                () = &mut grace, if !cancelled => {
                    cancelled = true;
                    tracing::info!(running = self.live.len(), "shutdown grace over: cancelling running runs");
                    for live in self.live.values() {
                        live.cancel.cancel(Reason::Shutdown);
                    }
                }
                () = kill_now.cancelled() => {
                    tracing::warn!(running = self.live.len(), "second signal: killing every run now");
                    self.abort_all();
                    break;
                }
                () = &mut hard_stop => {
                    tracing::warn!(running = self.live.len(), "runs ignored cancellation: aborting them");
                    self.abort_all();
                    break;
                }
            }
        }
        while let Some(result) = self.tasks.join_next_with_id().await {
            self.task_ended(result);
        }
        while self.recorders.join_next().await.is_some() {}
    }

    /// Aborts every run task (dropping one kills its process group) and
    /// records each as cancelled.
    fn abort_all(&mut self) {
        self.tasks.abort_all();
        let now = self.ctx.clock.now();
        for (run_id, live) in self.live.drain() {
            self.ctx
                .metrics
                .run_finished(live.trigger, RunStatus::Cancelled, live.started_at, now);
            let ack = self.ctx.store.runs().finish(
                run_id,
                Outcome::cancelled(Reason::Shutdown, "killed at shutdown"),
                now,
            );
            self.recorders.spawn(async move {
                let _ = ack.await;
            });
        }
        self.jobs.clear();
        self.ctx.metrics.set_running(0);
    }
}

fn too_late(now: DateTime<Utc>, due: DateTime<Utc>, grace: Duration) -> bool {
    let late = now - due;
    late.to_std().is_ok_and(|late| late > grace)
}
