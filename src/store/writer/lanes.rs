//! The writer's queue: run starts first, everything else as soon as no
//! start waits.

use std::collections::VecDeque;

use super::{Op, RunOp};

/// Queued operations in two lanes. Run starts are on the critical path of
/// a fire (the action waits for its row), so they are committed first;
/// everything else (run ends, API writes, housekeeping) follows as soon as
/// no start waits. Order within a lane is submission order. Reordering
/// across lanes is safe: a caller that needs an order awaits the first
/// write's acknowledgement before submitting the second.
#[derive(Default)]
pub(super) struct Lanes {
    starts: VecDeque<Op>,
    rest: VecDeque<Op>,
    /// Batches of starts in a row while other writes waited.
    passed: u32,
    /// Most operations per batch.
    limit: usize,
}

impl Lanes {
    /// Empty lanes whose batches hold at most `limit` operations.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    pub fn push(&mut self, op: Op) {
        if matches!(op, Op::Runs(RunOp::Insert { .. } | RunOp::Start { .. })) {
            self.starts.push_back(op);
        } else {
            self.rest.push_back(op);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty() && self.rest.is_empty()
    }

    pub fn len(&self) -> usize {
        self.starts.len() + self.rest.len()
    }

    /// Moves the next batch into `batch`: starts first, but never more
    /// than four batches of starts in a row while other writes wait; a
    /// batch ends after a `Close`.
    pub fn fill(&mut self, batch: &mut Vec<Op>) {
        // A `Close` waits for every start queued before it.
        let closing = matches!(self.rest.front(), Some(Op::Close { .. }));
        let starts_first = !self.starts.is_empty() && (self.rest.is_empty() || self.passed < 4 || closing);
        self.passed = if starts_first && !self.rest.is_empty() {
            self.passed + 1
        } else {
            0
        };
        let lane = if starts_first {
            &mut self.starts
        } else {
            &mut self.rest
        };
        while batch.len() < self.limit {
            let Some(op) = lane.pop_front() else { break };
            let close = matches!(op, Op::Close { .. });
            batch.push(op);
            if close {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeDelta, Utc};
    use tokio::sync::oneshot;

    use super::*;
    use crate::run::RunId;

    fn at(n: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(n)
    }

    /// `s3`: a run start; `w3`: another write; `close`.
    fn op(label: &str) -> Op {
        let (reply, _) = oneshot::channel();
        let n: i64 = label[1..].parse().unwrap_or(0);
        match &label[..1] {
            "s" => Op::Runs(RunOp::Start {
                id: RunId(uuid::Uuid::from_u128(n as u128)),
                at: at(n),
                reply,
            }),
            "w" => Op::Probe { at: at(n), reply },
            _ => {
                let (reply, _) = oneshot::channel();
                Op::Close { reply }
            }
        }
    }

    fn label(op: &Op) -> String {
        match op {
            Op::Runs(RunOp::Start { at, .. }) => format!("s{}", at.timestamp()),
            Op::Probe { at, .. } => format!("w{}", at.timestamp()),
            Op::Close { .. } => "close".into(),
            _ => "?".into(),
        }
    }

    /// Every batch the lanes give, in order.
    fn batches(lanes: &mut Lanes) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        while !lanes.is_empty() {
            let mut batch = Vec::new();
            lanes.fill(&mut batch);
            out.push(batch.iter().map(label).collect());
        }
        out
    }

    fn queued(limit: usize, labels: &[&str]) -> Lanes {
        let mut lanes = Lanes::new(limit);
        for l in labels {
            lanes.push(op(l));
        }
        lanes
    }

    #[test]
    fn starts_go_first_each_lane_in_submission_order() {
        let mut lanes = queued(10, &["w1", "s1", "w2", "s2", "s3"]);
        assert_eq!(lanes.len(), 5);
        assert_eq!(batches(&mut lanes), [vec!["s1", "s2", "s3"], vec!["w1", "w2"]]);
    }

    #[test]
    fn other_writes_wait_for_at_most_four_batches_of_starts() {
        let starts: Vec<String> = (1..=12).map(|n| format!("s{n}")).collect();
        let mut labels: Vec<&str> = vec!["w1"];
        labels.extend(starts.iter().map(String::as_str));
        let mut lanes = queued(2, &labels);
        assert_eq!(
            batches(&mut lanes),
            [
                vec!["s1", "s2"],
                vec!["s3", "s4"],
                vec!["s5", "s6"],
                vec!["s7", "s8"],
                vec!["w1"],
                vec!["s9", "s10"],
                vec!["s11", "s12"],
            ]
        );
    }

    #[test]
    fn a_batch_holds_at_most_the_limit_and_ends_after_a_close() {
        let mut lanes = queued(3, &["w1", "w2", "w3", "w4", "close", "w5"]);
        assert_eq!(
            batches(&mut lanes),
            [vec!["w1", "w2", "w3"], vec!["w4", "close"], vec!["w5"]]
        );
    }

    #[test]
    fn a_close_waits_for_every_start_queued_before_it() {
        // More than four batches of starts pass a waiting close: the close
        // commits what came before it, starts included.
        let mut lanes = queued(1, &["close", "s1", "s2", "s3", "s4", "s5", "s6"]);
        let mut expected: Vec<Vec<String>> = (1..=6).map(|n| vec![format!("s{n}")]).collect();
        expected.push(vec!["close".into()]);
        assert_eq!(batches(&mut lanes), expected);
    }
}
