//! Fires whose run could not be recorded because the database refused the
//! write (a full disk, an I/O error): they did not run, and no row says so.
//! Kept per job as one range, counted at once, and recorded as one `missed`
//! row (reason `store_unavailable`) as soon as the database takes writes
//! again — nothing vanishes. If the process dies first, the job's stored
//! cursor never moved past them, so the next start plans them as downtime.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Fire, Missed};
use crate::job::{Job, JobId};
use crate::run::{Reason, Trigger};

/// Unrecorded fires by job.
#[derive(Default)]
pub struct Unrecorded {
    ranges: HashMap<JobId, Range>,
}

struct Range {
    job: Arc<Job>,
    first: DateTime<Utc>,
    until: DateTime<Utc>,
    fires: u32,
}

impl Unrecorded {
    /// A fire of `job` at `scheduled_at` could not be recorded.
    pub fn add(&mut self, job: Arc<Job>, scheduled_at: DateTime<Utc>) {
        let range = self.ranges.entry(job.id).or_insert_with(|| Range {
            job: job.clone(),
            first: scheduled_at,
            until: scheduled_at,
            fires: 0,
        });
        range.first = range.first.min(scheduled_at);
        range.until = range.until.max(scheduled_at);
        range.fires = range.fires.saturating_add(1);
        range.job = job;
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// One `missed` fire per job, to record now.
    pub fn take(&mut self) -> Vec<Fire> {
        self.ranges
            .drain()
            .map(|(_, r)| Fire {
                job: r.job,
                scheduled_at: r.first,
                due_at: r.first,
                trigger: Trigger::Schedule,
                missed: Some(Missed {
                    reason: Reason::StoreUnavailable,
                    until: r.until,
                    fires: r.fires,
                }),
            })
            .collect()
    }
}
