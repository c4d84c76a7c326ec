//! Fault injection, compiled only with the `fault-injection` feature.
//!
//! Tests use it to prove that failures are detected: an action that sleeps,
//! fails or panics on demand, and (see `supervisor`) internal loops made to
//! hang or panic. Release builds do not contain this module.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::executor::Occurrence;
use crate::run::{Outcome, RunStatus};

/// `kind: test` action (fault-injection builds only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestActionSpec {
    /// Sleep this long on the service's clock (`2500ms`).
    #[serde(default)]
    pub sleep: Option<String>,
    /// Fail attempts up to this number, succeed after.
    #[serde(default)]
    pub fail_attempts: u32,
    /// Panic with this message.
    #[serde(default)]
    pub panic: Option<String>,
}

/// Runs the test action.
pub async fn execute_test_action(
    spec: &TestActionSpec,
    occurrence: &Occurrence,
    clock: &SharedClock,
    cancel: &CancellationToken,
) -> Outcome {
    if let Some(message) = &spec.panic {
        panic!("{message}");
    }
    if let Some(sleep) = &spec.sleep {
        let d = humantime::parse_duration(sleep).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = clock.sleep(d) => {}
            () = cancel.cancelled() => return Outcome {
                status: RunStatus::Cancelled,
                attempts: occurrence.attempt,
                ..Outcome::failed("cancelled")
            },
        }
    }
    if occurrence.attempt <= spec.fail_attempts {
        return Outcome {
            attempts: occurrence.attempt,
            ..Outcome::failed(format!("test failure on attempt {}", occurrence.attempt))
        };
    }
    Outcome {
        status: RunStatus::Succeeded,
        error: None,
        attempts: occurrence.attempt,
        ..Outcome::failed("")
    }
}
