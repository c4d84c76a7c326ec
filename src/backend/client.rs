//! HTTP calls to the control backend, with every failure classified.

use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

use crate::protocol::{DesiredJobs, ResultBatch};
use crate::run::Incarnation;

/// Why a call failed (the label set of `cronguard_backend_failures_total`).
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection failed or was closed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The call took longer than the backend timeout.
    #[error("timed out")]
    Timeout,
    /// An unexpected status; `retry_after` when the backend asked to wait.
    #[error("HTTP status {status}")]
    Status {
        /// The status.
        status: u16,
        /// Its `Retry-After`, in seconds.
        retry_after: Option<Duration>,
    },
    /// The body exceeded the limit.
    #[error("the response exceeds {0} bytes")]
    TooLarge(usize),
    /// The body is not what the protocol says.
    #[error("malformed response: {0}")]
    Decode(String),
}

impl CallError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Status { status, .. } if *status >= 500 => "status_5xx",
            Self::Status { status: 429, .. } => "status_429",
            Self::Status { .. } => "status_4xx",
            Self::TooLarge(_) => "too_large",
            Self::Decode(_) => "decode",
        }
    }

    /// How long the backend asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn classify(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        CallError::Connect(text)
    }
}

/// What a pull found.
#[derive(Debug)]
pub enum Pulled {
    /// 304: nothing changed since the last ETag.
    Unchanged,
    /// The desired jobs and their ETag.
    Jobs {
        /// The items, each still to validate on its own.
        jobs: Vec<Box<serde_json::value::RawValue>>,
        /// The `ETag` to send next time.
        etag: Option<String>,
    },
}

/// The backend's endpoints, authenticated.
#[derive(Clone)]
pub struct BackendClient {
    http: reqwest::Client,
    jobs_url: Url,
    results_url: Url,
    max_body: usize,
    timeout: Duration,
}

impl std::fmt::Debug for BackendClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's default headers hold the token: never print them.
        f.debug_struct("BackendClient")
            .field("jobs_url", &self.jobs_url.as_str())
            .finish_non_exhaustive()
    }
}

impl BackendClient {
    /// The longest a call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client for the backend at `base` (`https://backend/api/`).
    pub fn new(
        base: &Url,
        token: Option<&str>,
        incarnation: Incarnation,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "the backend token is not a valid header value".to_owned())?;
            // Keeps it out of any Debug output of requests.
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Ok(value) = HeaderValue::from_str(&incarnation.to_string()) {
            headers.insert("x-cronguard-incarnation", value);
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("cronguard/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let join = |path: &str| base.join(path).map_err(|e| format!("backend URL: {e}"));
        Ok(Self {
            http,
            jobs_url: join("v1/jobs")?,
            results_url: join("v1/results")?,
            max_body,
            timeout,
        })
    }

    /// `GET /v1/jobs`, conditional on `etag`.
    pub async fn pull(&self, etag: Option<&str>) -> Result<Pulled, CallError> {
        let mut request = self.http.get(self.jobs_url.clone());
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        let mut response = request.send().await.map_err(classify)?;
        let status = response.status();
        if status == StatusCode::NOT_MODIFIED {
            return Ok(Pulled::Unchanged);
        }
        if !status.is_success() {
            return Err(status_error(&response));
        }
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if response
            .content_length()
            .is_some_and(|n| n > self.max_body as u64)
        {
            return Err(CallError::TooLarge(self.max_body));
        }
        // Read at most the limit, whatever the headers claimed.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > self.max_body {
                return Err(CallError::TooLarge(self.max_body));
            }
            body.extend_from_slice(&chunk);
        }
        let desired: DesiredJobs =
            serde_json::from_slice(&body).map_err(|e| CallError::Decode(e.to_string()))?;
        Ok(Pulled::Jobs {
            jobs: desired.jobs,
            etag,
        })
    }

    /// `POST /v1/results`; `Ok` when the whole batch is acknowledged.
    pub async fn push(&self, batch: &ResultBatch) -> Result<(), CallError> {
        let response = self
            .http
            .post(self.results_url.clone())
            .json(batch)
            .send()
            .await
            .map_err(classify)?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(status_error(&response))
        }
    }
}

fn status_error(response: &reqwest::Response) -> CallError {
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, std::time::SystemTime::now()));
    CallError::Status {
        status: response.status().as_u16(),
        retry_after,
    }
}

/// A `Retry-After` value (RFC 9110 section 10.2.3): delay seconds or an
/// HTTP-date, as a wait from `now`. Any size parses; the caller caps it.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 02 Dec 2026 08:00:00 GMT").unwrap();
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(" 3600 ", now), Some(Duration::from_secs(3600)));
        assert_eq!(
            retry_after("18446744073709551615", now),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 08:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in ["", "-1", "soon", "1.5", "99999999999999999999999"] {
            assert_eq!(retry_after(bad, now), None, "{bad}");
        }
    }
}
