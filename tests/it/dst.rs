//! Daylight saving against an independent ground truth: Python's
//! `zoneinfo` (tests/dst/ground_truth.py) computes the fires the policies
//! call for around every UTC-offset change of every zone, 2011–2030 —
//! whole-hour changes, Lord Howe's 30 minutes, Chatham's 45, Samoa's
//! skipped day — for fixed times, wildcard hours, minute steps and weekly
//! expressions under each fold and gap policy; cronguard's schedules must
//! fire exactly there. A preview through the API checks the same path end
//! to end.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use chrono::{DateTime, Offset, TimeZone, Utc};
use cronguard::schedule::{CronRule, Fold, Gap};
use serde::Deserialize;
use serde_json::json;

use crate::helpers::*;

#[derive(Deserialize)]
struct Truth {
    tzdb: Option<String>,
    transitions: Vec<Transition>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Transition {
    zone: String,
    #[serde(default)]
    missing: bool,
    #[serde(default)]
    at: i64,
    #[serde(default)]
    before: i32,
    #[serde(default)]
    after: i32,
}

#[derive(Deserialize)]
struct Case {
    zone: String,
    expr: String,
    fold: String,
    gap: String,
    from: i64,
    until: i64,
    fires: Vec<i64>,
}

fn ground_truth() -> Truth {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dst/ground_truth.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the ground truth (install python3)");
    let names: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(names.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "ground_truth.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

fn offset(zone: chrono_tz::Tz, t: DateTime<Utc>) -> i32 {
    zone.offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc()
}

fn fires(case: &Case) -> Result<Vec<i64>, String> {
    let fold = if case.fold == "both" {
        Fold::Both
    } else {
        Fold::First
    };
    let gap = if case.gap == "skip" { Gap::Skip } else { Gap::Shift };
    let rule =
        CronRule::parse(&case.expr, Some(&case.zone), fold, gap, "/schedule").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut t = at(case.from);
    loop {
        let Some(next) = rule.next_after(t) else {
            return Err(format!("the schedule ended after {t}"));
        };
        if next <= t {
            return Err(format!("{next} does not follow {t}"));
        }
        if next > at(case.until) {
            return Ok(out);
        }
        out.push(next.timestamp());
        t = next;
    }
}

fn shown(zone: &str, secs: &[i64]) -> Vec<String> {
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    secs.iter()
        .map(|s| at(*s).with_timezone(&tz).to_rfc3339())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_zones_changes_2011_2030_fire_as_zoneinfo_says() {
    let truth = tokio::task::spawn_blocking(ground_truth).await.unwrap();
    let same_data = truth.tzdb.as_deref() == Some(chrono_tz::IANA_TZDB_VERSION);

    // The zone data: every change Python sees, chrono-tz sees the same.
    let mut disagree = BTreeSet::new();
    let mut zones = BTreeSet::new();
    for t in &truth.transitions {
        zones.insert(t.zone.as_str());
        let zone: chrono_tz::Tz = t.zone.parse().unwrap();
        if t.missing || offset(zone, at(t.at - 1)) != t.before || offset(zone, at(t.at)) != t.after {
            disagree.insert(t.zone.as_str());
        }
    }
    if same_data {
        assert!(
            disagree.is_empty(),
            "tzdb {}: zones disagree: {disagree:?}",
            chrono_tz::IANA_TZDB_VERSION
        );
    } else {
        // Another database release on this machine: compare the policies
        // where the data agrees (most zones do not change between releases).
        eprintln!(
            "zoneinfo has tzdb {:?}, chrono-tz {}: {} zones differ and are left out",
            truth.tzdb,
            chrono_tz::IANA_TZDB_VERSION,
            disagree.len()
        );
        assert!(disagree.len() * 10 < zones.len(), "{disagree:?}");
    }
    for zone in [
        "Australia/Lord_Howe",
        "Pacific/Chatham",
        "Pacific/Apia",
        "Europe/Berlin",
    ] {
        assert!(zones.contains(zone) && !disagree.contains(zone), "{zone}");
    }

    let cases: Vec<&Case> = truth
        .cases
        .iter()
        .filter(|c| !disagree.contains(c.zone.as_str()))
        .collect();
    assert!(cases.len() > 40_000, "only {} cases", cases.len());
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = cases
            .chunks(cases.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|case| match fires(case) {
                            Ok(got) if got == case.fires => None,
                            Ok(got) => Some(format!(
                                "{} `{}` fold {} gap {}: expected {:?}, got {:?}",
                                case.zone,
                                case.expr,
                                case.fold,
                                case.gap,
                                shown(&case.zone, &case.fires),
                                shown(&case.zone, &got)
                            )),
                            Err(e) => Some(format!("{} `{}`: {e}", case.zone, case.expr)),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from zoneinfo, e.g.:\n{}",
        failures.len(),
        cases.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// The cases the acceptance run found, through the API's preview.
#[tokio::test]
async fn previews_through_non_whole_hour_gaps_and_a_skipped_day() {
    let app = TestApp::spawn().await;
    let preview = async |expr: &str, zone: &str, from: &str, count: u32| {
        let schedule = json!({"kind": "cron", "expr": expr, "timezone": zone});
        app.preview(schedule, from, count).await
    };
    // Lord Howe moves 30 minutes: 02:00 does not exist on 2027-10-03 and
    // fires at 02:30, when the gap ends.
    assert_eq!(
        preview("0 * * * *", "Australia/Lord_Howe", "2027-10-02T14:00:00Z", 3).await,
        [
            "2027-10-03T01:00:00+10:30",
            "2027-10-03T02:30:00+11:00",
            "2027-10-03T03:00:00+11:00"
        ]
    );
    // Chatham moves at 02:45 to 03:45: 03:00 and 03:30 fire once, at 03:45.
    assert_eq!(
        preview("*/30 * * * *", "Pacific/Chatham", "2027-09-25T13:15:00Z", 3).await,
        [
            "2027-09-26T02:30:00+12:45",
            "2027-09-26T03:45:00+13:45",
            "2027-09-26T04:00:00+13:45"
        ]
    );
    // Samoa skipped 2011-12-30: the schedule goes on.
    assert_eq!(
        preview("30 2 * * *", "Pacific/Apia", "2011-12-29T00:00:00Z", 3).await,
        [
            "2011-12-29T02:30:00-10:00",
            "2011-12-31T00:00:00+14:00",
            "2011-12-31T02:30:00+14:00"
        ]
    );
    let skipped = BTreeMap::from([("0 0 * * *", 3), ("30 1 * * *", 3)]);
    for (expr, n) in skipped {
        let fires = preview(expr, "Pacific/Apia", "2011-12-28T12:00:00Z", n).await;
        assert_eq!(fires.len(), n as usize, "{expr}: {fires:?}");
    }
    app.stop().await;
}
