//! API throughput: `GET /v1/jobs/{id}` and `POST /v1/jobs` per second,
//! with a closed-loop load generator in this process (C connections, each
//! sending its next request when the previous answered).
//!
//! The release binary runs on a fresh database holding `--jobs` jobs
//! (hourly cron, none due during the measurement).
//!
//! Run: `cargo bench --bench api -- [--jobs 10000] [--connections 64] [--seconds 10]`.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Service, machine, percentile, seed};

/// Runs `connections` loops of `request` for `seconds`; returns requests
/// per second and sorted latencies in ms.
async fn load<F, Fut>(connections: usize, seconds: u64, request: F) -> (f64, Vec<f64>, u64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let request = Arc::new(request);
    let counter = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (request, counter, errors) = (request.clone(), counter.clone(), errors.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                if !request(n).await {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        });
    }
    let mut all = Vec::new();
    while let Some(Ok(l)) = tasks.join_next().await {
        all.extend(l);
    }
    let took = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (all.len() as f64 / took, all, errors.load(Ordering::Relaxed))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let jobs = arg("--jobs", 10_000) as usize;
    let connections = arg("--connections", 64) as usize;
    let seconds = arg("--seconds", 10);
    println!("cronguard API throughput (closed loop, {connections} connections, {seconds}s each)");
    println!("{}", machine());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("api.db");
    seed(&db, jobs).await;
    let service = Service::start(&db, &[]).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .expect("client");

    let base = service.base.clone();
    let get = {
        let (client, base) = (client.clone(), base.clone());
        move |n: u64| {
            let url = format!("{base}/v1/jobs/job-{}", n % jobs as u64);
            let client = client.clone();
            async move {
                match client.get(url).send().await {
                    Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        }
    };
    let (rate, latencies, errors) = load(connections, seconds, get).await;
    println!(
        "GET /v1/jobs/{{name}}: {rate:.0} req/s p50={:.2}ms p99={:.2}ms errors={errors} (jobs={jobs})",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );

    let create = {
        let (client, base) = (client.clone(), base.clone());
        move |n: u64| {
            let client = client.clone();
            let url = format!("{base}/v1/jobs");
            async move {
                let spec = serde_json::json!({
                    "name": format!("new-{n}"),
                    "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
                    "action": {"kind": "http", "url": "http://127.0.0.1:9/hook"},
                });
                match client.post(url).json(&spec).send().await {
                    Ok(r) => r.status() == 201 && r.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
        }
    };
    let (rate, latencies, errors) = load(connections, seconds, create).await;
    println!(
        "POST /v1/jobs: {rate:.0} creates/s p50={:.2}ms p99={:.2}ms errors={errors}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
}
