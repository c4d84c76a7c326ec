//! The `backend_sync` loop: pull the desired jobs and reconcile the
//! backend-owned ones.
//!
//! Rules (`docs/backend.md`):
//! - jobs are matched by name; only `source: backend` jobs are created,
//!   replaced or deleted; a local (`source: api`) job is never touched, and
//!   a backend item with a local job's name is rejected;
//! - each item is decoded and validated on its own, exactly like a `POST
//!   /v1/jobs` body: an invalid item is rejected (logged, counted, reported
//!   to the backend on the next upload) and the rest still apply; if a job
//!   of that name already exists, it keeps its last good definition;
//! - rejections are reported in a bounded size whatever the list's: the
//!   first 100 with their reasons, all of them counted by reason, in one
//!   commit — and only when the set of rejected items changed since the
//!   last report (`rejections.rs`);
//! - the loop beats while it decodes and validates, so a huge list is slow
//!   work, not a hung loop;
//! - an unchanged item causes no write; a changed one is a replace (same
//!   id, history kept; `paused` omitted keeps the current state, so a local
//!   pause survives); a missing one is deleted (its live runs cancelled and
//!   reported as `cancelled` / `job_deleted`);
//! - the `ETag` is kept only once a list applied completely, so a failed
//!   or partial apply is retried in full at the next pull.

use futures_util::future::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::client::{BackendClient, Pulled};
use super::contact::{Contact, Direction};
use super::metrics::SyncMetrics;
use super::rejections::Rejections;
use crate::action::ActionPolicy;
use crate::fault::Faults;
use crate::health::Heartbeat;
use crate::job::{Job, JobId, JobSpec, Source, check_name};
use crate::loops::{Loop, LoopCx, LoopError, Services};
use crate::protocol::{Rejection, RejectionSummary};
use crate::store::Conflict;
use crate::store::{NewJob, Replacement, StoreError};
use crate::validation::{DecodeError, FieldError, decode_json};

/// Writes issued at once (they share group commits); the loop beats
/// between chunks.
const CHUNK: usize = 256;
/// Longest wait between failed pulls (if the poll interval is longer): a
/// backend that comes back is seen within it.
const MAX_RETRY: Duration = Duration::from_secs(10);
/// Items decoded and validated between heartbeats.
const ITEMS_PER_BEAT: usize = 1024;
/// The sync loop and what it needs.
pub struct Puller {
    /// The backend.
    pub client: BackendClient,
    /// Where the backend's jobs are reconciled, and the clock that stamps
    /// each attempt, contact and write.
    pub services: Services,
    /// Shared contact state.
    pub contact: Arc<Contact>,
    /// Pull and contact counters.
    pub counters: SyncMetrics,
    /// What actions this server accepts.
    pub actions: ActionPolicy,
    /// Job quota (`--max-jobs`).
    pub max_jobs: Option<u64>,
    /// Time between pulls.
    pub interval: Duration,
}

/// What survives between pulls (in memory: after a restart the first pull
/// is unconditional and current rejections are reported once more).
#[derive(Debug, Default)]
pub struct PullState {
    etag: Option<String>,
    /// Digest of the set of rejections last reported.
    reported: Option<[u8; 32]>,
}

/// What one reconciliation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Jobs created.
    pub created: u64,
    /// Jobs replaced.
    pub updated: u64,
    /// Jobs deleted.
    pub deleted: u64,
    /// Items rejected (including ones reported before).
    pub rejected: u64,
    /// Some write lost a race with the local API: retry at the next pull.
    pub retry: bool,
}

/// The backend's list as read, and what it is reconciled against.
struct Listed<'a> {
    items: Vec<Box<RawValue>>,
    /// Each item's name, if it has one.
    names: Vec<Option<String>>,
    /// The stored jobs by name.
    existing: &'a HashMap<String, Arc<Job>>,
    /// Jobs that may still be created under `--max-jobs`.
    room: Option<u64>,
}

enum Write {
    Create(NewJob),
    Replace(Replacement),
}

/// An item's `name`, if it is an object with a string name (items are
/// kept as raw text: a list is never held as a `Value` tree).
fn item_name(item: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        name: Option<String>,
    }
    serde_json::from_str::<Named>(item.get()).ok()?.name
}

impl Puller {
    /// Pulls every `interval` until `shutdown`. Store failures end the
    /// loop (its supervisor restarts it); backend failures are recorded
    /// and retried sooner (from 1 s, doubling up to 10 s or the interval,
    /// jittered), so a backend that comes back is seen within seconds; an
    /// upload that succeeds after failures also triggers a pull at once.
    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        heartbeat: Arc<Heartbeat>,
        faults: Arc<Faults>,
    ) -> Result<(), LoopError> {
        let mut state = PullState::default();
        let mut retry = Duration::from_secs(1);
        loop {
            heartbeat.beat();
            faults.checkpoint(heartbeat.name()).await;
            self.contact.attempt(Direction::Pull, self.services.clock.now());
            let pulled = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                pulled = self.client.pull(state.etag.as_deref()) => pulled,
            };
            let failed = pulled.is_err();
            match pulled {
                Ok(Pulled::Unchanged) => {
                    self.contact.success(Direction::Pull, self.services.clock.now());
                    self.counters.pulled(false);
                }
                Ok(Pulled::Jobs { jobs, etag }) => {
                    self.contact.success(Direction::Pull, self.services.clock.now());
                    self.counters.pulled(true);
                    let applied = self.apply(jobs, &mut state, &heartbeat).await?;
                    state.etag = if applied.retry { None } else { etag };
                }
                Err(e) => {
                    tracing::warn!(reason = e.reason(), error = %e, "pulling jobs from the control backend failed");
                    self.contact
                        .failure(Direction::Pull, e.reason(), format!("pull: {e}"));
                }
            }
            let wait = if failed {
                // Drawn from the upper half, so a fleet that lost its
                // backend together does not return to it together.
                let wait = retry.min(self.interval);
                retry = (retry * 2).min(MAX_RETRY);
                wait / 2 + (wait / 2).mul_f64(rand::random::<f64>())
            } else {
                retry = Duration::from_secs(1);
                self.interval
            };
            if !heartbeat
                .idle(wait, Some(self.contact.recovered()), &shutdown)
                .await
            {
                return Ok(());
            }
        }
    }

    /// Reconciles the backend-owned jobs with `items`: deletes first (they
    /// free quota), then each item decoded, validated and written in
    /// chunks of `CHUNK`, so at most a chunk of definitions is held
    /// besides the list's raw text.
    pub async fn apply(
        &self,
        items: Vec<Box<RawValue>>,
        state: &mut PullState,
        heartbeat: &Heartbeat,
    ) -> Result<Applied, StoreError> {
        let now = self.services.clock.now();
        let existing: HashMap<String, Arc<Job>> = self
            .services
            .store
            .jobs()
            .load_all()
            .await?
            .into_iter()
            .map(|j| (j.name().to_owned(), j))
            .collect();
        let mut applied = Applied::default();
        // The names the list holds: what is not among them is deleted.
        let mut names = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            if index % ITEMS_PER_BEAT == ITEMS_PER_BEAT - 1 {
                heartbeat.beat();
                tokio::task::yield_now().await;
            }
            names.push(item_name(item));
        }
        {
            let listed: HashSet<&str> = names.iter().flatten().map(String::as_str).collect();
            let unlisted: Vec<&Arc<Job>> = existing
                .values()
                .filter(|j| j.source == Source::Backend && !listed.contains(j.name()))
                .collect();
            self.delete(&unlisted, now, &mut applied, heartbeat).await?;
        }
        let room = self
            .max_jobs
            .map(|max| max.saturating_sub(existing.len() as u64 - applied.deleted));
        let listed = Listed {
            items,
            names,
            existing: &existing,
            room,
        };
        let rejections = self.write_listed(listed, now, &mut applied, heartbeat).await?;
        applied.rejected = rejections.total;
        self.report(rejections, state, now).await?;
        self.counters.applied("created", applied.created);
        self.counters.applied("updated", applied.updated);
        self.counters.applied("deleted", applied.deleted);
        if applied.created + applied.updated + applied.deleted + applied.rejected > 0 {
            tracing::info!(
                created = applied.created,
                updated = applied.updated,
                deleted = applied.deleted,
                rejected = applied.rejected,
                "backend jobs reconciled"
            );
        }
        Ok(applied)
    }

    /// Deletes the backend's jobs its list no longer holds.
    async fn delete(
        &self,
        unlisted: &[&Arc<Job>],
        now: DateTime<Utc>,
        applied: &mut Applied,
        heartbeat: &Heartbeat,
    ) -> Result<(), StoreError> {
        for chunk in unlisted.chunks(CHUNK) {
            let acks: Vec<_> = chunk
                .iter()
                .map(|j| self.services.store.jobs().delete(j.id, now))
                .collect();
            for (job, result) in chunk.iter().zip(futures_util::future::join_all(acks).await) {
                match result {
                    Ok(()) => {
                        applied.deleted += 1;
                        tracing::info!(job = %job.id, name = %job.name(), "backend job deleted");
                    }
                    Err(StoreError::Conflict(Conflict::NotFound)) => {}
                    Err(e) => return Err(e),
                }
            }
            heartbeat.beat();
        }
        Ok(())
    }

    /// Creates or replaces every listed job that changed, in chunks that
    /// share group commits; returns what it rejected.
    async fn write_listed(
        &self,
        listed: Listed<'_>,
        now: DateTime<Utc>,
        applied: &mut Applied,
        heartbeat: &Heartbeat,
    ) -> Result<Rejections, StoreError> {
        let Listed {
            items,
            names,
            existing,
            mut room,
        } = listed;
        let mut rejections = Rejections::new();
        let mut named: HashSet<String> = HashSet::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        for (index, (item, name)) in items.into_iter().zip(names).enumerate() {
            if index % ITEMS_PER_BEAT == ITEMS_PER_BEAT - 1 {
                heartbeat.beat();
                tokio::task::yield_now().await;
            }
            let label = name
                .clone()
                .filter(|n| check_name(n).is_ok())
                .unwrap_or_else(|| format!("#{index}"));
            match self.plan_item(&item, name, existing, &mut named, now) {
                Ok(None) => {}
                Ok(Some(write)) => {
                    if let (Write::Create(_), Some(room)) = (&write, &mut room) {
                        if *room == 0 {
                            let full = FieldError::new(
                                "",
                                "this server holds its maximum number of jobs (--max-jobs)",
                            );
                            rejections.push(label, &item, vec![full]);
                            continue;
                        }
                        *room -= 1;
                    }
                    chunk.push((label, item, write));
                    if chunk.len() == CHUNK {
                        self.write_chunk(std::mem::take(&mut chunk), applied, &mut rejections)
                            .await?;
                        heartbeat.beat();
                    }
                }
                Err(errors) => rejections.push(label, &item, errors),
            }
        }
        self.write_chunk(chunk, applied, &mut rejections).await?;
        Ok(rejections)
    }

    /// Logs and queues the rejections for the backend, once per distinct
    /// set: an unchanged list rejected again is not reported again.
    async fn report(
        &self,
        rejections: Rejections,
        state: &mut PullState,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let digest: [u8; 32] = sha2::Digest::finalize(rejections.digest).into();
        if rejections.total > 0 && state.reported != Some(digest) {
            for (label, errors) in &rejections.detailed {
                tracing::warn!(job = %label, errors = ?errors, "backend job rejected");
            }
            if rejections.total > rejections.detailed.len() as u64 {
                tracing::warn!(
                    total = rejections.total,
                    detailed = rejections.detailed.len(),
                    by_reason = ?rejections.by_reason,
                    "backend jobs rejected (the rest are counted in the report's summary)"
                );
            }
            self.counters.rejected(rejections.total);
            let summary = RejectionSummary {
                rejected_at: now,
                total: rejections.total,
                detailed: rejections.detailed.len() as u64,
                by_reason: rejections.by_reason,
            };
            let detailed = rejections
                .detailed
                .into_iter()
                .map(|(job, errors)| Rejection {
                    job,
                    rejected_at: now,
                    errors,
                })
                .collect();
            self.services
                .store
                .outbox()
                .record_rejections(detailed, summary)
                .await?;
        }
        state.reported = (rejections.total > 0).then_some(digest);
        Ok(())
    }

    /// What to write for one item: nothing (unchanged), a create or a
    /// replace, or why it is rejected.
    fn plan_item(
        &self,
        item: &RawValue,
        name: Option<String>,
        existing: &HashMap<String, Arc<Job>>,
        named: &mut HashSet<String>,
        now: DateTime<Utc>,
    ) -> Result<Option<Write>, Vec<FieldError>> {
        if let Some(name) = name
            && !named.insert(name)
        {
            return Err(vec![FieldError::new(
                "/name",
                "another job in the list has this name; the first one applies",
            )]);
        }
        let spec: JobSpec = match decode_json(item.get().as_bytes()) {
            Ok(spec) => spec,
            Err(DecodeError::Invalid(errors)) => return Err(errors.0),
            Err(DecodeError::Malformed(text)) => return Err(vec![FieldError::new("", text)]),
        };
        let current = existing.get(&spec.name);
        if current.is_some_and(|j| j.source == Source::Api) {
            return Err(vec![FieldError::new(
                "/name",
                "a job created through the local API has this name; the backend never changes local jobs",
            )]);
        }
        if current.is_some_and(|j| j.def.spec == spec) {
            return Ok(None);
        }
        let schedule_changed = current.is_none_or(|j| j.def.spec.schedule != spec.schedule);
        let paused = spec.paused;
        let def = spec.validate(&self.actions).map_err(|errors| errors.0)?;
        if schedule_changed && def.schedule.next_after(now).is_none() {
            return Err(vec![FieldError::new(
                "/schedule",
                "the schedule has no fire after now (`at` or `end` is in the past)",
            )]);
        }
        Ok(Some(match current {
            None => Write::Create(NewJob {
                id: JobId::new(),
                def,
                paused: paused.unwrap_or(false),
                source: Source::Backend,
                now,
            }),
            Some(job) => Write::Replace(Replacement {
                id: job.id,
                expected_version: Some(job.version),
                def,
                paused,
                now,
            }),
        }))
    }

    /// Issues a chunk of writes at once (they share group commits).
    async fn write_chunk(
        &self,
        chunk: Vec<(String, Box<RawValue>, Write)>,
        applied: &mut Applied,
        rejections: &mut Rejections,
    ) -> Result<(), StoreError> {
        let mut acks = Vec::with_capacity(chunk.len());
        let mut meta = Vec::with_capacity(chunk.len());
        for (label, item, write) in chunk {
            let created = matches!(write, Write::Create(_));
            acks.push(match write {
                Write::Create(job) => self.services.store.jobs().create(job),
                Write::Replace(r) => self.services.store.jobs().replace(r),
            });
            meta.push((label, item, created));
        }
        for ((label, item, created), result) in
            meta.into_iter().zip(futures_util::future::join_all(acks).await)
        {
            match result {
                Ok(job) if created => {
                    applied.created += 1;
                    tracing::info!(job = %job.id, name = %job.name(), "backend job created");
                }
                Ok(job) => {
                    applied.updated += 1;
                    tracing::info!(job = %job.id, name = %job.name(), version = job.version, "backend job updated");
                }
                // A local job took the name since the list was read.
                Err(StoreError::Conflict(Conflict::NameTaken(_))) => rejections.push(
                    label,
                    &item,
                    vec![FieldError::new(
                        "/name",
                        "a job created through the local API has this name",
                    )],
                ),
                // Changed or deleted through the API meanwhile.
                Err(StoreError::Conflict(Conflict::VersionMismatch { .. } | Conflict::NotFound)) => {
                    applied.retry = true;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Loop for Puller {
    fn name(&self) -> &'static str {
        "backend_sync"
    }

    /// A call may take up to the backend timeout between two beats.
    fn slack(&self) -> Duration {
        self.client.timeout()
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(self.run(cx.stop, cx.beat, cx.faults))
    }
}
