//! The engine as a supervised loop.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{Mutex, mpsc};

use super::{Engine, EngineContext};
use crate::loops::{Loop, LoopCx, LoopError};
use crate::store::JobChange;

/// Rebuilds an [`Engine`] from the store at every (re)start; the feed of
/// committed job changes outlives its incarnations.
pub struct EngineLoop {
    ctx: EngineContext,
    changes: Mutex<mpsc::UnboundedReceiver<JobChange>>,
}

impl EngineLoop {
    /// The engine over `changes`.
    pub fn new(ctx: EngineContext, changes: mpsc::UnboundedReceiver<JobChange>) -> Self {
        Self {
            ctx,
            changes: Mutex::new(changes),
        }
    }
}

impl Loop for EngineLoop {
    fn name(&self) -> &'static str {
        "engine"
    }

    fn start(self: Arc<Self>, cx: LoopCx) -> BoxFuture<'static, Result<(), LoopError>> {
        Box::pin(async move {
            let mut changes = self.changes.lock().await;
            let mut engine = Engine::new(self.ctx.clone(), cx.beat);
            Ok(engine.run(&mut changes, &cx.stop, &cx.faults).await?)
        })
    }
}
