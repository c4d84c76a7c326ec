//! Fire lateness of the release binary under N every-second jobs.
//!
//! Starts `cronguard serve` (release build) on a fresh database, registers
//! N jobs `* * * * * *` whose HTTP action posts to a receiver in this
//! process, and measures for each request: arrival minus the scheduled
//! instant (`X-Cronguard-Scheduled-At`). Reports p50 / p99 / max lateness,
//! missed fires (expected − received) and duplicates (same job and second
//! twice), then checks that every run of the window is recorded.
//!
//! Run: `cargo bench --bench lateness -- [--jobs 100,1000] [--seconds 30]`.
//! Not a test: it asserts nothing and prints figures with the machine.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use chrono::{DateTime, TimeDelta, Utc};
use common::{Service, machine, percentile};
use serde_json::{Value, json};

type Hits = Arc<Mutex<Vec<(String, DateTime<Utc>, DateTime<Utc>)>>>;

async fn receiver() -> (String, Hits) {
    let hits: Hits = Arc::default();
    let app = axum::Router::new()
        .fallback(|State(hits): State<Hits>, headers: HeaderMap| async move {
            let at = Utc::now();
            let job = headers
                .get("x-cronguard-job")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let scheduled = headers
                .get("x-cronguard-scheduled-at")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                .map(|d| d.to_utc());
            if let Some(scheduled) = scheduled {
                hits.lock().unwrap().push((job, scheduled, at));
            }
            "ok"
        })
        .with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hit", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

async fn run(n: usize, seconds: i64) -> String {
    let (url, hits) = receiver().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut service = Service::start(&dir.path().join("bench.db"), &[]).await;
    let client = reqwest::Client::new();
    for i in 0..n {
        let spec = json!({
            "name": format!("bench-{i}"),
            "schedule": {"kind": "cron", "expr": "* * * * * *"},
            "action": {"kind": "http", "url": url, "timeout": "10s"},
        });
        let r = client
            .post(format!("{}/v1/jobs", service.base))
            .json(&spec)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    }
    // Measure whole seconds after a warm-up of two seconds.
    let now = Utc::now();
    let start = DateTime::from_timestamp(now.timestamp() + 3, 0).unwrap();
    let end = start + TimeDelta::seconds(seconds);
    tokio::time::sleep((end - Utc::now() + TimeDelta::seconds(3)).to_std().unwrap()).await;
    let all = std::mem::take(&mut *hits.lock().unwrap());
    let mut lateness = Vec::new();
    let mut seen: HashMap<(String, DateTime<Utc>), u32> = HashMap::new();
    for (job, scheduled, at) in all {
        if scheduled < start || scheduled >= end {
            continue;
        }
        lateness.push((at - scheduled).num_microseconds().unwrap() as f64 / 1000.0);
        *seen.entry((job, scheduled)).or_default() += 1;
    }
    lateness.sort_by(f64::total_cmp);
    let expected = n as i64 * seconds;
    let unique = seen.len() as i64;
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    let early = lateness.iter().filter(|l| **l < 0.0).count();

    // Every run of the window is recorded (and final) in the database.
    let mut recorded = 0;
    let mut cursor = String::new();
    loop {
        let page: Value = client
            .get(format!("{}/v1/runs?limit=500{cursor}", service.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for r in page["items"].as_array().unwrap() {
            let at = DateTime::parse_from_rfc3339(r["scheduled_at"].as_str().unwrap())
                .unwrap()
                .to_utc();
            if at >= start && at < end && r["status"] == "succeeded" {
                recorded += 1;
            }
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let _ = service.child.kill().await;
    format!(
        "N={n:<6} window={seconds}s fires={expected:<7} received={unique:<7} missed={:<5} duplicates={duplicates:<3} early={early} \
         lateness_ms p50={:.2} p99={:.2} max={:.2} recorded_succeeded={recorded}",
        expected - unique,
        percentile(&lateness, 0.50),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(f64::NAN),
    )
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let jobs: Vec<usize> = arg("--jobs")
        .unwrap_or_else(|| "100,1000".into())
        .split(',')
        .map(|n| n.parse().expect("--jobs N[,N...]"))
        .collect();
    let seconds: i64 = arg("--seconds").map_or(30, |s| s.parse().expect("--seconds N"));
    println!("cronguard fire lateness (every-second jobs, HTTP to a loopback receiver)");
    println!("{}", machine());
    for n in jobs {
        println!("{}", run(n, seconds).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
