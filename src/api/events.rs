//! `GET /v1/events`: the live feed as Server-Sent Events.
//!
//! Each subscriber gets a forwarder task that copies matching events from
//! the bus into a bounded queue of its own. The bus never waits for it;
//! when the queue is full (the client stopped reading, or reads too
//! slowly) the forwarder ends the subscription at once — its slot is free
//! again — and the stream ends with a `lagged` event once the client reads
//! what was queued. A client resumes with `Last-Event-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::{StreamExt, stream};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::ApiContext;
use super::error::{ApiError, Problem};
use super::extract::Params;
use super::jobs::find;
use crate::events::{Event, Gap, Kind};
use crate::job::JobId;
use crate::metrics::{Metrics, opts, reg};
use crate::store::JobKey;

/// Events joined into one write at most.
const BATCH: usize = 64;
/// Events queued for one subscriber before it counts as behind: more than
/// a second of 1,000 fires (each starts and ends), as pointers to the
/// shared events.
pub const QUEUE: usize = 4096;
/// A comment line after this long without an event (proxies keep the
/// connection).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The feed's subscribers: how many, at most how many, and when their
/// streams must end (shutdown).
#[derive(Debug)]
pub struct Feed {
    /// Most subscribers at once (`--events-max-subscribers`).
    pub max_subscribers: usize,
    /// Ends every stream (the server is stopping).
    pub stop: CancellationToken,
    current: AtomicUsize,
    subscribers: IntGauge,
    dropped: IntCounter,
}

impl Feed {
    /// The feed's state, its series declared in `metrics`.
    pub fn new(max_subscribers: usize, metrics: &Metrics) -> Self {
        let m = metrics.registry();
        Self {
            max_subscribers,
            stop: CancellationToken::new(),
            current: AtomicUsize::new(0),
            subscribers: reg(
                m,
                IntGauge::with_opts(opts(
                    "events_subscribers",
                    "Clients subscribed to GET /v1/events now.",
                )),
            ),
            dropped: reg(
                m,
                IntCounter::with_opts(opts(
                    "events_subscribers_dropped_total",
                    "Subscribers to GET /v1/events disconnected because they fell behind.",
                )),
            ),
        }
    }

    fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_subscribers).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| {
            self.subscribers.inc();
            Slot(self.clone())
        })
    }
}

/// One subscriber's place, given back when its forwarder ends.
struct Slot(Arc<Feed>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::AcqRel);
        self.0.subscribers.dec();
    }
}

/// Which events a subscriber wants.
#[derive(Clone)]
struct Filter {
    jobs: Vec<JobId>,
    kinds: Vec<String>,
}

impl Filter {
    fn wants(&self, e: &Event) -> bool {
        (self.jobs.is_empty() || e.job_id.is_some_and(|j| self.jobs.contains(&j)))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| e.kind.matches(k)))
    }
}

async fn filter(ctx: &ApiContext, params: &Params) -> Result<Filter, ApiError> {
    let mut kinds = Vec::new();
    for item in params.all("kind").flat_map(|v| v.split(',')) {
        if !Kind::ALL.iter().any(|k| k.matches(item)) {
            return Err(ApiError::BadQuery {
                name: "kind".into(),
                detail: format!(
                    "`{item}` is neither an event kind (`run.finished`, …) nor a group (`job`, `run`, `orphan`, `backend`)"
                ),
            });
        }
        kinds.push(item.to_owned());
    }
    let mut jobs = Vec::new();
    for item in params.all("job").flat_map(|v| v.split(',')) {
        if item.is_empty() {
            return Err(ApiError::BadQuery {
                name: "job".into(),
                detail: "an empty job; expected a job id or name".into(),
            });
        }
        jobs.push(match JobKey::parse(item) {
            // A deleted job's id still filters its last events.
            JobKey::Id(id) => id,
            JobKey::Name(_) => find(ctx, item).await?.id,
        });
    }
    Ok(Filter { jobs, kinds })
}

/// Stream job, run, orphan and backend-contact events as they commit.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(
        ("kind" = Option<Vec<String>>, Query, description = "Only these kinds (`run.finished`) or groups (`run`), comma-separated or repeated"),
        ("job" = Option<Vec<String>>, Query, description = "Only these jobs (id or name), comma-separated or repeated"),
        ("last_event_id" = Option<String>, Query, description = "Resume after this event id (as the `Last-Event-ID` header, for clients that cannot set it)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "A `text/event-stream`: each event's `event:` is its kind, `id:` its id, `data:` an Event. \
            A `gap` event first says the stream could not resume exactly (`data`: a Gap); a `lagged` event last says the \
            subscriber fell behind and was disconnected.", body = Event, content_type = "text/event-stream"),
        (status = 400, description = "Invalid query", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many subscribers", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn events(
    State(ctx): State<Arc<ApiContext>>,
    headers: HeaderMap,
    params: Params,
) -> Result<Response, ApiError> {
    params.only(&["kind", "job", "last_event_id"])?;
    let filter = filter(&ctx, &params).await?;
    let from_header = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let last = match (from_header, params.one::<String>("last_event_id")?) {
        (Some(h), _) => Some(h.to_owned()),
        (None, q) => q,
    };
    let slot = ctx.feed.acquire().ok_or(ApiError::TooManySubscribers {
        limit: ctx.feed.max_subscribers,
    })?;
    let sub = ctx.services.store.events().subscribe(last.as_deref());
    let (tx, rx) = mpsc::channel(QUEUE);
    let lagged = Arc::new(AtomicBool::new(false));
    tokio::spawn(forward(
        sub.live,
        filter.clone(),
        tx,
        lagged.clone(),
        slot,
        ctx.feed.stop.clone(),
    ));
    let mut first: Vec<Bytes> = sub.gap.iter().map(gap).collect();
    first.extend(sub.backlog.iter().filter(|e| filter.wants(e)).map(|e| e.frame()));
    // Frames are written once per event and shared by every subscriber:
    // the body is a stream of those bytes, with a comment line when
    // nothing happened for a while.
    let live = stream::unfold((rx, lagged, false), |(mut rx, lagged, ended)| async move {
        if ended {
            return None;
        }
        match tokio::time::timeout(KEEP_ALIVE, next_write(&mut rx)).await {
            Err(_) => Some((Bytes::from_static(b":\n\n"), (rx, lagged, false))),
            Ok(Some(frames)) => Some((frames, (rx, lagged, false))),
            Ok(None) if lagged.load(Ordering::Acquire) => Some((
                Bytes::from_static(
                    b"event: lagged\ndata: this subscriber fell behind and was disconnected; reconnect with Last-Event-ID\n\n",
                ),
                (rx, lagged, true),
            )),
            Ok(None) => None,
        }
    });
    let body = Body::from_stream(stream::iter(first).chain(live).map(Ok::<_, Infallible>));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// Copies matching live events into the subscriber's queue until the
/// client goes, the server stops, or the queue is full (then `lagged`).
async fn forward(
    mut live: broadcast::Receiver<Arc<Event>>,
    filter: Filter,
    tx: mpsc::Sender<Arc<Event>>,
    lagged: Arc<AtomicBool>,
    slot: Slot,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            () = tx.closed() => break,
            () = stop.cancelled() => break,
            r = live.recv() => r,
        };
        let event = match received {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                lagged.store(true, Ordering::Release);
                break;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if filter.wants(&event) && tx.try_send(event).is_err() {
            // Full: the client reads slower than events come.
            lagged.store(true, Ordering::Release);
            break;
        }
    }
    if lagged.load(Ordering::Acquire) {
        slot.0.dropped.inc();
        tracing::info!("an event subscriber fell behind and was disconnected");
    }
}

/// The frames of the next event and of those already waiting behind it
/// (at most [`BATCH`]), joined into one write.
async fn next_write(rx: &mut mpsc::Receiver<Arc<Event>>) -> Option<Bytes> {
    let first = rx.recv().await?;
    let mut write = BytesMut::from(&first.frame()[..]);
    for _ in 1..BATCH {
        match rx.try_recv() {
            Ok(e) => write.extend_from_slice(&e.frame()),
            Err(_) => break,
        }
    }
    Some(write.freeze())
}

fn gap(g: &Gap) -> Bytes {
    let json = serde_json::to_string(g).unwrap_or_default();
    Bytes::from(format!("event: gap\ndata: {json}\n\n"))
}
