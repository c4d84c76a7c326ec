//! What a job does when it fires: an HTTP call or a child process.
//!
//! [`ActionSpec`] is the wire form; [`Action`] the validated one the
//! executor runs. Limits are constants here and listed in the README.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::validation::{FieldErrors, parse_duration};

mod address;
mod command;
mod http;
mod hygiene;
#[cfg(feature = "fault-injection")]
pub mod test;

pub use address::{block_of, embedded_ipv4, is_public};
pub use command::{CommandAction, CommandSpec};
pub use http::{HttpAction, HttpSpec, StatusSet};
pub use hygiene::{FORBIDDEN_ENV, FORBIDDEN_HEADERS, forbidden_env, forbidden_header};

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Most headers on one HTTP action.
pub const MAX_HEADERS: usize = 64;
/// Largest HTTP request body an action may send.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most arguments to a command.
pub const MAX_ARGS: usize = 256;
/// Most environment variables set on a command.
pub const MAX_ENV: usize = 128;
/// Longest single argument, environment value, program or path.
pub const MAX_ARG_LEN: usize = 8192;
/// Longest timeout an action may have.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default timeout of an HTTP action.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of a command action.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(3600);

/// An action as clients write it; `kind` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ActionSpec {
    /// Call a URL.
    Http(HttpSpec),
    /// Run a program (only when the operator enabled command jobs).
    Command(CommandSpec),
    /// Test-only action that sleeps, fails or panics on demand.
    #[cfg(feature = "fault-injection")]
    Test(test::TestActionSpec),
}

/// The published schema of [`ActionSpec`]: the same wire form without the
/// test-only kind, so the OpenAPI document is identical in every build.
#[derive(ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[schema(as = ActionSpec)]
pub enum ActionSchema {
    /// Call a URL.
    Http(HttpSpec),
    /// Run a program (only when the operator enabled command jobs).
    Command(CommandSpec),
}

/// A validated action.
#[derive(Debug, Clone)]
pub enum Action {
    /// See [`HttpAction`].
    Http(HttpAction),
    /// See [`CommandAction`].
    Command(CommandAction),
    /// Test-only action.
    #[cfg(feature = "fault-injection")]
    Test(test::TestActionSpec),
}

/// What the operator allows actions to do.
#[derive(Debug, Clone, Default)]
pub struct ActionPolicy {
    /// Whether `command` actions may be created and run.
    pub commands_enabled: bool,
    /// Programs commands may run (exact match); empty: any.
    pub command_allowlist: Vec<String>,
    /// Refuse HTTP actions to non-public addresses (SSRF guard).
    pub deny_private_networks: bool,
    /// Re-validating a stored definition: the rules added after it may
    /// have been stored (userinfo in URLs, forbidden headers and
    /// variables) are left to the executor, which fails its runs with the
    /// reason, so an upgrade never refuses to load a job.
    pub loading: bool,
}

impl ActionPolicy {
    /// Whether `program` may run under the allowlist.
    pub fn program_allowed(&self, program: &str) -> bool {
        self.command_allowlist.is_empty() || self.command_allowlist.iter().any(|p| p == program)
    }
}

impl ActionSpec {
    /// Validates the action; errors point below `pointer` (`/action`).
    pub fn parse(&self, policy: &ActionPolicy, pointer: &str) -> Result<Action, FieldErrors> {
        match self {
            Self::Http(spec) => spec.parse(policy, pointer).map(Action::Http),
            Self::Command(spec) => {
                let action = spec.parse(policy, pointer);
                if !policy.commands_enabled {
                    let mut errors = action.err().unwrap_or_default();
                    errors.0.insert(
                        0,
                        crate::validation::FieldError::new(
                            format!("{pointer}/kind"),
                            "command actions are disabled on this server; the operator enables \
                             them with --enable-command-jobs",
                        ),
                    );
                    return Err(errors);
                }
                action.map(Action::Command)
            }
            #[cfg(feature = "fault-injection")]
            Self::Test(spec) => Ok(Action::Test(spec.clone())),
        }
    }
}

pub(super) fn parse_timeout(
    text: Option<&str>,
    default: Duration,
    pointer: &str,
    errors: &mut FieldErrors,
) -> Duration {
    match text {
        None => default,
        Some(text) => parse_duration(
            &format!("{pointer}/timeout"),
            text,
            Duration::from_millis(1),
            MAX_TIMEOUT,
        )
        .unwrap_or_else(|e| {
            errors.push(e.pointer, e.detail);
            default
        }),
    }
}

/// Why the SSRF guard refuses an address, naming its registry block.
pub fn refused_address(ip: Option<std::net::IpAddr>) -> String {
    let block = ip.and_then(block_of).unwrap_or("outside global unicast");
    format!(
        "the address is not public ({block}) and this server refuses private networks (--deny-private-networks)"
    )
}

/// The URL's host if it is an IP address literal.
pub fn literal_ip(url: &reqwest::Url) -> Option<std::net::IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(ip.into()),
        url::Host::Ipv6(ip) => Some(ip.into()),
        url::Host::Domain(_) => None,
    }
}

impl Action {
    /// The per-attempt timeout.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::Http(a) => a.timeout,
            Self::Command(a) => a.timeout,
            #[cfg(feature = "fault-injection")]
            Self::Test(spec) => spec
                .timeout
                .as_deref()
                .and_then(|t| humantime::parse_duration(t).ok())
                .unwrap_or(MAX_TIMEOUT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(json: &str) -> Result<Action, FieldErrors> {
        let spec: ActionSpec = serde_json::from_str(json).unwrap();
        spec.parse(&ActionPolicy::default(), "/action")
    }

    #[test]
    fn http_defaults_and_statuses() {
        let Action::Http(a) = http(r#"{"kind":"http","url":"http://127.0.0.1:9/x"}"#).unwrap() else {
            panic!()
        };
        assert_eq!(a.method, reqwest::Method::POST);
        assert!(a.success.contains(204) && !a.success.contains(301));
        let Action::Http(a) =
            http(r#"{"kind":"http","url":"http://h/","success_status":["2xx","304"]}"#).unwrap()
        else {
            panic!()
        };
        assert!(a.success.contains(304) && !a.success.contains(404));
    }

    #[test]
    fn http_rejects_header_injection_and_bad_urls() {
        let e = http(
            r#"{"kind":"http","url":"file:///etc/passwd","headers":{"X-A":"a\r\nX-B: b","X-Cronguard-Run":"1"},"success_status":["7xx"]}"#,
        )
        .unwrap_err();
        let pointers: Vec<_> = e.0.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/action/url",
                "/action/headers/X-A",
                "/action/headers/X-Cronguard-Run",
                "/action/success_status/0"
            ]
        );
    }

    #[test]
    fn commands_need_the_operator_and_clean_paths() {
        let spec: ActionSpec = serde_json::from_str(
            r#"{"kind":"command","program":"sh","args":["-c","true"],"working_dir":"/tmp/../etc"}"#,
        )
        .unwrap();
        let e = spec.parse(&ActionPolicy::default(), "/action").unwrap_err();
        assert_eq!(e.0[0].pointer, "/action/kind");
        let enabled = ActionPolicy {
            commands_enabled: true,
            ..ActionPolicy::default()
        };
        let e = spec.parse(&enabled, "/action").unwrap_err();
        assert_eq!(e.0[0].pointer, "/action/working_dir");
        let allowlisted = ActionPolicy {
            command_allowlist: vec!["/usr/bin/backup".into()],
            ..enabled
        };
        let e = spec.parse(&allowlisted, "/action").unwrap_err();
        assert_eq!(e.0[0].pointer, "/action/program");
    }

    /// The address table is tested in `address.rs`; here, that a literal
    /// is refused at validation with the guard on.
    #[test]
    fn the_ssrf_guard_knows_private_space() {
        let guarded = ActionPolicy {
            deny_private_networks: true,
            ..ActionPolicy::default()
        };
        let spec: ActionSpec =
            serde_json::from_str(r#"{"kind":"http","url":"http://169.254.169.254/latest"}"#).unwrap();
        assert_eq!(
            spec.parse(&guarded, "/action").unwrap_err().0[0].pointer,
            "/action/url"
        );
    }
}
