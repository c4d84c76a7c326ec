//! A job's standing at a glance (`docs/observability.md`, "Job health"): each
//! health value reached by the real service on a manual clock, the filter
//! and the counts, and `late` when fires are blocked.

use std::collections::BTreeSet;

use chrono::TimeDelta;
use cronguard::api::job_view::HealthCounts;
use cronguard::api::jobs::{JobPage, JobView};
use cronguard::clock::ManualClock;
use cronguard::fault::Fault;
use cronguard::run::RunStatus;
use cronguard::standing::JobHealth;
use serde_json::{Value, json};

use crate::helpers::*;

fn job(name: &str, schedule: Value, action: Value) -> Value {
    json!({"name": name, "schedule": schedule, "action": action, "policy": {"misfire_grace": "5s"}})
}

fn minutely() -> Value {
    json!({"kind": "cron", "expr": "* * * * *"})
}

async fn health_of(app: &TestApp, name: &str) -> JobHealth {
    app.job(name).await.health
}

/// Names of the jobs `GET /v1/jobs?{query}` returns, following every page.
async fn listed(app: &TestApp, query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = app.get(&format!("/v1/jobs?{query}&limit=1{cursor}")).await;
        assert_eq!(status, 200, "{body}");
        let page: JobPage = view(body);
        names.extend(page.items.iter().map(|j| j.name.clone()));
        match page.next_cursor {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return names,
        }
    }
}

async fn counts(app: &TestApp) -> HealthCounts {
    let (status, body) = app.get("/v1/status").await;
    assert_eq!(status, 200, "{body}");
    view(body["jobs"]["health"].clone())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

on_both_databases! {
    #[tokio::test]
    async fn every_health_value_is_reached_filtered_and_counted(db: Database) {
        let clock = ManualClock::new(t0());
        let app = TestApp::start(Options::manual_clock(&clock).on(&db)).await;
        app.create(job("fine", minutely(), json!({"kind": "test"}))).await;
        app.create(job("broken", minutely(), json!({"kind": "test", "fail_attempts": 99}))).await;
        app.create(job("later", json!({"kind": "cron", "expr": "0 0 1 1 *"}), json!({"kind": "test"}))).await;
        let mut resting = job("resting", minutely(), json!({"kind": "test"}));
        resting["paused"] = json!(true);
        app.create(resting).await;
        let once_at = t0() + TimeDelta::seconds(30);
        app.create(job("once", json!({"kind": "once", "at": once_at}), json!({"kind": "test"}))).await;

        // Nothing ran yet: pending, except the paused one.
        let fresh: JobView = app.job("fine").await;
        assert_eq!(fresh.health, JobHealth::Pending);
        assert_eq!((fresh.last_run, fresh.consecutive_failures), (None, 0));
        assert_eq!(health_of(&app, "resting").await, JobHealth::Paused);

        // One minute on: every active job fired once.
        clock.set(t0() + TimeDelta::seconds(61));
        eventually("the first fires to end", || async {
            let ended = [("fine", RunStatus::Succeeded), ("broken", RunStatus::Failed), ("once", RunStatus::Succeeded)];
            for (name, status) in ended {
                if app.job(name).await.last_run.map(|r| r.status) != Some(status) {
                    return None;
                }
            }
            Some(())
        })
        .await;
        let fine = app.job("fine").await;
        assert_eq!(fine.health, JobHealth::Ok, "{fine:?}");
        let last = fine.last_run.unwrap();
        assert_eq!(last.scheduled_at, t0() + TimeDelta::seconds(60));
        assert_eq!(fine.last_success_at, Some(last.ended_at));
        assert_eq!(fine.last_failure_at, None);
        let broken = app.job("broken").await;
        assert_eq!(broken.health, JobHealth::Failing, "{broken:?}");
        assert_eq!(broken.consecutive_failures, 1);
        assert!(broken.last_run.as_ref().unwrap().error.as_deref().unwrap().contains("attempt"), "{broken:?}");
        assert_eq!(broken.last_failure_at, Some(broken.last_run.unwrap().ended_at));
        assert_eq!(health_of(&app, "once").await, JobHealth::Finished);
        assert_eq!(health_of(&app, "later").await, JobHealth::Pending);

        // The filter and the counts agree with the views.
        assert_eq!(listed(&app, "health=failing,late").await, set(&["broken"]));
        assert_eq!(listed(&app, "health=ok&health=finished").await, set(&["fine", "once"]));
        assert_eq!(listed(&app, "health=pending,paused").await, set(&["later", "resting"]));
        let c = counts(&app).await;
        assert_eq!(
            (c.ok, c.failing, c.late, c.paused, c.pending, c.finished),
            (1, 1, 0, 1, 1, 1),
            "{c:?}"
        );

        // A second failure counts; a success ends the streak.
        let run = app.trigger("broken").await;
        app.final_run(run.id).await;
        assert_eq!(app.job("broken").await.consecutive_failures, 2);
        let (_, current) = app.get("/v1/jobs/broken").await;
        let mut spec = current["spec"].clone();
        spec["action"] = json!({"kind": "test"});
        let put = app.client.put(app.url("/v1/jobs/broken")).json(&spec).send().await.unwrap();
        assert_eq!(put.status(), 200);
        let run = app.trigger("broken").await;
        app.final_run(run.id).await;
        let recovered = app.job("broken").await;
        assert_eq!(recovered.health, JobHealth::Ok, "{recovered:?}");
        assert_eq!(recovered.consecutive_failures, 0);
        assert!(recovered.last_failure_at.is_some(), "the last failure is still shown");

        // Fires blocked (the engine hangs): past the next fire plus its
        // grace, the jobs that should have fired are late; the others keep
        // their health.
        app.faults.arm("engine", Fault::Hang);
        clock.set(t0() + TimeDelta::seconds(120 + 4));
        assert_eq!(health_of(&app, "fine").await, JobHealth::Ok, "within the grace");
        clock.set(t0() + TimeDelta::seconds(120 + 6));
        assert_eq!(listed(&app, "health=late").await, set(&["broken", "fine"]));
        assert_eq!(health_of(&app, "once").await, JobHealth::Finished);
        assert_eq!(health_of(&app, "later").await, JobHealth::Pending);
        let c = counts(&app).await;
        assert_eq!((c.late, c.failing, c.ok), (2, 0, 0), "{c:?}");
        app.stop().await;
    }
}

#[tokio::test]
async fn an_unknown_health_value_is_a_precise_problem_and_an_empty_list_no_filter() {
    let app = TestApp::spawn().await;
    let (status, problem) = app.get("/v1/jobs?health=ok,sad").await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["type"], "urn:cronguard:problem:bad-query", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("`health`") && detail.contains("`sad` is not one of"),
        "{problem}"
    );
    // An empty list is no filter (the schema allows an empty array).
    let (status, page) = app.get("/v1/jobs?health=").await;
    assert_eq!(status, 200, "{page}");
    let (status, problem) = app.get("/v1/jobs?health=ok,,late").await;
    assert_eq!(status, 400, "an empty item in a list is no health: {problem}");
    app.stop().await;
}
