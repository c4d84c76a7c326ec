//! Every metric the service exports, declared in one place with its help
//! text (`docs/observability.md` lists them).
//!
//! Names carry the `cronguard_` prefix and a unit suffix. Label sets are
//! bounded: statuses, triggers, reasons, loops and orphan kinds are closed
//! sets, routes are templates, methods and status classes are folded;
//! nothing is labelled by job unless the job opts in (`monitor: true`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry, TextEncoder,
};

use crate::run::{Reason, RunStatus, Trigger};

mod declare;
mod jobs;

use self::declare::{
    LATENCY, counter, counter_vec, gauge, gauge_vec, histogram, histogram_vec, int_gauge, int_gauge_vec,
    unix_seconds,
};
pub(crate) use self::declare::{opts, reg};
pub use self::jobs::JobSeries;

/// The service's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    // Fires and runs.
    runs_started: IntCounterVec,
    runs_finished: IntCounterVec,
    runs_running: IntGauge,
    fires_not_run: IntCounterVec,
    clock_steps: IntCounterVec,
    fire_lateness: Histogram,
    run_duration: Histogram,
    // Jobs.
    jobs: IntGaugeVec,
    jobs_by_health: IntGaugeVec,
    next_fire: Gauge,
    /// The per-job series of monitored jobs.
    pub per_job: JobSeries,
    // Supervision.
    loop_heartbeat: GaugeVec,
    loop_restarts: IntCounterVec,
    loop_healthy: IntGaugeVec,
    orphans_detected: IntCounterVec,
    orphans_current: IntGaugeVec,
    strays_killed: IntCounter,
    zombies_reaped: IntCounter,
    // Store.
    commit_seconds: Histogram,
    commit_errors: IntCounter,
    store_write_failures: IntCounterVec,
    store_writable: IntGauge,
    writer_queue: IntGauge,
    database_size: IntGauge,
    replicas: IntGauge,
    lease_renewed: Gauge,
    // HTTP server.
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    // Control backend.
    backend_configured: IntGauge,
    backend_last_attempt: Gauge,
    backend_last_contact: Gauge,
    backend_failures: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Declares and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let build = reg(
            r,
            IntGaugeVec::new(
                opts(
                    "build_info",
                    "Build of the running binary; the value is always 1.",
                ),
                &["version", "revision"],
            ),
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("CRONGUARD_GIT_REVISION")])
            .set(1);
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            r.register(Box::new(process))
                .unwrap_or_else(|e| unreachable!("process collector: {e}"));
        }
        let metrics = Self {
            runs_started: counter_vec(
                r,
                "runs_started_total",
                "Runs whose action started, by trigger.",
                &["trigger"],
            ),
            runs_finished: counter_vec(
                r,
                "runs_finished_total",
                "Runs that reached a final status after starting, by status and trigger.",
                &["status", "trigger"],
            ),
            runs_running: int_gauge(r, "runs_running", "Runs executing now."),
            fires_not_run: counter_vec(
                r,
                "fires_not_run_total",
                "Fires recorded without running, by status (skipped, missed) and reason.",
                &["status", "reason"],
            ),
            clock_steps: counter_vec(
                r,
                "clock_steps_total",
                "Steps of the wall clock (a jump of more than 1 s against the monotonic clock) seen by the engine, by direction.",
                &["direction"],
            ),
            fire_lateness: histogram(
                r,
                "fire_lateness_seconds",
                "Actual start of a scheduled run minus its due instant (scheduled time plus jitter).",
                LATENCY,
            ),
            run_duration: histogram(
                r,
                "run_duration_seconds",
                "Duration of runs from start to final status.",
                &[
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
                ],
            ),
            jobs: int_gauge_vec(
                r,
                "jobs",
                "Registered jobs by state (active, paused).",
                &["state"],
            ),
            jobs_by_health: int_gauge_vec(
                r,
                "jobs_by_health",
                "Every job by health (paused, late, failing, finished, pending, ok), counted when scraped.",
                &["health"],
            ),
            next_fire: gauge(
                r,
                "next_fire_timestamp_seconds",
                "Unix time of the soonest pending fire (0 when none).",
            ),
            per_job: JobSeries::new(r),
            loop_heartbeat: gauge_vec(
                r,
                "loop_heartbeat_timestamp_seconds",
                "Unix time of each internal loop's last heartbeat.",
                &["loop"],
            ),
            loop_restarts: counter_vec(
                r,
                "loop_restarts_total",
                "Restarts of internal loops after a panic, an error or an early return.",
                &["loop"],
            ),
            loop_healthy: int_gauge_vec(
                r,
                "loop_healthy",
                "1 while the loop's heartbeat is within its threshold and its restart budget holds, else 0.",
                &["loop"],
            ),
            orphans_detected: counter_vec(
                r,
                "orphans_detected_total",
                "Orphaned work found, by kind (previous_incarnation, run_without_task, task_without_run, \
                         stray_process).",
                &["kind"],
            ),
            orphans_current: int_gauge_vec(
                r,
                "orphans",
                "Orphans present now and not cleaned up (e.g. processes left alive under orphan policy \
                         `report`), by kind.",
                &["kind"],
            ),
            strays_killed: counter(
                r,
                "stray_processes_killed_total",
                "Processes killed because they belonged to no live run.",
            ),
            zombies_reaped: counter(
                r,
                "zombies_reaped_total",
                "Exited descendants reparented to the service (child subreaper) and reaped.",
            ),
            commit_seconds: histogram(
                r,
                "store_commit_seconds",
                "Duration of each group commit of the store writer.",
                LATENCY,
            ),
            commit_errors: counter(r, "store_commit_errors_total", "Group commits that failed."),
            store_write_failures: counter_vec(
                r,
                "store_write_failures_total",
                "Commits the database refused, by cause (disk_full, io, locked, read_only, cannot_open, unreachable, other).",
                &["fault"],
            ),
            store_writable: int_gauge(
                r,
                "store_writable",
                "1 while the store writer's commits go through, 0 from a refused commit until the next one that goes through.",
            ),
            writer_queue: int_gauge(r, "store_writer_queue", "Writes waiting for the store writer."),
            database_size: int_gauge(
                r,
                "database_size_bytes",
                "Size of the database file and its write-ahead log.",
            ),
            replicas: int_gauge(
                r,
                "replicas",
                "Live replicas on the database as this one last saw them (0 on SQLite: one instance).",
            ),
            lease_renewed: gauge(
                r,
                "replica_lease_renewed_timestamp_seconds",
                "Unix time this replica last renewed its lease (0: not a replica, or never).",
            ),
            http_requests: counter_vec(
                r,
                "http_requests_total",
                "API requests by route template, method and status class.",
                &["route", "method", "status"],
            ),
            http_duration: histogram_vec(
                r,
                "http_request_duration_seconds",
                "API request latency by route template and method.",
                LATENCY,
                &["route", "method"],
            ),
            backend_configured: int_gauge(
                r,
                "backend_configured",
                "1 when a control backend is configured (the backend series below are then meaningful).",
            ),
            backend_last_attempt: gauge(
                r,
                "backend_last_attempt_timestamp_seconds",
                "Unix time of the last attempt to contact the control backend (0: never).",
            ),
            backend_last_contact: gauge(
                r,
                "backend_last_contact_timestamp_seconds",
                "Unix time of the last successful contact with the control backend (0: never).",
            ),
            backend_failures: counter_vec(
                r,
                "backend_failures_total",
                "Failed contacts with the control backend, by reason.",
                &["reason"],
            ),
            registry,
        };
        for direction in ["forward", "backward"] {
            metrics.clock_steps.with_label_values(&[direction]);
        }
        metrics
    }

    /// A run's action started; `due_at` is when it should have.
    pub fn run_started(&self, trigger: Trigger, due_at: DateTime<Utc>, started_at: DateTime<Utc>) {
        self.runs_started.with_label_values(&[trigger.as_str()]).inc();
        if matches!(trigger, Trigger::Schedule) {
            let late = (started_at - due_at)
                .num_microseconds()
                .unwrap_or(i64::MAX)
                .max(0);
            self.fire_lateness.observe(late as f64 / 1e6);
        }
    }

    /// A started run reached its final status.
    pub fn run_finished(
        &self,
        trigger: Trigger,
        status: RunStatus,
        started_at: DateTime<Utc>,
        ended_at: DateTime<Utc>,
    ) {
        self.runs_finished
            .with_label_values(&[status.as_str(), trigger.as_str()])
            .inc();
        let took = (ended_at - started_at)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .max(0);
        self.run_duration.observe(took as f64 / 1e6);
    }

    /// How many runs execute now.
    pub fn set_running(&self, n: usize) {
        self.runs_running.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A fire was recorded as skipped or missed.
    pub fn fire_not_run(&self, status: RunStatus, reason: Reason, fires: u32) {
        self.fires_not_run
            .with_label_values(&[status.as_str(), reason.as_str()])
            .inc_by(u64::from(fires));
    }

    /// The engine saw the wall clock step (`forward` or `backward`).
    pub fn clock_step(&self, direction: &'static str) {
        self.clock_steps.with_label_values(&[direction]).inc();
    }

    /// Registered jobs by state.
    pub fn set_jobs(&self, active: usize, paused: usize) {
        self.jobs.with_label_values(&["active"]).set(active as i64);
        self.jobs.with_label_values(&["paused"]).set(paused as i64);
    }

    /// Jobs counted by health value.
    pub fn set_jobs_by_health(&self, counts: &[(&str, u64)]) {
        for (health, n) in counts {
            self.jobs_by_health
                .with_label_values(&[health])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// The soonest pending fire.
    pub fn set_next_fire(&self, at: Option<DateTime<Utc>>) {
        self.next_fire.set(at.map_or(0.0, unix_seconds));
    }

    /// A supervised loop was restarted.
    pub fn loop_restarted(&self, name: &str) {
        self.loop_restarts.with_label_values(&[name]).inc();
    }

    /// Copies the loops' heartbeats into their gauges (at scrape time).
    pub fn observe_loops(&self, health: &crate::health::Health) {
        for check in health.loop_checks() {
            self.loop_healthy
                .with_label_values(&[check.name])
                .set(i64::from(check.ok));
        }
        for beat in health.heartbeats() {
            self.loop_heartbeat
                .with_label_values(&[beat.name()])
                .set(beat.last_unix_seconds());
            // Make the restart series exist (at 0) before the first restart.
            self.loop_restarts.with_label_values(&[beat.name()]);
        }
    }

    /// An orphan of `kind` was found.
    pub fn orphan_detected(&self, kind: &str) {
        self.orphans_detected.with_label_values(&[kind]).inc();
    }

    /// Sets the current orphans of `kind` (also creates the detected series).
    pub fn set_orphans(&self, kind: &str, n: usize) {
        self.orphans_detected.with_label_values(&[kind]);
        self.orphans_current
            .with_label_values(&[kind])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A stray process was killed.
    pub fn stray_killed(&self) {
        self.strays_killed.inc();
    }

    /// A reparented descendant was reaped.
    pub fn zombie_reaped(&self) {
        self.zombies_reaped.inc();
    }

    /// Creates the write-failure series of each fault at zero.
    pub fn store_write_faults(&self, faults: &[&str]) {
        for fault in faults {
            self.store_write_failures.with_label_values(&[fault]);
        }
        self.store_writable.set(1);
    }

    /// The database refused a write for `fault` (a `StorageFault` label).
    pub fn store_write_failed(&self, fault: &str) {
        self.store_write_failures.with_label_values(&[fault]).inc();
    }

    /// Whether the writer's last commit went through.
    pub fn set_store_writable(&self, writable: bool) {
        self.store_writable.set(i64::from(writable));
    }

    /// A group commit finished (or failed) after `took`; `queued` writes wait.
    pub fn commit(&self, took: Duration, ok: bool, queued: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        if !ok {
            self.commit_errors.inc();
        }
        self.writer_queue.set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// Live replicas seen.
    pub fn set_replicas(&self, live: usize) {
        self.replicas.set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    /// This replica renewed its lease.
    pub fn lease_renewed(&self, at: DateTime<Utc>) {
        self.lease_renewed.set(unix_seconds(at));
    }

    /// The database's size on disk.
    pub fn set_database_size(&self, bytes: u64) {
        self.database_size.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// An API request finished.
    pub fn http_request(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "PATCH" | "OPTIONS" => method,
            _ => "other",
        };
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.http_requests
            .with_label_values(&[route, method, class])
            .inc();
        self.http_duration
            .with_label_values(&[route, method])
            .observe(took.as_secs_f64());
    }

    /// Whether a control backend is configured.
    pub fn set_backend_configured(&self, configured: bool) {
        self.backend_configured.set(i64::from(configured));
    }

    /// An attempt to reach the backend began.
    pub fn backend_attempt(&self, at: DateTime<Utc>) {
        self.backend_last_attempt.set(unix_seconds(at));
    }

    /// The backend answered successfully.
    pub fn backend_contact(&self, at: DateTime<Utc>) {
        self.backend_last_contact.set(unix_seconds(at));
    }

    /// A contact failed (`reason`: a closed set such as `timeout`, `connect`,
    /// `status_5xx`, `decode`).
    pub fn backend_failure(&self, reason: &'static str) {
        self.backend_failures.with_label_values(&[reason]).inc();
    }

    /// The registry, for components that register their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every family in the Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::with_capacity(32 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
