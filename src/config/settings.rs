//! Every setting as given, from flags, environment or the file, before
//! validation.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::store::Synchronous;

/// Every setting as given (all optional); flags and environment via clap,
/// the file via serde.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address and port to listen on [default: 127.0.0.1:8080]
    #[arg(long, env = "CRONGUARD_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<String>,

    /// Database URL or path [default: sqlite://./cronguard.db]
    #[arg(long, env = "CRONGUARD_DATABASE", value_name = "URL")]
    pub database: Option<String>,

    /// Allow `command` actions (they run programs on this host) [default: false]
    #[arg(long, env = "CRONGUARD_ENABLE_COMMAND_JOBS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub enable_command_jobs: Option<bool>,

    /// SQLite durability: `normal` survives a crash of the service, `full` also power loss [default: normal]
    #[arg(long, env = "CRONGUARD_SQLITE_SYNCHRONOUS", value_name = "LEVEL")]
    pub sqlite_synchronous: Option<Synchronous>,

    /// How long SIGTERM waits for running runs before cancelling them [default: 30s]
    #[arg(long, env = "CRONGUARD_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,

    /// Most runs executing at once over all jobs; more wait as `queued` [default: 10000]
    #[arg(long, env = "CRONGUARD_MAX_RUNNING", value_name = "N")]
    pub max_running: Option<usize>,

    /// Bytes of command output (or HTTP response body) kept per run [default: 16384]
    #[arg(long, env = "CRONGUARD_OUTPUT_TAIL_BYTES", value_name = "BYTES")]
    pub output_tail_bytes: Option<usize>,

    /// Largest request body accepted [default: 262144]
    #[arg(long, env = "CRONGUARD_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// Longest an API request may take before a 503 [default: 30s]
    #[arg(long, env = "CRONGUARD_REQUEST_TIMEOUT", value_name = "DURATION")]
    pub request_timeout: Option<String>,

    /// Most API requests processed at once; others wait [default: 1024]
    #[arg(long, env = "CRONGUARD_MAX_CONCURRENT_REQUESTS", value_name = "N")]
    pub max_concurrent_requests: Option<usize>,

    /// A loop whose heartbeat is older than this fails liveness [default: 10s]
    #[arg(long, env = "CRONGUARD_LOOP_STALE_AFTER", value_name = "DURATION")]
    pub loop_stale_after: Option<String>,

    /// Time between passes of the orphan reaper [default: 10s]
    #[arg(long, env = "CRONGUARD_REAPER_INTERVAL", value_name = "DURATION")]
    pub reaper_interval: Option<String>,

    /// Replicas on PostgreSQL: a replica that has not renewed its lease for this long is declared stopped and its jobs are taken over; renewed every third of it [default: 3s]
    #[arg(long, env = "CRONGUARD_REPLICA_LEASE", value_name = "DURATION")]
    pub replica_lease: Option<String>,

    /// What to do with live processes of runs a previous incarnation left: `kill` or `report` [default: kill]
    #[arg(long, env = "CRONGUARD_ORPHAN_POLICY", value_name = "POLICY")]
    pub orphan_policy: Option<crate::orphans::OrphanPolicy>,

    /// Finished runs kept per job unless its policy says otherwise; 0 keeps all [default: 1000]
    #[arg(long, env = "CRONGUARD_HISTORY_KEEP_LAST", value_name = "N")]
    pub history_keep_last: Option<u32>,

    /// Finished runs older than this are deleted unless the job's policy says otherwise; 0s keeps all [default: 30d]
    #[arg(long, env = "CRONGUARD_HISTORY_MAX_AGE", value_name = "DURATION")]
    pub history_max_age: Option<String>,

    /// Time between passes of the history retention loop [default: 1m]
    #[arg(long, env = "CRONGUARD_RETENTION_INTERVAL", value_name = "DURATION")]
    pub retention_interval: Option<String>,

    /// API tokens as NAME:SCOPE:SECRET (scope read, write or admin), comma-separated; prefer --tokens-file
    #[arg(
        long = "token",
        env = "CRONGUARD_TOKENS",
        value_name = "NAME:SCOPE:SECRET",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub tokens: Option<Vec<String>>,

    /// File of API tokens, one `NAME SCOPE sha256:HEX` per line (`cronguard hash-token` prints the hash)
    #[arg(long, env = "CRONGUARD_TOKENS_FILE", value_name = "PATH")]
    pub tokens_file: Option<PathBuf>,

    /// Allow listening on a non-loopback address without any token [default: false]
    #[arg(long, env = "CRONGUARD_INSECURE_NO_AUTH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_no_auth: Option<bool>,

    /// Require a (read) token for /metrics too [default: false]
    #[arg(long, env = "CRONGUARD_METRICS_REQUIRE_TOKEN", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_require_token: Option<bool>,

    /// Programs command actions may run (absolute paths or names), comma-separated; empty allows any [default: any]
    #[arg(
        long,
        env = "CRONGUARD_COMMAND_ALLOWLIST",
        value_name = "PROGRAMS",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub command_allowlist: Option<Vec<String>>,

    /// Refuse HTTP actions to loopback, private, link-local and other non-public addresses (SSRF guard) [default: false]
    #[arg(long, env = "CRONGUARD_DENY_PRIVATE_NETWORKS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub deny_private_networks: Option<bool>,

    /// Send HTTP actions through this proxy (http:// or https:// URL). HTTP_PROXY, HTTPS_PROXY and ALL_PROXY are ignored for actions [default: none]
    #[arg(long, env = "CRONGUARD_ACTION_PROXY", value_name = "URL")]
    pub action_proxy: Option<String>,

    /// Most jobs that may exist; creating more is refused [default: unlimited]
    #[arg(long, env = "CRONGUARD_MAX_JOBS", value_name = "N")]
    pub max_jobs: Option<u64>,

    /// Control backend base URL; cronguard pulls `v1/jobs` and pushes `v1/results` under it [default: none]
    #[arg(long, env = "CRONGUARD_BACKEND_URL", value_name = "URL")]
    pub backend_url: Option<String>,

    /// Bearer token for the control backend (never logged); prefer the environment variable
    #[arg(
        long,
        env = "CRONGUARD_BACKEND_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub backend_token: Option<String>,

    /// Time between pulls of the desired jobs [default: 30s]
    #[arg(long, env = "CRONGUARD_BACKEND_POLL_INTERVAL", value_name = "DURATION")]
    pub backend_poll_interval: Option<String>,

    /// Longest a call to the backend may take [default: 10s]
    #[arg(long, env = "CRONGUARD_BACKEND_TIMEOUT", value_name = "DURATION")]
    pub backend_timeout: Option<String>,

    /// Longest wait between upload retries (exponential backoff from 1s, with jitter) [default: 5m]
    #[arg(long, env = "CRONGUARD_BACKEND_MAX_BACKOFF", value_name = "DURATION")]
    pub backend_max_backoff: Option<String>,

    /// Fail liveness when no pull or push succeeded for this long (restart as the cure) [default: off]
    #[arg(long, env = "CRONGUARD_BACKEND_CONTACT_MAX_AGE", value_name = "DURATION")]
    pub backend_contact_max_age: Option<String>,

    /// Largest job list accepted from the backend [default: 16777216]
    #[arg(long, env = "CRONGUARD_BACKEND_MAX_BODY_BYTES", value_name = "BYTES")]
    pub backend_max_body_bytes: Option<usize>,

    /// Results waiting for upload beyond which the oldest are dropped (and counted) [default: 100000]
    #[arg(long, env = "CRONGUARD_OUTBOX_LIMIT", value_name = "N")]
    pub outbox_limit: Option<u64>,

    /// Results per upload [default: 100]
    #[arg(long, env = "CRONGUARD_UPLOAD_BATCH", value_name = "N")]
    pub upload_batch: Option<usize>,

    /// Most clients subscribed to GET /v1/events at once; more get 503 [default: 256]
    #[arg(long, env = "CRONGUARD_EVENTS_MAX_SUBSCRIBERS", value_name = "N")]
    pub events_max_subscribers: Option<usize>,

    /// Default notification destination for jobs without their own `notify.to` (an http(s) URL; a Slack incoming-webhook URL with --notify-format slack) [default: none]
    #[arg(
        long,
        env = "CRONGUARD_NOTIFY_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub notify_url: Option<String>,

    /// What the default destination receives: `webhook` (signed JSON event) or `slack` [default: webhook]
    #[arg(long, env = "CRONGUARD_NOTIFY_FORMAT", value_name = "FORMAT")]
    pub notify_format: Option<String>,

    /// Signing secret of the default webhook destination (`whsec_` + base64, as Standard Webhooks); prefer the environment variable [default: unsigned]
    #[arg(
        long,
        env = "CRONGUARD_NOTIFY_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub notify_secret: Option<String>,

    /// Events reported by jobs without their own `notify.on`, comma-separated, from failure, recovery, missed, orphaned, late, auto_paused [default: failure,recovery,orphaned,auto_paused]
    #[arg(long, env = "CRONGUARD_NOTIFY_ON", value_name = "EVENTS")]
    pub notify_on: Option<String>,

    /// Stop retrying a notification this long after its event (then it is `failed`, counted and logged) [default: 24h]
    #[arg(long, env = "CRONGUARD_NOTIFY_GIVE_UP_AFTER", value_name = "DURATION")]
    pub notify_give_up_after: Option<String>,

    /// Log filter, e.g. `info` or `info,cronguard=debug` [default: info]
    #[arg(long, env = "CRONGUARD_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Log format: `text` or `json` [default: text]
    #[arg(long, env = "CRONGUARD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Settings {
    /// `self` where set, else `lower` (flags/env over the file).
    pub fn or(self, lower: Settings) -> Settings {
        macro_rules! pick {
            ($($field:ident),+ $(,)?) => {
                Settings { $($field: self.$field.or(lower.$field)),+ }
            };
        }
        pick!(
            listen,
            database,
            enable_command_jobs,
            sqlite_synchronous,
            shutdown_grace,
            max_running,
            output_tail_bytes,
            max_body_bytes,
            request_timeout,
            max_concurrent_requests,
            loop_stale_after,
            reaper_interval,
            replica_lease,
            orphan_policy,
            history_keep_last,
            history_max_age,
            retention_interval,
            tokens,
            tokens_file,
            insecure_no_auth,
            metrics_require_token,
            command_allowlist,
            deny_private_networks,
            action_proxy,
            max_jobs,
            backend_url,
            backend_token,
            backend_poll_interval,
            backend_timeout,
            backend_max_backoff,
            backend_contact_max_age,
            backend_max_body_bytes,
            outbox_limit,
            upload_batch,
            events_max_subscribers,
            notify_url,
            notify_format,
            notify_secret,
            notify_on,
            notify_give_up_after,
            log,
            log_format,
        )
    }

    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            setting: "config",
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError {
            setting: "config",
            message: format!("{}: {e}", path.display()),
        })
    }
}
