//! Redis Sentinel, black-box: `sluice serve` finds the primary through three
//! `redis-sentinel`s (Debian's), decides on it, and when the primary is killed under
//! load it answers every request (degraded by `on_error` while there is no primary,
//! never a 5xx), and once the sentinels have promoted the replica it decides on the new
//! primary, without a restart. sluice connects to the primaries as the least-privilege
//! ACL user of README (created on both servers: ACLs are not replicated).

mod common;

use std::time::{Duration, Instant};

use common::{Server, admits_exactly, hit_until_not_degraded};
use serde_json::json;
use sluice_store_redis::ACL_COMMANDS;
use sluice_testkit::sentinel::{MASTER_NAME, SentinelGroup};
use sluice_testkit::shared::under_load;

const PASSWORD: &str = "sentinel-test-password";

/// README's least-privilege user on every server of the group.
fn create_users(group: &SentinelGroup) {
    for server in group.servers() {
        server
            .create_acl_user("sluice", PASSWORD, "sluice:*", ACL_COMMANDS)
            .expect("ACL SETUSER");
    }
}

fn config(group: &SentinelGroup, on_error: &str) -> String {
    let nodes: Vec<String> = group
        .sentinel_urls()
        .iter()
        .map(|url| format!("'{url}'"))
        .collect();
    format!(
        "storage:
  backend: redis
  sentinel: {{master: {MASTER_NAME}, nodes: [{}]}}
  url: 'redis://sluice:{PASSWORD}@{MASTER_NAME}'
  timeout_ms: 300
  on_error: {on_error}
limits:
  api: {{rate: 1000000/hour}}
  scarce: {{rate: 3/hour}}
",
        nodes.join(", ")
    )
}

/// Keys on the server listening on `port`.
fn keys_on(group: &SentinelGroup, port: u16) -> Vec<String> {
    let server = group
        .servers()
        .iter()
        .find(|s| s.port() == port)
        .expect("a server of the group");
    server.query(&["KEYS", "*"]).expect("KEYS")
}

#[test]
fn sluice_follows_a_failover_without_a_restart_and_never_answers_5xx() {
    let mut group = SentinelGroup::start().expect("redis-server and redis-sentinel");
    let first = group.primary_port().expect("the primary");
    create_users(&group);
    let s = Server::start(&config(&group, "local"));
    admits_exactly(&s, &json!([{"limit": "scarce", "key": "before"}]), 3);
    assert!(
        keys_on(&group, first)
            .iter()
            .any(|k| k.contains("{scarce:before}")),
        "counted on the primary"
    );

    let ((promoted, failover_took), load) = under_load(&s, "api", 4, || {
        std::thread::sleep(Duration::from_millis(500));
        let killed_at = Instant::now();
        let promoted = group
            .kill_primary()
            .and_then(|old| group.wait_for_failover(old));
        let took = killed_at.elapsed();
        // Load goes on across the promotion and sluice's switch to the new primary.
        std::thread::sleep(Duration::from_millis(2_500));
        (promoted, took)
    });
    let promoted = promoted.expect("the sentinels promote the replica");
    assert_ne!(promoted, first);
    eprintln!("the sentinels promoted port {promoted} {failover_took:?} after the kill");

    assert_eq!(
        load.statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "only 200s, never a 5xx: {:?}\n{}",
        load.statuses,
        s.stderr()
    );
    assert!(
        load.degraded > 0,
        "decisions without a primary were degraded (on_error: local)"
    );

    // Shared counting on the new primary, in the same sluice process.
    hit_until_not_degraded(&s, "api", "after", Duration::from_secs(5));
    admits_exactly(&s, &json!([{"limit": "scarce", "key": "after"}]), 3);
    assert!(
        keys_on(&group, promoted)
            .iter()
            .any(|k| k.contains("{scarce:after}")),
        "counted on the promoted replica"
    );
    let log = s.stderr();
    assert!(log.contains("store reachable again"), "{log}");
}

#[test]
fn sentinel_settings_errors_name_their_line() {
    let err =
        common::bin().serve_refuses("storage:\n  backend: redis\n  sentinel: {master: mymaster}\n");
    assert!(err.contains("sluice.yaml:4:"), "{err}");
    assert!(err.contains("storage.sentinel needs `nodes`"), "{err}");
    let err = common::bin().serve_refuses(
        "storage:\n  backend: redis\n  cluster: true\n  sentinel: {master: m, nodes: [redis://127.0.0.1:1]}\n",
    );
    assert!(err.contains("exclude each other"), "{err}");
    let err = common::bin().serve_refuses(
        "storage:\n  backend: redis\n  sentinel: {master: m, nodes: ['10.0.0.1:26379']}\n",
    );
    assert!(err.contains("must be a Redis URL"), "{err}");
}
