//! Schedule previews: upcoming fires of a job or of an unsaved schedule.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiContext;
use super::error::{ApiError, Problem};
use super::extract::{JsonBody, Params, PathParam};
use super::jobs::find;
use crate::schedule::{Schedule, ScheduleSpec};
use crate::validation::{FieldError, FieldErrors};

/// Most fires one preview returns.
pub const MAX_PREVIEW: u32 = 1000;
/// Fires a preview returns by default.
pub const DEFAULT_PREVIEW: u32 = 10;

/// Upcoming fires.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Preview {
    /// The zone local times are shown in.
    pub timezone: String,
    /// Nominal fire instants, in order (jitter not applied).
    pub fires: Vec<PreviewFire>,
}

/// One upcoming fire.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PreviewFire {
    /// The instant, UTC.
    pub at: DateTime<Utc>,
    /// The same instant in the schedule's zone, with its offset.
    pub local: String,
}

/// Body of a schedule preview.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The schedule to evaluate (not stored).
    pub schedule: ScheduleSpec,
    /// How many fires, 1 to 1000 (default 10).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub count: Option<u32>,
    /// List fires strictly after this instant (default now).
    #[serde(default)]
    pub after: Option<DateTime<Utc>>,
}

fn preview(schedule: &Schedule, after: DateTime<Utc>, count: u32) -> Preview {
    let tz = schedule.timezone();
    Preview {
        timezone: tz.name().to_owned(),
        fires: schedule
            .upcoming(after, count as usize)
            .into_iter()
            .map(|at| PreviewFire {
                at,
                local: at.with_timezone(&tz).to_rfc3339(),
            })
            .collect(),
    }
}

fn check_count(count: Option<u32>, pointer: &str) -> Result<u32, FieldError> {
    let count = count.unwrap_or(DEFAULT_PREVIEW);
    if (1..=MAX_PREVIEW).contains(&count) {
        Ok(count)
    } else {
        Err(FieldError::new(
            pointer,
            format!("must be between 1 and {MAX_PREVIEW}"),
        ))
    }
}

/// Preview an unsaved schedule (validation without side effects).
#[utoipa::path(post, path = "/v1/schedules/preview", tag = "schedules", request_body = PreviewRequest,
    responses(
        (status = 200, description = "Upcoming fires", body = Preview),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid schedule", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn preview_schedule(
    State(ctx): State<Arc<ApiContext>>,
    JsonBody(request): JsonBody<PreviewRequest>,
) -> Result<Json<Preview>, ApiError> {
    let mut errors = FieldErrors::default();
    let schedule = errors.take(Schedule::parse(&request.schedule, "/schedule"));
    let count = check_count(request.count, "/count")
        .map_err(|e| errors.0.push(e))
        .ok();
    match (schedule, count) {
        (Some(schedule), Some(count)) => Ok(Json(preview(
            &schedule,
            request.after.unwrap_or_else(|| ctx.services.clock.now()),
            count,
        ))),
        _ => Err(errors.into()),
    }
}

/// Preview a job's upcoming fires (from its schedule cursor or `after`).
#[utoipa::path(get, path = "/v1/jobs/{job}/preview", tag = "schedules",
    params(
        ("job" = String, Path, description = "Job id or name"),
        ("count" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "How many fires, 1 to 1000 (default 10)"),
        ("after" = Option<DateTime<Utc>>, Query, description = "Fires strictly after this instant (default: the next fire's search point)"),
    ),
    responses(
        (status = 200, description = "Upcoming fires", body = Preview),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn preview_job(
    State(ctx): State<Arc<ApiContext>>,
    PathParam(key): PathParam,
    params: Params,
) -> Result<Json<Preview>, ApiError> {
    params.only(&["count", "after"])?;
    let count = check_count(params.one("count")?, "count").map_err(|e| ApiError::BadQuery {
        name: "count".into(),
        detail: e.detail,
    })?;
    let after = params.one::<DateTime<Utc>>("after")?;
    let job = find(&ctx, &key).await?;
    // By default the preview starts where the engine searches for the next
    // fire, so its first entry is the job's `next_fire_at`; a paused job
    // would restart from now.
    let after = after.unwrap_or_else(|| {
        if job.paused {
            ctx.services.clock.now()
        } else {
            job.cursor_at
        }
    });
    Ok(Json(preview(&job.def.schedule, after, count)))
}
