//! API throughput: `GET /v1/jobs/{id}` and `POST /v1/jobs` per second.
//!
//! The load generator is `wrk` (Debian's package `wrk`: one thread of C,
//! so the service gets most of the two cores) when it is installed, else a
//! closed-loop generator in this process (reqwest; it takes about as much
//! CPU as the service, so it under-reports). Both keep C connections busy,
//! each sending its next request when the previous answered. GETs walk the
//! registered jobs by name; every POST creates a new job.
//!
//! The release binary runs on a fresh database holding `--jobs` jobs
//! (hourly cron, none due during the measurement).
//!
//! Run: `cargo bench --bench api -- [--jobs 10000] [--connections 64]
//! [--seconds 10] [--generator wrk|builtin]`.

#![allow(clippy::unwrap_used)] // A benchmark that cannot measure stops with the reason.

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

/// wrk script: GETs cycle through `job-0 … job-{jobs-1}`, POSTs create
/// `new-{thread}-{n}`; `done` prints the figures this bench parses.
const WRK_SCRIPT: &str = r#"
local mode, jobs, n = "get", 1, 0
function init(args)
  mode = args[1]
  jobs = tonumber(args[2])
end
function request()
  n = n + 1
  if mode == "get" then
    return wrk.format("GET", "/v1/jobs/job-" .. (n % jobs))
  end
  local body = '{"name":"new-' .. n .. '","schedule":{"kind":"cron","expr":"0 0 1 1 *"},'
    .. '"action":{"kind":"http","url":"http://127.0.0.1:9/hook"}}'
  return wrk.format("POST", "/v1/jobs", {["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK rate=%.0f p50=%.2f p99=%.2f errors=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    e.status + e.connect + e.read + e.write + e.timeout))
end
"#;

/// Runs wrk (one thread) against `base`; returns its `WRK …` summary line.
fn wrk(base: &str, script: &std::path::Path, connections: usize, seconds: u64, args: &[&str]) -> String {
    let out = std::process::Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"])
        .arg(script)
        .arg(base)
        .arg("--")
        .args(args)
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("WRK "))
        .unwrap_or_else(|| panic!("wrk printed no summary: {text}"))
        .to_owned()
}

fn has_wrk() -> bool {
    std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok()
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
    let generator = args
        .iter()
        .position(|a| a == "--generator")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| if has_wrk() { "wrk" } else { "builtin" }.to_owned());
    println!(
        "cronguard API throughput ({generator}, closed loop, {connections} connections, {seconds}s each)"
    );
    println!("{}", machine());
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("api.db");
    seed(&db, jobs).await;
    let service = Service::start(&db, &[]).await;
    if generator == "wrk" {
        let script = dir.path().join("api.lua");
        std::fs::write(&script, WRK_SCRIPT).expect("write wrk script");
        let jobs_arg = jobs.to_string();
        let get = wrk(&service.base, &script, connections, seconds, &["get", &jobs_arg]);
        println!("GET /v1/jobs/{{name}}: {get} (jobs={jobs})");
        let post = wrk(&service.base, &script, connections, seconds, &["post", &jobs_arg]);
        println!("POST /v1/jobs: {post}");
        return;
    }
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
