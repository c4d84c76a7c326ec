//! Incarnation writes, as the store queues them.

use chrono::{DateTime, Utc};

use super::{Pending, Reply, pending, plain};
use crate::run::Incarnation;
use crate::store::StoreError;
use crate::store::rows::ms;
use crate::store::sql::{Tx, values};

/// Incarnation writes, as the store queues them.
pub enum IncarnationOp {
    Register {
        id: Incarnation,
        host: String,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    Stop {
        id: Incarnation,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
}

/// Applies one IncarnationOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: IncarnationOp) -> Pending {
    match op {
        IncarnationOp::Register { id, host, at, reply } => {
            let result = tx.execute(
                "INSERT INTO incarnations (id, pid, version, started_at, heartbeat_at, host) \
                 VALUES ($1, $2, $3, $4, $4, $5)",
                &values![
                    id.to_string(),
                    i64::from(std::process::id()),
                    env!("CARGO_PKG_VERSION"),
                    ms(at),
                    host,
                ],
            );
            pending(reply, plain(result.map(|_| ())))
        }
        IncarnationOp::Stop { id, at, reply } => {
            let result = tx.execute(
                "UPDATE incarnations SET stopped_at = $1 WHERE id = $2",
                &values![ms(at), id.to_string()],
            );
            pending(reply, plain(result.map(|_| ())))
        }
    }
}

impl IncarnationOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::Register { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Stop { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
