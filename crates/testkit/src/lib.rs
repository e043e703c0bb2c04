//! Test support shared by every sluice crate.
//!
//! - [`semantics`]: the behaviour every [`Store`](sluice_engine::Store) must show, written
//!   once. A backend runs it with [`semantic_suite!`] and a [`Harness`] that hands out a
//!   fresh store and a way to let time pass.
//! - [`reservations`]: the same for reservations (reserve, settle, debt, concurrency).
//! - [`servers`]: real servers (`redis-server`, also TLS-only with `openssl`-made
//!   certificates; PostgreSQL) on free loopback ports, cleaned
//!   up on drop.
//! - [`sentinel`]: a primary, a replica and three `redis-sentinel`s that fail over in
//!   seconds.
//! - [`sluice`]: the real `sluice` binary, black-box: `sluice serve` on a free port with a
//!   config the test writes ([`sluice::Server`]), and the CLI's other commands.
//! - [`http`]: requests to it, through ureq or byte for byte over a raw socket.
//! - [`metrics`]: reading `/metrics`.
//! - [`shared`]: the shared stores' multi-instance and outage tests, written once for
//!   every [`shared::SharedStore`] (Redis, PostgreSQL).

pub mod http;
pub mod metrics;
mod postgres;
pub mod records;
pub mod reservations;
pub mod semantics;
pub mod sentinel;
pub mod servers;
pub mod shared;
pub mod sluice;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_engine::{Micros, Store};

/// What the semantic suite needs from a backend under test.
pub trait Harness: Send + Sync {
    /// The store under test, empty at the start of each test.
    fn store(&self) -> std::sync::Arc<dyn Store>;

    /// Lets `by` pass for the store: a manual clock moves, a real server is waited for.
    fn advance(&self, by: Duration) -> impl Future<Output = ()> + Send;

    /// Advances until just past the next multiple of `period` since the Unix epoch, so
    /// tests of epoch-aligned windows know where in the window they stand.
    fn align_to(&self, period: Duration) -> impl Future<Output = ()> + Send;

    /// How much later than asked the store's clock may read, so timing assertions
    /// allow for it (zero for a manual clock).
    fn slack(&self) -> Duration;

    /// How many counters this test's store holds after dropping expired ones.
    fn live_counters(&self) -> impl Future<Output = u64> + Send;

    /// The store's clock as the test can read it: the manual clock, or this machine's
    /// system time for a server running on it (which reads the same clock, a little
    /// later: see [`Harness::slack`]). Microseconds since the Unix epoch.
    fn now(&self) -> Micros;

    /// Sets the store's clock to `at` (never earlier than [`Harness::now`]) when the
    /// harness controls it, and says whether it did: a manual clock can, a real
    /// server's cannot. For cases that need a date a real clock is not at, such as a
    /// calendar month's last microsecond.
    fn jump_to(&self, at: Micros) -> impl Future<Output = bool> + Send;
}

/// This machine's clock in microseconds since the Unix epoch: the clock a Redis or
/// PostgreSQL server started by the tests reads (a little later than the test does).
pub fn system_now() -> Micros {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as Micros)
}

/// Runs every test of [`semantics`] against a backend: `semantic_suite!(async { MyHarness::new().await })`.
/// Each case becomes its own `#[tokio::test]` so a failure names the behaviour.
#[macro_export]
macro_rules! semantic_suite {
    ($make:expr) => {
        $crate::semantic_suite!(@cases $make;
            gcra_admits_the_burst_then_one_per_interval,
            gcra_burst_option_sets_capacity,
            fixed_window_resets_at_the_epoch_aligned_boundary,
            sliding_window_weighs_the_previous_window,
            retry_after_is_honest_for_every_algorithm,
            cost_zero_reads_without_charging,
            dry_run_decides_without_charging,
            cost_above_capacity_is_denied_with_no_retry_time,
            denied_decision_charges_nothing,
            charge_denied_limits_count_every_attempt,
            charge_denied_never_charges_a_cost_that_cannot_fit,
            shadow_limits_report_but_never_deny,
            every_window_of_a_limit_must_allow,
            repeated_counter_in_one_request_counts_twice,
            reset_forgets_a_key,
            keys_and_limits_are_independent,
            keys_with_any_characters_are_counters_of_their_own,
            expired_counters_leave_nothing_behind,
            concurrent_decisions_admit_exactly_the_quota,
            concurrent_denials_leave_no_charge_on_the_other_check,
            refund_gives_back_what_was_charged,
            refund_never_fills_beyond_the_quota,
            calendar_month_windows_end_at_the_next_utc_month_start
        );
        $crate::semantic_suite!(@reservations $make;
            settle_less_refunds_the_difference,
            settle_more_goes_into_debt,
            settling_twice_changes_nothing,
            release_gives_back_the_whole_estimate,
            expired_denied_and_forged_reservations_settle_nothing,
            a_charge_for_work_done_is_booked_past_the_limit,
            concurrency_slots_are_held_until_settled_or_expired,
            concurrent_reservations_never_exceed_the_slots
        );
        $crate::semantic_suite!(@records $make;
            records_are_written_read_back_and_removed
        );
    };
    (@records $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let harness = $make.await;
                $crate::records::$case(&harness).await;
            }
        )*
    };
    (@reservations $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let harness = $make.await;
                $crate::reservations::$case(&harness).await;
            }
        )*
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let harness = $make.await;
                $crate::semantics::$case(&harness).await;
            }
        )*
    };
}
