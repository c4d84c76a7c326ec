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
use crate::run::{Reason, Run, Trigger};

/// Unrecorded fires by job, and decision rows the database refused.
#[derive(Default)]
pub struct Unrecorded {
    ranges: HashMap<JobId, Range>,
    rows: Vec<Run>,
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

    /// A row (a decision, or a missed range) the database refused: written
    /// again with the next flush.
    pub fn keep(&mut self, row: Run) {
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.rows.is_empty()
    }

    /// The rows kept, to write again now.
    pub fn take_rows(&mut self) -> Vec<Run> {
        std::mem::take(&mut self.rows)
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
