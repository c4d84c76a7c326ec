//! Notifications: events recorded with the changes they report, routed
//! to destinations, claimed and settled by the notifier
//! (docs/notifications.md).

use chrono::{DateTime, Utc};

use super::reads::Query;
use super::rows::{Columns, instant};
use super::{Ack, Inner, StoreError, writer};
use crate::notification::{Event, Message, Status, Target};

pub use super::writer::{Route, Settled};

/// Notifications (`Store::notices`).
pub struct Notices<'a> {
    pub(super) inner: &'a Inner,
}

/// One stored notification.
#[derive(Debug, Clone)]
pub struct Notice {
    /// Its place in the order of events.
    pub seq: i64,
    /// The id every attempt sends (`webhook-id`); set when routed.
    pub id: Option<String>,
    /// Where it stands.
    pub status: Status,
    /// What happened.
    pub message: Message,
    /// A failure: the first of a streak.
    pub first: bool,
    /// Where it goes; set when routed.
    pub target: Option<Target>,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (pending).
    pub next_attempt_at: DateTime<Utc>,
    /// When a destination took it.
    pub sent_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Which notifications to list.
#[derive(Debug, Clone, Default)]
pub struct NoticeFilter {
    /// Only these.
    pub status: Option<Status>,
    /// Only this job's.
    pub job: Option<crate::job::JobId>,
    /// Only before this position (newest first paging).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: u32,
}

const COLUMNS: &str = "seq, id, status, event, job_id, job_name, run_id, first, detail, occurred_at, target, \
     attempts, next_attempt_at, sent_at, last_error";

fn notice(row: &dyn Columns) -> Result<Notice, StoreError> {
    let text = |i| row.text(i);
    let status = text(2)?;
    let event = text(3)?;
    let target = row
        .opt_text(10)?
        .map(|t| {
            serde_json::from_str(&t).map_err(|e| StoreError::corrupt("notification target", e.to_string()))
        })
        .transpose()?;
    Ok(Notice {
        seq: row.int(0)?,
        id: row.opt_text(1)?,
        status: Status::parse(&status)
            .ok_or_else(|| StoreError::corrupt("notification status", status.clone()))?,
        message: Message {
            event: Event::parse(&event)
                .ok_or_else(|| StoreError::corrupt("notification event", event.clone()))?,
            job_id: text(4)?,
            job_name: text(5)?,
            run_id: row.opt_text(6)?,
            occurred_at: instant(row.int(9)?)?,
            detail: row.opt_text(8)?,
        },
        first: row.int(7)? != 0,
        target,
        attempts: u32::try_from(row.int(11)?).unwrap_or(u32::MAX),
        next_attempt_at: instant(row.int(12)?)?,
        sent_at: row.opt_int(13)?.map(instant).transpose()?,
        last_error: row.opt_text(14)?,
    })
}

impl Notices<'_> {
    /// Records that `job` missed its expected start `expected` (once per
    /// job and instant); whether this call recorded it.
    pub fn record_late(
        &self,
        job_id: String,
        job_name: String,
        expected: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Ack<bool> {
        self.inner.write(|reply| {
            writer::Op::Notices(writer::NoticeOp::Late {
                job_id,
                job_name,
                expected,
                at,
                reply,
            })
        })
    }

    /// Replaces new events by their destinations' rows; how many rows.
    pub fn route(&self, routes: Vec<Route>) -> Ack<u64> {
        self.inner
            .write(|reply| writer::Op::Notices(writer::NoticeOp::Route { routes, reply }))
    }

    /// Takes the due row `seq` until `until`; whether this replica did.
    pub fn claim(&self, seq: i64, now: DateTime<Utc>, until: DateTime<Utc>) -> Ack<bool> {
        self.inner.write(|reply| {
            writer::Op::Notices(writer::NoticeOp::Claim {
                seq,
                now,
                until,
                reply,
            })
        })
    }

    /// Records how an attempt ended.
    pub fn settle(&self, seq: i64, how: Settled, error: Option<String>, at: DateTime<Utc>) -> Ack<()> {
        self.inner.write(|reply| {
            writer::Op::Notices(writer::NoticeOp::Settle {
                seq,
                how,
                error,
                at,
                reply,
            })
        })
    }

    /// Deletes rows sent or given up before `before`; how many.
    pub fn prune(&self, before: DateTime<Utc>) -> Ack<u64> {
        self.inner
            .write(|reply| writer::Op::Notices(writer::NoticeOp::Prune { before, reply }))
    }

    /// The oldest rows of `status`, in order.
    pub async fn oldest(&self, status: Status, limit: u32) -> Result<Vec<Notice>, StoreError> {
        let mut q = Query::new(format!("SELECT {COLUMNS} FROM notifications WHERE status = "));
        q.bind(status.as_str())
            .push(" ORDER BY seq LIMIT ")
            .bind(i64::from(limit));
        self.inner.reads.all(q).await?.iter().map(|r| notice(r)).collect()
    }

    /// Notifications newest first.
    pub async fn list(&self, filter: &NoticeFilter) -> Result<Vec<Notice>, StoreError> {
        let mut q = Query::new(format!("SELECT {COLUMNS} FROM notifications WHERE 1 = 1"));
        if let Some(status) = filter.status {
            q.push(" AND status = ").bind(status.as_str());
        }
        if let Some(job) = filter.job {
            q.push(" AND job_id = ").bind(job.to_string());
        }
        if let Some(before) = filter.before {
            q.push(" AND seq < ").bind(before);
        }
        q.push(" ORDER BY seq DESC LIMIT ").bind(i64::from(filter.limit));
        self.inner.reads.all(q).await?.iter().map(|r| notice(r)).collect()
    }

    /// Rows per status, and when the oldest unsent (new or pending) event
    /// happened.
    pub async fn stats(&self) -> Result<(Vec<(Status, u64)>, Option<DateTime<Utc>>), StoreError> {
        let q = Query::new("SELECT status, COUNT(*) FROM notifications GROUP BY status");
        let mut counts = Vec::new();
        for row in self.inner.reads.all(q).await? {
            if let Some(status) = Status::parse(&row.text(0)?) {
                counts.push((status, row.int(1)?.max(0).unsigned_abs()));
            }
        }
        let q = Query::new("SELECT MIN(occurred_at) FROM notifications WHERE status IN ('new', 'pending')");
        let oldest = match self.inner.reads.first(q).await? {
            Some(row) => row.opt_int(0)?.map(instant).transpose()?,
            None => None,
        };
        Ok((counts, oldest))
    }
}
