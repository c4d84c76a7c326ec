//! Fault injection, for tests only.
//!
//! [`Faults`] exists in every build so loops can call
//! [`Faults::checkpoint`] unconditionally, but it only ever does anything
//! when the `fault-injection` feature is compiled in (tests and the test
//! binary; never release builds). With it, a test can make a named internal
//! loop hang or panic at its next checkpoint, and use a `test` action kind
//! (`action::test`, run by `executor::test`) that sleeps, fails or panics
//! on demand — so the suite proves that each failure is detected, not
//! merely assumed to be.

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use serde::Deserialize;

    /// What a loop does at its next checkpoint.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Fault {
        /// Stop forever (no heartbeat, no progress).
        Hang,
        /// Panic once.
        Panic,
    }

    /// Faults armed per loop name.
    #[derive(Debug, Default)]
    pub struct Faults {
        armed: Mutex<HashMap<String, Fault>>,
        /// Whether anything was ever armed: until then a checkpoint is one
        /// atomic load (benchmarks build the crate with these hooks).
        used: AtomicBool,
    }

    impl Faults {
        /// Nothing armed.
        pub fn new() -> Self {
            Self::default()
        }

        /// Arms `fault` for loop `name`.
        pub fn arm(&self, name: &str, fault: Fault) {
            self.used.store(true, Ordering::Release);
            self.armed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_owned(), fault);
        }

        /// Disarms every fault (a hung loop stays hung).
        pub fn clear(&self) {
            self.armed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }

        /// Hangs or panics if a fault is armed for `name`.
        pub async fn checkpoint(&self, name: &str) {
            if !self.used.load(Ordering::Acquire) {
                return;
            }
            let fault = {
                let mut armed = self
                    .armed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match armed.get(name).copied() {
                    Some(Fault::Panic) => armed.remove(name),
                    other => other,
                }
            };
            match fault {
                Some(Fault::Hang) => {
                    tracing::warn!(loop_name = name, "fault injection: loop hangs");
                    std::future::pending::<()>().await;
                }
                Some(Fault::Panic) => panic!("fault injection: {name} panics"),
                None => {}
            }
        }
    }
}

#[cfg(feature = "fault-injection")]
pub use enabled::*;

/// Without the feature: checkpoints are free and nothing can be armed.
#[cfg(not(feature = "fault-injection"))]
#[derive(Debug, Default)]
pub struct Faults;

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    /// Nothing can be armed in builds without fault injection.
    pub fn new() -> Self {
        Self
    }

    /// Does nothing in builds without fault injection.
    #[inline(always)]
    pub async fn checkpoint(&self, _name: &str) {}
}
