//! The SSRF guard (`--deny-private-networks`) against the ways around it:
//! proxy variables in the service's environment, IPv4 addresses inside
//! IPv6 ones, and the special-purpose blocks of IANA's registries.

use cronguard::run::{Run, RunStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::helpers::*;

/// A TCP listener that counts connections and keeps the first bytes of
/// each (a proxy would see `GET http://…` or `CONNECT …`).
struct Trap {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Trap {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, lines) = (connections.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let lines = lines.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 1024];
                    let n = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut buf))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                    lines
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                });
            }
        });
        Self {
            addr,
            connections,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn once_a_year(name: &str, url: &str) -> Value {
    http_job(name, json!({"kind": "cron", "expr": "0 0 1 1 *"}), url)
}

async fn trigger(service: &Binary, job: &str) -> Run {
    let (status, run) = service
        .post(&format!("/v1/jobs/{job}/trigger"), json!(null))
        .await;
    assert_eq!(status, 202, "{run}");
    final_run(&service.base, run["id"].as_str().unwrap()).await
}

#[tokio::test]
async fn proxy_variables_never_carry_actions_past_the_guard() {
    let proxy = Trap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|name| (name, proxy.url()))
    .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let service = Binary::start_with_env(dir.path(), &["--deny-private-networks"], &env).await;
    for (name, url) in [
        ("plain", "http://localhost:9/secret-admin"),
        ("tls", "https://localhost:9/secret-admin"),
    ] {
        let (status, body) = service.post("/v1/jobs", once_a_year(name, url)).await;
        assert_eq!(status, 201, "{body}");
        let run = trigger(&service, name).await;
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        assert!(
            run.error.as_deref().unwrap().contains("no public address"),
            "{run:?}"
        );
    }
    assert_eq!(
        proxy.connections.load(Ordering::SeqCst),
        0,
        "the proxy from the environment was used: {:?}",
        proxy.seen.lock().unwrap()
    );
}

#[tokio::test]
async fn an_explicit_action_proxy_is_used_and_still_guarded() {
    let proxy = Trap::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy_url = proxy.url();

    // Guarded: a name that resolves to loopback is refused before the
    // proxy is asked (the proxy would resolve it itself).
    let service = Binary::start(
        dir.path(),
        &["--deny-private-networks", "--action-proxy", &proxy_url],
    )
    .await;
    service
        .post("/v1/jobs", once_a_year("named", "http://localhost:9/x"))
        .await;
    let run = trigger(&service, "named").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error.as_deref().unwrap().contains("non-public address"),
        "{run:?}"
    );
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 0);
    drop(service);

    // Unguarded: the request goes to the proxy, in absolute form.
    let dir = tempfile::tempdir().unwrap();
    let service = Binary::start(dir.path(), &["--action-proxy", &proxy_url]).await;
    service
        .post(
            "/v1/jobs",
            once_a_year("through", "http://target.invalid:9/via-proxy"),
        )
        .await;
    service.post("/v1/jobs/through/trigger", json!(null)).await;
    eventually("the proxy to see the request", || async {
        let seen = proxy.seen.lock().unwrap().clone();
        seen.iter()
            .any(|s| s.starts_with("POST http://target.invalid:9/via-proxy"))
            .then_some(())
    })
    .await;

    // A proxy URL that is not one is refused at startup, without echoing
    // its credentials.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cronguard"))
        .args(["serve", "--action-proxy", "ftp://user:hunter2-proxy@127.0.0.1:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("action_proxy"), "{stderr}");
    assert!(!stderr.contains("hunter2-proxy"), "{stderr}");
}

#[tokio::test]
async fn ipv4_inside_ipv6_and_special_blocks_are_refused() {
    let mut options = Options::default();
    options.settings.deny_private_networks = Some(true);
    let app = TestApp::start(options).await;
    let refused = [
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://[2002:7f00:1::]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://[2001::]/",
        "http://[::127.0.0.1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[100::1]/",
        "http://[2001:2::1]/",
        "http://[3fff::1]/",
        "http://[5f00::1]/",
        "http://[fec0::1]/",
        "http://192.0.0.1/",
        "http://192.0.0.170/",
        "http://192.88.99.1/",
        "http://198.18.0.1/",
        "http://198.51.100.7/",
        "http://203.0.113.7/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://0.1.2.3/",
        "http://2130706433/",
        "http://0x7f.1/",
    ];
    for (i, url) in refused.iter().enumerate() {
        let (status, problem) = app.post("/v1/jobs", once_a_year(&format!("j{i}"), url)).await;
        assert_eq!(status, 422, "{url} was accepted: {problem}");
        assert_eq!(problem["errors"][0]["pointer"], "/action/url", "{url}");
        assert!(
            problem["errors"][0]["detail"]
                .as_str()
                .unwrap()
                .contains("not public"),
            "{url}: {problem}"
        );
    }
    // Public addresses, including registry entries marked reachable.
    for (i, url) in [
        "http://8.8.8.8/",
        "http://192.0.0.9/",
        "http://[64:ff9b::808:808]/",
        "http://[2606:4700::1111]/",
    ]
    .iter()
    .enumerate()
    {
        let (status, problem) = app.post("/v1/jobs", once_a_year(&format!("p{i}"), url)).await;
        assert_eq!(status, 201, "{url}: {problem}");
    }
    app.stop().await;
}
