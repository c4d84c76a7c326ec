//! `/livez`, `/readyz` and `/metrics`: what orchestrators and Prometheus read.
//!
//! Liveness fails only when this process cannot do its job (an internal
//! loop is stuck or dead); readiness fails when it should not get traffic
//! (database unreachable, startup recovery not done, shutting down). A
//! dependency being down never fails liveness: restarting a fleet during an
//! outage cures nothing. Both probes read atomics plus, for readiness, one
//! trivial indexed query.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiContext;
use super::error::ApiError;
use super::extract::Params;
use super::job_view::HealthCounts;

/// One probe check.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it passes.
    pub ok: bool,
    /// Its current value, where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// The threshold it is held to, where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<serde_json::Value>,
    /// Why it fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A probe's verdict.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeReport {
    /// `ok` or `fail`.
    pub status: &'static str,
    /// Every check.
    pub checks: Vec<Check>,
}

fn respond(params: &Params, checks: Vec<Check>) -> Result<Response, ApiError> {
    params.only(&["verbose"])?;
    let ok = checks.iter().all(|c| c.ok);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let verbose = params.all("verbose").next().is_some();
    Ok(if verbose {
        let report = ProbeReport {
            status: if ok { "ok" } else { "fail" },
            checks,
        };
        (status, Json(report)).into_response()
    } else {
        let mut text = String::from(if ok { "ok\n" } else { "fail\n" });
        for c in checks.iter().filter(|c| !c.ok) {
            text.push_str(&format!(
                "{}: {}\n",
                c.name,
                c.reason.as_deref().unwrap_or("failing")
            ));
        }
        (status, text).into_response()
    })
}

fn flag(name: &str, ok: bool, reason: &str) -> Check {
    Check {
        name: name.to_owned(),
        ok,
        value: Some(ok.into()),
        threshold: None,
        reason: (!ok).then(|| reason.to_owned()),
    }
}

/// Liveness: every internal loop beats within its threshold.
#[utoipa::path(get, path = "/livez", tag = "health",
    params(("verbose" = Option<String>, Query, description = "Present: answer JSON with every check")),
    responses(
        (status = 200, description = "Alive (JSON with `?verbose`)", content((ProbeReport = "application/json"), (String = "text/plain"))),
        (status = 503, description = "A loop is stuck or dead (JSON with `?verbose`)", content((ProbeReport = "application/json"), (String = "text/plain"))),
    ))]
pub async fn livez(State(ctx): State<Arc<ApiContext>>, params: Params) -> Result<Response, ApiError> {
    let mut checks: Vec<Check> = ctx
        .health
        .loop_checks()
        .into_iter()
        .map(|c| Check {
            name: format!("loop:{}", c.name),
            ok: c.ok,
            value: c.age_seconds.map(Into::into),
            threshold: Some(c.threshold_seconds.into()),
            reason: c.reason,
        })
        .collect();
    // Opt-in: a fleet where a restart is the cure for a lost backend.
    if let Some(contact) = &ctx.backend
        && let Some(max) = contact.max_age
    {
        let now = ctx.services.clock.now();
        let age = contact.age(now);
        let too_old = contact.too_old(now).is_some();
        checks.push(Check {
            name: "backend_contact".into(),
            ok: !too_old,
            value: Some(age.as_secs_f64().into()),
            threshold: Some(max.as_secs_f64().into()),
            reason: too_old.then(|| {
                format!(
                    "no successful contact with the control backend for {:.0}s (--backend-contact-max-age {:.0}s)",
                    age.as_secs_f64(),
                    max.as_secs_f64()
                )
            }),
        });
    }
    respond(&params, checks)
}

/// Readiness: database reachable and migrated, startup recovery done,
/// schedule loaded, not shutting down.
#[utoipa::path(get, path = "/readyz", tag = "health",
    params(("verbose" = Option<String>, Query, description = "Present: answer JSON with every check")),
    responses(
        (status = 200, description = "Ready (JSON with `?verbose`)", content((ProbeReport = "application/json"), (String = "text/plain"))),
        (status = 503, description = "Not ready (JSON with `?verbose`)", content((ProbeReport = "application/json"), (String = "text/plain"))),
    ))]
pub async fn readyz(State(ctx): State<Arc<ApiContext>>, params: Params) -> Result<Response, ApiError> {
    let h = &ctx.health;
    let db = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        ctx.services.store.check_ready(),
    )
    .await;
    let db_check = match db {
        Ok(Ok(())) => flag("database", true, ""),
        Ok(Err(e)) => flag("database", false, &format!("database not usable: {e}")),
        Err(_) => flag("database", false, "database did not answer within 2s"),
    };
    let mut checks = vec![
        flag(
            "shutting_down",
            !h.shutting_down(),
            "the service is shutting down",
        ),
        db_check,
        writable(&ctx).await,
        flag("recovery", h.recovered(), "startup recovery has not finished"),
        flag(
            "schedule_loaded",
            h.schedule_loaded(),
            "the engine has not loaded the schedule",
        ),
    ];
    // Informational: a backend that is down does not make this instance
    // unfit for traffic (it keeps running the last known jobs).
    if let Some(contact) = &ctx.backend {
        let view = contact.view(ctx.services.clock.now());
        checks.push(Check {
            name: "backend_contact".into(),
            ok: true,
            value: serde_json::to_value(&view).ok(),
            threshold: None,
            reason: None,
        });
    }
    respond(&params, checks)
}

/// Whether the store takes writes. While its last commit failed, a probe
/// write tells whether it does again (freed disk space ends the red state
/// even when nothing else is written).
async fn writable(ctx: &ApiContext) -> Check {
    if ctx.services.store.failing().is_some() {
        let probe = ctx.services.store.probe(ctx.services.clock.now());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), probe).await;
    }
    match ctx.services.store.failing() {
        None => flag("database_writable", true, ""),
        Some(f) => flag(
            "database_writable",
            false,
            &format!(
                "the database cannot be written since {}: {} ({})",
                f.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                f.fault,
                f.detail
            ),
        ),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics(State(ctx): State<Arc<ApiContext>>) -> Result<Response, ApiError> {
    ctx.services.metrics.observe_loops(&ctx.health);
    // The outbox gauges must show results piling up even while no upload
    // is attempted (the uploader waiting out a backoff, or hung).
    if let Some(contact) = &ctx.backend
        && let Ok((entries, oldest)) = ctx.services.store.outbox().stats().await
    {
        contact.set_outbox(entries, oldest, ctx.services.clock.now());
    }
    if let Some(contact) = &ctx.backend {
        contact.observe(ctx.services.clock.now());
    }
    // Health is judged on read ("late" needs no loop to notice it), so
    // the counts are too.
    if let Ok(h) = super::job_view::health_counts(&ctx).await {
        ctx.services.metrics.set_jobs_by_health(&[
            ("ok", h.ok),
            ("failing", h.failing),
            ("late", h.late),
            ("paused", h.paused),
            ("pending", h.pending),
            ("finished", h.finished),
        ]);
    }
    if let Some(size) = ctx.services.store.size_bytes().await {
        ctx.services.metrics.set_database_size(size);
    }
    let text = ctx
        .services
        .metrics
        .render()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// Orphaned work found now and recently (see `docs/supervision.md`).
#[utoipa::path(get, path = "/v1/orphans", tag = "health",
    responses((status = 200, description = "Current and recent findings", body = crate::orphans::OrphanReport)))]
pub async fn orphans(State(ctx): State<Arc<ApiContext>>) -> Json<crate::orphans::OrphanReport> {
    Json(ctx.orphans.report())
}

/// `POST /debug/faults` (fault-injection builds only): arms a fault.
#[cfg(feature = "fault-injection")]
pub async fn arm_fault(
    State(ctx): State<Arc<ApiContext>>,
    super::extract::JsonBody(request): super::extract::JsonBody<FaultRequest>,
) -> axum::http::StatusCode {
    ctx.faults.arm(&request.target, request.fault);
    axum::http::StatusCode::NO_CONTENT
}

/// Body of `POST /debug/faults`.
#[cfg(feature = "fault-injection")]
#[derive(Debug, serde::Deserialize)]
pub struct FaultRequest {
    /// Loop name (`engine`, `supervisor`, `reaper`).
    pub target: String,
    /// `hang` or `panic`.
    pub fault: crate::fault::Fault,
}

/// The service's state in depth (status page, debugging).
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// Version of the binary.
    pub version: &'static str,
    /// Git revision it was built from.
    pub revision: &'static str,
    /// This process's incarnation.
    pub incarnation: crate::run::Incarnation,
    /// When it started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Seconds since.
    pub uptime_seconds: f64,
    /// Whether `/readyz` would pass its flags (database not checked here).
    pub ready: bool,
    /// Whether shutdown began.
    pub shutting_down: bool,
    /// Every internal loop: heartbeat age, threshold, restarts.
    pub loops: Vec<crate::health::LoopCheck>,
    /// Live runs in this process.
    pub runs: RunCounts,
    /// Registered jobs.
    pub jobs: JobCounts,
    /// Orphaned work.
    pub orphans: OrphanCounts,
    /// The database.
    pub store: StoreStatus,
    /// The control backend, when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendStatus>,
    /// The replicas on the database and who runs what.
    pub replicas: crate::cluster::ReplicaSet,
}

/// Contact with the control backend and the results waiting for it.
#[derive(Debug, Serialize, ToSchema)]
pub struct BackendStatus {
    /// Last attempt, last contact, failures.
    pub contact: crate::backend::ContactView,
    /// Results and rejections waiting for upload.
    pub outbox_entries: u64,
    /// When the oldest of them was written.
    pub outbox_oldest: Option<chrono::DateTime<chrono::Utc>>,
}

/// Live runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunCounts {
    /// Executing now.
    pub running: usize,
    /// Waiting (overlap queue or the global limit).
    pub queued: usize,
}

/// Registered jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCounts {
    /// Not paused.
    pub active: u64,
    /// Paused.
    pub paused: u64,
    /// Jobs by health (`docs/observability.md`, "Job health").
    pub health: HealthCounts,
}

/// Orphaned work.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrphanCounts {
    /// Still present.
    pub current: usize,
    /// Found since start (at most the last 1000 are listed at `/v1/orphans`).
    pub recent: usize,
}

/// The database.
#[derive(Debug, Serialize, ToSchema)]
pub struct StoreStatus {
    /// Bytes on disk (file and write-ahead log).
    pub size_bytes: u64,
}

/// The service's state: incarnation, uptime, loops, runs, jobs, orphans.
#[utoipa::path(get, path = "/v1/status", tag = "health",
    responses((status = 200, description = "Status", body = Status)))]
pub async fn status(State(ctx): State<Arc<ApiContext>>) -> Result<Json<Status>, ApiError> {
    let h = &ctx.health;
    let snapshot = ctx.supervisor.snapshot().await;
    let (active, paused) = ctx.services.store.jobs().count().await?;
    let orphans = ctx.orphans.report();
    let backend = match &ctx.backend {
        Some(contact) => {
            let (outbox_entries, outbox_oldest) = ctx.services.store.outbox().stats().await?;
            Some(BackendStatus {
                contact: contact.view(ctx.services.clock.now()),
                outbox_entries,
                outbox_oldest,
            })
        }
        None => None,
    };
    let replicas = replica_set(&ctx).await?;
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        revision: env!("CRONGUARD_GIT_REVISION"),
        incarnation: ctx.incarnation,
        started_at: ctx.started_at,
        uptime_seconds: h.uptime().as_secs_f64(),
        ready: h.recovered() && h.schedule_loaded() && !h.shutting_down(),
        shutting_down: h.shutting_down(),
        loops: h.loop_checks(),
        runs: RunCounts {
            running: snapshot.as_ref().map_or(0, |s| s.running.len()),
            queued: snapshot.as_ref().map_or(0, |s| s.queued.len()),
        },
        jobs: JobCounts {
            active,
            paused,
            health: super::job_view::health_counts(&ctx).await?,
        },
        orphans: OrphanCounts {
            current: orphans.current.len(),
            recent: orphans.recent.len(),
        },
        store: StoreStatus {
            size_bytes: ctx.services.store.size_bytes().await.unwrap_or(0),
        },
        backend,
        replicas,
    }))
}

/// The live replicas as this one last saw them, with what each runs now.
async fn replica_set(ctx: &ApiContext) -> Result<crate::cluster::ReplicaSet, ApiError> {
    let m = &ctx.membership;
    let replicas = if ctx.services.store.shared() {
        let running = ctx.services.store.incarnations().running_by().await?;
        m.replicas()
            .into_iter()
            .map(|r| crate::cluster::ReplicaView {
                running: running.get(&r.id).copied().unwrap_or(0),
                this: r.id == m.me(),
                incarnation: r.id,
                host: r.host,
                pid: r.pid,
                started_at: r.started_at,
                heartbeat_at: r.heartbeat_at,
                leaving: r.leaving,
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(crate::cluster::ReplicaSet {
        clustered: m.lease().is_some(),
        lease_seconds: m.lease().map(|l| l.as_secs_f64()),
        active: m.may_fire(),
        owned_jobs: m.owned_jobs(),
        replicas,
    })
}
