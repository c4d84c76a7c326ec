//! The notifier's metrics: what was sent, what failed, what waits.

use chrono::{DateTime, Utc};
use prometheus::{Gauge, IntCounterVec, IntGauge};

use crate::metrics::{Metrics, opts, reg};
use crate::notification::{Event, Status};

/// Delivery counters and the backlog.
#[derive(Debug, Clone)]
pub struct NotifyMetrics {
    sent: IntCounterVec,
    attempts_failed: IntCounterVec,
    given_up: IntCounterVec,
    pending: IntGauge,
    oldest_pending: Gauge,
}

impl NotifyMetrics {
    /// Declares the families in `metrics`' registry (once per process).
    pub fn new(metrics: &Metrics) -> Self {
        let m = metrics.registry();
        let by_event = |name: &str, help: &str| reg(m, IntCounterVec::new(opts(name, help), &["event"]));
        let this = Self {
            sent: by_event(
                "notifications_sent_total",
                "Notifications a destination accepted (2xx), by event.",
            ),
            attempts_failed: by_event(
                "notification_attempts_failed_total",
                "Delivery attempts that failed (refused, unreachable, non-2xx, timed out), by event; retried with backoff.",
            ),
            given_up: by_event(
                "notifications_failed_total",
                "Notifications given up undelivered after --notify-give-up-after, by event.",
            ),
            pending: reg(
                m,
                IntGauge::with_opts(opts(
                    "notifications_pending",
                    "Notifications recorded and not yet delivered (new or pending).",
                )),
            ),
            oldest_pending: reg(
                m,
                Gauge::with_opts(opts(
                    "notifications_oldest_pending_age_seconds",
                    "Age of the oldest undelivered notification's event; 0 when none waits.",
                )),
            ),
        };
        for event in Event::ALL {
            for family in [&this.sent, &this.attempts_failed, &this.given_up] {
                family.with_label_values(&[event.as_str()]);
            }
        }
        this
    }

    pub(super) fn sent(&self, event: Event) {
        self.sent.with_label_values(&[event.as_str()]).inc();
    }

    pub(super) fn attempt_failed(&self, event: Event) {
        self.attempts_failed.with_label_values(&[event.as_str()]).inc();
    }

    pub(super) fn given_up(&self, event: Event) {
        self.given_up.with_label_values(&[event.as_str()]).inc();
    }

    pub(super) fn backlog(
        &self,
        counts: &[(Status, u64)],
        oldest: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) {
        let waiting: u64 = counts
            .iter()
            .filter(|(s, _)| matches!(s, Status::New | Status::Pending))
            .map(|(_, n)| n)
            .sum();
        self.pending.set(i64::try_from(waiting).unwrap_or(i64::MAX));
        let age = oldest.map_or(0.0, |at| (now - at).as_seconds_f64().max(0.0));
        self.oldest_pending.set(age);
    }
}
