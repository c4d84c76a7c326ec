//! The API as a security boundary: authentication, authorisation,
//! dangerous actions, secrets, hostile input.

use cronguard::run::RunStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

const READ: &str = "reader-0123456789abcdef";
const WRITE: &str = "writer-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef0";

fn with_tokens(mut options: Options) -> Options {
    options.settings.tokens = Some(vec![
        format!("ci-reader:read:{READ}"),
        format!("ci-writer:write:{WRITE}"),
        format!("ops:admin:{ADMIN}"),
    ]);
    options
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut request = app.client.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn every_route_against_every_identity() {
    let app = TestApp::start(with_tokens(Options::default())).await;
    let job =
        json!({"name": "m", "schedule": {"kind": "cron", "expr": "0 0 1 1 *"}, "action": {"kind": "test"}});
    let r = call(&app, Method::POST, "/v1/jobs", Some(ADMIN), Some(&job)).await;
    assert_eq!(r.status(), 201);
    let r = call(&app, Method::POST, "/v1/jobs/m/trigger", Some(ADMIN), None).await;
    let (_, run) = read(r).await;
    let run_id = run["id"].as_str().unwrap().to_owned();

    // Every documented operation, plus the undocumented endpoints.
    let doc: Value = serde_json::from_str(&cronguard::api::openapi::document()).unwrap();
    let mut routes: Vec<(Method, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{job}", "m").replace("{run}", &run_id);
            routes.push((method.to_uppercase().parse().unwrap(), concrete));
        }
    }
    routes.push((Method::GET, "/openapi.json".into()));
    routes.push((Method::GET, "/docs".into()));
    routes.push((Method::POST, "/debug/faults".into()));
    routes.push((Method::GET, "/v1/no-such-route".into()));
    // Deleting last keeps the job for the other routes.
    routes.sort_by_key(|(m, _)| *m == Method::DELETE);

    let public = ["/livez", "/readyz", "/metrics", "/openapi.json", "/docs"];
    let identities: [(&str, Option<&str>, u8); 5] = [
        ("none", None, 0),
        ("wrong", Some("not-a-token-0123456789"), 0),
        ("read", Some(READ), 1),
        ("write", Some(WRITE), 2),
        ("admin", Some(ADMIN), 3),
    ];
    for (method, path) in &routes {
        let needed = if public.contains(&path.as_str()) {
            0
        } else if path.starts_with("/debug/") {
            3
        } else if *method == Method::GET || path == "/v1/schedules/preview" {
            1
        } else {
            2
        };
        let body = json!({});
        for (who, token, level) in identities {
            let r = call(&app, method.clone(), path, token, Some(&body)).await;
            let status = r.status();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned());
            let what = format!("{method} {path} as {who}");
            if needed == 0 || level >= needed {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{what}: {status}"
                );
            } else if token.is_none() || level == 0 {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                let challenge = challenge.unwrap_or_default();
                assert!(
                    challenge.starts_with("Bearer realm=\"cronguard\""),
                    "{what}: {challenge}"
                );
                assert_eq!(
                    challenge.contains("invalid_token"),
                    token.is_some(),
                    "{what}: {challenge}"
                );
                let (_, problem) = read(r).await;
                assert_eq!(problem["type"], "urn:cronguard:problem:unauthorized", "{what}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                assert!(
                    challenge.unwrap_or_default().contains("insufficient_scope"),
                    "{what}"
                );
            }
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn command_actions_need_admin_and_the_allowlist() {
    let mut options = with_tokens(Options::commands());
    options.settings.command_allowlist = Some(vec!["true".into(), "/bin/echo".into()]);
    let app = TestApp::start(options).await;
    let job = |name: &str, program: &str| {
        json!({"name": name, "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
               "action": {"kind": "command", "program": program}})
    };
    let r = call(
        &app,
        Method::POST,
        "/v1/jobs",
        Some(WRITE),
        Some(&job("a", "true")),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "write scope cannot create command jobs"
    );
    let r = call(
        &app,
        Method::POST,
        "/v1/jobs",
        Some(ADMIN),
        Some(&job("a", "false")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, problem) = read(r).await;
    assert_eq!(problem["errors"][0]["pointer"], "/action/program");
    let r = call(
        &app,
        Method::POST,
        "/v1/jobs",
        Some(ADMIN),
        Some(&job("a", "/bin/echo")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // A writer may still trigger it, but not change it.
    let r = call(&app, Method::POST, "/v1/jobs/a/trigger", Some(WRITE), None).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = call(
        &app,
        Method::PUT,
        "/v1/jobs/a",
        Some(WRITE),
        Some(&job("a", "true")),
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    app.stop().await;
}

#[tokio::test]
async fn the_service_refuses_an_open_api_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
        .args(["serve", "--listen", "0.0.0.0:0", "--database"])
        .arg(dir.path().join("x.db"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid setting `listen`") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.db").exists(), "nothing started");

    // With a token, or explicitly open, it starts.
    let mut service = Binary::start(dir.path(), &["--insecure-no-auth"]).await;
    service.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(service.wait().await, Some(0));
}

#[tokio::test]
async fn secrets_are_referenced_redacted_and_never_logged() {
    let mut receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let service = Binary::start_with_env(
        dir.path(),
        &["--log", "debug"],
        &[("CRONGUARD_SECRET_API_KEY", "from-the-environment-42")],
    )
    .await;
    let spec = json!({
        "name": "secretive",
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {
            "kind": "http",
            "url": receiver.url("/hook"),
            "headers": {
                "Authorization": "Bearer inline-secret-value-7",
                "X-Api-Token": "${CRONGUARD_SECRET_API_KEY}",
                "X-Plain": "visible"
            },
            "secret_headers": ["X-Api-Token"]
        }
    });
    let (status, created) = service.post("/v1/jobs", spec).await;
    assert_eq!(status, 201, "{created}");
    let headers = &created["spec"]["action"]["headers"];
    assert_eq!(headers["Authorization"], "<redacted>");
    assert_eq!(headers["X-Api-Token"], "<redacted>");
    assert_eq!(headers["X-Plain"], "visible");
    let (_, listed) = service.get("/v1/jobs").await;
    assert!(!listed.to_string().contains("inline-secret-value-7"));

    // Send the job back as read (redacted), changing something else.
    let mut back = created["spec"].clone();
    back["description"] = json!("changed");
    let r = client()
        .put(service.url("/v1/jobs/secretive"))
        .json(&back)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    service.post("/v1/jobs/secretive/trigger", json!(null)).await;
    let hit = receiver.next_on("/hook").await;
    assert_eq!(hit.header("authorization"), "Bearer inline-secret-value-7");
    assert_eq!(hit.header("x-api-token"), "from-the-environment-42");

    // Nothing secret in the run or the logs.
    let (_, runs) = service.get("/v1/runs").await;
    assert!(!runs.to_string().contains("inline-secret-value-7"));
    let mut service = service;
    service.signal(nix::sys::signal::Signal::SIGTERM);
    let logs = service.drain_logs().await;
    assert!(logs.contains("job created"), "logs were captured");
    assert!(!logs.contains("inline-secret-value-7") && !logs.contains("from-the-environment-42"));
    assert!(!logs.contains(READ) && !logs.contains(ADMIN));
}

#[tokio::test]
async fn the_ssrf_guard_refuses_private_addresses() {
    let mut receiver = Receiver::start().await;
    let mut options = Options::default();
    options.settings.deny_private_networks = Some(true);
    let app = TestApp::start(options).await;
    let (status, problem) = app
        .post(
            "/v1/jobs",
            http_job(
                "meta",
                json!({"kind": "cron", "expr": "0 0 1 1 *"}),
                "http://169.254.169.254/latest/meta-data",
            ),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(problem["errors"][0]["pointer"], "/action/url");
    let (status, _) = app
        .post(
            "/v1/jobs",
            http_job(
                "local",
                json!({"kind": "cron", "expr": "0 0 1 1 *"}),
                &receiver.url("/x"),
            ),
        )
        .await;
    assert_eq!(status, 422, "a loopback literal is refused at creation");
    // A name is checked when it resolves.
    let url = receiver.url("/x").replace("127.0.0.1", "localhost");
    app.create(http_job(
        "named",
        json!({"kind": "cron", "expr": "0 0 1 1 *"}),
        &url,
    ))
    .await;
    let run = app.trigger("named").await;
    let run = app.final_run(run.id).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error.as_deref().unwrap().contains("no public address"),
        "{run:?}"
    );
    assert!(receiver.drain().is_empty());
    app.stop().await;
}

async fn raw(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let r = app
        .client
        .post(app.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    read(r).await
}

#[tokio::test]
async fn hostile_input_gets_problems_and_writes_nothing() {
    let app = TestApp::start(Options::commands()).await;
    let base = || {
        json!({"name": "ok", "labels": {}, "schedule": {"kind": "cron", "expr": "* * * * *"},
               "action": {"kind": "http", "url": "http://127.0.0.1:9/"}})
    };
    let with = |pointer: &str, value: Value| {
        let mut spec = base();
        *spec.pointer_mut(pointer).unwrap_or_else(|| panic!("{pointer}")) = value;
        spec
    };
    let many_labels: serde_json::Map<String, Value> =
        (0..10_000).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases: Vec<(&str, Value)> = vec![
        ("NUL in name", with("/name", json!("a\u{0}b"))),
        ("SQL in name", with("/name", json!("x'); DROP TABLE jobs; --"))),
        ("unicode confusable name", with("/name", json!("\u{0430}pple"))),
        (
            "negative duration",
            with("/schedule", json!({"kind": "interval", "every": "-1s"})),
        ),
        (
            "negative timeout",
            with(
                "/action",
                json!({"kind": "http", "url": "http://h/", "timeout": "-5s"}),
            ),
        ),
        (
            "CRLF header injection",
            with(
                "/action",
                json!({"kind": "http", "url": "http://h/", "headers": {"X-A": "v\r\nX-Injected: 1"}}),
            ),
        ),
        (
            "header name injection",
            with(
                "/action",
                json!({"kind": "http", "url": "http://h/", "headers": {"X-A\r\nX-B": "v"}}),
            ),
        ),
        (
            "path traversal working_dir",
            with(
                "/action",
                json!({"kind": "command", "program": "true", "working_dir": "/tmp/../../etc"}),
            ),
        ),
        (
            "relative working_dir",
            with(
                "/action",
                json!({"kind": "command", "program": "true", "working_dir": "etc"}),
            ),
        ),
        (
            "NUL in argument",
            with(
                "/action",
                json!({"kind": "command", "program": "true", "args": ["a\u{0}"]}),
            ),
        ),
        ("10,000 labels", with("/labels", Value::Object(many_labels))),
        ("long label key", with("/labels", json!({"k".repeat(64): "v"}))),
        (
            "environment reference",
            with(
                "/action",
                json!({"kind": "http", "url": "http://h/", "headers": {"X-T": "${CRONGUARD_TOKENS}"}}),
            ),
        ),
        (
            "file URL",
            with("/action", json!({"kind": "http", "url": "file:///etc/passwd"})),
        ),
        (
            "type confusion",
            json!({"name": ["a"], "schedule": "* * * * *", "action": 1}),
        ),
        ("empty object", json!({})),
        ("null", Value::Null),
    ];
    for (what, body) in cases {
        let (status, problem) = app.post("/v1/jobs", body).await;
        assert!(status.is_client_error(), "{what}: {status} {problem}");
        assert!(
            problem["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:cronguard:problem:")),
            "{what}: {problem}"
        );
    }
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let raw_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("deeply nested", deep.into_bytes(), "application/json"),
        ("deeply nested object", format!("{{\"labels\":{}", "{\"a\":".repeat(50_000)).into_bytes(), "application/json"),
        ("invalid UTF-8", b"{\"name\":\"\xff\xfe\"}".to_vec(), "application/json"),
        (
            "huge number",
            br#"{"name":"n","schedule":{"kind":"cron","expr":"* * * * *"},"action":{"kind":"http","url":"http://h/"},"policy":{"max_runs":1e400}}"#.to_vec(),
            "application/json",
        ),
        (
            "huge integer",
            br#"{"name":"n","schedule":{"kind":"cron","expr":"* * * * *"},"action":{"kind":"http","url":"http://h/"},"policy":{"max_concurrency":99999999999999999999999}}"#.to_vec(),
            "application/json",
        ),
        ("oversized", vec![b' '; 2 * 1024 * 1024], "application/json"),
        ("truncated", b"{\"name\":".to_vec(), "application/json"),
        ("not JSON", b"name=x".to_vec(), "text/plain"),
    ];
    for (what, body, ct) in raw_cases {
        let (status, problem) = raw(&app, "/v1/jobs", ct, body).await;
        assert!(status.is_client_error(), "{what}: {status}");
        assert!(
            problem["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:cronguard:problem:")),
            "{what}: {problem}"
        );
    }
    // Query strings and paths.
    for path in [
        "/v1/jobs?label=a'%20OR%20'1'='1",
        "/v1/jobs?limit=-1",
        "/v1/jobs?limit=99999999999999999999",
        "/v1/jobs?cursor=../../etc",
        "/v1/runs?status=running'--",
        "/v1/jobs/%FF%FE",
        "/v1/jobs/..%2F..%2Fetc",
        "/v1/runs/not-a-uuid",
    ] {
        let (status, problem) = app.get(path).await;
        assert!(status.is_client_error(), "{path}: {status}");
        assert!(problem["type"].is_string(), "{path}: {problem}");
    }
    let (_, page) = app.get("/v1/jobs").await;
    assert_eq!(page["items"], json!([]), "nothing was written");
    let (status, _) = app.get("/livez").await;
    assert_eq!(status, 200);
    let (status, _) = app.get("/readyz").await;
    assert_eq!(status, 200);
    app.stop().await;
}
