//! Cron rules in a time zone, computed with croner, with explicit
//! daylight-saving policies (documented in `docs/scheduling.md`):
//!
//! - *spring gap* — a local time that does not exist that day (02:30 when
//!   clocks jump from 02:00 to 03:00): `gap: shift` (default) fires once, at
//!   the first valid instant after the gap (03:00); `gap: skip` does not
//!   fire that day;
//! - *fall fold* — a local time that occurs twice (clocks go back): `fold:
//!   first` (default) fires once, at its first occurrence; `fold: both`
//!   fires at each occurrence. This holds for every expression: with
//!   `first`, `*/15 * * * *` does not repeat 02:00–02:45 in the second pass
//!   of the repeated hour (use an `interval` schedule for elapsed time).
//!
//! croner matches the expression against *wall-clock* (naive local)
//! times; this module maps each matching wall time to the instants it
//! stands for in the zone, under the policies. Matching and mapping are
//! kept apart because croner's own zone handling moves a missing time by a
//! whole hour (wrong for the 30-minute changes of Lord Howe, the 45-minute
//! ones of Chatham) and ends a schedule whose day does not exist (Samoa
//! skipped 2011-12-30). A gap, of whatever size, maps its wall times to the
//! instant it ends; a fold maps its wall times to both passes.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use chrono::offset::LocalResult;
use chrono::{DateTime, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::FieldErrors;

/// The zone a cron expression is read in when none is given.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// Candidates examined per search before giving up (a repeated hour of an
/// every-second expression is 3,600).
const MAX_CANDIDATES: usize = 10_000;

/// How far ahead a search looks for the clocks going back: a later instant
/// can have an earlier wall time only across a backward change, and none
/// in the database is longer than a day.
const LOOKAHEAD: TimeDelta = TimeDelta::hours(26);

/// The span either side of a missing wall time in which the change that
/// made it missing lies (UTC offsets are within −12 h and +14 h).
const GAP_SEARCH: TimeDelta = TimeDelta::hours(15);

/// Parsed expressions, shared: croner keeps a bitfield of every year per
/// parsed expression (about 5 KB), and a million jobs typically use a few
/// thousand distinct expressions. Entries die with their last rule; dead
/// ones are swept when the table has doubled since the last sweep.
struct Interned {
    table: HashMap<String, Weak<Cron>>,
    sweep_at: usize,
}

/// The parsed `expr`, and whether it was parsed just now (not shared).
fn parsed(expr: &str) -> Result<(Arc<Cron>, bool), croner::errors::CronError> {
    static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
    let interned = INTERNED.get_or_init(|| {
        Mutex::new(Interned {
            table: HashMap::new(),
            sweep_at: 1024,
        })
    });
    let mut interned = interned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(cron) = interned.table.get(expr).and_then(Weak::upgrade) {
        return Ok((cron, false));
    }
    let cron = Arc::new(
        CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)?,
    );
    if interned.table.len() >= interned.sweep_at {
        interned.table.retain(|_, cron| cron.strong_count() > 0);
        interned.sweep_at = (interned.table.len() * 2).max(1024);
    }
    interned.table.insert(expr.to_owned(), Arc::downgrade(&cron));
    Ok((cron, true))
}

/// Fall-fold policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fold {
    /// A repeated local time fires once, at its first occurrence.
    #[default]
    First,
    /// A repeated local time fires at both occurrences.
    Both,
}

/// Spring-gap policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Gap {
    /// A missing local time fires once at the first valid instant after it.
    #[default]
    Shift,
    /// A missing local time does not fire.
    Skip,
}

/// A parsed cron expression, its time zone and DST policies.
#[derive(Debug, Clone)]
pub struct CronRule {
    /// Shared by every rule with the same expression (see [`parsed`]).
    cron: Arc<Cron>,
    tz: Tz,
    fold: Fold,
    gap: Gap,
}

impl CronRule {
    /// Parses `expr` (5 or 6 fields) in `timezone` (IANA name, default UTC).
    pub fn parse(
        expr: &str,
        timezone: Option<&str>,
        fold: Fold,
        gap: Gap,
        pointer: &str,
    ) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let (cron, fresh) = match parsed(expr) {
            Ok(found) => (Some(found.0), found.1),
            Err(e) => {
                errors.push(
                    format!("{pointer}/expr"),
                    format!("`{expr}` is not a valid 5- or 6-field cron expression: {e}"),
                );
                (None, false)
            }
        };
        let tz_name = timezone.unwrap_or(DEFAULT_TIMEZONE);
        let tz = match Tz::from_str(tz_name) {
            Ok(tz) => Some(tz),
            Err(_) => {
                errors.push(
                    format!("{pointer}/timezone"),
                    format!("`{tz_name}` is not an IANA time zone name such as `Europe/Berlin`"),
                );
                None
            }
        };
        match (cron, tz) {
            (Some(cron), Some(tz)) if errors.is_empty() => {
                let rule = Self { cron, tz, fold, gap };
                // An expression that can never match (`0 0 30 2 *`) is a
                // mistake, not a schedule: reject it instead of storing a
                // job that silently never fires. (Checked once per distinct
                // expression: a shared one was checked when first parsed.)
                if fresh && rule.croner_next(Utc::now()).is_none() {
                    errors.push(
                        format!("{pointer}/expr"),
                        format!("`{expr}` never matches a date"),
                    );
                    return Err(errors);
                }
                Ok(rule)
            }
            _ => Err(errors),
        }
    }

    fn croner_next(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The first wall time strictly after `after` the expression matches.
    fn next_wall_time(&self, after: NaiveDateTime) -> Option<NaiveDateTime> {
        self.cron
            .find_next_occurrence(&after.and_utc(), false)
            .ok()
            .map(|t| t.naive_utc())
    }

    /// The zone's UTC offset at `t`.
    fn offset_at(&self, t: DateTime<Utc>) -> TimeDelta {
        TimeDelta::seconds(i64::from(
            self.tz
                .offset_from_utc_datetime(&t.naive_utc())
                .fix()
                .local_minus_utc(),
        ))
    }

    /// The instants wall time `wall` fires at, earliest first: one, both
    /// passes of a fold (`fold: both`), or for a missing time the end of the
    /// gap (`gap: shift`) or none (`gap: skip`).
    fn instants(&self, wall: NaiveDateTime) -> [Option<DateTime<Utc>>; 2] {
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => [Some(t.to_utc()), None],
            LocalResult::Ambiguous(early, late) => match self.fold {
                Fold::First => [Some(early.to_utc()), None],
                Fold::Both => [Some(early.to_utc()), Some(late.to_utc())],
            },
            LocalResult::None => match self.gap {
                Gap::Shift => [self.gap_end(wall), None],
                Gap::Skip => [None, None],
            },
        }
    }

    /// The instant the gap holding the missing wall time `wall` ends: the
    /// first instant whose wall time is later than `wall`.
    fn gap_end(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        // Changes happen on whole seconds: search those.
        let later = |secs: i64| {
            DateTime::from_timestamp(secs, 0).is_some_and(|t| t.naive_utc() + self.offset_at(t) > wall)
        };
        let centre = wall.and_utc().timestamp();
        let span = GAP_SEARCH.num_seconds();
        let (mut lo, mut hi) = (centre - span, centre + span);
        if later(lo) || !later(hi) {
            return None;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if later(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        DateTime::from_timestamp(hi, 0)
    }

    /// The first fire strictly after `after`, under the DST policies.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.tz == chrono_tz::UTC {
            return self.croner_next(after);
        }
        // Walk wall times from `after`'s own; if the clocks go back soon,
        // from as much earlier, since a later instant can then show an
        // earlier wall time. Any instant of wall time w is at least
        // `w - latest`: once that passes the best found, nothing later
        // can beat it.
        let (now, soon) = (self.offset_at(after), self.offset_at(after + LOOKAHEAD));
        let back = (now - soon).max(TimeDelta::zero());
        let latest = now.max(soon);
        let mut wall = after.naive_utc() + now - back;
        let mut best: Option<DateTime<Utc>> = None;
        for _ in 0..MAX_CANDIDATES {
            let Some(next) = self.next_wall_time(wall) else {
                return best;
            };
            wall = next;
            for t in self.instants(wall).into_iter().flatten() {
                if t > after && best.is_none_or(|b| t < b) {
                    best = Some(t);
                }
            }
            if best.is_some_and(|b| b <= wall.and_utc() - latest) {
                return best;
            }
        }
        best
    }

    /// The zone the expression is read in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn fires_with(expr: &str, tz: &str, fold: Fold, gap: Gap, from: &str, n: usize) -> Vec<String> {
        let rule = CronRule::parse(expr, Some(tz), fold, gap, "/s").unwrap();
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = rule.next_after(t).unwrap();
                t.with_timezone(&rule.tz).to_rfc3339()
            })
            .collect()
    }

    fn fires(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        fires_with(expr, tz, Fold::First, Gap::Shift, from, n)
    }

    #[test]
    fn seconds_field_and_sub_second_start() {
        let rule = CronRule::parse("* * * * * *", None, Fold::First, Gap::Shift, "/s").unwrap();
        assert_eq!(
            rule.next_after(at("2027-01-01T00:00:00.400Z")),
            Some(at("2027-01-01T00:00:01Z"))
        );
        assert_eq!(
            rule.next_after(at("2027-01-01T00:00:01Z")),
            Some(at("2027-01-01T00:00:02Z"))
        );
    }

    #[test]
    fn berlin_spring_gap_shifts_once_or_skips() {
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2027-03-26T12:00:00Z", 3),
            [
                "2027-03-27T02:30:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-29T02:30:00+02:00"
            ]
        );
        assert_eq!(
            fires_with(
                "30 2 * * *",
                "Europe/Berlin",
                Fold::First,
                Gap::Skip,
                "2027-03-26T12:00:00Z",
                2
            ),
            ["2027-03-27T02:30:00+01:00", "2027-03-29T02:30:00+02:00"]
        );
    }

    #[test]
    fn berlin_fall_fold_fires_once_or_twice() {
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2027-10-29T12:00:00Z", 3),
            [
                "2027-10-30T02:30:00+02:00",
                "2027-10-31T02:30:00+02:00",
                "2027-11-01T02:30:00+01:00"
            ]
        );
        assert_eq!(
            fires_with(
                "30 2 * * *",
                "Europe/Berlin",
                Fold::Both,
                Gap::Shift,
                "2027-10-29T12:00:00Z",
                4
            ),
            [
                "2027-10-30T02:30:00+02:00",
                "2027-10-31T02:30:00+02:00",
                "2027-10-31T02:30:00+01:00",
                "2027-11-01T02:30:00+01:00"
            ]
        );
    }

    #[test]
    fn the_fold_policy_applies_to_wildcard_hours_too() {
        let from = "2027-10-31T00:30:00+02:00";
        assert_eq!(
            fires("0 * * * *", "Europe/Berlin", from, 3),
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T03:00:00+01:00"
            ]
        );
        assert_eq!(
            fires_with("0 * * * *", "Europe/Berlin", Fold::Both, Gap::Shift, from, 4),
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T02:00:00+01:00",
                "2027-10-31T03:00:00+01:00"
            ]
        );
    }

    #[test]
    fn new_york_transitions() {
        // 2027-03-14: 02:00 EST → 03:00 EDT; 2027-11-07: 02:00 EDT → 01:00 EST.
        assert_eq!(
            fires("30 2 * * *", "America/New_York", "2027-03-12T12:00:00Z", 3),
            [
                "2027-03-13T02:30:00-05:00",
                "2027-03-14T03:00:00-04:00",
                "2027-03-15T02:30:00-04:00"
            ]
        );
        assert_eq!(
            fires_with(
                "30 1 * * *",
                "America/New_York",
                Fold::Both,
                Gap::Shift,
                "2027-11-06T12:00:00Z",
                3
            ),
            [
                "2027-11-07T01:30:00-04:00",
                "2027-11-07T01:30:00-05:00",
                "2027-11-08T01:30:00-05:00"
            ]
        );
        assert_eq!(
            fires("30 1 * * *", "America/New_York", "2027-11-06T12:00:00Z", 2),
            ["2027-11-07T01:30:00-04:00", "2027-11-08T01:30:00-05:00"]
        );
    }

    /// Around every 2027 transition of every zone: fires strictly increase,
    /// are never before the search point, and each local time fires once
    /// under `first` (at most twice under `both`).
    #[test]
    fn property_over_every_zone_with_transitions() {
        use std::collections::HashMap;
        let year_start = at("2027-01-01T00:00:00Z");
        let mut checked = 0;
        for tz in chrono_tz::TZ_VARIANTS {
            // Days of 2027 on which the zone's UTC offset changes.
            let offset = |t: DateTime<Utc>| t.with_timezone(&tz).naive_local() - t.naive_utc();
            let transitions: Vec<DateTime<Utc>> = (0..365)
                .map(|d| year_start + TimeDelta::days(d))
                .filter(|t| offset(*t) != offset(*t + TimeDelta::days(1)))
                .collect();
            for day in transitions.iter().take(2) {
                for expr in ["30 2 * * *", "30 1 * * *", "0 * * * *", "*/20 * * * *"] {
                    for fold in [Fold::First, Fold::Both] {
                        let rule = CronRule::parse(expr, Some(tz.name()), fold, Gap::Shift, "/s").unwrap();
                        let mut t = *day - TimeDelta::hours(12);
                        let end = *day + TimeDelta::hours(60);
                        let mut seen: HashMap<chrono::NaiveDateTime, u32> = HashMap::new();
                        while t < end {
                            let next = rule.next_after(t).unwrap();
                            assert!(next > t, "{} {expr}: {next} after {t}", tz.name());
                            let local = next.with_timezone(&tz).naive_local();
                            let n = seen.entry(local).or_default();
                            *n += 1;
                            let allowed = if fold == Fold::Both { 2 } else { 1 };
                            assert!(
                                *n <= allowed,
                                "{} {expr} {fold:?}: {local} fired {n} times",
                                tz.name()
                            );
                            t = next;
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 500, "only {checked} cases");
    }

    #[test]
    fn rejects_bad_expressions_and_zones() {
        let parse = |e: &str, tz: Option<&str>| CronRule::parse(e, tz, Fold::First, Gap::Shift, "/s");
        assert!(parse("61 * * * *", None).is_err());
        assert!(parse("* * * * * * * *", None).is_err());
        assert!(parse("* * * * *", Some("Nowhere/City")).is_err());
        let e = parse("0 0 30 2 *", None).unwrap_err();
        assert!(e.0[0].detail.contains("never"), "{e}");
    }
}
