//! Fire lateness of the release binary against the floor, in one run.
//!
//! For each N: a receiver process records every request's arrival; first
//! the *floor* (N tokio tasks sleeping until each fire and posting with one
//! shared client — what no scheduler can beat on this machine) runs for
//! the window, then `cronguard serve` (release build, fresh database,
//! every run persisted) runs N jobs for the same window. Lateness is
//! arrival minus the scheduled instant (`X-Cronguard-Scheduled-At`).
//! Reports p50 / p99 / max for both and the ratio of the p99s, missed
//! fires (expected − received), duplicates (same job and instant twice),
//! and how many runs of the window the database holds as succeeded.
//!
//! Workloads: `aligned` (N jobs `* * * * * *`: N fires at each whole
//! second) and `spread` (N jobs `S-59/10 * * * * *` with S = i mod 10: N/10
//! fires every second, each job every 10 s).
//!
//! Replicas: `--postgres URL --replicas 1,2,3` runs cronguard on a fresh
//! database of that PostgreSQL server with 1, then 2, then 3 replicas (all
//! on this machine), the jobs created on one and spread over all; the
//! fires per second they sustain is the jobs' rate when nothing is missed.
//!
//! Flood: `--flood` runs both the floor and cronguard under the same API
//! flood (`common/flood.rs`: two `wrk -c 256` on `GET /v1/jobs` and `POST
//! /v1/schedules/preview`, 300 slowloris connections) — aimed at an idle
//! cronguard during the floor, at the measured one during its window — so
//! the ratio says whether the API can starve the engine.
//!
//! Subscribers: `--subscribers 100` keeps that many clients reading every
//! event of `GET /v1/events` during cronguard's window (the live feed's
//! cost on the engine); they report how many events each received.
//!
//! Run: `cargo bench --bench lateness -- [--workload aligned|spread]
//! [--jobs 100,1000] [--seconds 60] [--postgres URL --replicas 1,2,3]
//! [--flood] [--subscribers N]`.
//! Not a test: it asserts nothing.

#![allow(clippy::unwrap_used)] // A benchmark that cannot measure stops with the reason.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::flood::Flood;
use common::{Hit, ReceiverProcess, Service, floor, machine, percentile};
use futures_util::StreamExt;
use serde_json::json;
use sqlx::Connection;

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Aligned,
    Spread,
}

impl Workload {
    fn period(self) -> i64 {
        match self {
            Self::Aligned => 1,
            Self::Spread => 10,
        }
    }

    fn offset(self, i: usize) -> i64 {
        match self {
            Self::Aligned => 0,
            Self::Spread => (i % 10) as i64,
        }
    }

    fn expr(self, i: usize) -> String {
        match self {
            Self::Aligned => "* * * * * *".into(),
            Self::Spread => format!("{}-59/10 * * * * *", i % 10),
        }
    }
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
    received: usize,
    duplicates: usize,
    early: usize,
}

fn stats(hits: &[Hit], start: DateTime<Utc>, end: DateTime<Utc>) -> Stats {
    let (from, to) = (start.timestamp_millis(), end.timestamp_millis());
    let mut lateness = Vec::new();
    let mut seen: HashMap<(u64, i64), usize> = HashMap::new();
    for h in hits
        .iter()
        .filter(|h| h.scheduled_ms >= from && h.scheduled_ms < to)
    {
        lateness.push((h.at_us - h.scheduled_ms * 1000) as f64 / 1000.0);
        *seen.entry((h.job, h.scheduled_ms)).or_default() += 1;
    }
    lateness.sort_by(f64::total_cmp);
    Stats {
        p50: percentile(&lateness, 0.50),
        p99: percentile(&lateness, 0.99),
        max: lateness.last().copied().unwrap_or(f64::NAN),
        received: seen.len(),
        duplicates: seen.values().map(|c| c - 1).sum(),
        early: lateness.iter().filter(|l| **l < 0.0).count(),
    }
}

/// A window starting `lead` seconds from now on a whole second.
fn window(lead: i64, seconds: i64) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = DateTime::from_timestamp(Utc::now().timestamp() + lead, 0).expect("instant");
    (start, start + TimeDelta::seconds(seconds))
}

async fn sleep_past(end: DateTime<Utc>, extra: i64) {
    let wait = end + TimeDelta::seconds(extra) - Utc::now();
    tokio::time::sleep(wait.to_std().unwrap_or_default()).await;
}

/// Where cronguard keeps its state in a run.
#[derive(Clone)]
enum Target {
    Sqlite,
    /// A fresh database on this server, with this many replicas.
    Postgres(String, usize),
}

/// A fresh database on the PostgreSQL server `server`; its URL.
async fn fresh_database(server: &str) -> String {
    let name = format!("cronguard_bench_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(server)
        .await
        .expect("connect to --postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create the bench database");
    let (base, _) = server.rsplit_once('/').expect("a URL with a database name");
    format!("{base}/{name}")
}

/// Waits until the replicas agree on the set and own all `n` jobs.
async fn converged(services: &[Service], n: usize) {
    let client = reqwest::Client::new();
    loop {
        let mut owned = 0;
        let mut agreed = true;
        for s in services {
            let status: serde_json::Value = client
                .get(format!("{}/v1/status", s.base))
                .send()
                .await
                .expect("status")
                .json()
                .await
                .expect("status json");
            agreed &= status["replicas"]["replicas"].as_array().map(Vec::len) == Some(services.len());
            owned += status["replicas"]["owned_jobs"].as_u64().unwrap_or(0);
        }
        if agreed && owned == n as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `n` clients reading every event from `base` until `stop`; each
/// returns how many events it read.
fn subscribe(
    base: &str,
    n: usize,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|_| {
            let (url, stop) = (format!("{base}/v1/events"), stop.clone());
            tokio::spawn(async move {
                let mut response = reqwest::Client::new().get(url).send().await.expect("subscribe");
                assert_eq!(response.status(), 200, "subscribe");
                let mut events = 0;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return events,
                        chunk = response.chunk() => match chunk {
                            Ok(Some(bytes)) => events += bytes.windows(7).filter(|w| *w == b"\nevent:" || *w == b"\revent:").count() as u64
                                + u64::from(bytes.starts_with(b"event:")),
                            _ => return events,
                        },
                    }
                }
            })
        })
        .collect()
}

async fn run(
    workload: Workload,
    n: usize,
    seconds: i64,
    target: Target,
    flood: bool,
    subscribers: usize,
) -> String {
    let receiver = ReceiverProcess::start().await;
    let expected = n as i64 * seconds / workload.period();

    // Under a flood, the floor shares the machine with a flooded idle
    // cronguard.
    let idle_dir = tempfile::tempdir().expect("tempdir");
    let idle = if flood {
        let idle = Service::start(&idle_dir.path().join("idle.db"), &[]).await;
        let flood = Flood::start(&idle.base, seconds as u64 + 8);
        Some((idle, flood))
    } else {
        None
    };
    // The floor, with three seconds of warm-up before the window.
    let (start, end) = window(5, seconds);
    floor(
        &receiver.url,
        n,
        workload.period(),
        |i| workload.offset(i),
        start - TimeDelta::seconds(3),
        end,
    )
    .await;
    sleep_past(end, 2).await;
    let floor_stats = stats(&receiver.take().await, start, end);
    if let Some((idle, flood)) = idle {
        flood.finish().await;
        drop(idle);
    }

    // cronguard.
    let dir = tempfile::tempdir().expect("tempdir");
    let (database, replicas) = match &target {
        Target::Sqlite => (dir.path().join("bench.db").display().to_string(), 1),
        Target::Postgres(server, replicas) => (fresh_database(server).await, *replicas),
    };
    let mut services = Vec::new();
    for _ in 0..replicas {
        services.push(Service::start(std::path::Path::new(&database), &[]).await);
    }
    let client = reqwest::Client::new();
    let base = services[0].base.clone();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (client, base, url) = (client.clone(), base.clone(), receiver.url.clone());
            async move {
                let spec = json!({
                    "name": format!("bench-{i}"),
                    "schedule": {"kind": "cron", "expr": workload.expr(i)},
                    "action": {"kind": "http", "url": url, "timeout": "10s"},
                });
                let r = client
                    .post(format!("{base}/v1/jobs"))
                    .json(&spec)
                    .send()
                    .await
                    .expect("create");
                assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    if let Target::Postgres(..) = target {
        converged(&services, n).await;
    }
    let flooding = flood.then(|| Flood::start(&base, seconds as u64 + 6));
    let reading = tokio_util::sync::CancellationToken::new();
    let readers = subscribe(&base, subscribers, reading.clone());
    let (start, end) = window(4, seconds);
    sleep_past(end, 3).await;
    reading.cancel();
    let mut read = Vec::new();
    for reader in readers {
        read.push(reader.await.unwrap_or(0));
    }
    let ours = stats(&receiver.take().await, start, end);
    if let Some(flood) = flooding {
        flood.finish().await;
    }
    // Stop gracefully (every run committed), then count the window's runs.
    for service in &services {
        if let Some(pid) = service.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for service in &mut services {
        let _ = tokio::time::timeout(Duration::from_secs(60), service.child.wait()).await;
    }
    let count =
        "SELECT COUNT(*) FROM runs WHERE status = 'succeeded' AND scheduled_at >= $1 AND scheduled_at < $2";
    let url = match &target {
        Target::Sqlite => format!("sqlite://{database}"),
        Target::Postgres(..) => database.clone(),
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url)
        .await
        .expect("open the database");
    let (recorded,): (i64,) = sqlx::query_as(count)
        .bind(start.timestamp_millis())
        .bind(end.timestamp_millis())
        .fetch_one(&mut conn)
        .await
        .expect("count");
    let mut on = match &target {
        Target::Sqlite => "SQLite".to_owned(),
        Target::Postgres(_, r) => format!("PostgreSQL, {r} replica(s)"),
    };
    if flood {
        on.push_str(", both under the API flood");
    }
    if subscribers > 0 {
        let (least, most) = (read.iter().min().unwrap_or(&0), read.iter().max().unwrap_or(&0));
        on.push_str(&format!(
            ", {subscribers} subscribers on /v1/events during cronguard's window (each read {least}..{most} events)"
        ));
    }
    let rate = expected as f64 / seconds as f64;
    format!(
        "N={n:<6} window={seconds}s fires={expected:<7} ({rate:.0} fires/s) on {on}\n  \
         floor:     p50={:>8.2}ms p99={:>8.2}ms max={:>8.2}ms received={} missed={} duplicates={}\n  \
         cronguard: p50={:>8.2}ms p99={:>8.2}ms max={:>8.2}ms received={} missed={} duplicates={} early={} recorded_succeeded={recorded}\n  \
         p99 ratio cronguard/floor = {:.2}",
        floor_stats.p50,
        floor_stats.p99,
        floor_stats.max,
        floor_stats.received,
        expected - floor_stats.received as i64,
        floor_stats.duplicates,
        ours.p50,
        ours.p99,
        ours.max,
        ours.received,
        expected - ours.received as i64,
        ours.duplicates,
        ours.early,
        ours.p99 / floor_stats.p99,
    )
}

fn main() {
    if common::receiver_main() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let workload = match arg("--workload").as_deref() {
        None | Some("aligned") => Workload::Aligned,
        Some("spread") => Workload::Spread,
        Some(other) => panic!("--workload aligned|spread, not {other}"),
    };
    let jobs: Vec<usize> = arg("--jobs")
        .unwrap_or_else(|| "100,1000".into())
        .split(',')
        .map(|n| n.parse().expect("--jobs N[,N...]"))
        .collect();
    let seconds: i64 = arg("--seconds").map_or(60, |s| s.parse().expect("--seconds N"));
    let targets: Vec<Target> = match arg("--postgres") {
        None => vec![Target::Sqlite],
        Some(server) => arg("--replicas")
            .unwrap_or_else(|| "1".into())
            .split(',')
            .map(|r| Target::Postgres(server.clone(), r.parse().expect("--replicas R[,R...]")))
            .collect(),
    };
    let name = if workload == Workload::Aligned {
        "aligned"
    } else {
        "spread"
    };
    let flood = args.iter().any(|a| a == "--flood");
    let subscribers: usize = arg("--subscribers").map_or(0, |s| s.parse().expect("--subscribers N"));
    println!("cronguard fire lateness vs the floor ({name}: HTTP to a loopback receiver process)");
    println!("{}", machine());
    for n in jobs {
        for target in &targets {
            println!(
                "{}",
                run(workload, n, seconds, target.clone(), flood, subscribers).await
            );
        }
    }
}
