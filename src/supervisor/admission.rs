//! The overlap policy as a pure decision, so it is tested exhaustively
//! without running anything.

use crate::policy::{Overlap, Policy};
use crate::run::Reason;

/// What to do with a new fire of a job, given what is live for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Start it now.
    Start,
    /// Record it as `queued`; it starts when the job's running runs end.
    /// `displace` says whether an already queued run must give way (it is
    /// recorded as cancelled, reason `replaced`).
    Queue {
        /// An earlier queued run is replaced by this one.
        displace: bool,
        /// The running runs are to be cancelled first (`cancel_running`).
        cancel_running: bool,
    },
    /// Record it as `skipped` with this reason.
    Skip(Reason),
}

/// Runs of one job allowed at once.
pub fn limit(policy: &Policy) -> usize {
    match policy.overlap {
        Overlap::Allow => policy.max_concurrency as usize,
        _ => 1,
    }
}

/// Decides for one fire. `running` counts live runs of the job in this
/// service (never stale rows: only tasks that exist), `queued` whether one
/// is already waiting.
pub fn admit(policy: &Policy, running: usize, queued: bool) -> Admission {
    if running < limit(policy) && !queued {
        return Admission::Start;
    }
    match policy.overlap {
        Overlap::Skip | Overlap::Allow => Admission::Skip(Reason::Overlap),
        Overlap::QueueOne if queued => Admission::Skip(Reason::QueueFull),
        Overlap::QueueOne => Admission::Queue {
            displace: false,
            cancel_running: false,
        },
        Overlap::CancelRunning => Admission::Queue {
            displace: queued,
            cancel_running: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(overlap: Overlap, max: u32) -> Policy {
        Policy {
            overlap,
            max_concurrency: max,
            ..Policy::default()
        }
    }

    #[test]
    fn every_policy_against_a_busy_job() {
        use Admission::*;
        let skip = policy(Overlap::Skip, 1);
        assert_eq!(admit(&skip, 0, false), Start);
        assert_eq!(admit(&skip, 1, false), Skip(Reason::Overlap));

        let queue = policy(Overlap::QueueOne, 1);
        assert_eq!(admit(&queue, 0, false), Start);
        assert_eq!(
            admit(&queue, 1, false),
            Queue {
                displace: false,
                cancel_running: false
            }
        );
        assert_eq!(admit(&queue, 1, true), Skip(Reason::QueueFull));

        let cancel = policy(Overlap::CancelRunning, 1);
        assert_eq!(
            admit(&cancel, 1, false),
            Queue {
                displace: false,
                cancel_running: true
            }
        );
        assert_eq!(
            admit(&cancel, 1, true),
            Queue {
                displace: true,
                cancel_running: true
            }
        );

        let allow = policy(Overlap::Allow, 3);
        assert_eq!(admit(&allow, 2, false), Start);
        assert_eq!(admit(&allow, 3, false), Skip(Reason::Overlap));
    }
}
