//! cronguard: a persistent, supervised job scheduler service.
#![deny(unsafe_code)]
pub mod action;
pub mod clock;
pub mod executor;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod job;
pub mod policy;
pub mod run;
pub mod schedule;
pub mod store;
pub mod validation;
pub mod metrics;
pub mod supervisor;
pub mod engine;
pub mod health;
