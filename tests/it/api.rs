//! The REST contract: validation, problems, CRUD, concurrency control.

use cronguard::api::schedules::Preview;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

fn pointers(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["pointer"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn job_count(app: &TestApp) -> usize {
    let (_, body) = app.get("/v1/jobs?limit=500").await;
    body["items"].as_array().map_or(0, Vec::len)
}

on_both_databases! {
    #[tokio::test]
    async fn bad_input_is_a_precise_problem_and_writes_nothing(db: Database) {
        let app = TestApp::start(Options::default().on(&db)).await;
        let url = "http://127.0.0.1:9/hook";
        let cases: Vec<(&str, Value, u16, &str)> = vec![
            (
                "invalid cron",
                http_job("a", json!({"kind": "cron", "expr": "61 * * * *"}), url),
                422,
                "/schedule/expr",
            ),
            (
                "unknown time zone",
                http_job(
                    "a",
                    json!({"kind": "cron", "expr": "* * * * *", "timezone": "Mars/Olympus"}),
                    url,
                ),
                422,
                "/schedule/timezone",
            ),
            (
                "negative interval",
                http_job("a", json!({"kind": "interval", "every": "-5s"}), url),
                422,
                "/schedule/every",
            ),
            (
                "unknown field",
                json!({"name": "a", "schedule": every_second(), "action": {"kind": "http", "url": url}, "colour": "red"}),
                422,
                "/colour",
            ),
            (
                "unknown nested field",
                json!({"name": "a", "schedule": every_second(), "action": {"kind": "http", "url": url, "verb": "GET"}}),
                422,
                "/action/verb",
            ),
            (
                "wrong type",
                json!({"name": 5, "schedule": every_second(), "action": {"kind": "http", "url": url}}),
                422,
                "/name",
            ),
            (
                "missing field",
                json!({"name": "a", "action": {"kind": "http", "url": url}}),
                422,
                "/schedule",
            ),
            (
                "command while disabled",
                json!({"name": "a", "schedule": every_second(), "action": {"kind": "command", "program": "true"}}),
                422,
                "/action/kind",
            ),
            (
                "bad name",
                http_job("has space", every_second(), url),
                422,
                "/name",
            ),
            (
                "once in the past",
                http_job("a", json!({"kind": "once", "at": "2001-01-01T00:00:00Z"}), url),
                422,
                "/schedule",
            ),
        ];
        for (what, body, status, pointer) in cases {
            let (got, problem) = app.post("/v1/jobs", body).await;
            assert_eq!(got.as_u16(), status, "{what}: {problem}");
            assert_eq!(problem["status"], status, "{what}: {problem}");
            assert!(
                problem["type"]
                    .as_str()
                    .unwrap()
                    .starts_with("urn:cronguard:problem:"),
                "{what}"
            );
            assert!(
                pointers(&problem).contains(&pointer.to_owned()),
                "{what}: {problem}"
            );
        }

        // Several problems at once are all reported.
        let (status, problem) = app
            .post(
                "/v1/jobs",
                json!({"name": "-x", "schedule": {"kind": "cron", "expr": "x", "timezone": "Nowhere"}, "action": {"kind": "http", "url": "ftp://x"}}),
            )
            .await;
        assert_eq!(status, 422);
        assert_eq!(
            pointers(&problem),
            ["/name", "/schedule/expr", "/schedule/timezone", "/action/url"]
        );

        // Transport-level problems.
        let raw = |body: Vec<u8>, ct: &'static str| {
            app.client
                .post(app.url("/v1/jobs"))
                .header("content-type", ct)
                .body(body)
                .send()
        };
        let r = raw(b"{\"name\": ".to_vec(), "application/json").await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let r = raw(b"name=a".to_vec(), "application/x-www-form-urlencoded")
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let big = format!(
            "{{\"name\":\"a\",\"description\":\"{}\"}}",
            "x".repeat(400 * 1024)
        );
        let r = raw(big.into_bytes(), "application/json").await.unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let (_, problem) = read(r).await;
        assert_eq!(problem["type"], "urn:cronguard:problem:payload-too-large");
        let r = raw(vec![b'{', 0xff, 0xfe, b'}'], "application/json")
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);

        assert_eq!(
            job_count(&app).await,
            0,
            "nothing may be written by rejected requests"
        );

        // Duplicate names.
        app.create(http_job("dup", every_second(), url)).await;
        let (status, problem) = app.post("/v1/jobs", http_job("dup", every_second(), url)).await;
        assert_eq!(status, 409);
        assert_eq!(pointers(&problem), ["/name"]);
        assert_eq!(job_count(&app).await, 1);

        // Unknown routes, methods and query parameters.
        let (status, problem) = app.get("/v1/nope").await;
        assert_eq!(
            (status.as_u16(), problem["type"].as_str()),
            (404, Some("urn:cronguard:problem:not-found"))
        );
        let r = app.client.patch(app.url("/v1/jobs")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let (status, problem) = app.get("/v1/jobs?colour=red").await;
        assert_eq!(status, 400, "{problem}");
        let (status, _) = app.get("/v1/jobs?limit=100000").await;
        assert_eq!(status, 400);
        for query in ["status=sleeping", "status=", "status=failed,,succeeded"] {
            let (status, problem) = app.get(&format!("/v1/runs?{query}")).await;
            assert_eq!(status, 400, "{query}: {problem}");
        }

        let (status, body) = app.get("/livez").await;
        assert_eq!((status.as_u16(), body), (200, Value::String("ok\n".into())));
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn crud_with_optimistic_concurrency_and_pagination(db: Database) {
        let app = TestApp::start(Options::default().on(&db)).await;
        let url = "http://127.0.0.1:9/hook";
        let mut spec = http_job(
            "nightly",
            json!({"kind": "cron", "expr": "0 3 * * *", "timezone": "Europe/Berlin"}),
            url,
        );
        spec["labels"] = json!({"team": "ops", "tier": "1"});
        let r = app
            .client
            .post(app.url("/v1/jobs"))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["etag"], "\"1\"");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let (_, job) = read(r).await;
        assert_eq!(location, format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
        assert_eq!(job["source"], "api");
        assert!(job["next_fire_at"].as_str().unwrap().ends_with(":00:00Z"));

        // By id and by name.
        let (status, by_name) = app.get("/v1/jobs/nightly").await;
        assert_eq!(status, 200);
        assert_eq!(by_name["id"], job["id"]);

        // Replace: stale If-Match is refused, current one accepted, the GET
        // body's spec goes back unchanged.
        let mut new_spec = by_name["spec"].clone();
        new_spec["description"] = json!("backs things up");
        let put = |etag: &'static str, body: Value| {
            app.client
                .put(app.url("/v1/jobs/nightly"))
                .header("if-match", etag)
                .json(&body)
                .send()
        };
        let (status, problem) = read(put("\"7\"", new_spec.clone()).await.unwrap()).await;
        assert_eq!(status, 412, "{problem}");
        assert_eq!(problem["type"], "urn:cronguard:problem:version-mismatch");
        let r = put("\"1\"", new_spec.clone()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "\"2\"");
        let (status, _) = read(put("\"1\"", new_spec).await.unwrap()).await;
        assert_eq!(status, 412, "the old version is stale now");

        // Label filters and pagination.
        for i in 0..5 {
            let mut s = http_job(&format!("j{i}"), every_second(), url);
            s["labels"] = json!({"team": if i % 2 == 0 { "ops" } else { "dev" }});
            s["paused"] = json!(true);
            app.create(s).await;
        }
        let (_, page) = app.get("/v1/jobs?label=team=ops").await;
        assert_eq!(page["items"].as_array().unwrap().len(), 4);
        let (_, page) = app.get("/v1/jobs?label=team=ops&label=tier=1").await;
        assert_eq!(page["items"].as_array().unwrap().len(), 1);
        let (_, page) = app.get("/v1/jobs?label=team=x'%20OR%201=1--").await;
        assert_eq!(page["items"].as_array().unwrap().len(), 0);
        let (_, page) = app.get("/v1/jobs?paused=true").await;
        assert_eq!(page["items"].as_array().unwrap().len(), 5);
        let mut names = Vec::new();
        let mut cursor = String::new();
        loop {
            let (_, page) = app.get(&format!("/v1/jobs?limit=2{cursor}")).await;
            names.extend(
                page["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|j| j["name"].as_str().unwrap().to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(names, ["nightly", "j0", "j1", "j2", "j3", "j4"]);

        // Delete.
        let r = app.client.delete(app.url("/v1/jobs/j0")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let (status, _) = app.get("/v1/jobs/j0").await;
        assert_eq!(status, 404);
        let r = app.client.delete(app.url("/v1/jobs/j0")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        app.stop().await;
    }
}

on_both_databases! {
    #[tokio::test]
    async fn previews_follow_the_documented_dst_rules(db: Database) {
        let app = TestApp::start(Options::default().on(&db)).await;
        let preview = async |schedule: Value, after: &str, count: u32| app.preview(schedule, after, count).await;
        let at_0230 = json!({"kind": "cron", "expr": "30 2 * * *", "timezone": "Europe/Berlin"});
        // Spring gap (2027-03-28): 02:30 does not exist, fires once at 03:00.
        assert_eq!(
            preview(at_0230.clone(), "2027-03-26T12:00:00Z", 3).await,
            [
                "2027-03-27T02:30:00+01:00",
                "2027-03-28T03:00:00+02:00",
                "2027-03-29T02:30:00+02:00"
            ]
        );
        // Fall fold (2027-10-31): 02:30 happens twice, fires once (the first).
        assert_eq!(
            preview(at_0230, "2027-10-29T12:00:00Z", 3).await,
            [
                "2027-10-30T02:30:00+02:00",
                "2027-10-31T02:30:00+02:00",
                "2027-11-01T02:30:00+01:00"
            ]
        );
        // The fold policy: every repeated local time fires once by default,
        // at both occurrences with `fold: both`, whatever the expression.
        assert_eq!(
            preview(
                json!({"kind": "cron", "expr": "0 * * * *", "timezone": "Europe/Berlin"}),
                "2027-10-30T22:30:00Z",
                3
            )
            .await,
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T03:00:00+01:00"
            ]
        );
        assert_eq!(
            preview(
                json!({"kind": "cron", "expr": "0 * * * *", "timezone": "Europe/Berlin", "fold": "both"}),
                "2027-10-30T22:30:00Z",
                4
            )
            .await,
            [
                "2027-10-31T01:00:00+02:00",
                "2027-10-31T02:00:00+02:00",
                "2027-10-31T02:00:00+01:00",
                "2027-10-31T03:00:00+01:00"
            ]
        );
        // Validation without side effects.
        let (status, problem) = app
            .post(
                "/v1/schedules/preview",
                json!({"schedule": {"kind": "cron", "expr": "* * *"}, "count": 0}),
            )
            .await;
        assert_eq!(status, 422);
        assert_eq!(pointers(&problem), ["/schedule/expr", "/count"]);

        // A stored job's preview starts at its next fire.
        let job = app
            .create(http_job(
                "berlin",
                json!({"kind": "cron", "expr": "30 2 * * *", "timezone": "Europe/Berlin"}),
                "http://127.0.0.1:9/",
            ))
            .await;
        let (status, body) = app.get("/v1/jobs/berlin/preview?count=2").await;
        assert_eq!(status, 200);
        assert_eq!(view::<Preview>(body.clone()).fires[0].at, job.next_fire_at.unwrap());
        assert_eq!(body["timezone"], "Europe/Berlin");
        assert_eq!(job_count(&app).await, 1);
        app.stop().await;
    }
}
