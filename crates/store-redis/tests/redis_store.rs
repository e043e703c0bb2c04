//! Redis-specific behaviour: one round trip per decision, compact state with exact
//! expiry, the scripts' calendar months, reset of a whole limit, and survival of a
//! server restart.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::calendar::{month_start, next_month_start};
use sluice_engine::{Algorithm, Check, DecisionRequest, Limit, LimitSpec, Store, decide};
use sluice_store_redis::{RedisStore, RedisStoreConfig};
use sluice_testkit::semantics::month_boundary_instants;
use sluice_testkit::servers::{RedisCluster, RedisServer};
use sluice_testkit::system_now;

fn limit(name: &str, rates: &[&str]) -> Arc<Limit> {
    let rates = rates.iter().map(|r| r.parse().expect("rate")).collect();
    Arc::new(Limit::new(name, LimitSpec::new(rates)).expect("limit"))
}

async fn setup() -> (RedisServer, RedisStore, redis::aio::MultiplexedConnection) {
    let server = RedisServer::start().expect("redis-server");
    let store = RedisStore::connect(RedisStoreConfig::new(server.url()))
        .await
        .expect("connect");
    let client = redis::Client::open(server.url()).expect("url");
    let admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection");
    (server, store, admin)
}

async fn command_calls(admin: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await
        .expect("info");
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_decision_is_one_script_call_whatever_its_checks() {
    let (_server, store, mut admin) = setup().await;
    let a = limit("a", &["5/minute", "100/hour"]);
    let b = limit("b", &["10/second"]);
    let request = DecisionRequest {
        checks: vec![
            Check::new(a.clone(), "user:1", 1).expect("check"),
            Check::new(b.clone(), "ip:1", 1).expect("check"),
            Check::new(a, "user:1", 1).expect("check"),
        ],
        dry_run: false,
    };
    decide(&store, &request)
        .await
        .expect("first decision loads the script");
    let before = command_calls(&mut admin, "evalsha").await;
    for _ in 0..10 {
        decide(&store, &request).await.expect("decide");
    }
    assert_eq!(command_calls(&mut admin, "evalsha").await - before, 10);
}

#[tokio::test]
async fn state_is_compact_and_expires_when_it_stops_mattering() {
    let (_server, store, mut admin) = setup().await;
    let l = limit("chat", &["5/minute"]);
    let request = DecisionRequest {
        checks: vec![Check::new(l, "user:42", 2).expect("check")],
        dry_run: false,
    };
    decide(&store, &request).await.expect("decide");
    let key = "sluice:{chat:user:42}:g60";
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut admin)
        .await
        .expect("get");
    assert!(
        value.bytes().all(|b| b.is_ascii_digit()),
        "a bare tat: {value}"
    );
    // Two cells of 12 s: the bucket is full again in 24 s, and the key goes then.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut admin)
        .await
        .expect("pttl");
    assert!((23_000..=24_001).contains(&ttl), "ttl {ttl} ms");
}

/// The scripts' calendar (`month_start` in state.lua, on Lua's doubles) agrees with the
/// engine's around every month start from 1969 to 2200.
#[tokio::test]
async fn the_scripts_calendar_months_agree_with_the_engine() {
    let (_server, _store, mut admin) = setup().await;
    let probe = redis::Script::new(concat!(
        include_str!("../src/state.lua"),
        "\nlocal out = {}\n",
        "for i = 1, #ARGV do\n",
        "  local t = tonumber(ARGV[i])\n",
        "  out[2 * i - 1] = month_start(t, 0)\n",
        "  out[2 * i] = month_start(t, 1)\n",
        "end\n",
        "return out\n",
    ));
    let instants = month_boundary_instants();
    let mut invocation = probe.prepare_invoke();
    for t in &instants {
        invocation.arg(*t);
    }
    let bounds: Vec<i64> = invocation
        .invoke_async(&mut admin)
        .await
        .expect("the probe runs");
    assert_eq!(bounds.len(), 2 * instants.len());
    for (t, bounds) in instants.iter().zip(bounds.chunks_exact(2)) {
        assert_eq!(
            (bounds[0], bounds[1]),
            (month_start(*t), next_month_start(*t)),
            "the month holding {t} µs"
        );
    }
}

/// A calendar-month counter starts at this month's start and expires at the next one's.
#[tokio::test]
async fn a_calendar_month_counter_lives_until_the_next_month_start() {
    let (_server, store, mut admin) = setup().await;
    let mut spec = LimitSpec::new(vec!["3/month".parse().expect("rate")]);
    spec.algorithm = Algorithm::FixedWindow;
    let l = Arc::new(Limit::new("budget", spec).expect("limit"));
    let request = DecisionRequest {
        checks: vec![Check::new(l, "key:1", 2).expect("check")],
        dry_run: false,
    };
    let before = system_now();
    decide(&store, &request).await.expect("decide");
    if next_month_start(system_now()) != next_month_start(before) {
        return; // decided at a month start: either month may hold it
    }
    let key = "sluice:{budget:key:1}:f1mo";
    let value: String = redis::cmd("GET")
        .arg(key)
        .query_async(&mut admin)
        .await
        .expect("get");
    assert_eq!(value, format!("{}:2", month_start(before)));
    let expires_ms: i64 = redis::cmd("PEXPIRETIME")
        .arg(key)
        .query_async(&mut admin)
        .await
        .expect("pexpiretime");
    assert_eq!(expires_ms, next_month_start(before) / 1_000);
}

#[tokio::test]
async fn reset_limit_removes_every_key_of_that_limit_only() {
    let (_server, store, mut admin) = setup().await;
    let a = limit("a", &["5/minute", "100/hour"]);
    let b = limit("b", &["5/minute"]);
    for i in 0..1200 {
        let request = DecisionRequest {
            checks: vec![
                Check::new(a.clone(), format!("k{i}"), 1).expect("check"),
                Check::new(b.clone(), format!("k{i}"), 1).expect("check"),
            ],
            dry_run: false,
        };
        decide(&store, &request).await.expect("decide");
    }
    assert_eq!(store.reset_limit(&a).await.expect("reset"), 2400);
    let left: u64 = redis::cmd("DBSIZE")
        .query_async(&mut admin)
        .await
        .expect("dbsize");
    assert_eq!(left, 1200, "b's counters stay");
}

#[tokio::test]
async fn a_restarted_server_is_used_again_without_reconnecting_by_hand() {
    let (mut server, store, _admin) = setup().await;
    let l = limit("chat", &["5/minute"]);
    let request = DecisionRequest {
        checks: vec![Check::new(l, "user:1", 1).expect("check")],
        dry_run: false,
    };
    decide(&store, &request).await.expect("decide");
    server.stop();
    assert!(store.ping().await.is_err(), "down");
    server.restart().expect("restart");
    // The script is gone with the old server: NOSCRIPT makes the client load it again.
    let mut answered = false;
    for _ in 0..20 {
        if decide(&store, &request).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered, "decisions work again after the restart");
}

#[tokio::test]
async fn in_a_cluster_reset_limit_finds_the_keys_on_every_node() {
    let cluster = RedisCluster::start(3).expect("a 3-master Redis Cluster");
    let store = RedisStore::connect(RedisStoreConfig::cluster(cluster.urls()))
        .await
        .expect("connect");
    assert!(store.is_cluster());
    let a = limit("a", &["5/minute", "100/hour"]);
    let b = limit("b", &["5/minute"]);
    for i in 0..300 {
        let request = DecisionRequest {
            checks: vec![
                Check::new(a.clone(), format!("k{i}"), 1).expect("check"),
                Check::new(b.clone(), format!("k{i}"), 1).expect("check"),
            ],
            dry_run: false,
        };
        assert!(decide(&store, &request).await.expect("decide").allowed);
    }
    let mut per_node = Vec::new();
    for url in cluster.urls() {
        let client = redis::Client::open(url).expect("url");
        let mut node = client
            .get_multiplexed_async_connection()
            .await
            .expect("node");
        let keys: u64 = redis::cmd("DBSIZE")
            .query_async(&mut node)
            .await
            .expect("dbsize");
        per_node.push(keys);
    }
    assert_eq!(per_node.iter().sum::<u64>(), 900, "{per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "every node holds counters: {per_node:?}"
    );
    assert_eq!(store.reset_limit(&a).await.expect("reset"), 600);
    let request = DecisionRequest {
        checks: vec![Check::new(b.clone(), "k7", 0).expect("check")],
        dry_run: false,
    };
    assert_eq!(
        decide(&store, &request).await.expect("read").results[0].remaining,
        4,
        "b's counters stay"
    );
}
