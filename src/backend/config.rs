//! The control backend's settings (validated from the flags by
//! `config::backend`).

use std::time::Duration;

use url::Url;

/// A secret that never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret as given.
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How cronguard talks to its control backend.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Base URL; `v1/jobs` and `v1/results` are resolved against it.
    pub url: Url,
    /// Bearer token.
    pub token: Option<Secret>,
    /// Time between pulls.
    pub poll_interval: Duration,
    /// Longest call.
    pub timeout: Duration,
    /// Longest wait between upload retries.
    pub max_backoff: Duration,
    /// Liveness fails when no contact succeeded for this long.
    pub contact_max_age: Option<Duration>,
    /// Largest job list accepted.
    pub max_body_bytes: usize,
    /// Outbox entries kept at most.
    pub outbox_limit: u64,
    /// Entries per upload.
    pub upload_batch: usize,
}

/// Longest `--backend-timeout`: a call that takes longer is a hang.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest `--backend-max-backoff` (and so the longest wait between
/// upload attempts, `Retry-After` included).
pub const MAX_BACKOFF: Duration = Duration::from_secs(900);
/// Longest `--backend-poll-interval`.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
