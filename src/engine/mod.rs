//! The engine: a timer heap over every active job's next fire.
//!
//! It sleeps until the earliest due instant, a committed job change, or
//! cancellation — never on a polling tick — and hands due fires to the
//! supervisor in one batch per wake-up. It keeps only what it needs in
//! memory: per job a [`Timing`] (schedule, policy for late fires, cursor,
//! about 200 bytes), and the whole [`Job`] only while it is about to fire
//! (loaded [`PREFETCH`] ahead, kept while it fires often), so a million
//! registered jobs fit in a few hundred megabytes. The store stays the
//! source of truth, so a (re)started engine simply reloads it, and a fire
//! already recorded can never be recorded twice (unique `(job,
//! scheduled_at)`).
//!
//! The engine also wakes at least every heartbeat interval of the
//! *monotonic* clock to stamp its heartbeat and to re-read the wall clock,
//! so a step of the system clock never stops it: after a backward step
//! nothing fires until the wall clock passes each job's next instant again
//! (no fire is repeated, none is early) while the loop keeps beating;
//! after a forward step the fires it jumped over are handled like fires
//! found late (each job's misfire grace and catch-up policy). Each step is
//! logged once and counted in `cronguard_clock_steps_total`.
//!
//! With replicas ([`crate::cluster`]) it schedules only the jobs its
//! replica owns, re-reads jobs changed elsewhere, and re-plans on every
//! change of ownership; jobs it gains are planned from their stored cursor.

mod plan;
mod running;
mod timers;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::plan::{Due, MAX_SCAN, Plan, due_at, plan};
pub use self::running::EngineLoop;
use self::timers::Timers;
use crate::cluster::{Membership, Ownership};
use crate::fault::Faults;
use crate::health::{Health, Heartbeat};
use crate::job::{Job, JobId, Timing};
use crate::loops::Services;
use crate::run::Reason;
use crate::store::{JobChange, StoreError};
use crate::supervisor::{Fire, SupervisorHandle};

/// How long before its fire a job is loaded whole; a job firing again
/// within twice this stays loaded. Not a whole number of seconds: cron
/// fires fall on whole seconds, and the loads for second T + 2.5 then run
/// between the fires of T and T + 1 instead of beside them.
pub const PREFETCH: Duration = Duration::from_millis(2500);

/// What the engine works with.
#[derive(Clone)]
pub struct EngineContext {
    /// The source of truth; fire instants are wall-clock instants of its
    /// clock (a step of it is detected and logged); job gauges and the
    /// per-job series of monitored jobs.
    pub services: Services,
    /// Where due fires go.
    pub supervisor: SupervisorHandle,
    /// Readiness (schedule loaded).
    pub health: Arc<Health>,
    /// Longest sleep: the heartbeat period and wall-clock re-read.
    pub interval: Duration,
    /// Which jobs are this replica's (all of them on SQLite).
    pub membership: Arc<Membership>,
}

/// The engine and its state.
pub struct Engine {
    ctx: EngineContext,
    heartbeat: Arc<Heartbeat>,
    /// Every job scheduled here and when it fires next.
    timers: Timers,
    /// Which jobs are scheduled here, as of the last (re)load.
    ownership: Ownership,
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl Engine {
    /// An engine with nothing loaded.
    pub fn new(ctx: EngineContext, heartbeat: Arc<Heartbeat>) -> Self {
        let ownership = ctx.membership.ownership();
        Self {
            ownership,
            ctx,
            heartbeat,
            timers: Timers::default(),
        }
    }

    /// Loads every job, plans what was missed while the service was down,
    /// then fires jobs until `shutdown`. Changes arrive on `changes` in
    /// commit order.
    pub async fn run(
        &mut self,
        changes: &mut mpsc::UnboundedReceiver<JobChange>,
        shutdown: &CancellationToken,
        faults: &Faults,
    ) -> Result<(), StoreError> {
        self.heartbeat.beat();
        self.load(changes).await?;
        let mut steps = crate::clock::StepDetector::new();
        loop {
            faults.checkpoint(self.heartbeat.name()).await;
            let now = self.ctx.services.clock.now();
            if let Some(step) = steps.observe(now) {
                self.clock_stepped(step, now);
            }
            // Fires first: loading jobs for later fires must not delay them.
            self.fire_due(now).await?;
            self.fetch_upcoming(now).await?;
            self.heartbeat.beat();
            let next = self.timers.next_due();
            self.ctx.services.metrics.set_next_fire(next);
            let idle = now + delta(self.ctx.interval);
            let wake = [next, self.timers.next_prefetch()]
                .into_iter()
                .flatten()
                .fold(idle, DateTime::min);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                change = changes.recv() => match change {
                    Some(change) => {
                        let mut batch = vec![change];
                        while let Ok(change) = changes.try_recv() {
                            batch.push(change);
                        }
                        self.apply_all(batch).await?;
                        self.publish_counts();
                    }
                    None => return Ok(()),
                },
                () = self.ctx.services.clock.sleep_until(wake) => {}
                // After a backward step the wall clock takes long to reach
                // `wake`: beat and re-read meanwhile.
                () = tokio::time::sleep(self.ctx.interval) => {}
            }
        }
    }

    /// Logs and counts a step of the wall clock (once per step).
    fn clock_stepped(&mut self, step: crate::clock::Step, now: DateTime<Utc>) {
        let next = self.timers.next_due();
        match step {
            crate::clock::Step::Backward(by) => {
                self.ctx.services.metrics.clock_step("backward");
                tracing::warn!(
                    by_seconds = by.as_secs_f64(),
                    now = %now,
                    next_fire = ?next,
                    "the wall clock stepped backward: jobs fire again when it reaches their next instant (none is repeated)"
                );
            }
            crate::clock::Step::Forward(by) => {
                self.ctx.services.metrics.clock_step("forward");
                tracing::warn!(
                    by_seconds = by.as_secs_f64(),
                    now = %now,
                    "the wall clock stepped forward: fires jumped over follow each job's misfire grace and catch-up policy"
                );
            }
        }
    }

    /// Replaces the in-memory schedule with the store's and plans each job
    /// from its cursor (downtime catch-up).
    async fn load(&mut self, changes: &mut mpsc::UnboundedReceiver<JobChange>) -> Result<(), StoreError> {
        self.ctx.health.set_schedule_loaded(false);
        // Changes committed before the load are in it; drop their notices.
        while changes.try_recv().is_ok() {}
        self.ownership = self.ctx.membership.ownership();
        let timings = self.ctx.services.store.jobs().timings().await?;
        self.timers.clear();
        self.restore_monitored(&timings).await?;
        let now = self.ctx.services.clock.now();
        let mut due = Vec::new();
        let count = timings.len();
        for timing in timings {
            self.schedule(timing, None, now, Reason::Downtime, &mut due);
        }
        let fires = self.with_jobs(due).await?;
        tracing::info!(jobs = count, due = fires.len(), "schedule loaded");
        self.ctx.supervisor.fire(fires);
        self.publish_counts();
        self.ctx.health.set_schedule_loaded(true);
        Ok(())
    }

    /// Restores the per-job series of monitored jobs from their standing.
    async fn restore_monitored(&self, timings: &[Timing]) -> Result<(), StoreError> {
        let monitored: Vec<(JobId, &Arc<str>)> = timings
            .iter()
            .filter_map(|t| t.monitor.as_ref().map(|name| (t.id, name)))
            .collect();
        if monitored.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = monitored.iter().map(|(id, _)| *id).collect();
        let standings = self.ctx.services.store.jobs().standings(&ids).await?;
        for (id, name) in monitored {
            if let Some(s) = standings.get(&id) {
                self.ctx.services.metrics.per_job.restore(
                    name,
                    s.last_success_at,
                    s.last_failure_at,
                    s.consecutive_failures,
                );
            }
        }
        Ok(())
    }

    fn publish_counts(&self) {
        let (active, paused) = self.timers.counts();
        self.ctx.services.metrics.set_jobs(active, paused);
        self.ctx.membership.set_owned_jobs(active + paused);
    }

    /// Schedules a job this replica owns (and lets go of one it does not).
    fn schedule(
        &mut self,
        timing: Timing,
        job: Option<Arc<Job>>,
        now: DateTime<Utc>,
        reason: Reason,
        due: &mut Vec<(JobId, Due)>,
    ) {
        if self.ownership.owns(timing.id) {
            self.timers
                .schedule(timing, job, now, reason, &self.ctx.services.metrics, due);
        } else {
            self.timers.remove(timing.id, &self.ctx.services.metrics);
        }
    }

    /// Applies a batch of changes. With replicas a changed job is read
    /// again rather than taken from the change: reads made in order never
    /// go back in time, whereas a local change and a remote one may arrive
    /// in either order.
    async fn apply_all(&mut self, batch: Vec<JobChange>) -> Result<(), StoreError> {
        let shared = self.ctx.services.store.shared();
        let mut stale = Vec::new();
        let mut resync = false;
        for change in batch {
            match change {
                JobChange::Resync => resync = true,
                JobChange::Stale(ids) => stale.extend(ids),
                JobChange::Upserted(job) if shared => stale.push(job.id),
                change => self.apply(change),
            }
        }
        if resync {
            self.resync().await
        } else if stale.is_empty() {
            Ok(())
        } else {
            self.refresh(stale).await
        }
    }

    /// Re-reads the given jobs and schedules them (or drops the deleted).
    async fn refresh(&mut self, mut ids: Vec<JobId>) -> Result<(), StoreError> {
        ids.sort_unstable();
        ids.dedup();
        let jobs = self.ctx.services.store.jobs().get_many(&ids).await?;
        let found: HashSet<JobId> = jobs.iter().map(|j| j.id).collect();
        for job in jobs {
            self.apply(JobChange::Upserted(job));
        }
        for id in ids.into_iter().filter(|id| !found.contains(id)) {
            self.apply(JobChange::Removed(id));
        }
        Ok(())
    }

    /// Re-reads every job under the current ownership: schedules the jobs
    /// owned now (a job gained is planned from its stored cursor, so fires
    /// missed while its owner was gone follow its catch-up policy), lets go
    /// of the others, and drops jobs deleted unheard.
    async fn resync(&mut self) -> Result<(), StoreError> {
        self.ownership = self.ctx.membership.ownership();
        let timings = self.ctx.services.store.jobs().timings().await?;
        let now = self.ctx.services.clock.now();
        let mut due = Vec::new();
        let mut present = HashSet::with_capacity(timings.len());
        let before = self.timers.ids().len();
        for timing in timings {
            present.insert(timing.id);
            self.schedule(timing, None, now, Reason::Downtime, &mut due);
        }
        let gone: Vec<JobId> = self
            .timers
            .ids()
            .into_iter()
            .filter(|id| !present.contains(id))
            .collect();
        for id in gone {
            self.apply(JobChange::Removed(id));
        }
        let fires = self.with_jobs(due).await?;
        tracing::info!(
            owned = self.timers.ids().len(),
            before,
            due = fires.len(),
            "owned jobs re-planned"
        );
        self.ctx.supervisor.fire(fires);
        Ok(())
    }

    fn apply(&mut self, change: JobChange) {
        match change {
            JobChange::Upserted(job) => {
                let mut due = Vec::new();
                let now = self.ctx.services.clock.now();
                self.schedule(
                    Timing::of(&job),
                    Some(job.clone()),
                    now,
                    Reason::Misfire,
                    &mut due,
                );
                let fires = due.into_iter().map(|(_, d)| fire(&job, d)).collect();
                self.ctx.supervisor.fire(fires);
            }
            JobChange::Removed(id) => {
                self.timers.remove(id, &self.ctx.services.metrics);
                self.ctx.supervisor.job_removed(id);
            }
            JobChange::Stale(_) | JobChange::Resync => {
                tracing::error!("a re-read request reached the synchronous path; ignored");
            }
        }
    }

    /// Loads the jobs due within [`PREFETCH`] that are not in memory.
    async fn fetch_upcoming(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let ids = self.timers.take_prefetch(now);
        self.attach(ids).await
    }

    /// Loads the given jobs whole and keeps them with their entries.
    async fn attach(&mut self, ids: Vec<JobId>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        for job in self.ctx.services.store.jobs().get_many(&ids).await? {
            self.timers.attach(job);
        }
        Ok(())
    }

    /// Pairs planned fires with their jobs (loading any not in memory);
    /// fires of jobs deleted meanwhile are dropped with them.
    async fn with_jobs(&mut self, due: Vec<(JobId, Due)>) -> Result<Vec<Fire>, StoreError> {
        let mut missing: Vec<JobId> = due
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.timers.needs_job(*id))
            .collect();
        missing.dedup();
        self.attach(missing.clone()).await?;
        let mut fires = Vec::with_capacity(due.len());
        for (id, d) in due {
            if let Some(job) = self.timers.job(id) {
                fires.push(fire(job, d));
            }
        }
        // Loaded just for these fires: let go of those not due again soon.
        let soon = self.ctx.services.clock.now() + delta(PREFETCH * 2);
        self.timers.release_unless_due_by(&missing, soon);
        Ok(fires)
    }

    async fn fire_due(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut due = Vec::new();
        self.timers.take_due(now, &self.ctx.services.metrics, &mut due);
        if !due.is_empty() {
            if !self.ctx.membership.may_fire() {
                // The lease ran out: these jobs are the others' to fire
                // now (the re-plan that follows drops them here).
                tracing::warn!(
                    fires = due.len(),
                    "lease not current; leaving due fires to the other replicas"
                );
                return Ok(());
            }
            let fires = self.with_jobs(due).await?;
            self.ctx.supervisor.fire(fires);
        }
        Ok(())
    }
}

fn fire(job: &Arc<Job>, d: Due) -> Fire {
    Fire {
        job: job.clone(),
        scheduled_at: d.scheduled_at,
        due_at: d.due_at,
        trigger: d.trigger,
        missed: d.missed,
    }
}
