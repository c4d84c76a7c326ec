//! The HTTP API: router, shared context, and the layers around it.
//!
//! Handlers are thin: parse (extractors), call the store or supervisor,
//! shape the response. Every error leaves as problem+json via
//! [`error::ApiError`]. The OpenAPI document is generated from the same
//! handler annotations (`openapi.rs`), so it cannot drift from the routes.

pub mod auth;
pub mod error;
pub mod events;
pub mod extract;
pub mod job_view;
pub mod jobs;
pub mod malformed;
pub mod notifications;
pub mod openapi;
pub mod probes;
pub mod redaction;
pub mod run_output;
pub mod runs;
pub mod schedules;
pub mod scope;
pub mod serve;
pub mod unread;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use self::error::ApiError;
use self::extract::{BodyDeadline, BodyLimit, Params};
use crate::action::ActionPolicy;
use crate::health::Health;
use crate::loops::Services;
use crate::metrics::Metrics;
use crate::supervisor::SupervisorHandle;

/// Default page size of list endpoints.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page size of list endpoints.
pub const MAX_PAGE: u32 = 500;

/// What handlers share.
pub struct ApiContext {
    /// What the API reads and writes; "now" for writes, previews and the
    /// status page; the metrics registry.
    pub services: Services,
    /// Runs and cancels runs.
    pub supervisor: SupervisorHandle,
    /// Probe state.
    pub health: Arc<Health>,
    /// Orphan findings.
    pub orphans: Arc<crate::orphans::Orphans>,
    /// Fault injection (test builds).
    pub faults: Arc<crate::fault::Faults>,
    /// What actions may do.
    pub actions: ActionPolicy,
    /// This process's incarnation.
    pub incarnation: crate::run::Incarnation,
    /// Its place among replicas.
    pub membership: Arc<crate::cluster::Membership>,
    /// When this process started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// API tokens.
    pub tokens: Arc<auth::Tokens>,
    /// Job quota.
    pub max_jobs: Option<u64>,
    /// Contact with the control backend, when one is configured (its jobs
    /// are then read-only here).
    pub backend: Option<Arc<crate::backend::Contact>>,
    /// Subscribers to the live event feed.
    pub feed: Arc<events::Feed>,
    /// The output of command runs executing here.
    pub live: Arc<crate::executor::live::LiveOutput>,
}

/// HTTP-level limits.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Longest a request may take before a 503.
    pub request_timeout: Duration,
    /// Most requests processed at once (others wait).
    pub max_concurrent_requests: usize,
}

/// `limit` and `cursor` of a list request.
pub struct PageParams<C> {
    /// Where the previous page ended.
    pub cursor: Option<C>,
    /// Page size.
    pub limit: u32,
}

impl<C: std::str::FromStr> PageParams<C> {
    /// Reads and checks `limit` and `cursor`.
    pub fn parse(params: &Params) -> Result<Self, ApiError> {
        let limit = params.one::<u32>("limit")?.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::BadQuery {
                name: "limit".into(),
                detail: format!("must be between 1 and {MAX_PAGE}"),
            });
        }
        let cursor = match params.one::<String>("cursor")? {
            None => None,
            Some(c) => Some(c.parse::<C>().map_err(|_| ApiError::BadQuery {
                name: "cursor".into(),
                detail: "not a cursor returned by this endpoint".into(),
            })?),
        };
        Ok(Self { cursor, limit })
    }
}

/// Longest a client may take to send a request body.
pub const MAX_BODY_WAIT: Duration = Duration::from_secs(10);

/// The complete router with its layers.
pub fn router(ctx: Arc<ApiContext>, limits: HttpLimits) -> Router {
    let (api, _) = openapi::routes().split_for_parts();
    let spec = Arc::new(openapi::spec());
    let body_deadline = limits.request_timeout.min(MAX_BODY_WAIT);
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::debug_span!("request", method = %req.method(), uri = %req.uri(), id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            axum::response::IntoResponse::into_response(ApiError::Internal(
                "a request handler panicked".into(),
            ))
        }))
        // A request over the timeout answers a timeout problem.
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::Timeout
        }))
        .layer(tower::timeout::TimeoutLayer::new(limits.request_timeout))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            limits.max_concurrent_requests,
        ))
        .layer(axum::Extension(BodyLimit(limits.max_body_bytes)))
        // A body that stops short of its length would hold a concurrency
        // slot until the request timeout; it gets a 408 sooner.
        .layer(axum::Extension(BodyDeadline(body_deadline)))
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(body_deadline))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes));
    #[cfg(feature = "fault-injection")]
    let api = api.route("/debug/faults", axum::routing::post(probes::arm_fault));
    api.route(
        "/openapi.json",
        axum::routing::get(move || {
            let spec = spec.clone();
            async move { axum::Json((*spec).clone()) }
        }),
    )
    .fallback(|| async { ApiError::NotFound("route") })
    .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
    .layer(axum::middleware::from_fn_with_state(
        ctx.tokens.clone(),
        auth::authorize,
    ))
    .layer(axum::middleware::from_fn_with_state(
        ctx.services.metrics.clone(),
        track,
    ))
    .with_state(ctx)
    // The API reference, served with its assets embedded (no CDN).
    .merge(swagger_ui_dist::generate_routes(swagger_ui_dist::ApiDefinition {
        uri_prefix: "/docs",
        api_definition: swagger_ui_dist::OpenApiSource::Uri("/openapi.json"),
        title: Some("cronguard API"),
    }))
    .layer(layers)
    .layer(axum::middleware::from_fn(unread::close_if_unread))
}

/// Counts and times every request by route template (bounded labels:
/// never the raw path, which carries ids).
async fn track(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics.http_request(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
