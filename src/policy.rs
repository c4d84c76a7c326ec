//! How a job behaves when fires collide, arrive late, or were missed.
//!
//! Every field has a documented default (`docs/scheduling.md`), chosen to
//! match what users of Kubernetes CronJob and APScheduler expect.

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
/// Most fires `catch_up: all` replays after downtime, whatever the window.
pub const MAX_CATCH_UP_RUNS: usize = 1000;
/// Largest `max_concurrency`.
pub const MAX_CONCURRENCY: u32 = 1000;

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

/// Policy as clients write it; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Default `skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
    /// Concurrent runs allowed under `overlap: allow`; default 1, at most 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
        }
    }
}

impl PolicySpec {
    /// Validates and applies defaults; errors point below `pointer`.
    pub fn parse(&self, pointer: &str) -> Result<Policy, FieldErrors> {
        let mut errors = FieldErrors::default();
        let defaults = Policy::default();
        let day = Duration::from_secs(24 * 3600);
        let mut duration =
            |field: &str, value: &Option<String>, min: Duration, max: Duration, default: Duration| {
                value.as_deref().map_or(default, |text| {
                    parse_duration(&format!("{pointer}/{field}"), text, min, max).unwrap_or_else(|e| {
                        errors.push(e.pointer, e.detail);
                        default
                    })
                })
            };
        let misfire_grace = duration(
            "misfire_grace",
            &self.misfire_grace,
            Duration::ZERO,
            366 * day,
            defaults.misfire_grace,
        );
        let catch_up_window = duration(
            "catch_up_window",
            &self.catch_up_window,
            Duration::ZERO,
            366 * day,
            defaults.catch_up_window,
        );
        let kill_grace = duration(
            "kill_grace",
            &self.kill_grace,
            Duration::ZERO,
            Duration::from_secs(3600),
            defaults.kill_grace,
        );
        let overlap = self.overlap.unwrap_or_default();
        let max_concurrency = self.max_concurrency.unwrap_or(1);
        if !(1..=MAX_CONCURRENCY).contains(&max_concurrency) {
            errors.push(
                format!("{pointer}/max_concurrency"),
                format!("must be between 1 and {MAX_CONCURRENCY}"),
            );
        } else if max_concurrency > 1 && overlap != Overlap::Allow {
            errors.push(
                format!("{pointer}/max_concurrency"),
                "only applies with `overlap: allow`",
            );
        }
        errors.finish(|| Policy {
            overlap,
            max_concurrency,
            misfire_grace,
            catch_up: self.catch_up.unwrap_or_default(),
            catch_up_window,
            kill_grace,
        })
    }
}
