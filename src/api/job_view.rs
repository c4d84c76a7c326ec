//! A job as the API shows it: the definition (secrets redacted) with its
//! standing and health; pages of them, filtered on health; counts by
//! health.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiContext;
use super::error::ApiError;
use super::extract::Params;
use super::redaction::redact;
use crate::job::{Job, JobId, JobSpec, Source};
use crate::standing::{JobHealth, LastRun, Standing};
use crate::store::JobFilter;

/// A job as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Identity (UUID v7).
    pub id: JobId,
    /// Unique name (also in `spec`).
    pub name: String,
    /// Bumped on every change; sent as the `ETag`, expected in `If-Match`.
    pub version: i64,
    /// Who owns the definition.
    pub source: Source,
    /// Whether fires are suspended.
    pub paused: bool,
    /// Why it was paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_note: Option<String>,
    /// The next scheduled fire (absent when paused or finished).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The definition; `PUT` accepts it back unchanged.
    pub spec: JobSpec,
    /// The job at a glance (`docs/observability.md`, "Job health"): the first
    /// of `paused`, `late`, `failing`, `finished`, `pending`, `ok` that
    /// applies.
    pub health: JobHealth,
    /// The last run that ended (absent before the first).
    pub last_run: Option<LastRun>,
    /// When a run last succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// When a run last failed or timed out.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// Runs that failed or timed out since the last success.
    pub consecutive_failures: u32,
}

impl JobView {
    pub(super) fn new(job: &Job, standing: Standing, now: DateTime<Utc>) -> Self {
        let health = standing.health(job, now);
        let mut spec = job.def.spec.clone();
        spec.paused = Some(job.paused);
        redact(&mut spec);
        Self {
            id: job.id,
            name: job.name().to_owned(),
            version: job.version,
            source: job.source,
            paused: job.paused,
            pause_note: job.pause_note.clone(),
            next_fire_at: job.next_fire(),
            created_at: job.created_at,
            updated_at: job.updated_at,
            spec,
            health,
            last_run: standing.last_run,
            last_success_at: standing.last_success_at,
            last_failure_at: standing.last_failure_at,
            consecutive_failures: standing.consecutive_failures,
        }
    }
}

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobPage {
    /// Jobs in creation order.
    pub items: Vec<JobView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The views of `jobs`, with their standing as stored now.
pub(super) async fn views(ctx: &ApiContext, jobs: &[Job]) -> Result<Vec<JobView>, ApiError> {
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let mut standings = ctx.services.store.jobs().standings(&ids).await?;
    let now = ctx.services.clock.now();
    Ok(jobs
        .iter()
        .map(|job| JobView::new(job, standings.remove(&job.id).unwrap_or_default(), now))
        .collect())
}

/// A job response with its `ETag`.
pub(super) async fn job_response(
    ctx: &ApiContext,
    status: StatusCode,
    job: &Job,
) -> Result<Response, ApiError> {
    let standing = ctx
        .services
        .store
        .jobs()
        .standings(&[job.id])
        .await?
        .remove(&job.id)
        .unwrap_or_default();
    let view = JobView::new(job, standing, ctx.services.clock.now());
    let mut response = (status, Json(view)).into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", job.version)) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    if status == StatusCode::CREATED
        && let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id))
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A page of jobs after `cursor`; with a health filter, the stored jobs are
/// read a chunk at a time (health is judged against "now", not stored)
/// until the page is full or the jobs run out.
pub(super) async fn list(
    ctx: &ApiContext,
    filter: &JobFilter,
    health: &[JobHealth],
    cursor: Option<JobId>,
    limit: u32,
) -> Result<JobPage, ApiError> {
    let jobs = ctx.services.store.jobs();
    if health.is_empty() {
        let found = jobs.list(filter, cursor, limit).await?;
        return Ok(JobPage {
            items: views(ctx, &found.items).await?,
            next_cursor: found.next,
        });
    }
    let limit = limit as usize;
    let mut items = Vec::with_capacity(limit + 1);
    let mut cursor = cursor;
    loop {
        let found = jobs.list(filter, cursor, HEALTH_SCAN_CHUNK).await?;
        cursor = found.items.last().map(|j| j.id);
        let mut matching = views(ctx, &found.items).await?;
        matching.retain(|v| health.contains(&v.health));
        items.extend(matching);
        if items.len() > limit || found.next.is_none() {
            break;
        }
    }
    let next_cursor = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map(|v| v.id.to_string())
    });
    Ok(JobPage {
        items,
        next_cursor: next_cursor.flatten(),
    })
}

/// Every job counted by health, judged from the light timings the engine
/// loads (not whole definitions) and every job's standing.
pub(super) async fn health_counts(ctx: &ApiContext) -> Result<HealthCounts, ApiError> {
    let jobs = ctx.services.store.jobs();
    let timings = jobs.timings().await?;
    let mut standings = jobs.all_standings().await?;
    let now = ctx.services.clock.now();
    let mut counts = HealthCounts::default();
    for timing in &timings {
        let standing = standings.remove(&timing.id).unwrap_or_default();
        counts.add(standing.health_of(timing, now));
    }
    Ok(counts)
}

/// Stored jobs read at once while filtering on health.
const HEALTH_SCAN_CHUNK: u32 = 500;

/// `health=failing,late` (repeatable); empty when absent, or given as an
/// empty list (`health=`: no filter).
pub(super) fn health_filter(params: &Params) -> Result<Vec<JobHealth>, ApiError> {
    let mut wanted = Vec::new();
    for list in params.all("health") {
        if list.is_empty() {
            continue;
        }
        for word in list.split(',') {
            let h = word.parse::<JobHealth>().map_err(|detail| ApiError::BadQuery {
                name: "health".into(),
                detail,
            })?;
            if !wanted.contains(&h) {
                wanted.push(h);
            }
        }
    }
    Ok(wanted)
}

/// Jobs by health value.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct HealthCounts {
    /// Its last run succeeded and its next fire is not overdue.
    pub ok: u64,
    /// Its last run failed or timed out.
    pub failing: u64,
    /// Its next fire is overdue (past jitter and misfire grace).
    pub late: u64,
    /// Paused.
    pub paused: u64,
    /// No run has ended yet.
    pub pending: u64,
    /// It will not fire again.
    pub finished: u64,
}

impl HealthCounts {
    /// Counts one job.
    pub fn add(&mut self, health: JobHealth) {
        let n = match health {
            JobHealth::Ok => &mut self.ok,
            JobHealth::Failing => &mut self.failing,
            JobHealth::Late => &mut self.late,
            JobHealth::Paused => &mut self.paused,
            JobHealth::Pending => &mut self.pending,
            JobHealth::Finished => &mut self.finished,
        };
        *n += 1;
    }
}
