//! The HTTP action: one request per attempt on a shared, pooled client.

use reqwest::header::{HeaderName, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::{Limits, Occurrence};
use crate::action::HttpAction;
use crate::run::{MAX_ERROR_LEN, Outcome, RunStatus, truncate};

const JOB: HeaderName = HeaderName::from_static("x-cronguard-job");
const JOB_NAME: HeaderName = HeaderName::from_static("x-cronguard-job-name");
const RUN: HeaderName = HeaderName::from_static("x-cronguard-run");
const SCHEDULED_AT: HeaderName = HeaderName::from_static("x-cronguard-scheduled-at");
const ATTEMPT: HeaderName = HeaderName::from_static("x-cronguard-attempt");

pub(super) async fn execute(
    client: &reqwest::Client,
    action: &HttpAction,
    occurrence: &Occurrence,
    limits: Limits,
    body_bytes: usize,
    cancel: &CancellationToken,
) -> Outcome {
    let mut request = client
        .request(action.method.clone(), action.url.clone())
        .headers(action.headers.clone())
        .timeout(limits.timeout);
    for (name, value) in [
        (JOB, occurrence.job_id.to_string()),
        (JOB_NAME, occurrence.job_name.clone()),
        (RUN, occurrence.run_id.to_string()),
        (SCHEDULED_AT, occurrence.scheduled_at_text()),
        (ATTEMPT, occurrence.attempt.to_string()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            request = request.header(name, value);
        }
    }
    if let Some(body) = &action.body {
        request = request.body(body.clone());
    }
    let call = async {
        let mut response = request.send().await?;
        let status = response.status().as_u16();
        // Keep the start of the body (the useful part of an error page);
        // stop reading past the bound instead of buffering it.
        let mut body = Vec::new();
        while body.len() < body_bytes {
            match response.chunk().await? {
                Some(chunk) => {
                    let room = body_bytes - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                None => break,
            }
        }
        Ok::<_, reqwest::Error>((status, body))
    };
    let result = tokio::select! {
        r = call => r,
        () = cancel.cancelled() => return Outcome {
            status: RunStatus::Cancelled,
            ..Outcome::failed("cancelled while the request was in flight")
        },
    };
    match result {
        Ok((status, body)) => {
            let ok = action.success.contains(status);
            let output = (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned());
            Outcome {
                status: if ok {
                    RunStatus::Succeeded
                } else {
                    RunStatus::Failed
                },
                reason: None,
                attempts: occurrence.attempt,
                exit_code: None,
                http_status: Some(status),
                error: (!ok).then(|| format!("HTTP status {status} is not a success status")),
                output,
                attempt_log: Vec::new(),
            }
        }
        Err(e) => {
            let status = if e.is_timeout() {
                RunStatus::TimedOut
            } else {
                RunStatus::Failed
            };
            Outcome {
                status,
                attempts: occurrence.attempt,
                http_status: e.status().map(|s| s.as_u16()),
                error: Some(truncate(error_chain(&e), MAX_ERROR_LEN)),
                ..Outcome::failed("")
            }
        }
    }
}

/// The error with its sources (reqwest's top-level text is vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
