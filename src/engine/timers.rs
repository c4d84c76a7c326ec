//! The timer heap: each active job's next fire, with no I/O.
//!
//! A job's heap item carries a generation; rescheduling a job (a change,
//! a fire) gives it a new one, so older items are stale and dropped when
//! they reach the top — no search, no removal from the middle of a heap.
//! Whole jobs are kept in memory only while they are about to fire: a job
//! not due within twice [`PREFETCH`] is let go and a second heap says when
//! to load it again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::plan::{Due, due_at, plan};
use super::{PREFETCH, delta};
use crate::job::{Job, JobId, Timing};
use crate::metrics::Metrics;
use crate::run::Reason;

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

/// Every job this engine schedules, and when each fires next.
#[derive(Default)]
pub(super) struct Timers {
    /// Active jobs (some may have no fire left, e.g. a once-job that ran).
    jobs: HashMap<JobId, Entry>,
    /// Paused jobs, counted and remembered for their metric series.
    paused: HashMap<JobId, Option<Arc<str>>>,
    /// Due instants.
    heap: Heap,
    /// Instants at which a job not in memory must be loaded.
    prefetch: Heap,
    generation: u64,
}

impl Timers {
    /// Forgets every job.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Active and paused jobs.
    pub fn counts(&self) -> (usize, usize) {
        (self.jobs.len(), self.paused.len())
    }

    /// Every job known, active or paused.
    pub fn ids(&self) -> Vec<JobId> {
        self.jobs.keys().chain(self.paused.keys()).copied().collect()
    }

    /// The name a job has its own metric series under, if any.
    pub fn monitored(&self, id: JobId) -> Option<Arc<str>> {
        match self.jobs.get(&id) {
            Some(e) => e.timing.monitor.clone(),
            None => self.paused.get(&id).cloned().flatten(),
        }
    }

    /// Forgets a job (and its metric series).
    pub fn remove(&mut self, id: JobId, metrics: &Metrics) {
        let previous = self.monitored(id);
        self.jobs.remove(&id);
        self.paused.remove(&id);
        forget_series(metrics, previous.as_ref(), None);
    }

    /// Puts a job on the heap from its cursor; fires due by `now` go to
    /// `due`, planned with `reason` for the late ones.
    pub fn schedule(
        &mut self,
        timing: Timing,
        job: Option<Arc<Job>>,
        now: DateTime<Utc>,
        reason: Reason,
        metrics: &Metrics,
        due: &mut Vec<(JobId, Due)>,
    ) {
        let id = timing.id;
        forget_series(metrics, self.monitored(id).as_ref(), timing.monitor.as_ref());
        if timing.paused {
            self.jobs.remove(&id);
            if let Some(name) = &timing.monitor {
                metrics.per_job.expected_by(name, None);
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
            self.advance(id, first, now, reason, metrics, due);
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
        metrics: &Metrics,
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
            metrics.per_job.expected_by(name, next_due.map(|d| d + grace));
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

    /// The earliest due instant, dropping stale heap items on the way.
    pub fn next_due(&mut self) -> Option<DateTime<Utc>> {
        let jobs = &self.jobs;
        live_top(&mut self.heap, |id, g| {
            jobs.get(&id).is_some_and(|e| e.generation == g)
        })
    }

    /// When the next job must be loaded.
    pub fn next_prefetch(&mut self) -> Option<DateTime<Utc>> {
        let jobs = &self.jobs;
        live_top(&mut self.prefetch, |id, g| {
            jobs.get(&id)
                .is_some_and(|e| e.generation == g && e.job.is_none())
        })
    }

    /// Plans every job whose next fire is due by `now`; its fires go to
    /// `due` and its following fire onto the heap.
    pub fn take_due(&mut self, now: DateTime<Utc>, metrics: &Metrics, due: &mut Vec<(JobId, Due)>) {
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
            self.advance(id, first, now, Reason::Misfire, metrics, due);
        }
    }

    /// The jobs to load whole by `now` (due within [`PREFETCH`]).
    pub fn take_prefetch(&mut self, now: DateTime<Utc>) -> Vec<JobId> {
        let mut ids = Vec::new();
        while let Some(at) = self.next_prefetch() {
            if at > now {
                break;
            }
            if let Some(Reverse((_, _, id))) = self.prefetch.pop() {
                ids.push(id);
            }
        }
        ids
    }

    /// Keeps `job` whole with its entry.
    pub fn attach(&mut self, job: Arc<Job>) {
        if let Some(entry) = self.jobs.get_mut(&job.id) {
            entry.job = Some(job);
        }
    }

    /// Whether a job is scheduled but not held whole.
    pub fn needs_job(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|e| e.job.is_none())
    }

    /// The whole job, if held.
    pub fn job(&self, id: JobId) -> Option<&Arc<Job>> {
        self.jobs.get(&id).and_then(|e| e.job.as_ref())
    }

    /// Lets go of the given jobs unless they fire again by `soon`.
    pub fn release_unless_due_by(&mut self, ids: &[JobId], soon: DateTime<Utc>) {
        for id in ids {
            if let Some(entry) = self.jobs.get_mut(id)
                && entry.next.is_none_or(|n| due_at(&entry.timing, n) > soon)
            {
                entry.job = None;
            }
        }
    }
}

/// Forgets a job's per-job series if its name (or monitoring) changes.
fn forget_series(metrics: &Metrics, old: Option<&Arc<str>>, new: Option<&Arc<str>>) {
    if let Some(old) = old
        && new != Some(old)
    {
        metrics.per_job.forget(old);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::ActionPolicy;
    use crate::job::{JobSpec, Source};

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn secs(s: i64) -> DateTime<Utc> {
        t0() + chrono::TimeDelta::seconds(s)
    }

    fn job(id: JobId, schedule: serde_json::Value, paused: bool) -> Arc<Job> {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "j",
            "schedule": schedule,
            "action": {"kind": "http", "url": "http://127.0.0.1:1/"},
        }))
        .unwrap();
        Arc::new(Job {
            id,
            def: spec.validate(&ActionPolicy::default()).unwrap(),
            paused,
            pause_note: None,
            source: Source::Api,
            version: 1,
            created_at: t0(),
            updated_at: t0(),
            cursor_at: t0(),
            runs_started: 0,
        })
    }

    fn every(s: &str) -> serde_json::Value {
        serde_json::json!({"kind": "interval", "every": s})
    }

    /// Steps `now` through `instants`, collecting each fire handed over.
    fn fires(timers: &mut Timers, metrics: &Metrics, instants: impl Iterator<Item = i64>) -> Vec<i64> {
        let mut out = Vec::new();
        for s in instants {
            let mut due = Vec::new();
            timers.take_due(secs(s), metrics, &mut due);
            out.extend(due.iter().map(|(_, d)| (d.scheduled_at - t0()).num_seconds()));
        }
        out
    }

    #[test]
    fn a_rescheduled_job_fires_on_its_new_schedule_only() {
        let (mut timers, metrics, id) = (Timers::default(), Metrics::new(), JobId::new());
        let mut due = Vec::new();
        let minutely = job(id, every("1m"), false);
        timers.schedule(
            Timing::of(&minutely),
            None,
            t0(),
            Reason::Misfire,
            &metrics,
            &mut due,
        );
        assert_eq!(timers.next_due(), Some(secs(60)));
        // Changed to every ten seconds: the item for +60 s is stale.
        let tenly = job(id, every("10s"), false);
        timers.schedule(
            Timing::of(&tenly),
            None,
            t0(),
            Reason::Misfire,
            &metrics,
            &mut due,
        );
        assert!(due.is_empty());
        assert_eq!(timers.next_due(), Some(secs(10)));
        let got = fires(&mut timers, &metrics, (1..=12).map(|i| i * 10));
        assert_eq!(got, (1..=12).map(|i| i * 10).collect::<Vec<_>>());
        // Changed to hourly: the item for +130 s is stale; the next fire is
        // the interval's next one (anchored at the job's creation).
        let hourly = job(id, every("1h"), false);
        timers.schedule(
            Timing::of(&hourly),
            None,
            secs(120),
            Reason::Misfire,
            &metrics,
            &mut due,
        );
        assert_eq!(timers.next_due(), Some(secs(3600)));
        assert!(fires(&mut timers, &metrics, [130, 600].into_iter()).is_empty());
    }

    #[test]
    fn a_removed_job_leaves_nothing_to_fire_or_load() {
        let (mut timers, metrics, id) = (Timers::default(), Metrics::new(), JobId::new());
        let hourly = job(id, every("1h"), false);
        timers.schedule(
            Timing::of(&hourly),
            None,
            t0(),
            Reason::Misfire,
            &metrics,
            &mut Vec::new(),
        );
        assert!(timers.next_due().is_some() && timers.next_prefetch().is_some());
        timers.remove(id, &metrics);
        assert_eq!((timers.next_due(), timers.next_prefetch()), (None, None));
        assert!(fires(&mut timers, &metrics, [3600, 7200].into_iter()).is_empty());
        assert_eq!(timers.counts(), (0, 0));
    }

    #[test]
    fn a_job_is_held_whole_only_while_it_fires_soon() {
        let (mut timers, metrics) = (Timers::default(), Metrics::new());
        let (often, rarely) = (JobId::new(), JobId::new());
        for (id, schedule) in [(often, every("1s")), (rarely, every("1h"))] {
            let j = job(id, schedule, false);
            timers.schedule(
                Timing::of(&j),
                Some(j.clone()),
                t0(),
                Reason::Misfire,
                &metrics,
                &mut Vec::new(),
            );
        }
        // Every second: kept, nothing to load. Hourly: let go, loaded again
        // PREFETCH before its fire, not earlier.
        assert!(timers.job(often).is_some());
        assert!(timers.needs_job(rarely));
        let load_at = secs(3600) - delta(PREFETCH);
        assert_eq!(timers.next_prefetch(), Some(load_at));
        assert!(
            timers
                .take_prefetch(load_at - chrono::TimeDelta::milliseconds(1))
                .is_empty()
        );
        assert_eq!(timers.take_prefetch(load_at), vec![rarely]);
        timers.attach(job(rarely, every("1h"), false));
        assert_eq!(timers.next_prefetch(), None);
        assert!(timers.job(rarely).is_some());
        // Loaded for a fire: kept if due by `soon`, let go otherwise.
        timers.release_unless_due_by(&[often, rarely], secs(3600));
        assert!(timers.job(often).is_some() && timers.job(rarely).is_some());
        timers.release_unless_due_by(&[often, rarely], secs(3599));
        assert!(timers.job(often).is_some() && timers.needs_job(rarely));
    }

    #[test]
    fn a_paused_job_is_counted_but_never_fires_until_resumed() {
        let (mut timers, metrics, id) = (Timers::default(), Metrics::new(), JobId::new());
        let paused = job(id, every("1s"), true);
        timers.schedule(
            Timing::of(&paused),
            None,
            t0(),
            Reason::Misfire,
            &metrics,
            &mut Vec::new(),
        );
        assert_eq!(timers.counts(), (0, 1));
        assert_eq!(timers.next_due(), None);
        assert!(fires(&mut timers, &metrics, 1..=5).is_empty());
        // Resumed at +5 s from a cursor of +5 s: fires from +6 s on.
        let mut resumed = Timing::of(&job(id, every("1s"), false));
        resumed.cursor_at = secs(5);
        timers.schedule(resumed, None, secs(5), Reason::Misfire, &metrics, &mut Vec::new());
        assert_eq!(timers.counts(), (1, 0));
        assert_eq!(fires(&mut timers, &metrics, 6..=8), vec![6, 7, 8]);
    }

    #[test]
    fn fires_handed_over_are_never_planned_again_from_an_older_cursor() {
        let (mut timers, metrics, id) = (Timers::default(), Metrics::new(), JobId::new());
        let j = job(id, every("1s"), false);
        timers.schedule(
            Timing::of(&j),
            None,
            t0(),
            Reason::Misfire,
            &metrics,
            &mut Vec::new(),
        );
        assert_eq!(fires(&mut timers, &metrics, 1..=3), vec![1, 2, 3]);
        // A change arrives whose stored cursor is still t0 (the fires are
        // not committed yet): planning goes on from +3 s, not from t0.
        let mut due = Vec::new();
        timers.schedule(Timing::of(&j), None, secs(3), Reason::Misfire, &metrics, &mut due);
        assert!(due.is_empty(), "{due:?}");
        assert_eq!(fires(&mut timers, &metrics, 4..=5), vec![4, 5]);
    }
}
