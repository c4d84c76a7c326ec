//! One notification as it goes out: its destination resolved (secret
//! references read now, never stored), its body in the destination's
//! format, and the Standard Webhooks headers with the signature.

use chrono::{DateTime, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::action::ActionPolicy;
use crate::notification::{Defaults, Format, Message, Target, check_url, sign, signing_key};

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// A request ready to send.
pub(super) struct Outgoing {
    pub url: url::Url,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Builds the request for `message` (id `id`) to `target` at `now`; an
/// error says why it cannot be sent (a missing secret, a refused URL) and
/// never holds a secret.
pub(super) fn outgoing(
    target: &Target,
    defaults: &Defaults,
    policy: &ActionPolicy,
    message: &Message,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Outgoing, String> {
    let (url, format, key) = match target {
        Target::Default => {
            let d = defaults
                .destination
                .as_ref()
                .ok_or("no default destination is configured any more (--notify-url)")?;
            (d.url.clone(), d.format, d.key.clone())
        }
        Target::Job(d) => {
            let url = if d.url.starts_with("${") {
                let text = crate::secrets::expand(&d.url)?;
                check_url(&text, policy).map_err(|why| format!("the URL in {}: {why}", d.url))?
            } else {
                check_url(&d.url, policy)?
            };
            let key = d
                .secret
                .as_deref()
                .map(|s| crate::secrets::expand(s).and_then(|v| signing_key(&v)))
                .transpose()?;
            (url, d.format, key)
        }
    };
    let body = message.body(format);
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if format == Format::Webhook {
        let timestamp = now.timestamp();
        let value =
            |text: String| HeaderValue::from_str(&text).map_err(|_| "an invalid header value".to_owned());
        headers.insert(WEBHOOK_ID, value(id.to_owned())?);
        headers.insert(WEBHOOK_TIMESTAMP, value(timestamp.to_string())?);
        if let Some(key) = key {
            headers.insert(WEBHOOK_SIGNATURE, value(sign(&key, id, timestamp, &body))?);
        }
    }
    Ok(Outgoing { url, headers, body })
}
