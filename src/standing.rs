//! A job's standing at a glance: its last run, last success and failure,
//! consecutive failures, and one health value (`docs/observability.md`,
//! "Job health").
//!
//! The facts are kept on the job's row in the commit that ends each run, so
//! reading them costs no scan of the runs table; health is derived from
//! them, the job and "now" when read, so `late` needs no loop to notice it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::job::{Job, JobId, Timing};
use crate::run::{RunId, RunStatus};
use crate::schedule::Schedule;

/// Longest one-line error kept with the last run.
pub const ERROR_LINE_CHARS: usize = 200;

/// The run that ended last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LastRun {
    /// The run.
    pub id: RunId,
    /// How it ended: `succeeded`, `failed`, `timed_out` or `cancelled`.
    pub status: RunStatus,
    /// Its nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: DateTime<Utc>,
    /// The first line of its error, at most 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a job's runs have come to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Standing {
    /// The last run that ended after it was started or queued (skipped and
    /// missed fires are not runs that ended); absent before the first.
    pub last_run: Option<LastRun>,
    /// When a run of the job last succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a run of the job last failed or timed out.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Runs that failed or timed out since the last success (a cancelled
    /// run neither counts nor resets).
    pub consecutive_failures: u32,
}

/// One word for a job's state: the first of these that applies.
///
/// - `paused`: its fires are suspended (by a person, or by
///   `auto_pause_after`).
/// - `late`: its next fire plus its jitter plus `misfire_grace` has passed
///   and no start of that fire is recorded (the dead man's switch, for every
///   job).
/// - `failing`: its last run that ended failed or timed out.
/// - `finished`: it will not fire again (a one-shot that fired,
///   `max_runs` reached, a schedule that ended).
/// - `pending`: no run of it has ended yet.
/// - `ok`: none of the above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobHealth {
    /// Fires are suspended (by a person, or by `auto_pause_after`).
    Paused,
    /// Its next fire plus jitter plus `misfire_grace` has passed without a
    /// start being recorded: the dead man's switch, for every job.
    Late,
    /// Its last run that ended failed or timed out.
    Failing,
    /// It will not fire again (a one-shot that fired, `max_runs` reached,
    /// a schedule that ended).
    Finished,
    /// No run of it has ended yet.
    Pending,
    /// None of the above: its last run succeeded (or was cancelled) and its
    /// next fire is not overdue.
    Ok,
}

impl JobHealth {
    /// Every value, in the order they are judged.
    pub const ALL: &[Self] = &[
        Self::Paused,
        Self::Late,
        Self::Failing,
        Self::Finished,
        Self::Pending,
        Self::Ok,
    ];

    /// Stable text form (query strings, counts).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paused => "paused",
            Self::Late => "late",
            Self::Failing => "failing",
            Self::Finished => "finished",
            Self::Pending => "pending",
            Self::Ok => "ok",
        }
    }
}

impl fmt::Display for JobHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobHealth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|h| h.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = Self::ALL.iter().map(|h| h.as_str()).collect();
                format!("`{s}` is not one of: {}", all.join(", "))
            })
    }
}

impl Standing {
    /// The job's health at `now`.
    pub fn health(&self, job: &Job, now: DateTime<Utc>) -> JobHealth {
        let when = When {
            id: job.id,
            schedule: &job.def.schedule,
            grace: job.def.policy.misfire_grace,
            paused: job.paused,
            next: job.next_fire(),
        };
        self.judge(&when, now)
    }

    /// The same judgement from what the engine keeps of a job (no whole
    /// definition to read): counting every job stays cheap.
    pub fn health_of(&self, timing: &Timing, now: DateTime<Utc>) -> JobHealth {
        self.judge(&When::of(timing), now)
    }

    fn judge(&self, when: &When<'_>, now: DateTime<Utc>) -> JobHealth {
        if when.paused {
            return JobHealth::Paused;
        }
        if when.deadline().is_some_and(|by| now > by) {
            return JobHealth::Late;
        }
        if self.consecutive_failures > 0 {
            JobHealth::Failing
        } else if when.next.is_none() {
            JobHealth::Finished
        } else if self.last_run.is_none() {
            JobHealth::Pending
        } else {
            JobHealth::Ok
        }
    }
}

/// What health needs of a job's timing.
struct When<'a> {
    id: JobId,
    schedule: &'a Schedule,
    grace: std::time::Duration,
    paused: bool,
    /// The next nominal fire (none when paused or exhausted).
    next: Option<DateTime<Utc>>,
}

impl<'a> When<'a> {
    fn of(timing: &'a Timing) -> Self {
        let next = if timing.paused || timing.exhausted {
            None
        } else {
            timing.schedule.next_after(timing.cursor_at)
        };
        When {
            id: timing.id,
            schedule: &timing.schedule,
            grace: timing.misfire_grace,
            paused: timing.paused,
            next,
        }
    }

    /// The instant by which the next fire should have started: the fire,
    /// its jitter and the misfire grace.
    fn deadline(&self) -> Option<DateTime<Utc>> {
        let next = self.next?;
        Some(next + delta(self.schedule.jitter_for(self.id.0, next)) + delta(self.grace))
    }
}

/// The deadline a job is late past at `now` (health `late`), judged from
/// what the engine keeps of it; `None` when it is not late.
pub fn overdue(timing: &Timing, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    When::of(timing).deadline().filter(|by| now > *by)
}

fn delta(d: std::time::Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// The one line of a run's error kept with the job.
pub fn error_line(error: &str) -> String {
    let line = error.lines().next().unwrap_or_default();
    line.chars().take(ERROR_LINE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_parses_and_prints_each_value() {
        for h in JobHealth::ALL {
            assert_eq!(h.as_str().parse::<JobHealth>(), Ok(*h));
        }
        assert!(
            "bad"
                .parse::<JobHealth>()
                .unwrap_err()
                .contains("paused, late, failing")
        );
    }

    #[test]
    fn the_error_line_is_the_first_line_cut_to_its_bound() {
        assert_eq!(error_line("boom\nstack"), "boom");
        assert_eq!(error_line(&"é".repeat(500)).chars().count(), ERROR_LINE_CHARS);
        assert_eq!(error_line(""), "");
    }
}
