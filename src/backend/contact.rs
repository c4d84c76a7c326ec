//! Contact with the control backend, measured per direction: "stopped
//! talking to the backend" is a metric, a probe detail and an alert, not a
//! mystery — and a backend that serves the job list while refusing
//! results must not look healthy.
//!
//! Each direction (pull: the job list; push: results) keeps its last
//! attempt, last success and consecutive failures. A success of one never
//! resets the other. The outbox (what waits to be pushed) is part of the
//! picture: push is stale when its oldest entry has waited longer than the
//! staleness bound, whatever the last push did.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{Gauge, GaugeVec, IntGauge, IntGaugeVec};
use serde::Serialize;
use tokio::sync::Notify;
use utoipa::ToSchema;

use crate::metrics::{Metrics, opts, reg};

/// Which way a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// `GET v1/jobs`.
    Pull,
    /// `POST v1/results`.
    Push,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
        }
    }
}

#[derive(Debug, Default)]
struct Side {
    /// Unix milliseconds, 0 for never.
    last_attempt: AtomicI64,
    last_success: AtomicI64,
    consecutive_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// One direction as shown by `/v1/status` and `/readyz?verbose`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DirectionView {
    /// Last attempt in this direction.
    pub last_attempt: Option<DateTime<Utc>>,
    /// Last success in this direction.
    pub last_success: Option<DateTime<Utc>>,
    /// Failures in this direction since its last success.
    pub consecutive_failures: u64,
    /// The last failure in this direction, in words (never the token).
    pub last_error: Option<String>,
    /// Pull: no successful pull for longer than the staleness bound (since
    /// start if none). Push: a result has waited in the outbox longer than
    /// the staleness bound.
    pub stale: bool,
}

/// Contact as shown by `/v1/status` and `/readyz?verbose`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ContactView {
    /// Last attempt to reach the backend, either direction.
    pub last_attempt: Option<DateTime<Utc>>,
    /// Last successful pull or push (either direction: see `pull` and
    /// `push` for each).
    pub last_contact: Option<DateTime<Utc>>,
    /// Failures since each direction's last success, added up.
    pub consecutive_failures: u64,
    /// The last failure, in words (never containing the token).
    pub last_error: Option<String>,
    /// Seconds since the older of: the last successful pull, the oldest
    /// undelivered result (since start if there was no pull).
    pub age_seconds: f64,
    /// Either direction is stale.
    pub stale: bool,
    /// `--backend-contact-max-age`, when set: liveness fails past it.
    pub max_age_seconds: Option<f64>,
    /// Pulling the job list.
    pub pull: DirectionView,
    /// Pushing results.
    pub push: DirectionView,
    /// Entries waiting in the outbox.
    pub outbox_entries: u64,
    /// Seconds the oldest of them has waited (0 when empty).
    pub outbox_oldest_age_seconds: f64,
}

fn at(ms: i64) -> Option<DateTime<Utc>> {
    (ms > 0).then(|| DateTime::from_timestamp_millis(ms)).flatten()
}

fn unix_seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

#[derive(Debug)]
struct Gauges {
    stale: IntGaugeVec,
    last_success: GaugeVec,
    consecutive_failures: IntGaugeVec,
    outbox_entries: IntGauge,
    outbox_oldest_age: Gauge,
}

/// Both directions and the outbox — shared by the sync and upload loops.
#[derive(Debug)]
pub struct Contact {
    metrics: Arc<Metrics>,
    gauges: Gauges,
    pull: Side,
    push: Side,
    outbox_entries: AtomicU64,
    /// Unix milliseconds of the oldest outbox entry, 0 when empty.
    outbox_oldest: AtomicI64,
    /// Woken when a direction succeeds after failing (the backend is
    /// back): the other direction stops waiting out its backoff. A pull
    /// that keeps succeeding says nothing new about results, so it does
    /// not cut short a `Retry-After` of the results endpoint.
    recovered: Notify,
    /// The live feed, told when a direction starts failing or works again.
    bus: Option<Arc<crate::events::Bus>>,
    /// With `--backend-contact-max-age`: liveness fails past it.
    pub max_age: Option<Duration>,
    /// Beyond this age a direction is shown as stale.
    stale_after: Duration,
    /// Service start: a backend never reached is as stale as the service
    /// is old.
    started: DateTime<Utc>,
}

impl Contact {
    /// Fresh: never attempted. Declares the per-direction and outbox
    /// series in `metrics`' registry (once per process).
    pub fn new(
        metrics: Arc<Metrics>,
        bus: Option<Arc<crate::events::Bus>>,
        max_age: Option<Duration>,
        stale_after: Duration,
        started: DateTime<Utc>,
    ) -> Self {
        metrics.set_backend_configured(true);
        let m = metrics.registry();
        let gauges = Gauges {
            stale: reg(
                m,
                IntGaugeVec::new(
                    opts(
                        "backend_stale",
                        "1 when a direction is stale (pull: no successful pull within the staleness bound; push: a result has waited longer than it), computed at scrape time.",
                    ),
                    &["direction"],
                ),
            ),
            last_success: reg(
                m,
                GaugeVec::new(
                    opts(
                        "backend_last_success_timestamp_seconds",
                        "Unix time of the last successful call to the control backend, by direction (pull: job list, push: results; 0: never).",
                    ),
                    &["direction"],
                ),
            ),
            consecutive_failures: reg(
                m,
                IntGaugeVec::new(
                    opts(
                        "backend_consecutive_failures",
                        "Failed calls to the control backend since the last success, by direction.",
                    ),
                    &["direction"],
                ),
            ),
            outbox_entries: reg(
                m,
                IntGauge::with_opts(opts(
                    "backend_outbox_entries",
                    "Results and rejection reports waiting for upload to the control backend (current at every scrape).",
                )),
            ),
            outbox_oldest_age: reg(
                m,
                Gauge::with_opts(opts(
                    "backend_outbox_oldest_age_seconds",
                    "Age of the oldest entry waiting for upload (0 when the outbox is empty; current at every scrape).",
                )),
            ),
        };
        for d in [Direction::Pull, Direction::Push] {
            gauges.stale.with_label_values(&[d.label()]).set(0);
            gauges.last_success.with_label_values(&[d.label()]).set(0.0);
            gauges.consecutive_failures.with_label_values(&[d.label()]).set(0);
        }
        Self {
            stale_after,
            started,
            metrics,
            gauges,
            pull: Side::default(),
            push: Side::default(),
            outbox_entries: AtomicU64::new(0),
            outbox_oldest: AtomicI64::new(0),
            recovered: Notify::new(),
            max_age,
            bus,
        }
    }

    /// Tells the live feed that `direction` now works (`ok`) or fails.
    fn publish(&self, direction: Direction, status: &str, at: DateTime<Utc>, detail: Option<String>) {
        if let Some(bus) = &self.bus {
            let mut event = crate::events::Event::new(crate::events::Kind::BackendContact, at)
                .status(status)
                .detail(direction.label());
            if let Some(d) = detail {
                event.detail = Some(format!("{}: {d}", direction.label()));
            }
            bus.publish([event]);
        }
    }

    fn side(&self, direction: Direction) -> &Side {
        match direction {
            Direction::Pull => &self.pull,
            Direction::Push => &self.push,
        }
    }

    /// An attempt begins.
    pub fn attempt(&self, direction: Direction, now: DateTime<Utc>) {
        self.side(direction)
            .last_attempt
            .store(now.timestamp_millis(), Ordering::Relaxed);
        self.metrics.backend_attempt(now);
    }

    /// The backend answered as expected.
    pub fn success(&self, direction: Direction, now: DateTime<Utc>) {
        let side = self.side(direction);
        side.last_success.store(now.timestamp_millis(), Ordering::Relaxed);
        let failed = side.consecutive_failures.swap(0, Ordering::Relaxed);
        self.gauges
            .last_success
            .with_label_values(&[direction.label()])
            .set(unix_seconds(now.timestamp_millis()));
        self.gauges
            .consecutive_failures
            .with_label_values(&[direction.label()])
            .set(0);
        self.metrics.backend_contact(now);
        if failed > 0 {
            self.recovered.notify_waiters();
            self.publish(direction, "ok", now, None);
        }
    }

    /// The attempt failed (`reason` is a metric label from a closed set).
    pub fn failure(&self, direction: Direction, reason: &'static str, error: String) {
        let side = self.side(direction);
        let n = side.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            self.publish(
                direction,
                "failing",
                Utc::now(),
                Some(crate::standing::error_line(&error)),
            );
        }
        self.gauges
            .consecutive_failures
            .with_label_values(&[direction.label()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
        self.metrics.backend_failure(reason);
        *side
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
    }

    /// Resolves when a direction succeeds after failures (see
    /// [`Contact::success`]).
    pub fn recovered(&self) -> &Notify {
        &self.recovered
    }

    /// The outbox now holds `entries`, the oldest written at `oldest`.
    pub fn set_outbox(&self, entries: u64, oldest: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        self.outbox_entries.store(entries, Ordering::Relaxed);
        self.outbox_oldest
            .store(oldest.map_or(0, |t| t.timestamp_millis()), Ordering::Relaxed);
        self.gauges
            .outbox_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.gauges
            .outbox_oldest_age
            .set(self.outbox_age(now).as_secs_f64());
    }

    /// Brings the gauges that depend on the time to `now` (called at
    /// every scrape).
    pub fn observe(&self, now: DateTime<Utc>) {
        for d in [Direction::Pull, Direction::Push] {
            let stale = self.side_view(d, now).stale;
            self.gauges
                .stale
                .with_label_values(&[d.label()])
                .set(i64::from(stale));
        }
        self.gauges
            .outbox_oldest_age
            .set(self.outbox_age(now).as_secs_f64());
    }

    /// How long the oldest outbox entry has waited at `now`.
    pub fn outbox_age(&self, now: DateTime<Utc>) -> Duration {
        at(self.outbox_oldest.load(Ordering::Relaxed))
            .map_or(Duration::ZERO, |t| (now - t).to_std().unwrap_or_default())
    }

    fn pull_age(&self, now: DateTime<Utc>) -> Duration {
        let last = at(self.pull.last_success.load(Ordering::Relaxed)).unwrap_or(self.started);
        (now - last).to_std().unwrap_or_default()
    }

    fn side_view(&self, direction: Direction, now: DateTime<Utc>) -> DirectionView {
        let side = self.side(direction);
        let stale = match direction {
            Direction::Pull => self.pull_age(now) > self.stale_after,
            Direction::Push => self.outbox_age(now) > self.stale_after,
        };
        DirectionView {
            last_attempt: at(side.last_attempt.load(Ordering::Relaxed)),
            last_success: at(side.last_success.load(Ordering::Relaxed)),
            consecutive_failures: side.consecutive_failures.load(Ordering::Relaxed),
            last_error: side
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            stale,
        }
    }

    /// The state at `now`.
    pub fn view(&self, now: DateTime<Utc>) -> ContactView {
        let pull = self.side_view(Direction::Pull, now);
        let push = self.side_view(Direction::Push, now);
        let latest = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| a.max(b);
        let last_error = match (pull.last_attempt, push.last_attempt) {
            (p, q) if q > p => push.last_error.clone().or_else(|| pull.last_error.clone()),
            _ => pull.last_error.clone().or_else(|| push.last_error.clone()),
        };
        ContactView {
            last_attempt: latest(pull.last_attempt, push.last_attempt),
            last_contact: latest(pull.last_success, push.last_success),
            consecutive_failures: pull.consecutive_failures + push.consecutive_failures,
            last_error,
            age_seconds: self.age(now).as_secs_f64(),
            stale: pull.stale || push.stale,
            max_age_seconds: self.max_age.map(|d| d.as_secs_f64()),
            outbox_entries: self.outbox_entries.load(Ordering::Relaxed),
            outbox_oldest_age_seconds: self.outbox_age(now).as_secs_f64(),
            pull,
            push,
        }
    }

    /// How far contact lags at `now`: the older of the last successful
    /// pull (since start if none) and the oldest undelivered result.
    pub fn age(&self, now: DateTime<Utc>) -> Duration {
        self.pull_age(now).max(self.outbox_age(now))
    }

    /// Whether liveness should fail: `--backend-contact-max-age` is set
    /// and exceeded in either direction.
    pub fn too_old(&self, now: DateTime<Utc>) -> Option<Duration> {
        let age = self.age(now);
        self.max_age.filter(|max| age > *max).map(|_| age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn one_direction_never_hides_the_other() {
        let contact = Contact::new(
            Arc::new(Metrics::new()),
            None,
            Some(Duration::from_secs(300)),
            Duration::from_secs(100),
            t(0),
        );
        contact.attempt(Direction::Push, t(1));
        contact.failure(Direction::Push, "status_5xx", "upload: 503".into());
        contact.set_outbox(5, Some(t(1)), t(1));
        for s in (10..400).step_by(10) {
            contact.attempt(Direction::Pull, t(s));
            contact.success(Direction::Pull, t(s));
            contact.attempt(Direction::Push, t(s));
            contact.failure(Direction::Push, "status_5xx", "upload: 503".into());
            contact.set_outbox(5, Some(t(1)), t(s));
        }
        let view = contact.view(t(400));
        assert!(!view.pull.stale);
        assert!(view.push.stale, "results waited 399 s");
        assert!(view.stale);
        assert_eq!(view.push.consecutive_failures, 40);
        assert_eq!(
            view.consecutive_failures, 40,
            "pull successes do not reset push failures"
        );
        assert!(
            contact.too_old(t(400)).is_some(),
            "undelivered results count against the max age"
        );

        contact.success(Direction::Push, t(401));
        contact.set_outbox(0, None, t(401));
        let view = contact.view(t(401));
        assert!(!view.stale && view.consecutive_failures == 0);
        assert!(contact.too_old(t(401)).is_none());
    }

    #[test]
    fn a_backend_never_reached_is_as_stale_as_the_service_is_old() {
        let contact = Contact::new(
            Arc::new(Metrics::new()),
            None,
            None,
            Duration::from_secs(100),
            t(0),
        );
        assert!(!contact.view(t(50)).stale);
        assert!(contact.view(t(101)).pull.stale);
    }
}
