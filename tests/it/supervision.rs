//! Supervision and orphans: the seed's failure made impossible to miss.
//! Real processes, real signals; loops made to hang or panic through the
//! `fault-injection` hooks.

use cronguard::run::RunStatus;
use std::time::{Duration, Instant};

use cronguard::fault::Fault;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::helpers::*;

fn yearly() -> Value {
    json!({"kind": "cron", "expr": "0 0 1 1 *"})
}

fn command_job(name: &str, script: &str, schedule: Value) -> Value {
    json!({
        "name": name,
        "schedule": schedule,
        "action": {"kind": "command", "program": "sh", "args": ["-c", script]},
        "policy": {"kill_grace": "1s"},
    })
}

/// Polls `/livez` until it fails; returns the verbose report and how long
/// it took.
async fn livez_turns_red(get: impl AsyncFn() -> (reqwest::StatusCode, Value)) -> (Value, Duration) {
    let started = Instant::now();
    let report = eventually("/livez to fail", || async {
        let (status, report) = get().await;
        (status == 503).then_some(report)
    })
    .await;
    (report, started.elapsed())
}

fn failing_loops(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_hung_engine_or_reaper_fails_liveness_naming_the_loop() {
    for (target, reaper_interval) in [("engine", "10s"), ("reaper", "200ms")] {
        let mut options = Options::default();
        options.settings.loop_stale_after = Some("2s".into());
        options.settings.reaper_interval = Some(reaper_interval.into());
        let app = TestApp::start(options).await;
        let (status, _) = app.get("/livez").await;
        assert_eq!(status, 200);

        app.faults.arm(target, Fault::Hang);
        let (report, took) = livez_turns_red(async || app.get("/livez?verbose").await).await;
        assert_eq!(failing_loops(&report), [format!("loop:{target}")], "{report}");
        let check = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["ok"] == false)
            .unwrap();
        assert!(
            check["reason"].as_str().unwrap().contains("stuck or dead"),
            "{check}"
        );
        let threshold = check["threshold"].as_f64().unwrap();
        assert!(
            took < Duration::from_secs_f64(threshold + 5.0),
            "{target}: red after {took:?}, threshold {threshold}s"
        );
        let (status, body) = app.get("/livez").await;
        assert_eq!(status, 503);
        assert!(
            body.as_str().unwrap().contains(&format!("loop:{target}")),
            "{body}"
        );
        // Readiness is about traffic, not liveness: it stays green.
        let (status, _) = app.get("/readyz").await;
        assert_eq!(status, 200);
        app.faults.clear();
    }
}

#[tokio::test]
async fn a_panicking_engine_restarts_is_counted_and_jobs_keep_firing() {
    let mut receiver = Receiver::start().await;
    let app = TestApp::spawn().await;
    app.create(http_job("tick", every_second(), &receiver.url("/tick")))
        .await;
    receiver.next_on("/tick").await;

    app.faults.arm("engine", Fault::Panic);
    let metrics = eventually("the engine restart to be counted", || async {
        let m = app.metrics().await;
        (sample(&m, "cronguard_loop_restarts_total{loop=\"engine\"}") == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(
        sample(&metrics, "cronguard_loop_healthy{loop=\"engine\"}"),
        Some(1.0)
    );

    // Fires continue after the restart, without duplicates.
    receiver.drain();
    let a = receiver.next_on("/tick").await.scheduled_at();
    let b = receiver.next_on("/tick").await.scheduled_at();
    assert!(b > a);
    let (status, _) = app.get("/livez").await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_panicking_action_is_a_failed_run_and_nothing_else() {
    let app = TestApp::spawn().await;
    app.create(json!({
        "name": "boom",
        "schedule": yearly(),
        "action": {"kind": "test", "panic": "the action blew up"},
    }))
    .await;
    let run = app.trigger("boom").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error.as_deref().unwrap().contains("the action blew up"),
        "{run:?}"
    );
    // The service is unaffected: it still answers and runs jobs.
    let again = app.trigger("boom").await;
    assert_eq!(app.final_run(again.id).await.status, RunStatus::Failed);
    let (status, _) = app.get("/livez").await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_timed_out_command_takes_its_whole_process_group_with_it() {
    let app = TestApp::start(Options::commands()).await;
    let mut spec = command_job("sleepy", "sleep 300 & sleep 300; wait", yearly());
    spec["action"]["timeout"] = json!("1s");
    app.create(spec).await;
    let run = app.trigger("sleepy").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::TimedOut, "{run:?}");
    let pgid = run.pgid.unwrap() as i32;
    let members: Vec<_> = cronguard::procfs::all()
        .into_iter()
        .filter(|p| p.pgid == pgid && !p.is_zombie())
        .collect();
    assert!(
        members.is_empty(),
        "process group {pgid} still has members: {members:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_daemonized_grandchild_is_found_as_a_stray_and_reaped() {
    let dir = tempfile::tempdir().unwrap();
    let service = Binary::start(
        dir.path(),
        &["--enable-command-jobs", "--reaper-interval", "300ms"],
    )
    .await;
    let (status, _) = service
        .post(
            "/v1/jobs",
            // Start a grandchild in its own session and report its pid once
            // setsid took effect (field 6 of /proc/PID/stat is the session).
            command_job(
                "daemon",
                "setsid sleep 300 & until [ \"$(cut -d' ' -f6 /proc/$!/stat)\" = \"$!\" ]; do :; done; echo $!",
                yearly(),
            ),
        )
        .await;
    assert_eq!(status, 201);
    let (_, run) = service.post("/v1/jobs/daemon/trigger", json!(null)).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let run = eventually("the run to end", || async {
        let (_, r) = service.get(&format!("/v1/runs/{id}")).await;
        (r["status"] != "running").then_some(r)
    })
    .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let grandchild: i32 = run["output"].as_str().unwrap().trim().parse().unwrap();

    let finding = eventually("the stray to be found", || async {
        let (_, report) = service.get("/v1/orphans").await;
        report["recent"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["pid"] == grandchild)
            .cloned()
    })
    .await;
    assert_eq!(finding["kind"], "stray_process");
    assert_eq!(finding["remedy"], "killed");
    assert_eq!(finding["run"], json!(id));
    eventually("the grandchild to be gone, not a zombie", || async {
        cronguard::procfs::read(grandchild).is_none().then_some(())
    })
    .await;
    let (_, metrics) = service.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert_eq!(
        sample(
            &metrics,
            "cronguard_orphans_detected_total{kind=\"stray_process\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "cronguard_stray_processes_killed_total"),
        Some(1.0)
    );
}

/// A run that leaves a daemon behind (its own session) and succeeds; the
/// daemon's pid. The reaper would find it at its next pass: the interval
/// is an hour, so only the stop or the next start can.
async fn run_leaving_a_daemon(service: &Binary, name: &str) -> (String, i32) {
    let (status, _) = service
        .post(
            "/v1/jobs",
            command_job(
                name,
                "setsid sleep 300 & until [ \"$(cut -d' ' -f6 /proc/$!/stat)\" = \"$!\" ]; do :; done; echo $!",
                yearly(),
            ),
        )
        .await;
    assert_eq!(status, 201);
    let (_, run) = service
        .post(&format!("/v1/jobs/{name}/trigger"), json!(null))
        .await;
    let id = run["id"].as_str().unwrap().to_owned();
    let run = final_run(&service.url(""), &id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let daemon: i32 = run.output.as_deref().unwrap().trim().parse().unwrap();
    assert!(!process_dead(daemon), "the daemon runs after its run ended");
    (id, daemon)
}

#[tokio::test]
async fn a_graceful_stop_leaves_no_escaped_descendant() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--enable-command-jobs", "--reaper-interval", "1h"];
    let mut service = Binary::start(dir.path(), &args).await;
    let mut daemons = Vec::new();
    for i in 0..3 {
        daemons.push(run_leaving_a_daemon(&service, &format!("daemon{i}")).await.1);
    }
    service.signal(Signal::SIGTERM);
    assert_eq!(service.wait().await, Some(0));
    for pid in daemons {
        assert!(process_dead(pid), "daemon {pid} outlived the service");
    }
}

#[tokio::test]
async fn after_kill_9_the_next_start_kills_escapees_of_ended_runs() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--enable-command-jobs", "--reaper-interval", "1h"];
    let mut first = Binary::start(dir.path(), &args).await;
    let (run, daemon) = run_leaving_a_daemon(&first, "daemon").await;
    first.signal(Signal::SIGKILL);
    first.wait().await;
    assert!(!process_dead(daemon), "kill -9 left the daemon to init");

    let second = Binary::start(dir.path(), &args).await;
    eventually("the escapee to be killed", || async {
        process_dead(daemon).then_some(())
    })
    .await;
    let (_, report) = second.get("/v1/orphans").await;
    let finding = report["recent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["pid"] == daemon)
        .cloned()
        .unwrap_or_else(|| panic!("no finding for {daemon}: {report}"));
    assert_eq!(finding["kind"], "previous_incarnation", "{finding}");
    assert_eq!(finding["remedy"], "killed", "{finding}");
    assert_eq!(finding["run"], json!(run), "{finding}");
    let m = second.metrics().await;
    assert_eq!(
        sample(
            &m,
            "cronguard_orphans_detected_total{kind=\"previous_incarnation\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn kill_9_leaves_no_child_alive_and_the_next_start_accounts_for_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--enable-command-jobs", "--shutdown-grace", "1s"];
    let mut first = Binary::start(dir.path(), &args).await;
    for i in 0..5 {
        let (status, _) = first
            .post(
                "/v1/jobs",
                command_job(&format!("long{i}"), "sleep 300", every_second()),
            )
            .await;
        assert_eq!(status, 201);
    }
    let runs = eventually("5 runs with their processes", || async {
        let (_, page) = first.get("/v1/runs?status=running").await;
        let runs: Vec<Value> = page["items"].as_array().unwrap().clone();
        (runs.len() == 5 && runs.iter().all(|r| r["pid"].is_i64())).then_some(runs)
    })
    .await;
    let pids: Vec<i32> = runs.iter().map(|r| r["pid"].as_i64().unwrap() as i32).collect();
    let run_ids: Vec<cronguard::run::RunId> = runs
        .iter()
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect();
    // The recorded leaders are shims; the `sleep`s are their grandchildren.
    assert!(
        run_ids
            .iter()
            .all(|id| cronguard::procfs::by_run().contains_key(id))
    );

    first.signal(Signal::SIGKILL);
    first.wait().await;
    let killed_at = Instant::now();
    eventually("every child of the killed service to die", || async {
        let survivors = cronguard::procfs::by_run();
        (pids.iter().all(|pid| process_dead(*pid)) && run_ids.iter().all(|id| !survivors.contains_key(id)))
            .then_some(())
    })
    .await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "children outlived the service by {took:?}"
    );

    let second = Binary::start(dir.path(), &args).await;
    for run in &runs {
        let (_, r) = second
            .get(&format!("/v1/runs/{}", run["id"].as_str().unwrap()))
            .await;
        assert_eq!(r["status"], "orphaned", "{r}");
    }
    let (_, metrics) = second.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert_eq!(
        sample(
            &metrics,
            "cronguard_orphans_detected_total{kind=\"previous_incarnation\"}"
        ),
        Some(5.0)
    );
    // The jobs fire again: a new live run for each, in the new incarnation.
    eventually("the jobs to fire again", || async {
        let (_, page) = second.get("/v1/runs?status=running").await;
        (page["items"].as_array().unwrap().len() == 5).then_some(())
    })
    .await;
}

/// A run row naming a live process that is not the service's child, as if
/// an earlier incarnation had started it.
async fn foreign_orphan(dir: &std::path::Path, policy: &str) -> (Binary, std::process::Child, String) {
    let mut first = Binary::start(dir, &[]).await;
    let (_, job) = first
        .post("/v1/jobs", http_job("victim", yearly(), "http://127.0.0.1:9/"))
        .await;
    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait().await, Some(0));

    let mut sleeper = std::process::Command::new("sleep");
    std::os::unix::process::CommandExt::process_group(&mut sleeper, 0);
    let sleeper = sleeper.arg("300").spawn().unwrap();
    let pid = sleeper.id() as i32;
    let ticks = cronguard::procfs::read(pid).unwrap().start_ticks;
    let run_id = uuid::Uuid::now_v7().to_string();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("cronguard.db").display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO runs (id, job_id, job_name, scheduled_at, status, trigger, created_at, started_at, attempts, \
         pid, pgid, process_start_ticks, incarnation) VALUES (?, ?, 'victim', 0, 'running', 'manual', 0, 0, 1, ?, ?, ?, ?)",
    )
    .bind(&run_id)
    .bind(job["id"].as_str().unwrap())
    .bind(pid)
    .bind(pid)
    .bind(ticks as i64)
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let second = Binary::start(dir, &["--orphan-policy", policy]).await;
    (second, sleeper, run_id)
}

#[tokio::test]
async fn a_previous_incarnations_live_process_is_killed_or_reported_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (service, mut sleeper, run_id) = foreign_orphan(dir.path(), "kill").await;
    let pid = sleeper.id() as i32;
    let (_, run) = service.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "orphaned");
    let status = within("the orphan to be killed", async {
        tokio::task::spawn_blocking(move || sleeper.wait()).await
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    let (_, report) = service.get("/v1/orphans").await;
    let finding = &report["recent"][0];
    assert_eq!(
        (finding["kind"].as_str(), finding["remedy"].as_str()),
        (Some("previous_incarnation"), Some("killed"))
    );
    assert_eq!(finding["pid"], pid);
    drop(service);

    let dir = tempfile::tempdir().unwrap();
    let (service, mut sleeper, run_id) = foreign_orphan(dir.path(), "report").await;
    let pid = sleeper.id() as i32;
    let (_, run) = service.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(run["status"], "orphaned");
    assert!(!process_dead(pid), "policy `report` leaves the process alone");
    let (_, report) = service.get("/v1/orphans").await;
    assert_eq!(report["current"][0]["pid"], pid, "{report}");
    assert_eq!(report["current"][0]["remedy"], "reported");
    let (_, metrics) = service.get("/metrics").await;
    assert_eq!(
        sample(
            metrics.as_str().unwrap(),
            "cronguard_orphans{kind=\"previous_incarnation\"}"
        ),
        Some(1.0)
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[tokio::test]
async fn sigterm_drains_within_grace_and_records_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Binary::start(dir.path(), &["--enable-command-jobs", "--shutdown-grace", "2s"]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        // Ignores SIGTERM: only the SIGKILL after the kill grace ends it.
        let (status, _) = service
            .post(
                "/v1/jobs",
                command_job(&format!("stubborn{i}"), "trap '' TERM; sleep 300", yearly()),
            )
            .await;
        assert_eq!(status, 201);
        let (_, run) = service
            .post(&format!("/v1/jobs/stubborn{i}/trigger"), json!(null))
            .await;
        ids.push(run["id"].as_str().unwrap().to_owned());
    }
    eventually("the runs to have processes", || async {
        let (_, page) = service.get("/v1/runs?status=running").await;
        let items = page["items"].as_array().unwrap();
        (items.len() == 3 && items.iter().all(|r| r["pid"].is_i64())).then_some(())
    })
    .await;

    let started = Instant::now();
    service.signal(Signal::SIGTERM);
    assert_eq!(service.wait().await, Some(0));
    let took = started.elapsed();
    // shutdown_grace 2s + kill_grace 1s + 1s.
    assert!(took < Duration::from_secs(4), "took {took:?}");

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", service.db.display()))
        .await
        .unwrap();
    for id in ids {
        let (status, reason): (String, Option<String>) =
            sqlx::query_as("SELECT status, reason FROM runs WHERE id = ?")
                .bind(&id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (status.as_str(), reason.as_deref()),
            ("cancelled", Some("shutdown"))
        );
    }
}

#[tokio::test]
async fn the_reaper_finds_runs_without_tasks_and_tasks_without_runs() {
    use cronguard::clock::{Clock, ManualClock};
    let clock = ManualClock::new(t0());
    let mut options = Options::manual_clock(&clock);
    options.settings.reaper_interval = Some("100ms".into());
    let app = TestApp::start(options).await;

    // Kind 3, stuck: a run that ignores cancellation past deadline + grace.
    app.create(json!({
        "name": "stuck",
        "schedule": yearly(),
        "action": {"kind": "test", "sleep": "10h", "ignore_cancel": true, "timeout": "1m"},
        "policy": {"kill_grace": "1s"},
    }))
    .await;
    let stuck = app.trigger("stuck").await;
    let stuck_id = stuck.id;
    clock.advance(Duration::from_secs(120));
    let run = app.final_run(&stuck_id).await;
    assert_eq!(run.status, RunStatus::TimedOut, "{run:?}");
    assert!(
        run.error.as_deref().unwrap().contains("ignored cancellation"),
        "{run:?}"
    );

    // Kind 3, run gone: the job (and its history) is deleted under a run
    // that ignores its cancellation.
    app.create(json!({
        "name": "doomed",
        "schedule": yearly(),
        "action": {"kind": "test", "sleep": "10h", "ignore_cancel": true},
    }))
    .await;
    let doomed = app.trigger("doomed").await;
    let doomed_id = doomed.id;
    let r = app
        .client
        .delete(app.url("/v1/jobs/doomed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // Kind 2: a row says running in this incarnation, but no task owns it.
    let (_, job) = app.get("/v1/jobs/stuck").await;
    let ghost = uuid::Uuid::now_v7().to_string();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", app.db.display()))
        .await
        .unwrap();
    let (incarnation,): (String,) = sqlx::query_as("SELECT id FROM incarnations WHERE stopped_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO runs (id, job_id, job_name, scheduled_at, status, trigger, created_at, attempts, incarnation) \
         VALUES (?, ?, 'stuck', 1, 'running', 'manual', 1, 1, ?)",
    )
    .bind(&ghost)
    .bind(job["id"].as_str().unwrap())
    .bind(&incarnation)
    .execute(&pool)
    .await
    .unwrap();

    let report = eventually("the reaper to report every kind", || async {
        let (_, report) = app.get("/v1/orphans").await;
        let recent = report["recent"].as_array().unwrap().clone();
        let has = |kind: &str, run: &dyn std::fmt::Display| {
            recent
                .iter()
                .any(|f| f["kind"] == kind && f["run"] == run.to_string())
        };
        (has("task_without_run", &stuck_id)
            && has("task_without_run", &doomed_id)
            && has("run_without_task", &ghost))
        .then_some(report)
    })
    .await;
    assert_eq!(report["current"], json!([]));
    let (_, ghost_run) = app.get(&format!("/v1/runs/{ghost}")).await;
    assert_eq!(ghost_run["status"], "orphaned");
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "cronguard_orphans_detected_total{kind=\"task_without_run\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "cronguard_orphans_detected_total{kind=\"run_without_task\"}"
        ),
        Some(1.0)
    );
    assert_eq!(clock.now(), t0() + chrono::TimeDelta::seconds(120));
    app.stop().await;
}

#[tokio::test]
async fn a_second_signal_kills_every_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Binary::start(dir.path(), &["--enable-command-jobs", "--shutdown-grace", "60s"]).await;
    let (status, _) = service
        .post(
            "/v1/jobs",
            command_job("stubborn", "trap '' TERM; sleep 300", yearly()),
        )
        .await;
    assert_eq!(status, 201);
    let (_, run) = service.post("/v1/jobs/stubborn/trigger", json!(null)).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let pid = eventually("the run's process", || async {
        let (_, r) = service.get(&format!("/v1/runs/{id}")).await;
        r["pid"].as_i64()
    })
    .await as i32;

    let started = Instant::now();
    service.signal(Signal::SIGTERM);
    service.log_line("SIGTERM received").await;
    service.signal(Signal::SIGTERM);
    assert_eq!(service.wait().await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the 60s grace was not skipped"
    );
    // SIGKILL from the parent-death signal lands as the service exits; the
    // kernel tears the process down a moment later on a busy machine.
    eventually("the run's process to die", || async {
        process_dead(pid).then_some(())
    })
    .await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", service.db.display()))
        .await
        .unwrap();
    let (status,): (String,) = sqlx::query_as("SELECT status FROM runs WHERE id = ?")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "cancelled");
}
