//! The live event feed (`GET /v1/events`): job changes, run life, orphan
//! detections and backend contact changes, each with an id, in the order
//! the database committed them.
//!
//! The store's writer publishes the events of each batch after its commit
//! (one lock for the batch), so the feed's order is the commit order and no
//! event describes a change that was rolled back. Publishing never waits
//! for a subscriber: the [`Bus`] keeps the last [`WINDOW`] events for
//! `Last-Event-ID` resumption and hands each to a broadcast channel; a
//! subscriber that falls behind loses its place and is told (the API ends
//! its stream), it never slows the writer.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

use crate::job::JobId;
use crate::run::RunId;

/// Events kept for resumption with `Last-Event-ID`.
pub const WINDOW: usize = 10_000;
/// Events a subscriber may have waiting before it counts as behind.
pub const BROADCAST_CAPACITY: usize = 4096;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[schema(as = EventKind)]
pub enum Kind {
    /// A job was created.
    #[serde(rename = "job.created")]
    JobCreated,
    /// A job's definition was replaced.
    #[serde(rename = "job.updated")]
    JobUpdated,
    /// A job was deleted.
    #[serde(rename = "job.deleted")]
    JobDeleted,
    /// A job was paused (by a client, or by `auto_pause_after`).
    #[serde(rename = "job.paused")]
    JobPaused,
    /// A job was resumed.
    #[serde(rename = "job.resumed")]
    JobResumed,
    /// A job's health changed (`status`: the new health).
    #[serde(rename = "job.health")]
    JobHealth,
    /// A run was recorded waiting for a slot.
    #[serde(rename = "run.queued")]
    RunQueued,
    /// A run's action started.
    #[serde(rename = "run.started")]
    RunStarted,
    /// An attempt of a run ended and another follows (`status`: attempts so far).
    #[serde(rename = "run.attempt")]
    RunAttempt,
    /// A started run reached its final status (`status`).
    #[serde(rename = "run.finished")]
    RunFinished,
    /// A fire was recorded skipped.
    #[serde(rename = "run.skipped")]
    RunSkipped,
    /// A fire (or a range of fires) was recorded missed.
    #[serde(rename = "run.missed")]
    RunMissed,
    /// A run's owner vanished; it was marked orphaned.
    #[serde(rename = "run.orphaned")]
    RunOrphaned,
    /// Orphaned work was found (`status`: its kind; `detail`: the remedy).
    #[serde(rename = "orphan.detected")]
    OrphanDetected,
    /// Contact with the control backend changed (`status`: `ok` or
    /// `failing`; `detail`: the direction).
    #[serde(rename = "backend.contact")]
    BackendContact,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Self; 15] = [
        Self::JobCreated,
        Self::JobUpdated,
        Self::JobDeleted,
        Self::JobPaused,
        Self::JobResumed,
        Self::JobHealth,
        Self::RunQueued,
        Self::RunStarted,
        Self::RunAttempt,
        Self::RunFinished,
        Self::RunSkipped,
        Self::RunMissed,
        Self::RunOrphaned,
        Self::OrphanDetected,
        Self::BackendContact,
    ];

    /// The wire name (`run.finished`), also the SSE `event:` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobCreated => "job.created",
            Self::JobUpdated => "job.updated",
            Self::JobDeleted => "job.deleted",
            Self::JobPaused => "job.paused",
            Self::JobResumed => "job.resumed",
            Self::JobHealth => "job.health",
            Self::RunQueued => "run.queued",
            Self::RunStarted => "run.started",
            Self::RunAttempt => "run.attempt",
            Self::RunFinished => "run.finished",
            Self::RunSkipped => "run.skipped",
            Self::RunMissed => "run.missed",
            Self::RunOrphaned => "run.orphaned",
            Self::OrphanDetected => "orphan.detected",
            Self::BackendContact => "backend.contact",
        }
    }

    /// Whether `filter` selects this kind: its exact name, or its group
    /// (`run` selects every `run.*`).
    pub fn matches(self, filter: &str) -> bool {
        let name = self.as_str();
        name == filter || name.split('.').next() == Some(filter)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as subscribers receive it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// `<epoch>-<seq>`: increasing within one run of the service; send it
    /// back as `Last-Event-ID` to resume.
    pub id: String,
    /// What happened.
    pub kind: Kind,
    /// When (the instant the change was stamped with).
    pub at: DateTime<Utc>,
    /// The job concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// Its name, where the change knew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// The run concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// The new status or health, where there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// One line more (an error, a note, a direction).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The event as an SSE frame, written once for every subscriber.
    #[serde(skip)]
    frame: std::sync::OnceLock<bytes::Bytes>,
}

impl Event {
    /// An event of `kind` at `at`; the bus sets its id.
    pub fn new(kind: Kind, at: DateTime<Utc>) -> Self {
        Self {
            id: String::new(),
            kind,
            at,
            job_id: None,
            job_name: None,
            run_id: None,
            status: None,
            detail: None,
            frame: std::sync::OnceLock::new(),
        }
    }

    /// The SSE frame (`event:`, `id:`, `data:` JSON), written the first
    /// time a subscriber needs it (never on the writer's thread) and
    /// shared by every subscriber after.
    pub fn frame(&self) -> bytes::Bytes {
        self.frame
            .get_or_init(|| {
                let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned());
                // Compact JSON holds no raw newline: one `data:` line.
                bytes::Bytes::from(format!("event: {}\nid: {}\ndata: {json}\n\n", self.kind, self.id))
            })
            .clone()
    }

    /// About job `id`.
    #[must_use]
    pub fn job(mut self, id: JobId) -> Self {
        self.job_id = Some(id);
        self
    }

    /// Named `name`.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.job_name = Some(name.into());
        self
    }

    /// About run `id`.
    #[must_use]
    pub fn run(mut self, id: RunId) -> Self {
        self.run_id = Some(id);
        self
    }

    /// With the new status.
    #[must_use]
    pub fn status(mut self, status: impl Into<String>) -> Self {
        self.status = Some(status.into());
        self
    }

    /// With a detail line.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Why a subscriber's `Last-Event-ID` cannot be resumed from exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[schema(as = EventGap)]
pub struct Gap {
    /// The id the subscriber asked to resume after.
    pub last_event_id: String,
    /// `too_old` (events after it left the window), `restarted` (the id is
    /// from an earlier run of the service) or `unknown` (not an id).
    pub reason: String,
    /// The oldest event still kept (the stream resumes there).
    pub oldest_id: Option<String>,
}

/// A new subscription: the events after the asked-for id still kept, then
/// the live ones.
pub struct Subscription {
    /// Kept events after `Last-Event-ID` (all kept ones after a gap; none
    /// without an id).
    pub backlog: Vec<Arc<Event>>,
    /// Set when the stream cannot resume exactly where asked.
    pub gap: Option<Gap>,
    /// Every event published from now on.
    pub live: broadcast::Receiver<Arc<Event>>,
}

/// The feed: a bounded window and a broadcast channel.
pub struct Bus {
    epoch: String,
    window: Mutex<Window>,
    live: broadcast::Sender<Arc<Event>>,
}

struct Window {
    next: u64,
    kept: VecDeque<Arc<Event>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// A feed whose ids start with this process's start (milliseconds), so
    /// an id from an earlier run of the service is recognised.
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            epoch: Utc::now().timestamp_millis().to_string(),
            window: Mutex::new(Window {
                next: 1,
                kept: VecDeque::with_capacity(WINDOW),
            }),
            live,
        }
    }

    /// Publishes `events` in order, one id each.
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        for mut event in events {
            event.id = format!("{}-{}", self.epoch, w.next);
            w.next += 1;
            let event = Arc::new(event);
            if w.kept.len() == WINDOW {
                w.kept.pop_front();
            }
            w.kept.push_back(event.clone());
            // No subscriber is not an error.
            let _ = self.live.send(event);
        }
    }

    /// Subscribes, resuming after `last_event_id` when given.
    pub fn subscribe(&self, last_event_id: Option<&str>) -> Subscription {
        let w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the lock: nothing is published between the backlog and
        // the live receiver, so nothing is lost or repeated.
        let live = self.live.subscribe();
        let Some(asked) = last_event_id else {
            return Subscription {
                backlog: Vec::new(),
                gap: None,
                live,
            };
        };
        let oldest = w.kept.front().map(|e| e.id.clone());
        let seq = asked
            .split_once('-')
            .filter(|(epoch, _)| *epoch == self.epoch)
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        let first_kept = w.next - w.kept.len() as u64;
        let (skip, reason) = match seq {
            // Resume exactly: the next one is still kept (or not yet out).
            Some(seq) if seq + 1 >= first_kept && seq < w.next => {
                (usize::try_from(seq + 1 - first_kept).unwrap_or(0), None)
            }
            Some(seq) if seq >= w.next => (w.kept.len(), Some("unknown")),
            Some(_) => (0, Some("too_old")),
            None if asked
                .split_once('-')
                .is_some_and(|(e, s)| e != self.epoch && s.parse::<u64>().is_ok()) =>
            {
                (0, Some("restarted"))
            }
            None => (0, Some("unknown")),
        };
        Subscription {
            backlog: w.kept.iter().skip(skip).cloned().collect(),
            gap: reason.map(|reason| Gap {
                last_event_id: asked.to_owned(),
                reason: reason.to_owned(),
                oldest_id: oldest,
            }),
            live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(bus: &Bus, n: usize) {
        bus.publish((0..n).map(|_| Event::new(Kind::RunStarted, Utc::now())));
    }

    #[test]
    fn resumes_after_the_id_or_says_why_not() {
        let bus = Bus::new();
        publish(&bus, 5);
        let third = format!("{}-3", bus.epoch);
        let s = bus.subscribe(Some(&third));
        assert!(s.gap.is_none());
        let ids: Vec<&str> = s.backlog.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, [format!("{}-4", bus.epoch), format!("{}-5", bus.epoch)]);
        let last = format!("{}-5", bus.epoch);
        let s = bus.subscribe(Some(&last));
        assert!(s.gap.is_none() && s.backlog.is_empty());

        publish(&bus, WINDOW);
        let s = bus.subscribe(Some(&third));
        let gap = s.gap.unwrap();
        assert_eq!(gap.reason, "too_old");
        assert_eq!(s.backlog.len(), WINDOW);
        assert_eq!(gap.oldest_id.as_deref(), Some(s.backlog[0].id.as_str()));

        let s = bus.subscribe(Some("1-3"));
        assert_eq!(s.gap.unwrap().reason, "restarted");
        let s = bus.subscribe(Some("nonsense"));
        assert_eq!(s.gap.unwrap().reason, "unknown");
    }

    #[test]
    fn kinds_match_by_name_or_group() {
        assert!(Kind::RunFinished.matches("run"));
        assert!(Kind::RunFinished.matches("run.finished"));
        assert!(!Kind::RunFinished.matches("run.started"));
        assert!(!Kind::JobCreated.matches("run"));
    }
}
