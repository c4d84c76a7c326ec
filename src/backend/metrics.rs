//! Metrics of the control backend's loops (registered only when a backend
//! is configured; the contact series live in [`crate::metrics::Metrics`]
//! so `cronguard_backend_configured` is always exported).

use prometheus::{IntCounter, IntCounterVec};

use crate::metrics::{Metrics, opts, reg};

/// Outbox, upload and reconciliation counters.
#[derive(Debug, Clone)]
pub struct SyncMetrics {
    outbox_dropped: IntCounter,
    uploaded: IntCounterVec,
    pulls: IntCounterVec,
    jobs_applied: IntCounterVec,
    jobs_rejected: IntCounter,
}

impl SyncMetrics {
    /// Declares the families in `metrics`' registry (once per process).
    pub fn new(metrics: &Metrics) -> Self {
        let m = metrics.registry();
        Self {
            outbox_dropped: reg(
                m,
                IntCounter::with_opts(opts(
                    "backend_outbox_dropped_total",
                    "Outbox entries dropped undelivered: the oldest ones beyond --outbox-limit, or unreadable ones.",
                )),
            ),
            uploaded: reg(
                m,
                IntCounterVec::new(
                    opts(
                        "backend_uploaded_total",
                        "Entries acknowledged by the control backend, by kind (result, rejection).",
                    ),
                    &["kind"],
                ),
            ),
            pulls: reg(
                m,
                IntCounterVec::new(
                    opts(
                        "backend_pulls_total",
                        "Successful pulls of the desired jobs, by result (modified, not_modified).",
                    ),
                    &["result"],
                ),
            ),
            jobs_applied: reg(
                m,
                IntCounterVec::new(
                    opts(
                        "backend_jobs_applied_total",
                        "Backend jobs created, updated or deleted by reconciliation.",
                    ),
                    &["change"],
                ),
            ),
            jobs_rejected: reg(
                m,
                IntCounter::with_opts(opts(
                    "backend_jobs_rejected_total",
                    "Job specs from the backend that were rejected (each distinct rejection once).",
                )),
            ),
        }
    }

    /// Entries were dropped undelivered.
    pub fn dropped(&self, n: u64) {
        self.outbox_dropped.inc_by(n);
    }

    /// The backend acknowledged `n` entries of `kind`.
    pub fn uploaded(&self, kind: &'static str, n: u64) {
        if n > 0 {
            self.uploaded.with_label_values(&[kind]).inc_by(n);
        }
    }

    /// A pull succeeded; `modified` unless it was a 304.
    pub fn pulled(&self, modified: bool) {
        let result = if modified { "modified" } else { "not_modified" };
        self.pulls.with_label_values(&[result]).inc();
    }

    /// Reconciliation made `n` changes of one kind (`created`, `updated`,
    /// `deleted`).
    pub fn applied(&self, change: &'static str, n: u64) {
        if n > 0 {
            self.jobs_applied.with_label_values(&[change]).inc_by(n);
        }
    }

    /// `n` job specs were rejected (counted when reported).
    pub fn rejected(&self, n: u64) {
        self.jobs_rejected.inc_by(n);
    }
}
