//! cronguard: a persistent, supervised job scheduler service.
//!
//! Data flows one way: `api` → `store` ← `engine` → `supervisor` →
//! `executor` → `store`; `health` and `metrics` only read what the others
//! publish.
//!
//! - [`schedule`], [`job`], [`action`], [`policy`], [`run`]: the domain,
//!   parsed and validated (no I/O);
//! - [`store`]: SQLite behind a narrow interface, group-committed writes;
//! - [`engine`]: the timer heap that turns schedules into fires;
//! - [`supervisor`]: owns every run's task, applies overlap policy, drains;
//! - [`executor`]: HTTP calls and child processes in process groups;
//! - [`orphans`]: accounting for work whose owner vanished;
//! - [`api`]: the REST API, probes and metrics endpoint;
//! - [`app`], [`config`], [`shutdown`]: wiring, settings, signals.
#![deny(unsafe_code)]

pub mod action;
pub mod api;
pub mod app;
pub mod backend;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod executor;
pub mod fault;
pub mod health;
pub mod job;
pub mod metrics;
pub mod orphans;
pub mod policy;
pub mod procfs;
pub mod protocol;
pub mod retention;
pub mod run;
pub mod schedule;
pub mod secrets;
pub mod shutdown;
pub mod spec;
pub mod store;
pub mod supervisor;
pub mod validation;
