//! Every metric the service exports, declared in one place with its help
//! text (`docs/observability.md` lists them).
//!
//! Label sets are bounded: statuses, triggers and reasons are closed enums;
//! nothing is labelled by job unless the job opts in.

use chrono::{DateTime, Utc};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::run::{Reason, RunStatus, Trigger};

/// The service's metrics and the registry that exports them.
pub struct Metrics {
    registry: Registry,
    runs_started: IntCounterVec,
    runs_finished: IntCounterVec,
    runs_running: IntGauge,
    fires_not_run: IntCounterVec,
    fire_lateness: Histogram,
    run_duration: Histogram,
    loop_heartbeat: GaugeVec,
    loop_restarts: IntCounterVec,
    loop_healthy: IntGaugeVec,
    orphans_detected: IntCounterVec,
    orphans_current: IntGaugeVec,
    strays_killed: IntCounter,
    zombies_reaped: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const NS: &str = "cronguard";

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NS), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help).namespace(NS), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    g
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(NS), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace(NS))
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).namespace(NS).buckets(buckets))
        .unwrap_or_else(|e| unreachable!("static metric definition {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| unreachable!("metric {name} registered twice: {e}"));
    h
}

impl Metrics {
    /// Declares and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let runs_started = counter_vec(
            r,
            "runs_started_total",
            "Runs whose action started, by trigger.",
            &["trigger"],
        );
        let runs_finished = counter_vec(
            r,
            "runs_finished_total",
            "Runs that reached a final status after starting, by status and trigger.",
            &["status", "trigger"],
        );
        let runs_running =
            IntGauge::with_opts(Opts::new("runs_running", "Runs executing now.").namespace(NS))
                .unwrap_or_else(|e| unreachable!("runs_running: {e}"));
        r.register(Box::new(runs_running.clone()))
            .unwrap_or_else(|e| unreachable!("runs_running: {e}"));
        let fires_not_run = counter_vec(
            r,
            "fires_not_run_total",
            "Fires recorded without running, by status (skipped, missed) and reason.",
            &["status", "reason"],
        );
        let fire_lateness = histogram(
            r,
            "fire_lateness_seconds",
            "Actual start of a scheduled run minus its due instant (scheduled time plus jitter).",
            vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        );
        let run_duration = histogram(
            r,
            "run_duration_seconds",
            "Duration of runs from start to final status.",
            vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
            ],
        );
        let build = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Build of the running binary; the value is always 1.",
            )
            .namespace(NS),
            &["version"],
        )
        .unwrap_or_else(|e| unreachable!("build_info: {e}"));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build))
            .unwrap_or_else(|e| unreachable!("build_info: {e}"));
        let loop_heartbeat = gauge_vec(
            r,
            "loop_heartbeat_timestamp_seconds",
            "Unix time of each internal loop's last heartbeat.",
            &["loop"],
        );
        let loop_restarts = counter_vec(
            r,
            "loop_restarts_total",
            "Restarts of internal loops after a panic, an error or an early return.",
            &["loop"],
        );
        let loop_healthy = int_gauge_vec(
            r,
            "loop_healthy",
            "1 while the loop's heartbeat is within its threshold and its restart budget holds, else 0.",
            &["loop"],
        );
        let orphans_detected = counter_vec(
            r,
            "orphans_detected_total",
            "Orphaned work found, by kind (previous_incarnation, run_without_task, task_without_run, stray_process).",
            &["kind"],
        );
        let orphans_current = int_gauge_vec(
            r,
            "orphans",
            "Orphans present now and not cleaned up (e.g. processes left alive under orphan policy `report`), by kind.",
            &["kind"],
        );
        let strays_killed = counter(
            r,
            "stray_processes_killed_total",
            "Processes killed because they belonged to no live run.",
        );
        let zombies_reaped = counter(
            r,
            "zombies_reaped_total",
            "Exited descendants reparented to the service (child subreaper) and reaped.",
        );
        Self {
            registry,
            loop_heartbeat,
            loop_restarts,
            loop_healthy,
            orphans_detected,
            orphans_current,
            strays_killed,
            zombies_reaped,
            runs_started,
            runs_finished,
            runs_running,
            fires_not_run,
            fire_lateness,
            run_duration,
        }
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

    /// Sets the current orphans of `kind`.
    pub fn set_orphans(&self, kind: &str, n: usize) {
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

    /// The registry, for components that register their own families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every family in the Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
