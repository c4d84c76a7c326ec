//! Jobs: what clients submit ([`JobSpec`]), what validation proves
//! ([`JobDefinition`]), and what the store holds ([`Job`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::action::{Action, ActionPolicy, ActionSpec};
use crate::policy::{Policy, PolicySpec};
use crate::schedule::{Schedule, ScheduleSpec};
use crate::validation::FieldErrors;
use crate::validation::escape_pointer;

/// Longest job name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 4096;
/// Most labels on one job.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 255;
/// Longest pause note.
pub const MAX_NOTE_LEN: usize = 1024;

/// Identifies a job; time-ordered (UUID v7) so ids sort by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::from_str(s).map(Self)
    }
}

/// Who owns a job's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Created through the local API.
    Api,
    /// Pulled from the control backend.
    Backend,
}

impl Source {
    /// Stable text form, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Backend => "backend",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "api" => Some(Self::Api),
            "backend" => Some(Self::Backend),
            _ => None,
        }
    }
}

/// A job as clients write it (create and replace).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Unique name: ASCII letters, digits, `.`, `_`, `-`; starts with a
    /// letter or digit; 1 to 128 characters.
    #[schema(example = "nightly-backup", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    pub name: String,
    /// Free text, up to 4096 bytes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(max_length = 4096)]
    pub description: String,
    /// Up to 64 labels; keys up to 63 characters of `[A-Za-z0-9._/-]`,
    /// values up to 255 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When it fires.
    pub schedule: ScheduleSpec,
    /// What it does.
    #[schema(value_type = crate::action::ActionSchema)]
    pub action: ActionSpec,
    /// How it behaves under overlap, lateness and downtime.
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub policy: PolicySpec,
    /// Create paused; on replace, omit to keep the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Export this job's own metric series (last success, last failure,
    /// expected-by deadline) for a per-job dead man's switch. Off by
    /// default to keep the metric cardinality bounded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub monitor: bool,
    /// Whom to tell about failures, recoveries and other events
    /// (docs/notifications.md); the operator's defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<crate::notification::NotifySpec>,
}

fn is_default_policy(p: &PolicySpec) -> bool {
    *p == PolicySpec::default()
}

/// A job definition that passed validation.
#[derive(Debug, Clone)]
pub struct JobDefinition {
    /// The spec as submitted (what the API shows back).
    pub spec: JobSpec,
    /// Parsed schedule.
    pub schedule: Schedule,
    /// Parsed action.
    pub action: Action,
    /// Policy with defaults applied.
    pub policy: Policy,
}

impl JobSpec {
    /// Validates every field, collecting every problem.
    pub fn validate(self, actions: &ActionPolicy) -> Result<JobDefinition, FieldErrors> {
        let mut errors = FieldErrors::default();
        if let Err(detail) = check_name(&self.name) {
            errors.push("/name", detail);
        }
        if self.description.len() > MAX_DESCRIPTION_LEN {
            errors.push("/description", format!("longer than {MAX_DESCRIPTION_LEN} bytes"));
        }
        check_labels(&self.labels, &mut errors);
        let schedule = errors.take(Schedule::parse(&self.schedule, "/schedule"));
        let action = errors.take(self.action.parse(actions, "/action"));
        let policy = errors.take(self.policy.parse("/policy"));
        if let Some(notify) = &self.notify {
            notify.check(actions, "/notify", &mut errors);
        }
        match (schedule, action, policy) {
            (Some(schedule), Some(action), Some(policy)) if errors.is_empty() => Ok(JobDefinition {
                spec: self,
                schedule,
                action,
                policy,
            }),
            _ => Err(errors),
        }
    }
}

/// Checks a job name against the documented charset and length.
pub fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(format!(
            "names are 1 to {MAX_NAME_LEN} ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        ));
    }
    if Uuid::parse_str(name).is_ok() {
        return Err("a name cannot look like a job id (UUID)".into());
    }
    Ok(())
}

/// Whether `key` is a valid label key (1 to 63 of `[A-Za-z0-9._/-]`).
pub fn label_key_ok(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_LABEL_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
}

fn check_labels(labels: &BTreeMap<String, String>, errors: &mut FieldErrors) {
    if labels.len() > MAX_LABELS {
        errors.push("/labels", format!("more than {MAX_LABELS} labels"));
        return;
    }
    for (key, value) in labels {
        let at = format!("/labels/{}", escape_pointer(key));
        if !label_key_ok(key) {
            errors.push(
                at,
                format!("label keys are 1 to {MAX_LABEL_KEY_LEN} characters of [A-Za-z0-9._/-]"),
            );
        } else if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
            errors.push(
                at,
                format!("label values are at most {MAX_LABEL_VALUE_LEN} bytes without control characters"),
            );
        }
    }
}

/// A stored job: its definition plus identity and scheduling state.
#[derive(Debug, Clone)]
pub struct Job {
    /// Identity.
    pub id: JobId,
    /// The validated definition.
    pub def: JobDefinition,
    /// Whether fires are suspended.
    pub paused: bool,
    /// Why it was paused, if a note was given.
    pub pause_note: Option<String>,
    /// Who owns the definition.
    pub source: Source,
    /// Bumped on every change a client can see; the `ETag`.
    pub version: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// The schedule cursor: the next fire is the first one strictly after
    /// this instant. It is the last handled fire's scheduled time, or the
    /// moment the job was created, resumed or rescheduled, so that a restart
    /// knows exactly which fires were missed and a resume never replays
    /// fires from the paused period.
    pub cursor_at: DateTime<Utc>,
    /// Scheduled and catch-up runs started so far (for `max_runs`).
    pub runs_started: u64,
}

impl Job {
    /// The job's unique name.
    pub fn name(&self) -> &str {
        &self.def.spec.name
    }

    /// Whether the job started all the runs `max_runs` allows.
    pub fn exhausted(&self) -> bool {
        self.def
            .policy
            .max_runs
            .is_some_and(|max| self.runs_started >= max)
    }

    /// The next nominal fire strictly after the cursor, if not paused and
    /// not exhausted.
    pub fn next_fire(&self) -> Option<DateTime<Utc>> {
        if self.paused || self.exhausted() {
            return None;
        }
        self.def.schedule.next_after(self.cursor_at)
    }
}

/// What the engine keeps of a job: enough to plan its fires (about 200
/// bytes, against several kilobytes for a whole [`Job`]), so a million
/// registered jobs fit in memory. The whole job is loaded shortly before
/// it fires (see `docs/performance.md`).
#[derive(Debug, Clone)]
pub struct Timing {
    /// The job.
    pub id: JobId,
    /// When it fires.
    pub schedule: Schedule,
    /// How late a fire may start.
    pub misfire_grace: std::time::Duration,
    /// What runs after downtime.
    pub catch_up: crate::policy::CatchUp,
    /// How far back catch-up looks.
    pub catch_up_window: std::time::Duration,
    /// Suspended.
    pub paused: bool,
    /// Started all the runs `max_runs` allows.
    pub exhausted: bool,
    /// The stored schedule cursor.
    pub cursor_at: DateTime<Utc>,
    /// The name, for jobs with their own metric series (`monitor: true`).
    pub monitor: Option<std::sync::Arc<str>>,
}

/// The parts of a stored spec that timing needs (the rest is skipped).
#[derive(Deserialize)]
struct TimingSpec {
    name: String,
    schedule: ScheduleSpec,
    #[serde(default)]
    policy: PolicySpec,
    #[serde(default)]
    monitor: bool,
}

impl Timing {
    /// The timing of a whole job.
    pub fn of(job: &Job) -> Self {
        let policy = &job.def.policy;
        Self {
            id: job.id,
            schedule: job.def.schedule.clone(),
            misfire_grace: policy.misfire_grace,
            catch_up: policy.catch_up,
            catch_up_window: policy.catch_up_window,
            paused: job.paused,
            exhausted: job.exhausted(),
            cursor_at: job.cursor_at,
            monitor: job.def.spec.monitor.then(|| job.name().into()),
        }
    }

    /// The timing of a stored job, reading only what it needs from its
    /// spec (the full spec is validated when the job is loaded to fire).
    pub fn from_stored(
        id: JobId,
        spec: &str,
        paused: bool,
        cursor_at: DateTime<Utc>,
        exhausted: bool,
    ) -> Result<Self, String> {
        let spec: TimingSpec = serde_json::from_str(spec).map_err(|e| e.to_string())?;
        let schedule = Schedule::parse(&spec.schedule, "/schedule").map_err(|e| e.to_string())?;
        let policy = spec.policy.parse("/policy").map_err(|e| e.to_string())?;
        Ok(Self {
            id,
            schedule,
            misfire_grace: policy.misfire_grace,
            catch_up: policy.catch_up,
            catch_up_window: policy.catch_up_window,
            paused,
            exhausted,
            cursor_at,
            monitor: spec.monitor.then(|| spec.name.into()),
        })
    }

    /// The next nominal fire strictly after `cursor`, if it may fire.
    pub fn next_after(&self, cursor: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.paused || self.exhausted {
            return None;
        }
        self.schedule.next_after(cursor)
    }
}

/// Checks a pause note.
pub fn check_note(note: &str) -> Result<(), FieldErrors> {
    if note.len() > MAX_NOTE_LEN || note.chars().any(|c| c.is_control() && c != '\n') {
        return Err(crate::validation::FieldError::new(
            "/note",
            format!("at most {MAX_NOTE_LEN} bytes without control characters"),
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_charset() {
        assert!(check_name("nightly-backup.v2_x").is_ok());
        for bad in [
            "",
            "-lead",
            "has space",
            "ünïcode",
            "а",
            "x'; DROP TABLE jobs;--",
            "0191d8d6-0000-7000-8000-000000000000",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn validation_lists_every_offending_field() {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "bad name",
            "labels": {"ok": "v", "bad key": "v"},
            "schedule": {"kind": "cron", "expr": "nope"},
            "action": {"kind": "http", "url": "not a url"},
            "policy": {"misfire_grace": "-1s"}
        }))
        .unwrap();
        let e = spec.validate(&ActionPolicy::default()).unwrap_err();
        let pointers: Vec<_> = e.0.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/name",
                "/labels/bad key",
                "/schedule/expr",
                "/action/url",
                "/policy/misfire_grace"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        for body in [
            r#"{"name":"a","schedule":{"kind":"once","at":"2030-01-01T00:00:00Z"},"action":{"kind":"http","url":"http://h/"},"extra":1}"#,
            r#"{"name":"a","schedule":{"kind":"once","at":"2030-01-01T00:00:00Z","x":1},"action":{"kind":"http","url":"http://h/"}}"#,
            r#"{"name":"a","schedule":{"kind":"once","at":"2030-01-01T00:00:00Z"},"action":{"kind":"http","url":"http://h/","x":1}}"#,
        ] {
            assert!(serde_json::from_str::<JobSpec>(body).is_err(), "{body}");
        }
    }
}
