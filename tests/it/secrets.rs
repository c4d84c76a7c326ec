//! Secrets never travel: not to a destination their owner did not choose,
//! not in an answer, a log line, a metric or an error.

use cronguard::run::RunStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

const READ: &str = "reader-0123456789abcdef";
const WRITE: &str = "writer-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef0";
const SEEDED: &str = "seeded-secret-5f1e2d";

fn tokens() -> Vec<&'static str> {
    vec![
        "--token",
        "reader:read:reader-0123456789abcdef",
        "--token",
        "writer:write:writer-0123456789abcdef",
        "--token",
        "ops:admin:admin-0123456789abcdef0",
        "--enable-command-jobs",
    ]
}

async fn call(
    service: &Binary,
    method: Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = client().request(method, service.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    read(request.send().await.expect("request")).await
}

#[tokio::test]
async fn a_kept_secret_never_follows_a_changed_destination() {
    let mut receiver = Receiver::start().await;
    let thief = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = tokens();
    args.extend(["--log", "trace"]);
    let service = Binary::start_with_env(dir.path(), &args, &[("CRONGUARD_SECRET_API", SEEDED)]).await;
    let spec = json!({
        "name": "guarded",
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {"kind": "http", "url": receiver.url("/hook"),
                   "headers": {"Authorization": "Bearer inline-secret-91"}}
    });
    let (status, _) = call(&service, Method::POST, "/v1/jobs", ADMIN, Some(&spec)).await;
    assert_eq!(status, 201);

    // A write token reads the job (redacted) and points it elsewhere.
    let (_, job) = call(&service, Method::GET, "/v1/jobs/guarded", WRITE, None).await;
    assert_eq!(job["spec"]["action"]["headers"]["Authorization"], "<redacted>");
    for token in [WRITE, ADMIN] {
        for url in [
            thief.url("/steal"),
            receiver.url("/hook").replace("http://", "https://"),
            receiver.url("/hook").replace("127.0.0.1", "localhost"),
        ] {
            let mut back = job["spec"].clone();
            back["action"]["url"] = json!(url);
            let (status, problem) = call(&service, Method::PUT, "/v1/jobs/guarded", token, Some(&back)).await;
            assert_eq!(status, 422, "{url}: {problem}");
            assert_eq!(problem["errors"][0]["pointer"], "/action/headers/Authorization");
            assert!(
                problem["errors"][0]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("changed destination")
            );
        }
    }
    // The same origin keeps it (a path change is not a new destination).
    let mut back = job["spec"].clone();
    back["action"]["url"] = json!(receiver.url("/other"));
    let (status, _) = call(&service, Method::PUT, "/v1/jobs/guarded", WRITE, Some(&back)).await;
    assert_eq!(status, 200);
    call(&service, Method::POST, "/v1/jobs/guarded/trigger", WRITE, None).await;
    assert_eq!(
        receiver.next_on("/other").await.header("authorization"),
        "Bearer inline-secret-91"
    );

    // The operator's secrets: a write token may not reference one, nor
    // point a job that references one elsewhere.
    let mut referencing = spec.clone();
    referencing["name"] = json!("referencing");
    referencing["action"]["headers"] = json!({"X-Key": "${CRONGUARD_SECRET_API}"});
    referencing["action"]["url"] = json!(thief.url("/steal"));
    let (status, problem) = call(&service, Method::POST, "/v1/jobs", WRITE, Some(&referencing)).await;
    assert_eq!(status, 403, "{problem}");
    referencing["action"]["url"] = json!(receiver.url("/ref"));
    let (status, _) = call(&service, Method::POST, "/v1/jobs", ADMIN, Some(&referencing)).await;
    assert_eq!(status, 201);
    referencing["action"]["url"] = json!(thief.url("/steal"));
    let (status, _) = call(
        &service,
        Method::PUT,
        "/v1/jobs/referencing",
        WRITE,
        Some(&referencing),
    )
    .await;
    assert_eq!(status, 403);
    referencing["action"]["url"] = json!(receiver.url("/ref2"));
    referencing["description"] = json!("same origin, same reference");
    let (status, body) = call(
        &service,
        Method::PUT,
        "/v1/jobs/referencing",
        WRITE,
        Some(&referencing),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Command environments are redacted for everyone and follow the same rule.
    let command = json!({
        "name": "cmd",
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {"kind": "command", "program": "true", "env": {"TOKEN": SEEDED}}
    });
    let (status, _) = call(&service, Method::POST, "/v1/jobs", ADMIN, Some(&command)).await;
    assert_eq!(status, 201);
    let (_, shown) = call(&service, Method::GET, "/v1/jobs/cmd", READ, None).await;
    assert_eq!(shown["spec"]["action"]["env"]["TOKEN"], "<redacted>");
    let mut back = shown["spec"].clone();
    back["action"]["program"] = json!("env");
    let (status, problem) = call(&service, Method::PUT, "/v1/jobs/cmd", ADMIN, Some(&back)).await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["pointer"], "/action/env/TOKEN");
    let mut back = shown["spec"].clone();
    back["description"] = json!("kept");
    let (status, _) = call(&service, Method::PUT, "/v1/jobs/cmd", ADMIN, Some(&back)).await;
    assert_eq!(status, 200);

    // Nothing the thief could use reached it, and no answer shows a secret.
    assert!(thief_saw_nothing(thief));
    for path in ["/v1/jobs", "/v1/runs", "/v1/status", "/metrics"] {
        let (_, body) = call(&service, Method::GET, path, ADMIN, None).await;
        assert!(
            !body.to_string().contains(SEEDED) && !body.to_string().contains("inline-secret-91"),
            "{path}"
        );
    }
    let mut service = service;
    service.signal(nix::sys::signal::Signal::SIGTERM);
    let logs = service.drain_logs().await;
    assert!(!logs.contains(SEEDED) && !logs.contains("inline-secret-91"));
}

fn thief_saw_nothing(mut thief: Receiver) -> bool {
    thief.drain().is_empty()
}

#[tokio::test]
async fn secrets_in_urls_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let service = Binary::start(dir.path(), &["--log", "trace"]).await;
    let yearly = |name: &str, url: String| http_job(name, json!({"kind": "cron", "expr": "0 0 1 1 *"}), &url);
    // Credentials in a URL are refused: every reader would see them.
    let (status, problem) = service
        .post(
            "/v1/jobs",
            yearly("userinfo", format!("http://user:{SEEDED}@127.0.0.1:9/")),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["pointer"], "/action/url");
    assert!(!problem.to_string().contains(SEEDED));

    // A secret in the query string stays out of run errors and logs.
    let (status, _) = service
        .post(
            "/v1/jobs",
            yearly("query", format!("http://127.0.0.1:1/x?api_key={SEEDED}")),
        )
        .await;
    assert_eq!(status, 201);
    let (_, run) = service.post("/v1/jobs/query/trigger", json!(null)).await;
    let run = final_run(&service.base, run["id"].as_str().unwrap()).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(!run.error.as_deref().unwrap().contains(SEEDED), "{run:?}");
    let (_, runs) = service.get("/v1/runs").await;
    assert!(!runs.to_string().contains(SEEDED));
    let mut service = service;
    service.signal(nix::sys::signal::Signal::SIGTERM);
    let logs = service.drain_logs().await;
    assert!(logs.contains("run ended"), "logs were captured");
    assert!(!logs.contains(SEEDED), "a secret reached the log");
}

#[tokio::test]
async fn migrate_never_prints_a_database_password() {
    let Some(server) = tokio::task::spawn_blocking(postgres_server).await.unwrap() else {
        eprintln!("SKIPPED secrets::migrate_never_prints_a_database_password: no PostgreSQL");
        return;
    };
    use sqlx::Connection;
    let name = format!("cronguard_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&server).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, _) = server.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}").replace("postgres@", &format!("postgres:{SEEDED}@"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
        .args(["migrate", "--database", &url])
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("schema up to date"), "{printed}");
    assert!(!printed.contains(SEEDED), "{printed}");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut conn)
        .await
        .unwrap();
}
