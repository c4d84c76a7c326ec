//! What the API hides of a job, and when a hidden value may be kept.
//!
//! Secret header values, every command environment value and a URL's
//! password are shown as [`REDACTED`]. Sending the placeholder back in a
//! `PUT` keeps the stored value — but only while the action's destination
//! is unchanged: the origin (scheme, host, port) of an HTTP action, the
//! program, arguments and working directory of a command. A kept secret
//! never follows a changed destination, whoever asks; the client must send
//! the value again (docs/security.md).
//!
//! `${CRONGUARD_SECRET_*}` references name the operator's secrets, so only
//! an `admin` token may add one to a job or change the destination of a
//! job that has one; the same holds for a job's notification destinations
//! (`notify.to`) that hold a reference.

use std::collections::BTreeSet;

use super::auth::{Principal, Scope};
use super::error::ApiError;
use crate::action::ActionSpec;
use crate::job::JobSpec;
use crate::secrets::{REDACTED, is_secret_header};
use crate::validation::{FieldErrors, escape_pointer};

/// Replaces every secret value of `spec` with [`REDACTED`].
pub fn redact(spec: &mut JobSpec) {
    match &mut spec.action {
        ActionSpec::Http(http) => {
            for (name, value) in &mut http.headers {
                if is_secret_header(name, &http.secret_headers) {
                    *value = REDACTED.to_owned();
                }
            }
            // Jobs stored before credentials in URLs were refused.
            if let Ok(mut url) = url::Url::parse(&http.url)
                && url.password().is_some()
                && url.set_password(Some("redacted")).is_ok()
            {
                http.url = url.to_string();
            }
        }
        ActionSpec::Command(command) => {
            for value in command.env.values_mut() {
                *value = REDACTED.to_owned();
            }
        }
        #[cfg(feature = "fault-injection")]
        ActionSpec::Test(_) => {}
    }
}

/// Where an action sends what it carries: the URL's origin, or the
/// command line and directory.
fn destination(action: &ActionSpec) -> Option<String> {
    match action {
        ActionSpec::Http(http) => url::Url::parse(&http.url)
            .ok()
            .map(|u| u.origin().ascii_serialization()),
        ActionSpec::Command(c) => serde_json::to_string(&(&c.program, &c.args, &c.working_dir)).ok(),
        #[cfg(feature = "fault-injection")]
        ActionSpec::Test(_) => None,
    }
}

/// What changing the destination means, for the error.
fn destination_word(action: &ActionSpec) -> &'static str {
    match action {
        ActionSpec::Command(_) => "program, arguments or working directory",
        _ => "URL's origin (scheme, host or port)",
    }
}

/// Puts the stored values back where a client sent [`REDACTED`] (it read
/// the job, changed something else, and sent it back). Refused, naming the
/// field, when the stored value does not exist or the destination changed.
pub fn unredact(spec: &mut JobSpec, stored: &JobSpec) -> Result<(), ApiError> {
    let same_destination = destination(&spec.action) == destination(&stored.action);
    let word = destination_word(&spec.action);
    let mut errors = FieldErrors::default();
    let mut restore = |at: String, value: &mut String, old: Option<&String>| {
        if value != REDACTED {
            return;
        }
        match old {
            Some(old) if same_destination => old.clone_into(value),
            Some(_) => errors.push(
                at,
                format!(
                    "the action's {word} changed, and a kept secret never follows a changed \
                     destination: send this value again"
                ),
            ),
            None => errors.push(
                at,
                "a redacted value can only be sent back for a value the job already has",
            ),
        }
    };
    match (&mut spec.action, &stored.action) {
        (ActionSpec::Http(new), old) => {
            let old = match old {
                ActionSpec::Http(old) => Some(&old.headers),
                _ => None,
            };
            for (name, value) in &mut new.headers {
                let at = format!("/action/headers/{}", escape_pointer(name));
                restore(at, value, old.and_then(|h| h.get(name)));
            }
        }
        (ActionSpec::Command(new), old) => {
            let old = match old {
                ActionSpec::Command(old) => Some(&old.env),
                _ => None,
            };
            for (name, value) in &mut new.env {
                let at = format!("/action/env/{}", escape_pointer(name));
                restore(at, value, old.and_then(|e| e.get(name)));
            }
        }
        #[cfg(feature = "fault-injection")]
        (ActionSpec::Test(_), _) => {}
    }
    errors.finish(|| ())?;
    Ok(())
}

/// The `${CRONGUARD_SECRET_*}` names an action references.
fn references(action: &ActionSpec) -> BTreeSet<String> {
    let values: Vec<&String> = match action {
        ActionSpec::Http(http) => http.headers.values().collect(),
        ActionSpec::Command(c) => c.env.values().collect(),
        #[cfg(feature = "fault-injection")]
        ActionSpec::Test(_) => Vec::new(),
    };
    values
        .into_iter()
        .filter_map(|v| crate::secrets::references(v).ok())
        .flatten()
        .map(str::to_owned)
        .collect()
}

/// A job that references the operator's secrets sends them where its
/// action points: adding a reference, or pointing a job that has one
/// elsewhere, needs the `admin` scope.
pub fn check_reference_scope(
    principal: &Principal,
    spec: &JobSpec,
    stored: Option<&JobSpec>,
) -> Result<(), ApiError> {
    if principal.scope >= Scope::Admin {
        return Ok(());
    }
    // Notification destinations: a reference names where to send, or the
    // signing key; any change to destinations that hold one is an admin's.
    let destinations = |s: &JobSpec| s.notify.as_ref().and_then(|n| n.to.clone());
    let notify_refs = spec.notify.as_ref().is_some_and(|n| !n.references().is_empty());
    if notify_refs && stored.is_none_or(|old| destinations(old) != destinations(spec)) {
        return Err(ApiError::Forbidden {
            needed: Scope::Admin,
            has: principal.scope,
        });
    }
    let wanted = references(&spec.action);
    if wanted.is_empty() {
        return Ok(());
    }
    let allowed = stored.is_some_and(|old| {
        destination(&old.action) == destination(&spec.action) && wanted.is_subset(&references(&old.action))
    });
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            needed: Scope::Admin,
            has: principal.scope,
        })
    }
}
