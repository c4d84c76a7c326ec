//! The HTTP edge's one error type, rendered as RFC 9457 problem+json.
//!
//! Handlers return [`ApiError`]; module errors (`StoreError`,
//! `FieldErrors`, ...) convert into it here and nowhere else. Each variant
//! has a stable `type` URI, documented in `docs/errors.md`. Internal errors
//! are logged with their detail and answered without it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::Conflict;
use crate::store::{StorageFault, StoreError};
use crate::supervisor::TriggerError;
use crate::validation::{FieldError, FieldErrors};

/// Media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Stable URI naming the kind of problem (see `docs/errors.md`).
    #[serde(rename = "type")]
    #[schema(example = "urn:cronguard:problem:validation")]
    pub kind: &'static str,
    /// Short summary of the kind.
    pub title: &'static str,
    /// HTTP status.
    pub status: u16,
    /// What happened in this case.
    pub detail: String,
    /// Every offending field, for validation problems.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Every error an API call can end with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Fields that failed validation (422).
    #[error("invalid fields: {0}")]
    Validation(FieldErrors),
    /// The body is not JSON at all (400).
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A query parameter is unknown or invalid (400).
    #[error("invalid query parameter `{name}`: {detail}")]
    BadQuery {
        /// The parameter.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A path parameter does not decode (400).
    #[error("invalid path: {0}")]
    BadPath(String),
    /// A header is invalid (400).
    #[error("invalid header `{name}`: {detail}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The body is not `application/json` (415).
    #[error("expected a JSON body")]
    UnsupportedMediaType,
    /// The body exceeds the limit (413).
    #[error("the body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No or an unknown bearer token (401).
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The token's scope is too small (403).
    #[error("this needs the `{needed}` scope; the token has `{has}`")]
    Forbidden {
        /// The scope needed.
        needed: super::scope::Scope,
        /// The token's scope.
        has: super::scope::Scope,
    },
    /// A quota would be exceeded (422).
    #[error("{0}")]
    QuotaExceeded(String),
    /// The request took longer than the request timeout (503).
    #[error("the request took longer than the request timeout")]
    Timeout,
    /// The client did not send its whole body in time (408).
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// No such resource (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The job name is taken (409).
    #[error("a job named `{0}` already exists")]
    NameTaken(String),
    /// `If-Match` did not match the job's version (412).
    #[error("the job's version is {current}; the request expected {expected}")]
    PreconditionFailed {
        /// What the client sent.
        expected: i64,
        /// What is stored.
        current: i64,
    },
    /// The route exists, the method does not (405).
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The run is already final (409).
    #[error("the run already ended")]
    RunAlreadyFinal,
    /// The job belongs to the control backend: change it there (409).
    #[error(
        "job `{0}` comes from the control backend; change or delete it there (pause, resume and trigger work here)"
    )]
    OwnedByBackend(String),
    /// The service is shutting down (503).
    #[error("the service is shutting down")]
    ShuttingDown,
    /// `GET /v1/events` has its most subscribers (503).
    #[error("{limit} clients are subscribed to events already (--events-max-subscribers); retry later")]
    TooManySubscribers {
        /// The limit.
        limit: usize,
    },
    /// The database cannot be written now (503); nothing was written.
    #[error("the database cannot be written ({0}); nothing was written, retry later")]
    StorageUnavailable(StorageFault),
    /// Anything else (500, detail only in the log).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// Status, stable problem type URI and title.
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "urn:cronguard:problem:validation",
                "Invalid request",
            ),
            Self::MalformedJson(_) => (
                StatusCode::BAD_REQUEST,
                "urn:cronguard:problem:malformed-json",
                "Malformed JSON",
            ),
            Self::BadQuery { .. } => (
                StatusCode::BAD_REQUEST,
                "urn:cronguard:problem:bad-query",
                "Invalid query parameter",
            ),
            Self::BadPath(_) => (
                StatusCode::BAD_REQUEST,
                "urn:cronguard:problem:bad-path",
                "Invalid path",
            ),
            Self::BadHeader { .. } => (
                StatusCode::BAD_REQUEST,
                "urn:cronguard:problem:bad-header",
                "Invalid header",
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "urn:cronguard:problem:unsupported-media-type",
                "Unsupported media type",
            ),
            Self::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "urn:cronguard:problem:payload-too-large",
                "Payload too large",
            ),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "urn:cronguard:problem:unauthorized",
                "Unauthorized",
            ),
            Self::Forbidden { .. } => (
                StatusCode::FORBIDDEN,
                "urn:cronguard:problem:forbidden",
                "Forbidden",
            ),
            Self::QuotaExceeded(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "urn:cronguard:problem:quota-exceeded",
                "Quota exceeded",
            ),
            Self::Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cronguard:problem:timeout",
                "Timeout",
            ),
            Self::BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "urn:cronguard:problem:body-timeout",
                "Request body timeout",
            ),
            Self::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "urn:cronguard:problem:not-found",
                "Not found",
            ),
            Self::NameTaken(_) => (
                StatusCode::CONFLICT,
                "urn:cronguard:problem:name-taken",
                "Name already taken",
            ),
            Self::PreconditionFailed { .. } => (
                StatusCode::PRECONDITION_FAILED,
                "urn:cronguard:problem:version-mismatch",
                "Version mismatch",
            ),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "urn:cronguard:problem:method-not-allowed",
                "Method not allowed",
            ),
            Self::RunAlreadyFinal => (
                StatusCode::CONFLICT,
                "urn:cronguard:problem:run-final",
                "Run already ended",
            ),
            Self::OwnedByBackend(_) => (
                StatusCode::CONFLICT,
                "urn:cronguard:problem:owned-by-backend",
                "Owned by the control backend",
            ),
            Self::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cronguard:problem:shutting-down",
                "Shutting down",
            ),
            Self::TooManySubscribers { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cronguard:problem:too-many-subscribers",
                "Too many subscribers",
            ),
            Self::StorageUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "urn:cronguard:problem:storage-unavailable",
                "Storage unavailable",
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "urn:cronguard:problem:internal",
                "Internal error",
            ),
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, kind, title) = self.parts();
        let errors = match self {
            Self::Validation(e) => e.0.clone(),
            Self::NameTaken(_) => vec![FieldError::new("/name", "already taken")],
            _ => Vec::new(),
        };
        let detail = match self {
            Self::Internal(_) => "the server failed; the error was logged".to_owned(),
            Self::Validation(e) if e.0.len() == 1 => e.0[0].to_string(),
            Self::Validation(e) => format!("{} invalid fields", e.0.len()),
            other => other.to_string(),
        };
        Problem {
            kind,
            title,
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let (status, _, _) = self.parts();
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        response
    }
}

impl From<FieldErrors> for ApiError {
    fn from(e: FieldErrors) -> Self {
        Self::Validation(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(Conflict::NotFound) => Self::NotFound("job"),
            StoreError::Conflict(Conflict::NameTaken(name)) => Self::NameTaken(name),
            StoreError::Conflict(Conflict::VersionMismatch { expected, current }) => {
                Self::PreconditionFailed { expected, current }
            }
            StoreError::Conflict(Conflict::AlreadyFinal) => Self::RunAlreadyFinal,
            StoreError::Closed | StoreError::Conflict(Conflict::Fenced) => Self::ShuttingDown,
            StoreError::Unavailable { fault, detail } => {
                tracing::warn!(fault = fault.as_str(), %detail, "a write was refused by the database");
                Self::StorageUnavailable(fault)
            }
            e @ StoreError::Database(_) if StorageFault::outage(&e).is_some() => {
                tracing::warn!(error = %e, "the database failed a request");
                Self::StorageUnavailable(StorageFault::outage(&e).unwrap_or(StorageFault::Other))
            }
            e @ (StoreError::Conflict(
                Conflict::DuplicateFire | Conflict::LimitReached | Conflict::Overlap,
            )
            | StoreError::Corrupt(_)
            | StoreError::Encode { .. }
            | StoreError::Schema { .. }
            | StoreError::Database(_)
            | StoreError::Start { .. }) => Self::Internal(e.to_string()),
        }
    }
}

impl From<TriggerError> for ApiError {
    fn from(e: TriggerError) -> Self {
        match e {
            TriggerError::ShuttingDown => Self::ShuttingDown,
            TriggerError::Store(e) => e.into(),
        }
    }
}
