//! Signals → cancellation tokens.
//!
//! The first SIGTERM or SIGINT cancels `stop`: stop firing, stop accepting
//! requests, let running work finish within the grace period. A second
//! signal cancels `kill`: every run is killed now. Tokens are passed
//! explicitly to whatever must react; there is no global.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The two stages of shutdown.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Graceful stop requested.
    pub stop: CancellationToken,
    /// Immediate stop requested (second signal).
    pub kill: CancellationToken,
}

impl Shutdown {
    /// Fresh, untriggered tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for SIGTERM/SIGINT: the first cancels `stop`, the second
    /// `kill`. Returns after the second signal or once `kill` is cancelled.
    pub async fn watch_signals(self) -> std::io::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        for stage in [&self.stop, &self.kill] {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
                () = self.kill.cancelled() => return Ok(()),
            }
            stage.cancel();
        }
        Ok(())
    }
}
