//! The database's own failures, on a real full disk: a 16 MiB tmpfs (CI
//! runs as root; elsewhere the test says SKIPPED and `.ci/run` refuses the
//! skip). A full disk must be named as such, turn readiness red within
//! seconds, leave liveness alone, and end when space is freed.

use std::path::{Path, PathBuf};
use std::process::Command;

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
