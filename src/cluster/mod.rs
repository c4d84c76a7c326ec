//! Replicas: several cronguard processes on one PostgreSQL database.
//!
//! PostgreSQL is the coordinator; there is no consensus of our own
//! (`docs/scaling.md`, `docs/decisions.md`):
//! - **Membership.** Each replica renews a lease on its incarnation row
//!   ([`lease`]); the live set is the rows with a fresh heartbeat that are
//!   not stopped. A replica that stops renewing is declared stopped by the
//!   leader (the live replica with the smallest id), which orphans its live
//!   runs (kind *previous incarnation*).
//! - **Ownership.** Every job belongs to one live replica by rendezvous
//!   hashing of (job, replica): when the live set changes only the jobs of
//!   the replica that came or went move. Each engine schedules only its own
//!   jobs; a job it gains is planned from its stored cursor, so fires missed
//!   during a takeover run late by the job's catch-up policy.
//! - **Claims.** Ownership is a plan, not the guarantee: around a change
//!   two replicas may both plan a fire. The run row is the claim (unique
//!   `(job, scheduled_at)`, inserted with `ON CONFLICT DO NOTHING` after
//!   locking the job's row), so exactly one replica starts it; the claim
//!   also checks the job's live runs on other replicas (the overlap policy)
//!   and that the claimer was not fenced.
//! - **Changes** travel by `NOTIFY` in the writer's commit ([`listen`]).
//!
//! On SQLite there is one instance: [`Membership::solo`] owns every job and
//! runs none of this.

pub mod lease;
pub mod listen;

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::job::JobId;
use crate::run::Incarnation;
use crate::store::Replica;

/// Default lease: a replica that has not renewed it for this long is
/// declared stopped and its jobs are taken over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// This process's place among the replicas.
#[derive(Debug)]
pub struct Membership {
    me: Incarnation,
    host: String,
    /// `None`: alone on the database (SQLite), owning every job.
    lease: Option<Duration>,
    state: RwLock<State>,
    /// The lease is current (renewed within the lease): fires may start.
    active: AtomicBool,
    /// Cancelled when this replica learns it was declared stopped.
    fenced: CancellationToken,
    /// Jobs its engine schedules (set by the engine).
    owned: AtomicUsize,
}

#[derive(Debug, Default, Clone)]
struct State {
    replicas: Vec<Replica>,
    /// Replicas that take jobs (live, not leaving), sorted.
    owners: Vec<Incarnation>,
    leaving: bool,
}

/// Who owns which job, as of one view of the live set.
#[derive(Debug, Clone)]
pub struct Ownership {
    me: Incarnation,
    /// `None`: this replica owns every job.
    owners: Option<Vec<Incarnation>>,
}

impl Ownership {
    /// Whether this replica schedules `job`.
    pub fn owns(&self, job: JobId) -> bool {
        match &self.owners {
            None => true,
            Some(owners) => owner(job, owners) == Some(self.me),
        }
    }

    /// The owner of `job` (`None` while nobody takes jobs).
    pub fn owner(&self, job: JobId) -> Option<Incarnation> {
        match &self.owners {
            None => Some(self.me),
            Some(owners) => owner(job, owners),
        }
    }
}

/// Rendezvous (highest random weight) hashing: the owner of a job is the
/// replica with the highest hash of (job, replica). A replica joining takes
/// about 1/n of every other's jobs; one leaving gives only its own away.
pub fn owner(job: JobId, owners: &[Incarnation]) -> Option<Incarnation> {
    owners.iter().copied().max_by_key(|replica| {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(job.0.as_bytes());
        key[16..].copy_from_slice(replica.0.as_bytes());
        (xxhash_rust::xxh3::xxh3_64(&key), *replica)
    })
}

/// One replica as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplicaView {
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i64,
    /// When it started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// It is shutting down and takes no jobs.
    pub leaving: bool,
    /// Runs it executes now.
    pub running: u64,
    /// This process.
    pub this: bool,
}

/// The replica set as `/v1/status` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReplicaSet {
    /// `false` on SQLite (one instance).
    pub clustered: bool,
    /// Seconds without a heartbeat after which a replica is declared stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<f64>,
    /// This replica's lease is current (it may start fires).
    pub active: bool,
    /// Jobs this replica schedules.
    pub owned_jobs: usize,
    /// The live replicas, by incarnation.
    pub replicas: Vec<ReplicaView>,
}

impl Membership {
    /// Alone on the database: owns every job, forever.
    pub fn solo(me: Incarnation) -> Self {
        Self::new(me, None)
    }

    /// One of the replicas on a shared database, with this lease.
    pub fn clustered(me: Incarnation, lease: Duration) -> Self {
        Self::new(me, Some(lease))
    }

    fn new(me: Incarnation, lease: Option<Duration>) -> Self {
        Self {
            me,
            host: hostname(),
            lease,
            state: RwLock::new(State::default()),
            active: AtomicBool::new(lease.is_none()),
            fenced: CancellationToken::new(),
            owned: AtomicUsize::new(0),
        }
    }

    /// Jobs this replica's engine schedules now.
    pub fn owned_jobs(&self) -> usize {
        self.owned.load(Ordering::Relaxed)
    }

    /// Recorded by the engine whenever its job set changes.
    pub fn set_owned_jobs(&self, n: usize) {
        self.owned.store(n, Ordering::Relaxed);
    }

    /// This process's incarnation.
    pub fn me(&self) -> Incarnation {
        self.me
    }

    /// The host name recorded with the incarnation.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The lease, with replicas.
    pub fn lease(&self) -> Option<Duration> {
        self.lease
    }

    /// Whether fires may start here: always alone; with replicas, while the
    /// lease is current and the replica is not leaving.
    pub fn may_fire(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Cancelled once this replica was declared stopped by another.
    pub fn fenced(&self) -> &CancellationToken {
        &self.fenced
    }

    /// Who owns what now.
    pub fn ownership(&self) -> Ownership {
        if self.lease.is_none() {
            return Ownership {
                me: self.me,
                owners: None,
            };
        }
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let owners = if self.may_fire() && !state.leaving {
            state.owners.clone()
        } else {
            Vec::new()
        };
        Ownership {
            me: self.me,
            owners: Some(owners),
        }
    }

    /// The live replicas as last read.
    pub fn replicas(&self) -> Vec<Replica> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replicas
            .clone()
    }

    /// Records a new view of the live set; whether ownership changed.
    fn update(&self, replicas: Vec<Replica>, active: bool) -> bool {
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut owners: Vec<Incarnation> = replicas.iter().filter(|r| !r.leaving).map(|r| r.id).collect();
        owners.sort();
        let active = active && !state.leaving;
        let was_active = self.active.swap(active, Ordering::AcqRel);
        let changed = owners != state.owners || was_active != active;
        state.owners = owners;
        state.replicas = replicas;
        changed
    }

    /// This replica stops taking jobs (shutdown); the others take them at
    /// their next look at the live set.
    pub fn leave(&self) {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .leaving = true;
        if self.lease.is_some() {
            self.active.store(false, Ordering::Release);
        }
    }

    /// The leader does the housekeeping of the set (declaring expired
    /// replicas stopped): the live owner with the smallest id.
    fn leads(&self) -> bool {
        let state = self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.owners.first() == Some(&self.me) && !state.leaving
    }

    fn fence(&self) {
        self.active.store(false, Ordering::Release);
        self.fenced.cancel();
    }
}

/// This machine's name (recorded with the incarnation, shown in status).
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ids(n: usize) -> Vec<Incarnation> {
        let mut v: Vec<Incarnation> = (0..n).map(|_| Incarnation::new()).collect();
        v.sort();
        v
    }

    #[test]
    fn every_job_has_one_owner_and_shares_are_even() {
        let replicas = ids(3);
        let mut share: HashMap<Incarnation, usize> = HashMap::new();
        for _ in 0..30_000 {
            let job = JobId(uuid::Uuid::now_v7());
            *share.entry(owner(job, &replicas).unwrap()).or_default() += 1;
        }
        assert_eq!(share.len(), 3);
        for (_, n) in share {
            assert!((9_000..11_000).contains(&n), "uneven share: {n} of 30000");
        }
    }

    #[test]
    fn a_replica_leaving_moves_only_its_own_jobs() {
        let replicas = ids(3);
        let remaining: Vec<Incarnation> = replicas[..2].to_vec();
        for _ in 0..10_000 {
            let job = JobId(uuid::Uuid::now_v7());
            let before = owner(job, &replicas).unwrap();
            let after = owner(job, &remaining).unwrap();
            if before != replicas[2] {
                assert_eq!(before, after, "a job of a remaining replica moved");
            }
        }
    }

    #[test]
    fn alone_owns_everything_and_nobody_owns_nothing() {
        let me = Incarnation::new();
        let solo = Membership::solo(me);
        assert!(solo.ownership().owns(JobId(uuid::Uuid::now_v7())));
        let clustered = Membership::clustered(me, DEFAULT_LEASE);
        // Before its first heartbeat a replica owns nothing.
        assert!(!clustered.ownership().owns(JobId(uuid::Uuid::now_v7())));
        assert_eq!(owner(JobId(uuid::Uuid::now_v7()), &[]), None);
    }
}
