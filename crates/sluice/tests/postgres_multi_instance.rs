//! The PostgreSQL store's promise, black-box: several `sluice serve` processes pointing
//! at one database enforce one limit together. Three instances share a real PostgreSQL
//! (a fresh cluster on a free port, one per test); 64 client threads, spread over the
//! three, race on one key of a `100/day` limit, and exactly 100 requests must be
//! admitted in total, trial after trial (each trial on a fresh key), for each algorithm.
//! Every decision is one top-level statement (`pg_stat_statements`).
//!
//! A day-long period keeps a window boundary out of a trial; a trial that straddles a
//! UTC midnight anyway is detected and run again on another key. The store's timeout is
//! raised so that a slow minute on a shared machine cannot turn into a degraded decision.

mod common;

use std::sync::Barrier;
use std::time::Instant;

use common::{PostgresServer, Server, now_ms};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
const CLIENTS: usize = 64;
/// Requests per client per trial: 192 requests race for 100 admissions.
const REQUESTS_PER_CLIENT: usize = 3;
const QUOTA: u64 = 100;
const TRIALS: usize = 10;
const PERIOD_MS: u64 = 86_400_000;
/// How far a trial's start and end are widened when looking for a window boundary.
const BOUNDARY_MARGIN_MS: u64 = 5_000;

struct Cluster {
    postgres: PostgresServer,
    prefix: String,
    instances: Vec<Server>,
}

fn cluster(algorithm: &str) -> Cluster {
    let postgres = PostgresServer::start_with(&[
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=top",
    ])
    .expect("PostgreSQL (scripts/test installs it)");
    postgres
        .psql("CREATE EXTENSION pg_stat_statements")
        .expect("pg_stat_statements");
    let prefix = format!("it-{algorithm}-{}:", now_ms());
    let config = format!(
        "storage: {{backend: postgres, url: '{}', prefix: '{prefix}', timeout_ms: 10000, pool_size: 8}}
limits:
  shared: {{rate: {QUOTA}/day, algorithm: {algorithm}}}
",
        postgres.url()
    );
    // Started together: they race to install the schema, which must be harmless.
    let instances = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..INSTANCES)
            .map(|_| scope.spawn(|| Server::start(&config)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sluice serve starts"))
            .collect()
    });
    Cluster {
        postgres,
        prefix,
        instances,
    }
}

fn body(key: &str) -> Vec<u8> {
    json!({"checks": [{"limit": "shared", "key": key}]})
        .to_string()
        .into_bytes()
}

/// One decision on `server`; panics unless it is a well-formed, non-degraded 200.
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
        decision["degraded"],
        false,
        "decided through PostgreSQL: {decision}\nstderr:\n{}",
        server.stderr()
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
    cluster
        .postgres
        .psql("SELECT pg_stat_statements_reset()")
        .expect("reset statistics");
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

    // One round trip per decision: one top-level statement each, and that statement
    // is the decision function (the sweeps are the only other statements). Read
    // before this test's own queries.
    let statements = cluster
        .postgres
        .psql(
            "SELECT query || '|' || calls FROM pg_stat_statements \
             WHERE query NOT LIKE '%pg_stat_statements%' ORDER BY calls DESC",
        )
        .expect("statement statistics");
    let mut decide_calls = 0;
    for line in statements.lines() {
        let (query, calls) = line.rsplit_once('|').expect("query|calls");
        let calls: u64 = calls.parse().expect("calls");
        if query.contains("sluice_decide") {
            decide_calls += calls;
        } else {
            assert!(
                query.contains("sluice_sweep")
                    || query.contains("statement_timeout")
                    || query.starts_with("START TRANSACTION")
                    || query.starts_with("COMMIT"),
                "only decisions and sweeps ran: {query} ({calls} calls)"
            );
        }
    }
    assert_eq!(
        decide_calls, decisions,
        "sluice_decide calls vs decisions:\n{statements}"
    );
    // Every counter lives under the configured prefix: one row per key.
    let stored = cluster
        .postgres
        .psql("SELECT key FROM public.sluice_counters ORDER BY key")
        .expect("rows");
    let stored: Vec<&str> = stored.lines().collect();
    assert_eq!(
        stored.len(),
        keys.len(),
        "one counter per trial key: {stored:?}"
    );
    for k in &stored {
        assert!(
            k.starts_with(&cluster.prefix) && keys.iter().any(|key| k.ends_with(key.as_str())),
            "counter {k:?} is not `{}<counter>:<key>`",
            cluster.prefix
        );
    }

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
