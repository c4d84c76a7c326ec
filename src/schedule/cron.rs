//! Cron rules in a time zone, computed with croner.
//!
//! Daylight-saving rules (documented in `docs/scheduling.md`):
//! - *spring gap*: a wall time that does not exist that day (02:30 when
//!   clocks jump from 02:00 to 03:00) fires once, at the first valid instant
//!   after the gap (03:00 local);
//! - *fall fold*: a wall time that occurs twice fires once, at its first
//!   occurrence, for fixed-time expressions (`30 2 * * *`); expressions with
//!   a wildcard or stepped hour keep firing through both halves of the
//!   repeated hour, since they describe elapsed time (`*/15 * * * *` fires
//!   every 15 minutes of real time).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::validation::FieldErrors;

/// The zone a cron expression is read in when none is given.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// A parsed cron expression and its time zone.
#[derive(Debug, Clone)]
pub struct CronRule {
    cron: Cron,
    tz: Tz,
}

impl CronRule {
    /// Parses `expr` (5 or 6 fields) in `timezone` (IANA name, default UTC).
    pub fn parse(expr: &str, timezone: Option<&str>, pointer: &str) -> Result<Self, FieldErrors> {
        let mut errors = FieldErrors::default();
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = match parser.parse(expr) {
            Ok(cron) => Some(cron),
            Err(e) => {
                errors.push(
                    format!("{pointer}/expr"),
                    format!("`{expr}` is not a valid 5- or 6-field cron expression: {e}"),
                );
                None
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
                let rule = Self { cron, tz };
                // An expression that can never match (`0 0 30 2 *`) is a
                // mistake, not a schedule: reject it instead of storing a
                // job that silently never fires.
                if rule.next_after(Utc::now()).is_none() {
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

    /// The first matching instant strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
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

    fn fires(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        let rule = CronRule::parse(expr, Some(tz), "/s").unwrap();
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = rule.next_after(t).unwrap();
                t.with_timezone(&rule.tz).to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn seconds_field_and_sub_second_start() {
        let rule = CronRule::parse("* * * * * *", None, "/s").unwrap();
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
    fn berlin_spring_gap_fires_once_after_the_gap() {
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2027-03-26T12:00:00Z", 3),
            [
                "2027-03-27T02:30:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-29T02:30:00+02:00"
            ]
        );
    }

    #[test]
    fn berlin_fall_fold_fires_once() {
        assert_eq!(
            fires("30 2 * * *", "Europe/Berlin", "2027-10-29T12:00:00Z", 3),
            [
                "2027-10-30T02:30:00+02:00",
                "2027-10-31T02:30:00+02:00",
                "2027-11-01T02:30:00+01:00"
            ]
        );
    }

    #[test]
    fn wildcard_hours_run_through_both_halves_of_the_fold() {
        let got = fires("0 * * * *", "Europe/Berlin", "2027-10-31T00:30:00+02:00", 4);
        assert_eq!(
            got,
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T02:00:00+01:00",
                "2027-10-31T03:00:00+01:00"
            ]
        );
    }

    #[test]
    fn rejects_bad_expressions_and_zones() {
        assert!(CronRule::parse("61 * * * *", None, "/s").is_err());
        assert!(CronRule::parse("* * * * * * * *", None, "/s").is_err());
        assert!(CronRule::parse("* * * * *", Some("Nowhere/City"), "/s").is_err());
        let e = CronRule::parse("0 0 30 2 *", None, "/s").unwrap_err();
        assert!(e.0[0].detail.contains("never"), "{e}");
    }
}
