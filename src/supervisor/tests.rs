//! The supervisor's admission and backlog on a manual clock, over a real
//! SQLite store and the `test` action (fault-injection builds).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::action::ActionPolicy;
use crate::clock::ManualClock;
use crate::executor::{Executor, ExecutorConfig};
use crate::health::Health;
use crate::job::{JobSpec, Source};
use crate::loops::Services;
use crate::metrics::Metrics;
use crate::store::{NewJob, SqliteOptions, Store};

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
        .unwrap()
        .to_utc()
}

struct Rig {
    store: Store,
    clock: ManualClock,
    handle: SupervisorHandle,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A supervisor allowing `max_running` runs, serving until the rig's stop.
async fn rig(max_running: usize) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let (changes, _) = tokio::sync::mpsc::unbounded_channel();
    let (store, writer) = Store::open(&SqliteOptions::new(url), changes).await.unwrap();
    let health = Health::new();
    let metrics = Arc::new(Metrics::new());
    tokio::spawn(writer.run(
        health.heartbeat("store_writer", Duration::from_secs(60)),
        metrics.clone(),
    ));
    let clock = ManualClock::new(t0());
    let shared: crate::clock::SharedClock = Arc::new(clock.clone());
    let executor = Executor::new(
        ExecutorConfig {
            actions: ActionPolicy::default(),
            output_tail_bytes: 1024,
            action_proxy: None,
            shim: None,
        },
        store.clone(),
        shared.clone(),
    )
    .unwrap();
    let (mut supervisor, handle) = Supervisor::new(
        TaskContext {
            services: Services {
                store: store.clone(),
                clock: shared,
                metrics,
            },
            executor,
        },
        SupervisorConfig {
            max_running,
            shutdown_grace: Duration::from_secs(1),
            incarnation: Incarnation::new(),
        },
    );
    let stop = CancellationToken::new();
    let serving = stop.clone();
    let beat = health.heartbeat("supervisor", Duration::from_secs(60));
    tokio::spawn(async move {
        supervisor.serve(&serving, &beat, &Faults::new()).await;
        supervisor.drain(CancellationToken::new()).await;
    });
    Rig {
        store,
        clock,
        handle,
        stop,
        _dir: dir,
    }
}

/// A job whose runs sleep `sleep` on the service's clock.
async fn job(store: &Store, name: &str, sleep: &str) -> Arc<Job> {
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "schedule": {"kind": "interval", "every": "1h"},
        "action": {"kind": "test", "sleep": sleep},
    }))
    .unwrap();
    store
        .jobs()
        .create(NewJob {
            id: JobId::new(),
            def: spec.validate(&ActionPolicy::default()).unwrap(),
            paused: false,
            source: Source::Api,
            now: t0(),
        })
        .await
        .unwrap()
}

fn fire(job: &Arc<Job>, at: DateTime<Utc>) -> Fire {
    Fire {
        job: job.clone(),
        scheduled_at: at,
        due_at: at,
        trigger: Trigger::Schedule,
        missed: None,
    }
}

/// Waits until the snapshot's running and queued job names are `running`
/// and `queued`, moving the manual clock a second at a time when `step`
/// (a run's sleep starts when its task gets to it, so the clock is moved
/// in steps rather than by a precomputed amount). Generous in real time.
async fn until(rig: &Rig, step: bool, running: &[&str], queued: &[&str]) {
    let names = |runs: &[LiveRun]| runs.iter().map(|r| r.job_name.clone()).collect::<Vec<_>>();
    let mut last = None;
    for _ in 0..600 {
        if let Some(s) = rig.handle.snapshot().await {
            if names(&s.running) == running && names(&s.queued) == queued {
                return;
            }
            last = Some((names(&s.running), names(&s.queued)));
        }
        if step {
            rig.clock.advance(Duration::from_secs(1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected running {running:?} and queued {queued:?}, last saw {last:?}");
}

/// Jobs a, b and c (ten-second runs) fired together with one slot: a
/// runs, b and c wait in that order.
async fn three_fired_one_slot() -> (Rig, [Arc<Job>; 3]) {
    let rig = rig(1).await;
    let jobs = [
        job(&rig.store, "a", "10s").await,
        job(&rig.store, "b", "10s").await,
        job(&rig.store, "c", "10s").await,
    ];
    rig.handle.fire(jobs.iter().map(|j| fire(j, t0())).collect());
    until(&rig, false, &["a"], &["b", "c"]).await;
    (rig, jobs)
}

#[tokio::test]
async fn the_global_limit_queues_fires_in_order_and_starts_each_as_a_slot_frees() {
    let (rig, _) = three_fired_one_slot().await;
    // a's ten seconds pass: b takes the slot, c still waits; and so on.
    until(&rig, true, &["b"], &["c"]).await;
    until(&rig, true, &["c"], &[]).await;
    until(&rig, true, &[], &[]).await;
    rig.stop.cancel();
}

#[tokio::test]
async fn a_deleted_jobs_waiting_fires_leave_the_backlog() {
    let (rig, [_, b, _]) = three_fired_one_slot().await;
    rig.handle.job_removed(b.id);
    until(&rig, false, &["a"], &["c"]).await;
    until(&rig, true, &["c"], &[]).await;
    rig.stop.cancel();
}

#[tokio::test]
async fn a_fire_past_its_grace_in_the_backlog_is_recorded_missed_not_run() {
    // The default misfire grace is 60 s: c waits behind a 90 s run.
    let rig = rig(1).await;
    let (a, c) = (
        job(&rig.store, "a", "90s").await,
        job(&rig.store, "c", "1s").await,
    );
    rig.handle.fire(vec![fire(&a, t0()), fire(&c, t0())]);
    until(&rig, false, &["a"], &["c"]).await;
    until(&rig, true, &[], &[]).await;
    let runs = rig
        .store
        .runs()
        .list(
            &crate::store::RunFilter {
                job: Some(c.id),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .unwrap();
    let statuses: Vec<_> = runs.items.iter().map(|r| (r.status, r.reason)).collect();
    assert_eq!(statuses, [(RunStatus::Missed, Some(Reason::Misfire))], "{runs:?}");
    rig.stop.cancel();
}
