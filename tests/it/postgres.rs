//! The API, scheduling and policy suites again, on PostgreSQL.
//!
//! Each test below runs the SQLite test of the same name with the app's
//! database on a fresh PostgreSQL database (see `helpers::database_for`).
//! The server is `CRONGUARD_TEST_POSTGRES` or, by default, the machine's
//! `postgres://postgres@127.0.0.1:5432/test`; where none is reachable each
//! test says so on stderr and passes without running. A new test in those
//! suites is added here too.

use crate::helpers::{ON_POSTGRES, postgres_server};

macro_rules! on_postgres {
    ($($suite:ident :: $test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                let Some(server) = postgres_server() else {
                    // Straight to stderr: libtest hides `eprintln!` of passing tests.
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr(),
                        concat!(
                            "\nSKIPPED postgres::", stringify!($test),
                            ": no PostgreSQL reachable (set CRONGUARD_TEST_POSTGRES)\n"
                        ).as_bytes(),
                    );
                    return;
                };
                ON_POSTGRES.with(|on| *on.borrow_mut() = Some(server));
                crate::$suite::$test();
            }
        )*
    };
}

on_postgres! {
    api::bad_input_is_a_precise_problem_and_writes_nothing,
    api::crud_with_optimistic_concurrency_and_pagination,
    api::previews_follow_the_documented_dst_rules,
    scheduling::an_every_second_job_fires_at_each_whole_second_with_its_identity,
    scheduling::http_failures_and_timeouts_are_recorded,
    scheduling::pause_stops_fires_and_resume_restarts_from_now,
    scheduling::trigger_runs_now_and_cancel_ends_a_live_run,
    policies::overlap_skip_against_runs_of_two_and_a_half_seconds,
    policies::overlap_allow_up_to_max_concurrency,
    policies::overlap_cancel_running_replaces_every_run,
    policies::overlap_queue_one_keeps_one_waiting,
    policies::ten_minutes_down_under_each_catch_up_policy,
    policies::retries_back_off_within_bounds_inside_one_run,
    policies::auto_pause_after_consecutive_failures_and_resume_resets,
    policies::a_job_stops_after_max_runs,
    policies::retention_keeps_exactly_the_configured_history,
}
