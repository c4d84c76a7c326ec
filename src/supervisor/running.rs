//! The run supervisor as a supervised loop.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::Mutex;

use super::Supervisor;
use crate::loops::{Loop, LoopCx, LoopError};

/// Its state and every run task survive a restart of its loop: an
/// incarnation only serves the queue of the one supervisor.
impl Loop for Mutex<Supervisor> {
    fn name(&self) -> &'static str {
        "supervisor"
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(async move {
            self.lock().await.serve(&cx.stop, &cx.beat, &cx.faults).await;
            Ok(())
        })
    }
}
