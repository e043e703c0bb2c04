//! PostgreSQL-specific behaviour: one statement per decision, compact rows with exact
//! expiry, calendar months whatever the session's time zone, a table that shrinks back
//! after a key flood, reset of a whole limit, the
//! migration (versioned, idempotent, by hand for a DBA, in another schema, unlogged),
//! no deadlock between decisions taking shared counters in opposite orders, and
//! survival of a database restart.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::calendar::{month_start, next_month_start};
use sluice_engine::{Algorithm, Check, DecisionRequest, Limit, LimitSpec, Store, decide};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_is_one_statement_whatever_its_checks() {
    let (server, store) = setup_with(&[
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=all",
    ])
    .await;
    sql(&server, "CREATE EXTENSION pg_stat_statements");
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
    let top_level = sql(
        &server,
        "SELECT coalesce(sum(calls), 0) || '|' || string_agg(query, ' ; ') FROM pg_stat_statements \
         WHERE toplevel AND query NOT LIKE '%pg_stat_statements%'",
    );
    let (calls, queries) = top_level.split_once('|').expect("two fields");
    assert_eq!(
        calls, "10",
        "one statement per decision, and nothing else: {queries}"
    );
    assert!(queries.contains("sluice_decide"), "{queries}");
}

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
    let mut spec = LimitSpec::new(vec!["3/month".parse().expect("rate")]);
    spec.algorithm = Algorithm::FixedWindow;
    let l = Arc::new(Limit::new("budget", spec).expect("limit"));
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
    assert_eq!(
        sql(
            &server,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM rl.sluice_migrations"
        ),
        (1..=SCHEMA_VERSION)
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "every version up to ours is recorded"
    );
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
