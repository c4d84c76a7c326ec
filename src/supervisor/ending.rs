//! How runs end: a task's end accounted for (finished, not started,
//! aborted, panicked), its slot freed for the runs waiting, and the drain
//! at shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::task::{NotStarted, TaskEnd};
use super::{Command, Live, Slots, Supervisor, TriggerError, Waiting, admission};
use crate::loops::panic_message;
use crate::run::{Outcome, Reason, RunId, RunStatus, Trigger};
use crate::store::{Conflict, StoreError};

impl Supervisor {
    pub(super) fn task_ended(&mut self, result: Result<(tokio::task::Id, TaskEnd), tokio::task::JoinError>) {
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
            Ok(TaskEnd::NotStarted(why)) => self.not_started(run_id, why, live.as_ref()),
            // Aborted by `abort_all`, which recorded the run already.
            Err(e) if e.is_cancelled() && live.is_none() => {}
            // Aborted as an orphan (kind 3): record what the reaper decided.
            Err(e) if e.is_cancelled() && live.as_ref().is_some_and(|l| l.abort_outcome.is_some()) => {
                let now = self.ctx.services.clock.now();
                let outcome = live
                    .as_mut()
                    .and_then(|l| l.abort_outcome.take())
                    .unwrap_or_else(|| Outcome::failed("aborted"));
                if let Some(live) = &live {
                    self.ctx.services.metrics.run_finished(
                        live.trigger,
                        outcome.status,
                        live.started_at,
                        now,
                    );
                }
                let ack = self.ctx.services.store.runs().finish(run_id, outcome, now);
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
                let now = self.ctx.services.clock.now();
                if let Some(live) = &live {
                    self.ctx.services.metrics.run_finished(
                        live.trigger,
                        RunStatus::Failed,
                        live.started_at,
                        now,
                    );
                }
                let ack = self
                    .ctx
                    .services
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
        self.ctx.services.metrics.set_running(self.live.len());
        if let Some(live) = live {
            self.free_slot(run_id, &live);
        }
        self.start_from_backlog();
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
        let now = self.ctx.services.clock.now();
        for (run_id, live) in self.live.drain() {
            self.ctx
                .services
                .metrics
                .run_finished(live.trigger, RunStatus::Cancelled, live.started_at, now);
            let ack = self.ctx.services.store.runs().finish(
                run_id,
                Outcome::cancelled(Reason::Shutdown, "killed at shutdown"),
                now,
            );
            self.recorders.spawn(async move {
                let _ = ack.await;
            });
        }
        self.jobs.clear();
        self.ctx.services.metrics.set_running(0);
    }

    /// Accounts for a run that was not recorded as started (nothing ran).
    fn not_started(&mut self, run_id: RunId, why: NotStarted, live: Option<&Live>) {
        match why {
            NotStarted::Conflict(Conflict::DuplicateFire) => {
                tracing::debug!(run = %run_id, "fire already recorded by an earlier attempt");
            }
            NotStarted::Conflict(Conflict::NotFound) => {
                tracing::debug!(run = %run_id, "job deleted before its run started");
            }
            NotStarted::Conflict(Conflict::LimitReached) => {
                tracing::info!(run = %run_id, "the job reached its max_runs; fire recorded as skipped");
                self.ctx
                    .services
                    .metrics
                    .fire_not_run(RunStatus::Skipped, Reason::LimitReached, 1);
            }
            NotStarted::Conflict(Conflict::Overlap) => {
                tracing::info!(run = %run_id, "a run of the job is live on another replica; fire recorded as skipped");
                self.ctx
                    .services
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
                if let Some(live) = live.filter(|l| l.trigger != Trigger::Manual) {
                    if live.job.def.spec.monitor {
                        // A dead man's switch must trip: hold "expected
                        // by" at this fire's deadline until it is recorded.
                        let grace = chrono::TimeDelta::from_std(live.job.def.policy.misfire_grace)
                            .unwrap_or(chrono::TimeDelta::MAX);
                        self.ctx
                            .services
                            .metrics
                            .per_job
                            .hold(live.job.name(), live.scheduled_at + grace);
                    }
                    self.unrecorded.add(live.job.clone(), live.scheduled_at);
                    self.ctx
                        .services
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
        }
    }

    /// Frees the run's slot in its job; the job's waiting runs start as
    /// soon as it has room: replayed fires first (they are older), then
    /// the queued one.
    fn free_slot(&mut self, run_id: RunId, live: &Live) {
        let job_id = live.job.id;
        if let Some(slots) = self.jobs.get_mut(&job_id) {
            slots.running.retain(|r| *r != run_id);
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

    /// Starts runs waiting for a global slot while slots are free.
    fn start_from_backlog(&mut self) {
        while self.live.len() < self.config.max_running {
            let Some(next) = self.backlog.pop_front() else {
                break;
            };
            self.start_waiting(next);
        }
    }
}
