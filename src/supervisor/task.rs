//! The body of one run's task: record it, execute it, record its end.
//!
//! The order is the crash-safety argument: the `running` row is committed
//! before the action starts, so a crash at any point leaves a row that the
//! next incarnation finds and marks `orphaned`; the final state is committed
//! before the task ends, so the supervisor frees the job's slot (and starts
//! a queued run) only once the previous run is accounted for.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::TriggerError;
use crate::executor::{Executor, Limits, Occurrence};
use crate::job::Job;
use crate::loops::Services;
use crate::run::{Attempt, Outcome, Reason, Run, RunId, RunStatus, Trigger};
use crate::store::Conflict;
use crate::store::{Ack, StorageFault, StoreError};

/// A run's cancellation: the token and why it was pulled.
#[derive(Debug, Clone, Default)]
pub struct RunCancel {
    token: CancellationToken,
    reason: Arc<OnceLock<Reason>>,
}

impl RunCancel {
    /// Cancels for `reason`; the first reason given wins.
    pub fn cancel(&self, reason: Reason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// The token the executor watches.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why it was cancelled, if it was.
    pub fn reason(&self) -> Option<Reason> {
        self.reason.get().copied()
    }
}

/// How the run's row comes to say `running`: the supervisor submitted the
/// write (an insert, or the update of a queued row) and the task waits for
/// its commit before executing anything.
pub enum Begin {
    /// The submitted write.
    Submitted(Ack<()>),
}

/// Everything a run task needs; cloned per task.
#[derive(Clone)]
pub struct TaskContext {
    /// Where the run's start, attempts and end are committed; attempt
    /// timeouts, retry backoff and run times on its clock; runs started and
    /// finished.
    pub services: Services,
    /// Runs the action.
    pub executor: Executor,
}

/// How a task ended.
pub enum TaskEnd {
    /// The run was recorded as started and then finished.
    Finished(RunStatus),
    /// The run could not be recorded as started; nothing was executed.
    NotStarted(NotStarted),
}

/// Why a run was not recorded as started.
#[derive(Debug)]
pub enum NotStarted {
    /// The store refused the claim (a duplicate, a limit, a fence…).
    Conflict(Conflict),
    /// The database is out of service.
    Outage(StorageFault),
    /// Any other failure, in words.
    Failed(String),
}

impl From<&StoreError> for NotStarted {
    fn from(e: &StoreError) -> Self {
        match (e, StorageFault::outage(e)) {
            (StoreError::Conflict(c), _) => Self::Conflict(c.clone()),
            (_, Some(fault)) => Self::Outage(fault),
            (e, None) => Self::Failed(e.to_string()),
        }
    }
}

/// One run, ready to start.
pub struct Planned {
    /// Its job, as it was when the fire was admitted.
    pub job: Arc<Job>,
    /// Its id.
    pub run_id: RunId,
    /// Nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// When it should start (scheduled plus jitter); lateness is measured
    /// from here.
    pub due_at: DateTime<Utc>,
    /// Why it exists.
    pub trigger: Trigger,
    /// How its row becomes `running`.
    pub begin: Begin,
    /// Its cancellation.
    pub cancel: RunCancel,
    /// Who waits for the stored row (manual triggers), and the row.
    pub reply: Option<(oneshot::Sender<Result<Run, TriggerError>>, Run)>,
}

/// Records, executes and finishes one run.
pub async fn run(ctx: TaskContext, planned: Planned) -> TaskEnd {
    let Planned {
        job,
        run_id,
        scheduled_at,
        due_at,
        trigger,
        begin,
        cancel,
        reply,
    } = planned;
    let Begin::Submitted(ack) = begin;
    if let Err(e) = ack.await {
        let why = NotStarted::from(&e);
        if let Some((reply, mut run)) = reply {
            let answer = match e {
                // Recorded as skipped, as a local overlap would be.
                StoreError::Conflict(Conflict::Overlap) => {
                    run.status = RunStatus::Skipped;
                    run.reason = Some(Reason::Overlap);
                    run.started_at = None;
                    run.ended_at = Some(run.created_at);
                    Ok(run)
                }
                e => Err(TriggerError::Store(e)),
            };
            let _ = reply.send(answer);
        }
        return TaskEnd::NotStarted(why);
    }
    let started_at = ctx.services.clock.now();
    if let Some((reply, run)) = reply {
        let _ = reply.send(Ok(run));
    }
    ctx.services.metrics.run_started(trigger, due_at, started_at);

    let span = tracing::info_span!(
        "run",
        job = %job.id,
        job_name = %job.name(),
        run = %run_id,
        scheduled_at = %scheduled_at,
        trigger = %trigger,
        attempt = 1u32,
    );
    let outcome = attempts(&ctx, &job, run_id, scheduled_at, &cancel)
        .instrument(span)
        .await;

    let status = outcome.status;
    let ended_at = ctx.services.clock.now();
    match ctx.services.store.runs().finish(run_id, outcome, ended_at).await {
        // The job (and its history) was deleted while the run was going.
        Ok(()) | Err(StoreError::Conflict(Conflict::NotFound)) => {}
        Err(e) => tracing::error!(run = %run_id, error = %e, "could not record the end of a run"),
    }
    ctx.services
        .metrics
        .run_finished(trigger, status, started_at, ended_at);
    if job.def.spec.monitor
        && matches!(
            status,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::TimedOut
        )
    {
        ctx.services
            .metrics
            .per_job
            .outcome(job.name(), status == RunStatus::Succeeded, ended_at);
    }
    TaskEnd::Finished(status)
}

/// Runs the action, retrying failed or timed-out attempts per the job's
/// retry policy (inside this run, so the overlap policy sees one live run
/// throughout). Backoff waits on the service clock and ends early on
/// cancellation. Returns the last attempt's outcome with the attempt count
/// and, when there were retries, every attempt's summary.
async fn attempts(
    ctx: &TaskContext,
    job: &Job,
    run_id: RunId,
    scheduled_at: DateTime<Utc>,
    cancel: &RunCancel,
) -> Outcome {
    let retry = job.def.policy.retry;
    let limits = Limits {
        timeout: job.def.action.timeout(),
        kill_grace: job.def.policy.kill_grace,
    };
    let mut log = Vec::new();
    let mut attempt = 1;
    loop {
        tracing::Span::current().record("attempt", attempt);
        let started = ctx.services.clock.now();
        let mut outcome = if cancel.token().is_cancelled() {
            Outcome::cancelled(
                cancel.reason().unwrap_or(Reason::Requested),
                "cancelled before it started",
            )
        } else {
            let occurrence = Occurrence {
                job_id: job.id,
                job_name: job.name().to_owned(),
                run_id,
                scheduled_at,
                attempt,
            };
            ctx.executor
                .execute(&job.def.action, &occurrence, limits, cancel.token())
                .await
        };
        outcome.attempts = attempt;
        if outcome.status == RunStatus::Cancelled {
            outcome.reason = Some(cancel.reason().unwrap_or(Reason::Requested));
        }
        let retryable = matches!(outcome.status, RunStatus::Failed | RunStatus::TimedOut);
        if retry.max_attempts > 1 {
            log.push(Attempt {
                attempt,
                started_at: started,
                ended_at: ctx.services.clock.now(),
                status: outcome.status,
                exit_code: outcome.exit_code,
                http_status: outcome.http_status,
                error: outcome.error.clone(),
                retry_at: None,
            });
        }
        if !retryable || attempt >= retry.max_attempts || cancel.token().is_cancelled() {
            // Successes are the bulk at thousands of fires per second: debug.
            if outcome.status == RunStatus::Succeeded {
                tracing::debug!(status = %outcome.status, "run ended");
            } else {
                tracing::info!(status = %outcome.status, error = outcome.error.as_deref(), "run ended");
            }
            outcome.attempt_log = log;
            return outcome;
        }
        let delay = retry.delay_before(attempt + 1);
        // The backoff counts from the attempt's end, not from after the
        // store write below: a slow commit must not stretch the wait.
        let ended = log
            .last()
            .map_or_else(|| ctx.services.clock.now(), |a| a.ended_at);
        let retry_at = ended
            .checked_add_signed(TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        if let Some(last) = log.last_mut() {
            last.retry_at = Some(retry_at);
        }
        tracing::info!(
            status = %outcome.status,
            error = outcome.error.as_deref(),
            retry_in_ms = delay.as_millis() as u64,
            %retry_at,
            "attempt failed; retrying"
        );
        if let Err(e) = ctx
            .services
            .store
            .runs()
            .record_attempt(run_id, attempt, log.clone())
            .await
        {
            tracing::warn!(error = %e, "could not record an attempt");
        }
        tokio::select! {
            () = ctx.services.clock.sleep_until(retry_at) => {}
            () = cancel.token().cancelled() => {
                let mut cancelled = Outcome::cancelled(
                    cancel.reason().unwrap_or(Reason::Requested),
                    "cancelled while waiting to retry",
                );
                cancelled.attempts = attempt;
                cancelled.attempt_log = log;
                return cancelled;
            }
        }
        attempt += 1;
    }
}
