//! How a metric is declared: its name under the `cronguard_` namespace,
//! its help, labels and buckets, registered once.

use chrono::{DateTime, Utc};
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Every series' prefix.
pub(super) const NS: &str = "cronguard";

/// Registers `metric` (a static definition: failure is a programming error).
pub(crate) fn reg<T: Collector + Clone + 'static>(r: &Registry, metric: Result<T, prometheus::Error>) -> T {
    let metric = metric.unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
    r.register(Box::new(metric.clone()))
        .unwrap_or_else(|e| unreachable!("metric registered twice: {e}"));
    metric
}

pub(crate) fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NS)
}

pub(super) fn hopts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NS)
        .buckets(buckets.to_vec())
}

/// Latency buckets from 0.5 ms to 60 s.
pub(super) const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub(super) fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    reg(r, IntCounter::with_opts(opts(name, help)))
}

pub(super) fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(r, IntCounterVec::new(opts(name, help), labels))
}

pub(super) fn gauge(r: &Registry, name: &str, help: &str) -> Gauge {
    reg(r, Gauge::with_opts(opts(name, help)))
}

pub(super) fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    reg(r, GaugeVec::new(opts(name, help), labels))
}

pub(super) fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    reg(r, IntGauge::with_opts(opts(name, help)))
}

pub(super) fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(r, IntGaugeVec::new(opts(name, help), labels))
}

pub(super) fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    reg(r, Histogram::with_opts(hopts(name, help, buckets)))
}

pub(super) fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    reg(r, HistogramVec::new(hopts(name, help, buckets), labels))
}

pub(super) fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}
