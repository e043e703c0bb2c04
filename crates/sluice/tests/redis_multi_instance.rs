//! The Redis store's promise, black-box: several `sluice serve` processes pointing at
//! one Redis enforce one limit together. Three instances share a real redis-server
//! (started on a free port, one per test); 64 client threads, spread over the three,
//! race on one key of a `100/day` limit, and exactly 100 requests must be admitted in
//! total, trial after trial (each trial on a fresh key), for each algorithm.
//!
//! A day-long period keeps a window boundary out of a trial; a trial that straddles a
//! UTC midnight anyway is detected and run again on another key. The store's command
//! timeout is raised so that a slow minute on a shared machine cannot turn into a
//! retried (and so twice charged) decision.

mod common;

use std::sync::Barrier;
use std::time::Instant;

use common::{RedisCommands, RedisReply, RedisServer, Server, now_ms};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
const CLIENTS: usize = 64;
/// Requests per client per trial: 192 requests race for 100 admissions.
const REQUESTS_PER_CLIENT: usize = 3;
const QUOTA: u64 = 100;
const TRIALS: usize = 10;
const PERIOD_MS: u64 = 86_400_000;
/// How far a trial's start and end are widened when looking for a window boundary
/// (clock reads here and on the Redis server are not the same instant).
const BOUNDARY_MARGIN_MS: u64 = 5_000;

struct Cluster {
    redis: RedisServer,
    prefix: String,
    instances: Vec<Server>,
}

fn cluster(algorithm: &str) -> Cluster {
    let redis = RedisServer::start().expect("redis-server (scripts/test installs it)");
    let prefix = format!("it-{algorithm}-{}:", now_ms());
    let config = format!(
        "storage: {{backend: redis, url: '{}', prefix: '{prefix}', timeout_ms: 10000}}
limits:
  shared: {{rate: {QUOTA}/day, algorithm: {algorithm}}}
",
        redis.url()
    );
    let instances = (0..INSTANCES).map(|_| Server::start(&config)).collect();
    Cluster {
        redis,
        prefix,
        instances,
    }
}

fn body(key: &str) -> Vec<u8> {
    json!({"checks": [{"limit": "shared", "key": key}]})
        .to_string()
        .into_bytes()
}

/// One decision on `server`; panics unless it is a well-formed 200.
fn decide(agent: &ureq::Agent, server: &Server, key: &str) -> Value {
    let r = agent
        .post(server.url("/v1/check"))
        .header("content-type", "application/json")
        .send(body(key).as_slice());
    let mut r = r.unwrap_or_else(|e| {
        panic!(
            "POST /v1/check to port {}: {e}\nstderr:\n{}",
            server.port,
            server.stderr()
        )
    });
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("read body");
    assert_eq!(
        status,
        200,
        "POST /v1/check to port {} answered {status} {text}\nstderr:\n{}",
        server.port,
        server.stderr()
    );
    let decision: Value = serde_json::from_str(&text).expect("decision is JSON");
    assert_eq!(
        decision["results"][0]["limit_value"], QUOTA,
        "limit_value in {decision}"
    );
    assert_eq!(
        decision["degraded"], false,
        "decided through Redis: {decision}"
    );
    decision
}

/// Admissions per instance in one race on `key`.
fn race(cluster: &Cluster, key: &str) -> [u64; INSTANCES] {
    let barrier = Barrier::new(CLIENTS);
    let per_client: Vec<(usize, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let instance = client % INSTANCES;
                    let server = &cluster.instances[instance];
                    let agent = common::agent();
                    barrier.wait();
                    let admitted = (0..REQUESTS_PER_CLIENT)
                        .filter(|_| decide(&agent, server, key)["allowed"] == true)
                        .count() as u64;
                    (instance, admitted)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let mut admitted = [0; INSTANCES];
    for (instance, n) in per_client {
        admitted[instance] += n;
    }
    admitted
}

fn exactly_the_quota_across_instances(algorithm: &str) {
    let started = Instant::now();
    let cluster = cluster(algorithm);
    let mut decisions = 0u64;
    let mut keys = Vec::new();
    let mut trial = 0;
    let mut counted = 0;
    while counted < TRIALS {
        trial += 1;
        assert!(
            trial <= TRIALS + 3,
            "too many trials straddled a window boundary"
        );
        let key = format!("trial-{trial}");
        let t0 = now_ms() - BOUNDARY_MARGIN_MS;
        let admitted = race(&cluster, &key);
        decisions += (CLIENTS * REQUESTS_PER_CLIENT) as u64;
        // Afterwards every instance sees the key exhausted.
        let agent = common::agent();
        for server in &cluster.instances {
            let d = decide(&agent, server, &key);
            decisions += 1;
            assert_eq!(
                (
                    d["allowed"].as_bool(),
                    d["results"][0]["remaining"].as_u64()
                ),
                (Some(false), Some(0)),
                "{algorithm}, key {key}: after the race, instance on port {} still admits: {d}",
                server.port
            );
        }
        let t1 = now_ms() + BOUNDARY_MARGIN_MS;
        keys.push(key.clone());
        if t0 / PERIOD_MS != t1 / PERIOD_MS {
            eprintln!("{algorithm}: trial {trial} straddled a window boundary; run again");
            continue;
        }
        let total: u64 = admitted.iter().sum();
        assert_eq!(
            total, QUOTA,
            "{algorithm}, key {key}: {total} admitted in total (per instance {admitted:?}), \
             the shared limit is {QUOTA}"
        );
        assert!(
            admitted.iter().filter(|&&n| n > 0).count() >= 2,
            "{algorithm}, key {key}: admissions {admitted:?} all came from one instance; \
             the race did not exercise sharing"
        );
        counted += 1;
    }

    // Every counter lives under the configured prefix: one per key.
    let RedisReply::Array(stored) = cluster.redis.command(&["KEYS", "*"]) else {
        panic!("KEYS * did not answer an array");
    };
    let stored: Vec<String> = stored
        .into_iter()
        .map(|k| match k {
            RedisReply::Bulk(Some(k)) => k,
            other => panic!("KEYS answered {other:?}"),
        })
        .collect();
    assert_eq!(
        stored.len(),
        keys.len(),
        "one counter per trial key: {stored:?}"
    );
    for k in &stored {
        assert!(
            k.starts_with(&cluster.prefix)
                && keys
                    .iter()
                    .any(|key| k.contains(&format!("{{shared:{key}}}:"))),
            "counter {k:?} is not `{}{{shared:<key>}}:<window>`",
            cluster.prefix
        );
    }

    // One round trip per decision: one successful EVALSHA each (a NOSCRIPT answer,
    // before the script is loaded, counts as a failed call).
    let stats = cluster.redis.command_stats();
    let stat = |field: &str| {
        stats
            .get(&("evalsha".to_string(), field.to_string()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        stat("calls") - stat("failed_calls"),
        decisions,
        "successful EVALSHA calls vs decisions; commandstats: {stats:?}"
    );
    eprintln!(
        "{algorithm}: {counted} trials, {decisions} decisions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn fixed_window_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances("fixed_window");
}

#[test]
fn gcra_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances("gcra");
}

#[test]
fn sliding_window_admits_exactly_the_quota_across_three_instances() {
    exactly_the_quota_across_instances("sliding_window");
}
