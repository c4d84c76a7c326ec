//! Runs: one row per fire, from admission to a final status.
//!
//! State machine (`docs/scheduling.md`):
//! `queued → running → succeeded | failed | timed_out | cancelled`;
//! `queued → cancelled | missed`; `running | queued → orphaned` when the
//! incarnation that owned it is gone; `skipped` and `missed` rows are final
//! when written. Nothing moves out of a final status.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::job::JobId;

/// Longest output tail kept per run (stdout and stderr interleaved).
pub const DEFAULT_OUTPUT_TAIL_BYTES: usize = 16 * 1024;
/// Longest error text kept per run.
pub const MAX_ERROR_LEN: usize = 4096;

/// Identifies a run; time-ordered (UUID v7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct RunId(pub Uuid);

impl RunId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

/// Orders run ids created in the same millisecond (UUID v7 counter).
static RUN_ID_CONTEXT: std::sync::Mutex<uuid::ContextV7> = std::sync::Mutex::new(uuid::ContextV7::new());

impl RunId {
    /// A fresh id for a run created at `at` (the service clock's now), so
    /// ids sort by creation on the clock the service runs on.
    pub fn at(at: DateTime<Utc>) -> Self {
        let secs = at.timestamp().max(0) as u64;
        let ts = uuid::Timestamp::from_unix(&RUN_ID_CONTEXT, secs, at.timestamp_subsec_nanos());
        Self(Uuid::new_v7(ts))
    }

    /// The smallest id a run created at `at` or later can have: ids are
    /// UUID v7, so `id < boundary(t)` means "created before `t`" and uses
    /// the primary key instead of a scan.
    pub fn boundary(at: DateTime<Utc>) -> Self {
        let ms = u128::from(at.timestamp_millis().max(0) as u64) & 0xffff_ffff_ffff;
        // 48-bit time, version 7, variant 0b10, all random bits zero.
        Self(Uuid::from_u128((ms << 80) | (0x7 << 76) | (0b10 << 62)))
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::from_str(s).map(Self)
    }
}

/// Identifies one process lifetime of the service (ordered: replicas
/// agree on a leader by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct Incarnation(pub Uuid);

impl Incarnation {
    /// A fresh incarnation id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for Incarnation {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// Stable text form (storage, metrics labels, query strings).
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(format!(
                        "`{s}` is not one of: {}",
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where a run is in its life.
    RunStatus {
        /// Waiting for a previous run of the job (`overlap: queue_one`) or a
        /// free slot under the global concurrency limit.
        Queued = "queued",
        /// Executing now.
        Running = "running",
        /// Finished successfully.
        Succeeded = "succeeded",
        /// Finished unsuccessfully (non-zero exit, bad status, error, panic).
        Failed = "failed",
        /// Killed at its timeout.
        TimedOut = "timed_out",
        /// Cancelled by a client, a policy or shutdown.
        Cancelled = "cancelled",
        /// Not started because of the overlap policy.
        Skipped = "skipped",
        /// Not started because it was too late (misfire grace, downtime).
        Missed = "missed",
        /// Its owner (an earlier incarnation) vanished while it was live.
        Orphaned = "orphaned",
    }
}

impl RunStatus {
    /// Whether the status can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

text_enum! {
    /// Why a run exists.
    Trigger {
        /// A scheduled fire.
        Schedule = "schedule",
        /// `POST /v1/jobs/{job}/trigger`.
        Manual = "manual",
        /// A fire replayed after downtime.
        CatchUp = "catch_up",
    }
}

text_enum! {
    /// Why a fire did not run (bounded: used as a metric label).
    Reason {
        /// A previous run was still going (`overlap: skip`).
        Overlap = "overlap",
        /// `queue_one` already had a waiting run.
        QueueFull = "queue_full",
        /// The fire started later than `misfire_grace` allows.
        Misfire = "misfire",
        /// The service was down when the fire was due.
        Downtime = "downtime",
        /// Replaced by a newer run (`overlap: cancel_running`).
        Replaced = "replaced",
        /// A client asked.
        Requested = "requested",
        /// The service was shutting down.
        Shutdown = "shutdown",
        /// The job was deleted.
        JobDeleted = "job_deleted",
        /// The job already started `max_runs` scheduled runs.
        LimitReached = "limit_reached",
        /// The database refused to record the run (a full disk, an I/O
        /// error); recorded once it takes writes again.
        StoreUnavailable = "store_unavailable",
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Run {
    /// Identity.
    pub id: RunId,
    /// The job it belongs to.
    pub job_id: JobId,
    /// The job's name when the run was created.
    pub job_name: String,
    /// The nominal fire time (for manual runs: when it was requested).
    pub scheduled_at: DateTime<Utc>,
    /// For a row summarising several missed fires: the last of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduled_until: Option<DateTime<Utc>>,
    /// How many fires this row stands for (1 unless a coalesced range).
    pub fires: u32,
    /// Where it is in its life.
    pub status: RunStatus,
    /// Why it exists.
    pub trigger: Trigger,
    /// Why it did not run, for `skipped`, `missed`, `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When execution began.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its final status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Exit code of a command (absent when killed by a signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Response status of an HTTP call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// What went wrong, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Tail of the command's standard output, or the HTTP response body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Tail of the command's standard error (kept apart from `output`,
    /// each bounded by `--output-tail-bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Process id of a command run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Process group of a command run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgid: Option<i32>,
    /// The process's start time in clock ticks since boot (from
    /// `/proc/<pid>/stat`), telling a live orphan from a reused pid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_start_ticks: Option<u64>,
    /// The service incarnation that created the run.
    pub incarnation: Incarnation,
    /// Each finished attempt, for runs with retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_log: Vec<Attempt>,
}

/// One attempt of a run with retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub attempt: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
    /// How it ended.
    pub status: RunStatus,
    /// Exit code of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Response status of an HTTP call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt is due, for an attempt that is retried: its
    /// end plus the backoff. Set before the wait starts, so a running run
    /// shows when it will try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

/// The end of an execution, as the supervisor records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// A final status.
    pub status: RunStatus,
    /// Why, for `cancelled`.
    pub reason: Option<Reason>,
    /// Attempts made.
    pub attempts: u32,
    /// Exit code of a command.
    pub exit_code: Option<i32>,
    /// Response status of an HTTP call.
    pub http_status: Option<u16>,
    /// Error text.
    pub error: Option<String>,
    /// Standard output tail (or an HTTP response body).
    pub output: Option<String>,
    /// Standard error tail.
    pub stderr: Option<String>,
    /// Every attempt, when the run retried.
    pub attempt_log: Vec<Attempt>,
}

impl Outcome {
    /// A failure with only an error text.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            status: RunStatus::Failed,
            reason: None,
            attempts: 1,
            exit_code: None,
            http_status: None,
            error: Some(truncate(error.into(), MAX_ERROR_LEN)),
            output: None,
            stderr: None,
            attempt_log: Vec::new(),
        }
    }

    /// A cancellation for `reason`.
    pub fn cancelled(reason: Reason, error: impl Into<String>) -> Self {
        Self {
            status: RunStatus::Cancelled,
            reason: Some(reason),
            ..Self::failed(error)
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}
