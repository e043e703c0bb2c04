//! `storage: {backend: redis, cluster: true}` black-box: three `sluice serve` processes
//! on a real three-master Redis Cluster (started by the test with
//! `redis-cli --cluster create`). Each decision has two checks whose keys live in
//! different slots, on different nodes: a scarce per-key limit and an ample global one.
//! 64 clients race; exactly the scarce quota is admitted, and the global counter is
//! charged for the admitted decisions only: every denied decision gave back what the
//! other slot had reserved.

mod common;

use std::sync::Barrier;

use common::Server;
use serde_json::{Value, json};
use sluice_testkit::servers::{RedisCluster, RedisServer};

const INSTANCES: usize = 3;
const CLIENTS: usize = 64;
const REQUESTS_PER_CLIENT: usize = 3;
const QUOTA: u64 = 100;
const GLOBAL: u64 = 1_000_000;
const TRIALS: usize = 4;

fn check(agent: &ureq::Agent, server: &Server, key: &str, dry_run: bool) -> Value {
    let body = json!({
        "checks": [
            {"limit": "global", "key": "all"},
            {"limit": "scarce", "key": key},
        ],
        "dry_run": dry_run,
    });
    let mut r = agent
        .post(server.url("/v1/check"))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("POST /v1/check: {e}\nstderr:\n{}", server.stderr()));
    assert_eq!(r.status().as_u16(), 200);
    let decision: Value =
        serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("JSON");
    assert_eq!(
        decision["degraded"], false,
        "decided by the cluster: {decision}"
    );
    decision
}

fn slot(cluster: &RedisCluster, key: &str) -> i64 {
    cluster.nodes()[0]
        .query(&["CLUSTER", "KEYSLOT", key])
        .expect("CLUSTER KEYSLOT")
}

#[test]
fn a_cluster_shared_by_three_instances_admits_exactly_the_quota_and_keeps_no_denied_charge() {
    let cluster =
        RedisCluster::start(3).expect("a 3-master Redis Cluster (redis-server, redis-cli)");
    let config = format!(
        "storage: {{backend: redis, url: '{}', cluster: true, prefix: 'c:', timeout_ms: 10000}}
limits:
  scarce: {{rate: {QUOTA}/day, algorithm: fixed_window}}
  global: {{rate: {GLOBAL}/day, algorithm: fixed_window}}
",
        cluster.urls()[1]
    );
    let instances: Vec<Server> = (0..INSTANCES).map(|_| Server::start(&config)).collect();

    let mut admitted_total = 0;
    for trial in 0..TRIALS {
        let key = format!("trial-{trial}");
        assert_ne!(
            slot(&cluster, &format!("c:{{scarce:{key}}}:f86400")),
            slot(&cluster, "c:{global:all}:f86400"),
            "the two checks must live in different slots for this test to mean anything"
        );
        let barrier = Barrier::new(CLIENTS);
        let admitted: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|client| {
                    let (barrier, key, server) = (&barrier, &key, &instances[client % INSTANCES]);
                    scope.spawn(move || {
                        let agent = common::agent();
                        barrier.wait();
                        (0..REQUESTS_PER_CLIENT)
                            .filter(|_| check(&agent, server, key, false)["allowed"] == true)
                            .count() as u64
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("client")).sum()
        });
        assert_eq!(admitted, QUOTA, "trial {trial}: exactly the scarce quota");
        admitted_total += admitted;
    }

    let agent = common::agent();
    let d = check(&agent, &instances[0], "fresh", true);
    assert_eq!(
        d["results"][0]["remaining"].as_u64(),
        // A dry run reports what would be left after it.
        Some(GLOBAL - admitted_total - 1),
        "the global counter paid for the {admitted_total} admitted decisions only, not for \
         the {} denied ones: {d}",
        (CLIENTS * REQUESTS_PER_CLIENT * TRIALS) as u64 - admitted_total
    );

    // The counters are spread over the nodes.
    let keys_on = |node: &RedisServer| -> i64 { node.query(&["DBSIZE"]).expect("DBSIZE") };
    let per_node: Vec<i64> = cluster.nodes().iter().map(keys_on).collect();
    assert_eq!(
        per_node.iter().sum::<i64>(),
        TRIALS as i64 + 1,
        "{per_node:?}"
    );
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "counters on several nodes: {per_node:?}"
    );
}
