//! Incarnations of the service: start and stop, and among replicas the lease, the live set and change notifications.

use chrono::{DateTime, Utc};

use super::{Ack, Backend, Inner, Notifications, Replica, StoreError, writer};
use crate::run::Incarnation;

/// Incarnations of the service: start and stop, and among replicas the lease, the live set and change notifications (`Store::incarnations`).
pub struct Incarnations<'a> {
    pub(super) inner: &'a Inner,
}

impl Incarnations<'_> {
    /// Records this process's start on `host`.
    pub fn register(&self, id: Incarnation, host: String, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::Incarnations(writer::IncarnationOp::Register { id, host, at, reply }))
    }

    /// Renews this replica's lease; `false` once it was declared stopped.
    pub async fn heartbeat(&self, id: Incarnation, at: DateTime<Utc>) -> Result<bool, StoreError> {
        self.inner.reads.heartbeat(id, at).await
    }

    /// Records that this replica began to leave.
    pub async fn leave(&self, id: Incarnation, at: DateTime<Utc>) -> Result<(), StoreError> {
        self.inner.reads.leave(id, at).await
    }

    /// Runs executing now, by incarnation.
    pub async fn running_by(&self) -> Result<std::collections::HashMap<Incarnation, u64>, StoreError> {
        self.inner.reads.running_by_incarnation().await
    }

    /// Replicas not stopped whose last heartbeat is later than `cutoff`.
    pub async fn live(&self, cutoff: DateTime<Utc>) -> Result<Vec<Replica>, StoreError> {
        self.inner.reads.replicas(cutoff).await
    }

    /// Listens for job changes announced by replicas (PostgreSQL only).
    pub async fn listen(&self) -> Result<Option<Notifications>, StoreError> {
        match &self.inner.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(remote) => remote.listen().await.map(Some),
        }
    }

    /// Records this process's clean stop.
    pub fn stop(&self, id: Incarnation, at: DateTime<Utc>) -> Ack<()> {
        self.inner
            .write(|reply| writer::Op::Incarnations(writer::IncarnationOp::Stop { id, at, reply }))
    }
}
