//! Metrics and probes that external monitors act on.

use cronguard::run::{Run, RunStatus};
use nix::sys::signal::Signal;
use serde_json::json;

use crate::helpers::*;

fn yearly() -> serde_json::Value {
    json!({"kind": "cron", "expr": "0 0 1 1 *"})
}

/// Triggers `job` and waits for its run to end; returns the final run.
async fn run_once(app: &TestApp, job: &str) -> Run {
    let run = app.trigger(job).await;
    app.final_run(run.id).await
}

#[tokio::test]
async fn every_counter_moves_by_exactly_what_happened() {
    let mut receiver = Receiver::start().await;
    let mut options = Options::default();
    options.settings.reaper_interval = Some("100ms".into());
    let app = TestApp::start(options).await;
    app.create(http_job("ok", yearly(), &receiver.url("/ok"))).await;
    app.create(http_job("bad", yearly(), &receiver.url("/status/500")))
        .await;
    let mut slow = http_job("slow", yearly(), &receiver.url("/sleep/3000"));
    slow["action"]["timeout"] = json!("200ms");
    app.create(slow).await;
    let mut paused = http_job("idle", yearly(), &receiver.url("/idle"));
    paused["paused"] = json!(true);
    app.create(paused).await;

    for _ in 0..3 {
        assert_eq!(run_once(&app, "ok").await.status, RunStatus::Succeeded);
    }
    assert_eq!(run_once(&app, "bad").await.status, RunStatus::Failed);
    // Start the slow run, skip an overlapping trigger, then let it time out.
    let first = app.trigger("slow").await;
    let (_, skipped) = app.post_empty("/v1/jobs/slow/trigger").await;
    assert_eq!(skipped["status"], "skipped");
    assert_eq!(app.final_run(first.id).await.status, RunStatus::TimedOut);
    receiver.drain();

    // One orphan: a run recorded live by this incarnation that no task owns.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", app.db.display()))
        .await
        .unwrap();
    let (incarnation,): (String,) = sqlx::query_as("SELECT id FROM incarnations WHERE stopped_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (_, job) = app.get("/v1/jobs/ok").await;
    sqlx::query(
        "INSERT INTO runs (id, job_id, job_name, scheduled_at, status, trigger, created_at, attempts, incarnation) \
         VALUES (?, ?, 'ok', 1, 'running', 'manual', 1, 1, ?)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(job["id"].as_str().unwrap())
    .bind(&incarnation)
    .execute(&pool)
    .await
    .unwrap();
    let m = eventually("the orphan to be counted", || async {
        let m = app.metrics().await;
        (sample(&m, r#"cronguard_orphans_detected_total{kind="run_without_task"}"#) == Some(1.0)).then_some(m)
    })
    .await;

    let expect = [
        (r#"cronguard_runs_started_total{trigger="manual"}"#, 5.0),
        (
            r#"cronguard_runs_finished_total{status="succeeded",trigger="manual"}"#,
            3.0,
        ),
        (
            r#"cronguard_runs_finished_total{status="failed",trigger="manual"}"#,
            1.0,
        ),
        (
            r#"cronguard_runs_finished_total{status="timed_out",trigger="manual"}"#,
            1.0,
        ),
        (
            r#"cronguard_fires_not_run_total{reason="overlap",status="skipped"}"#,
            1.0,
        ),
        ("cronguard_runs_running", 0.0),
        ("cronguard_run_duration_seconds_count", 5.0),
        (r#"cronguard_jobs{state="active"}"#, 3.0),
        (r#"cronguard_jobs{state="paused"}"#, 1.0),
        (
            r#"cronguard_orphans_detected_total{kind="previous_incarnation"}"#,
            0.0,
        ),
        (
            r#"cronguard_orphans_detected_total{kind="task_without_run"}"#,
            0.0,
        ),
        (r#"cronguard_orphans{kind="run_without_task"}"#, 0.0),
        (r#"cronguard_loop_healthy{loop="engine"}"#, 1.0),
        (r#"cronguard_loop_restarts_total{loop="engine"}"#, 0.0),
        (
            r#"cronguard_http_requests_total{method="POST",route="/v1/jobs/{job}/trigger",status="2xx"}"#,
            6.0,
        ),
        (
            r#"cronguard_http_requests_total{method="POST",route="/v1/jobs",status="2xx"}"#,
            4.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&m, series), Some(value), "{series}\n{m}");
    }
    for (family, kind) in [
        ("cronguard_runs_started_total", "counter"),
        ("cronguard_fire_lateness_seconds", "histogram"),
        ("cronguard_loop_heartbeat_timestamp_seconds", "gauge"),
        ("cronguard_backend_last_contact_timestamp_seconds", "gauge"),
        ("cronguard_store_commit_seconds", "histogram"),
        ("cronguard_database_size_bytes", "gauge"),
        ("cronguard_build_info", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        assert!(
            m.contains(&format!("# TYPE {family} {kind}\n")),
            "{family} {kind} missing"
        );
    }
    assert!(sample(&m, "cronguard_database_size_bytes").unwrap() > 0.0);
    assert!(!m.contains("/v1/jobs/ok"), "raw paths must not become labels");
    app.stop().await;
}

#[tokio::test]
async fn scheduled_fires_feed_lateness_and_monitored_jobs_get_their_own_series() {
    let mut receiver = Receiver::start().await;
    let app = TestApp::spawn().await;
    let mut spec = http_job("watched", every_second(), &receiver.url("/w"));
    spec["monitor"] = json!(true);
    spec["policy"] = json!({"misfire_grace": "30s"});
    app.create(spec).await;
    app.create(http_job("unwatched", yearly(), &receiver.url("/u")))
        .await;
    let hit = receiver.next_on("/w").await;
    app.final_run(hit.header("x-cronguard-run")).await;

    let m = app.metrics().await;
    assert!(sample(&m, "cronguard_fire_lateness_seconds_count").unwrap() >= 1.0);
    let success = sample(
        &m,
        r#"cronguard_job_last_success_timestamp_seconds{job_name="watched"}"#,
    )
    .unwrap();
    assert!((success - hit.at.timestamp() as f64).abs() < 5.0, "{success}");
    let expected_by = sample(
        &m,
        r#"cronguard_job_expected_by_timestamp_seconds{job_name="watched"}"#,
    )
    .unwrap();
    let next = hit.scheduled_at().timestamp() as f64;
    assert!(
        expected_by > next + 29.0 && expected_by < next + 40.0,
        "{expected_by} vs {next}"
    );
    assert!(
        !m.contains(r#"job_name="unwatched""#),
        "unmonitored jobs have no per-job series"
    );
    assert!(sample(&m, "cronguard_next_fire_timestamp_seconds").unwrap() > next);

    let r = app
        .client
        .delete(app.url("/v1/jobs/watched"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let m = eventually("the series to go with the job", || async {
        let m = app.metrics().await;
        (!m.contains(r#"job="watched""#)).then_some(m)
    })
    .await;
    assert_eq!(sample(&m, r#"cronguard_jobs{state="active"}"#), Some(1.0));
    app.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_database_and_liveness_does_not() {
    let app = TestApp::spawn().await;
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);
    // As good as unreadable for a root process: the file is gone from its
    // path (the open connections still hold the old inode).
    let aside = app.dir.path().join("moved-away.db");
    std::fs::rename(&app.db, &aside).unwrap();
    let (status, report) = app.get("/readyz?verbose").await;
    assert_eq!(status, 503, "{report}");
    let db = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "database")
        .unwrap();
    assert_eq!(db["ok"], false, "{report}");
    let (status, _) = app.get("/livez").await;
    assert_eq!(status, 200, "a database problem must not fail liveness");
    std::fs::rename(&aside, &app.db).unwrap();
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);

    let (status, s) = app.get("/v1/status").await;
    assert_eq!(status, 200);
    assert!(
        s["incarnation"].is_string() && s["uptime_seconds"].as_f64().unwrap() >= 0.0,
        "{s}"
    );
    let loops: Vec<_> = s["loops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    for name in ["engine", "reaper", "store_writer", "supervisor"] {
        assert!(loops.contains(&name), "{loops:?}");
    }
    assert_eq!(s["runs"], json!({"running": 0, "queued": 0}));
    app.stop().await;
}

#[tokio::test]
async fn shutdown_fails_readiness_first_while_runs_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Binary::start(dir.path(), &["--enable-command-jobs", "--shutdown-grace", "3s"]).await;
    let (status, _) = service
        .post(
            "/v1/jobs",
            json!({
                "name": "long",
                "schedule": yearly(),
                "action": {"kind": "command", "program": "sleep", "args": ["300"]},
                "policy": {"kill_grace": "1s"},
            }),
        )
        .await;
    assert_eq!(status, 201);
    service.post("/v1/jobs/long/trigger", json!(null)).await;
    eventually("the run to start", || async {
        let (_, page) = service.get("/v1/runs?status=running").await;
        (!page["items"].as_array().unwrap().is_empty()).then_some(())
    })
    .await;

    service.signal(Signal::SIGTERM);
    service
        .log_line("shutting down: readiness is failing, draining runs")
        .await;
    let (status, report) = service.get("/readyz?verbose").await;
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["checks"][0]["name"], "shutting_down");
    assert_eq!(report["checks"][0]["ok"], false);
    let (status, _) = service.get("/livez").await;
    assert_eq!(status, 200, "draining is not a liveness failure");
    assert_eq!(service.wait().await, Some(0));
}

/// Metric family names in the table of `docs/observability.md`.
fn documented_metrics() -> std::collections::BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/observability.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(name, _)| name.to_owned())
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'*')
        })
        .collect()
}

fn family(name: &str) -> &str {
    let name = name.strip_prefix("cronguard_").unwrap_or(name);
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[tokio::test]
async fn every_exported_or_referenced_metric_is_documented() {
    let documented = documented_metrics();
    let known = |name: &str| {
        documented.contains(name) || (name.starts_with("process_") && documented.contains("process_*"))
    };
    // With a backend configured (unreachable), so its families exist too.
    let mut options = Options::default();
    options.settings.backend_url = Some("http://127.0.0.1:9/".into());
    let app = TestApp::start(options).await;
    let scrape = app.metrics().await;
    app.stop().await;
    let exported: Vec<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE cronguard_"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(exported.len() > 30, "{scrape}");
    let undocumented: Vec<_> = exported.iter().filter(|n| !known(n)).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/observability.md: {undocumented:?}"
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/cronguard.json"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let unknown: Vec<String> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("cronguard_"))
            .map(|w| family(w).to_owned())
            .filter(|n| !known(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses undocumented metrics: {unknown:?}"
        );
    }
}

#[tokio::test]
async fn a_monitored_jobs_failure_streak_is_a_series_that_survives_a_restart() {
    let app = TestApp::spawn().await;
    let failing = json!({"kind": "test", "fail_attempts": 99});
    app.create(json!({"name": "flaky", "monitor": true, "schedule": yearly(), "action": failing}))
        .await;
    app.create(json!({"name": "quiet", "schedule": yearly(), "action": {"kind": "test"}}))
        .await;
    for _ in 0..2 {
        let run = app.trigger("flaky").await;
        app.final_run(run.id).await;
    }
    let streak = r#"cronguard_job_consecutive_failures{job_name="flaky"}"#;
    let m = app.metrics().await;
    assert_eq!(sample(&m, streak), Some(2.0), "{m}");
    assert_eq!(
        sample(&m, r#"cronguard_jobs_by_health{health="failing"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"cronguard_jobs_by_health{health="pending"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&m, r#"cronguard_jobs_by_health{health="ok"}"#), Some(0.0));
    assert!(
        !m.contains(r#"job_name="quiet""#),
        "unmonitored jobs have no per-job series"
    );

    // Restarted, the streak is read back from the job's standing.
    let dir = app.dir.clone();
    app.stop().await;
    let app = TestApp::start(Options {
        dir: Some(dir),
        ..Options::default()
    })
    .await;
    let restored = eventually("the streak restored", || async {
        sample(&app.metrics().await, streak).filter(|n| *n == 2.0)
    })
    .await;
    assert_eq!(restored, 2.0);

    // A success ends it.
    let (_, job) = app.get("/v1/jobs/flaky").await;
    let mut spec = job["spec"].clone();
    spec["action"] = json!({"kind": "test"});
    let put = app
        .client
        .put(app.url("/v1/jobs/flaky"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let run = app.trigger("flaky").await;
    app.final_run(run.id).await;
    let m = app.metrics().await;
    assert_eq!(sample(&m, streak), Some(0.0), "{m}");
    assert_eq!(sample(&m, r#"cronguard_jobs_by_health{health="ok"}"#), Some(1.0));
    app.stop().await;
}
