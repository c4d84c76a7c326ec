//! One integration-test binary (link time on a 2-core machine); one module
//! per area. Every test talks HTTP to the real service on an ephemeral port,
//! except `claims`, which drives the claim contract on the store itself.

#![allow(clippy::unwrap_used)] // Helpers outside #[test] fns unwrap too: a panic is the failure report.

mod helpers;

mod api;
mod backend;
mod claims;
mod clock;
mod commands;
mod dst;
mod events;
mod health;
mod http_edge;
mod notifications;
mod observability;
mod openapi;
mod policies;
mod replicas;
mod restart;
mod scheduling;
mod secrets;
mod security;
mod ssrf;
mod storage;
mod supervision;
