//! The HTTP edge under odd but legal input and under hostile clients:
//! auth scheme case, bad escapes in paths, bodies that never finish, and
//! job fields that would let a job rewrite framing or load foreign code.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

const ADMIN: &str = "admin-0123456789abcdef0";

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let mut options = Options::default();
    options.settings.tokens = Some(vec![format!("ops:admin:{ADMIN}")]);
    let app = TestApp::start(options).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = app
            .client
            .get(app.url("/v1/jobs"))
            .header("authorization", format!("{scheme} {ADMIN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = app
        .client
        .get(app.url("/v1/jobs"))
        .header("authorization", format!("Basic {ADMIN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn bad_escapes_in_paths_are_400_bad_path() {
    let app = TestApp::spawn().await;
    for path in [
        "/v1/jobs/%zz",
        "/v1/jobs/%",
        "/v1/jobs/a%2",
        "/v1/runs/%G0",
        "/v1/jobs/%zz/runs",
    ] {
        let (status, problem) = app.get(path).await;
        assert_eq!(status, 400, "{path}: {problem}");
        assert_eq!(problem["type"], "urn:cronguard:problem:bad-path", "{path}");
    }
    // A well-formed escape still reaches the handler.
    let (status, problem) = app.get("/v1/jobs/no%2Dsuch").await;
    assert_eq!(status, 404, "{problem}");
    app.stop().await;
}

#[tokio::test]
async fn a_body_shorter_than_its_length_gets_408_before_the_request_timeout() {
    let app = TestApp::spawn().await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"na")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    within("an answer", socket.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("body-timeout"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    // The request timeout is 30 s; the body deadline 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

#[tokio::test]
async fn jobs_may_not_set_framing_headers_or_loader_variables() {
    let app = TestApp::start(Options::commands()).await;
    for header in [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "connection",
        "TE",
        "Upgrade",
    ] {
        let mut job = http_job(
            "h",
            json!({"kind": "cron", "expr": "0 0 1 1 *"}),
            "http://127.0.0.1:9/",
        );
        job["action"]["headers"] = json!({header: "5"});
        let (status, problem) = app.post("/v1/jobs", job).await;
        assert_eq!(status, 422, "{header}");
        assert_eq!(
            problem["errors"][0]["pointer"],
            format!("/action/headers/{header}")
        );
    }
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "BASH_ENV",
        "PATH",
        "PYTHONPATH",
        "NODE_OPTIONS",
    ] {
        let job = json!({
            "name": "c", "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
            "action": {"kind": "command", "program": "true", "env": {name: "/tmp/x.so"}}
        });
        let (status, problem) = app.post("/v1/jobs", job).await;
        assert_eq!(status, 422, "{name}");
        assert_eq!(problem["errors"][0]["pointer"], format!("/action/env/{name}"));
    }
    let (_, jobs) = app.get("/v1/jobs").await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 0, "nothing written");
    app.stop().await;
}

#[tokio::test]
async fn the_api_runs_on_threads_of_lower_priority_than_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let service = Binary::start(dir.path(), &[]).await;
    // Serve a request so the API runtime's threads have started.
    let (status, _) = service.get("/v1/jobs").await;
    assert_eq!(status, 200);
    let mut api = Vec::new();
    let mut engine = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", service.pid())).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Field 19 (nice), counted after the parenthesised command name.
        let Some(nice) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        match comm.trim() {
            "cronguard-api" => api.push(nice),
            "tokio-rt-worker" | "cronguard-write" => engine.push(nice),
            _ => {}
        }
    }
    assert_eq!(api.len(), cronguard::api::serve::API_THREADS, "{api:?}");
    assert!(!engine.is_empty());
    let engine_max = engine.iter().max().unwrap();
    assert!(
        api.iter()
            .all(|n| *n >= engine_max + cronguard::api::serve::API_NICENESS),
        "API threads {api:?}, engine and writer {engine:?}"
    );
}

/// Sends raw bytes and reads the answer until the server closes.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    within("an answer", socket.read_to_end(&mut answer))
        .await
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn requests_the_http_parser_refuses_get_problem_bodies() {
    let app = TestApp::spawn().await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let huge_headers = format!(
        "GET /v1/jobs HTTP/1.1\r\nhost: x\r\n{}\r\n",
        "x-pad: aaaaaaaa\r\n".repeat(40_000)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            b"GET /v1/jobs HTTP/1.1\r\nhost: x\rbad: y\r\n\r\n".to_vec(),
            400,
            "malformed-request",
        ),
        (
            b"GET /v1/jobs HTTP/1.1\r\nhost: x\r\nx: a\x00b\r\n\r\n".to_vec(),
            400,
            "malformed-request",
        ),
        (
            b"POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec(),
            400,
            "malformed-request",
        ),
        (long_uri.into_bytes(), 414, "uri-too-long"),
        (huge_headers.into_bytes(), 431, "headers-too-large"),
    ];
    for (request, status, kind) in cases {
        let answer = raw_exchange(app.addr, &request).await;
        let shown = &answer[..answer.len().min(200)];
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{shown}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("content-type: application/problem+json"), "{shown}");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], status);
        assert_eq!(problem["type"], format!("urn:cronguard:problem:{kind}"));
    }
    // The service is unharmed.
    let (status, _) = app.get("/v1/jobs").await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// An answer given before the request body was read (over the limit,
/// refused by auth, stalled) says `connection: close`: a client that
/// pooled the connection would otherwise send its next request into a
/// socket the server is closing, and lose it.
#[tokio::test]
async fn answers_before_the_body_is_read_close_the_connection_and_say_so() {
    let mut options = Options::default();
    options.settings.tokens = Some(vec![format!("ops:admin:{ADMIN}")]);
    let app = TestApp::start(options).await;
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(2 * 1024 * 1024));
    let cases: Vec<(&str, Option<&str>, u16)> =
        vec![("over the limit", Some(ADMIN), 413), ("no token", None, 401)];
    // One connection at most, reused whenever the client may.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    for (what, token, status) in cases {
        for round in 0..5 {
            let mut request = client
                .post(app.url("/v1/jobs"))
                .header("content-type", "application/json")
                .body(big.clone());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let r = request
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what} {round}: {e:?}"));
            assert_eq!(r.status(), status, "{what}");
            assert_eq!(r.headers()["connection"], "close", "{what}");
            // The next request on the pool goes through.
            let r = client
                .get(app.url("/v1/jobs"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap_or_else(|e| panic!("after {what} {round}: {e:?}"));
            assert_eq!(r.status(), 200, "after {what}");
        }
    }
    // A read body keeps the connection.
    let r = client
        .post(app.url("/v1/jobs"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "bad name!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.headers().get("connection").is_none(), "{:?}", r.headers());
    app.stop().await;
}

/// A client holding a request open (half its header block sent) does not
/// hold the process's exit: the server cuts what is in flight
/// `API_DRAIN` (5 s) after shutdown starts, where hyper alone would wait
/// for its 30 s header timeout. (Nothing else may hold the stop either:
/// the orphan reaper once waited 10 s on a supervisor that had stopped
/// answering.)
#[tokio::test]
async fn a_half_sent_request_does_not_hold_shutdown() {
    let app = TestApp::spawn().await;
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"GET /v1/jobs HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The server has the connection before the stop.
    let (status, _) = app.get("/livez").await;
    assert_eq!(status, 200);
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    drop(socket);
}
