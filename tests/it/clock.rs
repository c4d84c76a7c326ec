//! Steps of the wall clock under the real binary, moved by libfaketime
//! (Debian's `faketime`): only `CLOCK_REALTIME` moves, as with `date -s`
//! or an NTP step; the monotonic clock stays real.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::helpers::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

struct FakeTime {
    file: PathBuf,
}

impl FakeTime {
    fn new(dir: &Path) -> Self {
        let file = dir.join("faketime");
        std::fs::write(&file, "+0").unwrap();
        Self { file }
    }

    /// Moves the service's wall clock to `offset` from the real one
    /// (`-3600s`, `+0`, …).
    fn set(&self, offset: &str) {
        std::fs::write(&self.file, offset).unwrap();
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", LIBFAKETIME.into()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

async fn livez(service: &Binary) -> u16 {
    client()
        .get(service.url("/livez"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn steps(service: &Binary, direction: &str) -> f64 {
    let m = service.metrics().await;
    sample(
        &m,
        &format!("cronguard_clock_steps_total{{direction=\"{direction}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits for a hit scheduled after `after`.
async fn fires_after(receiver: &mut Receiver, after: DateTime<Utc>) -> DateTime<Utc> {
    loop {
        let at = receiver.next().await.scheduled_at();
        if at > after {
            return at;
        }
    }
}

#[tokio::test]
async fn a_step_of_the_wall_clock_never_stops_the_engine_nor_repeats_a_fire() {
    if !Path::new(LIBFAKETIME).exists() {
        eprintln!(
            "SKIPPED clock::a_step_of_the_wall_clock…: {LIBFAKETIME} missing (apt-get install faketime)"
        );
        return;
    }
    let mut receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeTime::new(dir.path());
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let service = Binary::start_with_env(dir.path(), &[], &env).await;
    let (status, body) = service
        .post(
            "/v1/jobs",
            http_job("tick", every_second(), &receiver.url("/tick")),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut last = receiver.next().await.scheduled_at();

    for back in ["-3s", "-3600s"] {
        clock.set(back);
        // Nothing fires while the clock is behind the last fire (a fire
        // already in flight at the step may still land).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = receiver.drain();
        assert!(
            during.len() <= 1,
            "{} fires while the clock was {back}",
            during.len()
        );
        if let Some(hit) = during.last() {
            last = last.max(hit.scheduled_at());
        }
        assert_eq!(
            livez(&service).await,
            200,
            "the engine keeps beating with the clock at {back}"
        );
        clock.set("+0");
        last = within("fires to resume", fires_after(&mut receiver, last)).await;
    }
    assert!(steps(&service, "backward").await >= 2.0);

    // Forward: the hour jumped over is recorded, firing goes on.
    clock.set("+3600s");
    let ahead = within(
        "fires an hour ahead",
        fires_after(&mut receiver, last + chrono::TimeDelta::minutes(59)),
    )
    .await;
    assert!(ahead > last);
    assert_eq!(livez(&service).await, 200);
    assert!(steps(&service, "forward").await >= 1.0);

    let pool = any_pool(&format!("sqlite://{}", service.db.display())).await;
    let (runs, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT scheduled_at) FROM runs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(runs, distinct, "a (job, scheduled instant) ran twice");
    let (missed,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM runs WHERE status = 'missed'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(missed >= 1, "the fires jumped over are recorded");
    // `catch_up: latest` ran only the newest of the fires due together.
    let (skipped,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM runs WHERE status = 'skipped'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        skipped, 0,
        "fires due together were run and skipped instead of coalesced"
    );
}
