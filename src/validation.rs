//! Field-level validation errors shared by every domain parser.
//!
//! Parsers collect every problem they find instead of stopping at the first,
//! so a client fixes its request in one round trip. Each error names the
//! offending field as a JSON pointer into the request body (RFC 6901).

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::error::Category;
use utoipa::ToSchema;

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON pointer to the field, e.g. `/schedule/expr`.
    pub pointer: String,
    /// Why the value was rejected.
    pub detail: String,
}

impl FieldError {
    /// An error at `pointer`.
    pub fn new(pointer: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pointer, self.detail)
    }
}

/// Every invalid field of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl FieldErrors {
    /// Records one more problem.
    pub fn push(&mut self, pointer: impl Into<String>, detail: impl Into<String>) {
        self.0.push(FieldError::new(pointer, detail));
    }

    /// Keeps the value of `result`, or records its errors and returns `None`.
    pub fn take<T>(&mut self, result: Result<T, FieldErrors>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.extend(e.0);
                None
            }
        }
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, FieldErrors> {
        if self.0.is_empty() { Ok(value()) } else { Err(self) }
    }

    /// Whether no problem was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<FieldError> for FieldErrors {
    fn from(e: FieldError) -> Self {
        Self(vec![e])
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// Parses a human duration such as `30s`, `1m 30s` or `250ms`, bounded.
///
/// Durations on the wire are strings so that units are explicit; a bare
/// number would leave a reader guessing between seconds and milliseconds.
pub fn parse_duration(
    pointer: &str,
    text: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, FieldError> {
    let parsed = humantime::parse_duration(text.trim()).map_err(|e| {
        FieldError::new(
            pointer,
            format!("`{text}` is not a duration like `30s`, `5m` or `250ms`: {e}"),
        )
    })?;
    if parsed < min {
        return Err(FieldError::new(
            pointer,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    if parsed > max {
        return Err(FieldError::new(
            pointer,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(parsed)
}

/// Why a JSON document did not decode into the expected type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON at all (syntax, truncation).
    Malformed(String),
    /// JSON, but a field has the wrong type, is unknown or is missing.
    Invalid(FieldErrors),
}

/// Decodes `bytes` strictly as `T`; a data error names its field with a
/// JSON pointer (shared by the API's request bodies and the control
/// backend's job list, so both report the same problems the same way).
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let pointer = pointer(e.path());
        let inner = e.into_inner();
        match inner.classify() {
            Category::Data => {
                let message = inner.to_string();
                let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
                // The path stops at the parent for missing fields, and for
                // any error inside an internally tagged enum (`schedule`,
                // `action`); the message names the field.
                let pointer = match field_in(&message) {
                    Some(field) if !pointer.ends_with(&format!("/{field}")) => format!("{pointer}/{field}"),
                    _ => pointer,
                };
                DecodeError::Invalid(FieldErrors::from(FieldError::new(pointer, message)))
            }
            Category::Syntax | Category::Eof | Category::Io => DecodeError::Malformed(inner.to_string()),
        }
    })?;
    de.end().map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(value)
}

/// The field an "unknown field" or "missing field" message names.
fn field_in(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    let name = rest.split('`').next()?;
    Some(escape_pointer(name))
}

fn pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                out.push('/');
                out.push_str(&index.to_string());
            }
            Segment::Map { key } => {
                out.push('/');
                out.push_str(&escape_pointer(key));
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// Escapes a map key for use in a JSON pointer (RFC 6901).
pub fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bounds() {
        let max = Duration::from_secs(3600);
        assert_eq!(
            parse_duration("/x", "1m 30s", Duration::ZERO, max).unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_duration("/x", "250ms", Duration::ZERO, max).unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["-5s", "5", "", "abc", "2h"] {
            let e = parse_duration("/x", bad, Duration::ZERO, max).unwrap_err();
            assert_eq!(e.pointer, "/x", "{bad}");
        }
        assert!(parse_duration("/x", "0s", Duration::from_millis(1), max).is_err());
    }
}
