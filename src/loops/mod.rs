//! The service's long-lived loops, declared once and supervised by one
//! owner.
//!
//! The failure cronguard exists to make visible is a scheduler whose main
//! loop died while everything else kept running. So every long-lived loop
//! (engine, run supervisor, orphan reaper, retention, the backend's pull
//! and upload, the replica lease and listener) is a [`Loop`]: it has a
//! name, a heartbeat it stamps every round, and a staleness bound past
//! which `/livez` fails. [`Loops`] starts each under [`restart::supervise`]
//! (restart with backoff after a panic or an error; past the restart
//! budget the loop is given up and liveness fails), so a loop cannot be
//! started unsupervised or without a heartbeat.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fault::Faults;
use crate::health::{Health, Heartbeat};
use crate::metrics::Metrics;
use crate::store::StoreError;

pub mod restart;
mod services;

pub use self::restart::RestartBudget;
pub use self::services::Services;

/// What one incarnation of a loop is given.
#[derive(Debug, Clone)]
pub struct LoopCx {
    /// Cancelled when the loop must finish its round and return `Ok`.
    pub stop: CancellationToken,
    /// Stamped every round; stale past the loop's bound fails `/livez`.
    pub beat: Arc<Heartbeat>,
    /// Checked every round (fault-injection builds can hang or panic it).
    pub faults: Arc<Faults>,
}

/// Why one incarnation of a loop ended before it was told to stop. The
/// owner logs it, counts a restart and starts the loop again.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The database failed in a way the loop does not ride out itself.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A signal handler could not be installed.
    #[error("cannot watch for {signal}: {source}")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A task the loop owns panicked or was aborted.
    #[error("its {task} task {why}")]
    Task {
        /// Which task.
        task: &'static str,
        /// "panicked: …" or "was aborted".
        why: String,
    },
}

impl LoopError {
    /// The end of a task the loop owns.
    pub fn task(task: &'static str, e: tokio::task::JoinError) -> Self {
        let why = if e.is_panic() {
            format!("panicked: {}", panic_message(e.into_panic()))
        } else {
            "was aborted".to_owned()
        };
        Self::Task { task, why }
    }
}

/// A long-lived loop of the service.
pub trait Loop: Send + Sync + 'static {
    /// The heartbeat's name: `/livez`'s check and the `loop_name` label.
    fn name(&self) -> &'static str;

    /// How much longer than the service-wide bound (`loop_stale_after`)
    /// the loop may go between beats: its own wait between rounds.
    fn slack(&self) -> Duration {
        Duration::ZERO
    }

    /// One incarnation, until `cx.stop`; started again after a panic or an
    /// error.
    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>>;
}

/// The owner of every loop: starts them supervised, with a heartbeat each.
#[derive(Clone)]
pub struct Loops {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    faults: Arc<Faults>,
    stale_after: Duration,
    budget: RestartBudget,
}

/// Loops started together and stopped by one token.
pub struct Running(JoinSet<()>);

impl Loops {
    /// Loops whose heartbeat may be `stale_after` old (plus their slack).
    pub fn new(
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        faults: Arc<Faults>,
        stale_after: Duration,
    ) -> Self {
        Self {
            health,
            metrics,
            faults,
            stale_after,
            budget: RestartBudget::default(),
        }
    }

    /// Starts every loop of `loops` until `stop` is cancelled.
    pub fn start(&self, stop: &CancellationToken, loops: Vec<Arc<dyn Loop>>) -> Running {
        let mut running = JoinSet::new();
        for lp in loops {
            let beat = self.health.heartbeat(lp.name(), self.stale_after + lp.slack());
            let cx = LoopCx {
                stop: stop.clone(),
                beat: beat.clone(),
                faults: self.faults.clone(),
            };
            running.spawn(restart::supervise(
                beat,
                self.metrics.clone(),
                self.budget,
                stop.clone(),
                move || lp.clone().start(cx.clone()),
            ));
        }
        Running(running)
    }
}

impl Running {
    /// Waits until every loop has returned (after its stop token, or given
    /// up).
    pub async fn join(mut self) {
        while let Some(ended) = self.0.join_next().await {
            if let Err(e) = ended {
                tracing::error!(error = %e, "a loop's supervisor ended abnormally");
            }
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-text panic payload)".to_owned()
    }
}
