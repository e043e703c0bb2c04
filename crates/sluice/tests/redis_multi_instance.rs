//! The Redis store's promise, black-box: several `sluice serve` processes pointing at
//! one Redis enforce one limit together, exactly, for each algorithm, with at most one
//! EVALSHA per decision (concurrent decisions share calls) and every counter under the
//! configured prefix. The race itself is
//! `sluice_testkit::shared::exactly_the_quota_across_instances`, shared with PostgreSQL.

mod common;

use sluice_testkit::servers::RedisServer;
use sluice_testkit::shared::exactly_the_quota_across_instances;

#[test]
fn fixed_window_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances::<RedisServer>(&common::bin(), "fixed_window");
}

#[test]
fn gcra_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances::<RedisServer>(&common::bin(), "gcra");
}

#[test]
fn sliding_window_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances::<RedisServer>(&common::bin(), "sliding_window");
}

#[test]
fn calls_in_flight_never_exceed_the_slots_across_three_instances() {
    sluice_testkit::shared::calls_in_flight_across_instances::<RedisServer>(&common::bin());
}

#[test]
fn runtime_entries_reach_every_instance_within_a_second() {
    sluice_testkit::shared::entries_reach_every_instance_within_a_second::<RedisServer>(
        &common::bin(),
    );
}
