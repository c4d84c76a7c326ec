//! Notification settings, validated into the notifier's configuration.

use std::time::Duration;

use super::{ConfigError, Settings, duration};
use crate::notification::{DEFAULT_EVENTS, DefaultDestination, Defaults, Event, Format, signing_key};

/// The longest a notification may be retried (`--notify-give-up-after`).
pub const MAX_GIVE_UP_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default events and destination, and how long to retry. An error
/// names the setting, never the secret or a secret URL's path.
pub(super) fn notify(
    s: &Settings,
    actions: &crate::action::ActionPolicy,
) -> Result<(Defaults, Duration), ConfigError> {
    let error = |setting: &'static str, message: String| ConfigError { setting, message };
    let on = match s.notify_on.as_deref().map(str::trim) {
        None => DEFAULT_EVENTS.to_vec(),
        Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|item| {
                Event::parse(item.trim()).ok_or_else(|| {
                    let all: Vec<&str> = Event::ALL.iter().map(|e| e.as_str()).collect();
                    error(
                        "notify_on",
                        format!("`{}` is not one of {}", item.trim(), all.join(", ")),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let format = match s.notify_format.as_deref() {
        None | Some("webhook") => Format::Webhook,
        Some("slack") => Format::Slack,
        Some(other) => {
            return Err(error(
                "notify_format",
                format!("`{other}` is neither webhook nor slack"),
            ));
        }
    };
    let destination = match s.notify_url.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(text) => {
            let url = crate::notification::check_url(text, actions).map_err(|why| {
                let shown = url::Url::parse(text)
                    .map_or_else(|_| "the URL".to_owned(), |u| u.origin().ascii_serialization());
                error("notify_url", format!("{shown}: {why}"))
            })?;
            let key = match s.notify_secret.as_deref().filter(|t| !t.is_empty()) {
                None => None,
                Some(_) if format == Format::Slack => {
                    return Err(error("notify_secret", "Slack payloads are not signed".into()));
                }
                Some(secret) => Some(signing_key(secret).map_err(|why| error("notify_secret", why))?),
            };
            Some(DefaultDestination { url, format, key })
        }
    };
    if destination.is_none() && s.notify_secret.is_some() {
        return Err(error("notify_secret", "set --notify-url too".into()));
    }
    let give_up = duration(
        "notify_give_up_after",
        s.notify_give_up_after.clone(),
        Duration::from_secs(24 * 3600),
    )?;
    if give_up.is_zero() || give_up > MAX_GIVE_UP_AFTER {
        return Err(error(
            "notify_give_up_after",
            "must be more than zero and at most 7 days".into(),
        ));
    }
    Ok((Defaults { on, destination }, give_up))
}
