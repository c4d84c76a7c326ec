//! The `test` action kind (fault-injection builds only; see `fault`).

use serde::{Deserialize, Serialize};

/// `kind: test` action.
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
    /// Ignore cancellation while sleeping (a stuck task).
    #[serde(default)]
    pub ignore_cancel: bool,
    /// The attempt timeout the supervisor assumes (not enforced by
    /// the test action itself, which is what makes it "stuck").
    #[serde(default)]
    pub timeout: Option<String>,
}
