//! Notifications as the writer keeps them: an event recorded in the
//! commit of the change it reports, routed to one row per destination,
//! claimed, and settled (docs/notifications.md).

use chrono::{DateTime, Utc};

use super::{Pending, Reply, pending, plain};
use crate::notification::Event;
use crate::run::RunId;
use crate::store::StoreError;
use crate::store::rows::ms;
use crate::store::sql::{Tx, first, values};

/// An event to report, as its change commits.
pub(super) struct Notice<'a> {
    pub event: Event,
    pub job_id: &'a str,
    pub job_name: &'a str,
    pub run: Option<RunId>,
    /// A failure: the first of a streak.
    pub first: bool,
    pub detail: Option<String>,
    pub at: DateTime<Utc>,
}

/// Records `n` as `new`: the notifier routes it to its destinations.
pub(super) fn record(c: &mut dyn Tx, n: Notice<'_>) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO notifications (event, job_id, job_name, run_id, first, detail, occurred_at, status, \
         next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'new', $7)",
        &values![
            n.event.as_str(),
            n.job_id,
            n.job_name,
            n.run.map(|r| r.to_string()),
            i64::from(n.first),
            n.detail,
            ms(n.at),
        ],
    )?;
    Ok(())
}

/// One event's destinations: a stable id and the target (JSON) each.
pub struct Route {
    /// The `new` row.
    pub seq: i64,
    /// `(id, target)` per destination; none drops the event.
    pub targets: Vec<(String, String)>,
}

/// How one delivery attempt ended.
pub enum Settled {
    /// The destination answered 2xx.
    Sent,
    /// Try again at this instant.
    Retry(DateTime<Utc>),
    /// Past the give-up age: no more attempts.
    GaveUp,
}

/// Notification writes, as the store queues them.
pub enum NoticeOp {
    /// Replaces each `new` event by its destinations' rows (another
    /// replica may have routed it already: then nothing).
    Route { routes: Vec<Route>, reply: Reply<u64> },
    /// Records a `late` event once per job and expected instant.
    Late {
        job_id: String,
        job_name: String,
        expected: DateTime<Utc>,
        at: DateTime<Utc>,
        reply: Reply<bool>,
    },
    /// Takes a due row for one attempt until `until` (replicas: only one
    /// sends it); whether this writer got it.
    Claim {
        seq: i64,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        reply: Reply<bool>,
    },
    /// Records an attempt's end.
    Settle {
        seq: i64,
        how: Settled,
        error: Option<String>,
        at: DateTime<Utc>,
        reply: Reply<()>,
    },
    /// Deletes sent and given-up rows settled before `before`.
    Prune {
        before: DateTime<Utc>,
        reply: Reply<u64>,
    },
}

fn route(c: &mut dyn Tx, routes: &[Route]) -> Result<u64, StoreError> {
    let mut routed = 0;
    for r in routes {
        let taken = first(
            c,
            "DELETE FROM notifications WHERE seq = $1 AND status = 'new' \
             RETURNING event, job_id, job_name, run_id, first, detail, dedupe, occurred_at",
            &values![r.seq],
            |row| {
                Ok(values![
                    row.text(0)?,
                    row.text(1)?,
                    row.text(2)?,
                    row.opt_text(3)?,
                    row.int(4)?,
                    row.opt_text(5)?,
                    row.opt_text(6)?,
                    row.int(7)?,
                ])
            },
        )?;
        let Some(event) = taken else { continue };
        for (id, target) in &r.targets {
            let mut params = event.to_vec();
            params.extend(values![id.as_str(), target.as_str()]);
            c.execute(
                "INSERT INTO notifications (event, job_id, job_name, run_id, first, detail, dedupe, occurred_at, \
                 id, target, status, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', $8)",
                &params,
            )?;
            routed += 1;
        }
    }
    Ok(routed)
}

fn late(
    c: &mut dyn Tx,
    job_id: &str,
    job_name: &str,
    expected: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let detail = format!(
        "expected to start by {}",
        expected.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let n = c.execute(
        "INSERT INTO notifications (event, job_id, job_name, detail, dedupe, occurred_at, status, next_attempt_at) \
         SELECT 'late', $1, $2, $3, $4, $5, 'new', $5 WHERE NOT EXISTS \
         (SELECT 1 FROM notifications WHERE job_id = $1 AND event = 'late' AND dedupe = $4)",
        &values![job_id, job_name, detail, ms(expected).to_string(), ms(at)],
    )?;
    Ok(n > 0)
}

fn settle(
    c: &mut dyn Tx,
    seq: i64,
    how: &Settled,
    error: Option<String>,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (status, next, sent) = match how {
        Settled::Sent => ("sent", at, Some(ms(at))),
        Settled::Retry(next) => ("pending", *next, None),
        Settled::GaveUp => ("failed", at, None),
    };
    c.execute(
        "UPDATE notifications SET status = $1, attempts = attempts + 1, next_attempt_at = $2, sent_at = $3, \
         last_error = $4 WHERE seq = $5",
        &values![status, ms(next), sent, error, seq],
    )?;
    Ok(())
}

/// Applies one NoticeOp inside the batch's transaction.
pub(super) fn apply(tx: &mut dyn Tx, op: NoticeOp) -> Pending {
    match op {
        NoticeOp::Route { routes, reply } => pending(reply, plain(route(tx, &routes))),
        NoticeOp::Late {
            job_id,
            job_name,
            expected,
            at,
            reply,
        } => pending(reply, plain(late(tx, &job_id, &job_name, expected, at))),
        NoticeOp::Claim {
            seq,
            now,
            until,
            reply,
        } => {
            let claimed = tx.execute(
                "UPDATE notifications SET next_attempt_at = $1 WHERE seq = $2 AND status = 'pending' \
                 AND next_attempt_at <= $3",
                &values![ms(until), seq, ms(now)],
            );
            pending(reply, plain(claimed.map(|n| n == 1)))
        }
        NoticeOp::Settle {
            seq,
            how,
            error,
            at,
            reply,
        } => pending(reply, plain(settle(tx, seq, &how, error, at))),
        NoticeOp::Prune { before, reply } => {
            let deleted = tx.execute(
                "DELETE FROM notifications WHERE status IN ('sent', 'failed') AND next_attempt_at < $1",
                &values![ms(before)],
            );
            pending(reply, plain(deleted))
        }
    }
}

impl NoticeOp {
    /// Answers the operation with `e` without applying it.
    pub(super) fn fail(self, e: StoreError) {
        match self {
            Self::Route { reply, .. } | Self::Prune { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Late { reply, .. } | Self::Claim { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Settle { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
