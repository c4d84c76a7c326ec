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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::plan::{Due, MAX_SCAN, Plan, due_at, plan};
pub use self::running::EngineLoop;
use crate::clock::SharedClock;
use crate::cluster::{Membership, Ownership};
use crate::fault::Faults;
use crate::health::{Health, Heartbeat};
use crate::job::{Job, JobId, Timing};
use crate::metrics::Metrics;
use crate::run::Reason;
use crate::store::{JobChange, Store, StoreError};
use crate::supervisor::{Fire, SupervisorHandle};

/// How long before its fire a job is loaded whole; a job firing again
/// within twice this stays loaded. Not a whole number of seconds: cron
/// fires fall on whole seconds, and the loads for second T + 2.5 then run
/// between the fires of T and T + 1 instead of beside them.
pub const PREFETCH: Duration = Duration::from_millis(2500);

struct Entry {
    timing: Timing,
    /// The whole job, while it is about to fire.
    job: Option<Arc<Job>>,
    /// The last nominal fire handed over (or the store's cursor).
    cursor: DateTime<Utc>,
    /// Generation of the live heap item; older items are stale.
    generation: u64,
    /// The nominal fire the live heap item stands for.
    next: Option<DateTime<Utc>>,
}

/// A heap of `(instant, generation, job)`, earliest first.
type Heap = BinaryHeap<Reverse<(DateTime<Utc>, u64, JobId)>>;

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
    /// Which jobs are this replica's (all of them on SQLite).
    pub membership: Arc<Membership>,
}

/// The engine and its state.
pub struct Engine {
    ctx: EngineContext,
    heartbeat: Arc<Heartbeat>,
    /// Active jobs (some may have no fire left, e.g. a once-job that ran).
    jobs: HashMap<JobId, Entry>,
    /// Paused jobs, counted and remembered for their metric series.
    paused: HashMap<JobId, Option<Arc<str>>>,
    /// Due instants.
    heap: Heap,
    /// Instants at which a job not in memory must be loaded.
    prefetch: Heap,
    generation: u64,
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
            jobs: HashMap::new(),
            paused: HashMap::new(),
            heap: BinaryHeap::new(),
            prefetch: BinaryHeap::new(),
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
        let mut steps = crate::clock::StepDetector::new();
        loop {
            faults.checkpoint(self.heartbeat.name()).await;
            let now = self.ctx.clock.now();
            if let Some(step) = steps.observe(now) {
                self.clock_stepped(step, now);
            }
            // Fires first: loading jobs for later fires must not delay them.
            self.fire_due(now).await?;
            self.fetch_upcoming(now).await?;
            self.heartbeat.beat();
            let next = self.next_due();
            self.ctx.metrics.set_next_fire(next);
            let idle = now + delta(self.ctx.interval);
            let wake = [next, self.next_prefetch()]
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
                () = self.ctx.clock.sleep_until(wake) => {}
                // After a backward step the wall clock takes long to reach
                // `wake`: beat and re-read meanwhile.
                () = tokio::time::sleep(self.ctx.interval) => {}
            }
        }
    }

    /// Logs and counts a step of the wall clock (once per step).
    fn clock_stepped(&mut self, step: crate::clock::Step, now: DateTime<Utc>) {
        let next = self.next_due();
        match step {
            crate::clock::Step::Backward(by) => {
                self.ctx.metrics.clock_step("backward");
                tracing::warn!(
                    by_seconds = by.as_secs_f64(),
                    now = %now,
                    next_fire = ?next,
                    "the wall clock stepped backward: jobs fire again when it reaches their next instant (none is repeated)"
                );
            }
            crate::clock::Step::Forward(by) => {
                self.ctx.metrics.clock_step("forward");
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
        let timings = self.ctx.store.load_timings().await?;
        self.jobs.clear();
        self.paused.clear();
        self.heap.clear();
        self.prefetch.clear();
        self.restore_monitored(&timings).await?;
        let now = self.ctx.clock.now();
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

    /// Restores the last success and failure of monitored jobs.
    async fn restore_monitored(&self, timings: &[Timing]) -> Result<(), StoreError> {
        let monitored: Vec<(JobId, &Arc<str>)> = timings
            .iter()
            .filter_map(|t| t.monitor.as_ref().map(|name| (t.id, name)))
            .collect();
        if monitored.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = monitored.iter().map(|(id, _)| *id).collect();
        let outcomes = self.ctx.store.last_outcomes(&ids).await?;
        for (id, name) in monitored {
            if let Some((success, failure)) = outcomes.get(&id) {
                if let Some(at) = success {
                    self.ctx.metrics.job_outcome(name, true, *at);
                }
                if let Some(at) = failure {
                    self.ctx.metrics.job_outcome(name, false, *at);
                }
            }
        }
        Ok(())
    }

    fn publish_counts(&self) {
        self.ctx.metrics.set_jobs(self.jobs.len(), self.paused.len());
        self.ctx
            .membership
            .set_owned_jobs(self.jobs.len() + self.paused.len());
    }

    /// Forgets a job's per-job series if its name (or monitoring) changes.
    fn forget_series(&self, old: Option<&Arc<str>>, new: Option<&Arc<str>>) {
        if let Some(old) = old
            && new != Some(old)
        {
            self.ctx.metrics.forget_job(old);
        }
    }

    /// The monitored name a job had, if any.
    fn monitored(&self, id: JobId) -> Option<Arc<str>> {
        match self.jobs.get(&id) {
            Some(e) => e.timing.monitor.clone(),
            None => self.paused.get(&id).cloned().flatten(),
        }
    }

    /// Puts a job on the heap from its cursor; fires due now go to `due`.
    fn schedule(
        &mut self,
        timing: Timing,
        job: Option<Arc<Job>>,
        now: DateTime<Utc>,
        reason: Reason,
        due: &mut Vec<(JobId, Due)>,
    ) {
        let id = timing.id;
        if !self.ownership.owns(id) {
            return self.disown(id);
        }
        self.forget_series(self.monitored(id).as_ref(), timing.monitor.as_ref());
        if timing.paused {
            self.jobs.remove(&id);
            if let Some(name) = &timing.monitor {
                self.ctx.metrics.job_expected_by(name, None);
            }
            self.paused.insert(id, timing.monitor);
            return;
        }
        self.paused.remove(&id);
        // The engine may be ahead of the stored cursor (fires handed over
        // but not yet committed); never go back behind what it handed over.
        let cursor = self
            .jobs
            .get(&id)
            .map_or(timing.cursor_at, |e| e.cursor.max(timing.cursor_at));
        let first = timing.next_after(cursor);
        self.jobs.insert(
            id,
            Entry {
                timing,
                job,
                cursor,
                generation: 0,
                next: None,
            },
        );
        if let Some(first) = first {
            self.advance(id, first, now, reason, due);
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
        due: &mut Vec<(JobId, Due)>,
    ) {
        let Some(entry) = self.jobs.get_mut(&id) else {
            return;
        };
        let planned = plan(&entry.timing, first, now, reason);
        if let Some(last) = planned.fires.last() {
            entry.cursor = last
                .missed
                .map_or(last.scheduled_at, |m| m.until)
                .max(entry.cursor);
        }
        due.extend(planned.fires.into_iter().map(|d| (id, d)));
        entry.next = planned.next;
        let next_due = entry.next.map(|n| due_at(&entry.timing, n));
        if let Some(name) = &entry.timing.monitor {
            // A dead man's switch: the next fire plus its grace.
            let grace = delta(entry.timing.misfire_grace);
            self.ctx
                .metrics
                .job_expected_by(name, next_due.map(|d| d + grace));
        }
        let Some(next_due) = next_due else {
            entry.job = None;
            return;
        };
        self.generation += 1;
        entry.generation = self.generation;
        self.heap.push(Reverse((next_due, entry.generation, id)));
        // Keep the whole job only if it fires again soon; otherwise load
        // it again shortly before its next fire.
        if next_due > now + delta(PREFETCH * 2) {
            entry.job = None;
        }
        if entry.job.is_none() {
            let at = next_due - delta(PREFETCH);
            self.prefetch.push(Reverse((at, entry.generation, id)));
        }
    }

    /// Applies a batch of changes. With replicas a changed job is read
    /// again rather than taken from the change: reads made in order never
    /// go back in time, whereas a local change and a remote one may arrive
    /// in either order.
    async fn apply_all(&mut self, batch: Vec<JobChange>) -> Result<(), StoreError> {
        let shared = self.ctx.store.shared();
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
        let jobs = self.ctx.store.get_jobs(&ids).await?;
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
        let timings = self.ctx.store.load_timings().await?;
        let now = self.ctx.clock.now();
        let mut due = Vec::new();
        let mut present = HashSet::with_capacity(timings.len());
        let before = self.jobs.len() + self.paused.len();
        for timing in timings {
            present.insert(timing.id);
            self.schedule(timing, None, now, Reason::Downtime, &mut due);
        }
        let gone: Vec<JobId> = self
            .jobs
            .keys()
            .chain(self.paused.keys())
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.apply(JobChange::Removed(id));
        }
        let fires = self.with_jobs(due).await?;
        tracing::info!(
            owned = self.jobs.len() + self.paused.len(),
            before,
            due = fires.len(),
            "owned jobs re-planned"
        );
        self.ctx.supervisor.fire(fires);
        Ok(())
    }

    /// Stops scheduling a job another replica owns now. Its runs here go
    /// on (the owner's claims see them: the overlap policy holds).
    fn disown(&mut self, id: JobId) {
        let previous = self.monitored(id);
        self.jobs.remove(&id);
        self.paused.remove(&id);
        self.forget_series(previous.as_ref(), None);
    }

    fn apply(&mut self, change: JobChange) {
        match change {
            JobChange::Upserted(job) => {
                let mut due = Vec::new();
                let now = self.ctx.clock.now();
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
                let previous = self.monitored(id);
                self.jobs.remove(&id);
                self.paused.remove(&id);
                self.forget_series(previous.as_ref(), None);
                self.ctx.supervisor.job_removed(id);
            }
            JobChange::Stale(_) | JobChange::Resync => {
                tracing::error!("a re-read request reached the synchronous path; ignored");
            }
        }
    }

    /// The earliest due instant, dropping stale heap items on the way.
    fn next_due(&mut self) -> Option<DateTime<Utc>> {
        let jobs = &self.jobs;
        live_top(&mut self.heap, |id, g| {
            jobs.get(&id).is_some_and(|e| e.generation == g)
        })
    }

    /// When the next job must be loaded.
    fn next_prefetch(&mut self) -> Option<DateTime<Utc>> {
        let jobs = &self.jobs;
        live_top(&mut self.prefetch, |id, g| {
            jobs.get(&id)
                .is_some_and(|e| e.generation == g && e.job.is_none())
        })
    }

    /// Loads the jobs due within [`PREFETCH`] that are not in memory.
    async fn fetch_upcoming(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut ids = Vec::new();
        while let Some(at) = self.next_prefetch() {
            if at > now {
                break;
            }
            if let Some(Reverse((_, _, id))) = self.prefetch.pop() {
                ids.push(id);
            }
        }
        self.attach(ids).await
    }

    /// Loads the given jobs whole and keeps them with their entries.
    async fn attach(&mut self, ids: Vec<JobId>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        for job in self.ctx.store.get_jobs(&ids).await? {
            if let Some(entry) = self.jobs.get_mut(&job.id) {
                entry.job = Some(job);
            }
        }
        Ok(())
    }

    /// Pairs planned fires with their jobs (loading any not in memory);
    /// fires of jobs deleted meanwhile are dropped with them.
    async fn with_jobs(&mut self, due: Vec<(JobId, Due)>) -> Result<Vec<Fire>, StoreError> {
        let mut missing: Vec<JobId> = due
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.jobs.get(id).is_some_and(|e| e.job.is_none()))
            .collect();
        missing.dedup();
        self.attach(missing.clone()).await?;
        let mut fires = Vec::with_capacity(due.len());
        for (id, d) in due {
            if let Some(job) = self.jobs.get(&id).and_then(|e| e.job.as_ref()) {
                fires.push(fire(job, d));
            }
        }
        // Loaded just for these fires: let go of those not due again soon.
        let soon = self.ctx.clock.now() + delta(PREFETCH * 2);
        for id in missing {
            if let Some(entry) = self.jobs.get_mut(&id)
                && entry.next.is_none_or(|n| due_at(&entry.timing, n) > soon)
            {
                entry.job = None;
            }
        }
        Ok(fires)
    }

    async fn fire_due(&mut self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let mut due = Vec::new();
        while let Some(at) = self.next_due() {
            if at > now {
                break;
            }
            let Some(Reverse((_, _, id))) = self.heap.pop() else {
                break;
            };
            let Some(first) = self.jobs.get_mut(&id).and_then(|e| e.next.take()) else {
                continue;
            };
            self.advance(id, first, now, Reason::Misfire, &mut due);
        }
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

/// The earliest live item of `heap`, dropping stale ones on the way.
fn live_top(heap: &mut Heap, live: impl Fn(JobId, u64) -> bool) -> Option<DateTime<Utc>> {
    while let Some(Reverse((at, generation, id))) = heap.peek() {
        if live(*id, *generation) {
            return Some(*at);
        }
        heap.pop();
    }
    None
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
