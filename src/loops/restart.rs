//! Restart on panic or return, give up loudly.
//!
//! Each incarnation of the loop is a spawned task, so a panic is caught as
//! a `JoinError`; a loop that panics or returns before shutdown is
//! restarted after an exponential backoff and counted; a loop that fails
//! more than its budget allows within the budget window is given up, which
//! turns `/livez` red so the orchestrator restarts the whole service. A
//! loop that hangs is caught by its heartbeat going stale (see `health`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::health::Heartbeat;
use crate::metrics::Metrics;

/// How often a loop may fail before it is given up.
#[derive(Debug, Clone, Copy)]
pub struct RestartBudget {
    /// Failures tolerated within `window`.
    pub max_restarts: usize,
    /// The sliding window.
    pub window: Duration,
    /// First backoff; doubles per consecutive failure.
    pub initial_backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(300),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Runs the loop produced by `make` until `shutdown`, restarting it when it
/// panics, fails or returns early. `make` is called once per incarnation.
pub async fn supervise<F, Fut, E>(
    heartbeat: Arc<Heartbeat>,
    metrics: Arc<Metrics>,
    budget: RestartBudget,
    shutdown: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let name = heartbeat.name();
    let mut failures: VecDeque<Instant> = VecDeque::new();
    let mut consecutive = 0u32;
    loop {
        let started = Instant::now();
        let mut task = tokio::spawn(make());
        let result = tokio::select! {
            r = &mut task => r,
            () = shutdown.cancelled() => {
                // Let the loop see the cancellation itself and finish.
                match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::error!(loop_name = name, "loop did not stop within 10s of shutdown; aborting it");
                        task.abort();
                        return;
                    }
                }
            }
        };
        let why = match result {
            Ok(Ok(())) if shutdown.is_cancelled() => return,
            Ok(Ok(())) => "returned before shutdown".to_owned(),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(e) if e.is_panic() => format!("panicked: {}", super::panic_message(e.into_panic())),
            Err(_) => "was aborted".to_owned(),
        };
        if shutdown.is_cancelled() {
            tracing::warn!(loop_name = name, reason = %why, "loop ended during shutdown");
            return;
        }
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > budget.window)
        {
            failures.pop_front();
        }
        // A loop that ran well for a while starts its backoff afresh.
        if started.elapsed() > budget.max_backoff * 2 {
            consecutive = 0;
        }
        consecutive += 1;
        if failures.len() > budget.max_restarts {
            heartbeat.give_up();
            tracing::error!(
                loop_name = name,
                reason = %why,
                failures = failures.len(),
                "loop keeps failing: restart budget exhausted, liveness is now failing"
            );
            return;
        }
        let backoff = budget
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(consecutive - 1))
            .min(budget.max_backoff);
        heartbeat.restarted();
        metrics.loop_restarted(name);
        tracing::error!(loop_name = name, reason = %why, backoff_ms = backoff.as_millis() as u64, "loop died; restarting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn budget(max: usize) -> RestartBudget {
        RestartBudget {
            max_restarts: max,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_counted() {
        let health = Health::new();
        let beat = health.heartbeat("test", Duration::from_secs(5));
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (counter, stop) = (runs.clone(), shutdown.clone());
        supervise(beat.clone(), metrics, budget(5), shutdown, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if n < 2 {
                    panic!("boom {n}");
                }
                stop.cancel();
                Ok::<(), String>(())
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(beat.restarts(), 2);
        assert!(health.loop_checks()[0].reason.is_none() || beat.age().is_none());
    }

    #[tokio::test]
    async fn a_loop_that_keeps_failing_is_given_up() {
        let health = Health::new();
        let beat = health.heartbeat("flaky", Duration::from_secs(5));
        beat.beat();
        supervise(
            beat.clone(),
            Arc::new(Metrics::new()),
            budget(3),
            CancellationToken::new(),
            || async { Err::<(), _>("always") },
        )
        .await;
        assert_eq!(beat.restarts(), 3);
        let check = &health.loop_checks()[0];
        assert!(!check.ok);
        assert_eq!(check.reason.as_deref(), Some("restart budget exhausted"));
    }
}
