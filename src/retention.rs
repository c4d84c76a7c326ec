//! History retention: keeps each job's run history within its bounds.
//!
//! Bounds per job: its policy's `history.keep_last` / `history.max_age`, or
//! the service defaults (`--history-keep-last`, `--history-max-age`). Only
//! finished runs are deleted, never a queued or running one. Deletes go
//! through the store writer in small batches, so other writes (fires, API
//! calls) interleave and nothing waits on a long delete. The loop is
//! supervised and beats its heartbeat between batches.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use tokio_util::sync::CancellationToken;

use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::run::RunId;
use crate::store::{StorageFault, StoreError};

/// Runs deleted per write.
pub const BATCH: u32 = 500;

/// Service-wide history bounds.
#[derive(Debug, Clone, Copy)]
pub struct HistoryDefaults {
    /// Finished runs kept per job (`None`: unbounded).
    pub keep_last: Option<u32>,
    /// Oldest finished run kept (`None`: unbounded).
    pub max_age: Option<Duration>,
}

/// The retention loop.
pub struct Retention {
    /// The history it prunes; ages are measured on its clock.
    pub services: Services,
    /// Service defaults.
    pub defaults: HistoryDefaults,
    /// Time between passes.
    pub interval: Duration,
}

impl Retention {
    /// Prunes on every tick until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        heartbeat: Arc<Heartbeat>,
        faults: Arc<Faults>,
    ) -> Result<(), LoopError> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Jobs with runs newer than this are checked against keep-last;
        // the first pass checks every job.
        let mut seen: Option<RunId> = None;
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    match self.pass(&mut seen, &heartbeat, &shutdown).await {
                        Ok(0) => {}
                        Ok(deleted) => tracing::info!(deleted, "run history pruned"),
                        // The database is out: try again next pass (the
                        // restart budget is for crashes).
                        Err(e) if StorageFault::outage(&e).is_some() => {
                            tracing::debug!(error = %e, "retention pass skipped: the database is out");
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// One pass; returns how many runs were deleted.
    pub async fn pass(
        &self,
        seen: &mut Option<RunId>,
        heartbeat: &Heartbeat,
        shutdown: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let now = self.services.clock.now();
        let ago = |d: Duration| now - TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        let overrides = self.services.store.history().overrides().await?;
        let mut deleted = 0;

        // Age, service default (jobs with their own max age excluded).
        if let Some(age) = self.defaults.max_age {
            loop {
                let n = self.services.store.history().prune_old(ago(age), BATCH).await?;
                deleted += n;
                heartbeat.beat();
                if n < u64::from(BATCH) || shutdown.is_cancelled() {
                    break;
                }
            }
        }

        // Count (and per-job age) for jobs with new runs, plus every job
        // with its own max age (its runs age even without new ones).
        let (touched, newest) = self.services.store.history().jobs_with_runs_since(*seen).await?;
        let mut jobs = touched;
        jobs.extend(
            overrides
                .iter()
                .filter(|(_, (_, age))| age.is_some())
                .map(|(id, _)| *id),
        );
        jobs.sort_unstable();
        jobs.dedup();
        for job in jobs {
            let (keep, age_ms) = overrides.get(&job).copied().unwrap_or((None, None));
            let keep_last = keep.or(self.defaults.keep_last);
            let older_than = age_ms.map(|ms| now - TimeDelta::milliseconds(ms));
            if keep_last.is_none() && older_than.is_none() {
                continue;
            }
            loop {
                let n = self
                    .services
                    .store
                    .history()
                    .prune_job(job, keep_last, older_than, BATCH)
                    .await?;
                deleted += n;
                heartbeat.beat();
                if n < u64::from(BATCH) || shutdown.is_cancelled() {
                    break;
                }
            }
            if shutdown.is_cancelled() {
                return Ok(deleted);
            }
        }
        *seen = newest.or(*seen);
        Ok(deleted)
    }
}

impl Loop for Retention {
    fn name(&self) -> &'static str {
        "retention"
    }

    fn slack(&self) -> Duration {
        self.interval
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx.stop, cx.beat, cx.faults))
    }
}
