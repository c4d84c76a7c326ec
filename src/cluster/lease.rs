//! The lease loop: renew this replica's lease, read the live set, and (the
//! leader) declare expired replicas stopped and orphan their runs.
//!
//! It renews every third of the lease, so two renewals may fail (a busy
//! machine, a slow database) before the lease is lost. A replica that
//! cannot renew stops starting fires once its own lease has run out,
//! before anyone may take its jobs over; a replica that finds it was
//! declared stopped is fenced: it fires nothing more and the service shuts
//! down (the supervisor restarts it as a new incarnation).

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Membership;
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::orphans::{OrphanPolicy, Orphans};
use crate::store::Conflict;
use crate::store::{JobChange, StoreError};

/// The lease loop's collaborators.
pub struct Lease {
    /// This replica.
    pub membership: Arc<Membership>,
    /// The database; lease renewals and expiry are measured on its clock;
    /// replica gauges.
    pub services: Services,
    /// The engine's change feed: told to re-plan when ownership changes.
    pub changes: mpsc::UnboundedSender<JobChange>,
    /// Where expired replicas' runs are reported.
    pub orphans: Arc<Orphans>,
    /// What to do with their surviving processes (on this machine).
    pub policy: OrphanPolicy,
}

impl Lease {
    fn lease(&self) -> Duration {
        self.membership.lease.unwrap_or(super::DEFAULT_LEASE)
    }

    /// One round: renew, read the live set, tell the engine if ownership
    /// changed, and (leader) expire the dead. `last_renewed` is the last
    /// successful renewal.
    pub async fn round(&self, last_renewed: &mut DateTime<Utc>) -> Result<(), StoreError> {
        let me = self.membership.me;
        let now = self.services.clock.now();
        match self.services.store.incarnations().heartbeat(me, now).await {
            Ok(true) => {
                *last_renewed = now;
                self.services.metrics.lease_renewed(now);
            }
            Ok(false) => {
                tracing::error!(incarnation = %me, "this replica was declared stopped by another (its lease expired); fencing");
                self.membership.fence();
                let _ = self.changes.send(JobChange::Resync);
                return Err(StoreError::Conflict(Conflict::Fenced));
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the replica lease"),
        }
        let lease = TimeDelta::from_std(self.lease()).unwrap_or(TimeDelta::MAX);
        let active = now - *last_renewed < lease;
        let replicas = match self.services.store.incarnations().live(now - lease).await {
            Ok(replicas) => replicas,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the replica set");
                self.membership.replicas()
            }
        };
        let count = replicas.len();
        if self.membership.update(replicas, active) {
            tracing::info!(
                replicas = count,
                active,
                "replica set changed; re-planning owned jobs"
            );
            let _ = self.changes.send(JobChange::Resync);
        }
        self.services.metrics.set_replicas(count);
        if active && self.membership.leads() {
            let runs = self
                .services
                .store
                .runs()
                .orphan_foreign(me, now, Some(now - lease))
                .await?;
            if !runs.is_empty() {
                tracing::warn!(runs = runs.len(), "took over the live runs of expired replicas");
            }
            crate::orphans::handle_previous_incarnation_runs(&runs, &self.orphans, now, self.policy);
        }
        Ok(())
    }

    /// Renews until `stop`, stamping `heartbeat`; returns once fenced.
    pub async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        heartbeat: Arc<Heartbeat>,
        faults: Arc<Faults>,
    ) -> Result<(), LoopError> {
        let every = self.lease() / 3;
        let mut last_renewed = self.services.clock.now();
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            match self.round(&mut last_renewed).await {
                Err(StoreError::Conflict(Conflict::Fenced)) => {
                    // Nothing to renew any more. The service is stopping
                    // (see `App::run`); the heartbeat of this loop goes
                    // stale meanwhile, and liveness says so.
                    stop.cancelled().await;
                    return Ok(());
                }
                Err(e) => tracing::warn!(error = %e, "replica housekeeping failed"),
                Ok(()) => {}
            }
            let wake = self.services.clock.now() + TimeDelta::from_std(every).unwrap_or(TimeDelta::MAX);
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = self.services.clock.sleep_until(wake) => {}
            }
        }
    }
}

impl Loop for Lease {
    fn name(&self) -> &'static str {
        "replica_lease"
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx.stop, cx.beat, cx.faults))
    }
}
