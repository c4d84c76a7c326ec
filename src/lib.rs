//! cronguard: a persistent, supervised job scheduler service.
pub mod clock;
pub mod schedule;
pub mod validation;
