//! Scheduling policies, on a manual clock: overlap, catch-up after
//! downtime, retries, auto-pause, max runs, retention.

use cronguard::run::{Run, RunStatus};
use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use cronguard::clock::{Clock, ManualClock};
use serde_json::{Value, json};

use crate::helpers::*;

fn secs(t: DateTime<Utc>) -> f64 {
    (t - t0()).num_milliseconds() as f64 / 1000.0
}

fn at(s: f64) -> DateTime<Utc> {
    t0() + TimeDelta::milliseconds((s * 1000.0).round() as i64)
}

/// Expected life of the fire at second `fire`: started at `start` (None:
/// never started), ended at `end`, final status.
#[derive(Debug, Clone, Copy)]
struct Expect {
    fire: u32,
    start: Option<f64>,
    end: Option<f64>,
    status: &'static str,
    reason: Option<&'static str>,
}

const fn run(fire: u32, start: f64, end: f64, status: &'static str, reason: Option<&'static str>) -> Expect {
    Expect {
        fire,
        start: Some(start),
        end: Some(end),
        status,
        reason,
    }
}

const fn skip(fire: u32, reason: &'static str) -> Expect {
    Expect {
        fire,
        start: None,
        end: None,
        status: "skipped",
        reason: Some(reason),
    }
}

impl Expect {
    /// (status, reason) as recorded at time `t`, if the fire happened.
    fn at(&self, t: f64) -> Option<(String, Option<String>)> {
        if t < f64::from(self.fire) {
            return None;
        }
        let status = match (self.start, self.end) {
            (None, _) => self.status,
            (Some(s), _) if t < s => "queued",
            (Some(_), Some(e)) if t < e => "running",
            _ => self.status,
        };
        let reason = (status == self.status).then_some(self.reason).flatten();
        Some((status.to_owned(), reason.map(str::to_owned)))
    }
}

/// What the runs of `job` say: scheduled second → (status, reason).
async fn recorded(app: &TestApp, job: &str) -> BTreeMap<u32, (String, Option<String>)> {
    app.runs(job)
        .await
        .iter()
        .map(|r| {
            (
                secs(r.scheduled_at).round() as u32,
                (r.status.to_string(), r.reason.map(|r| r.to_string())),
            )
        })
        .collect()
}

fn expected(table: &[Expect], t: f64) -> BTreeMap<u32, (String, Option<String>)> {
    table.iter().filter_map(|e| Some((e.fire, e.at(t)?))).collect()
}

/// Steps the clock by half seconds to `until`, and after each step waits
/// until the recorded runs match one of the candidate tables (more than
/// one where the policy allows a tie to go either way) and the
/// supervisor's live runs match the recorded ones.
async fn replay(app: &TestApp, clock: &ManualClock, job: &str, mut tables: Vec<Vec<Expect>>, until: f64) {
    let mut t = 0.0;
    while t < until {
        t += 0.5;
        clock.set(at(t));
        let got = eventually(&format!("{job} at t={t}"), || {
            let tables = &tables;
            async move {
                let got = recorded(app, job).await;
                if !tables.iter().any(|table| expected(table, t) == got) {
                    return None;
                }
                // The supervisor has caught up with the store too: a run
                // whose end is committed has also given back its slot,
                // which the next fire's admission depends on.
                let live = |s: &str| got.values().filter(|(status, _)| status == s).count() as u64;
                let (_, status) = app.get("/v1/status").await;
                let runs = &status["runs"];
                (runs["running"].as_u64() == Some(live("running"))
                    && runs["queued"].as_u64() == Some(live("queued")))
                .then_some(got)
            }
        })
        .await;
        tables.retain(|table| expected(table, t) == got);
    }
    assert!(!tables.is_empty());
}

async fn overlap_case(db: &Database, overlap: &str, max_concurrency: u32, tables: Vec<Vec<Expect>>) {
    let clock = ManualClock::new(t0());
    let app = TestApp::start(Options::manual_clock(&clock).on(db)).await;
    let mut policy = json!({"overlap": overlap});
    if max_concurrency > 1 {
        policy["max_concurrency"] = json!(max_concurrency);
    }
    app.create(json!({
        "name": overlap,
        "schedule": {"kind": "interval", "every": "1s"},
        "action": {"kind": "test", "sleep": "2500ms"},
        "policy": policy,
    }))
    .await;
    replay(&app, &clock, overlap, tables, 10.0).await;
    app.stop().await;
}

on_both_databases! {
    #[tokio::test]
    async fn overlap_skip_against_runs_of_two_and_a_half_seconds(db: Database) {
        let table = vec![
            run(1, 1.0, 3.5, "succeeded", None),
            skip(2, "overlap"),
            skip(3, "overlap"),
            run(4, 4.0, 6.5, "succeeded", None),
            skip(5, "overlap"),
            skip(6, "overlap"),
            run(7, 7.0, 9.5, "succeeded", None),
            skip(8, "overlap"),
            skip(9, "overlap"),
            run(10, 10.0, 12.5, "succeeded", None),
        ];
        overlap_case(&db, "skip", 1, vec![table]).await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn overlap_allow_up_to_max_concurrency(db: Database) {
        let table = vec![
            run(1, 1.0, 3.5, "succeeded", None),
            run(2, 2.0, 4.5, "succeeded", None),
            skip(3, "overlap"),
            run(4, 4.0, 6.5, "succeeded", None),
            run(5, 5.0, 7.5, "succeeded", None),
            skip(6, "overlap"),
            run(7, 7.0, 9.5, "succeeded", None),
            run(8, 8.0, 10.5, "succeeded", None),
            skip(9, "overlap"),
            run(10, 10.0, 12.5, "succeeded", None),
        ];
        overlap_case(&db, "allow", 2, vec![table]).await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn overlap_cancel_running_replaces_every_run(db: Database) {
        let mut table: Vec<Expect> = (1..10)
            .map(|f| run(f, f64::from(f), f64::from(f) + 1.0, "cancelled", Some("replaced")))
            .collect();
        table.push(run(10, 10.0, 12.5, "succeeded", None));
        overlap_case(&db, "cancel_running", 1, vec![table]).await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn overlap_queue_one_keeps_one_waiting(db: Database) {
        // At t=6 the queued run 2 ends exactly when fire 6 comes: the fire may
        // be admitted before the end (6 skipped, 7 queued) or after it (6
        // queued, 7 skipped). Everything else is fixed.
        let common = |six: Expect, seven: Expect, eight_start: f64| {
            vec![
                run(1, 1.0, 3.5, "succeeded", None),
                run(2, 3.5, 6.0, "succeeded", None),
                skip(3, "queue_full"),
                run(4, 6.0, 8.5, "succeeded", None),
                skip(5, "queue_full"),
                six,
                seven,
                skip(8, "queue_full"),
                run(9, eight_start + 2.5, eight_start + 5.0, "succeeded", None),
                skip(10, "queue_full"),
            ]
        };
        let fire_first = common(skip(6, "queue_full"), run(7, 8.5, 11.0, "succeeded", None), 8.5);
        let end_first = common(run(6, 8.5, 11.0, "succeeded", None), skip(7, "queue_full"), 8.5);
        overlap_case(&db, "queue_one", 1, vec![fire_first, end_first]).await;
    }
}

/// An every-minute job; the service is stopped after its first fire and
/// restarted ten minutes later.
async fn downtime(db: &Database, policy: Value) -> Vec<Run> {
    downtime_of(db, "* * * * *", policy).await
}

/// [`downtime`] with the job's cron expression.
async fn downtime_of(db: &Database, expr: &str, policy: Value) -> Vec<Run> {
    let clock = ManualClock::new(t0());
    let first = TestApp::start(Options::manual_clock(&clock).on(db)).await;
    first
        .create(json!({
            "name": "minutely",
            "schedule": {"kind": "cron", "expr": expr},
            "action": {"kind": "test"},
            "policy": policy,
        }))
        .await;
    clock.set(t0() + TimeDelta::seconds(60));
    eventually("the first fire", || async {
        first
            .runs("minutely")
            .await
            .iter()
            .any(|r| r.status == RunStatus::Succeeded)
            .then_some(())
    })
    .await;
    let dir = first.dir.clone();
    first.stop().await;

    // Down from 12:01:00 to 12:11:30: fires 12:02 … 12:11 were due.
    clock.set(t0() + TimeDelta::seconds(11 * 60 + 30));
    let second = TestApp::start(Options {
        dir: Some(dir),
        ..Options::manual_clock(&clock).on(db)
    })
    .await;
    // Settled: every due fire is recorded (the cursor moved past 12:11:30
    // in the same commits) and no run is live.
    let runs = eventually("the catch-up to settle", || async {
        let (_, job) = second.get("/v1/jobs/minutely").await;
        let next = DateTime::parse_from_rfc3339(job["next_fire_at"].as_str()?).ok()?;
        let runs = second.runs("minutely").await;
        let live = runs
            .iter()
            .any(|r| matches!(r.status, RunStatus::Running | RunStatus::Queued));
        (next > clock.now() && !live).then_some(runs)
    })
    .await;
    second.stop().await;
    runs
}

fn describe(runs: &[Run]) -> Vec<String> {
    let mut out: Vec<String> = runs
        .iter()
        .map(|r| {
            let at = |t: DateTime<Utc>| t.format("%H:%M").to_string();
            match r.status {
                RunStatus::Missed => format!(
                    "missed {}..{} x{} ({})",
                    at(r.scheduled_at),
                    at(r.scheduled_until.unwrap()),
                    r.fires,
                    r.reason.unwrap()
                ),
                s => format!("{} {} {}", r.trigger, at(r.scheduled_at), s),
            }
        })
        .collect();
    out.sort();
    out
}

on_both_databases! {
    #[tokio::test]
    async fn ten_minutes_down_under_each_catch_up_policy(db: Database) {
        // Default grace (60 s): 12:11 is 30 s late and simply runs; the older
        // fires are summarised in one missed row.
        assert_eq!(
            describe(&downtime(&db, json!({})).await),
            [
                "missed 12:02..12:10 x9 (downtime)",
                "schedule 12:01 succeeded",
                "schedule 12:11 succeeded"
            ]
        );
        let grace = "10s";
        assert_eq!(
            describe(&downtime(&db, json!({"catch_up": "none", "misfire_grace": grace})).await),
            ["missed 12:02..12:11 x10 (downtime)", "schedule 12:01 succeeded"]
        );
        assert_eq!(
            describe(&downtime(&db, json!({"catch_up": "latest", "misfire_grace": grace})).await),
            [
                "catch_up 12:11 succeeded",
                "missed 12:02..12:10 x9 (downtime)",
                "schedule 12:01 succeeded"
            ]
        );
        assert_eq!(
            describe(
                &downtime(&db, json!({"catch_up": "all", "misfire_grace": grace, "catch_up_window": "5m"})).await
            ),
            [
                "catch_up 12:07 succeeded",
                "catch_up 12:08 succeeded",
                "catch_up 12:09 succeeded",
                "catch_up 12:10 succeeded",
                "catch_up 12:11 succeeded",
                "missed 12:02..12:06 x5 (downtime)",
                "schedule 12:01 succeeded"
            ]
        );
    }
}

#[tokio::test]
pub(crate) async fn latest_runs_only_the_newest_of_the_fires_due_at_restart() {
    // Every 10 s, down from 12:01:00 to 12:11:30: 12:01:10 … 12:11:30 are
    // due, the last six within the 60 s grace. Only the newest runs; none
    // is skipped, every other one is in the missed row.
    let runs = downtime_of(&Database::Sqlite, "*/10 * * * * *", json!({})).await;
    let describe_s = |r: &Run| {
        let at = |t: DateTime<Utc>| t.format("%H:%M:%S").to_string();
        match r.status {
            RunStatus::Missed => format!(
                "missed {}..{} x{}",
                at(r.scheduled_at),
                at(r.scheduled_until.unwrap()),
                r.fires
            ),
            s => format!("{} {} {}", r.trigger, at(r.scheduled_at), s),
        }
    };
    let mut seen: Vec<String> = runs.iter().map(describe_s).collect();
    seen.sort();
    assert!(
        seen.contains(&"schedule 12:11:30 succeeded".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"missed 12:01:10..12:11:20 x62".to_owned()),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|s| s.contains("skipped")), "{seen:?}");
}

on_both_databases! {
    #[tokio::test]
    async fn retries_back_off_within_bounds_inside_one_run(db: Database) {
        let clock = ManualClock::new(t0());
        let app = TestApp::start(Options::manual_clock(&clock).on(&db)).await;
        app.create(json!({
            "name": "flaky",
            "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
            "action": {"kind": "test", "fail_attempts": 2},
            "policy": {"retry": {"max_attempts": 3, "backoff": "1s", "max_backoff": "10s"}},
        }))
        .await;
        let run = app.trigger("flaky").await;
        let id = run.id;
        // Each failed attempt is recorded with the instant its retry is due
        // before the wait starts; set the clock exactly there and wait for the
        // next attempt to be recorded (or the run to end). The clock never
        // moves while the run is between an attempt and its wait.
        let attempts_seen = |r: &Value| r["attempt_log"].as_array().map_or(0, Vec::len);
        let mut seen = 0;
        let run = loop {
            let r = eventually("the next attempt to be recorded", || async {
                let (_, r) = app.get(&format!("/v1/runs/{id}")).await;
                (r["status"] != "running" || attempts_seen(&r) > seen).then_some(r)
            })
            .await;
            if r["status"] != "running" {
                break r;
            }
            seen = attempts_seen(&r);
            let due = r["attempt_log"][seen - 1]["retry_at"]
                .as_str()
                .expect("retry_at on a retried attempt");
            clock.set(DateTime::parse_from_rfc3339(due).unwrap().with_timezone(&Utc));
        };
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["attempts"], 3);
        let log = run["attempt_log"].as_array().unwrap();
        assert_eq!(log.len(), 3, "{run}");
        let when = |i: usize, k: &str| DateTime::parse_from_rfc3339(log[i][k].as_str().unwrap()).unwrap();
        assert_eq!(log[0]["status"], "failed");
        assert_eq!(log[1]["status"], "failed");
        assert_eq!(log[2]["status"], "succeeded");
        assert!(log[2].get("retry_at").is_none(), "{run}");
        // The next attempt starts exactly when its retry was due.
        assert_eq!(when(1, "started_at"), when(0, "retry_at"));
        assert_eq!(when(2, "started_at"), when(1, "retry_at"));
        let first_wait = (when(0, "retry_at") - when(0, "ended_at")).num_milliseconds();
        let second_wait = (when(1, "retry_at") - when(1, "ended_at")).num_milliseconds();
        // Equal jitter: the delay before retry n lies in [d/2, d] with
        // d = backoff * 2^(n-2).
        assert!((500..=1000).contains(&first_wait), "first wait {first_wait} ms");
        assert!(
            (1000..=2000).contains(&second_wait),
            "second wait {second_wait} ms"
        );
        app.stop().await;
    }
}

/// Triggers `job` twice, waits for both runs to end; the job after them.
async fn triggered_twice(app: &TestApp, job: &str) -> Value {
    for _ in 0..2 {
        let (_, run) = app.post_empty(&format!("/v1/jobs/{job}/trigger")).await;
        app.final_run(run["id"].as_str().unwrap()).await;
    }
    app.get(&format!("/v1/jobs/{job}")).await.1
}

on_both_databases! {
    #[tokio::test]
    async fn auto_pause_after_consecutive_failures_and_resume_resets(db: Database) {
        let app = TestApp::start(Options::default().on(&db)).await;
        app.create(json!({
            "name": "broken",
            "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
            "action": {"kind": "test", "fail_attempts": 1000},
            "policy": {"auto_pause_after": 3},
        }))
        .await;
        for i in 1..=3 {
            let (_, job) = app.get("/v1/jobs/broken").await;
            assert_eq!(job["paused"], false, "paused after {} failures", i - 1);
            let run = app.trigger("broken").await;
            assert_eq!(app.final_run(run.id).await.status, RunStatus::Failed);
        }
        let job = eventually("the job to pause itself", || async {
            let (_, job) = app.get("/v1/jobs/broken").await;
            (job["paused"] == true).then_some(job)
        })
        .await;
        assert_eq!(job["pause_note"], "auto-paused after 3 consecutive failed runs");
        let (_, job) = app.post_empty("/v1/jobs/broken/resume").await;
        assert_eq!(job["paused"], false);
        // The count starts over: two more failures do not pause it.
        assert_eq!(triggered_twice(&app, "broken").await["paused"], false);
        // A success starts it over too: two failures, a success, two more.
        let (_, job) = app.get("/v1/jobs/broken").await;
        let mut healthy = job["spec"].clone();
        healthy["action"] = json!({"kind": "test"});
        let replace = |spec: Value| app.client.put(app.url("/v1/jobs/broken")).json(&spec).send();
        assert_eq!(replace(healthy).await.unwrap().status(), 200);
        let run = app.trigger("broken").await;
        assert_eq!(app.final_run(run.id).await.status, RunStatus::Succeeded);
        assert_eq!(replace(job["spec"].clone()).await.unwrap().status(), 200);
        let job = triggered_twice(&app, "broken").await;
        assert_eq!(job["paused"], false, "a success did not reset the count: {job}");
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn a_job_stops_after_max_runs(db: Database) {
        let clock = ManualClock::new(t0());
        let app = TestApp::start(Options::manual_clock(&clock).on(&db)).await;
        app.create(json!({
            "name": "thrice",
            "schedule": {"kind": "interval", "every": "1s"},
            "action": {"kind": "test"},
            "policy": {"max_runs": 3},
        }))
        .await;
        for s in 1..=5 {
            clock.set(at(f64::from(s)));
            let expected = s.min(3) as usize;
            eventually("the fires", || async {
                let runs = app.runs("thrice").await;
                (runs.len() == expected && runs.iter().all(|r| r.status == RunStatus::Succeeded)).then_some(())
            })
            .await;
        }
        let (_, job) = app.get("/v1/jobs/thrice").await;
        assert!(job["next_fire_at"].is_null(), "{job}");
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn retention_keeps_exactly_the_configured_history(db: Database) {
        let mut options = Options::default().on(&db);
        options.settings.retention_interval = Some("200ms".into());
        let app = TestApp::start(options).await;
        let (_, keep) = app
            .post(
                "/v1/jobs",
                json!({
                    "name": "busy",
                    "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
                    "action": {"kind": "test"},
                    "policy": {"history": {"keep_last": 100}},
                }),
            )
            .await;
        let (_, default) = app
            .post(
                "/v1/jobs",
                json!({"name": "quiet", "schedule": {"kind": "cron", "expr": "0 0 1 1 *"}, "action": {"kind": "test"}}),
            )
            .await;
        let pool = any_pool(&app.database).await;
        let mut tx = pool.begin().await.unwrap();
        let base = Utc::now() - TimeDelta::days(10);
        let mut ids = Vec::new();
        for (job, name, n) in [(&keep, "busy", 10_000), (&default, "quiet", 50)] {
            for i in 0..n {
                let created = base + TimeDelta::milliseconds(i);
                let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
                    uuid::NoContext,
                    created.timestamp() as u64,
                    created.timestamp_subsec_nanos(),
                ))
                .to_string();
                if name == "busy" {
                    ids.push(id.clone());
                }
                sqlx::query(
                    "INSERT INTO runs (id, job_id, job_name, scheduled_at, status, trigger, created_at, ended_at, \
                     attempts, incarnation) VALUES ($1, $2, $3, $4, 'succeeded', 'manual', $5, $6, 1, 'x')",
                )
                .bind(&id)
                .bind(job["id"].as_str().unwrap())
                .bind(name)
                .bind(created.timestamp_millis())
                .bind(created.timestamp_millis())
                .bind(created.timestamp_millis())
                .execute(&mut *tx)
                .await
                .unwrap();
            }
        }
        tx.commit().await.unwrap();
        let count = |name: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM runs WHERE job_name = $1")
                    .bind(name)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            }
        };
        eventually("retention to prune to 100", || async {
            (count("busy").await == 100).then_some(())
        })
        .await;
        let kept: Vec<String> = sqlx::query_scalar("SELECT id FROM runs WHERE job_name = 'busy' ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(kept, ids[ids.len() - 100..], "the newest 100 are kept");
        assert_eq!(
            count("quiet").await,
            50,
            "the default (1000) keeps the other job's 50"
        );
        app.stop().await;
    }
}
