//! Configuration: defaults → TOML file → environment → flags, validated.
//!
//! Every setting is declared once in [`Settings`] (with its flag, its
//! `CRONGUARD_*` variable and its help text, which `cronguard serve --help`
//! prints) and once in [`Config`] (typed, defaults applied). The file uses
//! the same names as the flags, with `_` for `-`. An invalid value fails at
//! startup with an error naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::store::Synchronous;

mod backend;
mod notify;
mod settings;

pub use self::settings::{LogFormat, Settings};

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
    /// Most subscribers to the live event feed.
    pub events_max_subscribers: usize,
    /// The operator's default notification events and destination.
    pub notify: crate::notification::Defaults,
    /// How long a notification is retried.
    pub notify_give_up_after: Duration,
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
        let guard = crate::action::ActionPolicy {
            deny_private_networks: s.deny_private_networks.unwrap_or(false),
            ..crate::action::ActionPolicy::default()
        };
        let (notify, notify_give_up_after) = notify::notify(&s, &guard)?;
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
            events_max_subscribers: s.events_max_subscribers.unwrap_or(256),
            notify,
            notify_give_up_after,
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
