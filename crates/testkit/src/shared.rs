//! One harness for the black-box tests of the shared stores (Redis, PostgreSQL): what
//! differs between them is a [`SharedStore`]; what a user must see from any of them is
//! written once here, as generic test bodies a test file calls per backend:
//!
//! - [`exactly_the_quota_across_instances`]: three `sluice serve` processes on one store
//!   admit exactly one limit's quota together, race after race, at most one round trip
//!   per decision, every counter under the configured prefix.
//! - [`outage_under_load_degrades_and_sharing_resumes`]: the store goes down while load
//!   runs; no 5xx, decisions go on degraded (and are counted), `/readyz` follows the
//!   store's state, shared counting resumes by itself and each change is logged once.
//! - [`calls_in_flight_across_instances`]: three instances and 64 clients never run more
//!   calls at once than a `concurrency` limit allows; a crashed client's slots come back
//!   when its reservations expire.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::http::agent;
use crate::metrics::metric_value;
use crate::servers::{PostgresServer, RedisServer, ServerError};
use crate::sluice::{Binary, ServeOpts, Server, hit_until_not_degraded, now_ms, readyz_becomes};

/// A shared store's server, as the shared-store tests drive it.
pub trait SharedStore: Sized {
    /// The store's name in assertion messages ("Redis", "PostgreSQL").
    const NAME: &'static str;

    /// Whether counters survive [`SharedStore::restart`] (PostgreSQL keeps its data
    /// directory; the test Redis has no persistence).
    const KEEPS_COUNTERS_OVER_RESTART: bool;

    /// Store settings the multi-instance race adds to its `storage:` mapping.
    const RACE_SETTINGS: &'static str;

    /// Starts a fresh server, ready to count what sluice sends it; panics when it
    /// cannot (`scripts/test` installs the servers).
    fn start() -> Self;

    /// The `storage:` line of a sluice config for this store, with `settings` (e.g.
    /// `prefix: 'p:', timeout_ms: 200`) after the backend and url.
    fn storage(&self, settings: &str) -> String;

    /// Takes the server down as a crash would: open connections drop.
    fn stop(&mut self);

    /// Brings it back on the same port.
    fn restart(&mut self) -> Result<(), ServerError>;

    /// Forgets the commands or statements counted so far.
    fn reset_counts(&self);

    /// How many round trips the store's decisions took since
    /// [`SharedStore::reset_counts`] (one per decision, or fewer where concurrent
    /// decisions share one), asserting that nothing else but upkeep ran (sweeps, and
    /// polls of the runtime entries' version).
    fn decision_round_trips(&self) -> u64;

    /// The names of every counter the store holds.
    fn counters(&self) -> Vec<String>;

    /// Whether `counter` is the stored name of limit `limit`'s counter for `key` under
    /// `prefix`.
    fn counter_is(counter: &str, prefix: &str, limit: &str, key: &str) -> bool;

    /// The stored names' shape under `prefix`, for assertion messages.
    fn counter_shape(prefix: &str) -> String;

    /// Text that must stay out of sluice's default log while the store fails.
    const UNWANTED_LOG: &'static [&'static str];
}

impl SharedStore for RedisServer {
    const NAME: &'static str = "Redis";
    const KEEPS_COUNTERS_OVER_RESTART: bool = false;
    const RACE_SETTINGS: &'static str = "";
    const UNWANTED_LOG: &'static [&'static str] = &[];

    fn start() -> Self {
        RedisServer::start().expect("redis-server (scripts/test installs it)")
    }

    fn storage(&self, settings: &str) -> String {
        format!(
            "storage: {{backend: redis, url: '{}', {settings}}}\n",
            self.url()
        )
    }

    fn stop(&mut self) {
        RedisServer::stop(self);
    }

    fn restart(&mut self) -> Result<(), ServerError> {
        RedisServer::restart(self)
    }

    fn reset_counts(&self) {
        let _: String = self
            .query(&["CONFIG", "RESETSTAT"])
            .expect("CONFIG RESETSTAT");
    }

    /// Successful EVALSHAs: one per decision, or one per batch of concurrent ones (a
    /// NOSCRIPT answer, before the script is loaded, counts as a failed call and is
    /// followed by the script itself).
    fn decision_round_trips(&self) -> u64 {
        let stats = self.command_stats().expect("INFO commandstats");
        let stat = |field: &str| {
            stats
                .get(&("evalsha".to_string(), field.to_string()))
                .copied()
                .unwrap_or(0)
        };
        stat("calls") - stat("failed_calls")
    }

    fn counters(&self) -> Vec<String> {
        self.query(&["KEYS", "*"]).expect("KEYS *")
    }

    fn counter_is(counter: &str, prefix: &str, limit: &str, key: &str) -> bool {
        counter.starts_with(prefix) && counter.contains(&format!("{{{limit}:{key}}}:"))
    }

    fn counter_shape(prefix: &str) -> String {
        format!("{prefix}{{<limit>:<key>}}:<window>")
    }
}

impl SharedStore for PostgresServer {
    const NAME: &'static str = "PostgreSQL";
    const KEEPS_COUNTERS_OVER_RESTART: bool = true;
    const RACE_SETTINGS: &'static str = ", pool_size: 8";
    const UNWANTED_LOG: &'static [&'static str] = &["WARN deadpool", "terminating connection"];

    /// With `pg_stat_statements` counting top-level statements.
    fn start() -> Self {
        let postgres = PostgresServer::start_with(&[
            "shared_preload_libraries=pg_stat_statements",
            "pg_stat_statements.track=top",
        ])
        .expect("PostgreSQL (scripts/test installs it)");
        postgres
            .psql("CREATE EXTENSION pg_stat_statements")
            .expect("pg_stat_statements");
        postgres
    }

    fn storage(&self, settings: &str) -> String {
        format!(
            "storage: {{backend: postgres, url: '{}', {settings}}}\n",
            self.url()
        )
    }

    fn stop(&mut self) {
        PostgresServer::stop(self);
    }

    fn restart(&mut self) -> Result<(), ServerError> {
        PostgresServer::restart(self)
    }

    fn reset_counts(&self) {
        self.psql("SELECT pg_stat_statements_reset()")
            .expect("reset statistics");
    }

    /// One top-level statement per decision, and that statement is the decision
    /// function; the sweeps (and their transactions) are the only other statements.
    /// Call it before the test's own queries, which would count too.
    fn decision_round_trips(&self) -> u64 {
        let statements = self
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
                // Upkeep: sweeps, and every instance polling the runtime entries' version.
                assert!(
                    query.contains("sluice_sweep")
                        || query.contains("sluice_records_version")
                        || query.contains("statement_timeout")
                        || query.starts_with("START TRANSACTION")
                        || query.starts_with("COMMIT"),
                    "only decisions and sweeps ran: {query} ({calls} calls)\n{statements}"
                );
            }
        }
        decide_calls
    }

    fn counters(&self) -> Vec<String> {
        self.psql("SELECT key FROM public.sluice_counters ORDER BY key")
            .expect("rows")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn counter_is(counter: &str, prefix: &str, _limit: &str, key: &str) -> bool {
        counter.starts_with(prefix) && counter.ends_with(key)
    }

    fn counter_shape(prefix: &str) -> String {
        format!("{prefix}<counter>:<key>")
    }
}

// ---- several instances, one limit ------------------------------------------------

/// `sluice serve` processes in the race.
const INSTANCES: usize = 3;
/// Client threads, spread over the instances.
const CLIENTS: usize = 64;
/// Requests per client per trial: 192 requests race for 100 admissions.
const REQUESTS_PER_CLIENT: usize = 3;
/// The shared limit: `100/day`.
const QUOTA: u64 = 100;
/// Races counted per algorithm.
const TRIALS: usize = 10;
/// A day: a window boundary inside a trial is rare, and detected.
const PERIOD_MS: u64 = 86_400_000;
/// How far a trial's start and end are widened when looking for a window boundary
/// (clock reads here and on the store's server are not the same instant).
const BOUNDARY_MARGIN_MS: u64 = 5_000;

/// One decision on `server`; panics unless it is a well-formed 200 decided by the
/// store (not degraded).
fn decide<S: SharedStore>(agent: &ureq::Agent, server: &Server, key: &str) -> Value {
    let body = json!({"checks": [{"limit": "shared", "key": key}]}).to_string();
    let r = agent
        .post(server.url("/v1/check"))
        .header("content-type", "application/json")
        .send(body.as_bytes());
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
        "decided through {}: {decision}\nstderr:\n{}",
        S::NAME,
        server.stderr()
    );
    decision
}

/// Admissions per instance in one race on `key`.
fn race<S: SharedStore>(instances: &[Server], key: &str) -> [u64; INSTANCES] {
    let barrier = Barrier::new(CLIENTS);
    let per_client: Vec<(usize, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let instance = client % INSTANCES;
                    let server = &instances[instance];
                    let agent = agent();
                    barrier.wait();
                    let admitted = (0..REQUESTS_PER_CLIENT)
                        .filter(|_| decide::<S>(&agent, server, key)["allowed"] == true)
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

/// Three instances of `bin` share a fresh `S` under a `100/day` limit of `algorithm`;
/// 64 client threads spread over them race on one key, and exactly 100 requests are
/// admitted in total, trial after trial (each on a fresh key), by at least two
/// instances, after which every instance sees the key exhausted. A trial that
/// straddles a UTC midnight is run again on another key. The store's timeout is
/// raised so that a slow minute on a shared machine cannot turn into a degraded (or
/// retried, so twice charged) decision.
pub fn exactly_the_quota_across_instances<S: SharedStore>(bin: &Binary, algorithm: &str) {
    let started = Instant::now();
    let store = S::start();
    let prefix = format!("it-{algorithm}-{}:", now_ms());
    let config = format!(
        "{}limits:\n  shared: {{rate: {QUOTA}/day, algorithm: {algorithm}}}\n",
        store.storage(&format!(
            "prefix: '{prefix}', timeout_ms: 10000{}",
            S::RACE_SETTINGS
        ))
    );
    // Started together: a store with a schema sees them race to install it, which
    // must be harmless.
    let instances: Vec<Server> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..INSTANCES)
            .map(|_| scope.spawn(|| Server::start_with_bin(bin, &config, &ServeOpts::default())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sluice serve starts"))
            .collect()
    });
    store.reset_counts();
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
        let admitted = race::<S>(&instances, &key);
        decisions += (CLIENTS * REQUESTS_PER_CLIENT) as u64;
        // Afterwards every instance sees the key exhausted.
        let agent = agent();
        for server in &instances {
            let d = decide::<S>(&agent, server, &key);
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

    // At most one round trip per decision (read before the queries below, which may
    // count): concurrent decisions may share one (Redis batches them).
    let round_trips = store.decision_round_trips();
    assert!(
        (1..=decisions).contains(&round_trips),
        "{} decision round trips for {decisions} decisions",
        S::NAME
    );
    // Every counter lives under the configured prefix: one per key.
    let stored = store.counters();
    assert_eq!(
        stored.len(),
        keys.len(),
        "one counter per trial key: {stored:?}"
    );
    for k in &stored {
        assert!(
            keys.iter()
                .any(|key| S::counter_is(k, &prefix, "shared", key)),
            "counter {k:?} is not `{}`",
            S::counter_shape(&prefix)
        );
    }
    eprintln!(
        "{algorithm}: {counted} trials, {decisions} decisions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---- the store down under load ---------------------------------------------------

/// Load from six threads while `S` crashes and comes back: only 200s (never a 5xx),
/// some decided degraded under `on_error: local` and counted in `/metrics`; `/readyz`
/// answers 503 within 3 s of the crash and 200 within 5 s of the restart; then shared
/// counting resumes (the counter spent before the crash is still there when the store
/// keeps its data, fresh when it does not), and the outage and the recovery are each
/// logged once.
pub fn outage_under_load_degrades_and_sharing_resumes<S: SharedStore>(bin: &Binary) {
    let mut store = S::start();
    let s = Server::start_with_bin(
        bin,
        &format!(
            "{}limits:\n  api: {{rate: 1000000/hour}}\n  kept: {{rate: 10/hour}}\n",
            store.storage("prefix: 'fault:', on_error: local, timeout_ms: 200")
        ),
        &ServeOpts::default(),
    );
    // Spend 4 of `kept` before the outage; PostgreSQL commits asynchronously, so give
    // its WAL writer a few hundred milliseconds before the crash.
    for _ in 0..4 {
        assert_eq!(s.hit("kept", "k", None)["degraded"], false);
    }
    std::thread::sleep(Duration::from_millis(1_000));

    let ((went_unready, came_back), load) = under_load(&s, "api", 6, || {
        std::thread::sleep(Duration::from_millis(800));
        store.stop();
        let went_unready = readyz_becomes(&s, 503, Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(1_000));
        let restarted = store.restart();
        let came_back = restarted.is_ok() && readyz_becomes(&s, 200, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1_000));
        (went_unready, came_back)
    });
    let (statuses, degraded) = (load.statuses, load.degraded);
    assert!(
        went_unready,
        "/readyz answered 503 while {} was down",
        S::NAME
    );
    assert!(
        came_back,
        "/readyz answered 200 again after the restart\n{}",
        s.stderr()
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "only 200s, never a 5xx: {statuses:?}"
    );
    assert!(
        degraded > 0,
        "decisions while {} was down were degraded",
        S::NAME
    );

    // Shared counting is back: fresh decisions are not degraded and land in the store.
    let d = hit_until_not_degraded(&s, "kept", "k", Duration::from_secs(3));
    let remaining = if S::KEEPS_COUNTERS_OVER_RESTART { 5 } else { 9 };
    assert_eq!(
        d["results"][0]["remaining"],
        remaining,
        "the counter spent before the restart (kept over it: {}): {d}",
        S::KEEPS_COUNTERS_OVER_RESTART
    );
    let degraded_total =
        metric_value(&s.metrics(), "sluice_degraded_decisions_total", &[]).unwrap_or(0.0);
    assert!(
        degraded_total > 0.0,
        "degraded decisions are counted in metrics"
    );
    let log = s.stderr();
    assert_eq!(
        log.matches("store unreachable").count(),
        1,
        "the outage is logged once:\n{log}"
    );
    assert!(
        log.contains("store reachable again"),
        "and the recovery:\n{log}"
    );
    for unwanted in S::UNWANTED_LOG {
        assert!(
            !log.contains(unwanted),
            "the client's own per-connection chatter ({unwanted:?}) stays out of the \
             default log:\n{log}"
        );
    }
}

/// Slots of the concurrency limit [`calls_in_flight_across_instances`] runs under.
const SLOTS: u64 = 4;

/// One POST of `body` to `path` on `server`: the status and the JSON answer.
fn post(agent: &ureq::Agent, server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = agent
        .post(server.url(path))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes());
    let mut r = r.unwrap_or_else(|e| panic!("POST {path} to port {}: {e}", server.port));
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("read body");
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, value)
}

/// Three instances of `bin` share a fresh `S` under `concurrency: 4`; 64 client threads
/// spread over them reserve a slot (on one instance), run a call that an "upstream"
/// counter measures (a few milliseconds), and settle (on another instance). The
/// upstream never sees more than 4 calls at once (and more than one). Then a client that
/// crashes while holding every slot (4 reservations granted, a fifth refused): its slots
/// come back when its reservations expire, not before.
pub fn calls_in_flight_across_instances<S: SharedStore>(bin: &Binary) {
    let store = S::start();
    let prefix = format!("inflight-{}:", now_ms());
    let config = format!(
        "{}limits:\n  in_flight: {{concurrency: {SLOTS}}}\n",
        store.storage(&format!(
            "prefix: '{prefix}', timeout_ms: 10000{}",
            S::RACE_SETTINGS
        ))
    );
    let instances: Vec<Server> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..INSTANCES)
            .map(|_| scope.spawn(|| Server::start_with_bin(bin, &config, &ServeOpts::default())))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sluice serve starts"))
            .collect()
    });
    let running = AtomicUsize::new(0);
    let most = AtomicUsize::new(0);
    let completed = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(4);
    let reserve_body =
        json!({"checks": [{"limit": "in_flight", "key": "shared"}], "ttl_ms": 30000});
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (instances, running, most, completed) = (&instances, &running, &most, &completed);
            let reserve_body = &reserve_body;
            scope.spawn(move || {
                let agent = agent();
                let mut turn = client;
                while Instant::now() < deadline {
                    turn += 1;
                    let here = &instances[turn % INSTANCES];
                    let (status, answer) = post(&agent, here, "/v1/reserve", reserve_body);
                    assert_eq!(status, 200, "reserve: {answer}");
                    assert_eq!(
                        answer["degraded"],
                        false,
                        "decided by {}: {answer}",
                        S::NAME
                    );
                    let Some(token) = answer["reservation"].as_str() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    // The upstream: how many calls run at once.
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    running.fetch_sub(1, Ordering::SeqCst);
                    completed.fetch_add(1, Ordering::SeqCst);
                    let there = &instances[(turn + 1) % INSTANCES];
                    let (status, settled) = post(
                        &agent,
                        there,
                        "/v1/settle",
                        &json!({"reservation": token, "cost": 1}),
                    );
                    assert_eq!(status, 200, "settle on another instance: {settled}");
                }
            });
        }
    });
    let most = most.load(Ordering::SeqCst) as u64;
    assert!(
        most <= SLOTS,
        "{}: the upstream saw {most} calls at once under concurrency {SLOTS}",
        S::NAME
    );
    // That all 4 slots can be held at once is checked exactly below (the crashed
    // client); under this load a busy machine may not line 4 calls up at once.
    assert!(
        most >= 2,
        "{}: calls ran concurrently (at most {most} at once)",
        S::NAME
    );
    assert!(
        completed.load(Ordering::SeqCst) > 20,
        "{}: calls went through",
        S::NAME
    );

    // A crashed client: it holds every slot and never settles; the slots come back when
    // its reservations expire.
    let agent = agent();
    let short = json!({"checks": [{"limit": "in_flight", "key": "crash"}], "ttl_ms": 1500});
    for instance in instances.iter().cycle().take(SLOTS as usize) {
        let (_, answer) = post(&agent, instance, "/v1/reserve", &short);
        assert!(answer["reservation"].is_string(), "a slot: {answer}");
    }
    let reserved_at = Instant::now();
    let (_, blocked) = post(&agent, &instances[0], "/v1/reserve", &short);
    assert_eq!(blocked["allowed"], false, "every slot is held: {blocked}");
    let retry = blocked["retry_after_ms"].as_u64().unwrap_or(0);
    assert!(
        (1..=1500).contains(&retry),
        "{}: retry_after_ms {retry} says when the first slot expires",
        S::NAME
    );
    while reserved_at.elapsed() < Duration::from_millis(1700) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, back) = post(&agent, &instances[1], "/v1/reserve", &short);
    assert_eq!(
        back["allowed"],
        true,
        "{}: the crashed client's slots expired: {back}",
        S::NAME
    );
}

/// The admin token of [`entries_reach_every_instance_within_a_second`]'s instances.
const ENTRIES_TOKEN: &str = "entries-admin-token-0123456789abcdef";

fn entry(server: &Server, path: &str, body: &Value) -> Value {
    let r = server.call("POST", path, Some(ENTRIES_TOKEN), Some(body));
    assert_eq!(r.status, 200, "{path} {body}: {}", r.body);
    serde_json::from_str(&r.body).expect("JSON answer")
}

/// A dry-run check of `api` for `key` on `server`: nothing is spent.
fn peek(server: &Server, key: &str) -> Value {
    server.check(json!({"checks": [{"limit": "api", "key": key}], "dry_run": true}))
}

/// How long until `server` shows what `seen` looks for, polling; panics after 3 s.
fn until(server: &Server, what: &str, seen: impl Fn(&Server) -> bool) -> Duration {
    let started = Instant::now();
    while !seen(server) {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: not seen on port {} after 3 s",
            server.port
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

/// Runtime entries made through one instance are enforced by the two others within a
/// second: a plan assignment, a rate override (which keeps what was spent), a subject
/// block and an address block; a removal too. A new instance enforces them from its
/// first request, and where the store keeps its data over a restart, so do they.
pub fn entries_reach_every_instance_within_a_second<S: SharedStore>(bin: &Binary) {
    let mut store = S::start();
    let prefix = format!("entries-{}:", now_ms());
    let config = format!(
        "admin: {{token: {ENTRIES_TOKEN}}}\n{}limits:\n  api:\n    rate: 3/day\n    algorithm: fixed_window\n    plans: {{pro: {{rate: 100/day}}}}\n",
        store.storage(&format!("prefix: '{prefix}', timeout_ms: 2000"))
    );
    let start = || Server::start_with_bin(bin, &config, &ServeOpts::default());
    let (a, b, c) = (start(), start(), start());
    let mut slowest = Duration::ZERO;
    let mut seen_on_others = |what: &str, seen: &dyn Fn(&Server) -> bool| {
        for other in [&b, &c] {
            slowest = slowest.max(until(other, what, seen));
        }
    };

    entry(
        &a,
        "/v1/admin/entries",
        &json!({"kind": "plan", "subject": "customer:42", "plan": "pro"}),
    );
    seen_on_others("plan pro", &|s| {
        peek(s, "customer:42")["results"][0]["plan"] == "pro"
    });

    // What was spent stays spent: 3 of 3, then an override to 5/day leaves 2 (a fixed
    // window counts requests; gcra's state is time, see README).
    for _ in 0..3 {
        assert_eq!(a.hit("api", "customer:45", None)["allowed"], true);
    }
    assert_eq!(a.hit("api", "customer:45", None)["allowed"], false);
    entry(
        &a,
        "/v1/admin/entries",
        &json!({"kind": "rate", "subject": "customer:45", "limit": "api", "rate": "5/day"}),
    );
    seen_on_others("override", &|s| {
        peek(s, "customer:45")["results"][0]["plan"] == "override"
    });
    let after = b.hit("api", "customer:45", None);
    assert_eq!(after["allowed"], true, "{after}");
    assert_eq!(after["results"][0]["limit_value"], 5);
    assert_eq!(
        after["results"][0]["remaining"], 1,
        "3 spent before, 1 now: {after}"
    );

    entry(
        &a,
        "/v1/admin/entries",
        &json!({"kind": "block", "subject": "user:7", "reason": "abuse"}),
    );
    seen_on_others("subject block", &|s| {
        peek(s, "user:7")["listed"]["list"] == "block"
    });
    let blocked = c.hit("api", "user:7", None);
    assert_eq!(blocked["allowed"], false);
    assert_eq!(blocked["listed"]["reason"], "abuse");

    // An address block refuses forward-auth even where no route limits the request.
    assert_eq!(c.request("GET", "/v1/forward-auth", &[]).status, 200);
    entry(
        &a,
        "/v1/admin/entries",
        &json!({"kind": "block", "ip": "127.0.0.1"}),
    );
    seen_on_others("address block", &|s| {
        s.request("GET", "/v1/forward-auth", &[]).status == 403
    });
    entry(
        &a,
        "/v1/admin/entries/remove",
        &json!({"kind": "block", "ip": "127.0.0.1"}),
    );
    seen_on_others("address unblocked", &|s| {
        s.request("GET", "/v1/forward-auth", &[]).status == 200
    });
    eprintln!(
        "{}: slowest propagation to another instance: {slowest:?}",
        S::NAME
    );
    assert!(
        slowest < Duration::from_secs(1),
        "{}: an entry took {slowest:?} to reach another instance",
        S::NAME
    );

    // A new instance enforces them from its first request.
    drop(b);
    let d = start();
    assert_eq!(peek(&d, "customer:42")["results"][0]["plan"], "pro");
    assert_eq!(peek(&d, "user:7")["listed"]["list"], "block");
    drop(d);

    if S::KEEPS_COUNTERS_OVER_RESTART {
        store.stop();
        store.restart().expect("the store restarts");
        let e = start();
        assert_eq!(peek(&e, "customer:42")["results"][0]["plan"], "pro");
        assert_eq!(peek(&e, "user:7")["listed"]["list"], "block");
    }
    drop((a, c));
}

// ---- load ------------------------------------------------------------------------

/// What the load of [`under_load`] saw.
pub struct Load {
    /// How many answers had each HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    /// How many 200s were decided degraded (by `on_error`).
    pub degraded: usize,
}

/// Runs `during` while `threads` threads send decisions to `s` (one check of `limit`,
/// key `k<thread>`) without pause; stops them when `during` returns, whatever it did,
/// and returns its result with what the load saw.
pub fn under_load<T>(
    s: &Server,
    limit: &str,
    threads: usize,
    during: impl FnOnce() -> T,
) -> (T, Load) {
    let stop = AtomicBool::new(false);
    let degraded = AtomicUsize::new(0);
    let statuses: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
    let result = std::thread::scope(|scope| {
        for t in 0..threads {
            let (stop, degraded, statuses) = (&stop, &degraded, &statuses);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = s.post_json(
                        "/v1/check",
                        &json!({"checks": [{"limit": limit, "key": format!("k{t}")}]}),
                    );
                    if let Ok(mut map) = statuses.lock() {
                        *map.entry(r.status).or_default() += 1;
                    }
                    if r.status == 200 && r.json()["degraded"] == true {
                        degraded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        // The load threads stop whatever happened, so a failure cannot hang the test.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        during()
    });
    let statuses = statuses.into_inner().unwrap_or_else(|e| e.into_inner());
    (
        result,
        Load {
            statuses,
            degraded: degraded.load(Ordering::Relaxed),
        },
    )
}
