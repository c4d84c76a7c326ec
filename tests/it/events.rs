//! The live event feed (`GET /v1/events`): commit order, resumption with
//! `Last-Event-ID`, filters, the subscriber limit, and a subscriber that
//! stops reading while fires go on. And a run's live output
//! (`GET /v1/runs/{run}/output`).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use cronguard::events::{Event, Gap, Kind};
use serde_json::{Value, json};

use crate::helpers::*;

/// One SSE frame.
#[derive(Debug, Clone)]
struct Frame {
    event: String,
    id: Option<String>,
    data: String,
}

/// An open `text/event-stream`, read frame by frame.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(app: &TestApp, query: &str, last: Option<&str>) -> Self {
        Self::at(app, &format!("/v1/events?{query}"), last).await
    }

    async fn at(app: &TestApp, path: &str, last: Option<&str>) -> Self {
        let mut request = app.client.get(app.url(path));
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next frame that is not a keep-alive comment.
    async fn next(&mut self) -> Frame {
        within("an event", async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let text: String = self.buffer.drain(..end + 2).collect();
                    let mut frame = Frame {
                        event: "message".into(),
                        id: None,
                        data: String::new(),
                    };
                    let mut content = false;
                    let mut data: Vec<&str> = Vec::new();
                    for line in text.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            frame.event = v.trim().to_owned();
                            content = true;
                        } else if let Some(v) = line.strip_prefix("id:") {
                            frame.id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            // As the SSE specification reads a field.
                            data.push(v.strip_prefix(' ').unwrap_or(v));
                            content = true;
                        }
                    }
                    frame.data = data.join("\n");
                    if content {
                        return frame;
                    }
                    continue;
                }
                let chunk = self.response.chunk().await.unwrap().expect("the stream ended");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
    }

    /// The next feed event (not `gap` or `lagged`).
    async fn event(&mut self) -> Event {
        let frame = self.next().await;
        let event: Event = serde_json::from_str(&frame.data).unwrap_or_else(|e| panic!("{frame:?}: {e}"));
        assert_eq!(frame.event, event.kind.as_str());
        assert_eq!(frame.id.as_deref(), Some(event.id.as_str()));
        event
    }
}

fn seq(id: &str) -> u64 {
    id.split_once('-').unwrap().1.parse().unwrap()
}

fn test_job(name: &str) -> Value {
    json!({"name": name, "schedule": {"kind": "cron", "expr": "0 0 1 1 *"}, "action": {"kind": "test"}})
}

#[tokio::test]
async fn events_follow_the_commit_order_and_resume_after_last_event_id() {
    let app = TestApp::spawn().await;
    let mut all = Stream::open(&app, "", None).await;
    let mut runs = Stream::open(&app, "kind=run.finished", None).await;
    app.create(test_job("a")).await;
    let mut failing = test_job("b");
    failing["action"] = json!({"kind": "test", "fail_attempts": 9});
    app.create(failing).await;
    let mut triggered = Vec::new();
    for job in ["a", "b", "a", "b"] {
        let run = app.trigger(job).await;
        app.final_run(run.id).await;
        triggered.push(run.id);
    }
    let (status, _) = app.post_empty("/v1/jobs/b/pause").await;
    assert_eq!(status, 200);

    // Everything, in order: ids increase, each run starts before it ends.
    let mut seen: Vec<Event> = Vec::new();
    while !seen.iter().any(|e| e.kind == Kind::JobPaused) {
        seen.push(all.event().await);
    }
    for pair in seen.windows(2) {
        assert!(seq(&pair[0].id) < seq(&pair[1].id), "{pair:?}");
    }
    let kinds: Vec<Kind> = seen.iter().map(|e| e.kind).collect();
    assert_eq!(&kinds[..2], [Kind::JobCreated, Kind::JobCreated]);
    let position: HashMap<(Kind, Option<cronguard::run::RunId>), usize> = seen
        .iter()
        .enumerate()
        .map(|(i, e)| ((e.kind, e.run_id), i))
        .collect();
    for run in &triggered {
        let started = position[&(Kind::RunStarted, Some(*run))];
        let finished = position[&(Kind::RunFinished, Some(*run))];
        assert!(
            started < finished,
            "{run}: started at {started}, finished at {finished}"
        );
    }
    // b's first failure makes it failing: one health event, before the pause.
    let health: Vec<&Event> = seen.iter().filter(|e| e.kind == Kind::JobHealth).collect();
    assert_eq!(health.len(), 1, "{health:?}");
    assert_eq!(health[0].job_name.as_deref(), Some("b"));
    assert_eq!(health[0].status.as_deref(), Some("failing"));

    // The filter gets the finished runs only, in the same order.
    let mut finished = Vec::new();
    for _ in 0..triggered.len() {
        finished.push(runs.event().await);
    }
    assert!(finished.iter().all(|e| e.kind == Kind::RunFinished));
    let statuses: Vec<&str> = finished.iter().map(|e| e.status.as_deref().unwrap()).collect();
    assert_eq!(statuses, ["succeeded", "failed", "succeeded", "failed"]);

    // Resume after the third event: exactly the rest, no gap.
    let mut resumed = Stream::open(&app, "", Some(&seen[2].id)).await;
    for expected in &seen[3..] {
        let got = resumed.event().await;
        assert_eq!(got.id, expected.id);
        assert_eq!(got.kind, expected.kind);
    }
    // An id from an earlier run of the service: said explicitly, then the
    // kept window.
    let mut old = Stream::open(&app, "job=a", Some("1-5")).await;
    let frame = old.next().await;
    assert_eq!(frame.event, "gap");
    let gap: Gap = serde_json::from_str(&frame.data).unwrap();
    assert_eq!(gap.reason, "restarted");
    assert_eq!(gap.oldest_id.as_deref(), Some(seen[0].id.as_str()));
    let first = old.event().await;
    assert_eq!(
        first.job_name.as_deref(),
        Some("a"),
        "the job filter holds for the backlog"
    );
    app.stop().await;
}

#[tokio::test]
async fn bad_filters_are_400_and_the_subscriber_limit_answers_503() {
    let mut options = Options::default();
    options.settings.events_max_subscribers = Some(2);
    let app = TestApp::start(options).await;
    let (status, body) = app.get("/v1/events?kind=run.exploded").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "urn:cronguard:problem:bad-query", "{body}");
    let (status, body) = app.get("/v1/events?job=nope").await;
    assert_eq!(status, 404, "{body}");
    let _one = Stream::open(&app, "", None).await;
    let two = Stream::open(&app, "kind=job", None).await;
    let (status, body) = app.get("/v1/events").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["type"], "urn:cronguard:problem:too-many-subscribers",
        "{body}"
    );
    drop(two);
    eventually("the slot to be given back", || async {
        let m = app.metrics().await;
        (sample(&m, "cronguard_events_subscribers") == Some(1.0)).then_some(())
    })
    .await;
    let _three = Stream::open(&app, "", None).await;
    app.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_dropped_while_fires_go_on() {
    // 1,000 fires a second (the acceptance's rate), ~2,000 events: the
    // stuck client's socket and queue fill within seconds. Lateness under
    // subscribers is measured in bench/ (events.rs); here: none missed.
    const JOBS: usize = 1000;
    let app = TestApp::spawn().await;
    // A client with a tiny receive buffer that sends its request and never
    // reads the answer.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&app.addr.into()).unwrap();
    let mut stuck: std::net::TcpStream = socket.into();
    write!(
        stuck,
        "GET /v1/events HTTP/1.1\r\nhost: cronguard\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = Stream::open(&app, "kind=run.finished", None).await;
    for i in 0..JOBS {
        let mut spec = test_job(&format!("tick{i}"));
        spec["schedule"] = json!({"kind": "interval", "every": "1s"});
        app.create(spec).await;
    }
    within("the stuck subscriber to be dropped", async {
        loop {
            let m = app.metrics().await;
            if sample(&m, "cronguard_events_subscribers_dropped_total") == Some(1.0) {
                break;
            }
            // The reading subscriber keeps getting events meanwhile.
            reader.event().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let m = app.metrics().await;
    assert_eq!(
        sample(&m, "cronguard_events_subscribers"),
        Some(1.0),
        "only the reader is left"
    );
    // Fires went on: none missed while the stuck client held its socket.
    let missed: f64 = m
        .lines()
        .filter(|l| l.starts_with("cronguard_fires_not_run_total{") && l.contains("status=\"missed\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(missed, 0.0, "fires missed while a subscriber was stuck");
    // The stuck client, once it reads, is told and its stream ends.
    stuck.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut stuck, &mut text).unwrap();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("event: lagged"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    drop(reader);
    app.stop().await;
}

#[tokio::test]
async fn a_commands_output_is_seen_live_line_by_line_with_its_pipes_apart() {
    let app = TestApp::start(Options::commands()).await;
    let script = "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 1; done";
    app.create(json!({
        "name": "talker", "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {"kind": "command", "program": "sh", "args": ["-c", script]},
    }))
    .await;
    let run = app.trigger("talker").await;
    let mut output = Stream::at(&app, &format!("/v1/runs/{}/output", run.id), None).await;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut seen_while_running = false;
    let end = loop {
        let frame = output.next().await;
        match frame.event.as_str() {
            "stdout" => stdout.push_str(&frame.data),
            "stderr" => stderr.push_str(&frame.data),
            "end" => break serde_json::from_str::<cronguard::run::Run>(&frame.data).unwrap(),
            other => panic!("unexpected {other}: {frame:?}"),
        }
        if stdout.contains("out1") && stderr.contains("err1") && !seen_while_running {
            // The first lines arrive while the command still runs.
            assert!(
                !app.run(run.id).await.status.is_final(),
                "out1 and err1 only after the end"
            );
            seen_while_running = true;
        }
    };
    assert!(seen_while_running);
    assert_eq!(stdout, "out1\nout2\nout3\n");
    assert_eq!(stderr, "err1\nerr2\nerr3\n");
    assert_eq!(end.status, cronguard::run::RunStatus::Succeeded);
    assert_eq!(end.output.as_deref(), Some("out1\nout2\nout3\n"));
    assert_eq!(end.stderr.as_deref(), Some("err1\nerr2\nerr3\n"));

    // A finished run: its stored tails, then its end, at once.
    let mut again = Stream::at(&app, &format!("/v1/runs/{}/output", run.id), None).await;
    let frames = [again.next().await, again.next().await, again.next().await];
    let names: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(names, ["stdout", "stderr", "end"]);
    assert_eq!(frames[0].data, "out1\nout2\nout3\n");
    assert_eq!(frames[1].data, "err1\nerr2\nerr3\n");
    let (status, _) = app
        .get("/v1/runs/01890000-0000-7000-8000-000000000000/output")
        .await;
    assert_eq!(status, 404);
    app.stop().await;
}
