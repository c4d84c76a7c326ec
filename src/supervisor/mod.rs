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
mod ending;
mod handle;
mod running;
mod starting;
mod task;
mod unrecorded;

#[cfg(test)]
#[cfg(feature = "fault-injection")]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::admission::{Admission, admit};
use self::handle::Command;
pub use self::handle::{Fire, LiveRun, Missed, Snapshot, SupervisorHandle, TriggerError};
pub use self::task::{Begin, NotStarted, Planned, RunCancel, TaskContext, TaskEnd};
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::job::{Job, JobId};
use crate::run::{Incarnation, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::Conflict;
use crate::store::{StorageFault, StoreError};

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
        if self.unrecorded.is_empty() || self.ctx.services.store.failing().is_some() {
            return;
        }
        for row in self.unrecorded.take_rows() {
            self.record(row, None);
        }
        for fire in self.unrecorded.take() {
            if fire.job.def.spec.monitor {
                self.ctx.services.metrics.per_job.release(fire.job.name());
            }
            tracing::warn!(
                job = %fire.job.id,
                from = %fire.scheduled_at,
                until = ?fire.missed.map(|m| m.until),
                fires = fire.missed.map_or(0, |m| m.fires),
                "recording the fires the database refused as missed"
            );
            let row = self.new_row(
                RunId::at(self.ctx.services.clock.now()),
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
                let now = self.ctx.services.clock.now();
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
        let now = self.ctx.services.clock.now();
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
            stderr: None,
            pid: None,
            pgid: None,
            process_start_ticks: None,
            incarnation: self.config.incarnation,
            attempt_log: Vec::new(),
        }
    }

    /// Records a decision row; replies with it once committed.
    fn record(&mut self, run: Run, reply: Option<oneshot::Sender<Result<Run, TriggerError>>>) {
        let ack = self.ctx.services.store.runs().insert(run.clone());
        let metrics = self.ctx.services.metrics.clone();
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
        let run_id = RunId::at(self.ctx.services.clock.now());
        if let Some(missed) = fire.missed {
            let row = self.new_row(run_id, &fire, RunStatus::Missed, Some(missed.reason));
            return self.record(row, reply);
        }
        let policy = &fire.job.def.policy;
        let now = self.ctx.services.clock.now();
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
}

fn too_late(now: DateTime<Utc>, due: DateTime<Utc>, grace: Duration) -> bool {
    let late = now - due;
    late.to_std().is_ok_and(|late| late > grace)
}
