//! The rejections of one backend list: the first few in full, every one
//! counted by reason, and a digest of the whole set so an unchanged list
//! rejected again is not reported again.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::validation::FieldError;

/// Rejections of one list reported with their reasons; the rest are
/// counted in the list's summary.
pub const MAX_DETAILED: usize = 100;
/// Distinct reasons counted in a summary; the rest count as `other`.
const MAX_REASONS: usize = 32;

/// The rejections of one list: the first [`MAX_DETAILED`] in full, every
/// one counted by reason and folded into a digest of the whole set.
pub(super) struct Rejections {
    pub(super) detailed: Vec<(String, Vec<FieldError>)>,
    pub(super) total: u64,
    pub(super) by_reason: BTreeMap<String, u64>,
    pub(super) digest: sha2::Sha256,
}

impl Rejections {
    pub(super) fn new() -> Self {
        Self {
            detailed: Vec::new(),
            total: 0,
            by_reason: BTreeMap::new(),
            digest: sha2::Digest::new(),
        }
    }

    pub(super) fn push(&mut self, label: String, item: &RawValue, errors: Vec<FieldError>) {
        use sha2::Digest;
        self.total += 1;
        let mut reason = errors.first().map_or_else(String::new, |e| e.pointer.clone());
        if self.by_reason.len() >= MAX_REASONS && !self.by_reason.contains_key(&reason) {
            reason = "other".into();
        }
        *self.by_reason.entry(reason).or_default() += 1;
        self.digest.update(label.as_bytes());
        self.digest.update(item.get().as_bytes());
        for e in &errors {
            self.digest.update(e.pointer.as_bytes());
            self.digest.update(e.detail.as_bytes());
        }
        if self.detailed.len() < MAX_DETAILED {
            self.detailed.push((label, errors));
        }
    }
}
