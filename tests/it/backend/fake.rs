//! A fake control backend on loopback: serves a job list with an ETag,
//! records every uploaded batch, and misbehaves on demand (5xx, hanging
//! past the client timeout, closing connections, malformed bodies).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub const TOKEN: &str = "backend-secret-token";

/// How the backend behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Answers correctly.
    Ok = 0,
    /// 500 on every call.
    Fail = 1,
    /// Never answers (cronguard's timeout fires).
    Hang = 2,
    /// Accepts and closes connections without answering.
    Close = 3,
    /// Pulls work, uploads get 503 with `Retry-After` (1 unless set).
    RejectUploads = 4,
    /// Both endpoints answer 503 with `Retry-After` (1 unless set).
    Unavailable = 5,
}

#[derive(Default)]
struct Inner {
    version: u64,
    jobs: Vec<Value>,
    /// A raw body served instead of the job list.
    raw: Option<RawBody>,
    batches: Vec<Value>,
}

#[derive(Clone)]
enum RawBody {
    Bytes(&'static str),
    /// `n` MiB of `[` streamed without a Content-Length.
    Huge(usize),
}

pub struct Shared {
    mode: AtomicU8,
    inner: Mutex<Inner>,
    pub pulls: AtomicU64,
    pub not_modified: AtomicU64,
    pub hooks: AtomicU64,
    pub unauthorized: AtomicU64,
    uploaded: Notify,
    /// When each upload was attempted.
    pub upload_attempts: Mutex<Vec<std::time::Instant>>,
    /// The `Retry-After` value of 503 answers.
    retry_after: Mutex<String>,
}

pub struct FakeBackend {
    pub url: String,
    pub shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Drops connections at accept while the mode is `Close` (every response
/// says `Connection: close`, so no pooled connection outlives a request).
struct Flaky {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for Flaky {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            if let Ok((stream, addr)) = self.listener.accept().await {
                if self.shared.mode() == Mode::Close {
                    drop(stream);
                    continue;
                }
                return (stream, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl Shared {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Fail,
            2 => Mode::Hang,
            3 => Mode::Close,
            4 => Mode::RejectUploads,
            5 => Mode::Unavailable,
            _ => Mode::Ok,
        }
    }

    fn unavailable(&self) -> Response {
        let mut r = StatusCode::SERVICE_UNAVAILABLE.into_response();
        let value = self.retry_after.lock().unwrap().clone();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_str(&value).unwrap());
        r
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let ok = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        if !ok {
            self.unauthorized.fetch_add(1, Ordering::SeqCst);
        }
        ok
    }

    /// Misbehaviour common to both endpoints, if any.
    async fn misbehave(&self) -> Option<Response> {
        match self.mode() {
            Mode::Fail => Some(StatusCode::INTERNAL_SERVER_ERROR.into_response()),
            Mode::Unavailable => Some(self.unavailable()),
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                None
            }
            _ => None,
        }
    }
}

fn close(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn jobs(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    s.pulls.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = s.misbehave().await {
        return close(r);
    }
    if !s.authorized(&headers) {
        return close(StatusCode::UNAUTHORIZED.into_response());
    }
    let (etag, jobs, raw) = {
        let inner = s.inner.lock().unwrap();
        (
            format!("\"v{}\"", inner.version),
            inner.jobs.clone(),
            inner.raw.clone(),
        )
    };
    match raw {
        Some(RawBody::Bytes(text)) => return close((StatusCode::OK, text).into_response()),
        Some(RawBody::Huge(mib)) => {
            let chunk = Bytes::from(vec![b'['; 1024 * 1024]);
            let stream =
                futures_util::stream::iter((0..mib).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            return close(Response::new(Body::from_stream(stream)));
        }
        None => {}
    }
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
        s.not_modified.fetch_add(1, Ordering::SeqCst);
        return close(StatusCode::NOT_MODIFIED.into_response());
    }
    let mut response = axum::Json(json!({ "jobs": jobs })).into_response();
    response
        .headers_mut()
        .insert(header::ETAG, HeaderValue::from_str(&etag).unwrap());
    close(response)
}

async fn results(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    s.upload_attempts.lock().unwrap().push(std::time::Instant::now());
    if let Some(r) = s.misbehave().await {
        return close(r);
    }
    if s.mode() == Mode::RejectUploads {
        return close(s.unavailable());
    }
    if !s.authorized(&headers) {
        return close(StatusCode::UNAUTHORIZED.into_response());
    }
    let Ok(batch) = serde_json::from_slice::<Value>(&body) else {
        return close(StatusCode::BAD_REQUEST.into_response());
    };
    s.inner.lock().unwrap().batches.push(batch);
    s.uploaded.notify_waiters();
    close(StatusCode::OK.into_response())
}

async fn hook(State(s): State<Arc<Shared>>) -> StatusCode {
    s.hooks.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

impl FakeBackend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(Mode::Ok as u8),
            inner: Mutex::new(Inner::default()),
            pulls: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            hooks: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            uploaded: Notify::new(),
            upload_attempts: Mutex::new(Vec::new()),
            retry_after: Mutex::new("1".into()),
        });
        let router = axum::Router::new()
            .route("/api/v1/jobs", axum::routing::get(jobs))
            .route("/api/v1/results", axum::routing::post(results))
            .route("/hook", axum::routing::any(hook))
            .with_state(shared.clone());
        let flaky = Flaky {
            listener,
            shared: shared.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(flaky, router).await;
        });
        Self {
            url: format!("http://{addr}/api"),
            shared,
            task,
        }
    }

    /// URL a job's HTTP action can call (always answers 200).
    pub fn hook(&self) -> String {
        self.url.replace("/api", "/hook")
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The `Retry-After` of later 503 answers.
    pub fn set_retry_after(&self, value: &str) {
        *self.shared.retry_after.lock().unwrap() = value.to_owned();
    }

    /// Upload attempts so far.
    pub fn upload_attempts(&self) -> usize {
        self.shared.upload_attempts.lock().unwrap().len()
    }

    /// Every rejection summary received.
    pub fn rejection_summaries(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .flat_map(|b| b["rejection_summaries"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Replaces the job list (a new ETag).
    pub fn set_jobs(&self, jobs: Vec<Value>) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.version += 1;
        inner.jobs = jobs;
        inner.raw = None;
    }

    /// Serves `text` as the job list body.
    pub fn set_raw(&self, text: &'static str) {
        self.shared.inner.lock().unwrap().raw = Some(RawBody::Bytes(text));
    }

    /// Serves `mib` MiB of garbage, streamed without a length.
    pub fn set_huge(&self, mib: usize) {
        self.shared.inner.lock().unwrap().raw = Some(RawBody::Huge(mib));
    }

    pub fn pulls(&self) -> u64 {
        self.shared.pulls.load(Ordering::SeqCst)
    }

    pub fn not_modified(&self) -> u64 {
        self.shared.not_modified.load(Ordering::SeqCst)
    }

    /// Every batch received, in order.
    pub fn batches(&self) -> Vec<Value> {
        self.shared.inner.lock().unwrap().batches.clone()
    }

    /// Every result received, in order (duplicates included).
    pub fn results(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .flat_map(|b| b["results"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Every rejection received.
    pub fn rejections(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .flat_map(|b| b["rejections"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// How often each run id was received.
    pub fn deliveries(&self) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for r in self.results() {
            *seen
                .entry(r["run_id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        seen
    }
}
