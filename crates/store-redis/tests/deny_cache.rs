//! The local deny cache against a real redis-server: a denial is answered again without
//! a round trip until it could be allowed; a reset, a reset of the whole limit or a
//! refund on another instance ends it there (on one server, in a Redis Cluster, and
//! through Sentinel before and after a failover); `charge_denied` limits, another cost
//! and other rates always reach Redis; and while the subscription is down the cache is
//! off (a server restarted empty is not answered from stale entries).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_engine::{Check, Decision, DecisionRequest, Limit, LimitSpec, Store, decide};
use sluice_store_redis::{RedisStore, RedisStoreConfig};
use sluice_testkit::sentinel::{MASTER_NAME, SentinelGroup};
use sluice_testkit::servers::{RedisCluster, RedisServer};

fn limit(name: &str, rates: &[&str]) -> Arc<Limit> {
    let rates = rates.iter().map(|r| r.parse().expect("rate")).collect();
    Arc::new(Limit::new(name, LimitSpec::new(rates)).expect("limit"))
}

fn request(limit: &Arc<Limit>, key: &str, cost: u64) -> DecisionRequest {
    DecisionRequest {
        checks: vec![Check::new(Arc::clone(limit), key, cost).expect("check")],
        dry_run: false,
    }
}

/// A store on `server` whose deny cache is subscribed (waits for it, at most 2 s).
async fn store(server: &RedisServer) -> RedisStore {
    store_on(RedisStoreConfig::new(server.url())).await
}

async fn store_on(config: RedisStoreConfig) -> RedisStore {
    let store = RedisStore::connect(config).await.expect("connect");
    wait_until("the deny cache subscribed", || store.local_deny_cache_on()).await;
    store
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: not within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn evalsha_calls(server: &RedisServer) -> u64 {
    server
        .command_stats()
        .expect("INFO commandstats")
        .get(&("evalsha".to_string(), "calls".to_string()))
        .copied()
        .unwrap_or(0)
}

/// Decides `request` on `store` until it is allowed (at most ~1 s: a message in flight),
/// and answers how long that took.
async fn allowed_within_a_second(store: &RedisStore, request: &DecisionRequest) -> Duration {
    let start = Instant::now();
    loop {
        if decide(store, request).await.expect("decide").allowed {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still denied a second after the give-back: a stale cached denial"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Decides `request` on `store` (denied every time) until an answer comes from the
/// cache (within a second: a decision in flight while a message arrived is not cached).
async fn denied_from_cache(store: &RedisStore, request: &DecisionRequest) {
    let start = Instant::now();
    loop {
        let before = store.stats().local_denials;
        assert!(!decide(store, request).await.expect("decide").allowed);
        if store.stats().local_denials > before {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the denial was never cached"
        );
    }
}

#[tokio::test]
async fn a_denial_is_answered_without_redis_until_it_could_be_allowed() {
    let server = RedisServer::start().expect("redis-server");
    let store = store(&server).await;
    // One request every 300 ms, no burst: a denial waits at most 300 ms.
    let l = limit("burst", &["10/3s"]);
    let spec = LimitSpec {
        burst: Some(1),
        ..LimitSpec::new(vec!["10/3s".parse().expect("rate")])
    };
    let l = Arc::new(Limit::new(l.name(), spec).expect("limit"));
    let r = request(&l, "client:1", 1);
    assert!(decide(&store, &r).await.expect("first").allowed);
    let denied = decide(&store, &r).await.expect("second");
    assert!(!denied.allowed);
    let retry = denied.retry_after.expect("a retry time");
    assert!(retry > 0 && retry <= 300_000, "{retry}");

    let calls = evalsha_calls(&server);
    let mut last_retry = retry;
    for _ in 0..50 {
        let again = decide(&store, &r).await.expect("cached");
        assert!(!again.allowed);
        let retry_now = again.retry_after.expect("a retry time");
        assert!(
            retry_now > 0 && retry_now <= last_retry,
            "{retry_now} after {last_retry}"
        );
        last_retry = retry_now;
    }
    assert_eq!(evalsha_calls(&server), calls, "no round trip while denied");
    assert_eq!(store.stats().local_denials, 50);

    // Once the retry time has passed, Redis decides again (and allows).
    tokio::time::sleep(Duration::from_micros(last_retry as u64 + 1_000)).await;
    assert!(decide(&store, &r).await.expect("after t").allowed);
    assert_eq!(evalsha_calls(&server), calls + 1);
}

#[tokio::test]
async fn a_reset_or_refund_on_another_instance_ends_the_cached_denial() {
    let server = RedisServer::start().expect("redis-server");
    let (a, b) = (store(&server).await, store(&server).await);
    give_backs_on_b_end_denials_on_a(&a, &b, "user:7").await;
}

#[tokio::test]
async fn in_a_cluster_give_backs_on_any_node_reach_every_instance() {
    let cluster = RedisCluster::start(3).expect("a 3-master Redis Cluster");
    let config = || RedisStoreConfig::cluster(cluster.urls());
    let (a, b) = (store_on(config()).await, store_on(config()).await);
    // Keys in several slots, so on several nodes: every node hears every PUBLISH.
    for key in ["user:1", "user:2", "user:3", "user:4"] {
        give_backs_on_b_end_denials_on_a(&a, &b, key).await;
    }
}

#[tokio::test]
async fn through_sentinel_the_cache_follows_the_primary_across_a_failover() {
    let mut group = SentinelGroup::start().expect("redis-server and redis-sentinel");
    let config = || RedisStoreConfig::sentinel(MASTER_NAME, group.sentinel_urls());
    let (a, b) = (store_on(config()).await, store_on(config()).await);
    give_backs_on_b_end_denials_on_a(&a, &b, "before").await;

    let old = group.kill_primary().expect("kill the primary");
    let _group = tokio::task::spawn_blocking(move || {
        group.wait_for_failover(old).expect("failover");
        group
    })
    .await
    .expect("failover thread");
    // Both stores find the new primary when a command fails; their caches subscribe
    // again there.
    let probe = request(&limit("probe", &["1000/second"]), "p", 1);
    for store in [&a, &b] {
        let start = Instant::now();
        while decide(store, &probe).await.is_err() || !store.local_deny_cache_on() {
            assert!(start.elapsed() < Duration::from_secs(10), "the new primary");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    give_backs_on_b_end_denials_on_a(&a, &b, "after").await;
}

/// A caches a denial of `key`; B resets the key, resets the limit, and refunds: each
/// time A allows within a second.
async fn give_backs_on_b_end_denials_on_a(a: &RedisStore, b: &RedisStore, key: &str) {
    let l = limit("hourly", &["1/hour"]);
    let r = request(&l, key, 1);

    // Reset of the key on B.
    assert!(decide(a, &r).await.expect("allowed").allowed);
    denied_from_cache(a, &r).await;
    b.reset(&l, key).await.expect("reset on B");
    allowed_within_a_second(a, &r).await;

    // Reset of the whole limit on B.
    denied_from_cache(a, &r).await;
    b.reset_limit(&l).await.expect("reset_limit on B");
    allowed_within_a_second(a, &r).await;

    // A refund on B of what B charged: A had cached the denial.
    b.reset(&l, key).await.expect("reset");
    let charged: Decision = decide(b, &r).await.expect("B charges");
    assert!(charged.allowed);
    denied_from_cache(a, &r).await;
    b.refund(&r, &charged.charged_windows(&r))
        .await
        .expect("refund on B");
    allowed_within_a_second(a, &r).await;
}

#[tokio::test]
async fn charge_denied_limits_reach_redis_on_every_attempt() {
    let server = RedisServer::start().expect("redis-server");
    let store = store(&server).await;
    let spec = LimitSpec {
        charge_denied: true,
        ..LimitSpec::new(vec!["1/hour".parse().expect("rate")])
    };
    let strict = Arc::new(Limit::new("strict", spec).expect("limit"));
    let plain = limit("plain", &["100/hour"]);
    // charge_denied in any check of the request keeps the whole request out.
    let r = DecisionRequest {
        checks: vec![
            Check::new(plain, "k", 1).expect("check"),
            Check::new(strict, "k", 1).expect("check"),
        ],
        dry_run: false,
    };
    assert!(decide(&store, &r).await.expect("first").allowed);
    let calls = evalsha_calls(&server);
    for _ in 0..5 {
        assert!(!decide(&store, &r).await.expect("denied").allowed);
    }
    assert_eq!(evalsha_calls(&server), calls + 5);
    assert_eq!(store.stats().local_denials, 0);
}

#[tokio::test]
async fn another_cost_or_other_rates_are_not_answered_from_an_entry() {
    let server = RedisServer::start().expect("redis-server");
    let store = store(&server).await;
    // Fixed windows: 5/hour and 10/hour count in one counter (`f3600`).
    let fixed = |rate: &str| {
        let spec = LimitSpec {
            algorithm: sluice_engine::Algorithm::FixedWindow,
            ..LimitSpec::new(vec![rate.parse().expect("rate")])
        };
        Arc::new(Limit::new("plan", spec).expect("limit"))
    };
    let five = fixed("5/hour");
    let allowed = |cost: u64| {
        let (store, five) = (&store, &five);
        async move {
            decide(store, &request(five, "k", cost))
                .await
                .expect("decide")
                .allowed
        }
    };
    assert!(allowed(4).await);
    // Cost 3 does not fit (1 left) and is cached...
    assert!(!allowed(3).await);
    assert!(!allowed(3).await);
    assert_eq!(store.stats().local_denials, 1);
    // ...cost 1 fits.
    assert!(allowed(1).await);
    // Now full: cost 1 denied and cached under 5/hour.
    assert!(!allowed(1).await);
    assert!(!allowed(1).await);
    assert_eq!(store.stats().local_denials, 2);
    // The same limit and key on other rates (a plan change, an override): the same
    // counter, other arguments, so Redis decides: 10/hour still has room.
    let ten = fixed("10/hour");
    let calls = evalsha_calls(&server);
    assert!(
        decide(&store, &request(&ten, "k", 1))
            .await
            .expect("ten")
            .allowed
    );
    assert_eq!(evalsha_calls(&server), calls + 1);
    assert_eq!(store.stats().local_denials, 2);
}

#[tokio::test]
async fn the_cache_is_off_while_the_subscription_is_down_and_starts_empty() {
    let mut server = RedisServer::start().expect("redis-server");
    let a = store(&server).await;
    let l = limit("daily", &["1/day"]);
    let r = request(&l, "user:1", 1);
    assert!(decide(&a, &r).await.expect("allowed").allowed);
    denied_from_cache(&a, &r).await;

    // The server goes away: the subscription ends and the cache turns off, so the
    // decision is not answered from it (it fails: no server).
    server.stop();
    wait_until("the cache turned off", || !a.local_deny_cache_on()).await;
    assert!(
        decide(&a, &r).await.is_err(),
        "answered from the cache while the subscription was down"
    );
    // Back, empty: a change no message announces (as anything A missed while it was not
    // listening). Once the cache is on again, its old entry must be gone.
    server.restart().expect("restart");
    wait_until("the cache is back on", || a.local_deny_cache_on()).await;
    let start = Instant::now();
    let decision = loop {
        match decide(&a, &r).await {
            Ok(decision) => break decision,
            // The connection manager reconnects on its own.
            Err(_) if start.elapsed() < Duration::from_secs(2) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(error) => panic!("the restarted server is not reached: {error}"),
        }
    };
    assert!(
        decision.allowed,
        "A answered a denial from before the restart"
    );
    // And it caches again.
    denied_from_cache(&a, &r).await;
}

#[tokio::test]
async fn switched_off_every_decision_reaches_redis() {
    let server = RedisServer::start().expect("redis-server");
    let mut config = RedisStoreConfig::new(server.url());
    config.local_deny_cache = false;
    let store = RedisStore::connect(config).await.expect("connect");
    let r = request(&limit("hourly", &["1/hour"]), "k", 1);
    assert!(decide(&store, &r).await.expect("allowed").allowed);
    let calls = evalsha_calls(&server);
    for _ in 0..3 {
        assert!(!decide(&store, &r).await.expect("denied").allowed);
    }
    assert_eq!(evalsha_calls(&server), calls + 3);
    assert!(!store.local_deny_cache_on());
}
