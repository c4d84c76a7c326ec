//! cronguard: a persistent, supervised job scheduler service.
//!
//! `ARCHITECTURE.md` draws the layers; a module uses only lower ones.
//! Data flows one way: [`api`] → [`store`] → [`engine`] → [`supervisor`] →
//! [`executor`] → [`store`]; [`health`] and [`metrics`] only publish what
//! the others report.
//!
//! - leaves: [`clock`] (injectable time), [`fault`] (fault-injection
//!   hooks), [`health`] (heartbeats, readiness), [`secrets`],
//!   [`shutdown`] (signals), [`spec`] (OpenAPI post-processing),
//!   [`validation`] (field errors);
//! - the domain, parsed and validated, no I/O: [`schedule`], [`policy`],
//!   [`action`], [`notification`] (whom a job tells, signed messages),
//!   [`job`], [`run`];
//! - [`metrics`] (every metric), [`events`] (the live feed of committed
//!   changes), [`procfs`] (the process table),
//!   [`protocol`] (the control backend's wire types), [`standing`] (a
//!   job's last run, failures and health);
//! - [`store`]: the database, one writer with group commit;
//! - [`executor`]: HTTP calls and child processes in process groups;
//! - [`loops`]: the `Loop` abstraction, its restart supervision, and the
//!   `Services` every loop shares;
//! - [`supervisor`]: owns every run's task, applies overlap policy, drains;
//! - [`retention`]: keeps run history within its bounds;
//! - [`notifier`]: routes and delivers notifications, signed, with backoff;
//! - [`orphans`]: accounting for work whose owner vanished;
//! - [`cluster`]: replicas sharing one PostgreSQL database;
//! - [`engine`]: the timer heap that turns schedules into fires;
//! - [`backend`]: pulls desired jobs from the control backend, uploads
//!   results;
//! - [`api`]: the REST API, probes and metrics endpoint;
//! - [`config`]: settings validated into typed configuration;
//! - [`app`]: wiring, startup recovery, the shutdown order.
#![warn(missing_docs)]

pub mod action;
pub mod api;
pub mod app;
pub mod backend;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod events;
pub mod executor;
pub mod fault;
pub mod health;
pub mod job;
pub mod loops;
pub mod metrics;
pub mod notification;
pub mod notifier;
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
pub mod standing;
pub mod store;
pub mod supervisor;
pub mod validation;
