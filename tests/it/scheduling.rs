//! Fires: on time, in order, never early, never twice; pause, resume,
//! trigger and cancel.

use cronguard::run::{Reason, RunStatus, Trigger};
use std::time::Duration;

use chrono::{TimeDelta, Timelike};
use cronguard::clock::{Clock, ManualClock};
use serde_json::json;

use crate::helpers::*;

on_both_databases! {
    #[tokio::test]
    async fn an_every_second_job_fires_at_each_whole_second_with_its_identity(db: Database) {
        let mut receiver = Receiver::start().await;
        let app = TestApp::start(Options::default().on(&db)).await;
        let job = app
            .create(http_job("tick", every_second(), &receiver.url("/tick")))
            .await;
        let job_id = job.id;

        let mut hits = Vec::new();
        for _ in 0..3 {
            hits.push(receiver.next_on("/tick").await);
        }
        let mut previous = None;
        for hit in &hits {
            let scheduled = hit.scheduled_at();
            assert_eq!(scheduled.nanosecond(), 0, "fires are on whole seconds");
            assert!(
                hit.at >= scheduled,
                "never early: arrived {} for {}",
                hit.at,
                scheduled
            );
            if let Some(previous) = previous {
                assert_eq!(
                    scheduled - previous,
                    TimeDelta::seconds(1),
                    "consecutive seconds, no gap, no duplicate"
                );
            }
            previous = Some(scheduled);
            assert_eq!(hit.header("x-cronguard-job"), job_id.to_string());
            assert_eq!(hit.header("x-cronguard-job-name"), "tick");
            assert_eq!(hit.header("x-cronguard-attempt"), "1");
            let run = app.final_run(hit.header("x-cronguard-run")).await;
            assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
            assert_eq!(run.http_status, Some(200));
            assert_eq!(run.trigger, Trigger::Schedule);
            assert_eq!(run.scheduled_at, scheduled);
        }
        let runs = app.runs("tick").await;
        assert!(runs.len() >= 3);
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn http_failures_and_timeouts_are_recorded(db: Database) {
        let mut receiver = Receiver::start().await;
        let app = TestApp::start(Options::default().on(&db)).await;
        let yearly = json!({"kind": "cron", "expr": "0 0 1 1 *"});
        app.create(http_job("fails", yearly.clone(), &receiver.url("/status/503")))
            .await;
        let mut slow = http_job("slow", yearly.clone(), &receiver.url("/sleep/5000"));
        slow["action"]["timeout"] = json!("200ms");
        app.create(slow).await;
        app.create(http_job("refused", yearly, "http://127.0.0.1:9/closed"))
            .await;

        let run = app.trigger("fails").await;
        let run = app.final_run(run.id).await;
        assert_eq!(
            (run.status, run.http_status),
            (RunStatus::Failed, Some(503)),
            "{run:?}"
        );
        receiver.next_on("/status/503").await;

        let run = app.trigger("slow").await;
        let run = app.final_run(run.id).await;
        assert_eq!(run.status, RunStatus::TimedOut, "{run:?}");

        let run = app.trigger("refused").await;
        let run = app.final_run(run.id).await;
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        assert!(run.error.as_deref().unwrap().contains("connect"), "{run:?}");
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn pause_stops_fires_and_resume_restarts_from_now(db: Database) {
        let clock = ManualClock::new(t0());
        let mut receiver = Receiver::start().await;
        let app = TestApp::start(Options::manual_clock(&clock).on(&db)).await;
        app.create(http_job(
            "p",
            json!({"kind": "interval", "every": "1s"}),
            &receiver.url("/p"),
        ))
        .await;

        clock.advance(Duration::from_secs(1));
        let first = receiver.next_on("/p").await;
        assert_eq!(first.scheduled_at(), t0() + TimeDelta::seconds(1));

        let (status, job) = app
            .post("/v1/jobs/p/pause", json!({"note": "maintenance window"}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            (job["paused"].as_bool(), job["pause_note"].as_str()),
            (Some(true), Some("maintenance window"))
        );
        assert!(job["next_fire_at"].is_null());
        let paused_at = clock.now();
        clock.advance(Duration::from_secs(5));
        let resumed_at = clock.now();
        let (status, job) = app.post_empty("/v1/jobs/p/resume").await;
        assert_eq!(status, 200);
        assert!(job["pause_note"].is_null());
        assert_eq!(
            job["next_fire_at"],
            json!((resumed_at + TimeDelta::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        );
        clock.advance(Duration::from_secs(1));
        let next = receiver.next_on("/p").await;
        assert_eq!(
            next.scheduled_at(),
            resumed_at + TimeDelta::seconds(1),
            "resumes from now, no replay"
        );

        app.final_run(next.header("x-cronguard-run")).await;
        let runs = app.runs("p").await;
        let in_pause = runs.iter().filter(|r| {
            let at = r.scheduled_at;
            at > paused_at && at <= resumed_at
        });
        assert_eq!(in_pause.count(), 0, "no run for fires due while paused: {runs:?}");
        assert_eq!(runs.len(), 2, "{runs:?}");
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn trigger_runs_now_and_cancel_ends_a_live_run(db: Database) {
        let mut receiver = Receiver::start().await;
        let app = TestApp::start(Options::default().on(&db)).await;
        let mut slow = http_job(
            "slow",
            json!({"kind": "cron", "expr": "0 0 1 1 *"}),
            &receiver.url("/sleep/20000"),
        );
        slow["paused"] = json!(true);
        app.create(slow).await;

        let (status, run) = app.post_empty("/v1/jobs/slow/trigger").await;
        assert_eq!(status, 202, "{run}");
        assert_eq!(
            (run["status"].as_str(), run["trigger"].as_str()),
            (Some("running"), Some("manual"))
        );
        let hit = receiver.next_on("/sleep/20000").await;
        let id = run["id"].as_str().unwrap();
        assert_eq!(hit.header("x-cronguard-run"), id);

        // Overlap policy `skip` applies to manual triggers too.
        let (status, second) = app.post_empty("/v1/jobs/slow/trigger").await;
        assert_eq!(status, 202);
        assert_eq!(
            (second["status"].as_str(), second["reason"].as_str()),
            (Some("skipped"), Some("overlap"))
        );

        // Unless the request forces it.
        let (status, forced) = app.post_empty("/v1/jobs/slow/trigger?force=true").await;
        assert_eq!(status, 202);
        assert_eq!(forced["status"], "running", "{forced}");
        let (status, _) = app
            .post_empty(&format!("/v1/runs/{}/cancel", forced["id"].as_str().unwrap()))
            .await;
        assert_eq!(status, 202);
        app.final_run(forced["id"].as_str().unwrap()).await;

        let (status, _) = app.post_empty(&format!("/v1/runs/{id}/cancel")).await;
        assert_eq!(status, 202);
        let run = app.final_run(id).await;
        assert_eq!(
            (run.status, run.reason),
            (RunStatus::Cancelled, Some(Reason::Requested)),
            "{run:?}"
        );
        let (status, problem) = app.post_empty(&format!("/v1/runs/{id}/cancel")).await;
        assert_eq!(
            (status.as_u16(), problem["type"].as_str()),
            (409, Some("urn:cronguard:problem:run-final"))
        );

        let (_, runs) = app.get("/v1/runs?status=skipped,cancelled").await;
        assert_eq!(runs["items"].as_array().unwrap().len(), 3);
        app.stop().await;
    }
}
