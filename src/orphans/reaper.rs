//! The periodic orphan reaper: kinds 2, 3 and 4, and zombie reaping.
//!
//! Each pass compares three views of "what is live": the database (runs
//! recorded live by this incarnation), the supervisor (tasks it owns) and
//! the kernel (our child processes). The reads are ordered so that a run
//! that ends during the pass is never mistaken for an orphan: the database
//! is read *before* the supervisor's snapshot (a committed run was admitted
//! before the snapshot), and corrections are conditional writes submitted
//! after the snapshot, so they commit after any final state the supervisor
//! submitted first. Task-side findings must be seen on two consecutive
//! passes, which covers a task that ended between snapshot and check.

use futures_util::future::BoxFuture;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::{Finding, OrphanKind, Orphans, Remedy};
use crate::executor::ProcessTable;
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::procfs;
use crate::run::{Incarnation, Outcome, RunId, RunStatus};
use crate::store::{StorageFault, StoreError};
use crate::supervisor::SupervisorHandle;

/// How far past its deadline a task may run before it counts as stuck.
pub const STUCK_SLACK: Duration = Duration::from_secs(5);

/// Everything the reaper reads and corrects.
pub struct Reaper {
    /// Where live runs are compared with live tasks; the clock stamps
    /// orphaned runs; zombies reaped are counted.
    pub services: Services,
    /// The run supervisor.
    pub supervisor: SupervisorHandle,
    /// Where findings go.
    pub orphans: Arc<Orphans>,
    /// This process's incarnation.
    pub incarnation: Incarnation,
    /// Command leaders this process spawned; `Some` when this process owns
    /// its process tree (subreaper), which enables stray detection.
    pub processes: Option<ProcessTable>,
    /// Time between passes.
    pub interval: Duration,
}

impl Reaper {
    /// Runs passes until `shutdown`; also reaps exited descendants as soon
    /// as SIGCHLD arrives when it owns the process tree.
    pub async fn run(
        &self,
        shutdown: &CancellationToken,
        heartbeat: &Heartbeat,
        faults: &Faults,
    ) -> Result<(), LoopError> {
        let mut sigchld = match self.processes {
            Some(_) => Some(signal(SignalKind::child()).map_err(|source| LoopError::Signal {
                signal: "SIGCHLD",
                source,
            })?),
            None => None,
        };
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut suspects = HashSet::new();
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    // A pass asks the supervisor for its runs; once shutdown
                    // starts the supervisor stops answering until its drain,
                    // which waits for this loop: the pass gives way.
                    let passed = tokio::select! {
                        biased;
                        () = shutdown.cancelled() => return Ok(()),
                        passed = self.pass(&mut suspects) => match passed {
                            // The database is out (the writer says so, and
                            // readiness): try again next pass; the restart
                            // budget is for crashes, not for a dependency.
                            Err(e) if StorageFault::outage(&e).is_some() => {
                                tracing::debug!(error = %e, "reaper pass skipped: the database is out");
                                true
                            }
                            passed => passed?,
                        },
                    };
                    if !passed {
                        return Ok(());
                    }
                }
                Some(()) = async { sigchld.as_mut()?.recv().await } => self.reap_zombies(),
            }
        }
    }

    /// One full pass; `false` once the supervisor is gone (shutdown).
    pub async fn pass(&self, suspects: &mut HashSet<RunId>) -> Result<bool, StoreError> {
        // Order matters: database first, then the supervisor (see above).
        let recorded = self.services.store.runs().live(self.incarnation).await?;
        let Some(snapshot) = self.supervisor.snapshot().await else {
            return Ok(false);
        };
        let now = self.services.clock.now();
        let owned: HashSet<RunId> = snapshot
            .running
            .iter()
            .chain(snapshot.queued.iter())
            .map(|r| r.run)
            .collect();

        // Kind 2: recorded live here, owned by no task.
        for (run, job) in recorded.into_iter().filter(|(run, _)| !owned.contains(run)) {
            let error = "no task of this incarnation owned this live run (found by the orphan reaper)";
            if self
                .services
                .store
                .runs()
                .orphan_if_live(run, now, error.to_owned())
                .await?
            {
                self.orphans.record(
                    Finding {
                        kind: OrphanKind::RunWithoutTask,
                        detected_at: now,
                        run: Some(run),
                        job: Some(job),
                        pid: None,
                        process_start_ticks: None,
                        remedy: Remedy::MarkedOrphaned,
                        detail: error.to_owned(),
                    },
                    false,
                );
            }
        }

        // Kind 3: tasks whose run is gone or final, or that are stuck.
        let ids: Vec<RunId> = snapshot.running.iter().map(|r| r.run).collect();
        let statuses = self.services.store.runs().statuses(&ids).await?;
        let mut still_suspect = HashSet::new();
        for live in &snapshot.running {
            let problem = match statuses.get(&live.run) {
                None => Some((None, "its run row no longer exists (job deleted?)".to_owned())),
                Some(s) if s.is_final() => Some((None, format!("its run is already final ({s})"))),
                Some(_) => live.deadline.filter(|d| now > *d + stuck_slack()).map(|d| {
                    let mut outcome = Outcome::failed(format!(
                        "the run ignored cancellation past its deadline ({d}) and kill grace; aborted"
                    ));
                    outcome.status = RunStatus::TimedOut;
                    (Some(outcome), format!("stuck past its deadline {d}"))
                }),
            };
            let Some((outcome, detail)) = problem else {
                continue;
            };
            if !suspects.contains(&live.run) {
                still_suspect.insert(live.run);
                continue;
            }
            if self.supervisor.abort(live.run, outcome).await {
                self.orphans.record(
                    Finding {
                        kind: OrphanKind::TaskWithoutRun,
                        detected_at: now,
                        run: Some(live.run),
                        job: Some(live.job),
                        pid: None,
                        process_start_ticks: None,
                        remedy: Remedy::Aborted,
                        detail,
                    },
                    false,
                );
            }
        }
        *suspects = still_suspect;

        // Kind 4: processes that belong to no live run.
        if self.processes.is_some() {
            let live: HashSet<RunId> = snapshot.running.iter().map(|r| r.run).collect();
            self.reap_strays(&live, now);
        }
        self.orphans.refresh();
        Ok(true)
    }

    /// At shutdown, once every run is recorded: no descendant of a run of
    /// this incarnation outlives the service — neither a reparented child
    /// (an escapee whose run ended since the last pass) nor a process
    /// elsewhere that carries the identity of an ended run.
    pub async fn sweep(&self) {
        if self.processes.is_none() {
            return;
        }
        let now = self.services.clock.now();
        self.reap_strays(&HashSet::new(), now);
        if let Err(e) = super::handle_escaped(
            &self.services.store,
            &self.orphans,
            now,
            super::OrphanPolicy::Kill,
            &HashSet::new(),
        )
        .await
        {
            tracing::warn!(error = %e, "could not look for escaped processes at shutdown");
        }
    }

    /// Our child processes that are not the leader of a live run.
    fn unlisted_children(&self) -> Vec<procfs::Proc> {
        let Some(table) = &self.processes else {
            return Vec::new();
        };
        // Listing under the table's lock: a child spawned concurrently is
        // either listed already or not yet visible in /proc to this scan.
        let listed = table.lock();
        procfs::own_children()
            .into_iter()
            .filter(|p| !listed.contains_key(&p.pid))
            .collect()
    }

    fn reap_strays(&self, live: &HashSet<RunId>, now: DateTime<Utc>) {
        for p in self.unlisted_children() {
            if p.is_zombie() {
                if procfs::reap(p.pid) {
                    self.services.metrics.zombie_reaped();
                }
                continue;
            }
            let owner = procfs::run_of(p.pid);
            if owner.is_some_and(|run| live.contains(&run)) {
                continue;
            }
            procfs::kill_process(&p);
            let reaped = procfs::reap(p.pid);
            self.orphans.record(
                Finding {
                    kind: OrphanKind::StrayProcess,
                    detected_at: now,
                    run: owner,
                    job: None,
                    pid: Some(p.pid),
                    process_start_ticks: Some(p.start_ticks),
                    remedy: Remedy::Killed,
                    detail: match owner {
                        Some(run) => format!("a descendant of run {run}, which is no longer live; killed"),
                        None => "a reparented process that belongs to no run; killed".to_owned(),
                    },
                },
                false,
            );
            if reaped {
                self.services.metrics.zombie_reaped();
            }
        }
    }

    /// Reaps exited descendants reparented to us (SIGCHLD path).
    fn reap_zombies(&self) {
        for p in self
            .unlisted_children()
            .into_iter()
            .filter(procfs::Proc::is_zombie)
        {
            if procfs::reap(p.pid) {
                self.services.metrics.zombie_reaped();
            }
        }
    }
}

fn stuck_slack() -> TimeDelta {
    TimeDelta::from_std(STUCK_SLACK).unwrap_or(TimeDelta::seconds(5))
}

impl Loop for Reaper {
    fn name(&self) -> &'static str {
        "reaper"
    }

    fn slack(&self) -> Duration {
        self.interval
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(async move { self.run(&cx.stop, &cx.beat, &cx.faults).await })
    }
}
