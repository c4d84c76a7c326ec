//! Notifications: whom a job tells, about what, and the messages sent.
//!
//! A job's `notify` block names the events it reports and where to
//! (destinations); without one it reports the operator's default events to
//! the operator's default destination. What a message says and how a
//! webhook is signed (Standard Webhooks: `webhook-id`,
//! `webhook-timestamp`, `webhook-signature` = HMAC-SHA256) live here;
//! recording and delivery are the store's and the notifier's.

use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::action::{ActionPolicy, MAX_URL_LEN, is_public, literal_ip, refused_address};
use crate::validation::FieldErrors;

/// Most destinations on one job.
pub const MAX_DESTINATIONS: usize = 4;

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = NotificationEvent)]
pub enum Event {
    /// A run failed or timed out after the job's last success (or its
    /// first run failed); every failed run with `every_failure`.
    Failure,
    /// A run succeeded after one or more failures.
    Recovery,
    /// A fire was not run (recorded `missed`: downtime past the catch-up
    /// window, or no room to start).
    Missed,
    /// A run's owner vanished (crash, a replica's lease expired) and it
    /// was marked `orphaned`.
    Orphaned,
    /// The job's expected fire plus its misfire grace passed without a
    /// start (health `late`); once per expected fire.
    Late,
    /// `auto_pause_after` consecutive failures paused the job.
    AutoPaused,
}

impl Event {
    /// Every event, in a stable order.
    pub const ALL: [Self; 6] = [
        Self::Failure,
        Self::Recovery,
        Self::Missed,
        Self::Orphaned,
        Self::Late,
        Self::AutoPaused,
    ];

    /// Stable text form (stored, and the `event` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failure => "failure",
            Self::Recovery => "recovery",
            Self::Missed => "missed",
            Self::Orphaned => "orphaned",
            Self::Late => "late",
            Self::AutoPaused => "auto_paused",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a notification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = NotificationStatus)]
pub enum Status {
    /// Recorded; not yet routed to its destinations.
    New,
    /// Waiting for (another) attempt.
    Pending,
    /// A destination answered 2xx.
    Sent,
    /// Given up after `--notify-give-up-after` of failed attempts.
    Failed,
}

impl Status {
    /// Every status.
    pub const ALL: [Self; 4] = [Self::New, Self::Pending, Self::Sent, Self::Failed];

    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Pending => "pending",
            Self::Sent => "sent",
            Self::Failed => "failed",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| format!("`{s}` is not one of: new, pending, sent, failed"))
    }
}

/// What a destination receives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = NotificationFormat)]
pub enum Format {
    /// A JSON event (`type`, `timestamp`, `data`) signed per the Standard
    /// Webhooks specification when a secret is set.
    #[default]
    Webhook,
    /// A Slack-compatible incoming-webhook payload (`{"text": …}`).
    Slack,
}

/// One place to tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// `http` or `https` URL without credentials or query, or one whole
    /// `${CRONGUARD_SECRET_<NAME>}` reference to a variable that holds the
    /// URL (for URLs that are themselves secrets, as Slack's are).
    #[schema(example = "https://hooks.example.com/cronguard")]
    pub url: String,
    /// `webhook` (default) or `slack`.
    #[serde(default, skip_serializing_if = "is_webhook")]
    pub format: Format,
    /// The signing secret of a `webhook`: one whole
    /// `${CRONGUARD_SECRET_<NAME>}` reference whose value is `whsec_`
    /// followed by base64 (Standard Webhooks), or any other text used as
    /// the key's bytes. Unsigned when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "${CRONGUARD_SECRET_HOOK}")]
    pub secret: Option<String>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_webhook(f: &Format) -> bool {
    *f == Format::Webhook
}

/// A job's `notify` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// The events to report; the operator's default (`--notify-on`) when
    /// absent; `[]` reports nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<Event>>,
    /// Report every failed run, not only the first after a success.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub every_failure: bool,
    /// Where to; the operator's default destination (`--notify-url`) when
    /// absent; at most 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<DestinationSpec>>,
}

impl NotifySpec {
    /// Checks every field, pushing problems under `pointer`.
    pub fn check(&self, policy: &ActionPolicy, pointer: &str, errors: &mut FieldErrors) {
        if let Some(on) = &self.on {
            for (i, event) in on.iter().enumerate() {
                if on[..i].contains(event) {
                    errors.push(format!("{pointer}/on/{i}"), format!("`{event}` is listed twice"));
                }
            }
        }
        let Some(to) = &self.to else { return };
        if to.len() > MAX_DESTINATIONS {
            errors.push(
                format!("{pointer}/to"),
                format!("more than {MAX_DESTINATIONS} destinations"),
            );
        }
        for (i, d) in to.iter().enumerate() {
            d.check(policy, &format!("{pointer}/to/{i}"), errors);
        }
    }

    /// The `${CRONGUARD_SECRET_*}` names its destinations reference.
    pub fn references(&self) -> Vec<&str> {
        self.to
            .iter()
            .flatten()
            .flat_map(|d| [Some(d.url.as_str()), d.secret.as_deref()])
            .flatten()
            .filter_map(whole_reference)
            .collect()
    }
}

/// The variable `value` names when it is one whole reference.
fn whole_reference(value: &str) -> Option<&str> {
    let name = value.strip_prefix("${")?.strip_suffix('}')?;
    (crate::secrets::references(value).ok()?.as_slice() == [name]).then_some(name)
}

impl DestinationSpec {
    fn check(&self, policy: &ActionPolicy, pointer: &str, errors: &mut FieldErrors) {
        let at = format!("{pointer}/url");
        if whole_reference(&self.url).is_some() {
            // Resolved and checked when a message is sent.
        } else if self.url.contains("${") {
            errors.push(
                at,
                "a URL is either written out or one whole ${CRONGUARD_SECRET_<NAME>} reference",
            );
        } else if self.url.len() > MAX_URL_LEN {
            errors.push(at, format!("longer than {MAX_URL_LEN} bytes"));
        } else if let Err(why) = check_url(&self.url, policy) {
            errors.push(at, why);
        }
        match (&self.secret, self.format) {
            (Some(_), Format::Slack) => errors.push(
                format!("{pointer}/secret"),
                "Slack payloads are not signed: remove the secret (put a secret URL in a reference)",
            ),
            (Some(secret), Format::Webhook) if whole_reference(secret).is_none() => errors.push(
                format!("{pointer}/secret"),
                "must be one whole ${CRONGUARD_SECRET_<NAME>} reference: a secret is never stored in a job",
            ),
            _ => {}
        }
    }
}

/// Checks a written-out destination URL: http(s) with a host, no
/// credentials or query (every reader of the job sees it), and a literal
/// address allowed by the SSRF guard.
pub fn check_url(text: &str, policy: &ActionPolicy) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("must be an http or https URL with a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err(
            "credentials or a query in a URL would be shown to every reader of the job: put a URL \
             that is a secret in a ${CRONGUARD_SECRET_<NAME>} reference"
                .into(),
        );
    }
    if policy.deny_private_networks && literal_ip(&url).is_some_and(|ip| !is_public(ip)) {
        return Err(refused_address(literal_ip(&url)));
    }
    Ok(url)
}

/// Where a recorded notification goes: one of the job's destinations, or
/// the operator's default (resolved when it is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The operator's `--notify-url`.
    Default,
    /// A destination of the job, as it was when the event happened.
    Job(DestinationSpec),
}

/// What the operator set for every job without its own choice.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// The events reported by jobs without `notify.on`.
    pub on: Vec<Event>,
    /// The default destination, if the operator set one.
    pub destination: Option<DefaultDestination>,
}

/// The operator's default destination.
#[derive(Clone)]
pub struct DefaultDestination {
    /// Where.
    pub url: url::Url,
    /// In which shape.
    pub format: Format,
    /// Its signing secret's key bytes.
    pub key: Option<Vec<u8>>,
}

impl fmt::Debug for DefaultDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultDestination")
            .field("origin", &self.url.origin().ascii_serialization())
            .field("format", &self.format)
            .field("signed", &self.key.is_some())
            .finish()
    }
}

/// The events the operator's default reports when none is set.
pub const DEFAULT_EVENTS: [Event; 4] = [
    Event::Failure,
    Event::Recovery,
    Event::Orphaned,
    Event::AutoPaused,
];

impl Defaults {
    /// Whom a job with `spec` tells about `event`; empty when nobody.
    /// `first` is false for a failure that continues a streak.
    pub fn targets(&self, spec: Option<&NotifySpec>, event: Event, first: bool) -> Vec<Target> {
        let on = spec.and_then(|s| s.on.as_deref()).unwrap_or(&self.on);
        let every_failure = spec.is_some_and(|s| s.every_failure);
        if !on.contains(&event) || (event == Event::Failure && !first && !every_failure) {
            return Vec::new();
        }
        match spec.and_then(|s| s.to.as_ref()) {
            Some(to) => to.iter().cloned().map(Target::Job).collect(),
            None if self.destination.is_some() => vec![Target::Default],
            None => Vec::new(),
        }
    }
}

/// The key bytes of a signing secret: `whsec_` + base64 decodes (the
/// Standard Webhooks form); any other text is used as it is.
pub fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "a whsec_ secret must be followed by base64".to_owned()),
        None if secret.is_empty() => Err("the signing secret is empty".into()),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// The `webhook-signature` header value: `v1,` + base64 of
/// HMAC-SHA256(key, `{id}.{timestamp}.{body}`).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
}

/// What happened, as every destination is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// The event.
    pub event: Event,
    /// The job's id.
    pub job_id: String,
    /// The job's name.
    pub job_name: String,
    /// The run it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// One line: the run's error, the pause note, the expected instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Message {
    /// The body a destination of `format` receives.
    pub fn body(&self, format: Format) -> Vec<u8> {
        let value = match format {
            Format::Webhook => serde_json::json!({
                "type": format!("job.{}", self.event),
                "timestamp": self.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
                "data": self,
            }),
            Format::Slack => serde_json::json!({ "text": self.line() }),
        };
        serde_json::to_vec(&value).unwrap_or_default()
    }

    /// One human line.
    pub fn line(&self) -> String {
        let what = match self.event {
            Event::Failure => "failed",
            Event::Recovery => "recovered",
            Event::Missed => "missed a fire",
            Event::Orphaned => "lost a run (orphaned)",
            Event::Late => "is late",
            Event::AutoPaused => "was paused after repeated failures",
        };
        let mut line = format!("cronguard: job `{}` {what}", self.job_name);
        if let Some(detail) = &self.detail {
            line.push_str(": ");
            line.push_str(detail);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The specification's own example (standard-webhooks/spec.md).
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_streak_reports_its_first_failure_only_unless_asked() {
        let defaults = Defaults {
            on: DEFAULT_EVENTS.to_vec(),
            destination: None,
        };
        let to = DestinationSpec {
            url: "http://127.0.0.1:9/".into(),
            format: Format::Webhook,
            secret: None,
        };
        let mut spec = NotifySpec {
            to: Some(vec![to]),
            ..NotifySpec::default()
        };
        assert_eq!(defaults.targets(Some(&spec), Event::Failure, true).len(), 1);
        assert!(defaults.targets(Some(&spec), Event::Failure, false).is_empty());
        assert!(defaults.targets(Some(&spec), Event::Late, true).is_empty());
        spec.every_failure = true;
        assert_eq!(defaults.targets(Some(&spec), Event::Failure, false).len(), 1);
        // No default destination: a job without `to` tells nobody.
        assert!(defaults.targets(None, Event::Failure, true).is_empty());
    }

    #[test]
    fn destinations_keep_secrets_out_of_the_job() {
        let policy = ActionPolicy::default();
        let check = |url: &str, secret: Option<&str>, format| {
            let mut errors = FieldErrors::default();
            let d = DestinationSpec {
                url: url.into(),
                format,
                secret: secret.map(Into::into),
            };
            d.check(&policy, "/notify/to/0", &mut errors);
            errors.is_empty()
        };
        assert!(check(
            "https://hooks.example.com/x",
            Some("${CRONGUARD_SECRET_HOOK}"),
            Format::Webhook
        ));
        assert!(check("${CRONGUARD_SECRET_SLACK_URL}", None, Format::Slack));
        assert!(!check("https://u:p@hooks.example.com/x", None, Format::Webhook));
        assert!(!check(
            "https://hooks.example.com/x?token=s",
            None,
            Format::Webhook
        ));
        assert!(!check(
            "https://hooks.example.com/${CRONGUARD_SECRET_X}",
            None,
            Format::Webhook
        ));
        assert!(!check(
            "https://hooks.example.com/x",
            Some("whsec_literal"),
            Format::Webhook
        ));
        assert!(!check(
            "https://hooks.example.com/x",
            Some("${CRONGUARD_SECRET_S}"),
            Format::Slack
        ));
        assert!(!check("ftp://hooks.example.com/x", None, Format::Webhook));
    }
}
