//! What the probes read: loop heartbeats and readiness flags.
//!
//! Every internal loop owns a [`Heartbeat`] and stamps it each time round;
//! `/livez` turns red when one is older than its threshold (the loop is
//! stuck or dead). Readiness is a few flags set by startup and shutdown.
//! Probes only read atomics, so they stay cheap under any load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

/// One loop's proof of life.
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    threshold: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last beat, plus one (0 = never).
    last: AtomicU64,
    restarts: AtomicU64,
    gave_up: AtomicBool,
    /// Unix time of the last beat in milliseconds (for metrics and views).
    last_unix_ms: AtomicU64,
}

impl Heartbeat {
    /// Stamps the heartbeat now.
    pub fn beat(&self) {
        let since = self.epoch.elapsed().as_millis() as u64 + 1;
        self.last.store(since, Ordering::Relaxed);
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_unix_ms.store(unix, Ordering::Relaxed);
    }

    /// Waits `duration` (or until `wake`, if given, or `shutdown`),
    /// beating at least every second: for loops that wait longer than
    /// their threshold between rounds. `false` when `shutdown` ended it.
    pub async fn idle(
        &self,
        duration: Duration,
        wake: Option<&tokio::sync::Notify>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> bool {
        // A wait too long to represent (a hostile `Retry-After`) is
        // endless, not a panic.
        let until = tokio::time::Instant::now().checked_add(duration);
        let woken = async {
            match wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(woken);
        loop {
            self.beat();
            let now = tokio::time::Instant::now();
            if until.is_some_and(|until| now >= until) {
                return true;
            }
            let slice = until.map_or(Duration::from_secs(1), |until| {
                (until - now).min(Duration::from_secs(1))
            });
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return false,
                () = &mut woken => return true,
                () = tokio::time::sleep(slice) => {}
            }
        }
    }

    /// The loop's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Age of the last beat; `None` if it never beat.
    pub fn age(&self) -> Option<Duration> {
        let last = self.last.load(Ordering::Relaxed);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last - 1))
        })
    }

    /// Unix seconds of the last beat (0 if never).
    pub fn last_unix_seconds(&self) -> f64 {
        self.last_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Records a restart of the loop.
    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Marks the loop as given up (restart budget exhausted).
    pub fn give_up(&self) {
        self.gave_up.store(true, Ordering::Relaxed);
    }

    /// The threshold beyond which the loop counts as stuck.
    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    fn check(&self, started: Duration, stopping: bool) -> LoopCheck {
        let age = self.age();
        let gave_up = self.gave_up.load(Ordering::Relaxed);
        // A loop that has not beaten yet is judged by the service's age, so
        // a loop that never starts is caught too.
        let effective = age.unwrap_or(started);
        // Loops stop on purpose at shutdown; their silence then is no fault.
        let ok = !gave_up && (effective <= self.threshold || stopping);
        LoopCheck {
            name: self.name,
            ok,
            age_seconds: age.map(|a| a.as_secs_f64()),
            threshold_seconds: self.threshold.as_secs_f64(),
            restarts: self.restarts(),
            reason: if gave_up {
                Some("restart budget exhausted".to_owned())
            } else if !ok {
                Some(format!(
                    "no heartbeat for {:.1}s (threshold {:.1}s): the loop is stuck or dead",
                    effective.as_secs_f64(),
                    self.threshold.as_secs_f64()
                ))
            } else {
                None
            },
        }
    }
}

/// One loop's liveness verdict.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LoopCheck {
    /// Loop name.
    pub name: &'static str,
    /// Whether it is alive.
    pub ok: bool,
    /// Seconds since its last heartbeat.
    pub age_seconds: Option<f64>,
    /// Allowed age.
    pub threshold_seconds: f64,
    /// Times it was restarted.
    pub restarts: u64,
    /// Why it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Shared health state.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    loops: std::sync::RwLock<BTreeMap<&'static str, Arc<Heartbeat>>>,
    recovered: AtomicBool,
    schedule_loaded: tokio::sync::watch::Sender<bool>,
    shutting_down: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Fresh state: nothing loaded, no loops.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            loops: std::sync::RwLock::new(BTreeMap::new()),
            recovered: AtomicBool::new(false),
            schedule_loaded: tokio::sync::watch::Sender::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Registers (or returns) the heartbeat of loop `name`.
    pub fn heartbeat(&self, name: &'static str, threshold: Duration) -> Arc<Heartbeat> {
        let mut loops = self
            .loops
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loops
            .entry(name)
            .or_insert_with(|| {
                Arc::new(Heartbeat {
                    name,
                    threshold,
                    epoch: self.started,
                    last: AtomicU64::new(0),
                    restarts: AtomicU64::new(0),
                    gave_up: AtomicBool::new(false),
                    last_unix_ms: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Every registered heartbeat.
    pub fn heartbeats(&self) -> Vec<Arc<Heartbeat>> {
        self.loops
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Liveness of every loop.
    pub fn loop_checks(&self) -> Vec<LoopCheck> {
        let started = self.started.elapsed();
        let stopping = self.shutting_down();
        self.heartbeats()
            .iter()
            .map(|h| h.check(started, stopping))
            .collect()
    }

    /// Startup recovery (orphan reconciliation) finished.
    pub fn set_recovered(&self) {
        self.recovered.store(true, Ordering::Relaxed);
    }

    /// Whether startup recovery finished.
    pub fn recovered(&self) -> bool {
        self.recovered.load(Ordering::Relaxed)
    }

    /// The engine loaded every job's next fire.
    pub fn set_schedule_loaded(&self, loaded: bool) {
        self.schedule_loaded.send_replace(loaded);
    }

    /// Whether the engine has the schedule loaded.
    pub fn schedule_loaded(&self) -> bool {
        *self.schedule_loaded.borrow()
    }

    /// Resolves once the engine has loaded the schedule.
    pub async fn wait_schedule_loaded(&self) {
        let mut rx = self.schedule_loaded.subscribe();
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    /// Shutdown began.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Whether shutdown began.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Time since the service started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
