//! The cost of computing a job's next fire (the engine does it once per
//! fire), per zone and expression, as a ratio to the floor measured in the
//! same run: the same expression in UTC (croner alone, no zone mapping).
//!
//! Run: `cargo bench --bench next_fire -- [--fires 200000]`.

#![allow(clippy::unwrap_used)] // A benchmark that cannot measure stops with the reason.

#[path = "common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::Instant;

use chrono::{DateTime, Utc};
use cronguard::schedule::{CronRule, Fold, Gap};

/// Nanoseconds per `next_after`, walking `fires` fires from `from`.
fn per_fire(expr: &str, zone: &str, fold: Fold, from: &str, fires: usize) -> f64 {
    let rule = CronRule::parse(expr, Some(zone), fold, Gap::Shift, "/s").expect("rule");
    let mut t: DateTime<Utc> = from.parse().expect("instant");
    let started = Instant::now();
    for _ in 0..fires {
        t = black_box(rule.next_after(t)).expect("a fire");
    }
    started.elapsed().as_nanos() as f64 / fires as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fires: usize = args
        .iter()
        .position(|a| a == "--fires")
        .and_then(|i| args.get(i + 1))
        .map_or(200_000, |v| v.parse().expect("--fires N"));
    println!("cronguard next-fire cost ({fires} fires each)");
    println!("{}", common::machine());
    let from = "2027-01-01T00:00:00Z";
    println!(
        "{:<16} {:<26} {:>10} {:>8}",
        "expression", "zone", "ns/fire", "ratio"
    );
    for expr in ["* * * * * *", "*/5 * * * *", "30 2 * * *"] {
        let n = if expr == "30 2 * * *" { fires / 20 } else { fires };
        let floor = per_fire(expr, "UTC", Fold::First, from, n);
        println!("{expr:<16} {:<26} {floor:>10.0} {:>8}", "UTC (floor)", "1.00");
        for (zone, fold) in [
            ("Europe/Berlin", Fold::First),
            ("Europe/Berlin", Fold::Both),
            ("Australia/Lord_Howe", Fold::First),
            ("America/New_York", Fold::First),
        ] {
            let ns = per_fire(expr, zone, fold, from, n);
            let zone = format!("{zone} {fold:?}");
            println!("{expr:<16} {zone:<26} {ns:>10.0} {:>8.2}", ns / floor);
        }
    }
}
