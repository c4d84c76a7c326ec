//! The OpenAPI 3.1 document, generated from the handlers' annotations.
//!
//! `openapi/cronguard.json` is this document, committed; a test regenerates
//! it and fails on any difference, so the published contract cannot drift
//! from the routes.

use std::sync::Arc;

use serde_json::{Value, json};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiContext, events, jobs, notifications, probes, run_output, runs, schedules};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cronguard",
        description = "A persistent, supervised job scheduler: jobs on cron, interval and once \
                       schedules, HTTP and command actions, run history, health and metrics. \
                       Errors are RFC 9457 problem+json documents.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    tags(
        (name = "jobs", description = "Job definitions and their lifecycle"),
        (name = "runs", description = "Run history and cancellation"),
        (name = "schedules", description = "Schedule previews"),
        (name = "events", description = "The live feed of job, run, orphan and backend-contact events (Server-Sent Events)"),
        (name = "notifications", description = "Failure, recovery and other notifications, and their delivery"),
        (name = "health", description = "Probes and metrics"),
    )
)]
struct ApiDoc;

/// Every documented route.
pub fn routes() -> OpenApiRouter<Arc<ApiContext>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::replace_job, jobs::delete_job))
        .routes(routes!(jobs::pause_job))
        .routes(routes!(jobs::resume_job))
        .routes(routes!(jobs::trigger_job))
        .routes(routes!(runs::list_job_runs))
        .routes(routes!(schedules::preview_job))
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(run_output::run_output))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(notifications::list_notifications))
        .routes(routes!(events::events))
        .routes(routes!(schedules::preview_schedule))
        .routes(routes!(probes::livez))
        .routes(routes!(probes::readyz))
        .routes(routes!(probes::metrics))
        .routes(routes!(probes::orphans))
        .routes(routes!(probes::status))
}

/// The document as pretty JSON, as committed in `openapi/cronguard.json`.
pub fn document() -> String {
    let mut text = serde_json::to_string_pretty(&spec()).unwrap_or_default();
    text.push('\n');
    text
}

/// The document: generated from the handlers, then completed with what
/// every operation shares (see `complete`).
pub fn spec() -> Value {
    let (_, spec) = routes().split_for_parts();
    let mut doc = serde_json::to_value(&spec).unwrap_or(Value::Null);
    complete(&mut doc);
    doc
}

/// Endpoints that never need a token.
const PUBLIC: &[&str] = &["/livez", "/readyz", "/metrics"];

/// Adds what the handler annotations would repeat on every operation:
///
/// - the `kind` tag on each variant struct of a tagged union: utoipa
///   describes `Cron(CronSpec)` as `allOf: [CronSpec, {kind}]`, and
///   `CronSpec` says `additionalProperties: false` (the server rejects
///   unknown fields), which would forbid `kind` itself;
/// - the bearer security scheme, required by every non-public operation;
/// - optional parameters typed without `null` (they are left out, or
///   strings);
/// - the problem responses every operation can give: 400 (query or path),
///   401 and 403 (non-public), 503 (timeout, shutdown), and for
///   operations with a body 413, 415 and 422;
/// - links from a created job to the operations on it, for clients and
///   stateful testing.
fn complete(doc: &mut Value) {
    crate::spec::close_tagged_unions(doc);
    doc["components"]["securitySchemes"] = json!({
        "bearer": {"type": "http", "scheme": "bearer", "description": "An API token (`--token`, `--tokens-file`); scopes read, write, admin."}
    });
    let problem = |description: &str| json!({"description": description, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (_, operation) in item.iter_mut() {
            let public = PUBLIC.contains(&path.as_str());
            // A parameter is absent or a string, never JSON `null`.
            let params = operation.get_mut("parameters").and_then(Value::as_array_mut);
            for param in params.into_iter().flatten() {
                let types = param.get_mut("schema").and_then(|s| s.get_mut("type"));
                if let Some(types) = types.and_then(Value::as_array_mut) {
                    types.retain(|t| t != "null");
                }
            }
            let has_body = operation.get("requestBody").is_some();
            let has_params = path.contains('{');
            if !public {
                operation["security"] = json!([{"bearer": []}]);
            }
            let responses = &mut operation["responses"];
            let mut add = |code: &str, description: &str| {
                if responses.get(code).is_none() {
                    responses[code] = problem(description);
                }
            };
            add("400", "Invalid query, path or body");
            if !public {
                add("401", "A valid bearer token is required");
                add("403", "The token's scope is too small");
            }
            if has_params {
                add("404", "Not found");
            }
            if has_body {
                add("413", "Body too large");
                add("415", "Not JSON");
                add("422", "Invalid fields");
            }
            add("503", "Timed out or shutting down");
        }
    }
    let created = &mut doc["paths"]["/v1/jobs"]["post"]["responses"]["201"];
    created["links"] = json!({
        "GetJob": {"operationId": "get_job", "parameters": {"job": "$response.body#/id"}},
        "ReplaceJob": {"operationId": "replace_job", "parameters": {"job": "$response.body#/id"}},
        "DeleteJob": {"operationId": "delete_job", "parameters": {"job": "$response.body#/id"}},
        "PauseJob": {"operationId": "pause_job", "parameters": {"job": "$response.body#/id"}},
        "ResumeJob": {"operationId": "resume_job", "parameters": {"job": "$response.body#/id"}},
        "TriggerJob": {"operationId": "trigger_job", "parameters": {"job": "$response.body#/id"}},
        "ListJobRuns": {"operationId": "list_job_runs", "parameters": {"job": "$response.body#/id"}},
        "PreviewJob": {"operationId": "preview_job", "parameters": {"job": "$response.body#/id"}}
    });
    let triggered = &mut doc["paths"]["/v1/jobs/{job}/trigger"]["post"]["responses"]["202"];
    triggered["links"] = json!({
        "GetRun": {"operationId": "get_run", "parameters": {"run": "$response.body#/id"}},
        "CancelRun": {"operationId": "cancel_run", "parameters": {"run": "$response.body#/id"}}
    });
}
