//! Registered-jobs scale: startup time, memory, idle CPU, scrape and read
//! latency with N jobs (hourly cron, spread over the hour).
//!
//! The jobs are written straight into a fresh database (as a previous
//! incarnation would have left them), then the release binary starts on it.
//!
//! Run: `cargo bench --bench scale -- [--jobs 100000]`.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Service, machine, percentile};
use sqlx::Connection;

async fn seed(db: &std::path::Path, n: usize) -> Duration {
    let started = Instant::now();
    // Let the binary create the schema, then fill it.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
        .args(["migrate", "--database"])
        .arg(db)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("migrate");
    assert!(status.success());
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open");
    let now = chrono::Utc::now().timestamp_millis();
    let mut tx = conn.begin().await.expect("begin");
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let spec = serde_json::json!({
            "name": format!("job-{i}"),
            "schedule": {"kind": "cron", "expr": format!("{} {} * * * *", i % 60, (i / 60) % 60)},
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

async fn time_get(client: &reqwest::Client, url: &str, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.get(url).send().await.expect("GET");
        assert!(r.status().is_success(), "{url}: {}", r.status());
        r.bytes().await.expect("body");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .iter()
        .position(|a| a == "--jobs")
        .and_then(|i| args.get(i + 1))
        .map_or(100_000, |v| v.parse().expect("--jobs N"));
    println!("cronguard registered-jobs scale (hourly cron jobs spread over the hour)");
    println!("{}", machine());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("scale.db");
    let seeded = seed(&db, n).await;
    let started = Instant::now();
    let service = Service::start(&db, &[]).await;
    let ready = started.elapsed();
    let rss = service.rss();
    let cpu0 = service.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu = (service.cpu_seconds() - cpu0) / 5.0;

    let client = reqwest::Client::new();
    let metrics = time_get(&client, &format!("{}/metrics", service.base), 50).await;
    let job = time_get(&client, &format!("{}/v1/jobs/job-{}", service.base, n / 2), 200).await;
    let list = time_get(&client, &format!("{}/v1/jobs?limit=100", service.base), 50).await;
    println!(
        "jobs={n} seeded_in={:.1}s ready_after_start={:.2}s rss={:.0}MiB idle_cpu={:.1}% \
         metrics_ms p50={:.2} max={:.2} get_job_ms p50={:.2} p99={:.2} list_100_ms p50={:.2}",
        seeded.as_secs_f64(),
        ready.as_secs_f64(),
        rss as f64 / (1024.0 * 1024.0),
        idle_cpu * 100.0,
        percentile(&metrics, 0.5),
        metrics.last().copied().unwrap_or(f64::NAN),
        percentile(&job, 0.5),
        percentile(&job, 0.99),
        percentile(&list, 0.5),
    );
}
