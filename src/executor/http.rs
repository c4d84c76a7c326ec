//! The HTTP action: one request per attempt on a shared, pooled client.

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
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
    let headers = match expand_headers(&action.headers) {
        Ok(headers) => headers,
        Err(e) => {
            return Outcome {
                attempts: occurrence.attempt,
                ..Outcome::failed(e)
            };
        }
    };
    let mut request = client
        .request(action.method.clone(), action.url.clone())
        .headers(headers)
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
                stderr: None,
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
                // Without the URL: its query string may hold a secret.
                error: Some(truncate(error_chain(&e.without_url()), MAX_ERROR_LEN)),
                ..Outcome::failed("")
            }
        }
    }
}

/// One POST; `Ok` on a 2xx status.
pub(super) async fn post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: HeaderMap,
    body: Vec<u8>,
    timeout: std::time::Duration,
) -> Result<u16, String> {
    let sent = client
        .post(url.clone())
        .headers(headers)
        .body(body)
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(response) => Err(format!(
            "HTTP status {} is not a success status",
            response.status().as_u16()
        )),
        Err(e) => Err(truncate(error_chain(&e.without_url()), MAX_ERROR_LEN)),
    }
}

/// The job's headers with `${CRONGUARD_SECRET_*}` references resolved.
fn expand_headers(headers: &HeaderMap) -> Result<HeaderMap, String> {
    let mut out = headers.clone();
    for (name, value) in headers {
        let Ok(text) = value.to_str() else { continue };
        if !text.contains("${") {
            continue;
        }
        let expanded = crate::secrets::expand(text)?;
        let value = HeaderValue::from_str(&expanded)
            .map_err(|_| format!("the value of header {name} is not a valid header value once expanded"))?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// A resolver that only returns public addresses (the SSRF guard): a
/// name resolving to loopback, private or link-local space is refused.
pub(super) struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs = public_addresses(name.as_str()).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The public addresses `host` resolves to; an error when it has none.
async fn public_addresses(
    host: &str,
) -> Result<Vec<std::net::SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, 0))
        .await?
        .filter(|a| crate::action::is_public(a.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} has no public address (--deny-private-networks)").into());
    }
    Ok(addrs)
}

/// The SSRF guard's check before a request: an address literal must be
/// public; through a proxy (which resolves names itself) a name must
/// resolve to public addresses only. Without a proxy names are checked by
/// [`PublicOnly`] as the connection resolves them.
pub(super) async fn check_destination(url: &reqwest::Url, proxied: bool) -> Result<(), String> {
    match crate::action::literal_ip(url) {
        Some(ip) if !crate::action::is_public(ip) => return Err(crate::action::refused_address(Some(ip))),
        Some(_) => return Ok(()),
        None => {}
    }
    match url.host() {
        Some(url::Host::Domain(name)) if proxied => {
            let all = tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            let mut any = false;
            for addr in all {
                any = true;
                if !crate::action::is_public(addr.ip()) {
                    return Err(format!(
                        "{name} resolves to a non-public address (--deny-private-networks)"
                    ));
                }
            }
            if any {
                Ok(())
            } else {
                Err(format!("{name} has no address"))
            }
        }
        _ => Ok(()),
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
