//! PostgreSQL-specific behaviour: one statement per decision, reservation and
//! settlement, compact rows with exact expiry, calendar months whatever the session's
//! time zone (and settled into the month's row), a table that shrinks back after a key
//! flood (holds and slots too), reset of a whole limit, the migration (versioned,
//! idempotent, by hand for a DBA, in another schema, unlogged, and over a database of
//! the previous version), no deadlock between decisions, reservations and settlements
//! taking shared counters in opposite orders, batched decisions (exact, sharing calls,
//! deadlock-free over overlapping keys, a bad request failing alone), and survival of a
//! database restart.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::calendar::{month_start, next_month_start};
use sluice_engine::{
    Algorithm, Check, DecisionRequest, Hold, HoldId, Limit, LimitSpec, SettleStatus, Settlement,
    Store, decide,
};
use sluice_store_postgres::{
    PostgresStore, PostgresStoreConfig, PostgresStoreError, SCHEMA_VERSION, SchemaStatus,
    migration_sql,
};
use sluice_testkit::semantics::month_boundary_instants;
use sluice_testkit::servers::PostgresServer;
use sluice_testkit::system_now;

fn limit(name: &str, rates: &[&str]) -> Arc<Limit> {
    let rates = rates.iter().map(|r| r.parse().expect("rate")).collect();
    Arc::new(Limit::new(name, LimitSpec::new(rates)).expect("limit"))
}

fn fixed(name: &str, rate: &str) -> Arc<Limit> {
    let mut spec = LimitSpec::new(vec![rate.parse().expect("rate")]);
    spec.algorithm = Algorithm::FixedWindow;
    Arc::new(Limit::new(name, spec).expect("limit"))
}

fn in_flight(name: &str, slots: u64) -> Arc<Limit> {
    Arc::new(Limit::new(name, LimitSpec::concurrency(slots)).expect("limit"))
}

/// A hold with the `n`th id of this test.
fn hold(n: u64, ttl: Duration) -> Hold {
    Hold {
        id: HoldId {
            id: format!("{n:032x}"),
            digest: format!("digest-{n}"),
        },
        ttl: ttl.as_micros() as i64,
    }
}

/// Settles the reservation `hold` of `request` at `actual`, every window charged.
async fn settle(
    store: &PostgresStore,
    hold: &Hold,
    request: &DecisionRequest,
    actual: &[u64],
) -> SettleStatus {
    let settlement = Settlement {
        hold: Some(hold.id.clone()),
        request: request.clone(),
        actual: actual.to_vec(),
        windows: vec![true; request.window_count()],
    };
    store.settle(&settlement).await.expect("settle")
}

fn request(checks: &[(&Arc<Limit>, &str, u64)]) -> DecisionRequest {
    DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k, c)| Check::new(Arc::clone(l), *k, *c).expect("check"))
            .collect(),
        dry_run: false,
    }
}

fn config(server: &PostgresServer) -> PostgresStoreConfig {
    let mut config = PostgresStoreConfig::new(server.url());
    config.timeout = Duration::from_secs(5);
    config
}

async fn setup_with(settings: &[&str]) -> (PostgresServer, Arc<PostgresStore>) {
    let server = PostgresServer::start_with(settings).expect("PostgreSQL");
    let store = PostgresStore::new(config(&server)).expect("config");
    assert_eq!(
        store.prepare().await.expect("migrate"),
        SchemaStatus::Migrated { from: 0 }
    );
    (server, Arc::new(store))
}

async fn setup() -> (PostgresServer, Arc<PostgresStore>) {
    setup_with(&[]).await
}

fn sql(server: &PostgresServer, sql: &str) -> String {
    server.psql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn rows(server: &PostgresServer) -> u64 {
    sql(server, "SELECT count(*) FROM public.sluice_counters")
        .parse()
        .expect("count")
}

/// A server that counts statements (pg_stat_statements), with a migrated store.
async fn setup_counting_statements() -> (PostgresServer, Arc<PostgresStore>) {
    let (server, store) = setup_with(&[
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=all",
    ])
    .await;
    sql(&server, "CREATE EXTENSION pg_stat_statements");
    (server, store)
}

/// How many statements clients sent since `pg_stat_statements_reset()`, and their text.
fn top_level_statements(server: &PostgresServer) -> (u64, String) {
    let top_level = sql(
        server,
        "SELECT coalesce(sum(calls), 0) || '|' || string_agg(query, ' ; ') FROM pg_stat_statements \
         WHERE toplevel AND query NOT LIKE '%pg_stat_statements%'",
    );
    let (calls, queries) = top_level.split_once('|').expect("two fields");
    (calls.parse().expect("a count"), queries.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_one_statement_whatever_its_checks() {
    let (server, store) = setup_counting_statements().await;
    let a = limit("a", &["5/minute", "100/hour"]);
    let b = limit("b", &["10/second"]);
    let req = request(&[(&a, "user:1", 1), (&b, "ip:1", 1), (&a, "user:1", 1)]);
    decide(&*store, &req)
        .await
        .expect("the first decision prepares the statement");
    sql(&server, "SELECT pg_stat_statements_reset()");
    for _ in 0..10 {
        decide(&*store, &req).await.expect("decide");
    }
    let (calls, queries) = top_level_statements(&server);
    assert_eq!(
        calls, 10,
        "one statement per decision, and nothing else: {queries}"
    );
    assert!(queries.contains("sluice_decide"), "{queries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_and_a_settlement_are_one_statement_each() {
    let (server, store) = setup_counting_statements().await;
    let a = limit("a", &["50/minute", "100/hour"]);
    let c = in_flight("c", 3);
    let req = request(&[(&a, "user:1", 2), (&c, "user:1", 1)]);
    // The first calls prepare the statements.
    store.reserve(&req, &hold(1, HOUR)).await.expect("reserve");
    assert_eq!(
        settle(&store, &hold(1, HOUR), &req, &[1, 1]).await,
        SettleStatus::Settled
    );
    sql(&server, "SELECT pg_stat_statements_reset()");
    for n in 2..7 {
        let h = hold(n, HOUR);
        let outcomes = store.reserve(&req, &h).await.expect("reserve");
        assert!(outcomes.windows.iter().all(|w| w.allowed));
        assert_eq!(
            settle(&store, &h, &req, &[3, 1]).await,
            SettleStatus::Settled
        );
    }
    let (calls, queries) = top_level_statements(&server);
    assert_eq!(
        calls, 10,
        "one statement per call, and nothing else: {queries}"
    );
    assert!(
        queries.contains("sluice_reserve") && queries.contains("sluice_settle"),
        "{queries}"
    );
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_compact_and_expires_when_it_stops_mattering() {
    let (server, store) = setup().await;
    let l = limit("chat", &["5/minute"]);
    decide(&*store, &request(&[(&l, "user:42", 2)]))
        .await
        .expect("decide");
    let row = sql(
        &server,
        "SELECT b, c, expires_at - a, \
         expires_at - (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint \
         FROM public.sluice_counters WHERE key = 'sluice:chat:g60:user:42'",
    );
    let fields: Vec<i64> = row.split('|').map(|f| f.parse().expect("number")).collect();
    assert_eq!(
        &fields[..3],
        &[0, 0, 0],
        "a bare tat, expiring at it: {row}"
    );
    // Two cells of 12 s: the bucket is full again in 24 s, and the row may go then.
    assert!(
        (23_000_000..=24_000_000).contains(&fields[3]),
        "expires in {} µs",
        fields[3]
    );
}

/// `sluice_month_start` agrees with the engine's calendar around every month start from
/// 1969 to 2200, in sessions whose time zone is 14 hours ahead of UTC and 9 behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_functions_calendar_months_agree_with_the_engine_in_any_time_zone() {
    let (server, _store) = setup().await;
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let instants = month_boundary_instants();
    for zone in ["Pacific/Kiritimati", "America/Anchorage"] {
        client
            .batch_execute(&format!("SET TimeZone = '{zone}'"))
            .await
            .expect("set the time zone");
        let rows = client
            .query(
                "SELECT public.sluice_month_start(x.t, 0), public.sluice_month_start(x.t, 1) \
                 FROM unnest($1::bigint[]) WITH ORDINALITY AS x(t, o) ORDER BY x.o",
                &[&instants],
            )
            .await
            .expect("the function runs");
        assert_eq!(rows.len(), instants.len(), "{zone}");
        for (t, row) in instants.iter().zip(&rows) {
            assert_eq!(
                (row.get::<_, i64>(0), row.get::<_, i64>(1)),
                (month_start(*t), next_month_start(*t)),
                "the month holding {t} µs, in {zone}"
            );
        }
    }
}

/// A calendar-month row starts at this month's start and expires at the next one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calendar_month_counter_lives_until_the_next_month_start() {
    let (server, store) = setup().await;
    let l = fixed("budget", "3/month");
    let before = system_now();
    decide(&*store, &request(&[(&l, "key:1", 2)]))
        .await
        .expect("decide");
    if next_month_start(system_now()) != next_month_start(before) {
        return; // decided at a month start: either month may hold it
    }
    assert_eq!(
        sql(
            &server,
            "SELECT a || ':' || b || ':' || c || ':' || expires_at FROM public.sluice_counters \
             WHERE key = 'sluice:budget:f1mo:key:1'"
        ),
        format!("{}:2:0:{}", month_start(before), next_month_start(before))
    );
}

/// A calendar-month window reserved and settled stays in this month's row: a settlement
/// above the estimate (debt, `Window::force`) and one below it (a refund) move this
/// month's count, the row still expires at the next month start, and the debt denies
/// until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calendar_month_reservation_settles_into_the_months_row() {
    let (server, store) = setup().await;
    let budget = fixed("budget", "5/month");
    let month_row = || {
        sql(
            &server,
            "SELECT a || ':' || b || ':' || c || ':' || expires_at FROM public.sluice_counters \
             WHERE key = 'sluice:budget:f1mo:user:1'",
        )
    };
    let before = system_now();
    let (start, next) = (month_start(before), next_month_start(before));
    let estimate = request(&[(&budget, "user:1", 2)]);
    let h = hold(1, HOUR);
    let reserved = store.reserve(&estimate, &h).await.expect("reserve");
    assert!(reserved.windows[0].allowed);
    assert_eq!(reserved.windows[0].remaining, 3);
    // It cost 8: 6 more, 3 past the quota.
    assert_eq!(
        settle(&store, &h, &estimate, &[8]).await,
        SettleStatus::Settled
    );
    let in_debt = month_row();
    let denied = decide(&*store, &request(&[(&budget, "user:1", 1)]))
        .await
        .expect("decide");
    let after = system_now();
    if next_month_start(after) != next {
        return; // ran across a month start: either month may hold the row
    }
    assert_eq!(
        in_debt,
        format!("{start}:8:0:{next}"),
        "in debt, this month"
    );
    assert!(!denied.allowed, "in debt until the next month");
    let retry = denied.retry_after.expect("a retry time");
    assert!(
        (next - after - 1_000_000..=next - before + 1_000_000).contains(&retry),
        "retry in {retry} µs, until the next month start"
    );
    // Work booked without a hold at 0 for an estimate of 6: 6 given back.
    let refund = Settlement {
        hold: None,
        request: request(&[(&budget, "user:1", 6)]),
        actual: vec![0],
        windows: vec![true],
    };
    assert_eq!(
        store.settle(&refund).await.expect("settle"),
        SettleStatus::Settled
    );
    assert_eq!(
        month_row(),
        format!("{start}:2:0:{next}"),
        "refunded, this month"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_flood_is_swept_and_the_table_shrinks_back() {
    let (server, store) = setup().await;
    let limits = [
        limit("g", &["1/second"]),
        limit("f", &["1/second"]),
        limit("s", &["1/second"]),
    ];
    store.start_sweeper(Duration::from_millis(200));
    for round in 0..2 {
        for i in 0..300 {
            let key = format!("flood:{round}:{i}");
            let checks: Vec<_> = limits.iter().map(|l| (l, key.as_str(), 1)).collect();
            decide(&*store, &request(&checks)).await.expect("decide");
        }
        let flooded = rows(&server);
        assert!(flooded >= 600, "{flooded} rows after the flood");
        // Sliding windows matter for two periods; the sweep waits one second more.
        let mut left = flooded;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = rows(&server);
            if left == 0 {
                break;
            }
        }
        assert_eq!(left, 0, "round {round}: every expired row was swept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_and_slots_are_swept() {
    let (server, store) = setup().await;
    let c = in_flight("c", 1000);
    let count = |table: &str| -> u64 {
        sql(&server, &format!("SELECT count(*) FROM public.{table}"))
            .parse()
            .expect("count")
    };
    for n in 0..120 {
        let key = format!("k{}", n % 40);
        let h = hold(n, Duration::from_millis(200));
        store
            .reserve(&request(&[(&c, key.as_str(), 1)]), &h)
            .await
            .expect("reserve");
    }
    let long = hold(1000, HOUR);
    store
        .reserve(&request(&[(&c, "k0", 1)]), &long)
        .await
        .expect("reserve");
    assert_eq!((count("sluice_holds"), count("sluice_slots")), (121, 121));
    // Expired, and past the sweep's one-second grace.
    tokio::time::sleep(Duration::from_millis(1_400)).await;
    store.sweep(Duration::ZERO).await.expect("sweep");
    assert_eq!(
        (count("sluice_holds"), count("sluice_slots")),
        (1, 1),
        "only the open reservation is left"
    );
    // The open one still counts and still settles.
    let read = decide(&*store, &request(&[(&c, "k0", 0)]))
        .await
        .expect("read");
    assert_eq!(read.results[0].remaining, 999);
    assert_eq!(
        settle(&store, &long, &request(&[(&c, "k0", 1)]), &[1]).await,
        SettleStatus::Settled
    );
    assert_eq!(
        count("sluice_slots"),
        0,
        "a settlement frees its slot at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_frees_the_slots_of_a_concurrency_limit() {
    let (_server, store) = setup().await;
    let c = in_flight("c", 1);
    let one = |key: &'static str| request(&[(&c, key, 1)]);
    for (n, key) in [(1, "a"), (2, "b")] {
        let outcomes = store
            .reserve(&one(key), &hold(n, HOUR))
            .await
            .expect("reserve");
        assert!(outcomes.windows[0].allowed);
    }
    let full = store
        .reserve(&one("a"), &hold(3, HOUR))
        .await
        .expect("reserve");
    assert!(!full.windows[0].allowed, "the one slot is held");
    store.reset(&c, "a").await.expect("reset");
    let again = store
        .reserve(&one("a"), &hold(4, HOUR))
        .await
        .expect("reserve");
    assert!(again.windows[0].allowed, "reset frees the key's slot");
    assert_eq!(
        store.reset_limit(&c).await.expect("reset limit"),
        2,
        "both keys held a slot"
    );
    let after = store
        .reserve(&one("b"), &hold(5, HOUR))
        .await
        .expect("reserve");
    assert!(after.windows[0].allowed);
    // The reservation whose slot went can still be settled, once.
    assert_eq!(
        settle(&store, &hold(2, HOUR), &one("b"), &[1]).await,
        SettleStatus::Settled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_a_table_take_turns_sweeping() {
    let (server, store) = setup().await;
    let other = PostgresStore::new(config(&server)).expect("config");
    let every = Duration::from_secs(60);
    assert!(
        store.sweep(every).await.expect("sweep").is_some(),
        "first turn"
    );
    assert_eq!(
        other.sweep(every).await.expect("sweep"),
        None,
        "swept less than a minute ago by the other"
    );
    assert!(
        other.sweep(Duration::ZERO).await.expect("sweep").is_some(),
        "zero: regardless"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_limit_removes_every_key_of_that_limit_only() {
    let (server, store) = setup().await;
    let a = limit("a", &["5/minute", "100/hour"]);
    let b = limit("b", &["5/minute"]);
    // A limit whose name extends a's must keep its counters.
    let ab = limit("a.b", &["5/minute"]);
    for i in 0..300 {
        let key = format!("k{i}");
        decide(
            &*store,
            &request(&[(&a, &key, 1), (&b, &key, 1), (&ab, &key, 1)]),
        )
        .await
        .expect("decide");
    }
    assert_eq!(store.reset_limit(&a).await.expect("reset"), 600);
    assert_eq!(rows(&server), 600, "b's and a.b's counters stay");
    let d = decide(&*store, &request(&[(&a, "k1", 0), (&b, "k1", 0)]))
        .await
        .expect("read");
    assert_eq!(
        (d.results[0].remaining, d.results[2].remaining),
        (5, 4),
        "a is fresh, b is not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_taking_shared_counters_in_opposite_orders_never_deadlock() {
    let (_server, store) = setup().await;
    // A fixed window of a day: nothing refills during the test.
    let l = Arc::new(
        Limit::new("pair", {
            let mut spec = LimitSpec::new(vec!["1000000/day".parse().expect("rate")]);
            spec.algorithm = sluice_engine::Algorithm::FixedWindow;
            spec
        })
        .expect("limit"),
    );
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let store = Arc::clone(&store);
            let l = Arc::clone(&l);
            tokio::spawn(async move {
                for i in 0..100 {
                    // Half the tasks take (x, y), half (y, x), on a few hot keys.
                    let (x, y) = (format!("k{}", i % 3), format!("k{}", (i + 1) % 3));
                    let (first, second) = if t % 2 == 0 { (x, y) } else { (y, x) };
                    let d = decide(
                        &*store,
                        &request(&[(&l, first.as_str(), 1), (&l, second.as_str(), 1)]),
                    )
                    .await
                    .expect("no deadlock, no error");
                    assert!(d.allowed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let d = decide(
        &*store,
        &request(&[(&l, "k0", 0), (&l, "k1", 0), (&l, "k2", 0)]),
    )
    .await
    .expect("read");
    let spent: u64 = d.results.iter().map(|r| 1_000_000 - r.remaining).sum();
    assert_eq!(spent, 16 * 100 * 2, "every charge landed once");
}

/// Deadlocks PostgreSQL detected in the test's database since it started. A detected
/// deadlock is retried once by the store (it rolled back), so counting them is how a
/// test sees one at all. Statistics reach the view within a second of each transaction.
async fn deadlocks(server: &PostgresServer) -> u64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sql(
        server,
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .parse()
    .expect("a count")
}

/// Top-level calls of `sluice_decide` and of `sluice_decide_batch` since the last reset.
fn decide_calls(server: &PostgresServer) -> (u64, u64) {
    let calls = sql(
        server,
        "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE '%sluice_decide(%'), 0) || ' ' || \
         coalesce(sum(calls) FILTER (WHERE query LIKE '%sluice_decide_batch(%'), 0) \
         FROM pg_stat_statements WHERE toplevel",
    );
    let (single, batch) = calls.split_once(' ').expect("two counts");
    (
        single.parse().expect("a count"),
        batch.parse().expect("a count"),
    )
}

/// `n` stores (as `n` sluice instances) on a server counting statements, each of which
/// has decided once on `limit` (preparing its statements), and the counts reset.
async fn instances(n: usize, limit: &Arc<Limit>) -> (PostgresServer, Vec<Arc<PostgresStore>>) {
    let (server, first) = setup_counting_statements().await;
    let mut stores = vec![first];
    while stores.len() < n {
        let store = PostgresStore::new(config(&server)).expect("config");
        store.prepare().await.expect("ready");
        stores.push(Arc::new(store));
    }
    for store in &stores {
        decide(&**store, &request(&[(limit, "warm-up", 1)]))
            .await
            .expect("decide");
    }
    sql(&server, "SELECT pg_stat_statements_reset()");
    (server, stores)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decisions_on_one_key_share_calls_and_admit_exactly_the_limit() {
    let l = fixed("hot", "50/day");
    // Three instances, each batching its own share of the requests.
    let (server, stores) = instances(3, &l).await;
    let tasks: Vec<_> = (0..200)
        .map(|t| {
            let store = Arc::clone(&stores[t % stores.len()]);
            let l = Arc::clone(&l);
            tokio::spawn(async move {
                decide(&*store, &request(&[(&l, "k", 1)]))
                    .await
                    .expect("no error")
                    .allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += u32::from(task.await.expect("task"));
    }
    assert_eq!(allowed, 50, "exactly the limit, never more");
    let (single, batch) = decide_calls(&server);
    assert!(
        batch > 0 && single + batch < 200,
        "200 decisions in fewer calls, some of them batches: {single} single, {batch} batches"
    );
    assert_eq!(
        sql(
            &server,
            "SELECT b FROM public.sluice_counters WHERE key LIKE '%hot%:k'"
        ),
        "50",
        "denied decisions charged nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_decisions_over_overlapping_keys_in_any_order_never_deadlock() {
    let day = fixed("day", "1000000/day");
    // Four instances: one instance has one call in flight, so only calls of different
    // instances can wait on each other.
    let (server, stores) = instances(4, &day).await;
    let before = deadlocks(&server).await;
    const TASKS: u64 = 64;
    const ROUNDS: u64 = 20;
    const KEYS: u64 = 12;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&stores[t as usize % stores.len()]);
            let day = Arc::clone(&day);
            tokio::spawn(async move {
                // xorshift: every task its own sequence of key sets and orders.
                let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut allowed = 0;
                for _ in 0..ROUNDS {
                    // 5 distinct keys of 12, in a random order.
                    let mut keys: Vec<String> = Vec::new();
                    while keys.len() < 5 {
                        let key = format!("k{}", next() % KEYS);
                        if !keys.contains(&key) {
                            keys.push(key);
                        }
                    }
                    let checks: Vec<_> = keys.iter().map(|k| (&day, k.as_str(), 1)).collect();
                    let decided = decide(&*store, &request(&checks)).await;
                    allowed += u64::from(decided.expect("no deadlock, no error").allowed);
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.expect("task");
    }
    assert_eq!(allowed, TASKS * ROUNDS, "every decision allowed");
    assert_eq!(
        sql(
            &server,
            "SELECT sum(b) FROM public.sluice_counters WHERE key LIKE '%day%:k%'"
        ),
        (TASKS * ROUNDS * 5).to_string(),
        "every charge landed once"
    );
    let (single, batch) = decide_calls(&server);
    assert!(
        batch > 0,
        "batches formed: {single} single, {batch} batches"
    );
    assert_eq!(
        deadlocks(&server).await,
        before,
        "PostgreSQL saw no deadlock"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_request_and_a_bad_one_fails_alone() {
    let (server, _store) = setup().await;
    // Three requests on one counter (5/minute, gcra): 3, then an unknown algorithm,
    // then 3 more, which no longer fit after the first.
    let reply = sql(
        &server,
        "SELECT public.sluice_decide_batch(ARRAY['c'], \
         ARRAY[1, 0, 5, 60000000, 12000000, 3, 0, \
               1, 9, 5, 60000000, 12000000, 1, 0, \
               1, 0, 5, 60000000, 12000000, 3, 0]::bigint[], ARRAY[1, 1, 1])",
    );
    let values: Vec<i64> = reply
        .trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(|v| v.parse().expect("an integer"))
        .collect();
    assert_eq!(values.len(), 5 + 2 + 5, "{reply}");
    assert_eq!(&values[..3], &[4, 1, 2], "allowed, 2 left: {reply}");
    assert_eq!(
        &values[5..7],
        &[-1, 1],
        "the bad request is refused: {reply}"
    );
    assert_eq!(&values[7..9], &[4, 0], "denied, after the first: {reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_and_settlements_on_shared_counters_never_deadlock() {
    let (server, store) = setup().await;
    let day = fixed("day", "1000000/day");
    let c = in_flight("c", 1000);
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let store = Arc::clone(&store);
            let (day, c) = (Arc::clone(&day), Arc::clone(&c));
            tokio::spawn(async move {
                for i in 0..30u64 {
                    let (x, y) = (format!("k{}", i % 3), format!("k{}", (i + 1) % 3));
                    let (first, second) = if t % 2 == 0 { (x, y) } else { (y, x) };
                    let req = request(&[
                        (&day, first.as_str(), 3),
                        (&c, "shared", 1),
                        (&day, second.as_str(), 3),
                    ]);
                    let h = hold(t * 1000 + i, HOUR);
                    let outcomes = store
                        .reserve(&req, &h)
                        .await
                        .expect("no deadlock, no error");
                    assert!(outcomes.windows.iter().all(|w| w.allowed));
                    // Estimates of 3, actual 1 and 5: 6 charged per call in the end.
                    let status = settle(&store, &h, &req, &[1, 1, 5]).await;
                    assert_eq!(status, SettleStatus::Settled);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let read = decide(
        &*store,
        &request(&[
            (&day, "k0", 0),
            (&day, "k1", 0),
            (&day, "k2", 0),
            (&c, "shared", 0),
        ]),
    )
    .await
    .expect("read");
    let spent: u64 = read.results[..3]
        .iter()
        .map(|r| 1_000_000 - r.remaining)
        .sum();
    assert_eq!(spent, 8 * 30 * 6, "every settlement landed once");
    assert_eq!(read.results[3].remaining, 1000, "every slot came back");
    // A deadlock is retried once (it proves a rollback), so the answers alone could
    // hide one: the server's log does not.
    assert!(
        !server.log().contains("deadlock detected"),
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_running_again_does_not_wait_for_reservations_in_flight() {
    let (server, store) = setup().await;
    // Another connection in the middle of writing every table (decisions,
    // reservations, settlements, a sweep holding its turn): ROW EXCLUSIVE on each, and
    // the sweeper's row, until it ends.
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let connection = tokio::spawn(connection);
    client
        .batch_execute(
            "BEGIN; LOCK TABLE public.sluice_counters, public.sluice_holds, \
             public.sluice_slots IN ROW EXCLUSIVE MODE; \
             SELECT * FROM public.sluice_sweeper FOR UPDATE",
        )
        .await
        .expect("lock");
    // As if this instance had found the previous version (instances starting together
    // each find it, and run the script one after the other): the whole script runs
    // again over the installed tables.
    sql(
        &server,
        &format!("DELETE FROM public.sluice_migrations WHERE version = {SCHEMA_VERSION}"),
    );
    let again = PostgresStore::new(config(&server)).expect("config");
    let migrated = tokio::time::timeout(Duration::from_secs(5), again.prepare())
        .await
        .expect("the migration waits for no table lock")
        .expect("migrate");
    assert_eq!(
        migrated,
        SchemaStatus::Migrated {
            from: SCHEMA_VERSION - 1
        }
    );
    client.batch_execute("ROLLBACK").await.expect("rollback");
    drop(client);
    let _ = connection.await;
    let c = in_flight("c", 1);
    let outcomes = store
        .reserve(&request(&[(&c, "k", 1)]), &hold(1, HOUR))
        .await
        .expect("reserve");
    assert!(outcomes.windows[0].allowed);
}

/// Every version up to this build's is recorded as applied in `schema`.
fn assert_every_version_recorded(server: &PostgresServer, schema: &str) {
    let recorded = sql(
        server,
        &format!(
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM {schema}.sluice_migrations"
        ),
    );
    let every: Vec<String> = (1..=SCHEMA_VERSION).map(|v| v.to_string()).collect();
    assert_eq!(
        recorded,
        every.join(","),
        "every version up to ours is recorded"
    );
}

/// Applies the version 2 script (kept verbatim in `tests/fixtures`) to `schema`, as a
/// sluice of that version would have installed it.
fn install_version_2(server: &PostgresServer, schema: &str) {
    let script = include_str!("fixtures/schema-v2.sql")
        .replace("@schema_name@", schema)
        .replace("@schema@", &format!("\"{schema}\""))
        .replace("CREATE @unlogged@ TABLE", "CREATE TABLE")
        .replace("@persistence@", "p")
        .replace("@logged@", "LOGGED");
    sql(server, &format!("BEGIN;\n{script}\nCOMMIT;"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_version_is_upgraded_in_place() {
    let server = PostgresServer::start().expect("PostgreSQL");
    install_version_2(&server, "public");
    // A version 2 instance decides: 3 of chat's 5/minute spent for user:1.
    let v2_decision = "SELECT public.sluice_decide(ARRAY['sluice:chat:g60:user:1'], \
                       ARRAY[1, 0, 5, 60000000, 12000000, 3, 0]::bigint[], false)";
    assert!(
        sql(&server, v2_decision).starts_with("{1,2,"),
        "allowed, 2 left"
    );

    let store = PostgresStore::new(config(&server)).expect("config");
    assert_eq!(
        store.prepare().await.expect("upgrade"),
        SchemaStatus::Migrated { from: 2 }
    );
    assert_every_version_recorded(&server, "public");
    let chat = limit("chat", &["5/minute"]);
    let read = decide(&store, &request(&[(&chat, "user:1", 0)]))
        .await
        .expect("read");
    assert_eq!(read.results[0].remaining, 2, "the counter was kept");
    // A version 2 instance still decides through the same function during a rolling
    // upgrade, on the same counters.
    assert!(
        sql(&server, v2_decision).starts_with("{0,2,"),
        "3 more do not fit"
    );

    // Calendar months work on the upgraded schema (sluice_month_start is new).
    let budget = fixed("budget", "3/month");
    let month = decide(&store, &request(&[(&budget, "user:1", 2)]))
        .await
        .expect("a month window");
    assert!(month.allowed);
    assert_eq!(month.results[0].remaining, 1);

    // Reservations work on the upgraded schema.
    let c = in_flight("c", 1);
    let req = request(&[(&chat, "user:2", 4), (&c, "user:2", 1)]);
    let h = hold(1, HOUR);
    let outcomes = store.reserve(&req, &h).await.expect("reserve");
    assert!(outcomes.windows.iter().all(|w| w.allowed));
    assert_eq!(
        settle(&store, &h, &req, &[1, 1]).await,
        SettleStatus::Settled
    );
    let read = decide(&store, &request(&[(&chat, "user:2", 0), (&c, "user:2", 0)]))
        .await
        .expect("read");
    assert_eq!(
        (read.results[0].remaining, read.results[1].remaining),
        (4, 1)
    );

    // And a second start finds it up to date.
    let again = PostgresStore::new(config(&server)).expect("config");
    assert_eq!(
        again.prepare().await.expect("check"),
        SchemaStatus::UpToDate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_is_versioned_idempotent_and_can_be_applied_by_hand() {
    let server = PostgresServer::start().expect("PostgreSQL");

    // migrate: false on an empty database: a clear error, nothing created.
    let mut manual = config(&server);
    manual.migrate = false;
    manual.schema = "rl".to_string();
    let store = PostgresStore::new(manual.clone()).expect("config");
    match store.prepare().await {
        Err(error @ PostgresStoreError::SchemaMissing { found: 0, .. }) => {
            assert!(
                error.to_string().contains("sluice migrate --print"),
                "{error}"
            );
        }
        other => panic!("expected SchemaMissing, got {other:?}"),
    }
    assert_eq!(
        sql(
            &server,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'rl'"
        ),
        "0"
    );

    // A DBA applies the printed script, twice: the second run changes nothing.
    let script = migration_sql("rl", false).expect("script");
    let path = server.dir().join("migration.sql");
    std::fs::write(&path, &script).expect("write script");
    for _ in 0..2 {
        let output = std::process::Command::new("psql")
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(server.port().to_string())
            .arg("-f")
            .arg(&path)
            .output()
            .expect("psql runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_every_version_recorded(&server, "rl");
    assert_eq!(
        store.prepare().await.expect("now installed"),
        SchemaStatus::UpToDate
    );
    let l = limit("l", &["2/minute"]);
    assert!(
        decide(&store, &request(&[(&l, "k", 1)]))
            .await
            .expect("decide")
            .allowed
    );
    assert_eq!(sql(&server, "SELECT count(*) FROM rl.sluice_counters"), "1");
    assert_eq!(
        sql(
            &server,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'sluice_counters' AND schemaname = 'public'"
        ),
        "0",
        "nothing outside the configured schema"
    );

    // migrate: true on an installed schema: nothing to do; unlogged: true rewrites the
    // table once, keeping its rows.
    let mut auto = manual.clone();
    auto.migrate = true;
    assert_eq!(
        PostgresStore::new(auto.clone())
            .expect("config")
            .prepare()
            .await
            .expect("check"),
        SchemaStatus::UpToDate
    );
    auto.unlogged = true;
    PostgresStore::new(auto)
        .expect("config")
        .prepare()
        .await
        .expect("to unlogged");
    assert_eq!(
        sql(
            &server,
            "SELECT relpersistence FROM pg_class WHERE oid = 'rl.sluice_counters'::regclass"
        ),
        "u"
    );
    assert_eq!(sql(&server, "SELECT count(*) FROM rl.sluice_counters"), "1");

    // A schema dropped under a running store is installed again by its next decision
    // (with migrate: true), which then succeeds.
    let mut running = manual;
    running.migrate = true;
    let store = PostgresStore::new(running).expect("config");
    store.prepare().await.expect("ready");
    sql(&server, "DROP SCHEMA rl CASCADE");
    assert!(
        decide(&store, &request(&[(&l, "k", 1)]))
            .await
            .expect("decide")
            .allowed
    );
    assert_eq!(sql(&server, "SELECT count(*) FROM rl.sluice_counters"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_database_restart_unless_unlogged() {
    for unlogged in [false, true] {
        let mut server = PostgresServer::start().expect("PostgreSQL");
        let mut settings = config(&server);
        settings.unlogged = unlogged;
        let store = PostgresStore::new(settings).expect("config");
        store.prepare().await.expect("migrate");
        let l = limit("chat", &["5/minute"]);
        decide(&store, &request(&[(&l, "user:1", 3)]))
            .await
            .expect("decide");
        // Commits are asynchronous (synchronous_commit = off): the WAL writer has them
        // on disk within three of its 200 ms rounds.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        // pg_ctl stop -m immediate: a crash; connections drop.
        server.stop();
        assert!(store.ping().await.is_err(), "down");
        server.restart().expect("restart");
        let mut after = None;
        for _ in 0..50 {
            if let Ok(d) = decide(&store, &request(&[(&l, "user:1", 0)])).await {
                after = Some(d);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = after.expect("decisions work again after the restart");
        let expected = if unlogged { 5 } else { 2 };
        assert_eq!(
            after.results[0].remaining, expected,
            "unlogged {unlogged}: an unlogged table is emptied by crash recovery"
        );
    }
}
