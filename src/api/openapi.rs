//! The OpenAPI 3.1 document, generated from the handlers' annotations.
//!
//! `openapi/cronguard.json` is this document, committed; a test regenerates
//! it and fails on any difference, so the published contract cannot drift
//! from the routes.

use std::sync::Arc;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiContext, jobs, probes, runs, schedules};

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
        .routes(routes!(runs::cancel_run))
        .routes(routes!(schedules::preview_schedule))
        .routes(routes!(probes::livez))
        .routes(routes!(probes::readyz))
        .routes(routes!(probes::metrics))
        .routes(routes!(probes::orphans))
        .routes(routes!(probes::status))
}

/// The document as pretty JSON, as committed in `openapi/cronguard.json`.
pub fn document() -> String {
    let (_, spec) = routes().split_for_parts();
    let mut text = spec.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}
