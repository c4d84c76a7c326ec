//! Registered-jobs scale: startup time, memory, idle CPU, scrape and read
//! latency with N jobs (hourly cron, spread over 50 minutes of the hour so
//! that none is due during the measurement), and the time to be ready
//! again after a restart.
//!
//! The jobs are written straight into a fresh database (as a previous
//! incarnation would have left them), then the release binary starts on it.
//!
//! Run: `cargo bench --bench scale -- [--jobs 100000]`.

#![allow(clippy::unwrap_used)] // A benchmark that cannot measure stops with the reason.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Service, machine, percentile, seed};

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
    let mut service = Service::start(&db, &[]).await;
    let ready = started.elapsed();
    let rss = service.rss();
    let cpu0 = service.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu = (service.cpu_seconds() - cpu0) / 5.0;

    let client = reqwest::Client::new();
    let metrics = time_get(&client, &format!("{}/metrics", service.base), 50).await;
    let job = time_get(&client, &format!("{}/v1/jobs/job-{}", service.base, n / 2), 200).await;
    let list = time_get(&client, &format!("{}/v1/jobs?limit=100", service.base), 50).await;
    // Restart: SIGTERM, then start again on the same database.
    if let Some(pid) = service.child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(120), service.child.wait()).await;
    let restarted = Instant::now();
    let service = Service::start(&db, &[]).await;
    let ready_again = restarted.elapsed();
    let rss_again = service.rss();
    println!(
        "jobs={n} seeded_in={:.1}s ready_after_start={:.2}s rss={:.0}MiB idle_cpu={:.1}% \
         metrics_ms p50={:.2} max={:.2} get_job_ms p50={:.2} p99={:.2} list_100_ms p50={:.2} \
         ready_after_restart={:.2}s rss_after_restart={:.0}MiB",
        seeded.as_secs_f64(),
        ready.as_secs_f64(),
        rss as f64 / (1024.0 * 1024.0),
        idle_cpu * 100.0,
        percentile(&metrics, 0.5),
        metrics.last().copied().unwrap_or(f64::NAN),
        percentile(&job, 0.5),
        percentile(&job, 0.99),
        percentile(&list, 0.5),
        ready_again.as_secs_f64(),
        rss_again as f64 / (1024.0 * 1024.0),
    );
}
