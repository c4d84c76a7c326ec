//! The store is the source of truth: a restarted binary picks up exactly
//! where the last one stopped.

use chrono::{TimeDelta, Utc};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::helpers::*;

async fn get(client: &reqwest::Client, url: String) -> Value {
    let r = client.get(url).send().await.expect("GET");
    assert!(r.status().is_success());
    r.json().await.expect("json")
}

#[tokio::test]
async fn jobs_history_and_next_fires_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let client = client();
    let mut receiver = Receiver::start().await;

    let mut first = Binary::start(dir.path(), &[]).await;
    let create = |base: String, spec: Value| {
        let client = client.clone();
        async move {
            let r = client
                .post(format!("{base}/v1/jobs"))
                .json(&spec)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()
        }
    };
    create(
        first.base.clone(),
        http_job("tick", every_second(), &receiver.url("/tick")),
    )
    .await;
    let at = (Utc::now() + TimeDelta::seconds(2)).to_rfc3339();
    create(
        first.base.clone(),
        http_job("once", json!({"kind": "once", "at": at}), &receiver.url("/once")),
    )
    .await;
    receiver.next_on("/once").await;
    let before = receiver.next_on("/tick").await.scheduled_at();

    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait().await, Some(0));

    let second = Binary::start(dir.path(), &[]).await;
    let jobs = get(&client, second.url("/v1/jobs")).await;
    let names: Vec<_> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].clone())
        .collect();
    assert_eq!(names, ["tick", "once"]);
    let once = get(&client, second.url("/v1/jobs/once")).await;
    assert!(
        once["next_fire_at"].is_null(),
        "a once job that ran has no next fire: {once}"
    );

    // Ticks resume after the restart, strictly after the last one before it.
    let after = loop {
        let hit = receiver.next_on("/tick").await;
        if hit.header("x-cronguard-run").is_empty() {
            continue;
        }
        if hit.scheduled_at() > before {
            break hit;
        }
    };
    receiver.next_on("/tick").await;
    assert!(after.scheduled_at() > before);
    let history = get(&client, second.url("/v1/jobs/tick/runs?limit=500")).await;
    let incarnations: std::collections::HashSet<_> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["incarnation"].clone())
        .collect();
    assert_eq!(incarnations.len(), 2, "history spans both incarnations");
    let once_runs = get(&client, second.url("/v1/jobs/once/runs")).await;
    assert_eq!(
        once_runs["items"].as_array().unwrap().len(),
        1,
        "the once job did not run again"
    );
    assert!(receiver.drain().iter().all(|h| h.path != "/once"));
}
