//! Configuration: defaults → TOML file → environment → flags, validated.
//!
//! Every setting is declared once in [`Settings`] (with its flag, its
//! `CRONGUARD_*` variable and its help text, which `cronguard serve --help`
//! prints) and once in [`Config`] (typed, defaults applied). The file uses
//! the same names as the flags, with `_` for `-`. An invalid value fails at
//! startup with an error naming the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::Synchronous;

mod backend;

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

/// A setting that does not validate.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting `{setting}`: {message}")]
pub struct ConfigError {
    /// The setting's name (flag without dashes, file key).
    pub setting: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The validated configuration of `cronguard serve`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Database URL.
    pub database: String,
    /// Whether command actions are allowed.
    pub enable_command_jobs: bool,
    /// SQLite durability.
    pub sqlite_synchronous: Synchronous,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// Global running limit.
    pub max_running: usize,
    /// Output kept per run.
    pub output_tail_bytes: usize,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Request timeout.
    pub request_timeout: Duration,
    /// Concurrent request limit.
    pub max_concurrent_requests: usize,
    /// Log filter.
    pub log: String,
    /// Log format.
    pub log_format: LogFormat,
    /// How often the engine wakes when idle (heartbeat, clock re-read).
    pub engine_tick: Duration,
    /// Heartbeat age beyond which a loop fails liveness.
    pub loop_stale_after: Duration,
    /// Orphan reaper period.
    pub reaper_interval: Duration,
    /// Replicas: the lease (renewed every third of it).
    pub replica_lease: Duration,
    /// Policy for a previous incarnation's surviving processes.
    pub orphan_policy: crate::orphans::OrphanPolicy,
    /// Service-wide run history bounds.
    pub history: crate::retention::HistoryDefaults,
    /// Retention loop period.
    pub retention_interval: Duration,
    /// API tokens (digests only).
    pub tokens: std::sync::Arc<crate::api::auth::Tokens>,
    /// Programs command actions may run; empty: any.
    pub command_allowlist: Vec<String>,
    /// The SSRF guard for HTTP actions.
    pub deny_private_networks: bool,
    /// The proxy HTTP actions go through, if any.
    pub action_proxy: Option<url::Url>,
    /// Job quota.
    pub max_jobs: Option<u64>,
    /// The control backend, when configured.
    pub backend: Option<crate::backend::BackendConfig>,
    /// Whether this process owns its process tree: child subreaper, stray
    /// detection and zombie reaping. Set by `cronguard serve`, not a
    /// setting: an embedding process (the test suite) owns its own tree.
    pub process_supervision: bool,
    /// The cronguard binary to run as the command shim (`__shim`); set by
    /// `cronguard serve` to itself. Not a setting.
    pub command_shim: Option<PathBuf>,
}

/// Default database location.
pub const DEFAULT_DATABASE: &str = "sqlite://./cronguard.db";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

pub(crate) fn duration(
    setting: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => humantime::parse_duration(&text).map_err(|e| ConfigError {
            setting,
            message: format!("`{text}` is not a duration like `30s`: {e}"),
        }),
    }
}

/// The replica lease: long enough for three renewals a few hundred
/// milliseconds apart, short enough for a takeover within a minute.
fn lease(value: Option<String>) -> Result<Duration, ConfigError> {
    let lease = duration("replica_lease", value, crate::cluster::DEFAULT_LEASE)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&lease) {
        return Err(ConfigError {
            setting: "replica_lease",
            message: format!("{lease:?} is outside 1s..=60s"),
        });
    }
    Ok(lease)
}

pub(crate) fn bounded(
    setting: &'static str,
    value: Option<usize>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let v = value.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError {
            setting,
            message: format!("{v} is outside {min}..={max}"),
        })
    }
}

impl Config {
    /// Layers `flags_env` over the optional file, then defaults, and validates.
    pub fn load(flags_env: Settings, file: Option<&PathBuf>) -> Result<Config, ConfigError> {
        let settings = match file {
            Some(path) => flags_env.or(Settings::from_file(path)?),
            None => flags_env,
        };
        Self::from_settings(settings)
    }

    /// Applies defaults and validates.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let backend = backend::backend(&s)?;
        let listen_text = s.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse().map_err(|_| ConfigError {
            setting: "listen",
            message: format!("`{listen_text}` is not ADDR:PORT such as 127.0.0.1:8080 or [::]:8080"),
        })?;
        let mut tokens = crate::api::auth::Tokens::parse(
            s.tokens.as_deref().unwrap_or_default(),
            s.tokens_file.as_deref(),
        )
        .map_err(|message| ConfigError {
            setting: "tokens",
            message,
        })?;
        tokens.metrics_require_token = s.metrics_require_token.unwrap_or(false);
        let addr: SocketAddr = listen;
        if !addr.ip().is_loopback() && !tokens.enabled() && !s.insecure_no_auth.unwrap_or(false) {
            return Err(ConfigError {
                setting: "listen",
                message: format!(
                    "{addr} is reachable from other hosts and no API token is configured: set --token or \
                     --tokens-file, or pass --insecure-no-auth to run an open API deliberately"
                ),
            });
        }
        let database = s.database.unwrap_or_else(|| DEFAULT_DATABASE.to_owned());
        if database.trim().is_empty() || database.contains(":memory:") || database.contains("mode=memory") {
            return Err(ConfigError {
                setting: "database",
                message: "must name a file (an in-memory database would lose every job on restart)".into(),
            });
        }
        let postgres = database.starts_with("postgres://") || database.starts_with("postgresql://");
        if database.contains("://") && !database.starts_with("sqlite://") && !postgres {
            return Err(ConfigError {
                setting: "database",
                message: format!("`{database}`: use a sqlite:// URL (or a plain path) or a postgres:// URL"),
            });
        }
        Ok(Config {
            listen,
            database,
            enable_command_jobs: s.enable_command_jobs.unwrap_or(false),
            sqlite_synchronous: s.sqlite_synchronous.unwrap_or_default(),
            shutdown_grace: duration("shutdown_grace", s.shutdown_grace, Duration::from_secs(30))?,
            max_running: bounded("max_running", s.max_running, 10_000, 1, 1_000_000)?,
            output_tail_bytes: bounded(
                "output_tail_bytes",
                s.output_tail_bytes,
                16 * 1024,
                0,
                1024 * 1024,
            )?,
            max_body_bytes: bounded(
                "max_body_bytes",
                s.max_body_bytes,
                256 * 1024,
                1024,
                64 * 1024 * 1024,
            )?,
            request_timeout: duration("request_timeout", s.request_timeout, Duration::from_secs(30))?,
            max_concurrent_requests: bounded(
                "max_concurrent_requests",
                s.max_concurrent_requests,
                1024,
                1,
                1_000_000,
            )?,
            log: s.log.unwrap_or_else(|| "info".to_owned()),
            log_format: s.log_format.unwrap_or_default(),
            engine_tick: Duration::from_secs(1),
            loop_stale_after: duration("loop_stale_after", s.loop_stale_after, Duration::from_secs(10))?,
            reaper_interval: duration("reaper_interval", s.reaper_interval, Duration::from_secs(10))?,
            replica_lease: lease(s.replica_lease)?,
            orphan_policy: s.orphan_policy.unwrap_or_default(),
            history: crate::retention::HistoryDefaults {
                keep_last: Some(s.history_keep_last.unwrap_or(1000)).filter(|k| *k > 0),
                max_age: Some(duration(
                    "history_max_age",
                    s.history_max_age,
                    Duration::from_secs(30 * 24 * 3600),
                )?)
                .filter(|d| !d.is_zero()),
            },
            retention_interval: duration(
                "retention_interval",
                s.retention_interval,
                Duration::from_secs(60),
            )?,
            tokens: std::sync::Arc::new(tokens),
            command_allowlist: s
                .command_allowlist
                .unwrap_or_default()
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect(),
            deny_private_networks: s.deny_private_networks.unwrap_or(false),
            action_proxy: action_proxy(s.action_proxy.as_deref())?,
            max_jobs: s.max_jobs,
            backend,
            process_supervision: false,
            command_shim: None,
        })
    }
}

/// `--action-proxy`: an http(s) URL. Its credentials, if any, never appear
/// in an error.
fn action_proxy(text: Option<&str>) -> Result<Option<url::Url>, ConfigError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    match url::Url::parse(text) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(Some(u)),
        _ => Err(ConfigError {
            setting: "action_proxy",
            message: format!(
                "`{}` is not an http:// or https:// proxy URL",
                crate::secrets::redact_url_credentials(text)
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_out_of_the_box() {
        let c = Config::from_settings(Settings::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database, "sqlite://./cronguard.db");
        assert!(!c.enable_command_jobs);
    }

    #[test]
    fn flags_win_over_the_file_and_errors_name_the_setting() {
        let file: Settings = toml::from_str("listen = \"0.0.0.0:9000\"\nshutdown_grace = \"5s\"").unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:9001".into()),
            ..Settings::default()
        };
        let c = Config::from_settings(flags.or(file)).unwrap();
        assert_eq!(c.listen.port(), 9001);
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        let e = Config::from_settings(Settings {
            listen: Some("nope".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(e.setting, "listen");
        assert!(toml::from_str::<Settings>("lisen = 1").is_err());
    }
}
