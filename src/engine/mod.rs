//! The engine: a timer heap over every active job's next fire.
//!
//! It sleeps until the earliest due instant, a committed job change, or
//! cancellation — never on a polling tick — and hands due fires to the
//! supervisor in one batch per wake-up. It keeps only what it needs in
//! memory (the job, its cursor, its next fire); the store stays the source
//! of truth, so a (re)started engine simply reloads it, and a fire already
//! recorded can never be recorded twice (unique `(job, scheduled_at)`).
//!
//! The engine also wakes at least every heartbeat interval to stamp its
//! heartbeat and to re-read the wall clock, which bounds the error when the
//! system clock is stepped while it sleeps.

mod plan;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::plan::{MAX_SCAN, Plan, due_at, plan};
use crate::clock::SharedClock;
use crate::fault::Faults;
use crate::health::{Health, Heartbeat};
use crate::job::{Job, JobId};
use crate::metrics::Metrics;
use crate::run::Reason;
use crate::store::{JobChange, Store, StoreError};
use crate::supervisor::{Fire, SupervisorHandle};

struct Entry {
    job: Arc<Job>,
    /// The last nominal fire handed over (or the store's cursor).
    cursor: DateTime<Utc>,
    /// Generation of the live heap item; older items are stale.
    generation: u64,
    /// The nominal fire the live heap item stands for.
    next: Option<DateTime<Utc>>,
}

/// What the engine works with.
#[derive(Clone)]
pub struct EngineContext {
    /// The source of truth.
    pub store: Store,
    /// Time.
    pub clock: SharedClock,
    /// Where due fires go.
    pub supervisor: SupervisorHandle,
    /// Readiness (schedule loaded).
    pub health: Arc<Health>,
    /// Job gauges and per-job series of monitored jobs.
    pub metrics: Arc<Metrics>,
    /// Longest sleep: the heartbeat period and wall-clock re-read.
    pub interval: Duration,
}

/// The engine and its state.
pub struct Engine {
    ctx: EngineContext,
    heartbeat: Arc<Heartbeat>,
    /// Active jobs (some may have no fire left, e.g. a once-job that ran).
    jobs: HashMap<JobId, Entry>,
    /// Paused jobs, counted and remembered for their metric series.
    paused: HashMap<JobId, Arc<Job>>,
    heap: BinaryHeap<Reverse<(DateTime<Utc>, u64, JobId)>>,
    generation: u64,
}

impl Engine {
    /// An engine with nothing loaded.
    pub fn new(ctx: EngineContext, heartbeat: Arc<Heartbeat>) -> Self {
        Self {
            ctx,
            heartbeat,
            jobs: HashMap::new(),
            paused: HashMap::new(),
            heap: BinaryHeap::new(),
            generation: 0,
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
        loop {
            faults.checkpoint(self.heartbeat.name()).await;
            let now = self.ctx.clock.now();
            self.fire_due(now);
            self.heartbeat.beat();
            let next = self.next_due();
            self.ctx.metrics.set_next_fire(next);
            let idle = now + TimeDelta::from_std(self.ctx.interval).unwrap_or(TimeDelta::seconds(1));
            let wake = next.map_or(idle, |due| due.min(idle));
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                change = changes.recv() => match change {
                    Some(change) => {
                        self.apply(change);
                        while let Ok(change) = changes.try_recv() {
                            self.apply(change);
                        }
                        self.publish_counts();
                    }
                    None => return Ok(()),
                },
                () = self.ctx.clock.sleep_until(wake) => {}
            }
        }
    }

    /// Replaces the in-memory schedule with the store's and plans each job
    /// from its cursor (downtime catch-up).
    async fn load(&mut self, changes: &mut mpsc::UnboundedReceiver<JobChange>) -> Result<(), StoreError> {
        self.ctx.health.set_schedule_loaded(false);
        // Changes committed before the load are in it; drop their notices.
        while changes.try_recv().is_ok() {}
        let jobs = self.ctx.store.load_jobs().await?;
        self.jobs.clear();
        self.paused.clear();
        self.heap.clear();
        self.restore_monitored(&jobs).await?;
        let now = self.ctx.clock.now();
        let mut fires = Vec::new();
        let count = jobs.len();
        for job in jobs {
            self.schedule(job, now, Reason::Downtime, &mut fires);
        }
        tracing::info!(jobs = count, due = fires.len(), "schedule loaded");
        self.ctx.supervisor.fire(fires);
        self.publish_counts();
        self.ctx.health.set_schedule_loaded(true);
        Ok(())
    }

    /// Restores the last success and failure of monitored jobs.
    async fn restore_monitored(&self, jobs: &[Arc<Job>]) -> Result<(), StoreError> {
        let monitored: Vec<&Arc<Job>> = jobs.iter().filter(|j| j.def.spec.monitor).collect();
        if monitored.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = monitored.iter().map(|j| j.id).collect();
        let outcomes = self.ctx.store.last_outcomes(&ids).await?;
        for job in monitored {
            if let Some((success, failure)) = outcomes.get(&job.id) {
                if let Some(at) = success {
                    self.ctx.metrics.job_outcome(job.name(), true, *at);
                }
                if let Some(at) = failure {
                    self.ctx.metrics.job_outcome(job.name(), false, *at);
                }
            }
        }
        Ok(())
    }

    fn publish_counts(&self) {
        self.ctx.metrics.set_jobs(self.jobs.len(), self.paused.len());
    }

    /// Forgets a job's per-job series if its name (or monitoring) changes.
    fn forget_series(&self, old: Option<&Arc<Job>>, new: Option<&Job>) {
        if let Some(old) = old.filter(|o| o.def.spec.monitor)
            && new.is_none_or(|n| n.name() != old.name() || !n.def.spec.monitor)
        {
            self.ctx.metrics.forget_job(old.name());
        }
    }

    /// Puts `job` on the heap from its cursor; fires due now go to `fires`.
    fn schedule(&mut self, job: Arc<Job>, now: DateTime<Utc>, reason: Reason, fires: &mut Vec<Fire>) {
        let id = job.id;
        let previous = self
            .jobs
            .get(&id)
            .map(|e| e.job.clone())
            .or_else(|| self.paused.get(&id).cloned());
        self.forget_series(previous.as_ref(), Some(&job));
        if job.paused {
            self.jobs.remove(&id);
            if job.def.spec.monitor {
                self.ctx.metrics.job_expected_by(job.name(), None);
            }
            self.paused.insert(id, job);
            return;
        }
        self.paused.remove(&id);
        // The engine may be ahead of the stored cursor (fires handed over
        // but not yet committed); never go back behind what it handed over.
        let cursor = self
            .jobs
            .get(&id)
            .map_or(job.cursor_at, |e| e.cursor.max(job.cursor_at));
        let first = if job.exhausted() {
            None
        } else {
            job.def.schedule.next_after(cursor)
        };
        self.jobs.insert(
            id,
            Entry {
                job,
                cursor,
                generation: 0,
                next: None,
            },
        );
        if let Some(first) = first {
            self.advance(id, first, now, reason, fires);
        }
    }

    /// Plans job `id` from the nominal fire `first` up to `now` and pushes
    /// its next fire on the heap.
    fn advance(
        &mut self,
        id: JobId,
        first: DateTime<Utc>,
        now: DateTime<Utc>,
        reason: Reason,
        fires: &mut Vec<Fire>,
    ) {
        let Some(entry) = self.jobs.get_mut(&id) else {
            return;
        };
        let planned = plan(&entry.job, first, now, reason);
        if let Some(last) = planned.fires.last() {
            entry.cursor = last
                .missed
                .map_or(last.scheduled_at, |m| m.until)
                .max(entry.cursor);
        }
        fires.extend(planned.fires);
        entry.next = planned.next;
        if entry.job.def.spec.monitor {
            // A dead man's switch: the next fire plus its grace.
            let grace = TimeDelta::from_std(entry.job.def.policy.misfire_grace).unwrap_or(TimeDelta::zero());
            let by = entry.next.map(|n| due_at(&entry.job, n) + grace);
            self.ctx.metrics.job_expected_by(entry.job.name(), by);
        }
        if let Some(next) = entry.next {
            self.generation += 1;
            entry.generation = self.generation;
            self.heap
                .push(Reverse((due_at(&entry.job, next), entry.generation, id)));
        }
    }

    fn apply(&mut self, change: JobChange) {
        match change {
            JobChange::Upserted(job) => {
                let mut fires = Vec::new();
                let now = self.ctx.clock.now();
                self.schedule(job, now, Reason::Misfire, &mut fires);
                self.ctx.supervisor.fire(fires);
            }
            JobChange::Removed(id) => {
                let previous = self
                    .jobs
                    .remove(&id)
                    .map(|e| e.job)
                    .or_else(|| self.paused.remove(&id));
                self.forget_series(previous.as_ref(), None);
                self.ctx.supervisor.job_removed(id);
            }
        }
    }

    /// The earliest due instant, dropping stale heap items on the way.
    fn next_due(&mut self) -> Option<DateTime<Utc>> {
        while let Some(Reverse((due, generation, id))) = self.heap.peek() {
            if self.jobs.get(id).is_some_and(|e| e.generation == *generation) {
                return Some(*due);
            }
            self.heap.pop();
        }
        None
    }

    fn fire_due(&mut self, now: DateTime<Utc>) {
        let mut fires = Vec::new();
        while let Some(due) = self.next_due() {
            if due > now {
                break;
            }
            let Some(Reverse((_, _, id))) = self.heap.pop() else {
                break;
            };
            let Some(first) = self.jobs.get_mut(&id).and_then(|e| e.next.take()) else {
                continue;
            };
            self.advance(id, first, now, Reason::Misfire, &mut fires);
        }
        self.ctx.supervisor.fire(fires);
    }
}
