//! How runs start: now, or behind the global limit; the task spawned
//! once its row says `running`; a queued run that never starts.

use tokio::sync::oneshot;

use super::task::{self, Begin, Planned, RunCancel};
use super::{Fire, Live, Supervisor, TriggerError, Waiting, judged_late, too_late};
use crate::run::{Outcome, Reason, Run, RunId, RunStatus};
use crate::store::{Conflict, StoreError};

impl Supervisor {
    /// Starts now, or queues behind the global limit. `guard` (all but
    /// forced runs): how many runs of the job other replicas may have live
    /// for this one to start (see [`crate::store::Runs::claim`]).
    pub(super) fn start_or_backlog(
        &mut self,
        run_id: RunId,
        fire: Fire,
        guard: Option<u32>,
        reply: Option<oneshot::Sender<Result<Run, TriggerError>>>,
    ) {
        if self.live.len() < self.config.max_running {
            let row = self.new_row(run_id, &fire, RunStatus::Running, None);
            let ack = match guard {
                Some(guard) => self.ctx.services.store.runs().claim(row.clone(), guard),
                None => self.ctx.services.store.runs().insert(row.clone()),
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

    pub(super) fn spawn(
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
        let now = self.ctx.services.clock.now();
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
        self.ctx.services.metrics.set_running(self.live.len());
    }

    /// Starts a run that was waiting (its `queued` row already submitted).
    pub(super) fn start_waiting(&mut self, w: Waiting) {
        let now = self.ctx.services.clock.now();
        if judged_late(w.fire.trigger) && too_late(now, w.fire.due_at, w.fire.job.def.policy.misfire_grace) {
            let mut outcome = Outcome::failed("waited longer than the misfire grace");
            outcome.status = RunStatus::Missed;
            outcome.reason = Some(Reason::Misfire);
            outcome.attempts = 0;
            self.ctx
                .services
                .metrics
                .fire_not_run(RunStatus::Missed, Reason::Misfire, 1);
            return self.finish_unstarted(w.run_id, outcome);
        }
        let begin = Begin::Submitted(self.ctx.services.store.runs().start(w.run_id, now));
        self.spawn(w.run_id, w.fire, begin, w.cancel, None);
    }

    /// Records the end of a run that never started (queued, then dropped).
    pub(super) fn finish_unstarted(&mut self, run_id: RunId, mut outcome: Outcome) {
        outcome.attempts = 0;
        let ack = self
            .ctx
            .services
            .store
            .runs()
            .finish(run_id, outcome, self.ctx.services.clock.now());
        self.recorders.spawn(async move {
            if let Err(e) = ack.await
                && !matches!(e, StoreError::Conflict(Conflict::NotFound))
            {
                tracing::error!(run = %run_id, error = %e, "could not record the end of a queued run");
            }
        });
    }
}
