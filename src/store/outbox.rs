//! The outbox of results and rejections for the control backend.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Ack, Inner, OutboxEntry, StoreError, writer};

/// The outbox of results and rejections for the control backend (`Store::outbox`).
pub struct Outbox<'a> {
    pub(super) inner: &'a Inner,
}

impl Outbox<'_> {
    /// Queues a rejected backend job spec for upload.
    pub fn record_rejections(
        &self,
        rejections: Vec<crate::protocol::Rejection>,
        summary: crate::protocol::RejectionSummary,
    ) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Outbox(writer::OutboxOp::RecordRejections {
                rejections,
                summary,
                reply,
            })
        })
    }

    /// Notified after every commit while the outbox is on (the uploader
    /// waits on it instead of polling).
    pub fn signal(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_signal.clone()
    }

    /// Deletes acknowledged outbox entries.
    pub fn delete(&self, seqs: Vec<i64>) -> Ack<u64> {
        self.inner
            .write(|reply| writer::Op::Outbox(writer::OutboxOp::Delete { seqs, reply }))
    }

    /// Drops the oldest outbox entries beyond `limit`; how many.
    pub fn trim(&self, limit: u64) -> Ack<u64> {
        self.inner
            .write(|reply| writer::Op::Outbox(writer::OutboxOp::Trim { limit, reply }))
    }

    /// The oldest `limit` outbox entries, in commit order.
    pub async fn peek(&self, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.reads.outbox_peek(limit).await
    }

    /// Entries waiting, and when the oldest was written.
    pub async fn stats(&self) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
        self.inner.reads.outbox_stats().await
    }
}
