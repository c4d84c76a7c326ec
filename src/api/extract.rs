//! Request extractors that fail with precise problems.
//!
//! [`JsonBody`] replaces axum's `Json`: it enforces the body limit with a
//! 413 problem, requires a JSON media type, and reports a decoding error
//! with the JSON pointer of the offending field (via `serde_path_to_error`).
//! [`Params`] parses query strings strictly: repeated keys are kept (label
//! filters) and unknown keys are rejected rather than silently ignored.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::validation::DecodeError;

/// The request body limit in force, set as a request extension by the router.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// How long a client has to send its whole body, set as a request
/// extension by the router (which enforces it on the body).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// A JSON request body, decoded strictly.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read(req, state).await?;
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        decode(&bytes).map(JsonBody)
    }
}

/// An optional JSON body: absent (empty) is `None`.
#[derive(Debug)]
pub struct MaybeJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for MaybeJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (is_json, bytes) = read(req, state).await?;
        // No body, or a JSON `null`, means "no options".
        if bytes.iter().all(u8::is_ascii_whitespace) || bytes.trim_ascii() == b"null" {
            return Ok(Self(None));
        }
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        decode(&bytes).map(|v| Self(Some(v)))
    }
}

/// Reads the body under the limit; says whether it is declared as JSON.
async fn read<S: Send + Sync>(req: Request, state: &S) -> Result<(bool, Bytes), ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
    let deadline = req.extensions().get::<BodyDeadline>().map(|d| d.0);
    let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
        while let Some(e) = source {
            if e.is::<tower_http::timeout::TimeoutError>() {
                return ApiError::BodyTimeout(deadline.unwrap_or_default());
            }
            source = e.source();
        }
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    })?;
    Ok((is_json, bytes))
}

/// Decodes `bytes` as `T`, mapping errors to problems with a pointer.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    crate::validation::decode_json(bytes).map_err(|e| match e {
        DecodeError::Malformed(text) => ApiError::MalformedJson(text),
        DecodeError::Invalid(errors) => ApiError::Validation(errors),
    })
}

/// A path parameter, decoded with a problem on failure (invalid
/// percent-encoding, invalid UTF-8) instead of axum's plain-text 400.
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // axum passes a `%` that starts no escape through as text, so
        // `/v1/jobs/%zz` would look up a job named `%zz`.
        if let Some(at) = bad_escape(parts.uri.path()) {
            return Err(ApiError::BadPath(format!(
                "invalid percent-encoding at byte {at} of the path: `%` must be followed by two hex digits"
            )));
        }
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| Self(p))
            .map_err(|e| ApiError::BadPath(e.body_text()))
    }
}

/// The offset of the first `%` in `path` that is not followed by two hex
/// digits.
fn bad_escape(path: &str) -> Option<usize> {
    let bytes = path.as_bytes();
    bytes.iter().enumerate().find_map(|(i, &b)| {
        let valid = bytes
            .get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
        (b == b'%' && !valid).then_some(i)
    })
}

/// A strictly parsed query string.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        Ok(Self(
            url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl Params {
    /// Fails on any parameter not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(ApiError::BadQuery {
                name: k.clone(),
                detail: format!("unknown parameter; this endpoint accepts: {}", allowed.join(", ")),
            }),
            None => Ok(()),
        }
    }

    /// Every value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The single value of `name`, parsed; repeated values are an error.
    pub fn one<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        let mut values = self.all(name);
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(ApiError::BadQuery {
                name: name.to_owned(),
                detail: "given more than once".to_owned(),
            });
        }
        first.parse().map(Some).map_err(|e: T::Err| ApiError::BadQuery {
            name: name.to_owned(),
            detail: format!("`{first}`: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobSpec;

    fn problem(body: &str) -> (u16, Vec<String>) {
        let e = decode::<JobSpec>(body.as_bytes()).unwrap_err();
        let p = e.problem();
        (p.status, p.errors.into_iter().map(|e| e.pointer).collect())
    }

    #[test]
    fn decoding_errors_point_at_the_field() {
        assert_eq!(problem("{").0, 400);
        assert_eq!(problem("{\"name\" \"a\"}").0, 400);
        assert_eq!(problem("{\"name\": \"a").0, 400);
        // A typed decoder stops at the first wrong type, before any depth.
        assert_eq!(problem("[1,2").0, 422);
        let nested = format!("{{\"labels\": {}", "{\"a\":".repeat(10_000));
        assert!((400..500).contains(&problem(&nested).0));
        let (status, pointers) = problem(r#"{"name":"a","extra":1}"#);
        assert_eq!((status, pointers), (422, vec!["/extra".to_owned()]));
        let (status, pointers) = problem(r#"{"name":5}"#);
        assert_eq!((status, pointers), (422, vec!["/name".to_owned()]));
        let (status, pointers) = problem(
            r#"{"name":"a","schedule":{"kind":"once","at":"2030-01-01T00:00:00Z"},"action":{"kind":"http","url":"http://h/"},"policy":{"max_concurrency":1e30}}"#,
        );
        assert_eq!(
            (status, pointers),
            (422, vec!["/policy/max_concurrency".to_owned()])
        );
        let (status, pointers) = problem(r#"{"name":"a","action":{"kind":"http","url":"http://h/"}}"#);
        assert_eq!((status, pointers), (422, vec!["/schedule".to_owned()]));
    }
}

/// Fuzzing job decoding and validation with arbitrary bytes and with
/// arbitrary JSON documents: every outcome is a value or a problem with a
/// 4xx status, never a panic.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::decode;
    use crate::action::ActionPolicy;
    use crate::job::JobSpec;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::String),
            prop::sample::select(vec![
                "cron",
                "interval",
                "once",
                "http",
                "command",
                "* * * * *",
                "1s",
                "-1s",
                "2030-01-01T00:00:00Z",
                "http://h/"
            ])
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "name",
                        "kind",
                        "expr",
                        "every",
                        "at",
                        "url",
                        "schedule",
                        "action",
                        "policy",
                        "labels",
                        "timezone",
                        "headers",
                        "program",
                        "args",
                        "retry",
                        "max_attempts",
                        "x"
                    ]),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Err(e) = decode::<JobSpec>(&bytes) {
                prop_assert!((400..500).contains(&e.problem().status));
            }
        }

        #[test]
        fn arbitrary_documents_never_panic(doc in json()) {
            let bytes = serde_json::to_vec(&doc).unwrap_or_default();
            match decode::<JobSpec>(&bytes) {
                Ok(spec) => {
                    let policy = ActionPolicy { commands_enabled: true, ..ActionPolicy::default() };
                    let _ = spec.validate(&policy);
                }
                Err(e) => prop_assert!((400..500).contains(&e.problem().status)),
            }
        }
    }
}
