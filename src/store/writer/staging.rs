//! The write connection during one batch: the live-feed events its
//! operations stage, and the savepoint that contains an operation's
//! failure (and its events) on a shared database.

use super::{Op, Pending, WriteConn, apply};
use crate::store::StoreError;
use crate::store::sql::Tx;

/// The write connection during a batch, with the events its operations
/// stage for the live feed.
pub(super) struct Staging<'a> {
    pub conn: &'a mut dyn WriteConn,
    pub events: &'a mut Vec<crate::events::Event>,
}

impl Tx for Staging<'_> {
    fn execute(&mut self, sql: &str, params: &[crate::store::sql::Value]) -> Result<u64, StoreError> {
        self.conn.execute(sql, params)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[crate::store::sql::Value],
        each: &mut dyn FnMut(&dyn crate::store::rows::Columns) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.conn.query(sql, params, each)
    }

    fn stage(&mut self, event: crate::events::Event) {
        self.events.push(event);
    }
}

/// Applies `op` in a savepoint: one failed statement aborts a
/// PostgreSQL transaction, so its failure is contained to it (and so are
/// the events it staged).
pub(super) fn contained(tx: &mut Staging<'_>, op: Op, outbox: bool) -> Result<Pending, StoreError> {
    tx.execute("SAVEPOINT batch_op", &[])?;
    let staged = tx.events.len();
    let pending = apply(tx, op, outbox, true);
    let end = if pending.database_error {
        tx.events.truncate(staged);
        "ROLLBACK TO SAVEPOINT batch_op"
    } else {
        "RELEASE SAVEPOINT batch_op"
    };
    tx.execute(end, &[])?;
    Ok(pending)
}
