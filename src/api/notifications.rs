//! `/v1/notifications`: what was told to whom, and what still waits.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::Params;
use super::{ApiContext, PageParams};
use crate::job::JobId;
use crate::notification::{Event, Format, Status, Target};
use crate::store::{Notice, NoticeFilter};

/// A notification: one event for one destination.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NotificationView {
    /// The id every attempt sends (`webhook-id`); absent until routed.
    pub id: Option<String>,
    /// `new` (not yet routed), `pending`, `sent` or `failed` (given up).
    pub status: Status,
    /// What happened.
    pub event: Event,
    /// The job.
    #[schema(format = Uuid)]
    pub job_id: String,
    /// The job's name.
    pub job_name: String,
    /// The run it is about, if any.
    #[schema(format = Uuid)]
    pub run_id: Option<String>,
    /// One line: the run's error, the pause note, the expected start.
    pub detail: Option<String>,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// `default` (the operator's `--notify-url`), or the job
    /// destination's URL as written in the job (a secret reference stays
    /// a reference).
    pub destination: Option<String>,
    /// What the destination receives.
    pub format: Option<Format>,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due (pending).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the destination accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// A page of notifications.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NotificationPage {
    /// Newest first.
    pub items: Vec<NotificationView>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<i64>,
}

impl From<Notice> for NotificationView {
    fn from(n: Notice) -> Self {
        let (destination, format) = match &n.target {
            None => (None, None),
            Some(Target::Default) => (Some("default".to_owned()), None),
            Some(Target::Job(d)) => (Some(d.url.clone()), Some(d.format)),
        };
        Self {
            id: n.id,
            status: n.status,
            event: n.message.event,
            job_id: n.message.job_id,
            job_name: n.message.job_name,
            run_id: n.message.run_id,
            detail: n.message.detail,
            occurred_at: n.message.occurred_at,
            destination,
            format,
            attempts: n.attempts,
            next_attempt_at: (n.status == Status::Pending).then_some(n.next_attempt_at),
            sent_at: n.sent_at,
            last_error: n.last_error,
        }
    }
}

/// List notifications, newest first.
#[utoipa::path(get, path = "/v1/notifications", tag = "notifications",
    params(
        ("status" = Option<Status>, Query, description = "Only this status"),
        ("job" = Option<String>, Query, format = Uuid, description = "Only this job (id)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1 to 500 (default 50)"),
        ("cursor" = Option<i64>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of notifications", body = NotificationPage),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_notifications(
    State(ctx): State<Arc<ApiContext>>,
    params: Params,
) -> Result<Json<NotificationPage>, ApiError> {
    params.only(&["status", "job", "limit", "cursor"])?;
    let page = PageParams::<i64>::parse(&params)?;
    let limit = page.limit;
    let filter = NoticeFilter {
        status: params.one::<Status>("status")?,
        job: params.one::<JobId>("job")?,
        before: page.cursor,
        limit: limit + 1,
    };
    let mut found = ctx.services.store.notices().list(&filter).await?;
    let more = found.len() > limit as usize;
    found.truncate(limit as usize);
    let next_cursor = more.then(|| found.last().map(|n| n.seq)).flatten();
    Ok(Json(NotificationPage {
        items: found.into_iter().map(NotificationView::from).collect(),
        next_cursor,
    }))
}
