//! The control backend's settings, validated into a [`BackendConfig`].

use std::time::Duration;

use url::Url;

use super::{ConfigError, Settings, bounded, duration};
use crate::backend::config::{BackendConfig, MAX_BACKOFF, MAX_POLL_INTERVAL, MAX_TIMEOUT, Secret};

/// `None` without `--backend-url`; otherwise every backend setting
/// validated (an error names the setting, never the token).
pub(super) fn backend(s: &Settings) -> Result<Option<BackendConfig>, ConfigError> {
    let Some(text) = s.backend_url.as_deref() else {
        return Ok(None);
    };
    let invalid = |message: String| ConfigError {
        setting: "backend_url",
        message,
    };
    let mut url = Url::parse(text).map_err(|e| invalid(format!("`{text}`: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "`{text}`: only http:// and https:// are supported"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "put credentials in --backend-token, not in the URL".into(),
        ));
    }
    // `v1/jobs` resolves under the base only if it ends with `/`.
    if !url.path().ends_with('/') {
        url.set_path(&format!("{}/", url.path()));
    }
    let token = match s.backend_token.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(t) if t.bytes().any(|b| b.is_ascii_control()) => {
            return Err(ConfigError {
                setting: "backend_token",
                message: "contains control characters".into(),
            });
        }
        Some(t) => Some(Secret::new(t.to_owned())),
    };
    let positive = |setting: &'static str, value: Option<String>, default: Duration| {
        let d = duration(setting, value, default)?;
        if d.is_zero() {
            Err(ConfigError {
                setting,
                message: "must be more than zero".into(),
            })
        } else {
            Ok(d)
        }
    };
    // A wait or a call without a sane bound is how a hung backend
    // freezes delivery while every signal stays green.
    let capped = |setting: &'static str, value: Option<String>, default: Duration, max: Duration| {
        let d = positive(setting, value, default)?;
        if d > max {
            Err(ConfigError {
                setting,
                message: format!("at most {}", humantime::format_duration(max)),
            })
        } else {
            Ok(d)
        }
    };
    let contact_max_age = match s.backend_contact_max_age.clone() {
        None => None,
        Some(v) => Some(positive("backend_contact_max_age", Some(v), Duration::ZERO)?),
    };
    Ok(Some(BackendConfig {
        url,
        token,
        poll_interval: capped(
            "backend_poll_interval",
            s.backend_poll_interval.clone(),
            Duration::from_secs(30),
            MAX_POLL_INTERVAL,
        )?,
        timeout: capped(
            "backend_timeout",
            s.backend_timeout.clone(),
            Duration::from_secs(10),
            MAX_TIMEOUT,
        )?,
        max_backoff: capped(
            "backend_max_backoff",
            s.backend_max_backoff.clone(),
            Duration::from_secs(300),
            MAX_BACKOFF,
        )?,
        contact_max_age,
        max_body_bytes: bounded(
            "backend_max_body_bytes",
            s.backend_max_body_bytes,
            16 * 1024 * 1024,
            1024,
            1024 * 1024 * 1024,
        )?,
        outbox_limit: bounded(
            "outbox_limit",
            s.outbox_limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            100_000,
            1,
            100_000_000,
        )? as u64,
        upload_batch: bounded("upload_batch", s.upload_batch, 100, 1, 10_000)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_gets_a_trailing_slash_and_the_token_stays_secret() {
        let s = Settings {
            backend_url: Some("http://127.0.0.1:9/api".into()),
            backend_token: Some("s3cret".into()),
            ..Settings::default()
        };
        let c = backend(&s).unwrap().unwrap();
        assert_eq!(
            c.url.join("v1/jobs").unwrap().as_str(),
            "http://127.0.0.1:9/api/v1/jobs"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.token.unwrap().expose(), "s3cret");
    }

    #[test]
    fn invalid_backend_settings_name_the_setting() {
        for (s, setting) in [
            (
                Settings {
                    backend_url: Some("ftp://x".into()),
                    ..Settings::default()
                },
                "backend_url",
            ),
            (
                Settings {
                    backend_url: Some("http://u:p@x/".into()),
                    ..Settings::default()
                },
                "backend_url",
            ),
            (
                Settings {
                    backend_url: Some("http://x/".into()),
                    backend_poll_interval: Some("0s".into()),
                    ..Settings::default()
                },
                "backend_poll_interval",
            ),
            (
                Settings {
                    backend_url: Some("http://x/".into()),
                    upload_batch: Some(0),
                    ..Settings::default()
                },
                "upload_batch",
            ),
            (
                Settings {
                    backend_url: Some("http://x/".into()),
                    backend_timeout: Some("1h".into()),
                    ..Settings::default()
                },
                "backend_timeout",
            ),
            (
                Settings {
                    backend_url: Some("http://x/".into()),
                    backend_timeout: Some("100000d".into()),
                    ..Settings::default()
                },
                "backend_timeout",
            ),
            (
                Settings {
                    backend_url: Some("http://x/".into()),
                    backend_max_backoff: Some("2h".into()),
                    ..Settings::default()
                },
                "backend_max_backoff",
            ),
        ] {
            assert_eq!(backend(&s).unwrap_err().setting, setting);
        }
        assert!(backend(&Settings::default()).unwrap().is_none());
    }
}
