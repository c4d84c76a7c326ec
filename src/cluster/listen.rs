//! Job changes made on other replicas, by PostgreSQL `LISTEN`.
//!
//! The writer of the replica that changed a job sends `NOTIFY` with the
//! job's id in the same commit (`store::writer`), so a notification never
//! arrives before the change is visible. The listener hands the ids to the
//! engine, which re-reads those jobs from the database (the notification
//! carries no state, so a late one can never roll a job back). A lost
//! connection may have lost notifications: after reconnecting, the engine
//! re-reads every job.

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::job::JobId;
use crate::loops::{Loop, LoopCx, LoopError};
use crate::store::{JobChange, Store};

/// The listener's collaborators.
pub struct Listener {
    /// The database.
    pub store: Store,
    /// The engine's change feed.
    pub changes: mpsc::UnboundedSender<JobChange>,
}

/// What the receiving task reports.
enum Heard {
    Jobs(Vec<JobId>),
    Reconnected,
}

impl Listener {
    /// Listens until `stop`; returns at once on a database without
    /// notifications (SQLite).
    pub async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        heartbeat: Arc<Heartbeat>,
        faults: Arc<Faults>,
    ) -> Result<(), LoopError> {
        let Some(mut listener) = self.store.incarnations().listen().await? else {
            return Ok(());
        };
        // Changes made while no listener ran (startup, or a restart of
        // this loop) were not heard: re-read everything once.
        let _ = self.changes.send(JobChange::Resync);
        let (tx, mut heard) = mpsc::unbounded_channel();
        // The receiving task owns the listener, so waiting for the next
        // notification is never cancelled halfway (this loop's heartbeat
        // ticks beside it); it is aborted when this loop ends.
        let receiving = AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                let message = match listener.next().await {
                    Ok(Some(payload)) => Heard::Jobs(parse(&payload)),
                    Ok(None) => Heard::Reconnected,
                    Err(e) => return Err(e),
                };
                if tx.send(message).is_err() {
                    return Ok(());
                }
            }
        }));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(()),
                message = heard.recv() => match message {
                    Some(Heard::Jobs(ids)) => {
                        let _ = self.changes.send(JobChange::Stale(ids));
                    }
                    Some(Heard::Reconnected) => {
                        tracing::warn!("lost the notification connection; re-reading every job");
                        let _ = self.changes.send(JobChange::Resync);
                    }
                    None => {
                        return match receiving.await {
                            Ok(result) => Ok(result?),
                            Err(e) => Err(LoopError::task("notification receiver", e)),
                        };
                    }
                },
                _ = tick.tick() => {}
            }
        }
    }
}

/// Job ids from a payload (comma-separated); anything else is ignored.
fn parse(payload: &str) -> Vec<JobId> {
    payload.split(',').filter_map(|id| id.parse().ok()).collect()
}

impl Loop for Listener {
    fn name(&self) -> &'static str {
        "replica_listener"
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx.stop, cx.beat, cx.faults))
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn payloads_are_comma_separated_ids() {
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        let ids = parse(&format!("{a},{b},not-an-id"));
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].0, a);
        assert!(parse("").is_empty());
    }
}
