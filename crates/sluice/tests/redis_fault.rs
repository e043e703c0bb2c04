//! Redis failing under sluice: killed while load runs (no 5xx and no panic, decisions go
//! on degraded under `on_error: local` and are counted, `/readyz` says so, shared
//! counting resumes by itself after the restart and each change of state is logged
//! once: `sluice_testkit::shared`, shared with PostgreSQL); and `/readyz` and
//! `/v1/stats` answering from the known state without a PING each.

mod common;

use std::time::{Duration, Instant};

use common::{Server, readyz_turns};
use sluice_testkit::servers::RedisServer;
use sluice_testkit::shared::{SharedStore, outage_under_load_degrades_and_sharing_resumes};

#[test]
fn killing_redis_under_load_degrades_without_5xx_and_sharing_resumes_after_restart() {
    outage_under_load_degrades_and_sharing_resumes::<RedisServer>(&common::bin());
}

#[test]
fn readyz_and_stats_answer_from_the_known_state_without_flooding_redis() {
    let mut redis = RedisServer::start().expect("redis-server (scripts/test installs it)");
    let s = Server::start(&format!(
        "{}limits:\n  api: {{rate: 1000000/hour}}\n",
        redis.storage("prefix: 'health:', on_error: local, timeout_ms: 200")
    ));
    let pings = |redis: &RedisServer| {
        redis
            .command_stats()
            .expect("INFO commandstats")
            .get(&("ping".to_string(), "calls".to_string()))
            .copied()
            .unwrap_or(0)
    };
    let before = pings(&redis);
    let started = Instant::now();
    for i in 0..1000 {
        let path = if i % 2 == 0 { "/readyz" } else { "/v1/stats" };
        let r = s.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let took = started.elapsed();
    let sent = pings(&redis) - before;
    // At most one ping per second (the probe interval), and one to start with.
    let allowed = took.as_secs() + 2;
    assert!(
        sent <= allowed,
        "1000 calls of /readyz and /v1/stats in {took:?} sent {sent} PINGs to Redis (at most {allowed})"
    );
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], true);

    // An outage is still seen with no decisions flowing, and so is the recovery.
    redis.stop();
    let went = readyz_turns(&s, 503, Duration::from_secs(3));
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], false);
    redis.restart().expect("restart redis-server");
    let came = readyz_turns(&s, 200, Duration::from_secs(4));
    eprintln!("/readyz turned 503 after {went:?}, 200 after {came:?}");
    assert_eq!(s.get("/v1/stats").json()["store"]["reachable"], true);
}
