//! The `uploader` loop: drain the outbox to the backend, in commit order.
//!
//! Delivery is at least once: an entry is deleted only after the backend
//! acknowledged the batch holding it (any 2xx), so a crash between the
//! acknowledgement and the delete sends it again; a backend that
//! deduplicates by `run_id` sees every result once. Failures back off
//! exponentially (1 s doubling to `--backend-max-backoff`, each wait drawn
//! from its upper half) and honour `Retry-After`; a 413 halves the batch.
//! The outbox is bounded: beyond `--outbox-limit` the oldest entries are
//! dropped, logged and counted in `cronguard_backend_outbox_dropped_total`.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::client::{BackendClient, CallError};
use super::contact::Contact;
use super::metrics::SyncMetrics;
use super::protocol::{Rejection, ResultBatch, RunResult};
use crate::clock::SharedClock;
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::run::Incarnation;
use crate::store::{OutboxEntry, Store, StoreError};

/// First retry delay.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// How often the outbox gauges are refreshed while idle.
const IDLE_REFRESH: Duration = Duration::from_secs(5);

/// The upload loop and what it needs.
pub struct Uploader {
    /// The backend.
    pub client: BackendClient,
    /// Persistence.
    pub store: Store,
    /// Time.
    pub clock: SharedClock,
    /// Shared contact state.
    pub contact: Arc<Contact>,
    /// Counters.
    pub metrics: SyncMetrics,
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
    ) -> Result<(), StoreError> {
        let mut backoff = INITIAL_BACKOFF;
        let mut batch_size = self.batch;
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            let dropped = self.store.outbox_trim(self.limit).await?;
            if dropped > 0 {
                self.metrics.dropped(dropped);
                tracing::error!(
                    dropped,
                    limit = self.limit,
                    "outbox over its limit: the oldest undelivered results were dropped"
                );
            }
            self.refresh_gauges().await?;
            let entries = self.store.outbox_peek(batch_size as u32).await?;
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
            self.contact.attempt(self.clock.now());
            let sent = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                sent = self.client.push(&prepared.batch) => sent,
            };
            match sent {
                Ok(()) => {
                    self.contact.success(self.clock.now());
                    self.store.outbox_delete(prepared.seqs).await?;
                    self.metrics
                        .uploaded("result", prepared.batch.results.len() as u64);
                    self.metrics
                        .uploaded("rejection", prepared.batch.rejections.len() as u64);
                    backoff = INITIAL_BACKOFF;
                    batch_size = self.batch;
                }
                Err(e) => {
                    self.contact.failure(e.reason(), format!("upload: {e}"));
                    if matches!(e, CallError::Status { status: 413, .. }) && batch_size > 1 {
                        batch_size = (batch_size / 2).max(1);
                    }
                    let wait = e.retry_after().unwrap_or_default().max(jittered(backoff));
                    tracing::warn!(
                        reason = e.reason(),
                        error = %e,
                        entries = prepared.seqs.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "uploading results to the control backend failed"
                    );
                    backoff = (backoff * 2).min(self.max_backoff);
                    if !heartbeat.idle(wait, None, &shutdown).await {
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
            let n = self.store.outbox_delete(unreadable).await?;
            self.metrics.dropped(n);
        }
        Ok((!seqs.is_empty()).then_some(Prepared { batch, seqs }))
    }

    async fn refresh_gauges(&self) -> Result<(), StoreError> {
        let (entries, oldest) = self.store.outbox_stats().await?;
        let age = oldest.map_or(0.0, |t| (self.clock.now() - t).as_seconds_f64().max(0.0));
        self.metrics.set_outbox(entries, age);
        Ok(())
    }
}

/// A delay drawn uniformly from the upper half of `backoff`, so a fleet
/// that failed together does not retry together.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}
