//! An API flood for the lateness bench (`--flood`): two `wrk -c 256`
//! (Debian's `wrk`) on `GET /v1/jobs` and `POST /v1/schedules/preview`,
//! plus 300 slowloris connections that send a header byte every 5 s. It
//! stops by itself after `seconds`.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

const PREVIEW: &str = r#"
wrk.method = "POST"
wrk.body = '{"kind":"cron","expr":"*/5 * * * * *","tz":"Europe/Berlin"}'
wrk.headers["Content-Type"] = "application/json"
"#;

/// The flood in progress.
pub struct Flood {
    wrk: Vec<tokio::process::Child>,
    slow: tokio::task::JoinSet<()>,
    _dir: tempfile::TempDir,
}

impl Flood {
    /// Floods the service at `base` (`http://127.0.0.1:PORT`) for `seconds`.
    pub fn start(base: &str, seconds: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("preview.lua");
        std::fs::write(&script, PREVIEW).expect("write the wrk script");
        let duration = format!("{seconds}s");
        let mut wrk = Vec::new();
        for (path, script) in [
            ("/v1/jobs?limit=50", None),
            ("/v1/schedules/preview", Some(&script)),
        ] {
            let mut cmd = tokio::process::Command::new("wrk");
            cmd.args(["-t1", "-c256", "-d", &duration]);
            if let Some(script) = script {
                cmd.arg("-s").arg(script);
            }
            cmd.arg(format!("{base}{path}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            wrk.push(cmd.spawn().expect("run wrk (apt-get install wrk)"));
        }
        let addr = base.trim_start_matches("http://").to_owned();
        let mut slow = tokio::task::JoinSet::new();
        for _ in 0..300 {
            let addr = addr.clone();
            slow.spawn(async move {
                // Reconnects when the server closes the connection.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
                while tokio::time::Instant::now() < deadline {
                    let Ok(mut socket) = tokio::net::TcpStream::connect(&addr).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let _ = socket.write_all(b"GET /v1/jobs HTTP/1.1\r\nhost: x\r\n").await;
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        if socket.write_all(b"x").await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
        Self { wrk, slow, _dir: dir }
    }

    /// Waits for the flood to end.
    pub async fn finish(mut self) {
        for child in &mut self.wrk {
            let _ = child.wait().await;
        }
        self.slow.abort_all();
    }
}
