//! sluice as a least-privilege Redis ACL user, black-box: the user README's line creates
//! (only [`ACL_COMMANDS`], only keys under the prefix) is enough for everything sluice
//! does with Redis: decisions, `/readyz`, the admin's reads and resets of one key and of
//! a whole limit, on one server and on a Redis Cluster. A wrong password stops sluice at
//! start with a message that says so.

mod common;

use common::{Server, admits_exactly};
use serde_json::json;
use sluice_store_redis::ACL_COMMANDS;
use sluice_testkit::servers::{RedisCluster, RedisServer};

const TOKEN: &str = "admin-token-for-acl-tests";
const PASSWORD: &str = "pw-for-the-sluice-user";

/// README's line, with the test's password.
fn acl_line() -> String {
    format!(
        "ACL SETUSER sluice on >PASSWORD resetkeys ~sluice:* resetchannels &sluice:* -@all {ACL_COMMANDS}"
    )
}

fn create_user(server: &RedisServer) {
    server
        .create_acl_user("sluice", PASSWORD, "sluice:*", ACL_COMMANDS)
        .expect("ACL SETUSER");
}

fn config(url: &str, cluster: bool) -> String {
    let url = url.replace("redis://", &format!("redis://sluice:{PASSWORD}@"));
    format!(
        "admin: {{token: {TOKEN}}}
storage: {{backend: redis, url: '{url}', cluster: {cluster}, timeout_ms: 2000}}
limits:
  api: {{rate: 3/hour}}
  wide: {{rate: 100/hour, algorithm: sliding_window}}
"
    )
}

/// Decides, reads, resets one key and a whole limit; every answer comes from Redis.
fn everything_works(s: &Server) {
    admits_exactly(
        s,
        &json!([{"limit": "api", "key": "k"}, {"limit": "wide", "key": "all"}]),
        3,
    );
    assert_eq!(s.get("/readyz").status, 200, "PING is allowed");
    let r = s.reset(Some(TOKEN), &json!({"limit": "api", "key": "k"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let d = s.check(json!({"checks": [{"limit": "api", "key": "k"}]}));
    assert_eq!(d["allowed"], true, "reset: {d}");
    let r = s.call(
        "POST",
        "/v1/admin/reset-limit",
        Some(TOKEN),
        Some(&json!({"limit": "wide"})),
    );
    assert_eq!(r.status, 200, "SCAN and UNLINK are allowed: {}", r.body);
    assert_eq!(r.json()["counters_removed"], 1, "{}", r.body);
    assert!(
        !s.stderr().contains("NOPERM"),
        "no command was refused:\n{}",
        s.stderr()
    );
}

#[test]
fn the_readme_acl_line_is_enough_on_one_server() {
    let redis = RedisServer::start().expect("redis-server");
    create_user(&redis);
    let s = Server::start(&config(&redis.url(), false));
    everything_works(&s);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&acl_line()),
        "README gives the exact ACL line:\n{}",
        acl_line()
    );
}

#[test]
fn the_readme_acl_line_is_enough_on_a_cluster() {
    let cluster = RedisCluster::start(3).expect("a 3-master Redis Cluster");
    for node in cluster.nodes() {
        create_user(node);
    }
    let s = Server::start(&config(&cluster.urls()[0], true));
    everything_works(&s);
}

#[test]
fn a_wrong_password_stops_sluice_at_start() {
    let redis = RedisServer::start().expect("redis-server");
    create_user(&redis);
    let err = common::bin()
        .serve_refuses(&config(&redis.url(), false).replace(PASSWORD, "not-the-password"));
    assert!(err.contains("refused sluice"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "no password in the log: {err}"
    );
}
