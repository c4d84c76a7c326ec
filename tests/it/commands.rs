//! Command actions: exit codes, output capture, environment, the switch.

use cronguard::run::{Run, RunStatus};
use serde_json::json;

use crate::helpers::*;

fn command_job(name: &str, program: &str, args: &[&str]) -> serde_json::Value {
    json!({
        "name": name,
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {"kind": "command", "program": program, "args": args},
    })
}

#[tokio::test]
async fn a_failing_command_records_exit_code_and_output() {
    let app = TestApp::start(Options::commands()).await;
    app.create(command_job("hi", "sh", &["-c", "echo hi; exit 3"]))
        .await;
    let run = app.trigger("hi").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.exit_code, Some(3));
    assert_eq!(run.output.as_deref(), Some("hi\n"));
    assert!(run.pid.unwrap() > 0);
    assert_eq!(run.pid, run.pgid, "the child leads its own process group");
    app.stop().await;
}

#[tokio::test]
async fn commands_get_their_identity_and_a_bounded_tail() {
    let mut options = Options::commands();
    options.settings.output_tail_bytes = Some(1000);
    let app = TestApp::start(options).await;
    let job = app
        .create(command_job(
            "env",
            "sh",
            &[
                "-c",
                "echo \"$CRONGUARD_JOB $CRONGUARD_RUN $CRONGUARD_SCHEDULED_AT\"; echo oops >&2",
            ],
        ))
        .await;
    let run = app.trigger("env").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let out = run.output.as_deref().unwrap();
    // stdout and stderr are kept apart, each its own tail.
    let line = out.lines().next().unwrap();
    let fields: Vec<_> = line.split(' ').collect();
    assert_eq!(fields[..2], [job.id.to_string(), run.id.to_string()], "{out}");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(fields[2]).unwrap(),
        run.scheduled_at
    );
    assert!(!out.contains("oops"), "{out}");
    assert_eq!(run.stderr.as_deref(), Some("oops\n"), "stderr is captured apart");

    // 200 kB of output: the run ends (the pipe is drained) and keeps the tail.
    app.create(command_job(
        "chatty",
        "sh",
        &["-c", "yes 0123456789 | head -c 200000; echo END"],
    ))
    .await;
    let run = app.trigger("chatty").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Succeeded);
    let out = run.output.as_deref().unwrap();
    assert!(out.starts_with("[199"), "{}", &out[..60]);
    assert!(out.ends_with("END\n"));
    assert!(out.len() < 1100);

    // A missing program is a failed run, not a crash.
    app.create(command_job("missing", "/nonexistent/program", &[]))
        .await;
    let run = app.trigger("missing").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error.as_deref().unwrap().contains("could not start"),
        "{run:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn command_jobs_are_refused_unless_enabled() {
    let app = TestApp::spawn().await;
    let (status, problem) = app.post("/v1/jobs", command_job("no", "true", &[])).await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["pointer"], "/action/kind");
    app.stop().await;
}

/// A job whose program writes `marker` from its TERM handler and exits 0.
fn term_handler_job(name: &str, marker: &std::path::Path, timeout: &str) -> serde_json::Value {
    let script = format!(
        "trap 'echo got-term > {}; exit 0' TERM; sleep 100 & wait",
        marker.display()
    );
    json!({
        "name": name,
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        // A long grace: a run that ends before it was ended by SIGTERM.
        "policy": {"kill_grace": "60s"},
        "action": {"kind": "command", "program": "bash", "args": ["-c", script], "timeout": timeout},
    })
}

/// The program's pid under the run's leader (the shim), once it runs: once
/// the child has executed the program, not while it is still the shim's
/// fork (which holds the shim's signal mask until it execs).
async fn program_of(app: &TestApp, run: impl std::fmt::Display) -> i32 {
    eventually("the program under the shim", || async {
        let (_, r) = app.get(&format!("/v1/runs/{run}")).await;
        let leader = r["pid"].as_i64()?;
        let children = std::fs::read_to_string(format!("/proc/{leader}/task/{leader}/children")).ok()?;
        let child: i32 = children.split_whitespace().next()?.parse().ok()?;
        let exe = |pid: i64| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let program = exe(child.into())?;
        (Some(&program) != exe(leader).as_ref()).then_some(child)
    })
    .await
}

/// Waits until the term-handler script has set its trap: it starts its
/// `sleep` only after (a SIGTERM before the trap would kill bash outright).
async fn trap_set(app: &TestApp, run: impl std::fmt::Display) {
    let program = program_of(app, run).await;
    eventually("the script's sleep", || async {
        let children = std::fs::read_to_string(format!("/proc/{program}/task/{program}/children")).ok()?;
        (!children.trim().is_empty()).then_some(())
    })
    .await;
}

fn blocked_signals(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .unwrap()
        .trim()
        .to_owned()
}

fn ran_for(run: &Run) -> chrono::TimeDelta {
    run.ended_at.unwrap() - run.started_at.unwrap()
}

#[tokio::test]
async fn a_programs_term_handler_runs_on_timeout_cancel_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start(Options::commands()).await;

    // A program that does not touch its mask shows what it started with
    // (bash blocks SIGCHLD itself while it waits).
    app.create(command_job("sleeper", "sleep", &["30"])).await;
    let run = app.trigger("sleeper").await;
    let id = run.id;
    let program = program_of(&app, &id).await;
    assert_eq!(
        blocked_signals(program),
        "0000000000000000",
        "the program starts with nothing blocked"
    );
    app.post_empty(&format!("/v1/runs/{id}/cancel")).await;
    app.final_run(&id).await;

    // Timeout.
    let marker = dir.path().join("timeout");
    app.create(term_handler_job("on-timeout", &marker, "5s")).await;
    let run = app.trigger("on-timeout").await;
    let id = run.id;
    let run = app.final_run(&id).await;
    assert_eq!(run.status, RunStatus::TimedOut, "{run:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "got-term\n");
    assert!(
        ran_for(&run) < chrono::TimeDelta::seconds(30),
        "ended by SIGTERM, not after the 60 s grace: {run:?}"
    );

    // Cancel.
    let marker = dir.path().join("cancel");
    app.create(term_handler_job("on-cancel", &marker, "1h")).await;
    let run = app.trigger("on-cancel").await;
    let id = run.id;
    trap_set(&app, &id).await;
    let (status, _) = app.post_empty(&format!("/v1/runs/{id}/cancel")).await;
    assert!(status.is_success(), "{status}");
    let run = app.final_run(&id).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "got-term\n");
    assert!(ran_for(&run) < chrono::TimeDelta::seconds(30), "{run:?}");

    // Shutdown.
    let marker = dir.path().join("shutdown");
    app.create(term_handler_job("on-shutdown", &marker, "1h")).await;
    let run = app.trigger("on-shutdown").await;
    let id = run.id;
    trap_set(&app, &id).await;
    app.stop().await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "got-term\n");
}
