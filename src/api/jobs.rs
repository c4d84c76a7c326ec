//! `/v1/jobs`: create, read, list, replace, delete, pause, resume, trigger.

use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::{Principal, Scope};
use super::error::{ApiError, Problem};
use super::extract::{JsonBody, MaybeJson, Params, PathParam};
pub use super::job_view::{JobPage, JobView};
use super::job_view::{health_filter, job_response, list};
use super::redaction::{check_reference_scope, unredact};
use super::{ApiContext, PageParams};
use crate::action::ActionSpec;
use crate::job::{Job, JobDefinition, JobId, JobSpec, Source, check_note};
use crate::run::Run;
use crate::standing::JobHealth;
use crate::store::{JobFilter, JobKey, NewJob, Replacement};
use crate::validation::{FieldError, FieldErrors};

/// Body of `pause`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Why; shown on the job until it is resumed.
    #[serde(default)]
    pub note: Option<String>,
}

/// Command actions run programs on the host: creating or changing one
/// needs the `admin` scope, whatever the route's own scope.
fn check_action_scope(principal: &Principal, spec: &JobSpec) -> Result<(), ApiError> {
    if matches!(spec.action, ActionSpec::Command(_)) && principal.scope < Scope::Admin {
        return Err(ApiError::Forbidden {
            needed: Scope::Admin,
            has: principal.scope,
        });
    }
    Ok(())
}

/// Top-level spec fields that differ (for the audit log).
fn changed_fields(old: &JobSpec, new: &JobSpec) -> Vec<String> {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Validates a spec against the server's settings and the current time.
fn validate(ctx: &ApiContext, spec: JobSpec, schedule_changed: bool) -> Result<JobDefinition, ApiError> {
    let def = spec.validate(&ctx.actions)?;
    if schedule_changed && def.schedule.next_after(ctx.services.clock.now()).is_none() {
        return Err(FieldErrors::from(FieldError::new(
            "/schedule",
            "the schedule has no fire after now (`at` or `end` is in the past)",
        ))
        .into());
    }
    Ok(def)
}

/// Backend jobs are defined at the backend while one is configured: a
/// local edit would be overwritten (or resurrected) at the next pull.
fn owned_here(ctx: &ApiContext, job: &Job) -> Result<(), ApiError> {
    if job.source == Source::Backend && ctx.backend.is_some() {
        return Err(ApiError::OwnedByBackend(job.name().to_owned()));
    }
    Ok(())
}

pub(super) async fn find(ctx: &ApiContext, key: &str) -> Result<Job, ApiError> {
    ctx.services
        .store
        .jobs()
        .get(&JobKey::parse(key))
        .await?
        .ok_or(ApiError::NotFound("job"))
}

/// Create a job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSpec,
    responses(
        (status = 201, description = "Created", body = JobView,
            headers(("ETag" = String, description = "The job's version"), ("Location" = String, description = "The job's URL"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Name taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    JsonBody(spec): JsonBody<JobSpec>,
) -> Result<Response, ApiError> {
    check_action_scope(&principal, &spec)?;
    check_reference_scope(&principal, &spec, None)?;
    let paused = spec.paused.unwrap_or(false);
    let def = validate(&ctx, spec, true)?;
    if let Some(max) = ctx.max_jobs {
        let (active, paused) = ctx.services.store.jobs().count().await?;
        if active + paused >= max {
            return Err(ApiError::QuotaExceeded(format!(
                "this server holds at most {max} jobs (--max-jobs)"
            )));
        }
    }
    let job = ctx
        .services
        .store
        .jobs()
        .create(NewJob {
            id: JobId::new(),
            def,
            paused,
            source: Source::Api,
            now: ctx.services.clock.now(),
        })
        .await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.create", job = %job.id, name = %job.name(), "job created");
    job_response(&ctx, StatusCode::CREATED, &job).await
}

/// List jobs, filtered by labels, paused state, source and health.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(
        ("label" = Option<Vec<String>>, Query, pattern = r"^[A-Za-z0-9._/-]{1,63}=", description = "`key=value`; repeat to require several labels"),
        ("paused" = Option<bool>, Query, description = "Only paused (true) or active (false) jobs"),
        ("source" = Option<Source>, Query, description = "Only jobs from this source"),
        ("health" = Option<Vec<JobHealth>>, Query, style = Form, explode = false, description = "Only jobs in one of these health values, comma-separated (`failing,late`)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, format = Uuid, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_jobs(
    State(ctx): State<Arc<ApiContext>>,
    params: Params,
) -> Result<Json<JobPage>, ApiError> {
    params.only(&["label", "paused", "source", "health", "limit", "cursor"])?;
    let health = health_filter(&params)?;
    let mut labels = Vec::new();
    for label in params.all("label") {
        let Some((key, value)) = label.split_once('=').filter(|(k, _)| crate::job::label_key_ok(k)) else {
            return Err(ApiError::BadQuery {
                name: "label".into(),
                detail: "expected `key=value` with a key of 1 to 63 characters of [A-Za-z0-9._/-]".into(),
            });
        };
        labels.push((key.to_owned(), value.to_owned()));
    }
    if labels.len() > crate::job::MAX_LABELS {
        return Err(ApiError::BadQuery {
            name: "label".into(),
            detail: format!("at most {} label filters", crate::job::MAX_LABELS),
        });
    }
    let source = match params.one::<String>("source")? {
        None => None,
        Some(s) => Some(Source::parse(&s).ok_or_else(|| ApiError::BadQuery {
            name: "source".into(),
            detail: "`api` or `backend`".into(),
        })?),
    };
    let filter = JobFilter {
        labels,
        paused: params.one("paused")?,
        source,
    };
    let page = PageParams::<JobId>::parse(&params)?;
    list(&ctx, &filter, &health, page.cursor, page.limit)
        .await
        .map(Json)
}

/// Get a job by id or name.
#[utoipa::path(get, path = "/v1/jobs/{job}", tag = "jobs",
    params(("job" = String, Path, description = "Job id or name")),
    responses(
        (status = 200, description = "The job", body = JobView, headers(("ETag" = String, description = "The job's version"))),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_job(
    State(ctx): State<Arc<ApiContext>>,
    PathParam(key): PathParam,
) -> Result<Response, ApiError> {
    let job = find(&ctx, &key).await?;
    job_response(&ctx, StatusCode::OK, &job).await
}

/// Reads `If-Match` as a job version.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || ApiError::BadHeader {
        name: "If-Match",
        detail: "expected the job's ETag, such as \"3\"".into(),
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    if text == "*" {
        return Ok(None);
    }
    let text = text.strip_prefix("W/").unwrap_or(text);
    let text = text.trim_matches('"');
    text.parse().map(Some).map_err(|_| bad())
}

/// Replace a job's definition (keeps its id and run history).
#[utoipa::path(put, path = "/v1/jobs/{job}", tag = "jobs", request_body = JobSpec,
    params(
        ("job" = String, Path, description = "Job id or name"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"?[0-9]{1,18}"?)$"#, description = "The `ETag` last read; 412 if the job changed since"),
    ),
    responses(
        (status = 200, description = "Replaced", body = JobView, headers(("ETag" = String, description = "The job's new version"))),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Name taken, or the job is owned by the control backend", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "Version mismatch", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn replace_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(key): PathParam,
    headers: HeaderMap,
    JsonBody(mut spec): JsonBody<JobSpec>,
) -> Result<Response, ApiError> {
    let expected_version = if_match(&headers)?;
    let current = find(&ctx, &key).await?;
    owned_here(&ctx, &current)?;
    check_action_scope(&principal, &spec)?;
    check_action_scope(&principal, &current.def.spec)?;
    check_reference_scope(&principal, &spec, Some(&current.def.spec))?;
    unredact(&mut spec, &current.def.spec)?;
    let changed = changed_fields(&current.def.spec, &spec);
    let paused = spec.paused;
    let schedule_changed = spec.schedule != current.def.spec.schedule;
    let def = validate(&ctx, spec, schedule_changed)?;
    let job = ctx
        .services
        .store
        .jobs()
        .replace(Replacement {
            id: current.id,
            expected_version,
            def,
            paused,
            now: ctx.services.clock.now(),
        })
        .await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.replace", job = %job.id, name = %job.name(), version = job.version, changed = ?changed, "job replaced");
    job_response(&ctx, StatusCode::OK, &job).await
}

/// Delete a job and its run history; its live runs are cancelled.
#[utoipa::path(delete, path = "/v1/jobs/{job}", tag = "jobs",
    params(("job" = String, Path, description = "Job id or name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is owned by the control backend", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(key): PathParam,
) -> Result<StatusCode, ApiError> {
    let job = find(&ctx, &key).await?;
    owned_here(&ctx, &job)?;
    ctx.services
        .store
        .jobs()
        .delete(job.id, ctx.services.clock.now())
        .await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.delete", job = %job.id, name = %job.name(), "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a job: no scheduled fires until it is resumed.
#[utoipa::path(post, path = "/v1/jobs/{job}/pause", tag = "jobs", request_body(content = Option<PauseRequest>, description = "Optional note"),
    params(("job" = String, Path, description = "Job id or name")),
    responses(
        (status = 200, description = "Paused", body = JobView),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid note", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(key): PathParam,
    MaybeJson(body): MaybeJson<PauseRequest>,
) -> Result<Response, ApiError> {
    let note = body.and_then(|b| b.note);
    if let Some(note) = &note {
        check_note(note)?;
    }
    let job = find(&ctx, &key).await?;
    let job = ctx
        .services
        .store
        .jobs()
        .set_paused(job.id, true, note, ctx.services.clock.now())
        .await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.pause", job = %job.id, name = %job.name(), note = job.pause_note.as_deref(), "job paused");
    job_response(&ctx, StatusCode::OK, &job).await
}

/// Resume a job: it fires again from now on (fires due while paused are
/// not replayed).
#[utoipa::path(post, path = "/v1/jobs/{job}/resume", tag = "jobs",
    params(("job" = String, Path, description = "Job id or name")),
    responses(
        (status = 200, description = "Resumed", body = JobView),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(key): PathParam,
) -> Result<Response, ApiError> {
    let job = find(&ctx, &key).await?;
    let job = ctx
        .services
        .store
        .jobs()
        .set_paused(job.id, false, None, ctx.services.clock.now())
        .await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.resume", job = %job.id, name = %job.name(), "job resumed");
    job_response(&ctx, StatusCode::OK, &job).await
}

/// Run a job now. The overlap policy applies unless `force=true`: the run
/// may be `running`, `queued` or `skipped`. Works on paused jobs too.
#[utoipa::path(post, path = "/v1/jobs/{job}/trigger", tag = "jobs",
    params(
        ("job" = String, Path, description = "Job id or name"),
        ("force" = Option<bool>, Query, description = "Start even if the overlap policy would skip or queue it"),
    ),
    responses(
        (status = 202, description = "The run as recorded", body = Run),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Shutting down", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn trigger_job(
    State(ctx): State<Arc<ApiContext>>,
    Extension(principal): Extension<Principal>,
    PathParam(key): PathParam,
    params: Params,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    params.only(&["force"])?;
    let force = params.one::<bool>("force")?.unwrap_or(false);
    let job = find(&ctx, &key).await?;
    let run = ctx.supervisor.trigger(Arc::new(job), force).await?;
    tracing::info!(target: "audit", principal = %principal.name, action = "job.trigger", job = %run.job_id, run = %run.id, status = %run.status, force, "job triggered");
    Ok((StatusCode::ACCEPTED, Json(run)))
}
