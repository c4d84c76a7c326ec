//! The database's own failures: a real full disk, a 16 MiB tmpfs (CI runs
//! as root; elsewhere the test says SKIPPED and `.ci/run` refuses the
//! skip), and a write lock another process holds. A full disk must be named
//! as such, turn readiness red within seconds, leave liveness alone, and
//! end when space is freed; every refused write is answered as such.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

use crate::helpers::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Fills the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.flush();
    path
}

fn job(i: usize) -> serde_json::Value {
    json!({
        "name": format!("job-{i}"),
        "description": "x".repeat(4000),
        "schedule": {"kind": "cron", "expr": "0 0 1 1 *"},
        "action": {"kind": "http", "url": "http://127.0.0.1:9/"},
    })
}

#[tokio::test]
async fn a_full_disk_is_named_turns_readiness_red_and_recovers() {
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED storage::a_full_disk_is_named…: cannot mount a tmpfs (needs root)");
        return;
    };
    let service = Binary::start(disk.path(), &[]).await;
    let (status, _) = service.post("/v1/jobs", job(0)).await;
    assert_eq!(status, 201);
    let filler = fill(disk.path());

    // Writes are refused, by name, with nothing written.
    let mut refused = None;
    for i in 1..2000 {
        let (status, body) = service.post("/v1/jobs", job(i)).await;
        if status == 201 {
            continue;
        }
        refused = Some((i, status, body));
        break;
    }
    let (i, status, problem) = refused.expect("a write is refused on a full disk");
    assert_eq!(status, 503, "{problem}");
    assert_eq!(
        problem["type"], "urn:cronguard:problem:storage-unavailable",
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("disk is full"),
        "{problem}"
    );
    let (status, _) = service.get(&format!("/v1/jobs/job-{i}")).await;
    assert_eq!(status, 404, "a refused create wrote nothing");

    let (status, ready) = service.get("/readyz?verbose").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.to_string().contains("disk is full"), "{ready}");
    let (status, _) = service.get("/livez").await;
    assert_eq!(status, 200, "liveness does not depend on the database");
    let m = service.metrics().await;
    assert_eq!(sample(&m, "cronguard_store_writable"), Some(0.0));
    assert!(
        sample(&m, "cronguard_store_write_failures_total{fault=\"disk_full\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );

    // Space comes back: readiness turns green by itself (its probe write),
    // and writes go through.
    std::fs::remove_file(filler).unwrap();
    eventually("readiness to recover", || async {
        let (status, _) = service.get("/readyz").await;
        (status == 200).then_some(())
    })
    .await;
    let (status, body) = service.post("/v1/jobs", job(i)).await;
    assert_eq!(status, 201, "{body}");
    let m = service.metrics().await;
    assert_eq!(sample(&m, "cronguard_store_writable"), Some(1.0));
    drop(service);
}

/// Every second of each job in `[from, until]` is accounted for by exactly
/// one row: a run, or a `missed` range.
fn accounted(runs: &[serde_json::Value], from: DateTime<Utc>, until: DateTime<Utc>) -> Result<(), String> {
    let at = |v: &serde_json::Value| {
        v.as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.to_utc())
    };
    let mut seen: BTreeMap<DateTime<Utc>, u32> = BTreeMap::new();
    for run in runs {
        let Some(first) = at(&run["scheduled_at"]) else {
            continue;
        };
        let last = at(&run["scheduled_until"]).unwrap_or(first);
        let mut t = first;
        while t <= last {
            *seen.entry(t).or_default() += 1;
            t += TimeDelta::seconds(1);
        }
    }
    let mut t = from;
    while t <= until {
        match seen.get(&t) {
            Some(1) => {}
            n => return Err(format!("{t}: {n:?} rows")),
        }
        t += TimeDelta::seconds(1);
    }
    Ok(())
}

/// The jobs of the full-disk test: three plain, one with its own series.
const JOBS: [&str; 4] = ["tick-0", "tick-1", "tick-2", "watched"];

#[tokio::test]
async fn fires_the_full_disk_refuses_are_counted_and_recorded_missed_once_it_is_freed() {
    let Some(disk) = Tmpfs::mount("16m") else {
        eprintln!("SKIPPED storage::fires_the_full_disk_refuses…: cannot mount a tmpfs (needs root)");
        return;
    };
    let receiver = Receiver::start().await;
    // A fast reaper: its passes fail while the disk is full and must not
    // use up its restart budget.
    let service = Binary::start(disk.path(), &["--reaper-interval", "300ms"]).await;
    for i in 0..3 {
        let (status, body) = service
            .post(
                "/v1/jobs",
                http_job(&format!("tick-{i}"), every_second(), &receiver.url("/hit")),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // A job with its own series: its dead man's switch must trip while its
    // fires go unrecorded.
    let mut watched = http_job("watched", every_second(), &receiver.url("/hit"));
    watched["monitor"] = serde_json::json!(true);
    let (status, body) = service.post("/v1/jobs", watched).await;
    assert_eq!(status, 201, "{body}");
    let expected_by = async || {
        sample(
            &service.metrics().await,
            "cronguard_job_expected_by_timestamp_seconds{job_name=\"watched\"}",
        )
    };
    eventually("runs recorded", || async {
        (service.get("/v1/jobs/tick-0/runs").await.1["items"]
            .as_array()?
            .len()
            >= 2)
            .then_some(())
    })
    .await;

    let filler = fill(disk.path());
    let refused = async || {
        sample(
            &service.metrics().await,
            "cronguard_fires_not_run_total{reason=\"store_unavailable\",status=\"missed\"}",
        )
        .unwrap_or(0.0)
    };
    eventually("fires refused and counted", || async {
        (refused().await >= 9.0).then_some(())
    })
    .await;
    let held = expected_by().await.expect("the watched job's series");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (status, live) = service.get("/livez?verbose").await;
    assert_eq!(status, 200, "no loop gave up on a full disk: {live}");
    // Three seconds of refused fires later, "expected by" has not moved on
    // with the engine's plan: it stays at the first refused fire's deadline
    // (the fire plus the default 60 s grace). Only a fire the database took
    // may move it: a commit that still fit in the write-ahead log's space.
    let now_by = expected_by().await;
    if now_by != Some(held) {
        let first_refused = held - 60.0;
        let (_, page) = service.get("/v1/jobs/watched/runs?limit=50").await;
        let taken = page["items"].as_array().unwrap().iter().any(|r| {
            let at = chrono::DateTime::parse_from_rfc3339(r["scheduled_at"].as_str().unwrap()).unwrap();
            at.timestamp() as f64 > first_refused && r["status"] != "missed"
        });
        assert!(
            taken,
            "expected-by moved from {held} to {now_by:?} while every fire went unrecorded: {page}"
        );
    }

    std::fs::remove_file(filler).unwrap();
    // Every refused fire ends up in a `missed` row (rows of fires refused
    // just before the disk came back may follow a little later).
    eventually("the refused fires recorded as missed", || async {
        let mut recorded = 0;
        for job in JOBS {
            let runs = service.get(&format!("/v1/jobs/{job}/runs?limit=500")).await.1["items"]
                .as_array()?
                .clone();
            recorded += runs
                .iter()
                .filter(|r| r["reason"] == "store_unavailable")
                .map(|r| r["fires"].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        (recorded > 0 && recorded as f64 == refused().await).then_some(())
    })
    .await;

    eventually("expected-by to follow the plan again", || async {
        (expected_by().await? > held).then_some(())
    })
    .await;

    // Nothing vanished: each second of each job is one row.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for job in JOBS {
        let runs = service.get(&format!("/v1/jobs/{job}/runs?limit=500")).await.1["items"]
            .as_array()
            .unwrap()
            .clone();
        let times: Vec<DateTime<Utc>> = runs
            .iter()
            .filter_map(|r| r["scheduled_at"].as_str()?.parse().ok())
            .collect();
        let from = *times.iter().min().unwrap();
        let until = *times.iter().max().unwrap() - TimeDelta::seconds(1);
        if let Err(e) = accounted(&runs, from, until) {
            panic!("{job}: {e}: {runs:#?}");
        }
    }
    drop(service);
}

/// A batch whose transaction cannot even begin (another process holds the
/// database's write lock past the busy timeout) is answered as storage
/// unavailable, naming the lock — not as "shutting down", which a dropped
/// reply used to read as.
#[tokio::test]
async fn a_write_that_cannot_begin_is_answered_as_storage_unavailable() {
    use sqlx::{Connection, Executor};
    let app = TestApp::spawn().await;
    let mut lock = sqlx::SqliteConnection::connect(&app.database).await.unwrap();
    lock.execute("BEGIN EXCLUSIVE").await.unwrap();
    let (status, body) = app
        .post(
            "/v1/jobs",
            http_job("locked-out", every_second(), "http://127.0.0.1:9/hook"),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["type"], "urn:cronguard:problem:storage-unavailable",
        "{body}"
    );
    assert!(body["detail"].as_str().unwrap().contains("lock"), "{body}");
    lock.execute("ROLLBACK").await.unwrap();
    // The lock is gone: the same write goes through.
    let (status, body) = app
        .post(
            "/v1/jobs",
            http_job("locked-out", every_second(), "http://127.0.0.1:9/hook"),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    app.stop().await;
}
