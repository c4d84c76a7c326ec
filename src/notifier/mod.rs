//! The notifier loop: routes each recorded event to its destinations,
//! records `late` events, and delivers every notification at least once,
//! in order per destination, with backoff (docs/notifications.md).
//!
//! Events are written by the store in the commit of the change they
//! report, so a crash loses none: after a restart this loop finds them
//! `new` or `pending` and carries on. A row is claimed before each attempt
//! (replicas: one sends it) and keeps its id across attempts, so a
//! receiver can drop a repeat it already took.

mod metrics;
mod send;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::future::BoxFuture;

use crate::action::ActionPolicy;
use crate::executor::Executor;
use crate::job::{Job, JobId};
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::notification::{Defaults, Event, NotifySpec, Status};
use crate::store::{Notice, Route, Settled, StorageFault, StoreError};

pub use self::metrics::NotifyMetrics;

/// How often the loop looks for work.
const TICK: Duration = Duration::from_millis(500);
/// How often jobs are judged for lateness.
const LATE_EVERY: TimeDelta = TimeDelta::seconds(10);
/// How often the backlog gauges are refreshed.
const STATS_EVERY: TimeDelta = TimeDelta::seconds(5);
/// How often settled rows are pruned, and how long they are kept.
const PRUNE_EVERY: TimeDelta = TimeDelta::hours(1);
/// Sent and given-up notifications are kept this long (the API lists them).
pub const KEEP: TimeDelta = TimeDelta::days(7);
/// The longest wait between two attempts of one notification.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Events routed, and pending rows looked at, per round.
const BATCH: u32 = 500;

/// What the operator chose.
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Default events and destination.
    pub defaults: Defaults,
    /// Attempts stop this long after the event (`--notify-give-up-after`).
    pub give_up_after: Duration,
    /// Bound on one attempt.
    pub attempt_timeout: Duration,
    /// The SSRF guard's settings, for URLs read from secret references.
    pub actions: ActionPolicy,
}

/// The notifier loop.
pub struct Notifier {
    /// Store, clock, metrics.
    pub services: Services,
    /// Sends through the actions' guarded HTTP client.
    pub executor: Executor,
    /// Settings.
    pub config: NotifierConfig,
    /// Its own series.
    pub counters: NotifyMetrics,
    /// Overdue jobs already reported, with the deadline they passed.
    pub late: std::sync::Mutex<HashMap<JobId, DateTime<Utc>>>,
}

/// When each periodic chore is due next.
struct Chores {
    late: DateTime<Utc>,
    stats: DateTime<Utc>,
    prune: DateTime<Utc>,
}

impl Loop for Notifier {
    fn name(&self) -> &'static str {
        "notifier"
    }

    fn slack(&self) -> Duration {
        // A round may wait on one attempt per destination (concurrently).
        self.config.attempt_timeout
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx))
    }
}

impl Notifier {
    async fn run(self: Arc<Self>, cx: LoopCx) -> Result<(), LoopError> {
        let now = self.services.clock.now();
        let mut chores = Chores {
            late: now,
            stats: now,
            prune: now,
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            cx.beat.beat();
            cx.faults.checkpoint(cx.beat.name()).await;
            tokio::select! {
                biased;
                () = cx.stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match self.round(&mut chores).await {
                Ok(()) => {}
                // The database is out: the rows wait there (nothing is
                // lost); try again next round.
                Err(e) if StorageFault::outage(&e).is_some() => {
                    tracing::debug!(error = %e, "notifier round skipped: the database is out");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn round(&self, chores: &mut Chores) -> Result<(), StoreError> {
        let now = self.services.clock.now();
        if chores.late <= now {
            self.judge_late(now).await?;
            chores.late = now + LATE_EVERY;
        }
        self.route().await?;
        self.deliver().await?;
        if chores.stats <= now {
            let (counts, oldest) = self.services.store.notices().stats().await?;
            self.counters.backlog(&counts, oldest, now);
            chores.stats = now + STATS_EVERY;
        }
        if chores.prune <= now {
            let pruned = self.services.store.notices().prune(now - KEEP).await?;
            if pruned > 0 {
                tracing::info!(pruned, "old notifications pruned");
            }
            chores.prune = now + PRUNE_EVERY;
        }
        Ok(())
    }

    /// Publishes `job.health` `late` once per overdue job and deadline, and
    /// records a `late` notification for those that report it.
    async fn judge_late(&self, now: DateTime<Utc>) -> Result<(), StoreError> {
        let store = &self.services.store;
        let overdue: HashMap<JobId, DateTime<Utc>> = store
            .jobs()
            .timings()
            .await?
            .iter()
            .filter_map(|t| crate::standing::overdue(t, now).map(|by| (t.id, by)))
            .collect();
        let fresh: Vec<JobId> = {
            let mut seen = self
                .late
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.retain(|id, _| overdue.contains_key(id));
            overdue
                .iter()
                .filter(|(id, by)| seen.insert(**id, **by) != Some(**by))
                .map(|(id, _)| *id)
                .collect()
        };
        if fresh.is_empty() {
            return Ok(());
        }
        for job in store.jobs().get_many(&fresh).await? {
            let Some(by) = overdue.get(&job.id) else { continue };
            store
                .events()
                .publish([crate::events::Event::new(crate::events::Kind::JobHealth, now)
                    .job(job.id)
                    .name(job.def.spec.name.clone())
                    .status("late")
                    .detail(format!(
                        "expected to start by {}",
                        by.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ))]);
            if self
                .config
                .defaults
                .targets(notify(&job), Event::Late, true)
                .is_empty()
            {
                continue;
            }
            let name = job.def.spec.name.clone();
            match store
                .notices()
                .record_late(job.id.to_string(), name.clone(), *by, now)
                .await
            {
                Ok(true) => tracing::warn!(job = %name, expected_by = %by, "job is late"),
                Ok(false) => {}
                Err(e) => {
                    // Judged again next round.
                    self.late
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&job.id);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Replaces each new event by one row per destination (none: dropped).
    async fn route(&self) -> Result<(), StoreError> {
        let store = &self.services.store;
        let new = store.notices().oldest(Status::New, BATCH).await?;
        if new.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<JobId> = new.iter().filter_map(|n| n.message.job_id.parse().ok()).collect();
        ids.sort_unstable();
        ids.dedup();
        let jobs: HashMap<String, Arc<Job>> = store
            .jobs()
            .get_many(&ids)
            .await?
            .into_iter()
            .map(|j| (j.id.to_string(), j))
            .collect();
        let routes = new
            .iter()
            .map(|n| {
                // A deleted job's events go where the operator's default says.
                let spec = jobs.get(&n.message.job_id).and_then(|j| notify(j));
                let targets = self.config.defaults.targets(spec, n.message.event, n.first);
                Route {
                    seq: n.seq,
                    targets: targets
                        .iter()
                        .filter_map(|t| serde_json::to_string(t).ok())
                        .map(|t| (format!("msg_{}", uuid::Uuid::now_v7().simple()), t))
                        .collect(),
                }
            })
            .collect();
        store.notices().route(routes).await?;
        Ok(())
    }

    /// Sends what is due: per destination in order, stopping at the first
    /// that fails (it is retried first); destinations side by side.
    async fn deliver(&self) -> Result<(), StoreError> {
        let pending = self
            .services
            .store
            .notices()
            .oldest(Status::Pending, BATCH)
            .await?;
        let mut queues: Vec<(String, Vec<Notice>)> = Vec::new();
        for n in pending {
            let key = serde_json::to_string(&n.target).unwrap_or_default();
            match queues.iter_mut().find(|(k, _)| *k == key) {
                Some((_, q)) => q.push(n),
                None => queues.push((key, vec![n])),
            }
        }
        let sends = queues.into_iter().map(|(_, queue)| self.drain(queue));
        for done in futures_util::future::join_all(sends).await {
            done?;
        }
        Ok(())
    }

    /// Sends one destination's queue in order until an attempt fails or
    /// the head is not due.
    async fn drain(&self, queue: Vec<Notice>) -> Result<(), StoreError> {
        for n in queue {
            if !self.attempt(&n).await? {
                break;
            }
        }
        Ok(())
    }

    /// One attempt; whether the queue may move past `n` (sent or given up).
    async fn attempt(&self, n: &Notice) -> Result<bool, StoreError> {
        let (store, clock) = (&self.services.store, &self.services.clock);
        let now = clock.now();
        let (Some(id), Some(target)) = (&n.id, &n.target) else {
            return Ok(true);
        };
        let hold = TimeDelta::from_std(self.config.attempt_timeout * 2).unwrap_or(TimeDelta::MAX);
        if n.next_attempt_at > now || !store.notices().claim(n.seq, now, now + hold).await? {
            return Ok(false);
        }
        let event = n.message.event;
        let sent = match send::outgoing(
            target,
            &self.config.defaults,
            &self.config.actions,
            &n.message,
            id,
            now,
        ) {
            Ok(out) => {
                let timeout = self.config.attempt_timeout;
                self.executor.post(&out.url, out.headers, out.body, timeout).await
            }
            Err(why) => Err(why),
        };
        let at = clock.now();
        let Err(why) = sent else {
            store.notices().settle(n.seq, Settled::Sent, None, at).await?;
            self.counters.sent(event);
            tracing::info!(id, %event, job = %n.message.job_name, "notification sent");
            return Ok(true);
        };
        self.counters.attempt_failed(event);
        let give_up = TimeDelta::from_std(self.config.give_up_after).unwrap_or(TimeDelta::MAX);
        if at - n.message.occurred_at >= give_up {
            tracing::error!(id, %event, job = %n.message.job_name, error = %why, attempts = n.attempts + 1,
                "notification given up undelivered");
            store
                .notices()
                .settle(n.seq, Settled::GaveUp, Some(why), at)
                .await?;
            self.counters.given_up(event);
            return Ok(true);
        }
        if n.attempts == 0 {
            tracing::warn!(id, %event, job = %n.message.job_name, error = %why, "notification not delivered; retrying");
        }
        let next = at + TimeDelta::from_std(backoff(n.attempts + 1)).unwrap_or(TimeDelta::MAX);
        store
            .notices()
            .settle(n.seq, Settled::Retry(next), Some(why), at)
            .await?;
        Ok(false)
    }
}

/// A job's own notification settings, if it has any.
fn notify(job: &Job) -> Option<&NotifySpec> {
    job.def.spec.notify.as_ref()
}

/// The wait after the `failed`-th failed attempt: 1 s, doubling, at most
/// [`MAX_BACKOFF`].
pub fn backoff(failed: u32) -> Duration {
    Duration::from_secs(1u64 << failed.saturating_sub(1).min(5)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_doubles_to_its_bound() {
        let waits: Vec<u64> = (1..=8).map(|n| super::backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
