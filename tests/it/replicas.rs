//! Several replicas on one PostgreSQL database (`docs/scaling.md`): each
//! fire claimed once, takeover after kill -9, changes seen everywhere,
//! fencing. Real binaries, a real PostgreSQL, real signals.
//!
//! Skipped with a message where no PostgreSQL is reachable (CI refuses a
//! skip: `.ci/run`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::helpers::{
    Binary, Database, Hit, Receiver, any_pool, database_for, every_second, http_job, postgres_server,
    skipped_without_postgres, within,
};

/// Runs `test` on a PostgreSQL server, or says SKIPPED.
pub(crate) fn on_postgres<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Database) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(server) = postgres_server() else {
        skipped_without_postgres(name);
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(test(Database::Postgres(server)));
}

/// A fresh database, a receiver and `n` replicas on the database.
async fn cluster(db: &Database, n: usize) -> (tempfile::TempDir, String, Receiver, Vec<Binary>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let database = database_for(dir.path(), db).await;
    let receiver = Receiver::start().await;
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(replica(dir.path(), &database).await);
    }
    (dir, database, receiver, replicas)
}

/// One replica of the cluster under test.
async fn replica(dir: &Path, database: &str) -> Binary {
    Binary::start(dir, &["--database", database, "--log", "warn,cronguard=info"]).await
}

async fn status(b: &Binary) -> Value {
    let (code, body) = b.get("/v1/status").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Waits until every replica sees `n` replicas and together they own all
/// `jobs` jobs, each exactly once.
async fn converged(replicas: &[&Binary], n: usize, jobs: u64) {
    within("the replicas to agree on the replica set", async {
        loop {
            let mut owned = 0;
            let mut agreed = true;
            for r in replicas {
                let s = status(r).await;
                agreed &= s["replicas"]["replicas"].as_array().map(Vec::len) == Some(n);
                owned += s["replicas"]["owned_jobs"].as_u64().unwrap_or(0);
            }
            if agreed && owned == jobs {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

async fn create_jobs(on: &Binary, n: usize, url: &str) {
    for i in 0..n {
        let (code, body) = on
            .post("/v1/jobs", http_job(&format!("job-{i:03}"), every_second(), url))
            .await;
        assert_eq!(code, 201, "{body}");
    }
}

/// The next whole second at least `ahead` from now.
fn whole_second_after(ahead: Duration) -> DateTime<Utc> {
    (Utc::now() + TimeDelta::from_std(ahead).expect("delta"))
        .duration_trunc(TimeDelta::seconds(1))
        .expect("trunc")
        + TimeDelta::seconds(1)
}

/// Hits per (job name, scheduled second).
fn tally(hits: &[Hit]) -> HashMap<Fire, u32> {
    let mut out = HashMap::new();
    for hit in hits {
        *out.entry((hit.header("x-cronguard-job-name").to_owned(), hit.scheduled_at()))
            .or_default() += 1;
    }
    out
}

/// One fire: a job's name and a scheduled second.
type Fire = (String, DateTime<Utc>);

/// The (job, second) pairs of jobs `job-000`… in `[from, until)` that
/// reached the receiver never, and those that reached it more than once.
fn each_second(
    hits: &[Hit],
    jobs: usize,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> (Vec<Fire>, Vec<(Fire, u32)>) {
    let counts = tally(hits);
    let mut missed = Vec::new();
    let mut duplicated = Vec::new();
    for i in 0..jobs {
        let name = format!("job-{i:03}");
        let mut t = from;
        while t < until {
            match counts.get(&(name.clone(), t)).copied().unwrap_or(0) {
                1 => {}
                0 => missed.push((name.clone(), t)),
                n => duplicated.push(((name.clone(), t), n)),
            }
            t += TimeDelta::seconds(1);
        }
    }
    (missed, duplicated)
}

/// Collects hits until each job's every second in `[from, until)` has
/// arrived, or 30 s past `until` (a starved CI machine delays fires; within
/// the misfire grace they still run, and this test is about each running
/// exactly once — lateness is the benchmark's), plus a second for any
/// duplicate still in flight.
async fn collect_all(
    receiver: &mut Receiver,
    jobs: usize,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Vec<Hit> {
    let expected = jobs * usize::try_from((until - from).num_seconds()).unwrap_or(0);
    let deadline = until + TimeDelta::seconds(30);
    let mut hits = Vec::new();
    loop {
        hits.extend(receiver.drain());
        let arrived = tally(&hits)
            .keys()
            .filter(|(_, t)| *t >= from && *t < until)
            .count();
        if arrived >= expected || Utc::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    hits.extend(receiver.drain());
    hits
}

/// Collects every hit until `until` has passed (fires of a second arrive
/// within it; late ones after a takeover within `settle` more).
async fn collect(receiver: &mut Receiver, until: DateTime<Utc>, settle: Duration) -> Vec<Hit> {
    let end = until + TimeDelta::from_std(settle).expect("delta");
    let wait = (end - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    receiver.drain()
}

/// 3 replicas, 200 every-second jobs with HTTP actions, 60 s: every
/// (job, second) reaches the receiver exactly once, the jobs are spread
/// over the three, and every run is recorded `succeeded`.
#[test]
fn three_replicas_fire_each_second_of_each_job_exactly_once() {
    on_postgres(
        "three_replicas_fire_each_second_of_each_job_exactly_once",
        |db| async move {
            const JOBS: usize = 200;
            let (_dir, database, mut receiver, replicas) = cluster(&db, 3).await;
            let [a, b, c] = <[Binary; 3]>::try_from(replicas).unwrap_or_else(|_| unreachable!());
            create_jobs(&b, JOBS, &receiver.url("/hit")).await;
            converged(&[&a, &b, &c], 3, JOBS as u64).await;
            for r in [&a, &b, &c] {
                let owned = status(r).await["replicas"]["owned_jobs"].as_u64().unwrap_or(0);
                assert!(owned >= 20, "a replica owns only {owned} of {JOBS} jobs");
            }
            let from = whole_second_after(Duration::from_secs(1));
            let until = from + TimeDelta::seconds(60);
            receiver.drain();
            let hits = collect_all(&mut receiver, JOBS, from, until).await;
            let (missed, duplicated) = each_second(&hits, JOBS, from, until);
            assert!(duplicated.is_empty(), "duplicates: {duplicated:?}");
            assert!(
                missed.is_empty(),
                "{} missed fires, e.g. {:?}",
                missed.len(),
                &missed[..missed.len().min(5)]
            );

            // Every run of the window is recorded once and succeeded, by the
            // replica that claimed it.
            let pool = any_pool(&database).await;
            let expected = BTreeMap::from([("succeeded".to_owned(), (JOBS * 60) as i64)]);
            let mut by_status = BTreeMap::new();
            // The last runs are recorded just after their calls arrive.
            for _ in 0..150 {
                let rows: Vec<(String, i64, String)> = sqlx::query_as(
                    "SELECT status, COUNT(*), MIN(incarnation) FROM runs WHERE scheduled_at >= $1 AND scheduled_at < $2 \
                     GROUP BY status",
                )
                .bind(from.timestamp_millis())
                .bind(until.timestamp_millis())
                .fetch_all(&pool)
                .await
                .expect("runs");
                by_status = rows.into_iter().map(|(s, n, _)| (s, n)).collect();
                if by_status == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(by_status, expected);
            let claimers: i64 = sqlx::query_scalar(
                "SELECT COUNT(DISTINCT incarnation) FROM runs WHERE scheduled_at >= $1 AND scheduled_at < $2",
            )
            .bind(from.timestamp_millis())
            .bind(until.timestamp_millis())
            .fetch_one(&pool)
            .await
            .expect("claimers");
            assert_eq!(claimers, 3, "every replica claims its share");
            for r in [a, b, c] {
                r.signal(Signal::SIGTERM);
            }
        },
    );
}

/// Kill -9 one replica every 10 s for 2 minutes, restarting it: no fire is
/// claimed twice, fires are missed only around a kill (the runs the killed
/// replica had claimed, which are orphaned), the others run (late ones
/// after each takeover), and every run ends recorded.
#[test]
fn kill_minus_nine_every_ten_seconds_loses_fires_only_within_the_takeover_bound() {
    on_postgres(
        "kill_minus_nine_every_ten_seconds_loses_fires_only_within_the_takeover_bound",
        |db| async move {
            const JOBS: usize = 100;
            let (dir, database, mut receiver, mut replicas) = cluster(&db, 3).await;
            create_jobs(&replicas[0], JOBS, &receiver.url("/hit")).await;
            converged(&[&replicas[0], &replicas[1], &replicas[2]], 3, JOBS as u64).await;
            let from = whole_second_after(Duration::from_secs(1));
            receiver.drain();
            let mut kills = Vec::new();
            for round in 0..12 {
                let next = from + TimeDelta::seconds(10 * round + 5);
                tokio::time::sleep((next - Utc::now()).to_std().unwrap_or_default()).await;
                let victim = usize::try_from(round).expect("round") % replicas.len();
                replicas[victim].signal(Signal::SIGKILL);
                kills.push(Utc::now());
                let _ = replicas[victim].wait().await;
                replicas[victim] = replica(dir.path(), &database).await;
            }
            let until = from + TimeDelta::seconds(120);
            // Fires missed during a takeover run late (within the misfire grace).
            let hits = collect(&mut receiver, until, Duration::from_secs(10)).await;
            // The documented takeover bound (docs/scaling.md): fires the killed
            // replica had claimed (up to a second before it died) are orphaned;
            // its jobs' fires until the takeover (lease 3 s + a renewal period
            // + re-planning) run late, but all at once, so the overlap policy
            // (`skip`) lets the first run and records the others as skipped.
            let near_a_kill = |t: DateTime<Utc>| {
                kills
                    .iter()
                    .any(|k| t >= *k - TimeDelta::seconds(2) && t <= *k + TimeDelta::seconds(5))
            };
            let (not_run, duplicated) = each_second(&hits, JOBS, from, until);
            let (near, missed): (Vec<_>, Vec<_>) = not_run.into_iter().partition(|(_, t)| near_a_kill(*t));
            let lost_to_kills = near.len();
            let total = JOBS * 120;
            eprintln!(
                "kill -9 x{}: {lost_to_kills} of {total} fires near a kill did not run",
                kills.len()
            );
            assert!(duplicated.is_empty(), "duplicates: {duplicated:?}");
            let pool = any_pool(&database).await;
            if !missed.is_empty() {
                let mut seen = Vec::new();
                for (name, t) in missed.iter().take(5) {
                    let row: Option<(String, String, Option<String>)> = sqlx::query_as(
                    "SELECT status, incarnation, error FROM runs WHERE job_name = $1 AND scheduled_at = $2",
                )
                .bind(name)
                .bind(t.timestamp_millis())
                .fetch_optional(&pool)
                .await
                .expect("run");
                    seen.push(format!("{name} {t}: {row:?}"));
                }
                panic!(
                    "{} fires missed away from any kill (kills at {kills:?}), e.g. {seen:#?}",
                    missed.len()
                );
            }

            // In the database: one claim per fire, and once the replicas stop
            // every run is final (the killed replicas' runs were orphaned).
            for r in &replicas {
                r.signal(Signal::SIGTERM);
            }
            for r in &mut replicas {
                assert_eq!(r.wait().await, Some(0));
            }
            let twice: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT job_id, scheduled_at FROM runs GROUP BY job_id, scheduled_at \
             HAVING COUNT(*) > 1) AS d",
            )
            .fetch_one(&pool)
            .await
            .expect("claims");
            assert_eq!(twice, 0, "fires claimed twice");
            let live: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status IN ('queued', 'running')")
                    .fetch_one(&pool)
                    .await
                    .expect("live");
            assert_eq!(live, 0, "runs left without a final state");
            let orphaned: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status = 'orphaned'")
                .fetch_one(&pool)
                .await
                .expect("orphaned");
            let slowest: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(started_at - scheduled_at) FROM runs WHERE status = 'succeeded'",
            )
            .fetch_one(&pool)
            .await
            .expect("lateness");
            let skipped: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs WHERE status = 'skipped'")
                .fetch_one(&pool)
                .await
                .expect("skipped");
            eprintln!(
                "kill -9 x{}: {orphaned} runs orphaned, {skipped} late fires skipped (overlap), latest start {} ms after its fire",
                kills.len(),
                slowest.unwrap_or(0)
            );
            // Generous (a busy 2-core machine): the measured figure is in
            // docs/scaling.md.
            assert!(slowest.unwrap_or(0) < 15_000, "a takeover took {slowest:?} ms");
            // `catch_up: latest` coalesces the late fires a takeover finds
            // due together: the newest runs, the others are one missed row
            // per job — only ever within the takeover bound.
            let missed_rows: Vec<(i64, Option<i64>)> =
                sqlx::query_as("SELECT scheduled_at, scheduled_until FROM runs WHERE status = 'missed'")
                    .fetch_all(&pool)
                    .await
                    .expect("missed");
            let at = |ms: i64| DateTime::from_timestamp_millis(ms).expect("instant");
            for (from, until) in &missed_rows {
                let (from, until) = (at(*from), at(until.unwrap_or(*from)));
                assert!(
                    near_a_kill(from) && near_a_kill(until),
                    "fires {from}..{until} recorded as missed away from any kill (kills at {kills:?})"
                );
            }
        },
    );
}

/// A pause, an update and a delete made on one replica take effect on the
/// replica that owns the job within a second.
#[test]
fn pause_update_and_delete_on_one_replica_take_effect_on_all_within_a_second() {
    on_postgres(
        "pause_update_and_delete_on_one_replica_take_effect_on_all_within_a_second",
        |db| async move {
            let (_dir, _database, mut receiver, replicas) = cluster(&db, 3).await;
            converged(&[&replicas[0], &replicas[1], &replicas[2]], 3, 0).await;
            let mut jobs = Vec::new();
            for i in 0..6 {
                let (code, job) = replicas[i % 3]
                    .post(
                        "/v1/jobs",
                        http_job(
                            &format!("change-{i}"),
                            every_second(),
                            &receiver.url(&format!("/before/{i}")),
                        ),
                    )
                    .await;
                assert_eq!(code, 201, "{job}");
                jobs.push(job);
            }
            // Each job fires (on its owner), whichever replica created it.
            for i in 0..6 {
                receiver.next_on(&format!("/before/{i}")).await;
            }
            let client = crate::helpers::client();
            // Change each job on a replica other than the one that created it
            // (so on at least four of the six, not on the owner).
            let mut acked = Vec::new();
            for (i, job) in jobs.iter().enumerate() {
                let on = &replicas[(i + 1) % 3];
                let id = job["id"].as_str().expect("id");
                let response = match i % 3 {
                    0 => client.post(on.url(&format!("/v1/jobs/{id}/pause"))).send().await,
                    1 => {
                        let mut spec = http_job(
                            &format!("change-{i}"),
                            every_second(),
                            &receiver.url(&format!("/after/{i}")),
                        );
                        spec["paused"] = json!(false);
                        client
                            .put(on.url(&format!("/v1/jobs/{id}")))
                            .json(&spec)
                            .send()
                            .await
                    }
                    _ => client.delete(on.url(&format!("/v1/jobs/{id}"))).send().await,
                }
                .expect("change");
                assert!(response.status().is_success(), "{}", response.status());
                acked.push(Utc::now());
            }
            // Watch three more seconds.
            let hits = collect(&mut receiver, Utc::now(), Duration::from_secs(3)).await;
            for (i, at) in acked.iter().enumerate() {
                let old_path = format!("/before/{i}");
                let late: Vec<&Hit> = hits
                    .iter()
                    .filter(|h| h.path == old_path && h.scheduled_at() > *at + TimeDelta::seconds(1))
                    .collect();
                assert!(
                    late.is_empty(),
                    "job {i} fired as before more than 1 s after its change: {:?}",
                    late.iter().map(|h| h.scheduled_at()).collect::<Vec<_>>()
                );
                if i % 3 == 1 {
                    let first = hits
                        .iter()
                        .filter(|h| h.path == format!("/after/{i}"))
                        .map(Hit::scheduled_at)
                        .min()
                        .expect("the updated job fires with its new URL");
                    assert!(
                        first <= *at + TimeDelta::seconds(1),
                        "the update took effect at {first}, change acknowledged at {at}"
                    );
                }
            }
            for r in &replicas {
                r.signal(Signal::SIGTERM);
            }
        },
    );
}

/// A replica frozen past its lease is declared stopped: its run is
/// orphaned and its jobs taken over. Resumed, it finds itself fenced: it
/// records nothing over the takeover and exits non-zero.
#[test]
fn a_replica_that_lost_its_lease_is_fenced() {
    on_postgres("a_replica_that_lost_its_lease_is_fenced", |db| async move {
        let (dir, database, mut receiver, mut replicas) = cluster(&db, 1).await;
        let mut a = replicas.remove(0);
        // A alone: it owns the job and starts a long run.
        let spec = json!({
            "name": "slow",
            "schedule": {"kind": "interval", "every": "1h"},
            "action": {"kind": "http", "method": "POST", "url": receiver.url("/sleep/8000"), "timeout": "30s"},
        });
        let (code, job) = a.post("/v1/jobs", spec).await;
        assert_eq!(code, 201, "{job}");
        let id = job["id"].as_str().expect("id").to_owned();
        let response = crate::helpers::client()
            .post(a.url(&format!("/v1/jobs/{id}/trigger")))
            .send()
            .await
            .expect("trigger");
        let (code, run) = crate::helpers::read(response).await;
        assert_eq!(code, 202, "{run}");
        let run_id = run["id"].as_str().expect("run id").to_owned();
        receiver.next_on("/sleep/8000").await;
        let b = replica(dir.path(), &database).await;

        a.signal(Signal::SIGSTOP);
        // B declares A stopped once A's lease (3 s) expired, and orphans its run.
        let orphaned = crate::helpers::eventually("B to take A's run over", || async {
            let (_, run) = b.get(&format!("/v1/runs/{run_id}")).await;
            (run["status"] == "orphaned").then_some(run)
        })
        .await;
        assert!(
            orphaned["error"]
                .as_str()
                .unwrap_or("")
                .contains("ended without recording"),
            "{orphaned}"
        );
        let s = status(&b).await;
        assert_eq!(s["replicas"]["replicas"].as_array().map(Vec::len), Some(1), "{s}");
        assert_eq!(s["replicas"]["owned_jobs"], 1, "B owns the job now");

        a.signal(Signal::SIGCONT);
        let code = within("A to stop once fenced", a.wait()).await;
        assert_ne!(code, Some(0), "a fenced replica exits with an error");
        // A's late result did not overwrite the takeover.
        let (_, run) = b.get(&format!("/v1/runs/{run_id}")).await;
        assert_eq!(run["status"], "orphaned", "{run}");
        b.signal(Signal::SIGTERM);
    });
}

/// The overlap policy holds across replicas: when the replica running a
/// long run of a `skip` job leaves, the new owner records the fires that
/// come while that run drains as skipped, and no two runs of the job ever
/// overlap.
#[test]
fn the_overlap_policy_holds_across_a_hand_over() {
    on_postgres("the_overlap_policy_holds_across_a_hand_over", |db| async move {
        let (_dir, database, mut receiver, mut replicas) = cluster(&db, 2).await;
        converged(&[&replicas[0], &replicas[1]], 2, 0).await;
        let mut spec = http_job("long", every_second(), &receiver.url("/sleep/4000"));
        spec["action"]["timeout"] = json!("30s");
        let (code, job) = replicas[0].post("/v1/jobs", spec).await;
        assert_eq!(code, 201, "{job}");
        let hit = receiver.next_on("/sleep/4000").await;
        let run_id = hit.header("x-cronguard-run").to_owned();
        // The replica running it leaves (SIGTERM: it drains the run).
        let (_, run) = replicas[0].get(&format!("/v1/runs/{run_id}")).await;
        let owner = run["incarnation"].as_str().expect("incarnation").to_owned();
        let mut owner_at = 0;
        for (i, r) in replicas.iter().enumerate() {
            if status(r).await["incarnation"] == owner.as_str() {
                owner_at = i;
            }
        }
        let mut leaving = replicas.remove(owner_at);
        leaving.signal(Signal::SIGTERM);
        assert_eq!(leaving.wait().await, Some(0));
        let mut other = replicas.remove(0);
        // The other replica took the job and skipped while the run drained.
        let skipped = crate::helpers::eventually("a fire skipped for a run on another replica", || async {
            let (_, page) = other
                .get(&format!(
                    "/v1/runs?job={}&status=skipped",
                    job["id"].as_str().unwrap_or("")
                ))
                .await;
            page["items"]
                .as_array()?
                .iter()
                .find(|r| r["error"] == "a run of this job is live on another replica")
                .cloned()
        })
        .await;
        assert_eq!(skipped["reason"], "overlap", "{skipped}");
        // Its own run starts once the other replica's run ended; it drains.
        receiver.next_on("/sleep/4000").await;
        other.signal(Signal::SIGTERM);
        assert_eq!(other.wait().await, Some(0));
        let pool = any_pool(&database).await;
        let runs: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT started_at, ended_at FROM runs WHERE status = 'succeeded' ORDER BY started_at",
        )
        .fetch_all(&pool)
        .await
        .expect("runs");
        assert!(runs.len() >= 2, "{runs:?}");
        // `started_at` is stamped when the fire is admitted, just before its
        // claim commits; the claim itself is refused while the other run is
        // live. So a start may precede the previous end by the claim's
        // commit time, never by a run.
        for pair in runs.windows(2) {
            assert!(
                pair[1].0 + 250 >= pair[0].1,
                "two runs of the job overlapped: {runs:?}"
            );
        }
    });
}

/// Needs no server: a closed loopback port. The operator sees the cause
/// at once, not a pool's "timed out" ten seconds later, and nothing starts.
#[tokio::test]
async fn an_unreachable_database_stops_startup_with_its_cause() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let out = within(
        "cronguard to give up",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--insecure-no-auth",
                "--database",
            ])
            .arg(format!("postgres://postgres@127.0.0.1:{port}/test"))
            .output(),
    )
    .await
    .expect("run cronguard");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("timed out"), "{stderr}");
}

/// A lost notification connection may have lost changes, so on
/// reconnecting a replica re-reads every job. A pause written straight
/// into the database (no `NOTIFY`) stands for the lost notification: the
/// job keeps firing until the listener's connection is cut, then stops.
#[test]
fn a_replica_rereads_every_job_after_losing_its_notification_connection() {
    on_postgres(
        "a_replica_rereads_every_job_after_losing_its_notification_connection",
        |db| async move {
            let (_dir, database, mut receiver, mut replicas) = cluster(&db, 1).await;
            let (code, job) = replicas[0]
                .post(
                    "/v1/jobs",
                    http_job("quiet", every_second(), &receiver.url("/quiet")),
                )
                .await;
            assert_eq!(code, 201, "{job}");
            receiver.next_on("/quiet").await;
            let pool = any_pool(&database).await;
            sqlx::query("UPDATE jobs SET paused = 1 WHERE name = 'quiet'")
                .execute(&pool)
                .await
                .expect("pause behind the replica's back");
            let paused_at = Utc::now();
            // Nobody told the engine: the job keeps firing.
            within("fires after the silent pause", async {
                while receiver.next_on("/quiet").await.scheduled_at() <= paused_at + TimeDelta::seconds(1) {}
            })
            .await;
            let cut = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
            )
            .fetch_all(&pool)
            .await
            .expect("terminate the listener's connection");
            assert_eq!(cut.len(), 1, "one listening connection");
            replicas[0]
                .log_line("lost the notification connection; re-reading every job")
                .await;
            // Re-read: the job is paused. Fires already due may still land;
            // then three whole seconds without one.
            within("the job to stop firing", async {
                loop {
                    receiver.drain();
                    let hits = collect(&mut receiver, Utc::now(), Duration::from_secs(3)).await;
                    if hits.iter().all(|h| h.path != "/quiet") {
                        return;
                    }
                }
            })
            .await;
            replicas[0].signal(Signal::SIGTERM);
            assert_eq!(replicas[0].wait().await, Some(0));
        },
    );
}
