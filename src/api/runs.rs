//! `/v1/runs` and `/v1/jobs/{job}/runs`: history and cancellation.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Principal;
use super::error::{ApiError, Problem};
use super::extract::{Params, PathParam};
use super::jobs::find;
use super::{ApiContext, PageParams};
use crate::job::JobId;
use crate::run::{Outcome, Reason, Run, RunId, RunStatus};
use crate::store::Conflict;
use crate::store::{RunFilter, StoreError};

/// A page of runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunPage {
    /// Runs, newest first.
    pub items: Vec<Run>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn statuses(params: &Params) -> Result<Vec<RunStatus>, ApiError> {
    let mut out = Vec::new();
    for value in params.all("status") {
        for item in value.split(',') {
            if item.is_empty() {
                return Err(ApiError::BadQuery {
                    name: "status".into(),
                    detail: "an empty status; expected e.g. `failed` or `failed,timed_out`".into(),
                });
            }
            out.push(item.parse().map_err(|detail| ApiError::BadQuery {
                name: "status".into(),
                detail,
            })?);
        }
    }
    Ok(out)
}

async fn page(ctx: &ApiContext, filter: RunFilter, params: &Params) -> Result<Json<RunPage>, ApiError> {
    let page = PageParams::<RunId>::parse(params)?;
    let found = ctx
        .services
        .store
        .runs()
        .list(&filter, page.cursor, page.limit)
        .await?;
    Ok(Json(RunPage {
        items: found.items,
        next_cursor: found.next,
    }))
}

/// List runs of every job, newest first.
#[utoipa::path(get, path = "/v1/runs", tag = "runs",
    params(
        ("status" = Option<Vec<RunStatus>>, Query, description = "Only these statuses (comma-separated or repeated)"),
        ("job" = Option<String>, Query, format = Uuid, description = "Only this job (id)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, format = Uuid, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of runs", body = RunPage),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_runs(
    State(ctx): State<Arc<ApiContext>>,
    params: Params,
) -> Result<Json<RunPage>, ApiError> {
    params.only(&["status", "job", "limit", "cursor"])?;
    let filter = RunFilter {
        job: params.one::<JobId>("job")?,
        statuses: statuses(&params)?,
    };
    page(&ctx, filter, &params).await
}

/// List one job's runs, newest first.
#[utoipa::path(get, path = "/v1/jobs/{job}/runs", tag = "runs",
    params(
        ("job" = String, Path, description = "Job id or name"),
        ("status" = Option<Vec<RunStatus>>, Query, description = "Only these statuses (comma-separated or repeated)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, format = Uuid, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of runs", body = RunPage),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_job_runs(
    State(ctx): State<Arc<ApiContext>>,
    PathParam(key): PathParam,
    params: Params,
) -> Result<Json<RunPage>, ApiError> {
    params.only(&["status", "limit", "cursor"])?;
    let job = find(&ctx, &key).await?;
    let filter = RunFilter {
        job: Some(job.id),
        statuses: statuses(&params)?,
    };
    page(&ctx, filter, &params).await
}

pub(super) fn run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse().map_err(|_| ApiError::NotFound("run"))
}

/// Get one run.
#[utoipa::path(get, path = "/v1/runs/{run}", tag = "runs",
    params(("run" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = Run),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_run(
    State(ctx): State<Arc<ApiContext>>,
    PathParam(id): PathParam,
) -> Result<Json<Run>, ApiError> {
    let id = run_id(&id)?;
    let run = find_run(&ctx, id).await?;
    Ok(Json(run))
}

/// Cancel a running or queued run. A command run's process group gets
/// SIGTERM, then SIGKILL after the job's kill grace. A run recorded as live
/// that no task of this service owns (stale) is marked cancelled at once.
#[utoipa::path(post, path = "/v1/runs/{run}/cancel", tag = "runs",
    params(("run" = String, Path, description = "Run id")),
    responses(
        (status = 202, description = "Cancellation requested; the run as now recorded", body = Run),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run already ended", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_run(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(id): PathParam,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    let id = run_id(&id)?;
    let run = find_run(&ctx, id).await?;
    if run.status.is_final() {
        return Err(ApiError::RunAlreadyFinal);
    }
    if !ctx.supervisor.cancel(id).await {
        let outcome = Outcome::cancelled(Reason::Requested, "cancelled by request; no live task owned it");
        match ctx
            .services
            .store
            .runs()
            .finish(id, outcome, ctx.services.clock.now())
            .await
        {
            Ok(()) | Err(StoreError::Conflict(Conflict::AlreadyFinal)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(target: "audit", principal = %principal.name, action = "run.cancel", run = %id, job = %run.job_id, "run cancellation requested");
    let run = ctx
        .services
        .store
        .runs()
        .get(id)
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}

/// The run `id`, or 404.
pub(super) async fn find_run(ctx: &ApiContext, id: RunId) -> Result<Run, ApiError> {
    ctx.services
        .store
        .runs()
        .get(id)
        .await?
        .ok_or(ApiError::NotFound("run"))
}
