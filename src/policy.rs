//! How a job behaves when fires collide, arrive late, fail, or pile up.
//!
//! Every field has a documented default (`docs/scheduling.md`), chosen to
//! match what users of Kubernetes CronJob, APScheduler and Temporal expect.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{FieldErrors, parse_duration};

/// Default `misfire_grace`.
pub const DEFAULT_MISFIRE_GRACE: Duration = Duration::from_secs(60);
/// Default `catch_up_window`.
pub const DEFAULT_CATCH_UP_WINDOW: Duration = Duration::from_secs(3600);
/// Default `kill_grace`.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
/// Default first retry delay.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Most fires `catch_up: all` replays after downtime, whatever the window.
pub const MAX_CATCH_UP_RUNS: usize = 1000;
/// Largest `max_concurrency`.
pub const MAX_CONCURRENCY: u32 = 1000;
/// Most attempts one run may make.
pub const MAX_ATTEMPTS: u32 = 100;

/// What to do when a fire comes while an earlier run is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Record the new fire as `skipped` (Kubernetes `Forbid`).
    #[default]
    Skip,
    /// Keep at most one fire waiting (`queued`); further ones are skipped.
    QueueOne,
    /// Cancel the running run, then start the new one (`Replace`).
    CancelRunning,
    /// Run concurrently, up to `max_concurrency` runs (`Allow`).
    Allow,
}

/// What to do with fires missed while the service was down or paused by
/// load, once they are later than `misfire_grace`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Record them as `missed`, run nothing.
    None,
    /// Run once for the most recent missed fire; record the rest as one
    /// `missed` row summarising the range (APScheduler `coalesce`).
    #[default]
    Latest,
    /// Run each missed fire inside `catch_up_window`, oldest first; older
    /// ones are recorded as `missed`.
    All,
}

/// Retries inside one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, including the first; default 1 (no retry), at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<u32>,
    /// Delay before the first retry; doubles per retry; default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Longest delay between attempts; default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
}

/// How much run history a job keeps (overrides the service defaults).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistorySpec {
    /// Keep at most this many finished runs (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub keep_last: Option<u32>,
    /// Delete finished runs older than this (`30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// Policy as clients write it; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Default `skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
    /// Concurrent runs allowed under `overlap: allow`; default 1, at most 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub max_concurrency: Option<u32>,
    /// How late a fire may start and still run; default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub misfire_grace: Option<String>,
    /// Default `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// How far back `catch_up: all` replays; default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window: Option<String>,
    /// Time between SIGTERM and SIGKILL to a command's process group when it
    /// times out or is cancelled; default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace: Option<String>,
    /// Retries of failed or timed-out attempts, inside the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Pause the job after this many consecutive failed runs; off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub auto_pause_after: Option<u32>,
    /// Stop firing after this many scheduled runs have started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_runs: Option<u64>,
    /// Run history to keep; default the service's `--history-keep-last` and
    /// `--history-max-age`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
}

/// Validated retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all.
    pub max_attempts: u32,
    /// First delay.
    pub backoff: Duration,
    /// Longest delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            backoff: DEFAULT_RETRY_BACKOFF,
            max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `next` (2, 3, …): exponential, capped, with
    /// "equal jitter" — a random point in the upper half, so retries of
    /// many runs failing together spread out but never come early.
    pub fn delay_before(&self, next: u32) -> Duration {
        let exp = self
            .backoff
            .saturating_mul(2u32.saturating_pow(next.saturating_sub(2)))
            .min(self.max_backoff);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The longest total time retries can add to a run (for deadlines).
    pub fn worst_case_delays(&self) -> Duration {
        (2..=self.max_attempts).fold(Duration::ZERO, |acc, n| {
            let exp = self
                .backoff
                .saturating_mul(2u32.saturating_pow(n - 2))
                .min(self.max_backoff);
            acc.saturating_add(exp)
        })
    }
}

/// Validated history bounds (`None`: the service default applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Finished runs to keep.
    pub keep_last: Option<u32>,
    /// Oldest finished run to keep.
    pub max_age: Option<Duration>,
}

/// A validated policy with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// See [`Overlap`].
    pub overlap: Overlap,
    /// Concurrent runs allowed (1 unless `overlap: allow`).
    pub max_concurrency: u32,
    /// See [`PolicySpec::misfire_grace`].
    pub misfire_grace: Duration,
    /// See [`CatchUp`].
    pub catch_up: CatchUp,
    /// See [`PolicySpec::catch_up_window`].
    pub catch_up_window: Duration,
    /// See [`PolicySpec::kill_grace`].
    pub kill_grace: Duration,
    /// See [`RetrySpec`].
    pub retry: RetryPolicy,
    /// See [`PolicySpec::auto_pause_after`].
    pub auto_pause_after: Option<u32>,
    /// See [`PolicySpec::max_runs`].
    pub max_runs: Option<u64>,
    /// See [`HistorySpec`].
    pub history: HistoryPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            overlap: Overlap::default(),
            max_concurrency: 1,
            misfire_grace: DEFAULT_MISFIRE_GRACE,
            catch_up: CatchUp::default(),
            catch_up_window: DEFAULT_CATCH_UP_WINDOW,
            kill_grace: DEFAULT_KILL_GRACE,
            retry: RetryPolicy::default(),
            auto_pause_after: None,
            max_runs: None,
            history: HistoryPolicy::default(),
        }
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Durations<'a> {
    pointer: &'a str,
    errors: FieldErrors,
}

impl Durations<'_> {
    fn get(
        &mut self,
        field: &str,
        value: Option<&str>,
        min: Duration,
        max: Duration,
        default: Duration,
    ) -> Duration {
        value.map_or(default, |text| {
            parse_duration(&format!("{}/{field}", self.pointer), text, min, max).unwrap_or_else(|e| {
                self.errors.push(e.pointer, e.detail);
                default
            })
        })
    }

    fn check(&mut self, ok: bool, field: &str, detail: impl Into<String>) {
        if !ok {
            self.errors.push(format!("{}/{field}", self.pointer), detail);
        }
    }
}

impl PolicySpec {
    /// Validates and applies defaults; errors point below `pointer`.
    pub fn parse(&self, pointer: &str) -> Result<Policy, FieldErrors> {
        let mut d = Durations {
            pointer,
            errors: FieldErrors::default(),
        };
        let defaults = Policy::default();
        let misfire_grace = d.get(
            "misfire_grace",
            self.misfire_grace.as_deref(),
            Duration::ZERO,
            366 * DAY,
            defaults.misfire_grace,
        );
        let catch_up_window = d.get(
            "catch_up_window",
            self.catch_up_window.as_deref(),
            Duration::ZERO,
            366 * DAY,
            defaults.catch_up_window,
        );
        let kill_grace = d.get(
            "kill_grace",
            self.kill_grace.as_deref(),
            Duration::ZERO,
            Duration::from_secs(3600),
            defaults.kill_grace,
        );
        let overlap = self.overlap.unwrap_or_default();
        let max_concurrency = self.max_concurrency.unwrap_or(1);
        d.check(
            (1..=MAX_CONCURRENCY).contains(&max_concurrency),
            "max_concurrency",
            format!("must be between 1 and {MAX_CONCURRENCY}"),
        );
        d.check(
            max_concurrency == 1 || overlap == Overlap::Allow,
            "max_concurrency",
            "only applies with `overlap: allow`",
        );
        let retry = match &self.retry {
            None => RetryPolicy::default(),
            Some(r) => {
                let max_attempts = r.max_attempts.unwrap_or(1);
                d.check(
                    (1..=MAX_ATTEMPTS).contains(&max_attempts),
                    "retry/max_attempts",
                    format!("must be between 1 and {MAX_ATTEMPTS}"),
                );
                let backoff = d.get(
                    "retry/backoff",
                    r.backoff.as_deref(),
                    Duration::from_millis(1),
                    DAY,
                    DEFAULT_RETRY_BACKOFF,
                );
                let max_backoff = d.get(
                    "retry/max_backoff",
                    r.max_backoff.as_deref(),
                    Duration::from_millis(1),
                    DAY,
                    DEFAULT_RETRY_MAX_BACKOFF.max(backoff),
                );
                d.check(
                    max_backoff >= backoff,
                    "retry/max_backoff",
                    "must not be less than `backoff`",
                );
                RetryPolicy {
                    max_attempts,
                    backoff,
                    max_backoff,
                }
            }
        };
        if let Some(n) = self.auto_pause_after {
            d.check(
                (1..=1000).contains(&n),
                "auto_pause_after",
                "must be between 1 and 1000",
            );
        }
        if let Some(n) = self.max_runs {
            d.check(n >= 1, "max_runs", "must be at least 1");
        }
        let history = match &self.history {
            None => HistoryPolicy::default(),
            Some(h) => {
                if let Some(n) = h.keep_last {
                    d.check(n >= 1, "history/keep_last", "must be at least 1");
                }
                let max_age = h.max_age.as_deref().map(|text| {
                    d.get(
                        "history/max_age",
                        Some(text),
                        Duration::from_secs(60),
                        3660 * DAY,
                        Duration::ZERO,
                    )
                });
                HistoryPolicy {
                    keep_last: h.keep_last,
                    max_age,
                }
            }
        };
        d.errors.finish(|| Policy {
            overlap,
            max_concurrency,
            misfire_grace,
            catch_up: self.catch_up.unwrap_or_default(),
            catch_up_window,
            kill_grace,
            retry,
            auto_pause_after: self.auto_pause_after,
            max_runs: self.max_runs,
            history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_are_capped_and_never_early() {
        let r = RetryPolicy {
            max_attempts: 6,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
        };
        for _ in 0..100 {
            let d2 = r.delay_before(2);
            assert!(
                d2 >= Duration::from_millis(500) && d2 <= Duration::from_secs(1),
                "{d2:?}"
            );
            let d3 = r.delay_before(3);
            assert!(
                d3 >= Duration::from_secs(1) && d3 <= Duration::from_secs(2),
                "{d3:?}"
            );
            let d6 = r.delay_before(6);
            assert!(
                d6 >= Duration::from_millis(2500) && d6 <= Duration::from_secs(5),
                "{d6:?}"
            );
        }
        assert_eq!(r.worst_case_delays(), Duration::from_secs(1 + 2 + 4 + 5 + 5));
    }

    #[test]
    fn bad_policies_name_their_fields() {
        let spec: PolicySpec = serde_json::from_value(serde_json::json!({
            "retry": {"max_attempts": 0, "backoff": "10s", "max_backoff": "1s"},
            "auto_pause_after": 0,
            "max_runs": 0,
            "history": {"keep_last": 0, "max_age": "1s"},
        }))
        .unwrap();
        let e = spec.parse("/policy").unwrap_err();
        let pointers: Vec<_> = e.0.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/policy/retry/max_attempts",
                "/policy/retry/max_backoff",
                "/policy/auto_pause_after",
                "/policy/max_runs",
                "/policy/history/keep_last",
                "/policy/history/max_age"
            ]
        );
    }
}
