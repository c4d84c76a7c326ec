//! The control backend: reconciliation, the outbox, delivery through
//! outages and crashes, malformed payloads, and contact in the probes —
//! against a real HTTP fake backend on loopback.

mod delivery;
mod fake;

use cronguard::protocol::RunResult;
use cronguard::run::{Run, RunStatus};
use std::collections::{HashMap, HashSet};

use cronguard::fault::Fault;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use self::fake::{FakeBackend, Mode, TOKEN};
use crate::helpers::*;

fn options(backend: &FakeBackend) -> Options {
    let mut o = Options::default();
    o.settings.backend_url = Some(backend.url.clone());
    o.settings.backend_token = Some(TOKEN.into());
    o.settings.backend_poll_interval = Some("200ms".into());
    o.settings.backend_timeout = Some("1s".into());
    o.settings.backend_max_backoff = Some("400ms".into());
    o
}

/// Flags for the binary, equivalent to [`options`].
fn flags(backend: &FakeBackend) -> Vec<String> {
    [
        "--backend-url",
        &backend.url,
        "--backend-poll-interval",
        "200ms",
        "--backend-timeout",
        "1s",
        "--backend-max-backoff",
        "400ms",
    ]
    .iter()
    .map(std::string::ToString::to_string)
    .collect()
}

/// `flags` with another value of one of its flags.
fn with_flag(mut flags: Vec<String>, name: &str, value: &str) -> Vec<String> {
    let at = flags.iter().position(|f| f == name).expect("the flag") + 1;
    flags[at] = value.to_owned();
    flags
}

/// A backend job calling the fake's hook.
fn job(backend: &FakeBackend, name: &str, schedule: Value) -> Value {
    json!({
        "name": name,
        "schedule": schedule,
        "action": {"kind": "http", "method": "POST", "url": backend.hook()},
    })
}

fn never() -> Value {
    json!({"kind": "cron", "expr": "0 0 1 1 *"})
}

async fn status(get: impl AsyncFn(&str) -> (reqwest::StatusCode, Value)) -> Value {
    let (code, body) = get("/v1/status").await;
    assert_eq!(code, 200, "{body}");
    body["backend"].clone()
}

/// Waits until the outbox is empty.
async fn outbox_drained(app: &TestApp) {
    eventually("the outbox to drain", || async {
        let b = status(async |p| app.get(p).await).await;
        (b["outbox_entries"] == 0).then_some(())
    })
    .await;
}

async fn backend_jobs(app: &TestApp) -> HashMap<String, Value> {
    let (code, body) = app.get("/v1/jobs?source=backend&limit=500").await;
    assert_eq!(code, 200, "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["name"].as_str().unwrap().to_owned(), j.clone()))
        .collect()
}

fn ids(runs: &[Run]) -> HashSet<String> {
    runs.iter().map(|r| r.id.to_string()).collect()
}

fn assert_once(backend: &FakeBackend) {
    let twice: Vec<_> = backend.deliveries().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
}

#[tokio::test]
async fn backend_jobs_appear_fire_and_each_result_arrives_once() {
    let backend = FakeBackend::start().await;
    let names = ["alpha", "beta", "gamma"];
    backend.set_jobs(
        names
            .iter()
            .map(|n| {
                let mut j = job(&backend, n, every_second());
                j["policy"] = json!({"max_runs": 2});
                j
            })
            .collect(),
    );
    let app = TestApp::start(options(&backend)).await;
    let jobs = eventually("three backend jobs", || async {
        let jobs = backend_jobs(&app).await;
        (jobs.len() == 3).then_some(jobs)
    })
    .await;
    for name in names {
        assert_eq!(jobs[name]["source"], "backend");
    }
    // Each job runs twice, then its results all reach the backend.
    let runs: Vec<Run> = eventually("every run to end and be delivered", || async {
        let mut all = Vec::new();
        for name in names {
            let runs = app.runs(name).await;
            let done = runs.iter().filter(|r| r.status == RunStatus::Succeeded).count();
            if done < 2
                || runs
                    .iter()
                    .any(|r| matches!(r.status, RunStatus::Running | RunStatus::Queued))
            {
                return None;
            }
            all.extend(runs);
        }
        let delivered: HashSet<String> = backend.deliveries().into_keys().collect();
        (delivered == ids(&all)).then_some(all)
    })
    .await;
    assert_once(&backend);
    for result in backend.results() {
        let result: RunResult = view(result);
        let run = runs.iter().find(|r| r.id == result.run_id).unwrap();
        assert_eq!(result.status, run.status);
        assert_eq!(result.job, run.job_name);
        assert_eq!(result.scheduled_at, run.scheduled_at);
        assert_eq!(result.http_status, Some(200));
    }
    for batch in backend.batches() {
        assert!(batch["results"].as_array().unwrap().len() <= 100);
        assert!(batch["incarnation"].is_string());
    }
    assert!(backend.shared.hooks.load(std::sync::atomic::Ordering::SeqCst) >= 6);
    assert_eq!(
        backend
            .shared
            .unauthorized
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let metrics = app.metrics().await;
    assert_eq!(sample(&metrics, "cronguard_backend_configured"), Some(1.0));
    assert_eq!(
        sample(&metrics, "cronguard_backend_uploaded_total{kind=\"result\"}"),
        Some(runs.len() as f64)
    );
    app.stop().await;
}

#[tokio::test]
async fn reconciliation_touches_only_backend_jobs_and_304_writes_nothing() {
    let backend = FakeBackend::start().await;
    let app = TestApp::start(options(&backend)).await;
    let local = app.create(job(&backend, "local", never())).await;
    backend.set_jobs(vec![
        job(&backend, "a", never()),
        job(&backend, "b", never()),
        job(&backend, "c", never()),
        job(&backend, "local", every_second()),
    ]);
    let before = eventually("a, b and c", || async {
        let jobs = backend_jobs(&app).await;
        (jobs.len() == 3).then_some(jobs)
    })
    .await;
    // The item named like the local job is rejected and reported.
    let rejection = eventually("the rejection to be reported", || async {
        backend.rejections().into_iter().find(|r| r["job"] == "local")
    })
    .await;
    assert_eq!(rejection["errors"][0]["pointer"], "/name");
    // A run of `b` before its change: history is kept across the change.
    let (code, run) = app.post_empty("/v1/jobs/b/trigger").await;
    assert_eq!(code, 202, "{run}");
    app.final_run(run["id"].as_str().unwrap()).await;

    // Unchanged list: 304s, and no job is written.
    let seen = backend.not_modified();
    eventually("three 304 answers", || async {
        (backend.not_modified() >= seen + 3).then_some(())
    })
    .await;
    let same = backend_jobs(&app).await;
    for name in ["a", "b", "c"] {
        assert_eq!(same[name]["version"], before[name]["version"]);
        assert_eq!(same[name]["updated_at"], before[name]["updated_at"]);
    }
    let metrics = app.metrics().await;
    assert!(sample(&metrics, "cronguard_backend_pulls_total{result=\"not_modified\"}").unwrap() >= 3.0);
    assert_eq!(
        sample(
            &metrics,
            "cronguard_backend_jobs_applied_total{change=\"created\"}"
        ),
        Some(3.0)
    );

    // Local edits of backend jobs are refused; operational actions work.
    let r = app.client.delete(app.url("/v1/jobs/a")).send().await.unwrap();
    let (code, problem) = read(r).await;
    assert_eq!(code, 409);
    assert_eq!(problem["type"], "urn:cronguard:problem:owned-by-backend");
    let (code, _) = app.post_empty("/v1/jobs/a/pause").await;
    assert_eq!(code, 200);

    // Change b, delete c, add d; the local job stays as it was.
    let mut b = job(&backend, "b", json!({"kind": "cron", "expr": "0 0 2 1 *"}));
    b["description"] = json!("changed");
    backend.set_jobs(vec![job(&backend, "a", never()), b, job(&backend, "d", never())]);
    let after = eventually("b changed, c deleted, d added", || async {
        let jobs = backend_jobs(&app).await;
        let done = jobs.contains_key("d")
            && !jobs.contains_key("c")
            && jobs["b"]["spec"]["description"] == "changed";
        done.then_some(jobs)
    })
    .await;
    assert_eq!(after["b"]["id"], before["b"]["id"]);
    assert_eq!(
        after["b"]["version"].as_i64(),
        before["b"]["version"].as_i64().map(|v| v + 1)
    );
    assert_eq!(app.runs("b").await.len(), 1, "b keeps its history");
    assert_eq!(after["a"]["paused"], true, "a local pause survives");
    assert_eq!(after["a"]["id"], before["a"]["id"]);
    let (code, _) = app.get("/v1/jobs/c").await;
    assert_eq!(code, 404);
    let (code, now) = app.get("/v1/jobs/local").await;
    assert_eq!(code, 200);
    assert_eq!(now["version"], local.version);
    assert_eq!(now["source"], "api");
    assert_eq!(now["spec"]["schedule"], never());
    app.stop().await;
}

#[tokio::test]
async fn an_outage_grows_the_outbox_and_stalls_contact_then_everything_arrives_once_in_order() {
    let backend = FakeBackend::start().await;
    backend.set_jobs(vec![
        job(&backend, "one", every_second()),
        job(&backend, "two", every_second()),
    ]);
    let app = TestApp::start(options(&backend)).await;
    eventually("a first delivery", || async {
        (!backend.results().is_empty()).then_some(())
    })
    .await;

    for (mode, reason) in [
        (Mode::Fail, "status_5xx"),
        (Mode::Hang, "timeout"),
        (Mode::Close, "connect"),
    ] {
        let series = format!("cronguard_backend_failures_total{{reason=\"{reason}\"}}");
        let failures = sample(&app.metrics().await, &series).unwrap_or(0.0);
        backend.set_mode(mode);
        eventually(&format!("{reason} failures"), || async {
            (sample(&app.metrics().await, &series).unwrap_or(0.0) >= failures + 2.0).then_some(())
        })
        .await;
    }
    // Contact stalled while attempts went on; runs kept happening.
    let metrics = app.metrics().await;
    let contact = sample(&metrics, "cronguard_backend_last_contact_timestamp_seconds").unwrap();
    eventually("attempts to go on after the last contact", || async {
        let m = app.metrics().await;
        let attempt = sample(&m, "cronguard_backend_last_attempt_timestamp_seconds").unwrap();
        (attempt > contact + 1.0).then_some(())
    })
    .await;
    let stalled = sample(
        &app.metrics().await,
        "cronguard_backend_last_contact_timestamp_seconds",
    );
    assert_eq!(stalled, Some(contact));
    let waiting = eventually("the outbox to grow", || async {
        let b = status(async |p| app.get(p).await).await;
        (b["outbox_entries"].as_u64().unwrap() >= 4).then_some(b)
    })
    .await;
    assert!(
        waiting["contact"]["consecutive_failures"].as_u64().unwrap() > 0,
        "{waiting}"
    );
    assert!(waiting["contact"]["last_error"].is_string(), "{waiting}");
    let m = app.metrics().await;
    assert!(sample(&m, "cronguard_backend_outbox_entries").unwrap() >= 1.0);
    assert!(sample(&m, "cronguard_backend_outbox_oldest_age_seconds").unwrap() > 0.0);
    let (code, _) = app.get("/livez").await;
    assert_eq!(code, 200, "a backend outage is not a liveness failure");

    // Recovery: stop the fires, let everything drain, compare.
    backend.set_mode(Mode::Ok);
    for name in ["one", "two"] {
        let (code, _) = app.post_empty(&format!("/v1/jobs/{name}/pause")).await;
        assert_eq!(code, 200);
    }
    let mut local = Vec::new();
    for name in ["one", "two"] {
        let runs = eventually("the last runs to end", || async {
            let runs = app.runs(name).await;
            runs.iter()
                .all(|r| !matches!(r.status, RunStatus::Running | RunStatus::Queued))
                .then_some(runs)
        })
        .await;
        local.extend(runs);
    }
    outbox_drained(&app).await;
    assert_once(&backend);
    let delivered: HashSet<String> = backend.deliveries().into_keys().collect();
    assert_eq!(delivered, ids(&local));
    for name in ["one", "two"] {
        let scheduled: Vec<String> = backend
            .results()
            .iter()
            .filter(|r| r["job"] == name)
            .map(|r| r["scheduled_at"].as_str().unwrap().to_owned())
            .collect();
        let mut sorted = scheduled.clone();
        sorted.sort();
        assert_eq!(scheduled, sorted, "{name}: results arrive in order");
    }
    assert!(
        backend
            .batches()
            .iter()
            .any(|b| b["results"].as_array().unwrap().len() > 1),
        "the backlog is sent in batches"
    );
    app.stop().await;
}

/// Triggers the `burst` job of the binary; the run's id.
async fn trigger(service: &Binary) -> String {
    let r = client()
        .post(service.url("/v1/jobs/burst/trigger"))
        .send()
        .await
        .unwrap();
    let (code, run) = read(r).await;
    assert_eq!(code, 202, "{run}");
    run["id"].as_str().unwrap().to_owned()
}

async fn outbox_holds(service: &Binary, n: u64) {
    eventually(&format!("{n} results in the outbox"), || async {
        let b = status(async |p| service.get(p).await).await;
        (b["outbox_entries"].as_u64().unwrap() >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn kill_9_with_50_undelivered_results_loses_none_and_startup_does_not_wait_for_the_backend() {
    let backend = FakeBackend::start().await;
    let mut burst = job(&backend, "burst", never());
    burst["policy"] = json!({"overlap": "allow"});
    backend.set_jobs(vec![burst]);
    backend.set_mode(Mode::RejectUploads);
    let dir = tempfile::tempdir().unwrap();
    let mut flags = with_flag(flags(&backend), "--backend-max-backoff", "2s");
    flags.extend(["--upload-batch".into(), "10".into()]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let env = [("CRONGUARD_BACKEND_TOKEN", TOKEN)];
    let service = Binary::start_with_env(dir.path(), &args, &env).await;
    eventually("the backend job", || async {
        let (code, _) = service.get("/v1/jobs/burst").await;
        (code == 200).then_some(())
    })
    .await;
    let mut triggered = HashSet::new();
    for _ in 0..50 {
        triggered.insert(trigger(&service).await);
    }
    outbox_holds(&service, 50).await;
    assert!(backend.results().is_empty());
    // `Retry-After: 1` is honoured: longer than the first backoff steps,
    // within the --backend-max-backoff cap (2s) that bounds every wait.
    eventually("three upload attempts", || async {
        (backend.shared.upload_attempts.lock().unwrap().len() >= 3).then_some(())
    })
    .await;
    let attempts = backend.shared.upload_attempts.lock().unwrap().clone();
    for pair in attempts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= std::time::Duration::from_millis(950),
            "retried after {gap:?}"
        );
    }
    service.signal(Signal::SIGKILL);
    let mut service = service;
    service.wait().await;

    // Startup does not wait for the backend: the persisted job still runs.
    backend.set_mode(Mode::Fail);
    let service = Binary::start_with_env(dir.path(), &args, &env).await;
    triggered.insert(trigger(&service).await);
    outbox_holds(&service, 51).await;
    backend.set_mode(Mode::Ok);
    eventually("all 51 results delivered", || async {
        let delivered: HashSet<String> = backend.deliveries().into_keys().collect();
        triggered.is_subset(&delivered).then_some(())
    })
    .await;
    assert_once(&backend);
    let batches = backend.batches();
    assert!(batches.len() >= 6, "{} batches", batches.len());
    assert!(
        batches
            .iter()
            .all(|b| b["results"].as_array().unwrap().len() <= 10)
    );
    let b = status(async |p| service.get(p).await).await;
    assert_eq!(b["contact"]["consecutive_failures"], 0);
    let logs = {
        service.signal(Signal::SIGTERM);
        let mut service = service;
        service.drain_logs().await
    };
    assert!(!logs.contains(TOKEN), "the token is never logged");
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_valid_jobs_still_apply() {
    let backend = FakeBackend::start().await;
    let app = TestApp::start(options(&backend)).await;
    let decode = "cronguard_backend_failures_total{reason=\"decode\"}";
    for raw in ["this is not json", "{\"jobs\": 5}", "[1, 2"] {
        let before = sample(&app.metrics().await, decode).unwrap_or(0.0);
        backend.set_raw(raw);
        eventually("a decode failure", || async {
            (sample(&app.metrics().await, decode).unwrap_or(0.0) > before).then_some(())
        })
        .await;
    }
    // 100 MiB, streamed without a length: cut off at the limit.
    backend.set_huge(100);
    eventually("a too-large failure", || async {
        let m = app.metrics().await;
        (sample(&m, "cronguard_backend_failures_total{reason=\"too_large\"}").unwrap_or(0.0) >= 1.0)
            .then_some(())
    })
    .await;
    let (code, _) = app.get("/livez").await;
    assert_eq!(code, 200);

    let bad_cron = json!({"name": "bad-cron", "schedule": {"kind": "cron", "expr": "nope"},
        "action": {"kind": "http", "url": backend.hook()}});
    let wrong_type =
        json!({"name": 7, "schedule": never(), "action": {"kind": "http", "url": backend.hook()}});
    let command =
        json!({"name": "cmd", "schedule": never(), "action": {"kind": "command", "program": "true"}});
    backend.set_jobs(vec![
        job(&backend, "good-1", never()),
        bad_cron,
        wrong_type,
        command,
        job(&backend, "good-2", never()),
        job(&backend, "good-1", every_second()),
    ]);
    let jobs = eventually("the valid jobs", || async {
        let jobs = backend_jobs(&app).await;
        (jobs.len() == 2).then_some(jobs)
    })
    .await;
    assert!(jobs.contains_key("good-1") && jobs.contains_key("good-2"));
    assert_eq!(
        jobs["good-1"]["spec"]["schedule"],
        never(),
        "the first of two equal names applies"
    );
    let rejections = eventually("four rejections reported", || async {
        let r = backend.rejections();
        (r.len() >= 4).then_some(r)
    })
    .await;
    let by_job: HashMap<&str, &Value> = rejections
        .iter()
        .map(|r| (r["job"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_job["bad-cron"]["errors"][0]["pointer"], "/schedule/expr");
    assert_eq!(by_job["#2"]["errors"][0]["pointer"], "/name");
    assert_eq!(by_job["cmd"]["errors"][0]["pointer"], "/action/kind");
    assert_eq!(by_job["good-1"]["errors"][0]["pointer"], "/name");
    // Each distinct rejection is reported once, not at every pull.
    let pulls = backend.pulls();
    eventually("more pulls", || async {
        (backend.pulls() >= pulls + 3).then_some(())
    })
    .await;
    assert_eq!(backend.rejections().len(), 4);
    let m = app.metrics().await;
    assert_eq!(sample(&m, "cronguard_backend_jobs_rejected_total"), Some(4.0));
    app.stop().await;
}

#[tokio::test]
async fn a_hung_sync_loop_fails_liveness_a_down_backend_does_not() {
    // A backend that refuses connections.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", closed.local_addr().unwrap());
    drop(closed);
    let mut o = Options::default();
    o.settings.backend_url = Some(url.clone());
    o.settings.backend_poll_interval = Some("200ms".into());
    o.settings.backend_timeout = Some("1s".into());
    o.settings.loop_stale_after = Some("2s".into());
    let app = TestApp::start(o).await;
    // Down for longer than the loop threshold (2s + 1s): still alive.
    eventually("the contact to go stale", || async {
        let (_, report) = app.get("/readyz?verbose").await;
        let check = report["checks"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "backend_contact")?
            .clone();
        let stale = check["value"]["stale"] == true && check["value"]["age_seconds"].as_f64()? > 3.5;
        stale.then_some(check)
    })
    .await;
    let (code, body) = app.get("/livez").await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = app.get("/readyz").await;
    assert_eq!(code, 200, "a down backend does not fail readiness either");

    app.faults.arm("backend_sync", Fault::Hang);
    let report = eventually("/livez to fail", || async {
        let (code, report) = app.get("/livez?verbose").await;
        (code == 503).then_some(report)
    })
    .await;
    let failing: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failing, ["loop:backend_sync"], "{report}");
    app.stop().await;

    // Opt-in: no contact for longer than the maximum age fails liveness.
    let mut o = Options::default();
    o.settings.backend_url = Some(url);
    o.settings.backend_poll_interval = Some("200ms".into());
    o.settings.backend_contact_max_age = Some("1s".into());
    let app = TestApp::start(o).await;
    let report = eventually("/livez to fail on the contact age", || async {
        let (code, report) = app.get("/livez?verbose").await;
        (code == 503).then_some(report)
    })
    .await;
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "backend_contact")
        .unwrap()
        .clone();
    assert_eq!(check["ok"], false, "{report}");
    assert!(
        check["reason"]
            .as_str()
            .unwrap()
            .contains("--backend-contact-max-age")
    );
    app.stop().await;
}

#[tokio::test]
async fn an_outbox_over_its_limit_drops_the_oldest_and_counts_them() {
    let backend = FakeBackend::start().await;
    let mut burst = job(&backend, "burst", never());
    burst["policy"] = json!({"overlap": "allow"});
    backend.set_jobs(vec![burst]);
    backend.set_mode(Mode::RejectUploads);
    let mut o = options(&backend);
    o.settings.outbox_limit = Some(5);
    let app = TestApp::start(o).await;
    eventually("the backend job", || async {
        (app.get("/v1/jobs/burst").await.0 == 200).then_some(())
    })
    .await;
    let mut runs = Vec::new();
    for _ in 0..12 {
        let (code, run) = app.post_empty("/v1/jobs/burst/trigger").await;
        assert_eq!(code, 202, "{run}");
        runs.push(app.final_run(run["id"].as_str().unwrap()).await);
    }
    eventually("7 dropped entries counted", || async {
        let m = app.metrics().await;
        (sample(&m, "cronguard_backend_outbox_dropped_total") == Some(7.0)).then_some(())
    })
    .await;
    backend.set_mode(Mode::Ok);
    outbox_drained(&app).await;
    // The newest five arrive; the oldest seven were dropped.
    let delivered: HashSet<String> = backend.deliveries().into_keys().collect();
    assert_eq!(delivered, ids(&runs[7..]));
    app.stop().await;
}
