//! The claim contract on a shared (PostgreSQL) database, called on the
//! store directly: each answer a replica's claim can get, made to happen
//! on purpose rather than waited for in a race (`docs/scaling.md`).
//!
//! Skipped with a message where no PostgreSQL is reachable.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use cronguard::action::ActionPolicy;
use cronguard::job::{JobId, JobSpec};
use cronguard::run::{Incarnation, Outcome, Run, RunId, RunStatus, Trigger};
use cronguard::store::Conflict;
use cronguard::store::{NewJob, SqliteOptions, Store, StoreError};
use serde_json::json;

use crate::helpers::{Database, any_pool, database_for, t0};
use crate::replicas::on_postgres;

/// A fresh shared store with its writer running, and two live replicas.
async fn shared_store(
    dir: &std::path::Path,
    db: &Database,
) -> (Store, sqlx::AnyPool, Incarnation, Incarnation) {
    let database = database_for(dir, db).await;
    let pool = any_pool(&database).await;
    let (changes, _) = tokio::sync::mpsc::unbounded_channel();
    let (store, writer) = Store::open(&SqliteOptions::new(database), changes)
        .await
        .expect("open");
    assert!(store.shared());
    let health = cronguard::health::Health::new();
    tokio::spawn(writer.run(
        health.heartbeat("store_writer", std::time::Duration::from_secs(60)),
        Arc::new(cronguard::metrics::Metrics::new()),
    ));
    let (a, b) = (Incarnation::new(), Incarnation::new());
    for me in [a, b] {
        store
            .incarnations()
            .register(me, "test".into(), t0())
            .await
            .expect("register");
    }
    (store, pool, a, b)
}

/// The job's schedule cursor (as an instant) and its count of started
/// runs, as committed.
async fn counters(pool: &sqlx::AnyPool, job: JobId) -> (DateTime<Utc>, i64) {
    let (cursor, started): (i64, i64) =
        sqlx::query_as("SELECT cursor_at, runs_started FROM jobs WHERE id = $1")
            .bind(job.to_string())
            .fetch_one(pool)
            .await
            .expect("read the job's counters");
    (DateTime::from_timestamp_millis(cursor).expect("ms"), started)
}

async fn job(store: &Store, name: &str) -> JobId {
    let spec: JobSpec = serde_json::from_value(json!({
        "name": name,
        "schedule": {"kind": "interval", "every": "1s"},
        "action": {"kind": "test"},
    }))
    .expect("spec");
    let def = spec.validate(&ActionPolicy::default()).expect("valid");
    let job = store
        .jobs()
        .create(NewJob {
            id: JobId::new(),
            def,
            paused: false,
            source: cronguard::job::Source::Api,
            now: t0(),
        })
        .await
        .expect("create");
    job.id
}

/// A starting scheduled run of `job` at `at` by replica `by`.
fn fire(job: JobId, name: &str, at: DateTime<Utc>, by: Incarnation) -> Run {
    Run {
        id: RunId::new(),
        job_id: job,
        job_name: name.to_owned(),
        scheduled_at: at,
        scheduled_until: None,
        fires: 1,
        status: RunStatus::Running,
        trigger: Trigger::Schedule,
        reason: None,
        created_at: at,
        started_at: Some(at),
        ended_at: None,
        attempts: 0,
        exit_code: None,
        http_status: None,
        error: None,
        output: None,
        stderr: None,
        pid: None,
        pgid: None,
        process_start_ticks: None,
        incarnation: by,
        attempt_log: Vec::new(),
    }
}

#[test]
fn each_claim_answer_on_a_shared_database() {
    on_postgres("each_claim_answer_on_a_shared_database", |db| async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, pool, a, b) = shared_store(dir.path(), &db).await;
        let at = |s: i64| t0() + TimeDelta::seconds(s);

        // Claimed once: the second replica's claim of the same fire is a
        // duplicate, whatever its guard.
        let id = job(&store, "once").await;
        store
            .runs()
            .claim(fire(id, "once", at(1), a), 1)
            .await
            .expect("first claim");
        assert!(matches!(
            store.runs().claim(fire(id, "once", at(1), b), 10).await,
            Err(StoreError::Conflict(Conflict::DuplicateFire))
        ));
        // A refused claim leaves the cursor and the count as they were.
        assert_eq!(counters(&pool, id).await, (at(1), 1));

        // Overlap across replicas: a's run of 1 s is live, so b's claim of
        // the next fire under a guard of 1 is refused and recorded skipped;
        // with room for one more (guard 2) it goes through.
        let skipped = fire(id, "once", at(2), b);
        assert!(matches!(
            store.runs().claim(skipped.clone(), 1).await,
            Err(StoreError::Conflict(Conflict::Overlap))
        ));
        let row = store
            .runs()
            .get(skipped.id)
            .await
            .expect("read")
            .expect("recorded");
        assert_eq!(row.status, RunStatus::Skipped);
        assert_eq!(row.reason, Some(cronguard::run::Reason::Overlap));
        store
            .runs()
            .claim(fire(id, "once", at(3), b), 2)
            .await
            .expect("room for two");

        // Deleted between its fire and its claim: not found, nothing written.
        let gone = job(&store, "gone").await;
        store.jobs().delete(gone, at(4)).await.expect("delete");
        let late = fire(gone, "gone", at(5), a);
        assert!(matches!(
            store.runs().claim(late.clone(), 1).await,
            Err(StoreError::Conflict(Conflict::NotFound))
        ));
        assert!(store.runs().get(late.id).await.expect("read").is_none());

        // Fenced: once a replica is declared stopped, its claims fail and
        // record nothing; the live replica's still go through.
        store.incarnations().stop(a, at(6)).await.expect("stop a");
        let fenced = fire(id, "once", at(7), a);
        assert!(matches!(
            store.runs().claim(fenced.clone(), 10).await,
            Err(StoreError::Conflict(Conflict::Fenced))
        ));
        assert!(store.runs().get(fenced.id).await.expect("read").is_none());
        store
            .runs()
            .claim(fire(id, "once", at(7), b), 10)
            .await
            .expect("b claims it");
        store.close().await.expect("close");
    });
}

/// Successes submitted together end together (one statement on a shared
/// database) and each answer is still its own: ended, already final, or
/// unknown; the job's failure count resets.
#[test]
fn successes_ending_together_each_get_their_answer() {
    on_postgres(
        "successes_ending_together_each_get_their_answer",
        |db| async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let (store, pool, a, _) = shared_store(dir.path(), &db).await;
            let at = |s: i64| t0() + TimeDelta::seconds(s);
            let id = job(&store, "many").await;
            let runs: Vec<Run> = (1..=4).map(|s| fire(id, "many", at(s), a)).collect();
            for run in &runs {
                store.runs().claim(run.clone(), 10).await.expect("claim");
            }
            store
                .runs()
                .finish(runs[3].id, Outcome::failed("boom"), at(5))
                .await
                .expect("the last one failed first");
            sqlx::query("UPDATE jobs SET consecutive_failures = 2 WHERE id = $1")
                .bind(id.to_string())
                .execute(&pool)
                .await
                .expect("failures so far");
            let success = |code: i32| Outcome {
                status: RunStatus::Succeeded,
                reason: None,
                attempts: 1,
                exit_code: Some(code),
                http_status: None,
                error: None,
                output: Some(format!("out {code}\n")),
                stderr: Some(format!("err {code}\n")),
                attempt_log: Vec::new(),
            };
            // Submitted without waiting in between: one writer batch.
            let acks = vec![
                store.runs().finish(runs[0].id, success(0), at(6)),
                store.runs().finish(runs[1].id, success(0), at(6)),
                store.runs().finish(runs[3].id, success(0), at(6)),
                store.runs().finish(RunId::new(), success(0), at(6)),
                store.runs().finish(runs[2].id, success(3), at(7)),
            ];
            let answers = futures_util::future::join_all(acks).await;
            assert!(
                answers[0].is_ok() && answers[1].is_ok() && answers[4].is_ok(),
                "{answers:?}"
            );
            assert!(
                matches!(answers[2], Err(StoreError::Conflict(Conflict::AlreadyFinal))),
                "{answers:?}"
            );
            assert!(
                matches!(answers[3], Err(StoreError::Conflict(Conflict::NotFound))),
                "{answers:?}"
            );
            let row = store.runs().get(runs[2].id).await.expect("read").expect("row");
            assert_eq!(
                (row.status, row.exit_code, row.output.as_deref(), row.ended_at),
                (RunStatus::Succeeded, Some(3), Some("out 3\n"), Some(at(7)))
            );
            let last = store.runs().get(runs[3].id).await.expect("read").expect("row");
            assert_eq!(
                (last.status, last.error.as_deref()),
                (RunStatus::Failed, Some("boom"))
            );
            let (failures,): (i64,) = sqlx::query_as("SELECT consecutive_failures FROM jobs WHERE id = $1")
                .bind(id.to_string())
                .fetch_one(&pool)
                .await
                .expect("read");
            assert_eq!(failures, 0);
            store.close().await.expect("close");
        },
    );
}
