//! `kind: command`: the wire form, its validation (the operator's
//! allowlist, clean paths, the environment) and the validated process.

use std::collections::BTreeMap;
use std::path::{Component, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ActionPolicy, DEFAULT_COMMAND_TIMEOUT, MAX_ARG_LEN, MAX_ARGS, MAX_ENV, forbidden_env, parse_timeout,
};
use crate::validation::{FieldErrors, escape_pointer};

/// `kind: command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program to execute: an absolute path, or a name looked up in `PATH`.
    /// No shell is involved unless the program is one (`sh` with `-c`).
    #[schema(example = "/usr/local/bin/backup")]
    pub program: String,
    /// Arguments, passed as is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables added to the command's environment. Values
    /// are never shown back (`<redacted>`); values may reference
    /// `${CRONGUARD_SECRET_<NAME>}`; loader and interpreter variables
    /// (`LD_*`, `PATH`, `BASH_ENV`, …) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; default the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Per-attempt timeout; default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// A validated child process.
#[derive(Debug, Clone)]
pub struct CommandAction {
    /// Program name or path.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: Option<PathBuf>,
    /// Per-attempt timeout.
    pub timeout: Duration,
}

impl CommandSpec {
    pub(super) fn parse(&self, policy: &ActionPolicy, pointer: &str) -> Result<CommandAction, FieldErrors> {
        let mut errors = FieldErrors::default();
        if !self.program.is_empty() && !policy.program_allowed(&self.program) {
            errors.push(
                format!("{pointer}/program"),
                "this program is not in the server's command allowlist (--command-allowlist)",
            );
        }
        if self.program.is_empty() || self.program.len() > MAX_ARG_LEN || self.program.contains('\0') {
            errors.push(
                format!("{pointer}/program"),
                "must be a non-empty program name or path without NUL bytes",
            );
        }
        if self.args.len() > MAX_ARGS {
            errors.push(
                format!("{pointer}/args"),
                format!("more than {MAX_ARGS} arguments"),
            );
        }
        for (i, arg) in self.args.iter().enumerate() {
            if arg.len() > MAX_ARG_LEN || arg.contains('\0') {
                errors.push(
                    format!("{pointer}/args/{i}"),
                    "arguments are at most 8 KiB and contain no NUL bytes",
                );
            }
        }
        if self.env.len() > MAX_ENV {
            errors.push(format!("{pointer}/env"), format!("more than {MAX_ENV} variables"));
        }
        for (name, value) in &self.env {
            let valid_name = !name.is_empty()
                && name.len() <= 256
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            let at = format!("{pointer}/env/{}", escape_pointer(name));
            if !valid_name {
                errors.push(
                    at,
                    "variable names are letters, digits and `_`, not starting with a digit",
                );
            } else if name.starts_with("CRONGUARD_") {
                errors.push(at, "CRONGUARD_* variables are set by the service");
            } else if let Some(why) = forbidden_env(name).filter(|_| !policy.loading) {
                errors.push(at, why);
            } else if value.len() > MAX_ARG_LEN || value.contains('\0') {
                errors.push(at, "values are at most 8 KiB and contain no NUL bytes");
            } else if let Err(e) = crate::secrets::references(value) {
                errors.push(at, e);
            }
        }
        let working_dir = self.working_dir.as_ref().and_then(|dir| {
            let path = PathBuf::from(dir);
            let clean = path.is_absolute()
                && !dir.contains('\0')
                && dir.len() <= MAX_ARG_LEN
                && path
                    .components()
                    .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if clean {
                Some(path)
            } else {
                errors.push(
                    format!("{pointer}/working_dir"),
                    "must be an absolute path without `.` or `..` components",
                );
                None
            }
        });
        let timeout = parse_timeout(
            self.timeout.as_deref(),
            DEFAULT_COMMAND_TIMEOUT,
            pointer,
            &mut errors,
        );
        errors.finish(|| CommandAction {
            program: self.program.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
            working_dir,
            timeout,
        })
    }
}
