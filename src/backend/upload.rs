//! The `uploader` loop: drain the outbox to the backend, in commit order.
//!
//! Delivery is at least once: an entry is deleted only after the backend
//! acknowledged the batch holding it (any 2xx), so a crash between the
//! acknowledgement and the delete sends it again; a backend that
//! deduplicates by `run_id` sees every result once. Failures back off
//! exponentially (1 s doubling to `--backend-max-backoff`, each wait drawn
//! from its upper half) and honour `Retry-After` up to that same cap; a
//! wait ends early when a pull succeeds (the backend is back). A 413
//! halves the batch. The outbox is bounded: beyond `--outbox-limit` the
//! oldest entries are dropped, logged and counted in
//! `cronguard_backend_outbox_dropped_total` — rejection reports first, run
//! results only when results alone exceed the limit.
//!
//! An idle uploader writes nothing: it reads the outbox's size, and only
//! trims (a commit) when it is over the limit, so its own commits do not
//! wake it again and again.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::{BackendClient, CallError};
use super::contact::{Contact, Direction};
use super::metrics::SyncMetrics;
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::protocol::{Rejection, RejectionSummary, ResultBatch, RunResult};
use crate::run::Incarnation;
use crate::store::{OutboxEntry, StoreError};

/// First retry delay.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// How often the outbox gauges are refreshed while idle.
const IDLE_REFRESH: Duration = Duration::from_secs(5);

/// The upload loop and what it needs.
pub struct Uploader {
    /// The backend.
    pub client: BackendClient,
    /// The outbox it drains, and the clock that stamps each attempt and
    /// contact.
    pub services: Services,
    /// Shared contact state.
    pub contact: Arc<Contact>,
    /// Upload and outbox counters.
    pub counters: SyncMetrics,
    /// This process.
    pub incarnation: Incarnation,
    /// Entries kept at most.
    pub limit: u64,
    /// Entries per upload.
    pub batch: usize,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Notified after commits.
    pub signal: Arc<Notify>,
}

/// A batch ready to send.
struct Prepared {
    batch: ResultBatch,
    seqs: Vec<i64>,
}

impl Uploader {
    /// Uploads until `shutdown`. Store failures end the loop (its
    /// supervisor restarts it); backend failures are retried.
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        heartbeat: Arc<Heartbeat>,
        faults: Arc<Faults>,
    ) -> Result<(), LoopError> {
        let mut backoff = INITIAL_BACKOFF;
        let mut batch_size = self.batch;
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            if self.refresh_gauges().await? > self.limit {
                let dropped = self.services.store.outbox().trim(self.limit).await?;
                if dropped > 0 {
                    self.counters.dropped(dropped);
                    tracing::error!(
                        dropped,
                        limit = self.limit,
                        "outbox over its limit: the oldest undelivered entries were dropped"
                    );
                }
                self.refresh_gauges().await?;
            }
            let entries = self.services.store.outbox().peek(batch_size as u32).await?;
            let empty = entries.is_empty();
            let Some(prepared) = self.prepare(entries).await? else {
                if !empty {
                    continue; // only unreadable entries, now dropped
                }
                if !heartbeat.idle(IDLE_REFRESH, Some(&self.signal), &shutdown).await {
                    return Ok(());
                }
                continue;
            };
            self.contact.attempt(Direction::Push, self.services.clock.now());
            let sent = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                sent = self.client.push(&prepared.batch) => sent,
            };
            match sent {
                Ok(()) => {
                    self.contact.success(Direction::Push, self.services.clock.now());
                    self.services.store.outbox().delete(prepared.seqs).await?;
                    self.counters
                        .uploaded("result", prepared.batch.results.len() as u64);
                    self.counters
                        .uploaded("rejection", prepared.batch.rejections.len() as u64);
                    backoff = INITIAL_BACKOFF;
                    batch_size = self.batch;
                }
                Err(e) => {
                    self.contact
                        .failure(Direction::Push, e.reason(), format!("upload: {e}"));
                    if matches!(e, CallError::Status { status: 413, .. }) && batch_size > 1 {
                        batch_size = (batch_size / 2).max(1);
                    }
                    let wait = retry_wait(e.retry_after(), backoff, self.max_backoff);
                    tracing::warn!(
                        reason = e.reason(),
                        error = %e,
                        entries = prepared.seqs.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "uploading results to the control backend failed"
                    );
                    backoff = (backoff * 2).min(self.max_backoff);
                    if !self.wait_to_retry(wait, &heartbeat, &shutdown).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Decodes `entries` into a batch; unreadable ones (written by another
    /// version) are dropped and counted rather than blocking the outbox.
    async fn prepare(&self, entries: Vec<OutboxEntry>) -> Result<Option<Prepared>, StoreError> {
        let mut batch = ResultBatch {
            incarnation: self.incarnation.to_string(),
            results: Vec::new(),
            rejections: Vec::new(),
            rejection_summaries: Vec::new(),
        };
        let mut seqs = Vec::with_capacity(entries.len());
        let mut unreadable = Vec::new();
        for entry in entries {
            let decoded = match entry.kind.as_str() {
                "result" => serde_json::from_str::<RunResult>(&entry.payload)
                    .map(|r| batch.results.push(r))
                    .map_err(|e| e.to_string()),
                "rejection" => serde_json::from_str::<Rejection>(&entry.payload)
                    .map(|r| batch.rejections.push(r))
                    .map_err(|e| e.to_string()),
                "rejection_summary" => serde_json::from_str::<RejectionSummary>(&entry.payload)
                    .map(|r| batch.rejection_summaries.push(r))
                    .map_err(|e| e.to_string()),
                other => Err(format!("unknown kind `{other}`")),
            };
            match decoded {
                Ok(()) => seqs.push(entry.seq),
                Err(error) => {
                    tracing::error!(seq = entry.seq, %error, "unreadable outbox entry dropped");
                    unreadable.push(entry.seq);
                }
            }
        }
        if !unreadable.is_empty() {
            let n = self.services.store.outbox().delete(unreadable).await?;
            self.counters.dropped(n);
        }
        Ok((!seqs.is_empty()).then_some(Prepared { batch, seqs }))
    }

    /// Reads the outbox's size into the contact state and its gauges;
    /// returns the number of entries.
    async fn refresh_gauges(&self) -> Result<u64, StoreError> {
        let (entries, oldest) = self.services.store.outbox().stats().await?;
        self.contact
            .set_outbox(entries, oldest, self.services.clock.now());
        Ok(entries)
    }

    /// Waits `wait` before the next attempt, keeping the outbox gauges
    /// current (they must show results piling up while no upload is
    /// attempted); ends early when a pull succeeds after failures.
    /// `false` on shutdown.
    async fn wait_to_retry(
        &self,
        wait: Duration,
        heartbeat: &Heartbeat,
        shutdown: &CancellationToken,
    ) -> Result<bool, StoreError> {
        let until = tokio::time::Instant::now() + wait;
        let recovered = self.contact.recovered().notified();
        tokio::pin!(recovered);
        recovered.as_mut().enable();
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(true);
            }
            tokio::select! {
                biased;
                () = &mut recovered => {
                    tracing::info!("the control backend answered again: retrying the upload now");
                    return Ok(true);
                }
                alive = heartbeat.idle(left.min(IDLE_REFRESH), None, shutdown) => if !alive {
                    return Ok(false);
                },
            }
            self.refresh_gauges().await?;
        }
    }
}

/// How long to wait after a failed upload: the backoff with jitter, or
/// the backend's `Retry-After` when longer — never beyond `cap`
/// (`--backend-max-backoff`), whatever the backend asked for.
fn retry_wait(retry_after: Option<Duration>, backoff: Duration, cap: Duration) -> Duration {
    retry_after.unwrap_or_default().max(jittered(backoff)).min(cap)
}

/// A delay drawn uniformly from the upper half of `backoff`, so a fleet
/// that failed together does not retry together.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

impl Loop for Uploader {
    fn name(&self) -> &'static str {
        "uploader"
    }

    /// A call may take up to the backend timeout between two beats.
    fn slack(&self) -> Duration {
        self.client.timeout()
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx.stop, cx.beat, cx.faults))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wait_is_capped() {
        let cap = Duration::from_secs(300);
        for retry_after in [
            Some(Duration::from_secs(3600)),
            Some(Duration::from_secs(u64::MAX)),
            Some(Duration::MAX),
        ] {
            assert_eq!(retry_wait(retry_after, INITIAL_BACKOFF, cap), cap);
        }
        let w = retry_wait(Some(Duration::from_secs(3)), INITIAL_BACKOFF, cap);
        assert_eq!(w, Duration::from_secs(3));
        let w = retry_wait(None, Duration::from_secs(8), cap);
        assert!(w >= Duration::from_secs(4) && w <= Duration::from_secs(8));
        assert!(retry_wait(None, Duration::from_secs(3600), cap) <= cap);
    }
}
