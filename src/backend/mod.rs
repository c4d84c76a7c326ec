//! The control backend: pull the desired jobs, push every result, and
//! measure the contact (`docs/backend.md`).
//!
//! Two supervised loops, each with its own heartbeat: `backend_sync`
//! pulls the job list and reconciles the backend-owned jobs
//! ([`pull::Puller`]); `uploader` drains the outbox of finished runs
//! ([`upload::Uploader`]). Both record every attempt in [`Contact`], so
//! "the loop stopped trying" (a stale heartbeat: liveness fails) is told
//! apart from "the backend is down" (a stale contact: readiness detail,
//! metric and alert; liveness only with `--backend-contact-max-age`).

pub mod client;
pub mod config;
pub mod contact;
pub mod metrics;
pub mod pull;
mod rejections;
pub mod upload;

pub use self::config::{BackendConfig, Secret};
pub use self::contact::{Contact, ContactView, Direction, DirectionView};
