//! Shared by the benchmarks: start the release binary, describe the machine.

#![allow(dead_code)]

pub mod flood;

use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running `cronguard serve` (release build).
pub struct Service {
    pub child: tokio::process::Child,
    pub base: String,
}

impl Service {
    /// Starts the binary on `db` and waits for its schedule to load.
    pub async fn start(db: &Path, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--log", "warn,cronguard::app=info,cronguard::engine=info"])
            .arg("--database")
            .arg(db)
            .args(extra)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start cronguard (built by cargo bench)");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut base = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["message"] == "cronguard started" {
                base = v["addr"].as_str().map(|a| format!("http://{a}"));
            }
            if v["message"] == "schedule loaded" {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            base: base.expect("cronguard did not start"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("pid")
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// CPU time (user + system) in seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        ticks / 100.0
    }
}

/// Percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The machine and the commit measured.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "machine: {} cores, {cpu}; commit {commit}; {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    )
}

/// One request the receiver got: job header, scheduled instant (ms), arrival (µs).
#[derive(Debug, Clone, Copy)]
pub struct Hit {
    pub job: u64,
    pub scheduled_ms: i64,
    pub at_us: i64,
}

/// The HTTP receiver, in its own process (`<bench> --receiver`): the floor
/// client and cronguard then each have a whole process's file limit, and
/// the receiver's work is not charged to either. It records
/// `(X-Cronguard-Job-Name, X-Cronguard-Scheduled-At, arrival)` and hands
/// them out on `GET /__hits` (one `job scheduled_ms at_us` line each).
pub struct ReceiverProcess {
    pub child: tokio::process::Child,
    pub url: String,
    base: String,
}

impl ReceiverProcess {
    pub async fn start() -> Self {
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("exe"))
            .arg("--receiver")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the receiver");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = lines.next_line().await.ok().flatten().expect("receiver address");
        Self {
            child,
            url: format!("http://{addr}/hit"),
            base: format!("http://{addr}"),
        }
    }

    /// Takes every hit recorded so far.
    pub async fn take(&self) -> Vec<Hit> {
        let text = reqwest::get(format!("{}/__hits", self.base))
            .await
            .expect("GET /__hits")
            .text()
            .await
            .expect("hits");
        text.lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some(Hit {
                    job: f.next()?.parse().ok()?,
                    scheduled_ms: f.next()?.parse().ok()?,
                    at_us: f.next()?.parse().ok()?,
                })
            })
            .collect()
    }
}

/// Runs the receiver if this process was started as one; returns whether it was.
pub fn receiver_main() -> bool {
    if !std::env::args().any(|a| a == "--receiver") {
        return false;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use axum::http::HeaderMap;
        use std::sync::{Arc, Mutex};
        type Hits = Arc<Mutex<Vec<Hit>>>;
        let hits: Hits = Arc::default();
        let record = |headers: &HeaderMap| -> Option<Hit> {
            let at_us = chrono::Utc::now().timestamp_micros();
            let job = headers.get("x-cronguard-job-name")?.to_str().ok()?;
            let job = job.rsplit('-').next()?.parse().ok()?;
            let scheduled = headers.get("x-cronguard-scheduled-at")?.to_str().ok()?;
            let scheduled_ms = chrono::DateTime::parse_from_rfc3339(scheduled)
                .ok()?
                .timestamp_millis();
            Some(Hit {
                job,
                scheduled_ms,
                at_us,
            })
        };
        let app = axum::Router::new()
            .route(
                "/__hits",
                axum::routing::get(
                    |axum::extract::State(hits): axum::extract::State<Hits>| async move {
                        let taken = std::mem::take(&mut *hits.lock().unwrap());
                        let mut out = String::with_capacity(taken.len() * 40);
                        for h in taken {
                            out.push_str(&format!("{} {} {}\n", h.job, h.scheduled_ms, h.at_us));
                        }
                        out
                    },
                ),
            )
            .fallback(
                move |axum::extract::State(hits): axum::extract::State<Hits>, headers: HeaderMap| async move {
                    if let Some(hit) = record(&headers) {
                        hits.lock().unwrap().push(hit);
                    }
                    "ok"
                },
            )
            .with_state(hits);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        axum::serve(listener, app).await.expect("serve");
    });
    true
}

/// The floor: what no scheduler can beat on this machine. `n` tokio tasks
/// in one process, each sleeping until its next fire (`period` seconds,
/// offset `offset(i)` seconds) and posting to `url` with one shared
/// client, with the headers cronguard sends. Runs from `start` until `end`.
pub async fn floor(
    url: &str,
    n: usize,
    period: i64,
    offset: impl Fn(usize) -> i64,
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) {
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url) = (client.clone(), url.to_owned());
        let off = offset(i);
        tasks.spawn(async move {
            // The first fire at or after `start` on this task's grid.
            let base = start.timestamp();
            let mut next = base + (off - base).rem_euclid(period);
            while next < end.timestamp() {
                let at = chrono::DateTime::from_timestamp(next, 0).expect("instant");
                let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
                tokio::time::sleep(wait).await;
                let _ = client
                    .post(&url)
                    .header("x-cronguard-job-name", format!("floor-{i}"))
                    .header(
                        "x-cronguard-scheduled-at",
                        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    )
                    .send()
                    .await;
                next += period;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Writes `n` jobs straight into a fresh database at `db` (as a previous
/// incarnation would have left them): hourly cron `S M * * * *`, spread
/// over the 50 minutes that start 5 minutes from now, so none is due while
/// a benchmark measures. Returns how long it took.
pub async fn seed(db: &Path, n: usize) -> std::time::Duration {
    use sqlx::Connection;
    let started = std::time::Instant::now();
    // Let the binary create the schema, then fill it.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
        .args(["migrate", "--database"])
        .arg(db)
        .stdout(Stdio::null())
        .status()
        .expect("migrate");
    assert!(status.success());
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open");
    let now = chrono::Utc::now();
    let first_minute = (now.timestamp() / 60 + 5) % 60;
    let now = now.timestamp_millis();
    let mut tx = conn.begin().await.expect("begin");
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let minute = (first_minute + (i as i64 / 60) % 50) % 60;
        let spec = serde_json::json!({
            "name": format!("job-{i}"),
            "schedule": {"kind": "cron", "expr": format!("{} {minute} * * * *", i % 60)},
            "action": {"kind": "http", "url": "http://127.0.0.1:9/hook"},
        });
        sqlx::query(
            "INSERT INTO jobs (id, name, spec, paused, source, version, created_at, updated_at, cursor_at) \
             VALUES (?, ?, ?, 0, 'api', 1, ?, ?, ?)",
        )
        .bind(&id)
        .bind(format!("job-{i}"))
        .bind(spec.to_string())
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .expect("insert");
    }
    tx.commit().await.expect("commit");
    started.elapsed()
}
