//! Notifications (`docs/notifications.md`): told once per failure streak,
//! signed as Standard Webhooks (checked by Python's own `hmac`), delivered
//! in order once per id after the receiver was down, and after a kill -9.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use cronguard::api::notifications::NotificationPage;
use cronguard::clock::ManualClock;
use cronguard::fault::Fault;
use cronguard::notification::{Event, Status};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::helpers::*;

/// A Standard Webhooks secret (`whsec_` + base64 of 24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn yearly() -> Value {
    json!({"kind": "cron", "expr": "0 0 1 1 *"})
}

/// An HTTP endpoint whose answer the test sets (the job's action).
struct Switch {
    url: String,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Switch {
    async fn start() -> Self {
        let status = Arc::new(AtomicU16::new(200));
        let answer = status.clone();
        let app = axum::Router::new().fallback(move || {
            let code = answer.load(Ordering::SeqCst);
            async move { axum::http::StatusCode::from_u16(code).unwrap() }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, status, task }
    }

    fn set(&self, ok: bool) {
        self.status.store(if ok { 200 } else { 500 }, Ordering::SeqCst);
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `hit`'s `webhook-signature` with Python's `hmac`, an
/// implementation independent of ours, as the Standard Webhooks
/// specification defines it.
fn verify_with_python(secret: &str, hit: &Hit) {
    const SCRIPT: &str = r#"
import base64, hashlib, hmac, sys
secret, msg_id, ts, header = sys.argv[1:5]
body = sys.stdin.buffer.read()
key = base64.b64decode(secret.split("_", 1)[1])
mac = hmac.new(key, msg_id.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256)
expected = base64.b64encode(mac.digest()).decode()
ok = any(hmac.compare_digest(s.split(",", 1)[1], expected) for s in header.split(" ") if s.startswith("v1,"))
sys.exit(0 if ok else 1)
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT, secret])
        .args([
            hit.header("webhook-id"),
            hit.header("webhook-timestamp"),
            hit.header("webhook-signature"),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(&hit.body).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "Python rejects the signature of {}",
        hit.header("webhook-id")
    );
}

fn event_of(hit: &Hit) -> String {
    let body: Value = serde_json::from_slice(&hit.body).unwrap();
    body["type"].as_str().unwrap().to_owned()
}

async fn notifications(base: &str, query: &str) -> NotificationPage {
    let r = client()
        .get(format!("{base}/v1/notifications?{query}"))
        .send()
        .await
        .unwrap();
    let (status, body) = read(r).await;
    assert_eq!(status, 200, "{body}");
    view(body)
}

/// Triggers `job` and waits for its run to end.
async fn run_once(app: &TestApp, job: &str) {
    let run = app.trigger(job).await;
    app.final_run(run.id).await;
}

on_both_databases! {
    #[tokio::test]
    async fn a_flapping_job_tells_one_failure_and_one_recovery_per_streak_signed(db: Database) {
        let mut hook = Receiver::start().await;
        let switch = Switch::start().await;
        let mut options = Options::default().on(&db);
        options.settings.notify_url = Some(hook.url("/hook"));
        options.settings.notify_secret = Some(SECRET.into());
        let app = TestApp::start(options).await;
        app.create(json!({"name": "flappy", "schedule": yearly(), "action": {"kind": "http", "url": switch.url}}))
            .await;
        for ok in [false, false, false, true, true, false, false, true] {
            switch.set(ok);
            run_once(&app, "flappy").await;
        }
        let mut hits = Vec::new();
        for _ in 0..4 {
            hits.push(hook.next_on("/hook").await);
        }
        let events: Vec<String> = hits.iter().map(event_of).collect();
        assert_eq!(events, ["job.failure", "job.recovery", "job.failure", "job.recovery"]);
        let mut ids: Vec<&str> = hits.iter().map(|h| h.header("webhook-id")).collect();
        for hit in &hits {
            verify_with_python(SECRET, hit);
            let body: Value = serde_json::from_slice(&hit.body).unwrap();
            assert_eq!(body["data"]["job_name"], "flappy", "{body}");
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4, "every notification has its own id");
        // Nothing else is told: all four are settled as sent.
        let page = eventually("four notifications sent", || async {
            let page = notifications(&app.base, "").await;
            page.items.iter().all(|n| n.status == Status::Sent).then_some(page)
        })
        .await;
        assert_eq!(page.items.len(), 4);
        assert!(hook.drain().is_empty());
        let m = app.metrics().await;
        assert_eq!(sample(&m, "cronguard_notifications_sent_total{event=\"failure\"}"), Some(2.0));
        assert_eq!(sample(&m, "cronguard_notifications_sent_total{event=\"recovery\"}"), Some(2.0));
        app.stop().await;
    }
}

#[tokio::test]
async fn a_receiver_down_for_60s_then_gets_every_notification_in_order_once_per_id() {
    let port = free_port();
    let switch = Switch::start().await;
    let clock = ManualClock::new(t0());
    let mut options = Options::manual_clock(&clock);
    options.settings.notify_url = Some(format!("http://127.0.0.1:{port}/hook"));
    options.settings.notify_secret = Some(SECRET.into());
    let app = TestApp::start(options).await;
    app.create(
        json!({"name": "flappy", "schedule": yearly(), "action": {"kind": "http", "url": switch.url}}),
    )
    .await;
    for ok in [false, true, false, true, false] {
        switch.set(ok);
        run_once(&app, "flappy").await;
    }
    let tried = eventually("five pending notifications, the first tried", || async {
        let page = notifications(&app.base, "status=pending").await;
        (page.items.len() == 5 && page.items.iter().any(|n| n.attempts >= 1)).then_some(page)
    })
    .await;
    // Sixty seconds of downtime on the service's clock: it keeps trying.
    for _ in 0..12 {
        clock.advance(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let page = notifications(&app.base, "status=pending").await;
    assert_eq!(page.items.len(), 5, "nothing given up or lost while down");
    let head = page.items.iter().map(|n| n.attempts).max().unwrap();
    assert!(head >= 3, "the head was retried: {head} attempts");
    let mut expected: Vec<(String, Event)> = tried
        .items
        .iter()
        .map(|n| (n.id.clone().unwrap(), n.event))
        .collect();
    expected.reverse(); // the API lists newest first

    let mut hook = Receiver::start_on(&format!("127.0.0.1:{port}")).await;
    clock.advance(Duration::from_secs(31));
    let mut got = Vec::new();
    for _ in 0..5 {
        let hit = hook.next_on("/hook").await;
        verify_with_python(SECRET, &hit);
        got.push((hit.header("webhook-id").to_owned(), event_of(&hit)));
    }
    let want: Vec<(String, String)> = expected
        .iter()
        .map(|(id, e)| (id.clone(), format!("job.{e}")))
        .collect();
    assert_eq!(got, want, "in the order of the events, each once");
    eventually("all five sent", || async {
        let page = notifications(&app.base, "status=sent").await;
        (page.items.len() == 5).then_some(())
    })
    .await;
    clock.advance(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        hook.drain().is_empty(),
        "a delivered notification is not sent again"
    );
    let m = app.metrics().await;
    assert!(
        sample(
            &m,
            "cronguard_notification_attempts_failed_total{event=\"failure\"}"
        )
        .unwrap()
            >= 3.0
    );
    app.stop().await;
}

#[tokio::test]
async fn kill_9_before_delivery_still_delivers_after_restart_with_the_same_id() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let env = [
        ("CRONGUARD_SECRET_HOOK_URL", url.as_str()),
        ("CRONGUARD_SECRET_HOOK_KEY", SECRET),
    ];
    let args = ["--enable-command-jobs"];
    let notify = json!({
        "on": ["failure", "orphaned"],
        "to": [{"url": "${CRONGUARD_SECRET_HOOK_URL}", "secret": "${CRONGUARD_SECRET_HOOK_KEY}"}],
    });
    let mut first = Binary::start_with_env(dir.path(), &args, &env).await;
    for (name, script) in [("broken", "exit 3"), ("long", "sleep 300")] {
        let job = json!({
            "name": name, "schedule": yearly(), "notify": notify,
            "action": {"kind": "command", "program": "sh", "args": ["-c", script]},
        });
        let (status, body) = first.post("/v1/jobs", job).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, _) = first.post("/v1/jobs/broken/trigger", json!(null)).await;
    assert_eq!(status, 202);
    let failure = eventually(
        "the failure notification tried while the receiver is down",
        || async {
            let page = notifications(&first.base, "status=pending").await;
            page.items
                .into_iter()
                .find(|n| n.event == Event::Failure && n.attempts >= 1)
        },
    )
    .await;
    assert_eq!(
        failure.destination.as_deref(),
        Some("${CRONGUARD_SECRET_HOOK_URL}"),
        "never the secret URL"
    );
    let (status, _) = first.post("/v1/jobs/long/trigger", json!(null)).await;
    assert_eq!(status, 202);
    eventually("the long run to start", || async {
        let (_, page) = first.get("/v1/runs?status=running").await;
        (page["items"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    first.signal(Signal::SIGKILL);
    first.wait().await;

    let mut hook = Receiver::start_on(&format!("127.0.0.1:{port}")).await;
    let _second = Binary::start_with_env(dir.path(), &args, &env).await;
    let told = hook.next_on("/hook").await;
    assert_eq!(event_of(&told), "job.failure");
    assert_eq!(
        told.header("webhook-id"),
        failure.id.as_deref().unwrap(),
        "the same id after the restart"
    );
    verify_with_python(SECRET, &told);
    let orphaned = hook.next_on("/hook").await;
    assert_eq!(event_of(&orphaned), "job.orphaned");
    verify_with_python(SECRET, &orphaned);
    let body: Value = serde_json::from_slice(&orphaned.body).unwrap();
    assert_eq!(body["data"]["job_name"], "long", "{body}");
}

#[tokio::test]
async fn auto_pause_and_lateness_are_told_once() {
    let mut hook = Receiver::start().await;
    let clock = ManualClock::new(t0());
    let app = TestApp::start(Options::manual_clock(&clock)).await;
    let to = json!([{"url": hook.url("/hook")}]);
    app.create(json!({
        "name": "fragile", "schedule": yearly(), "action": {"kind": "test", "fail_attempts": 99},
        "policy": {"auto_pause_after": 2},
        "notify": {"on": ["failure", "auto_paused"], "to": to},
    }))
    .await;
    run_once(&app, "fragile").await;
    run_once(&app, "fragile").await;
    let first = hook.next_on("/hook").await;
    assert_eq!(event_of(&first), "job.failure");
    assert_eq!(first.header("webhook-signature"), "", "no secret: unsigned");
    let paused = hook.next_on("/hook").await;
    assert_eq!(event_of(&paused), "job.auto_paused");
    let body: Value = serde_json::from_slice(&paused.body).unwrap();
    assert!(
        body["data"]["detail"].as_str().unwrap().contains("auto-paused"),
        "{body}"
    );

    // A minutely job whose fires are blocked (the engine hangs) is late
    // once its fire plus grace has passed, and told once per missed fire.
    app.create(json!({
        "name": "ticking", "schedule": {"kind": "cron", "expr": "* * * * *"}, "action": {"kind": "test"},
        "policy": {"misfire_grace": "5s"}, "notify": {"on": ["late"], "to": to},
    }))
    .await;
    app.faults.arm("engine", Fault::Hang);
    clock.advance(Duration::from_secs(70));
    let late = hook.next_on("/hook").await;
    assert_eq!(event_of(&late), "job.late");
    for _ in 0..3 {
        clock.advance(Duration::from_secs(11));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(hook.drain().is_empty(), "one late notification per expected fire");
}

#[tokio::test]
async fn destinations_keep_secrets_out_of_jobs_and_references_need_admin() {
    let mut options = Options::default();
    options.settings.tokens = Some(vec![
        "w:write:writer-0123456789abcdef".into(),
        "a:admin:admin-0123456789abcdef0".into(),
    ]);
    let app = TestApp::start(options).await;
    let post = |token: &'static str, notify: Value| {
        let app = &app;
        async move {
            let job =
                json!({"name": "n", "schedule": yearly(), "action": {"kind": "test"}, "notify": notify});
            let r = app
                .client
                .post(app.url("/v1/jobs"))
                .bearer_auth(token)
                .json(&job)
                .send()
                .await
                .unwrap();
            read(r).await
        }
    };
    let writer = "writer-0123456789abcdef";
    let admin = "admin-0123456789abcdef0";
    for (notify, pointer) in [
        (
            json!({"to": [{"url": "https://hooks.example.com/x", "secret": "whsec_literal"}]}),
            "/notify/to/0/secret",
        ),
        (
            json!({"to": [{"url": "https://hooks.example.com/x?token=s"}]}),
            "/notify/to/0/url",
        ),
        (
            json!({"to": [{"url": "https://u:p@hooks.example.com/x"}]}),
            "/notify/to/0/url",
        ),
        (
            json!({"to": [{"url": "https://x.example/${CRONGUARD_SECRET_A}"}]}),
            "/notify/to/0/url",
        ),
        (
            json!({"to": [{"url": "${CRONGUARD_SECRET_A}", "format": "slack", "secret": "${CRONGUARD_SECRET_B}"}]}),
            "/notify/to/0/secret",
        ),
        (json!({"on": ["failure", "failure"]}), "/notify/on/1"),
    ] {
        let (status, body) = post(admin, notify.clone()).await;
        assert_eq!(status, 422, "{notify}: {body}");
        assert_eq!(body["errors"][0]["pointer"], pointer, "{notify}: {body}");
    }
    let (status, body) = post(writer, json!({"on": ["sometimes"]})).await;
    assert!(status == 400 || status == 422, "{body}");
    let referenced = json!({"to": [{"url": "${CRONGUARD_SECRET_HOOK_URL}", "format": "slack"}]});
    let (status, body) = post(writer, referenced.clone()).await;
    assert_eq!(
        status, 403,
        "a write token cannot point notifications at a secret: {body}"
    );
    let (status, body) = post("admin-0123456789abcdef0", referenced).await;
    assert_eq!(status, 201, "{body}");
}

on_both_databases! {
    /// Many jobs recovering in the same instant: on PostgreSQL their
    /// successes end in one statement, which must still see each streak end.
    #[tokio::test]
    async fn many_jobs_failing_and_recovering_together_tell_one_of_each(db: Database) {
        const JOBS: usize = 20;
        let mut hook = Receiver::start().await;
        let switch = Switch::start().await;
        switch.set(false);
        let mut options = Options::default().on(&db);
        options.settings.notify_url = Some(hook.url("/hook"));
        let app = TestApp::start(options).await;
        for i in 0..JOBS {
            app.create(json!({
                "name": format!("j{i}"), "schedule": {"kind": "interval", "every": "1s"},
                "action": {"kind": "http", "url": switch.url},
            }))
            .await;
        }
        eventually("every job failing", || async {
            let (_, page) = app.get("/v1/jobs?health=failing&limit=100").await;
            (page["items"].as_array().unwrap().len() == JOBS).then_some(())
        })
        .await;
        switch.set(true);
        eventually("every job ok again", || async {
            let (_, page) = app.get("/v1/jobs?health=ok&limit=100").await;
            (page["items"].as_array().unwrap().len() == JOBS).then_some(())
        })
        .await;
        let mut told = std::collections::BTreeMap::<(String, String), u32>::new();
        for _ in 0..2 * JOBS {
            let hit = hook.next_on("/hook").await;
            let body: Value = serde_json::from_slice(&hit.body).unwrap();
            let key = (body["data"]["job_name"].as_str().unwrap().to_owned(), event_of(&hit));
            *told.entry(key).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(hook.drain().is_empty(), "more than one of each: {told:?}");
        assert_eq!(told.len(), 2 * JOBS, "{told:?}");
        assert!(told.values().all(|n| *n == 1), "{told:?}");
        app.stop().await;
    }
}

#[tokio::test]
async fn the_ssrf_guard_holds_for_notification_destinations() {
    let mut options = Options::default();
    options.settings.deny_private_networks = Some(true);
    let app = TestApp::start(options).await;
    let job = |name: &str, url: &str| {
        json!({
            "name": name, "schedule": yearly(), "action": {"kind": "test", "fail_attempts": 9},
            "notify": {"to": [{"url": url}]},
        })
    };
    for url in [
        "http://127.0.0.1:9/hook",
        "http://[::1]:9/hook",
        "http://169.254.169.254/hook",
        "http://[::ffff:10.0.0.1]/",
    ] {
        let (status, body) = app.post("/v1/jobs", job("literal", url)).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["errors"][0]["pointer"], "/notify/to/0/url", "{body}");
    }
    // A name is checked when it resolves, as for actions.
    app.create(job("named", "http://localhost:9/hook")).await;
    run_once(&app, "named").await;
    let refused = eventually("the delivery refused by the guard", || async {
        let page = notifications(&app.base, "status=pending").await;
        page.items.into_iter().find(|n| n.attempts >= 1)
    })
    .await;
    let error = refused.last_error.unwrap();
    assert!(error.contains("public address"), "{error}");
    app.stop().await;
}
