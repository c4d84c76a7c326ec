//! When a job fires: cron, interval and once schedules, with bounds and jitter.
//!
//! Pure computation, no I/O. A [`ScheduleSpec`] is what a client sends; a
//! [`Schedule`] is the parsed, validated rule the engine asks for the next
//! fire strictly after an instant. DST rules live with the cron rule (see
//! `cron.rs` and `docs/scheduling.md`).

mod cron;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::validation::{FieldErrors, parse_duration};

pub use self::cron::{CronRule, DEFAULT_TIMEZONE, Fold, Gap};

/// Shortest interval accepted: anything faster is a busy loop, not a schedule.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval accepted (about ten years).
pub const MAX_INTERVAL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Largest jitter accepted.
pub const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);

/// A schedule as clients write it; `kind` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ScheduleSpec {
    /// A cron expression in a time zone.
    Cron(CronSpec),
    /// A fixed period, aligned to `start` (or the Unix epoch).
    Interval(IntervalSpec),
    /// A single fire at an instant.
    Once(OnceSpec),
}

/// `kind: cron`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CronSpec {
    /// 5 fields (minute granularity) or 6 fields (leading seconds field).
    /// `L`, `W`, `#`, names (`MON`, `JAN`) and `@daily`-style aliases work;
    /// day-of-week follows POSIX (0 and 7 are Sunday).
    #[schema(example = "*/15 * * * *")]
    pub expr: String,
    /// IANA time zone the expression is read in; default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "Europe/Berlin")]
    pub timezone: Option<String>,
    /// No fire before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<DateTime<Utc>>,
    /// No fire after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<DateTime<Utc>>,
    /// Random delay added to each fire, up to this bound (`30s`); the same
    /// job and scheduled instant always get the same delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// A local time that occurs twice (clocks go back): `first` (default)
    /// fires once, at its first occurrence; `both` fires at each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fold: Option<Fold>,
    /// A local time that does not exist (clocks go forward): `shift`
    /// (default) fires once at the first valid instant after the gap;
    /// `skip` does not fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<Gap>,
}

/// `kind: interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntervalSpec {
    /// Period such as `10s`, `5m`, `1h 30m`, `250ms` (at least 100ms).
    #[schema(example = "30s")]
    pub every: String,
    /// Fires at `start + k * every`; without it at multiples of `every`
    /// since the Unix epoch, so `every: 1h` fires on the hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<DateTime<Utc>>,
    /// No fire after this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<DateTime<Utc>>,
    /// Random delay added to each fire, up to this bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
}

/// `kind: once`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnceSpec {
    /// The instant to fire at (RFC 3339).
    pub at: DateTime<Utc>,
}

/// A validated schedule, ready to compute fire times.
#[derive(Debug, Clone)]
pub struct Schedule {
    rule: Rule,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    jitter: Duration,
}

#[derive(Debug, Clone)]
enum Rule {
    Cron(Box<CronRule>),
    Interval { every_ms: i64, anchor_ms: i64 },
    Once(DateTime<Utc>),
}

impl Schedule {
    /// Validates `spec`; errors point below `pointer` (e.g. `/schedule`).
    pub fn parse(spec: &ScheduleSpec, pointer: &str) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let (rule, start, end, jitter) = match spec {
            ScheduleSpec::Cron(c) => {
                let rule = errors.take(CronRule::parse(
                    &c.expr,
                    c.timezone.as_deref(),
                    c.fold.unwrap_or_default(),
                    c.gap.unwrap_or_default(),
                    pointer,
                ));
                (
                    rule.map(|r| Rule::Cron(Box::new(r))),
                    c.start,
                    c.end,
                    c.jitter.as_deref(),
                )
            }
            ScheduleSpec::Interval(i) => {
                let every = parse_duration(&format!("{pointer}/every"), &i.every, MIN_INTERVAL, MAX_INTERVAL)
                    .map_err(|e| errors.push(e.pointer, e.detail))
                    .ok();
                let rule = every.map(|every| Rule::Interval {
                    every_ms: every.as_millis().max(1) as i64,
                    anchor_ms: i.start.map_or(0, |s| s.timestamp_millis()),
                });
                (rule, i.start, i.end, i.jitter.as_deref())
            }
            ScheduleSpec::Once(o) => (Some(Rule::Once(o.at)), None, None, None),
        };
        // Instants are kept to the millisecond, the precision runs and
        // cursors are stored with, so a stored cursor compares exactly.
        let (rule, start, end) = (
            rule.map(|r| match r {
                Rule::Once(at) => Rule::Once(to_millis(at)),
                r => r,
            }),
            start.map(to_millis),
            end.map(to_millis),
        );
        if let (Some(s), Some(e)) = (start, end)
            && e <= s
        {
            errors.push(format!("{pointer}/end"), "must be after `start`");
        }
        let jitter = match jitter {
            None => Duration::ZERO,
            Some(text) => parse_duration(&format!("{pointer}/jitter"), text, Duration::ZERO, MAX_JITTER)
                .unwrap_or_else(|e| {
                    errors.push(e.pointer, e.detail);
                    Duration::ZERO
                }),
        };
        let schedule = match rule {
            Some(rule) if errors.is_empty() => Self {
                rule,
                start,
                end,
                jitter,
            },
            _ => return Err(errors),
        };
        Ok(schedule)
    }

    /// The first nominal fire strictly after `after`, within the bounds;
    /// `None` when the schedule has no more fires.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Searching from just before `start` makes `start` itself eligible.
        let from = match self.start {
            Some(start) if after < start => start - TimeDelta::milliseconds(1),
            _ => after,
        };
        let next = match &self.rule {
            Rule::Cron(rule) => rule.next_after(from)?,
            Rule::Interval { every_ms, anchor_ms } => {
                let from_ms = from.timestamp_millis();
                let k = if from_ms < *anchor_ms {
                    0
                } else {
                    (from_ms - anchor_ms).div_euclid(*every_ms) + 1
                };
                DateTime::from_timestamp_millis(anchor_ms.checked_add(k.checked_mul(*every_ms)?)?)?
            }
            Rule::Once(at) => Some(*at).filter(|at| *at > from)?,
        };
        match self.end {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// Up to `count` nominal fires strictly after `after`, in order.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count.min(1024));
        let mut cursor = after;
        while out.len() < count {
            match self.next_after(cursor) {
                Some(next) => {
                    out.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        out
    }

    /// The delay added to the fire of `job` scheduled at `at`.
    ///
    /// Deterministic (a hash of job and instant) so a restart or a replica
    /// computes the same fire instant, and spread evenly over the bound.
    pub fn jitter_for(&self, job: Uuid, at: DateTime<Utc>) -> Duration {
        let bound = self.jitter.as_millis() as u64;
        if bound == 0 {
            return Duration::ZERO;
        }
        let (hi, lo) = job.as_u64_pair();
        let h = splitmix64(hi ^ splitmix64(lo ^ at.timestamp_millis() as u64));
        Duration::from_millis(h % (bound + 1))
    }

    /// The time zone local times are shown in (UTC unless a cron zone).
    pub fn timezone(&self) -> chrono_tz::Tz {
        match &self.rule {
            Rule::Cron(rule) => rule.timezone(),
            _ => chrono_tz::UTC,
        }
    }
}

/// `t` truncated to whole milliseconds.
fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// A well-mixed 64-bit hash step (Steele, Lea, Flood: SplitMix64).
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn parse(json: &str) -> Result<Schedule, FieldErrors> {
        let spec: ScheduleSpec = serde_json::from_str(json).unwrap();
        Schedule::parse(&spec, "/schedule")
    }

    #[test]
    fn interval_is_aligned_to_the_epoch_or_start() {
        let s = parse(r#"{"kind":"interval","every":"1h"}"#).unwrap();
        assert_eq!(
            s.next_after(at("2027-01-01T10:17:00Z")),
            Some(at("2027-01-01T11:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2027-01-01T11:00:00Z")),
            Some(at("2027-01-01T12:00:00Z")),
            "strictly after"
        );
        let s = parse(
            r#"{"kind":"interval","every":"10m","start":"2027-01-01T10:03:00Z","end":"2027-01-01T10:30:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            s.upcoming(at("2026-01-01T00:00:00Z"), 10),
            vec![
                at("2027-01-01T10:03:00Z"),
                at("2027-01-01T10:13:00Z"),
                at("2027-01-01T10:23:00Z")
            ]
        );
    }

    #[test]
    fn once_fires_once() {
        let s = parse(r#"{"kind":"once","at":"2027-05-01T08:00:00+02:00"}"#).unwrap();
        assert_eq!(
            s.upcoming(at("2027-01-01T00:00:00Z"), 5),
            vec![at("2027-05-01T06:00:00Z")]
        );
        assert_eq!(s.next_after(at("2027-05-01T06:00:00Z")), None);
    }

    #[test]
    fn bad_specs_name_every_field() {
        let e = parse(r#"{"kind":"interval","every":"-5s","jitter":"x"}"#).unwrap_err();
        let pointers: Vec<_> = e.0.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/schedule/every", "/schedule/jitter"]);
        let e = parse(
            r#"{"kind":"cron","expr":"* * *","timezone":"Mars/Olympus","start":"2027-01-02T00:00:00Z","end":"2027-01-01T00:00:00Z"}"#,
        )
        .unwrap_err();
        let pointers: Vec<_> = e.0.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            ["/schedule/expr", "/schedule/timezone", "/schedule/end"]
        );
        assert!(parse(r#"{"kind":"interval","every":"10ms"}"#).is_err());
    }

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let s = parse(r#"{"kind":"interval","every":"1m","jitter":"10s"}"#).unwrap();
        let job = Uuid::now_v7();
        let t = at("2027-01-01T00:00:00Z");
        assert_eq!(s.jitter_for(job, t), s.jitter_for(job, t));
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|i| s.jitter_for(job, t + TimeDelta::minutes(i)))
            .collect();
        assert!(spread.iter().all(|d| *d <= Duration::from_secs(10)));
        assert!(spread.len() > 100, "jitter should spread: {}", spread.len());
    }
}

/// Fuzzing the parsers with arbitrary input: no panic, and whatever parses
/// behaves (next fires strictly increase).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::schedule::cron::{Fold, Gap};

    /// Characters cron expressions are made of, plus some that are not.
    fn cron_text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[0-9*/,#LW?A-Z@ -]{0,40}").unwrap_or_else(|_| unreachable!())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn cron_parsing_never_panics_and_fires_increase(
            expr in cron_text(),
            tz in prop::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata", "Nope/Zone"]),
            start in 1_600_000_000i64..2_200_000_000i64,
            fold in prop::sample::select(vec![Fold::First, Fold::Both]),
            gap in prop::sample::select(vec![Gap::Shift, Gap::Skip]),
        ) {
            if let Ok(rule) = CronRule::parse(&expr, Some(tz), fold, gap, "/s") {
                let mut t = DateTime::from_timestamp(start, 0).unwrap_or_else(|| unreachable!());
                for _ in 0..5 {
                    match rule.next_after(t) {
                        Some(next) => {
                            prop_assert!(next > t, "{expr} in {tz}: {next} after {t}");
                            t = next;
                        }
                        None => break,
                    }
                }
            }
        }

        #[test]
        fn arbitrary_schedule_json_never_panics(json in "\\PC{0,120}") {
            if let Ok(spec) = serde_json::from_str::<ScheduleSpec>(&json)
                && let Ok(s) = Schedule::parse(&spec, "/schedule")
            {
                let _ = s.upcoming(Utc::now(), 3);
            }
        }
    }
}
