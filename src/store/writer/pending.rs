//! What an applied operation leaves until its batch's commit is known:
//! the reply to send and the job change to publish.

use tokio::sync::mpsc;

use super::Reply;
use crate::job::JobId;
use crate::store::fault::StorageFault;
use crate::store::{JobChange, StoreError};

/// Replies and publishes once the commit is known (its error, if any).
type Finish = Box<dyn FnOnce(Option<&CommitError>, &mpsc::UnboundedSender<JobChange>) + Send>;

/// Why a group commit failed.
#[derive(Debug, Clone)]
pub struct CommitError {
    pub(super) fault: StorageFault,
    pub(super) detail: String,
}

/// What to do once the batch's commit is known: reply, publish changes.
pub struct Pending {
    pub(super) finish: Finish,
    /// The job whose change will be published (other replicas are told).
    pub(super) changed: Option<JobId>,
    /// The operation failed in the database: on PostgreSQL the transaction
    /// must go back to before it.
    pub(super) database_error: bool,
    /// The database refused the operation for a fault of its own (not a
    /// constraint of the data).
    pub(super) storage_fault: Option<(StorageFault, String)>,
}

/// What an operation produced: the caller's value and, once committed, the
/// job change to publish.
pub(super) type Applied<T> = Result<(T, Option<JobChange>), StoreError>;

pub(super) fn pending<T: Send + 'static>(reply: Reply<T>, applied: Applied<T>) -> Pending {
    let (result, change) = match applied {
        Ok((value, change)) => (Ok(value), change),
        Err(e) => (Err(e), None),
    };
    let changed = change.as_ref().and_then(|c| match c {
        JobChange::Upserted(job) => Some(job.id),
        JobChange::Removed(id) => Some(*id),
        JobChange::Stale(_) | JobChange::Resync => None,
    });
    let database_error = matches!(result, Err(StoreError::Database(_)));
    let storage_fault = match &result {
        Err(e @ StoreError::Database(_)) => StorageFault::outage(e).map(|f| (f, e.to_string())),
        _ => None,
    };
    let finish = Box::new(
        move |commit_error: Option<&CommitError>, changes: &mpsc::UnboundedSender<JobChange>| {
            match commit_error {
                Some(e) => {
                    let _ = reply.send(Err(StoreError::Unavailable {
                        fault: e.fault,
                        detail: e.detail.clone(),
                    }));
                }
                None => {
                    if result.is_ok()
                        && let Some(change) = change
                    {
                        // The engine may be restarting; the change is then
                        // covered by its reload from the store.
                        let _ = changes.send(change);
                    }
                    let _ = reply.send(result);
                }
            }
        },
    );
    Pending {
        finish,
        changed,
        database_error,
        storage_fault,
    }
}

/// An operation that publishes no job change.
pub(super) fn plain<T>(result: Result<T, StoreError>) -> Applied<T> {
    result.map(|v| (v, None))
}
