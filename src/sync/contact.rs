//! Contact with the control backend, measured: "stopped talking to the
//! backend" is a metric, a probe detail and an alert, not a mystery.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics::Metrics;

/// Last attempt, last success, failures — shared by the sync and upload
/// loops (any successful pull or push is a contact).
#[derive(Debug)]
pub struct Contact {
    metrics: Arc<Metrics>,
    /// Unix milliseconds, 0 for never.
    last_attempt: AtomicI64,
    last_success: AtomicI64,
    consecutive_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// With `--backend-contact-max-age`: liveness fails past it.
    pub max_age: Option<Duration>,
    /// Beyond this age the contact is shown as stale.
    stale_after: Duration,
    /// Service start: a backend never reached is as stale as the service
    /// is old.
    started: DateTime<Utc>,
}

/// Contact as shown by `/v1/status` and `/readyz?verbose`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContactView {
    /// Last attempt to reach the backend.
    pub last_attempt: Option<DateTime<Utc>>,
    /// Last successful pull or push.
    pub last_contact: Option<DateTime<Utc>>,
    /// Failures since the last success.
    pub consecutive_failures: u64,
    /// The last failure, in words (never containing the token).
    pub last_error: Option<String>,
    /// Seconds since the last contact (since start if there was none).
    pub age_seconds: f64,
    /// No contact for longer than three poll intervals plus a timeout.
    pub stale: bool,
    /// `--backend-contact-max-age`, when set: liveness fails past it.
    pub max_age_seconds: Option<f64>,
}

fn at(ms: i64) -> Option<DateTime<Utc>> {
    (ms > 0).then(|| DateTime::from_timestamp_millis(ms)).flatten()
}

impl Contact {
    /// Fresh: never attempted.
    pub fn new(
        metrics: Arc<Metrics>,
        max_age: Option<Duration>,
        stale_after: Duration,
        started: DateTime<Utc>,
    ) -> Self {
        metrics.set_backend_configured(true);
        Self {
            stale_after,
            started,
            metrics,
            last_attempt: AtomicI64::new(0),
            last_success: AtomicI64::new(0),
            consecutive_failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            max_age,
        }
    }

    /// An attempt begins.
    pub fn attempt(&self, now: DateTime<Utc>) {
        self.last_attempt.store(now.timestamp_millis(), Ordering::Relaxed);
        self.metrics.backend_attempt(now);
    }

    /// The backend answered as expected.
    pub fn success(&self, now: DateTime<Utc>) {
        self.last_success.store(now.timestamp_millis(), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.metrics.backend_contact(now);
    }

    /// The attempt failed (`reason` is a metric label from a closed set).
    pub fn failure(&self, reason: &'static str, error: String) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.metrics.backend_failure(reason);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// The state at `now`.
    pub fn view(&self, now: DateTime<Utc>) -> ContactView {
        let age = self.age(now);
        ContactView {
            age_seconds: age.as_secs_f64(),
            stale: age > self.stale_after,
            max_age_seconds: self.max_age.map(|d| d.as_secs_f64()),
            last_attempt: at(self.last_attempt.load(Ordering::Relaxed)),
            last_contact: at(self.last_success.load(Ordering::Relaxed)),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Age of the last contact at `now`; since the start when there was
    /// none yet.
    pub fn age(&self, now: DateTime<Utc>) -> Duration {
        let last = at(self.last_success.load(Ordering::Relaxed)).unwrap_or(self.started);
        (now - last).to_std().unwrap_or_default()
    }

    /// Whether liveness should fail: `--backend-contact-max-age` is set
    /// and exceeded.
    pub fn too_old(&self, now: DateTime<Utc>) -> Option<Duration> {
        let age = self.age(now);
        self.max_age.filter(|max| age > *max).map(|_| age)
    }
}
