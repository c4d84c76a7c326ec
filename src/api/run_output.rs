//! `GET /v1/runs/{run}/output`: a run's output as Server-Sent Events —
//! live while a command runs here, then its end; the stored tails of a
//! run that ended.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as Sse, KeepAlive};
use futures_util::{Stream, StreamExt, stream};
use tokio::sync::{broadcast, mpsc};

use super::ApiContext;
use super::error::{ApiError, Problem};
use super::extract::PathParam;
use super::runs::{find_run, run_id};
use crate::executor::live::Following;
use crate::run::{Run, RunId};

/// How often a run that is not (yet) followable here is looked at again.
const POLL: Duration = Duration::from_millis(250);

/// Follow a run's output.
#[utoipa::path(get, path = "/v1/runs/{run}/output", tag = "runs",
    params(("run" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "A `text/event-stream`. `stdout` and `stderr` events carry output text in the order it \
            was written to each pipe: first what was kept so far, then each piece as the running command writes it. One \
            `end` event (`data`: the final Run) closes the stream. A finished run sends its stored tails and `end` at once. \
            `lagged` says this follower fell behind and missed output (the stored tails in `end` are whole).",
            body = Run, content_type = "text/event-stream"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn run_output(
    State(ctx): State<Arc<ApiContext>>,
    PathParam(id): PathParam,
) -> Result<axum::response::Sse<impl Stream<Item = Result<Sse, Infallible>>>, ApiError> {
    let id = run_id(&id)?;
    let run = find_run(&ctx, id).await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(follow(ctx, id, run, tx));
    let events = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    Ok(axum::response::Sse::new(events.map(Ok)).keep_alive(KeepAlive::default()))
}

fn piece(pipe: &str, text: &str) -> Sse {
    Sse::default().event(pipe).data(text)
}

fn end(run: &Run) -> Sse {
    Sse::default()
        .event("end")
        .data(serde_json::to_string(run).unwrap_or_default())
}

/// Sends `run`'s output to `tx` until the run ends, the client goes or the
/// server stops.
async fn follow(ctx: Arc<ApiContext>, id: RunId, mut run: Run, tx: mpsc::Sender<Sse>) {
    let stop = ctx.feed.stop.clone();
    let work = async {
        loop {
            if run.status.is_final() {
                for (pipe, text) in [("stdout", &run.output), ("stderr", &run.stderr)] {
                    if let Some(text) = text {
                        tx.send(piece(pipe, text)).await.ok()?;
                    }
                }
                tx.send(end(&run)).await.ok()?;
                return Some(());
            }
            if let Some(following) = ctx.live.follow(id) {
                relay(following, &tx).await?;
                // The pipes are done; the end is committed right after.
                run = final_run(&ctx, id).await?;
                tx.send(end(&run)).await.ok()?;
                return Some(());
            }
            tokio::time::sleep(POLL).await;
            run = ctx.services.store.runs().get(id).await.ok()??;
        }
    };
    tokio::select! {
        _ = work => {}
        () = stop.cancelled() => {}
        () = tx.closed() => {}
    }
}

/// Sends what was kept so far, then every piece, until the pipes close.
async fn relay(mut f: Following, tx: &mpsc::Sender<Sse>) -> Option<()> {
    for (pipe, text) in [("stdout", &f.stdout), ("stderr", &f.stderr)] {
        if !text.is_empty() {
            tx.send(piece(pipe, text)).await.ok()?;
        }
    }
    loop {
        match f.chunks.recv().await {
            Ok(chunk) => tx.send(piece(chunk.pipe.as_str(), &chunk.text)).await.ok()?,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let told = Sse::default()
                    .event("lagged")
                    .data(format!("{n} pieces of output were skipped"));
                tx.send(told).await.ok()?;
            }
            Err(broadcast::error::RecvError::Closed) => return Some(()),
        }
    }
}

/// The run once its final state is committed.
async fn final_run(ctx: &ApiContext, id: RunId) -> Option<Run> {
    loop {
        let run = ctx.services.store.runs().get(id).await.ok()??;
        if run.status.is_final() {
            return Some(run);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
