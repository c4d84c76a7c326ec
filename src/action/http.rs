//! `kind: http`: the wire form, its validation (URL, method, headers,
//! body, success statuses, the SSRF guard on literal addresses) and the
//! validated call.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ActionPolicy, DEFAULT_HTTP_TIMEOUT, MAX_ARG_LEN, MAX_BODY_BYTES, MAX_HEADERS, MAX_URL_LEN,
    forbidden_header, is_public, literal_ip, parse_timeout, refused_address,
};
use crate::validation::{FieldErrors, escape_pointer};

/// `kind: http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// HTTP method; default `POST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "POST")]
    pub method: Option<String>,
    /// `http` or `https` URL, without credentials (send them in a header).
    #[schema(example = "https://example.com/hooks/nightly")]
    pub url: String,
    /// Extra request headers. The `X-Cronguard-*` identity headers are
    /// always added and cannot be overridden; framing and hop-by-hop
    /// headers (`Host`, `Content-Length`, `Transfer-Encoding`, …) are
    /// refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Request body, sent as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Headers whose values are secret: never shown back by the API
    /// (`Authorization`, `Proxy-Authorization`, `Cookie` and `X-Api-Key`
    /// always are). Values may reference `${CRONGUARD_SECRET_<NAME>}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_headers: Vec<String>,
    /// Per-attempt timeout; default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Response statuses that count as success: codes (`204`) or classes
    /// (`2xx`); default `["2xx"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_status: Option<Vec<String>>,
}

/// A validated HTTP call.
#[derive(Debug, Clone)]
pub struct HttpAction {
    /// Method.
    pub method: reqwest::Method,
    /// Target.
    pub url: reqwest::Url,
    /// Headers set by the job.
    pub headers: HeaderMap,
    /// Body, if any.
    pub body: Option<bytes::Bytes>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Which statuses count as success.
    pub success: StatusSet,
}

/// Set of HTTP statuses that count as success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    /// Whether `status` counts as success.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(lo, hi)| (*lo..=*hi).contains(&status))
    }

    fn parse(items: Option<&[String]>, pointer: &str, errors: &mut FieldErrors) -> Self {
        let Some(items) = items else {
            return Self(vec![(200, 299)]);
        };
        if items.is_empty() || items.len() > 32 {
            errors.push(pointer, "must list between 1 and 32 statuses");
        }
        let mut set = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item = item.trim();
            let range = if let Some(class) = item.strip_suffix("xx").or(item.strip_suffix("XX")) {
                class
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (1..=5).contains(c))
                    .map(|c| (c * 100, c * 100 + 99))
            } else {
                item.parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .map(|c| (c, c))
            };
            match range {
                Some(r) => set.push(r),
                None => errors.push(
                    format!("{pointer}/{i}"),
                    format!("`{item}` is neither a status code (100-599) nor a class like `2xx`"),
                ),
            }
        }
        Self(set)
    }
}

impl HttpSpec {
    pub(super) fn parse(&self, policy: &ActionPolicy, pointer: &str) -> Result<HttpAction, FieldErrors> {
        let mut errors = FieldErrors::default();
        let method_text = self.method.as_deref().unwrap_or("POST");
        let method = match reqwest::Method::from_bytes(method_text.as_bytes()) {
            Ok(m) if method_text.len() <= 16 && m.as_str().bytes().all(|b| b.is_ascii_uppercase()) => m,
            _ => {
                errors.push(
                    format!("{pointer}/method"),
                    "must be an upper-case HTTP method such as GET or POST",
                );
                reqwest::Method::POST
            }
        };
        let url = if self.url.len() > MAX_URL_LEN {
            errors.push(
                format!("{pointer}/url"),
                format!("longer than {MAX_URL_LEN} bytes"),
            );
            None
        } else {
            match reqwest::Url::parse(&self.url) {
                Ok(u) if policy.deny_private_networks && literal_ip(&u).is_some_and(|ip| !is_public(ip)) => {
                    errors.push(format!("{pointer}/url"), refused_address(literal_ip(&u)));
                    None
                }
                Ok(u) if !policy.loading && (!u.username().is_empty() || u.password().is_some()) => {
                    errors.push(
                        format!("{pointer}/url"),
                        "credentials in a URL would be shown to every reader of the job; send them \
                         in an Authorization header (secret, never shown back) instead",
                    );
                    None
                }
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
                Ok(_) => {
                    errors.push(
                        format!("{pointer}/url"),
                        "must be an http or https URL with a host",
                    );
                    None
                }
                Err(e) => {
                    errors.push(format!("{pointer}/url"), format!("not a URL: {e}"));
                    None
                }
            }
        };
        let mut headers = HeaderMap::new();
        if self.headers.len() > MAX_HEADERS {
            errors.push(
                format!("{pointer}/headers"),
                format!("more than {MAX_HEADERS} headers"),
            );
        }
        for (name, value) in &self.headers {
            let at = format!("{pointer}/headers/{}", escape_pointer(name));
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                errors.push(at, "not a valid header name");
                continue;
            };
            if header.as_str().starts_with("x-cronguard-") {
                errors.push(at, "X-Cronguard-* headers are set by the service");
                continue;
            }
            if let Some(why) = forbidden_header(name).filter(|_| !policy.loading) {
                errors.push(at, why);
                continue;
            }
            if let Err(e) = crate::secrets::references(value) {
                errors.push(at, e);
                continue;
            }
            match HeaderValue::from_str(value) {
                Ok(v) if value.len() <= MAX_ARG_LEN => {
                    headers.insert(header, v);
                }
                _ => errors.push(
                    at,
                    "header values must be visible ASCII without CR, LF or NUL, at most 8 KiB",
                ),
            }
        }
        let body = self.body.as_ref().map(|b| bytes::Bytes::from(b.clone()));
        if body.as_ref().is_some_and(|b| b.len() > MAX_BODY_BYTES) {
            errors.push(
                format!("{pointer}/body"),
                format!("larger than {MAX_BODY_BYTES} bytes"),
            );
        }
        let timeout = parse_timeout(
            self.timeout.as_deref(),
            DEFAULT_HTTP_TIMEOUT,
            pointer,
            &mut errors,
        );
        let success = StatusSet::parse(
            self.success_status.as_deref(),
            &format!("{pointer}/success_status"),
            &mut errors,
        );
        match url {
            Some(url) if errors.is_empty() => Ok(HttpAction {
                method,
                url,
                headers,
                body,
                timeout,
                success,
            }),
            _ => Err(errors),
        }
    }
}
