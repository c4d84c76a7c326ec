//! Wall-clock time, injectable.
//!
//! Schedules are defined in wall-clock time (cron in a time zone, RFC 3339
//! instants), so the engine sleeps until a wall-clock instant rather than a
//! monotonic one. Production uses [`SystemClock`]; tests use [`ManualClock`],
//! whose time moves only when the test says so, which keeps policy tests
//! exact and fast without pausing tokio's clock (a paused tokio clock would
//! also auto-advance through SQLite I/O and fire unrelated timeouts).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// A source of wall-clock time that can also sleep until an instant.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// Resolves at or after `deadline`, never before it.
    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()>;

    /// Resolves after `duration` of this clock's time.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let delta = TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX);
        let deadline = self
            .now()
            .checked_add_signed(delta)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.sleep_until(deadline)
    }
}

/// Longest monotonic sleep between two readings of the wall clock.
pub const MAX_SLICE: Duration = Duration::from_secs(1);

/// Smallest difference between wall-clock and monotonic progress that
/// counts as a step of the wall clock (NTP slews far less; a loop that
/// is merely late moves both clocks alike).
pub const STEP_THRESHOLD: Duration = Duration::from_secs(1);

/// A step of the wall clock, seen by comparing it with the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The wall clock jumped ahead by this much.
    Forward(Duration),
    /// The wall clock went back by this much.
    Backward(Duration),
}

/// Compares successive wall-clock readings with the monotonic clock.
#[derive(Debug)]
pub struct StepDetector {
    last: Option<(std::time::Instant, DateTime<Utc>)>,
}

impl StepDetector {
    /// A detector with no reading yet.
    pub fn new() -> Self {
        Self { last: None }
    }

    /// Records `wall` read now; a step since the last reading, if any.
    pub fn observe(&mut self, wall: DateTime<Utc>) -> Option<Step> {
        let mono = std::time::Instant::now();
        let step = self.last.and_then(|(last_mono, last_wall)| {
            let elapsed = TimeDelta::from_std(mono - last_mono).unwrap_or(TimeDelta::MAX);
            let skew = (wall - last_wall) - elapsed;
            let threshold = TimeDelta::from_std(STEP_THRESHOLD).unwrap_or(TimeDelta::MAX);
            if skew > threshold {
                skew.to_std().ok().map(Step::Forward)
            } else if skew < -threshold {
                (-skew).to_std().ok().map(Step::Backward)
            } else {
                None
            }
        });
        self.last = Some((mono, wall));
        step
    }
}

impl Default for StepDetector {
    fn default() -> Self {
        Self::new()
    }
}

/// Shared handle to the clock in use.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Tokio sleeps on the monotonic clock; the wall clock can be a
            // little behind it, or be stepped. Sleep in slices of at most
            // [`MAX_SLICE`] and re-read the wall clock after each, so a step
            // (an hour back, then forward again) moves the wake-up with it
            // instead of becoming one hour-long monotonic sleep; re-check
            // so a fire is never early; round up to tokio's 1 ms.
            loop {
                let remaining = deadline - Utc::now();
                if remaining <= TimeDelta::zero() {
                    return;
                }
                let micros = remaining.num_microseconds().unwrap_or(i64::MAX).max(0) as u64;
                let millis = micros.div_ceil(1000).max(1);
                tokio::time::sleep(Duration::from_millis(millis).min(MAX_SLICE)).await;
            }
        })
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
    tick: watch::Sender<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        let (tick, _) = watch::channel(start);
        Self {
            now: Arc::new(Mutex::new(start)),
            tick,
        }
    }

    /// Moves the clock forward by `by` and wakes every sleeper now due.
    pub fn advance(&self, by: Duration) {
        let delta = TimeDelta::from_std(by).unwrap_or(TimeDelta::zero());
        let now = {
            let mut guard = self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *guard += delta;
            *guard
        };
        self.tick.send_replace(now);
    }

    /// Sets the clock to `to` (forwards or backwards) and wakes sleepers.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = to;
        self.tick.send_replace(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            loop {
                if *rx.borrow_and_update() >= deadline {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The clock is gone: nobody can ever advance it.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_only_when_due() {
        let start = DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let clock = ManualClock::new(start);
        let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
        assert_eq!(clock.now(), start + TimeDelta::seconds(10));
    }
}
