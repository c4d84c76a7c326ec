//! Row decoding and the column encodings shared by reads and writes.
//!
//! Instants are stored as integer Unix milliseconds (sortable, compact,
//! exact); ids as their canonical UUID text (UUID v7 text sorts by time).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::StoreError;
use crate::action::ActionPolicy;
use crate::job::{Job, JobId, JobSpec, Source};
use crate::run::{Incarnation, Run, RunId};
use crate::standing::{LastRun, Standing};

/// Columns selected for a job, in the order [`job`] reads them.
pub const JOB_COLUMNS: &str =
    "id, spec, paused, pause_note, source, version, created_at, updated_at, cursor_at, runs_started";

/// Columns selected for a job's standing, in the order [`standing`] reads
/// them.
pub const STANDING_COLUMNS: &str = "id, consecutive_failures, last_run_id, last_run_status, \
     last_run_scheduled_at, last_run_ended_at, last_run_error, last_success_at, last_failure_at";

/// Columns selected for a run, in the order [`run`] reads them.
pub const RUN_COLUMNS: &str = "id, job_id, job_name, scheduled_at, scheduled_until, fires, status, \
     trigger, reason, created_at, started_at, ended_at, attempts, exit_code, http_status, error, \
     output, pid, pgid, process_start_ticks, incarnation, attempt_log, stderr";

/// A result row, whichever driver read it: sqlx for the async reads,
/// rusqlite for the writer thread (see `docs/decisions.md`). The decoders
/// below are written once against it.
pub trait Columns {
    /// A nullable text column.
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    /// A nullable integer column.
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError>;

    /// A text column.
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?
            .ok_or_else(|| StoreError::corrupt(format!("column {i}"), "NULL where a value is required"))
    }

    /// An integer column.
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_int(i)?
            .ok_or_else(|| StoreError::corrupt(format!("column {i}"), "NULL where a value is required"))
    }
}

impl Columns for SqliteRow {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(i)?)
    }
}

impl Columns for rusqlite::Row<'_> {
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
}

fn opt_i32(value: Option<i64>) -> Option<i32> {
    value.and_then(|v| i32::try_from(v).ok())
}

/// Unix milliseconds.
pub fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// From Unix milliseconds.
pub fn instant(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::corrupt("instant", format!("{ms} ms is out of range")))
}

fn opt_instant(ms: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    ms.map(instant).transpose()
}

/// `text` parsed as the value named `what`.
pub(super) fn parse<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, StoreError> {
    text.parse()
        .map_err(|_| StoreError::corrupt(what, format!("`{text}` does not parse")))
}

/// The spec as stored: `paused` lives in its own column.
pub fn spec_json(spec: &JobSpec) -> Result<String, StoreError> {
    let mut spec = spec.clone();
    spec.paused = None;
    serde_json::to_string(&spec).map_err(|e| StoreError::encode("job spec", e))
}

/// Decodes a job row selected with [`JOB_COLUMNS`].
///
/// Stored specs were validated when written; they are validated again
/// here (schedules must be compiled anyway). Whether command actions may
/// *run* is decided by the executor at run time, so a job stored while
/// commands were enabled still loads, and its runs fail with a clear error.
pub fn job(row: &(impl Columns + ?Sized)) -> Result<Job, StoreError> {
    let id = row.text(0)?;
    let spec_text = row.text(1)?;
    let spec: JobSpec =
        serde_json::from_str(&spec_text).map_err(|e| StoreError::corrupt(format!("job {id} spec"), e))?;
    let def = spec
        .validate(&ActionPolicy {
            commands_enabled: true,
            loading: true,
            ..ActionPolicy::default()
        })
        .map_err(|e| StoreError::corrupt(format!("job {id} spec"), e))?;
    let source = row.text(4)?;
    Ok(Job {
        id: parse::<JobId>(&id, "job id")?,
        def,
        paused: row.int(2)? != 0,
        pause_note: row.opt_text(3)?,
        source: Source::parse(&source).ok_or_else(|| {
            StoreError::corrupt(format!("job {id} source"), format!("`{source}` is no source"))
        })?,
        version: row.int(5)?,
        created_at: instant(row.int(6)?)?,
        updated_at: instant(row.int(7)?)?,
        cursor_at: instant(row.int(8)?)?,
        runs_started: row.int(9)?.try_into().unwrap_or(0),
    })
}

/// Decodes a job's standing selected with [`STANDING_COLUMNS`].
pub fn standing(row: &(impl Columns + ?Sized)) -> Result<(JobId, Standing), StoreError> {
    let id = parse::<JobId>(&row.text(0)?, "job id")?;
    let last_run = match row.opt_text(2)? {
        Some(run) => Some(LastRun {
            id: parse(&run, "last run id")?,
            status: parse(&row.text(3)?, "last run status")?,
            scheduled_at: instant(row.int(4)?)?,
            ended_at: instant(row.int(5)?)?,
            error: row.opt_text(6)?,
        }),
        None => None,
    };
    Ok((
        id,
        Standing {
            last_run,
            last_success_at: opt_instant(row.opt_int(7)?)?,
            last_failure_at: opt_instant(row.opt_int(8)?)?,
            consecutive_failures: u32::try_from(row.int(1)?).unwrap_or(u32::MAX),
        },
    ))
}

/// Decodes a job row into a shared job.
pub fn shared_job(row: &(impl Columns + ?Sized)) -> Result<Arc<Job>, StoreError> {
    job(row).map(Arc::new)
}

/// Decodes a run row selected with [`RUN_COLUMNS`].
pub fn run(row: &(impl Columns + ?Sized)) -> Result<Run, StoreError> {
    let id = row.text(0)?;
    let job_id = row.text(1)?;
    let status = row.text(6)?;
    let trigger = row.text(7)?;
    let reason = row.opt_text(8)?;
    let incarnation = row.text(20)?;
    Ok(Run {
        id: parse::<RunId>(&id, "run id")?,
        job_id: parse(&job_id, "job id")?,
        job_name: row.text(2)?,
        scheduled_at: instant(row.int(3)?)?,
        scheduled_until: opt_instant(row.opt_int(4)?)?,
        fires: row.int(5)?.try_into().unwrap_or(u32::MAX),
        status: parse(&status, "status")?,
        trigger: parse(&trigger, "trigger")?,
        reason: reason.as_deref().map(|r| parse(r, "reason")).transpose()?,
        created_at: instant(row.int(9)?)?,
        started_at: opt_instant(row.opt_int(10)?)?,
        ended_at: opt_instant(row.opt_int(11)?)?,
        attempts: row.int(12)?.try_into().unwrap_or(u32::MAX),
        exit_code: opt_i32(row.opt_int(13)?),
        http_status: row.opt_int(14)?.and_then(|s| u16::try_from(s).ok()),
        error: row.opt_text(15)?,
        output: row.opt_text(16)?,
        stderr: row.opt_text(22)?,
        pid: opt_i32(row.opt_int(17)?),
        pgid: opt_i32(row.opt_int(18)?),
        process_start_ticks: row.opt_int(19)?.and_then(|t| u64::try_from(t).ok()),
        incarnation: Incarnation(parse(&incarnation, "incarnation")?),
        attempt_log: match row.opt_text(21)? {
            Some(text) => {
                serde_json::from_str(&text).map_err(|e| StoreError::corrupt("runs.attempt_log", e))?
            }
            None => Vec::new(),
        },
    })
}

/// The attempt log as stored (`NULL` when empty).
pub fn attempt_log_json(log: &[crate::run::Attempt]) -> Option<String> {
    (!log.is_empty()).then(|| serde_json::to_string(log).unwrap_or_default())
}
