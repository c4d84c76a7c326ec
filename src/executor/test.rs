//! Runs the `test` action kind (fault-injection builds only).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Occurrence;
use crate::action::test::TestActionSpec;
use crate::clock::SharedClock;
use crate::run::{Outcome, RunStatus};

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
        if spec.ignore_cancel {
            clock.sleep(d).await;
        } else {
            tokio::select! {
                () = clock.sleep(d) => {}
                () = cancel.cancelled() => return Outcome {
                    status: RunStatus::Cancelled,
                    attempts: occurrence.attempt,
                    ..Outcome::failed("cancelled")
                },
            }
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
