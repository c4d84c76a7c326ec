//! Which fires are due, and what becomes of the late ones.
//!
//! Pure: given a job, the first nominal fire not yet handled and the current
//! instant, it lists every due fire and decides — by misfire grace and the
//! catch-up policy — which run and which are recorded as missed. The same
//! rules serve the engine's normal path (usually exactly one fire, on time),
//! a process that was stalled, and a start after downtime.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::job::Timing;
use crate::policy::{CatchUp, MAX_CATCH_UP_RUNS};
use crate::run::{Reason, Trigger};
use crate::supervisor::Missed;

/// Most fire times enumerated for one job in one plan; past it, the scan
/// jumps to the part of the range that can still run and the missed count
/// becomes a lower bound. Bounds the work of a restart after long downtime.
pub const MAX_SCAN: u32 = 10_000;

/// One planned fire (the engine pairs it with the job for the supervisor).
#[derive(Debug, Clone, Copy)]
pub struct Due {
    /// Nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// When it should start (nominal plus jitter).
    pub due_at: DateTime<Utc>,
    /// Why it runs.
    pub trigger: Trigger,
    /// For a row summarising missed fires.
    pub missed: Option<Missed>,
}

/// The result of planning one job.
#[derive(Debug)]
pub struct Plan {
    /// Fires for the supervisor, in order.
    pub fires: Vec<Due>,
    /// The first nominal fire not yet due, if any.
    pub next: Option<DateTime<Utc>>,
}

/// The due instant of a nominal fire (nominal plus the job's jitter).
pub fn due_at(job: &Timing, nominal: DateTime<Utc>) -> DateTime<Utc> {
    let jitter = job.schedule.jitter_for(job.id.0, nominal);
    nominal + TimeDelta::from_std(jitter).unwrap_or_default()
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> Duration {
    (now - t).to_std().unwrap_or_default()
}

/// Plans the fires of `job` from `first` (a nominal fire not yet handled)
/// up to `now`. `reason` labels fires missed for being late: `Downtime` at
/// startup, `Misfire` when the engine itself fell behind.
pub fn plan(job: &Timing, first: DateTime<Utc>, now: DateTime<Utc>, reason: Reason) -> Plan {
    let policy = job;
    let schedule = &job.schedule;
    let mut on_time = Vec::new();
    // Late fires: the first, the count, and the most recent ones (one more
    // than can ever be replayed, so the fire before the replayed suffix is
    // always at hand as the end of the missed range).
    let mut late_first = None;
    let mut late_count: u32 = 0;
    let mut recent: VecDeque<DateTime<Utc>> = VecDeque::new();
    let mut lower_bound = false;
    let mut scanned = 0;
    let mut cursor = Some(first);
    while let Some(t) = cursor {
        let due = due_at(job, t);
        if due > now {
            break;
        }
        if age(now, due) <= policy.misfire_grace {
            on_time.push(t);
        } else {
            late_first.get_or_insert(t);
            late_count += 1;
            recent.push_back(t);
            if recent.len() > MAX_CATCH_UP_RUNS + 1 {
                recent.pop_front();
            }
        }
        scanned += 1;
        cursor = if scanned == MAX_SCAN {
            // Skip to where fires can still run (grace or catch-up window).
            lower_bound = true;
            let keep = policy.misfire_grace.max(policy.catch_up_window);
            let from = now - TimeDelta::from_std(keep).unwrap_or(TimeDelta::MAX);
            schedule.next_after(from.max(t))
        } else {
            schedule.next_after(t)
        };
    }

    // `latest` coalesces: of the fires due together (after downtime, a
    // step of the clock, or the engine falling behind) only the newest
    // runs, as APScheduler's `coalesce` and Kubernetes do; the older ones,
    // within the grace or not, join the missed range.
    if policy.catch_up == CatchUp::Latest && on_time.len() > 1 {
        let newest = on_time.pop();
        for t in on_time.drain(..) {
            late_first.get_or_insert(t);
            late_count += 1;
            recent.push_back(t);
            if recent.len() > MAX_CATCH_UP_RUNS + 1 {
                recent.pop_front();
            }
        }
        on_time.extend(newest);
    }

    // How many of the most recent late fires run, by policy; the others are
    // summarised in one missed row.
    let replay = match policy.catch_up {
        CatchUp::None => 0,
        CatchUp::Latest => usize::from(on_time.is_empty() && late_count > 0),
        CatchUp::All => recent
            .iter()
            .rev()
            .take(MAX_CATCH_UP_RUNS)
            .take_while(|t| age(now, due_at(job, **t)) <= policy.catch_up_window)
            .count(),
    };
    let mut fires = Vec::with_capacity(on_time.len() + replay + 1);
    let missed_count = late_count - replay as u32;
    if let Some(from) = late_first.filter(|_| missed_count > 0) {
        let until = recent[recent.len() - replay - 1];
        if lower_bound {
            tracing::warn!(job = %job.id, fires = missed_count, "missed fires exceed the scan limit; the count is a lower bound");
        }
        fires.push(fire(
            job,
            from,
            Trigger::Schedule,
            Some(Missed {
                reason,
                until,
                fires: missed_count,
            }),
        ));
    }
    for t in recent.iter().skip(recent.len() - replay) {
        fires.push(fire(job, *t, Trigger::CatchUp, None));
    }
    for t in on_time {
        fires.push(fire(job, t, Trigger::Schedule, None));
    }
    Plan { fires, next: cursor }
}

fn fire(job: &Timing, t: DateTime<Utc>, trigger: Trigger, missed: Option<Missed>) -> Due {
    Due {
        scheduled_at: t,
        due_at: due_at(job, t),
        trigger,
        missed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::ActionPolicy;
    use crate::job::{Job, JobId, JobSpec, Source};

    fn job(policy: serde_json::Value) -> Timing {
        job_with("* * * * *", policy)
    }

    fn job_with(expr: &str, policy: serde_json::Value) -> Timing {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "j",
            "schedule": {"kind": "cron", "expr": expr},
            "action": {"kind": "http", "url": "http://127.0.0.1:1/"},
            "policy": policy,
        }))
        .unwrap();
        let t = at("2027-01-01T00:00:00Z");
        Timing::of(&Job {
            id: JobId::new(),
            def: spec.validate(&ActionPolicy::default()).unwrap(),
            paused: false,
            pause_note: None,
            source: Source::Api,
            version: 1,
            created_at: t,
            updated_at: t,
            cursor_at: t,
            runs_started: 0,
        })
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn describe(p: &Plan) -> Vec<String> {
        p.fires
            .iter()
            .map(|f| match f.missed {
                Some(m) => format!(
                    "missed {}..{} x{}",
                    f.scheduled_at.format("%H:%M"),
                    m.until.format("%H:%M"),
                    m.fires
                ),
                None => format!("{} {}", f.trigger, f.scheduled_at.format("%H:%M")),
            })
            .collect()
    }

    /// Down from 00:00:30 to 00:10:30 under an every-minute job: fires
    /// 00:01 .. 00:10 are due, 00:10 is within the 60 s grace.
    #[test]
    fn ten_minutes_down_under_each_catch_up_policy() {
        let now = at("2027-01-01T00:10:30Z");
        let first = at("2027-01-01T00:01:00Z");
        let p = plan(
            &job(serde_json::json!({"catch_up": "none"})),
            first,
            now,
            Reason::Downtime,
        );
        assert_eq!(describe(&p), ["missed 00:01..00:09 x9", "schedule 00:10"]);
        assert_eq!(p.next, Some(at("2027-01-01T00:11:00Z")));

        let p = plan(
            &job(serde_json::json!({"catch_up": "latest"})),
            first,
            now,
            Reason::Downtime,
        );
        assert_eq!(describe(&p), ["missed 00:01..00:09 x9", "schedule 00:10"]);

        let p = plan(
            &job(serde_json::json!({"catch_up": "latest", "misfire_grace": "10s"})),
            first,
            now,
            Reason::Downtime,
        );
        assert_eq!(describe(&p), ["missed 00:01..00:09 x9", "catch_up 00:10"]);

        let p = plan(
            &job(serde_json::json!({"catch_up": "all", "misfire_grace": "10s", "catch_up_window": "5m"})),
            first,
            now,
            Reason::Downtime,
        );
        assert_eq!(
            describe(&p),
            [
                "missed 00:01..00:05 x5",
                "catch_up 00:06",
                "catch_up 00:07",
                "catch_up 00:08",
                "catch_up 00:09",
                "catch_up 00:10"
            ]
        );

        let p = plan(
            &job(serde_json::json!({"catch_up": "none", "misfire_grace": "0s"})),
            first,
            now,
            Reason::Downtime,
        );
        assert_eq!(describe(&p), ["missed 00:01..00:10 x10"]);
    }

    /// An every-second job an hour behind (a forward step of the clock, or
    /// downtime): 60 fires are within the 60 s grace.
    #[test]
    fn latest_runs_only_the_newest_of_the_fires_due_together() {
        let every_second = |policy| job_with("* * * * * *", policy);
        let first = at("2027-01-01T00:00:01Z");
        let now = at("2027-01-01T01:00:00.5Z");
        let p = plan(&every_second(serde_json::json!({})), first, now, Reason::Misfire);
        assert_eq!(p.fires.len(), 2, "{:?}", describe(&p));
        let missed = p.fires[0].missed.unwrap();
        assert_eq!(
            (p.fires[0].scheduled_at, missed.until, missed.fires),
            (first, at("2027-01-01T00:59:59Z"), 3599)
        );
        assert_eq!(p.fires[1].scheduled_at, at("2027-01-01T01:00:00Z"));
        assert_eq!(p.fires[1].trigger, Trigger::Schedule);

        // `none` runs every fire within the grace, `all` every one within
        // its window.
        let p = plan(
            &every_second(serde_json::json!({"catch_up": "none"})),
            first,
            now,
            Reason::Misfire,
        );
        assert_eq!(p.fires.len(), 1 + 60);
        let p = plan(
            &every_second(serde_json::json!({"catch_up": "all", "catch_up_window": "10s"})),
            first,
            now,
            Reason::Misfire,
        );
        assert_eq!(p.fires.len(), 1 + 60);
    }

    #[test]
    fn the_normal_path_is_one_fire_on_time() {
        let j = job(serde_json::json!({}));
        let p = plan(
            &j,
            at("2027-01-01T00:01:00Z"),
            at("2027-01-01T00:01:00.002Z"),
            Reason::Misfire,
        );
        assert_eq!(describe(&p), ["schedule 00:01"]);
        let p = plan(
            &j,
            at("2027-01-01T00:02:00Z"),
            at("2027-01-01T00:01:00.002Z"),
            Reason::Misfire,
        );
        assert!(p.fires.is_empty());
        assert_eq!(p.next, Some(at("2027-01-01T00:02:00Z")));
    }

    #[test]
    fn a_long_outage_is_bounded_and_summarised() {
        let j = job(serde_json::json!({"catch_up": "latest", "misfire_grace": "0s"}));
        let now = at("2027-03-01T00:00:30Z");
        let p = plan(&j, at("2027-01-01T00:01:00Z"), now, Reason::Downtime);
        assert_eq!(p.fires.len(), 2, "{:?}", describe(&p));
        assert_eq!(p.fires[1].trigger, Trigger::CatchUp);
        assert_eq!(p.fires[1].scheduled_at, at("2027-03-01T00:00:00Z"));
        assert!(p.fires[0].missed.unwrap().fires >= MAX_SCAN);
    }
}
