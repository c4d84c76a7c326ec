//! What every loop and the API are built on.

use std::sync::Arc;

use crate::clock::SharedClock;
use crate::metrics::Metrics;
use crate::store::Store;

/// The services every part of the running service shares: the source of
/// truth, "now", and the registry every series is declared in. One value,
/// cloned into each part, so a part's own context lists only what is its
/// own.
#[derive(Clone)]
pub struct Services {
    /// The database: every definition and every run.
    pub store: Store,
    /// Wall-clock instants and sleeps (a manual clock in tests).
    pub clock: SharedClock,
    /// Every metric of the service.
    pub metrics: Arc<Metrics>,
}
