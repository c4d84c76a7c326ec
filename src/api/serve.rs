//! The API runs on a runtime of its own, whose threads run at a lower
//! scheduling priority than the engine's, the supervisor's and the store
//! writer's: a flood of API requests (or slow clients holding connections)
//! must never make a fire late. The kernel shares the cores by weight, so
//! while the engine has work it gets most of the CPU; when it is idle the
//! API has all of it.

use std::io;

use axum::Router;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Worker threads of the API runtime.
pub const API_THREADS: usize = 2;

/// Nice value added to the API's threads (Linux schedules threads by their
/// own nice value): at +10 a busy API thread weighs about a tenth of a
/// firing one. +19 measured no better under a flood (within the run-to-run
/// spread) and let any other busy process on the host starve the API.
pub const API_NICENESS: i32 = 10;

/// Longest the server waits, once told to stop, for the requests in flight
/// to finish: a client that keeps a request open (a stalled body, a slow
/// reader) must not hold the process's exit.
pub const API_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The HTTP server on its own runtime.
pub struct ApiServer {
    runtime: Option<Runtime>,
    task: JoinHandle<io::Result<()>>,
}

/// Serves `router` on `listener` until `stop` is cancelled (then finishes
/// the requests in flight, for at most [`API_DRAIN`]).
pub fn spawn(
    listener: std::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> io::Result<ApiServer> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(API_THREADS)
        .thread_name("cronguard-api")
        .on_thread_start(lower_priority)
        .enable_all()
        .build()?;
    let task = runtime.spawn(async move {
        let listener = super::malformed::ProblemListener(tokio::net::TcpListener::from_std(listener)?);
        let serving = axum::serve(listener, router).with_graceful_shutdown(stop.clone().cancelled_owned());
        tokio::select! {
            served = serving => served,
            () = async {
                stop.cancelled().await;
                tokio::time::sleep(API_DRAIN).await;
            } => {
                tracing::warn!(after = ?API_DRAIN, "requests still in flight at shutdown were cut off");
                Ok(())
            }
        }
    });
    Ok(ApiServer {
        runtime: Some(runtime),
        task,
    })
}

impl ApiServer {
    /// Waits until the server has stopped; then ends its runtime.
    pub async fn wait(mut self) -> io::Result<()> {
        let result = match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(io::Error::other(e)),
        };
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        result
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed on an async
        // thread; ending it in the background is.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn lower_priority() {
    let thread = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(thread)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(thread), current + API_NICENESS) {
        tracing::debug!(error = %e, "could not lower the API thread's priority");
    }
}
