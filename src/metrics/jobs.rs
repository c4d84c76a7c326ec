//! The per-job series of jobs with `monitor: true`: last success, last
//! failure, and the dead man's switch "expected by", held back while the
//! database refuses a job's fires.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use prometheus::{GaugeVec, IntGaugeVec, Registry};

use super::declare::{gauge_vec, int_gauge_vec, unix_seconds};

/// The per-job series, labelled `job_name`: not `job`, which Prometheus
/// sets to the scrape job at scrape time (the series would arrive as
/// `exported_job` and an alert would name the scrape job).
pub struct JobSeries {
    last_success: GaugeVec,
    last_failure: GaugeVec,
    expected_by: GaugeVec,
    consecutive_failures: IntGaugeVec,
    /// Jobs whose "expected by" is held back while their fires go
    /// unrecorded: the held instant, and the engine's latest value.
    holds: Mutex<HashMap<String, (f64, Option<f64>)>>,
}

impl JobSeries {
    pub(super) fn new(r: &Registry) -> Self {
        Self {
            last_success: gauge_vec(
                r,
                "job_last_success_timestamp_seconds",
                "Unix time of the last successful run of each job with `monitor: true`.",
                &["job_name"],
            ),
            last_failure: gauge_vec(
                r,
                "job_last_failure_timestamp_seconds",
                "Unix time of the last unsuccessful run of each job with `monitor: true`.",
                &["job_name"],
            ),
            expected_by: gauge_vec(
                r,
                "job_expected_by_timestamp_seconds",
                "For jobs with `monitor: true`: the next fire plus its misfire grace. Past it \
                     without the value moving on, the job is overdue.",
                &["job_name"],
            ),
            consecutive_failures: int_gauge_vec(
                r,
                "job_consecutive_failures",
                "For jobs with `monitor: true`: runs that failed or timed out since the last success.",
                &["job_name"],
            ),
            holds: Mutex::default(),
        }
    }

    /// A monitored job's standing as stored, at startup: its last success
    /// and failure and its current streak of failures.
    pub fn restore(
        &self,
        job: &str,
        last_success: Option<DateTime<Utc>>,
        last_failure: Option<DateTime<Utc>>,
        failures: u32,
    ) {
        if let Some(at) = last_success {
            self.last_success.with_label_values(&[job]).set(unix_seconds(at));
        }
        if let Some(at) = last_failure {
            self.last_failure.with_label_values(&[job]).set(unix_seconds(at));
        }
        self.consecutive_failures
            .with_label_values(&[job])
            .set(i64::from(failures));
    }

    /// A monitored job's run ended (`ok`: succeeded).
    pub fn outcome(&self, job: &str, ok: bool, at: DateTime<Utc>) {
        let family = if ok {
            &self.last_success
        } else {
            &self.last_failure
        };
        family.with_label_values(&[job]).set(unix_seconds(at));
        let failures = self.consecutive_failures.with_label_values(&[job]);
        if ok {
            failures.set(0);
        } else {
            failures.inc();
        }
    }

    /// A monitored job's next deadline (the engine's plan). While the job
    /// is held ([`JobSeries::hold`]) the series shows the held
    /// instant, or the plan if it is earlier.
    pub fn expected_by(&self, job: &str, by: Option<DateTime<Utc>>) {
        let by = by.map(unix_seconds);
        let shown = {
            let mut holds = self
                .holds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match holds.get_mut(job) {
                Some((held, latest)) => {
                    *latest = by;
                    Some(by.map_or(*held, |b| b.min(*held)))
                }
                None => by,
            }
        };
        self.show(job, shown);
    }

    /// A fire of a monitored job due at `due` (plus its grace: `by`) was
    /// not recorded — the database refused it. The job's "expected by"
    /// stops at `by` until [`JobSeries::release`], so a dead
    /// man's switch on it trips although the engine keeps planning.
    pub fn hold(&self, job: &str, by: DateTime<Utc>) {
        let by = unix_seconds(by);
        let shown = {
            let mut holds = self
                .holds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let current = self
                .expected_by
                .get_metric_with_label_values(&[job])
                .ok()
                .map(|g| g.get())
                .filter(|v| *v > 0.0);
            let hold = holds.entry(job.to_owned()).or_insert((by, current));
            hold.0 = hold.0.min(by);
            hold.0
        };
        self.show(job, Some(shown));
    }

    /// The job's fires are recorded again: its series follows the engine's
    /// plan again.
    pub fn release(&self, job: &str) {
        let released = self
            .holds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(job);
        if let Some((_, latest)) = released {
            self.show(job, latest);
        }
    }

    fn show(&self, job: &str, at: Option<f64>) {
        match at {
            Some(at) => self.expected_by.with_label_values(&[job]).set(at),
            None => {
                let _ = self.expected_by.remove_label_values(&[job]);
            }
        }
    }

    /// Drops a job's series (deleted, renamed, or no longer monitored).
    pub fn forget(&self, job: &str) {
        self.holds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(job);
        for family in [&self.last_success, &self.last_failure, &self.expected_by] {
            let _ = family.remove_label_values(&[job]);
        }
        let _ = self.consecutive_failures.remove_label_values(&[job]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_up_until_a_success() {
        let m = JobSeries::new(&Registry::new());
        let t = DateTime::<Utc>::UNIX_EPOCH;
        let failures = |m: &JobSeries| m.consecutive_failures.with_label_values(&["j"]).get();
        m.restore("j", None, Some(t), 2);
        assert_eq!(failures(&m), 2);
        m.outcome("j", false, t);
        assert_eq!(failures(&m), 3);
        m.outcome("j", true, t);
        assert_eq!(failures(&m), 0);
        m.forget("j");
        assert!(
            m.consecutive_failures
                .get_metric_with_label_values(&["j"])
                .is_ok_and(|g| g.get() == 0)
        );
    }

    #[test]
    fn a_held_expected_by_stays_until_released_then_follows_the_plan() {
        let m = JobSeries::new(&Registry::new());
        let t = |s: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::seconds(s);
        let shown = |m: &JobSeries| m.expected_by.with_label_values(&["j"]).get();
        m.expected_by("j", Some(t(100)));
        m.hold("j", t(60));
        assert_eq!(shown(&m), 60.0);
        // The engine plans on: the series stays held, unless the plan is
        // earlier still.
        m.expected_by("j", Some(t(200)));
        assert_eq!(shown(&m), 60.0);
        m.expected_by("j", Some(t(50)));
        assert_eq!(shown(&m), 50.0);
        m.expected_by("j", Some(t(300)));
        m.hold("j", t(70));
        assert_eq!(shown(&m), 60.0, "a later hold does not move the first one");
        m.release("j");
        assert_eq!(shown(&m), 300.0);
        m.expected_by("j", Some(t(400)));
        assert_eq!(shown(&m), 400.0);
    }
}
