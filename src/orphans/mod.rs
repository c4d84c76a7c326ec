//! Orphaned work: found, reported, cleaned up.
//!
//! Four kinds (`docs/supervision.md`):
//! 1. **previous incarnation** — at startup, runs an earlier process left
//!    `running` or `queued` are marked `orphaned` before anything fires; a
//!    process of theirs still alive (same pid and start time, or carrying
//!    the run's `CRONGUARD_RUN`) is killed (policy `kill`, default) or left
//!    and reported (policy `report`);
//! 2. **run without task** — a run recorded live by this incarnation that
//!    no supervisor task owns: marked `orphaned`;
//! 3. **task without run** — a live task whose run row is gone or already
//!    final, or that ignored cancellation past its deadline and kill grace:
//!    aborted (its process group dies with it);
//! 4. **stray process** — a child or reparented descendant of the service
//!    that belongs to no live run: killed and reaped.
//!
//! Kind 1 runs at startup ([`reconcile_previous_incarnations`], which also
//! finds processes that escaped runs already ended); kinds 2–4 run in the
//! periodic [`reaper`], and kind 4 once more at shutdown, after the drain. Every finding is logged with its ids,
//! counted by kind, and listed by `GET /v1/orphans`.

pub mod reaper;

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::job::JobId;
use crate::metrics::Metrics;
use crate::procfs;
use crate::run::{Incarnation, Run, RunId};
use crate::store::{Store, StoreError};

/// Findings kept in the recent list.
pub const RECENT_FINDINGS: usize = 1000;

/// The kinds of orphaned work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrphanKind {
    /// Left live by an earlier incarnation.
    PreviousIncarnation,
    /// Recorded live here, owned by no task.
    RunWithoutTask,
    /// A task whose run is gone, final, or that is stuck.
    TaskWithoutRun,
    /// A process that belongs to no live run.
    StrayProcess,
}

impl OrphanKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::PreviousIncarnation,
        Self::RunWithoutTask,
        Self::TaskWithoutRun,
        Self::StrayProcess,
    ];

    /// Stable text (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreviousIncarnation => "previous_incarnation",
            Self::RunWithoutTask => "run_without_task",
            Self::TaskWithoutRun => "task_without_run",
            Self::StrayProcess => "stray_process",
        }
    }
}

/// What was done about a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// The run was marked `orphaned`.
    MarkedOrphaned,
    /// The process (group) was killed.
    Killed,
    /// Left alone and reported (policy `report`), or could not be cleaned.
    Reported,
    /// The task was aborted.
    Aborted,
}

/// What to do with live processes of a previous incarnation's runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OrphanPolicy {
    /// Kill them.
    #[default]
    Kill,
    /// Leave them running and report them.
    Report,
}

/// One piece of orphaned work found.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Finding {
    /// Its kind.
    pub kind: OrphanKind,
    /// When it was found.
    pub detected_at: DateTime<Utc>,
    /// The run concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunId>,
    /// Its job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// The process concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Its start time (identifies it across pid reuse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_start_ticks: Option<u64>,
    /// What was done.
    pub remedy: Remedy,
    /// In words.
    pub detail: String,
}

/// Orphans now and recently.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrphanReport {
    /// Orphans still present (e.g. processes left alive under `report`).
    pub current: Vec<Finding>,
    /// The most recent findings, newest first (at most 1000).
    pub recent: Vec<Finding>,
}

/// The registry of findings.
#[derive(Debug)]
pub struct Orphans {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    bus: Arc<crate::events::Bus>,
}

#[derive(Debug, Default)]
struct State {
    recent: VecDeque<Finding>,
    current: Vec<Finding>,
}

impl Orphans {
    /// An empty registry publishing to `metrics` and the live feed.
    pub fn new(metrics: Arc<Metrics>, bus: Arc<crate::events::Bus>) -> Self {
        for kind in OrphanKind::ALL {
            metrics.set_orphans(kind.as_str(), 0);
        }
        Self {
            state: Mutex::default(),
            metrics,
            bus,
        }
    }

    /// Records a finding; `persists` keeps it in `current` until
    /// [`Orphans::refresh`] sees it gone.
    pub fn record(&self, finding: Finding, persists: bool) {
        tracing::warn!(
            kind = finding.kind.as_str(),
            run = finding.run.map(|r| r.to_string()),
            job = finding.job.map(|j| j.to_string()),
            pid = finding.pid,
            remedy = ?finding.remedy,
            detail = %finding.detail,
            "orphan detected"
        );
        self.metrics.orphan_detected(finding.kind.as_str());
        let remedy = serde_json::to_value(finding.remedy).unwrap_or_default();
        let mut event = crate::events::Event::new(crate::events::Kind::OrphanDetected, finding.detected_at)
            .status(finding.kind.as_str())
            .detail(format!(
                "{}: {}",
                remedy.as_str().unwrap_or("reported"),
                finding.detail
            ));
        event.job_id = finding.job;
        event.run_id = finding.run;
        self.bus.publish([event]);
        if finding.kind == OrphanKind::StrayProcess && finding.remedy == Remedy::Killed {
            self.metrics.stray_killed();
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if persists {
            state.current.push(finding.clone());
        }
        state.recent.push_front(finding);
        state.recent.truncate(RECENT_FINDINGS);
        self.publish(&state);
    }

    /// Drops current findings whose process is gone.
    pub fn refresh(&self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.current.retain(|f| match (f.pid, f.process_start_ticks) {
            (Some(pid), Some(ticks)) => procfs::is_same_live_process(pid, ticks),
            (Some(pid), None) => procfs::read(pid).is_some_and(|p| !p.is_zombie()),
            _ => false,
        });
        self.publish(&state);
    }

    fn publish(&self, state: &State) {
        for kind in OrphanKind::ALL {
            let n = state.current.iter().filter(|f| f.kind == kind).count();
            self.metrics.set_orphans(kind.as_str(), n);
        }
    }

    /// Current and recent findings.
    pub fn report(&self) -> OrphanReport {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        OrphanReport {
            current: state.current.clone(),
            recent: state.recent.iter().cloned().collect(),
        }
    }
}

/// Kind 1, at startup: marks the previous incarnations' live runs orphaned
/// and deals with their surviving processes per `policy`. With replicas
/// (`expired_before`), only the runs of incarnations whose lease expired:
/// the others belong to live replicas.
pub async fn reconcile_previous_incarnations(
    store: &Store,
    orphans: &Orphans,
    current: Incarnation,
    now: DateTime<Utc>,
    expired_before: Option<DateTime<Utc>>,
    policy: OrphanPolicy,
) -> Result<Vec<Run>, StoreError> {
    let runs = store.runs().orphan_foreign(current, now, expired_before).await?;
    handle_previous_incarnation_runs(&runs, orphans, now, policy);
    let handled: HashSet<RunId> = runs.iter().map(|r| r.id).collect();
    handle_escaped(store, orphans, now, policy, &handled).await?;
    Ok(runs)
}

/// Processes carrying the identity of a run of this database that has
/// ended — descendants that escaped their run (`setsid`, a double fork)
/// and outlived it, typically across a restart that left them to init —
/// killed or reported per `policy` (runs in `handled` were dealt with
/// already). Live runs' processes are left alone: on a shared database
/// they may be another replica's.
pub async fn handle_escaped(
    store: &Store,
    orphans: &Orphans,
    now: DateTime<Utc>,
    policy: OrphanPolicy,
    handled: &HashSet<RunId>,
) -> Result<(), StoreError> {
    let by_run: Vec<(RunId, Vec<procfs::Proc>)> = procfs::by_run()
        .into_iter()
        .filter(|(run, _)| !handled.contains(run))
        .collect();
    if by_run.is_empty() {
        return Ok(());
    }
    let ids: Vec<RunId> = by_run.iter().map(|(run, _)| *run).collect();
    let statuses = store.runs().statuses(&ids).await?;
    for (run, procs) in by_run {
        let Some(status) = statuses.get(&run).filter(|s| s.is_final()) else {
            continue;
        };
        for p in procs {
            let remedy = match policy {
                OrphanPolicy::Kill => {
                    procfs::kill_process(&p);
                    Remedy::Killed
                }
                OrphanPolicy::Report => Remedy::Reported,
            };
            let finding = Finding {
                kind: OrphanKind::PreviousIncarnation,
                detected_at: now,
                run: Some(run),
                job: None,
                pid: Some(p.pid),
                process_start_ticks: Some(p.start_ticks),
                remedy,
                detail: format!(
                    "a process of run {run}, which ended {status}, outlived it; {}",
                    match policy {
                        OrphanPolicy::Kill => "killed (orphan policy `kill`)",
                        OrphanPolicy::Report => "left running (orphan policy `report`)",
                    }
                ),
            };
            orphans.record(finding, policy == OrphanPolicy::Report);
        }
    }
    Ok(())
}

/// Reports runs just marked orphaned (kind 1) and deals with their
/// processes still alive on this machine per `policy`.
pub fn handle_previous_incarnation_runs(
    runs: &[Run],
    orphans: &Orphans,
    now: DateTime<Utc>,
    policy: OrphanPolicy,
) {
    if runs.is_empty() {
        return;
    }
    let by_run = procfs::by_run();
    for run in runs {
        // The recorded leader, if it is still the same process, plus every
        // live process that inherited this run's identity.
        let mut survivors: Vec<procfs::Proc> = by_run.get(&run.id).cloned().unwrap_or_default();
        if let (Some(pid), Some(ticks)) = (run.pid, run.process_start_ticks)
            && procfs::is_same_live_process(pid, ticks)
            && !survivors.iter().any(|p| p.pid == pid)
            && let Some(p) = procfs::read(pid)
        {
            survivors.push(p);
        }
        let base = Finding {
            kind: OrphanKind::PreviousIncarnation,
            detected_at: now,
            run: Some(run.id),
            job: Some(run.job_id),
            pid: None,
            process_start_ticks: None,
            remedy: Remedy::MarkedOrphaned,
            detail: format!(
                "incarnation {} ended with this run {}; marked orphaned",
                run.incarnation, run.status
            ),
        };
        if survivors.is_empty() {
            orphans.record(base, false);
            continue;
        }
        for p in survivors {
            let (remedy, detail) = match policy {
                OrphanPolicy::Kill => {
                    procfs::kill_process(&p);
                    (
                        Remedy::Killed,
                        "its process was still alive; killed (orphan policy `kill`)",
                    )
                }
                OrphanPolicy::Report => (
                    Remedy::Reported,
                    "its process is still alive; left running (orphan policy `report`)",
                ),
            };
            let finding = Finding {
                pid: Some(p.pid),
                process_start_ticks: Some(p.start_ticks),
                remedy,
                detail: detail.to_owned(),
                ..base.clone()
            };
            orphans.record(finding, policy == OrphanPolicy::Report);
        }
    }
}
