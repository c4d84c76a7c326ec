//! Test harness: the real service in-process or as the real binary, a
//! recording HTTP receiver, and small HTTP helpers.
//!
//! Nothing here sleeps to wait for something that can be awaited: the app
//! signals readiness, the receiver pushes hits into a channel, the binary's
//! log says when it is up. Where state changes asynchronously in the
//! database, [`eventually`] retries a check with a generous deadline.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use cronguard::api::jobs::JobView;
use cronguard::api::runs::RunPage;
use cronguard::app::App;
use cronguard::clock::{ManualClock, SharedClock, SystemClock};
use cronguard::config::{Config, Settings};
use cronguard::run::{Run, RunStatus};
use cronguard::shutdown::Shutdown;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before it fails. Generous:
/// CI is a busy 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// An HTTP client for tests (TLS provider installed as the service does).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Fails the test if `fut` takes longer than [`PATIENCE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Retries `check` until it returns `Some`, for state that settles
/// asynchronously (a run's final row is committed after its action ends).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// A running in-process service.
pub struct TestApp {
    pub base: String,
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub shutdown: Shutdown,
    pub dir: Arc<tempfile::TempDir>,
    /// The SQLite file (unused when the suite runs on PostgreSQL).
    pub db: PathBuf,
    /// The database URL the app runs on.
    pub database: String,
    pub faults: Arc<cronguard::fault::Faults>,
    task: Option<JoinHandle<Result<(), cronguard::app::AppError>>>,
}

/// The database a test's apps run on, passed in [`Options`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file in the app's directory.
    #[default]
    Sqlite,
    /// A fresh database on this PostgreSQL server.
    Postgres(String),
}

impl Database {
    /// PostgreSQL, if a server answers (see [`postgres_server`], which
    /// blocks: it runs beside the test's runtime).
    pub async fn postgres() -> Option<Self> {
        tokio::task::spawn_blocking(postgres_server)
            .await
            .ok()
            .flatten()
            .map(Self::Postgres)
    }
}

/// Says on stderr that a PostgreSQL test did not run (libtest hides the
/// `eprintln!` of passing tests; CI fails on this line).
pub fn skipped_without_postgres(test: &str) {
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("\nSKIPPED postgres::{test}: no PostgreSQL reachable (set CRONGUARD_TEST_POSTGRES)\n")
            .as_bytes(),
    );
}

/// Defines a test that runs on SQLite and again on PostgreSQL, as
/// `NAME::sqlite` and `NAME::postgres`: the body gets the [`Database`] to
/// pass to every app it starts. Without a reachable PostgreSQL server the
/// second says SKIPPED (which CI refuses) and passes.
macro_rules! on_both_databases {
    ($(#[$attr:meta])* async fn $name:ident($db:ident: Database) $body:block) => {
        pub(crate) mod $name {
            #[allow(unused_imports)]
            use super::*;
            use crate::helpers::Database;

            async fn body($db: Database) $body

            $(#[$attr])*
            async fn sqlite() {
                body(Database::Sqlite).await;
            }

            $(#[$attr])*
            async fn postgres() {
                match Database::postgres().await {
                    Some(db) => body(db).await,
                    None => crate::helpers::skipped_without_postgres(module_path!()),
                }
            }
        }
    };
}
pub(crate) use on_both_databases;

/// The PostgreSQL server for tests, if one answers: `CRONGUARD_TEST_POSTGRES`
/// or the machine's default. Checked once; databases left by earlier runs
/// (`cronguard_test_*`) are dropped then.
pub fn postgres_server() -> Option<String> {
    static SERVER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| {
            let url = std::env::var("CRONGUARD_TEST_POSTGRES")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let connect = sqlx::PgConnection::connect(&url);
                let mut conn = tokio::time::timeout(Duration::from_secs(5), connect)
                    .await
                    .ok()?
                    .ok()?;
                let stale: Vec<String> = sqlx::query_scalar(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'cronguard\\_test\\_%'",
                )
                .fetch_all(&mut conn)
                .await
                .ok()?;
                for name in stale {
                    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&mut conn).await;
                }
                Some(url)
            })
        })
        .clone()
}

/// The database URL for an app whose state lives in `dir`: the SQLite file
/// there, or on PostgreSQL a fresh database whose URL is remembered in
/// `dir` (so that a restart on the same `dir` finds the same data).
pub async fn database_for(dir: &Path, database: &Database) -> String {
    let Database::Postgres(server) = database else {
        return format!("sqlite://{}", dir.join("cronguard.db").display());
    };
    let remembered = dir.join("postgres-url");
    if let Ok(url) = std::fs::read_to_string(&remembered) {
        return url;
    }
    use sqlx::Connection;
    let name = format!("cronguard_test_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to CRONGUARD_TEST_POSTGRES");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let (base, _) = server.rsplit_once('/').expect("a URL with a database name");
    let url = format!("{base}/{name}");
    std::fs::write(&remembered, &url).expect("remember the database");
    url
}

/// A pool on the app's database, whichever backend (statements must use
/// portable SQL: `$1` placeholders).
pub async fn any_pool(database: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(database)
        .await
        .expect("connect to the app's database")
}

/// Options for [`TestApp::start`].
pub struct Options {
    pub settings: Settings,
    pub clock: SharedClock,
    pub dir: Option<Arc<tempfile::TempDir>>,
    pub database: Database,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            settings: Settings::default(),
            clock: Arc::new(SystemClock),
            dir: None,
            database: Database::Sqlite,
        }
    }
}

impl Options {
    pub fn commands() -> Self {
        let mut o = Self::default();
        o.settings.enable_command_jobs = Some(true);
        o
    }

    /// The same options on `database`.
    pub fn on(self, database: &Database) -> Self {
        Self {
            database: database.clone(),
            ..self
        }
    }

    pub fn manual_clock(clock: &ManualClock) -> Self {
        Self {
            clock: Arc::new(clock.clone()),
            ..Self::default()
        }
    }
}

/// A fixed instant for manual-clock tests.
pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-06-01T12:00:00Z")
        .unwrap()
        .to_utc()
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::start(Options::default()).await
    }

    pub async fn start(options: Options) -> Self {
        Self::try_start(options).await.expect("build")
    }

    /// Like [`TestApp::start`], returning the error if the app does not build.
    pub async fn try_start(options: Options) -> Result<Self, cronguard::app::AppError> {
        let dir = options
            .dir
            .unwrap_or_else(|| Arc::new(tempfile::tempdir().expect("tempdir")));
        let db = dir.path().join("cronguard.db");
        let database = database_for(dir.path(), &options.database).await;
        let mut settings = options.settings;
        settings.listen.get_or_insert_with(|| "127.0.0.1:0".into());
        settings.database = Some(database.clone());
        settings.shutdown_grace.get_or_insert_with(|| "5s".into());
        let mut config = Config::from_settings(settings).expect("config");
        config.command_shim = Some(PathBuf::from(env!("CARGO_BIN_EXE_cronguard")));
        let app = App::build(config, options.clock).await?;
        let addr = app.local_addr();
        let health = app.health();
        let faults = app.faults();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        within("the schedule to load", health.wait_schedule_loaded()).await;
        Ok(Self {
            base: format!("http://{addr}"),
            addr,
            client: client(),
            shutdown,
            dir,
            db,
            database,
            faults,
            task: Some(task),
        })
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        metrics_text(&self.client, &self.url("/metrics")).await
    }

    /// Graceful stop; returns once the app has finished.
    pub async fn stop(mut self) {
        self.shutdown.stop.cancel();
        if let Some(task) = self.task.take() {
            within("the app to stop", task)
                .await
                .expect("app task")
                .expect("app result");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("GET");
        read(r).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        read(r).await
    }

    pub async fn post_empty(&self, path: &str) -> (StatusCode, Value) {
        let r = self.client.post(self.url(path)).send().await.expect("POST");
        read(r).await
    }

    /// The local times of `count` fires of `schedule` after `after`,
    /// through the preview API.
    pub async fn preview(&self, schedule: Value, after: &str, count: u32) -> Vec<String> {
        let (status, body) = self
            .post(
                "/v1/schedules/preview",
                json!({"schedule": schedule, "after": after, "count": count}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["fires"]
            .as_array()
            .expect("fires")
            .iter()
            .map(|f| f["local"].as_str().expect("local").to_owned())
            .collect()
    }

    /// Creates a job, asserting 201.
    pub async fn create(&self, spec: Value) -> JobView {
        let (status, body) = self.post("/v1/jobs", spec).await;
        assert_eq!(status, StatusCode::CREATED, "create failed: {body}");
        view(body)
    }

    /// Runs of a job, newest first.
    pub async fn runs(&self, job: &str) -> Vec<Run> {
        let (status, body) = self.get(&format!("/v1/jobs/{job}/runs?limit=500")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        view::<RunPage>(body).items
    }

    /// A run, asserting 200.
    pub async fn run(&self, id: impl std::fmt::Display) -> Run {
        let (status, body) = self.get(&format!("/v1/runs/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        view(body)
    }

    /// A job, asserting 200.
    pub async fn job(&self, name: &str) -> JobView {
        let (status, body) = self.get(&format!("/v1/jobs/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        view(body)
    }

    /// Triggers a job, asserting 202, and returns the run it queued.
    pub async fn trigger(&self, job: &str) -> Run {
        let (status, body) = self.post_empty(&format!("/v1/jobs/{job}/trigger")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        view(body)
    }

    /// Waits until run `id` is final and returns it.
    pub async fn final_run(&self, id: impl std::fmt::Display) -> Run {
        final_run(&self.base, id).await
    }
}

/// A response body read into the crate's own view type: a field the API
/// renamed or retyped fails here, where the test reads it.
pub fn view<T: serde::de::DeserializeOwned>(body: Value) -> T {
    match serde_json::from_value(body.clone()) {
        Ok(v) => v,
        Err(e) => panic!("{} does not read as {}: {e}", body, std::any::type_name::<T>()),
    }
}

/// Waits until run `id` of the service at `base` is final and returns it.
pub async fn final_run(base: &str, id: impl std::fmt::Display) -> Run {
    let client = client();
    eventually(&format!("run {id} to end"), || async {
        let r = client.get(format!("{base}/v1/runs/{id}")).send().await.ok()?;
        let (status, run) = read(r).await;
        if status != StatusCode::OK {
            return None;
        }
        let run: Run = view(run);
        (!matches!(run.status, RunStatus::Running | RunStatus::Queued)).then_some(run)
    })
    .await
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.stop.cancel();
        self.shutdown.kill.cancel();
    }
}

pub async fn read(r: reqwest::Response) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(r.status().as_u16()).expect("status");
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// An HTTP action aimed at `url`.
pub fn http_job(name: &str, schedule: Value, url: &str) -> Value {
    json!({
        "name": name,
        "schedule": schedule,
        "action": {"kind": "http", "method": "POST", "url": url},
    })
}

pub fn every_second() -> Value {
    json!({"kind": "cron", "expr": "* * * * * *"})
}

/// A request the receiver got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub at: DateTime<Utc>,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Hit {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    pub fn scheduled_at(&self) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(self.header("x-cronguard-scheduled-at"))
            .expect("scheduled-at header")
            .to_utc()
    }
}

/// A local HTTP server recording every request. `/status/<code>` answers
/// with that code, `/sleep/<ms>` answers after a delay; anything else 200.
pub struct Receiver {
    pub base: String,
    rx: mpsc::UnboundedReceiver<Hit>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0").await
    }

    /// A receiver on `addr` (a port that was down until now, say).
    pub async fn start_on(addr: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        fn record(tx: &mpsc::UnboundedSender<Hit>, path: String, headers: HeaderMap, body: Bytes) {
            let _ = tx.send(Hit {
                at: Utc::now(),
                path,
                headers,
                body,
            });
        }
        let app = axum::Router::new()
            .route(
                "/status/{code}",
                axum::routing::any(
                    |State(tx): State<mpsc::UnboundedSender<Hit>>,
                     UrlPath(code): UrlPath<u16>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        record(&tx, format!("/status/{code}"), headers, body);
                        StatusCode::from_u16(code).unwrap_or(StatusCode::OK)
                    },
                ),
            )
            .route(
                "/sleep/{ms}",
                axum::routing::any(
                    |State(tx): State<mpsc::UnboundedSender<Hit>>,
                     UrlPath(ms): UrlPath<u64>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        record(&tx, format!("/sleep/{ms}"), headers, body);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        "slept"
                    },
                ),
            )
            .fallback(
                |State(tx): State<mpsc::UnboundedSender<Hit>>,
                 uri: axum::http::Uri,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    record(&tx, uri.path().to_owned(), headers, body);
                    "ok"
                },
            )
            .with_state(tx);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base: format!("http://{addr}"),
            rx,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The next request, failing the test if none comes in time.
    pub async fn next(&mut self) -> Hit {
        within("a request at the receiver", self.rx.recv())
            .await
            .expect("receiver closed")
    }

    /// The next request on `path`, skipping others.
    pub async fn next_on(&mut self, path: &str) -> Hit {
        loop {
            let hit = self.next().await;
            if hit.path == path {
                return hit;
            }
        }
    }

    /// Requests already received, without waiting.
    pub fn drain(&mut self) -> Vec<Hit> {
        let mut out = Vec::new();
        while let Ok(hit) = self.rx.try_recv() {
            out.push(hit);
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port nothing listens on (yet): bound, then released.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The real `cronguard` binary, started with `serve`.
pub struct Binary {
    pub child: Child,
    pub base: String,
    pub db: PathBuf,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Binary {
    /// Starts `cronguard serve` on an ephemeral port with the database in
    /// `dir`, and waits until it logs that the schedule is loaded.
    pub async fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(dir, extra, &[]).await
    }

    /// Like [`Binary::start`], with extra environment variables.
    pub async fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let db = dir.join("cronguard.db");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cronguard"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(if extra.contains(&"--log") {
                &[][..]
            } else {
                &["--log", "info"][..]
            })
            .args(if extra.contains(&"--database") {
                Vec::new()
            } else {
                vec!["--database".to_owned(), format!("sqlite://{}", db.display())]
            })
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn cronguard");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if std::env::var_os("CRONGUARD_TEST_LOG").is_some() {
                    eprintln!("[cronguard] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        within("the binary to start", async {
            while let Some(line) = lines.recv().await {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["message"] == "cronguard started" {
                    addr = v["addr"].as_str().map(str::to_owned);
                }
                if v["message"] == "schedule loaded" {
                    return;
                }
            }
            panic!("cronguard exited during startup");
        })
        .await;
        Self {
            child,
            base: format!("http://{}", addr.expect("addr in log")),
            db,
            lines,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("pid") as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait(&mut self) -> Option<i32> {
        within("the binary to exit", self.child.wait())
            .await
            .expect("wait")
            .code()
    }

    /// Waits for the process to exit and returns every log line it wrote
    /// that was not consumed yet.
    pub async fn drain_logs(&mut self) -> String {
        self.wait().await;
        let mut out = String::new();
        within("the log to end", async {
            while let Some(line) = self.lines.recv().await {
                out.push_str(&line);
                out.push('\n');
            }
        })
        .await;
        out
    }

    /// Waits for a JSON log line whose `message` is `message`.
    pub async fn log_line(&mut self, message: &str) -> Value {
        within(&format!("log line `{message}`"), async {
            while let Some(line) = self.lines.recv().await {
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["message"] == message {
                    return v;
                }
            }
            panic!("cronguard exited before logging `{message}`");
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = client().get(self.url(path)).send().await.expect("GET");
        read(r).await
    }

    /// The metrics text.
    pub async fn metrics(&self) -> String {
        metrics_text(&client(), &self.url("/metrics")).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = client()
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        read(r).await
    }
}

/// The metrics text at `url`.
async fn metrics_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The value of the metric sample `series` (name with labels, exactly as
/// exposed) in a Prometheus text exposition.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Whether a process is gone or exited (a zombie awaiting its reaper).
pub fn process_dead(pid: i32) -> bool {
    cronguard::procfs::read(pid).is_none_or(|p| p.is_zombie())
}
