//! The control backend protocol: what cronguard sends and expects.
//!
//! Published as `openapi/backend.json` (the backend's side: the endpoints
//! cronguard calls), generated from these types so it cannot drift.
//!
//! - `GET {backend}/v1/jobs` → 200 [`DesiredJobs`] with an `ETag`;
//!   cronguard sends `If-None-Match` and takes 304 as "no change";
//! - `POST {backend}/v1/results` with a [`ResultBatch`] → any 2xx
//!   acknowledges the whole batch; 429/503 may carry `Retry-After`.
//!
//! Both carry `Authorization: Bearer <--backend-token>` and
//! `X-Cronguard-Incarnation`. Results are idempotent by `run_id`: a
//! backend must accept a result it has already seen (cronguard delivers at
//! least once; a backend that deduplicates by run id sees it once).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, ResponseBuilder,
};
use utoipa::{PartialSchema, ToSchema};

use crate::job::JobId;
use crate::run::{Attempt, Reason, Run, RunId, RunStatus, Trigger};
use crate::validation::FieldError;

/// `GET /v1/jobs`: the jobs the backend wants to exist.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DesiredJobs {
    /// Each one in the job schema of the public API (`JobSpec`), identified
    /// by its unique `name`. Items are validated one by one: an invalid
    /// item is rejected (and reported back) without affecting the others.
    #[schema(value_type = Vec<crate::job::JobSpec>)]
    pub jobs: Vec<Box<serde_json::value::RawValue>>,
}

/// `POST /v1/results`: finished runs and rejected job specs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResultBatch {
    /// The cronguard process sending it.
    #[schema(value_type = String, format = Uuid)]
    pub incarnation: String,
    /// Finished runs, oldest first (commit order).
    pub results: Vec<RunResult>,
    /// Job specs from the backend that cronguard could not apply: at most
    /// the first 100 of one job list, each with its reasons.
    pub rejections: Vec<Rejection>,
    /// One per job list whose set of rejected items changed: how many
    /// items it rejected in all, by reason (a list of any size is
    /// reported in a bounded size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejection_summaries: Vec<RejectionSummary>,
}

/// One finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunResult {
    /// Idempotency key.
    pub run_id: RunId,
    /// The job's id in cronguard.
    pub job_id: JobId,
    /// The job's name.
    pub job: String,
    /// Nominal fire instant.
    pub scheduled_at: DateTime<Utc>,
    /// For a row summarising missed fires: the last of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_until: Option<DateTime<Utc>>,
    /// Final status.
    pub status: RunStatus,
    /// Why the run exists.
    pub trigger: Trigger,
    /// Why it did not run or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Start of execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// Final status reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Attempts made.
    pub attempts: u32,
    /// Exit code of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Response status of an HTTP call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Standard output tail (or an HTTP response body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Standard error tail of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// Each attempt, for runs with retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempt_log: Vec<Attempt>,
}

impl RunResult {
    /// The result of a finished run.
    pub fn from_run(run: &Run) -> Self {
        Self {
            run_id: run.id,
            job_id: run.job_id,
            job: run.job_name.clone(),
            scheduled_at: run.scheduled_at,
            scheduled_until: run.scheduled_until,
            status: run.status,
            trigger: run.trigger,
            reason: run.reason,
            started_at: run.started_at,
            ended_at: run.ended_at,
            attempts: run.attempts,
            exit_code: run.exit_code,
            http_status: run.http_status,
            error: run.error.clone(),
            output: run.output.clone(),
            stderr: run.stderr.clone(),
            attempt_log: run.attempt_log.clone(),
        }
    }
}

/// A job spec from the backend that cronguard rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rejection {
    /// The job's name (or its position, `#3`, if it had no usable name).
    pub job: String,
    /// When it was rejected.
    pub rejected_at: DateTime<Utc>,
    /// Every reason, as in the public API's problem documents.
    pub errors: Vec<FieldError>,
}

/// The rejections of one job list, counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RejectionSummary {
    /// When the list was reconciled.
    pub rejected_at: DateTime<Utc>,
    /// Items rejected in all.
    pub total: u64,
    /// How many of them are reported one by one in `rejections`.
    pub detailed: u64,
    /// Items rejected, by the JSON pointer of their first error (at most
    /// 32 pointers; the rest count under `other`).
    pub by_reason: std::collections::BTreeMap<String, u64>,
}

/// `openapi/backend.json`: the protocol as pretty JSON, with the job
/// schema's tagged unions closed as in the public document.
pub fn backend_document() -> String {
    let mut doc = serde_json::to_value(document()).unwrap_or_default();
    crate::spec::close_tagged_unions(&mut doc);
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// The protocol as an OpenAPI document (the backend's side).
pub fn document() -> OpenApi {
    let json = |schema: Ref| ContentBuilder::new().schema(Some(schema)).build();
    let common = |op: OperationBuilder| {
        op.parameter(
            ParameterBuilder::new()
                .name("X-Cronguard-Incarnation")
                .parameter_in(ParameterIn::Header)
                .description(Some("The cronguard process calling"))
                .schema(Some(String::schema())),
        )
        .security(utoipa::openapi::security::SecurityRequirement::new::<
            _,
            [&str; 0],
            &str,
        >("bearer", []))
    };
    let pull = common(
        OperationBuilder::new()
            .operation_id(Some("desired_jobs"))
            .summary(Some("The jobs this cronguard should run"))
            .parameter(
                ParameterBuilder::new()
                    .name("If-None-Match")
                    .parameter_in(ParameterIn::Header)
                    .description(Some("The ETag of the last 200; answer 304 if nothing changed"))
                    .schema(Some(String::schema())),
            )
            .response(
                "200",
                ResponseBuilder::new()
                    .description("The desired jobs, with an `ETag` header")
                    .content("application/json", json(Ref::from_schema_name("DesiredJobs"))),
            )
            .response(
                "304",
                ResponseBuilder::new().description("Unchanged since If-None-Match"),
            ),
    );
    let push = common(
        OperationBuilder::new()
            .operation_id(Some("upload_results"))
            .summary(Some("Finished runs and rejected jobs; idempotent by run_id"))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", json(Ref::from_schema_name("ResultBatch")))
                    .required(Some(utoipa::openapi::Required::True))
                    .build(),
            ))
            .response(
                "200",
                ResponseBuilder::new().description("The whole batch is acknowledged (any 2xx)"),
            )
            .response(
                "429",
                ResponseBuilder::new().description("Too many requests; `Retry-After` (seconds) is honoured"),
            )
            .response(
                "503",
                ResponseBuilder::new().description("Unavailable; `Retry-After` (seconds) is honoured"),
            ),
    );
    let mut schemas = Vec::new();
    <DesiredJobs as ToSchema>::schemas(&mut schemas);
    <ResultBatch as ToSchema>::schemas(&mut schemas);
    let mut components = utoipa::openapi::ComponentsBuilder::new()
        .schema("DesiredJobs", DesiredJobs::schema())
        .schema("ResultBatch", ResultBatch::schema())
        .security_scheme(
            "bearer",
            utoipa::openapi::security::SecurityScheme::Http(utoipa::openapi::security::Http::new(
                utoipa::openapi::security::HttpAuthScheme::Bearer,
            )),
        );
    for (name, schema) in schemas {
        components = components.schema(name, schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("cronguard control backend")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The endpoints a control backend implements for cronguard: cronguard pulls the \
                     desired jobs and pushes every finished run. See docs/backend.md.",
                ))
                .build(),
        )
        .paths(
            PathsBuilder::new()
                .path(
                    "/v1/jobs",
                    PathItemBuilder::new()
                        .operation(HttpMethod::Get, pull.build())
                        .build(),
                )
                .path(
                    "/v1/results",
                    PathItemBuilder::new()
                        .operation(HttpMethod::Post, push.build())
                        .build(),
                ),
        )
        .components(Some(components.build()))
        .build()
}
