//! The failure policy against a store that fails, hangs and comes back, and against a
//! real redis-server that is killed and restarted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_engine::{
    Check, DecisionRequest, Limit, LimitSpec, Outcomes, Store, StoreError, StoreFuture, StoreStats,
    decide,
};
use sluice_store_memory::MemoryStore;
use sluice_store_policy::{FailurePolicy, PolicyConfig, PolicyStore};

/// A memory store that can be told to fail or to hang, counting the calls it gets.
struct Flaky {
    inner: MemoryStore,
    failing: AtomicBool,
    hanging: AtomicBool,
    /// Milliseconds the next call waits before answering (0: none).
    slow_next_ms: AtomicU64,
    calls: AtomicUsize,
    pings: AtomicUsize,
}

impl Flaky {
    fn new() -> Arc<Self> {
        Arc::new(Flaky {
            inner: MemoryStore::new(Default::default()),
            failing: AtomicBool::new(false),
            hanging: AtomicBool::new(false),
            slow_next_ms: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
            pings: AtomicUsize::new(0),
        })
    }
}

impl Store for Flaky {
    fn decide<'a>(&'a self, request: &'a DecisionRequest) -> StoreFuture<'a, Outcomes> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let slow = self.slow_next_ms.swap(0, Ordering::SeqCst);
        Box::pin(async move {
            // A slow answer is decided when the call arrives, like a reply already on the
            // wire when the connection then breaks.
            if slow > 0 {
                let answer = self.inner.decide_sync(request);
                tokio::time::sleep(Duration::from_millis(slow)).await;
                return Ok(answer);
            }
            if self.hanging.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("connection refused".into()));
            }
            // What PostgreSQL does with a key it cannot hold: the server is fine, the
            // one statement is refused.
            if request.checks.iter().any(|c| c.key().contains('\0')) {
                return Err(StoreError::Protocol("invalid byte sequence: 0x00".into()));
            }
            Ok(self.inner.decide_sync(request))
        })
    }
    fn reset<'a>(&'a self, limit: &'a Limit, key: &'a str) -> StoreFuture<'a, ()> {
        self.inner.reset_sync(limit, key);
        Box::pin(async { Ok(()) })
    }
    /// Walking every key takes longer than one decision may.
    fn reset_limit<'a>(&'a self, limit: &'a Limit) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(self.inner.reset_limit_sync_with(limit, |_, _| {}))
        })
    }
    fn ping(&self) -> StoreFuture<'_, ()> {
        self.pings.fetch_add(1, Ordering::SeqCst);
        let failing = self.failing.load(Ordering::SeqCst);
        Box::pin(async move {
            if failing {
                Err(StoreError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        })
    }
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    fn backend(&self) -> &'static str {
        "flaky"
    }
}

fn limit(rate: &str) -> Arc<Limit> {
    Arc::new(Limit::new("l", LimitSpec::new(vec![rate.parse().unwrap()])).unwrap())
}

fn request(limit: &Arc<Limit>, key: &str) -> DecisionRequest {
    DecisionRequest {
        checks: vec![Check::new(Arc::clone(limit), key, 1).unwrap()],
        dry_run: false,
    }
}

fn policy(primary: Arc<dyn Store>, policy: FailurePolicy) -> PolicyStore {
    PolicyStore::new(
        primary,
        PolicyConfig {
            policy,
            timeout: Duration::from_millis(100),
            probe_interval: Duration::from_millis(200),
            local_max_keys: 10_000,
        },
    )
}

#[tokio::test]
async fn allow_deny_and_local_while_the_store_fails() {
    let l = limit("2/hour");
    for (choice, expect) in [
        (FailurePolicy::Allow, [true, true, true]),
        (FailurePolicy::Deny, [false, false, false]),
        (FailurePolicy::Local, [true, true, false]),
    ] {
        let flaky = Flaky::new();
        flaky.failing.store(true, Ordering::SeqCst);
        let store = policy(flaky.clone(), choice);
        for (i, allowed) in expect.into_iter().enumerate() {
            let d = decide(&store, &request(&l, "k"))
                .await
                .expect("the policy always answers");
            assert_eq!(d.allowed, allowed, "{choice:?} decision {i}");
            assert!(d.degraded, "{choice:?}: marked degraded");
        }
        if choice == FailurePolicy::Deny {
            let d = decide(&store, &request(&l, "k")).await.unwrap();
            assert_eq!(
                d.retry_after,
                Some(1_000_000),
                "fail closed says: try again in a second"
            );
        }
    }
}

#[tokio::test]
async fn a_hanging_store_costs_one_timeout_per_probe_not_per_request() {
    let flaky = Flaky::new();
    flaky.hanging.store(true, Ordering::SeqCst);
    let store = policy(flaky.clone(), FailurePolicy::Local);
    let l = limit("1000/hour");
    let started = Instant::now();
    for _ in 0..50 {
        assert!(decide(&store, &request(&l, "k")).await.unwrap().degraded);
    }
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "50 decisions took {:?}",
        started.elapsed()
    );
    assert!(
        flaky.calls.load(Ordering::SeqCst) <= 2,
        "the store was tried {} times",
        flaky.calls.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn shared_counting_resumes_by_itself_when_the_store_is_back() {
    let flaky = Flaky::new();
    let store = policy(flaky.clone(), FailurePolicy::Local);
    let l = limit("1000/hour");
    assert!(!decide(&store, &request(&l, "k")).await.unwrap().degraded);
    flaky.failing.store(true, Ordering::SeqCst);
    assert!(decide(&store, &request(&l, "k")).await.unwrap().degraded);
    assert!(store.is_down());
    flaky.failing.store(false, Ordering::SeqCst);
    let started = Instant::now();
    while decide(&store, &request(&l, "k")).await.unwrap().degraded {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not back within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!store.is_down());
    assert!(
        started.elapsed() <= Duration::from_millis(400),
        "back within one probe interval: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_answer_already_in_flight_does_not_end_an_outage_that_began_after_it() {
    let flaky = Flaky::new();
    let store = Arc::new(policy(flaky.clone(), FailurePolicy::Local));
    let l = limit("1000/hour");
    flaky.slow_next_ms.store(50, Ordering::SeqCst);
    let in_flight = {
        let (store, l) = (Arc::clone(&store), Arc::clone(&l));
        tokio::spawn(async move { decide(&*store, &request(&l, "k")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    flaky.failing.store(true, Ordering::SeqCst);
    assert!(decide(&*store, &request(&l, "k")).await.unwrap().degraded);
    assert!(store.is_down());
    let late = in_flight.await.unwrap().unwrap();
    assert!(
        !late.degraded,
        "the slow call itself was answered by the store"
    );
    assert!(
        store.is_down(),
        "a reply sent before the outage must not mark the store reachable"
    );
    assert!(
        decide(&*store, &request(&l, "k")).await.unwrap().degraded,
        "still deciding by the policy until a probe succeeds"
    );
}

#[tokio::test]
async fn health_pings_at_most_once_a_probe_interval_and_follows_the_store() {
    let flaky = Flaky::new();
    let store = policy(Arc::clone(&flaky) as Arc<dyn Store>, FailurePolicy::Local);
    // Many health calls within one interval: one ping.
    for _ in 0..500 {
        store.health().await.unwrap();
    }
    assert_eq!(flaky.pings.load(Ordering::SeqCst), 1);
    // Decisions that reach the store keep it known healthy without pings.
    let l = limit("1000/hour");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        decide(&store, &request(&l, "k")).await.unwrap();
        store.health().await.unwrap();
    }
    assert_eq!(flaky.pings.load(Ordering::SeqCst), 1);
    // With no decisions, an outage is noticed by the next interval's ping.
    flaky.failing.store(true, Ordering::SeqCst);
    let started = Instant::now();
    while store.health().await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "outage not noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.is_down());
    // While down: still at most one ping per interval, and back up by itself.
    let pings = flaky.pings.load(Ordering::SeqCst);
    for _ in 0..500 {
        assert!(store.health().await.is_err());
    }
    assert!(flaky.pings.load(Ordering::SeqCst) <= pings + 1);
    flaky.failing.store(false, Ordering::SeqCst);
    let started = Instant::now();
    while store.health().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "recovery not noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!store.is_down());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_restarted_redis_degrades_then_recovers() {
    let mut server = sluice_testkit::servers::RedisServer::start().expect("redis-server");
    let mut config = sluice_store_redis::RedisStoreConfig::new(server.url());
    config.prefix = "policy-test:".into();
    let redis = sluice_store_redis::RedisStore::connect(config)
        .await
        .expect("connect");
    let store = policy(Arc::new(redis), FailurePolicy::Local);
    let l = limit("3/hour");
    for _ in 0..2 {
        let d = decide(&store, &request(&l, "shared")).await.unwrap();
        assert!(d.allowed && !d.degraded);
    }
    server.stop();
    let d = decide(&store, &request(&l, "shared"))
        .await
        .expect("no error while Redis is down");
    assert!(d.degraded, "decided locally");
    assert!(
        store.ping().await.is_err(),
        "readiness reports the store down"
    );
    server.restart().expect("restart");
    let started = Instant::now();
    let d = loop {
        let d = decide(&store, &request(&l, "shared")).await.unwrap();
        if !d.degraded {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "shared counting not back within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The restarted Redis kept nothing (no persistence): a fresh shared counter.
    assert!(d.allowed);
    assert_eq!(d.results[0].remaining, 2);
}

#[tokio::test]
async fn a_request_the_store_refuses_fails_alone_and_opens_no_limit() {
    let flaky = Flaky::new();
    let store = policy(flaky.clone(), FailurePolicy::Allow);
    let l = limit("1/hour");
    assert!(
        decide(&store, &request(&l, "victim"))
            .await
            .unwrap()
            .allowed
    );
    let refused = decide(&store, &request(&l, "evil\0")).await;
    assert!(
        matches!(refused, Err(StoreError::Protocol(_))),
        "the refused request fails: {refused:?}"
    );
    let next = decide(&store, &request(&l, "victim")).await.unwrap();
    assert!(
        !next.allowed && !next.degraded,
        "other clients are still decided by the store, not by on_error: allow"
    );
}

#[tokio::test]
async fn allow_and_deny_keep_the_rules_that_hold_whatever_the_counter_says() {
    let l = limit("5/hour");
    let with_cost = |cost| DecisionRequest {
        checks: vec![Check::new(Arc::clone(&l), "k", cost).unwrap()],
        dry_run: false,
    };
    for choice in [FailurePolicy::Allow, FailurePolicy::Deny] {
        let flaky = Flaky::new();
        flaky.failing.store(true, Ordering::SeqCst);
        let store = policy(flaky.clone(), choice);
        let read = decide(&store, &with_cost(0)).await.unwrap();
        assert!(
            read.allowed && read.degraded,
            "{choice:?}: a cost of 0 is a read"
        );
        let never = decide(&store, &with_cost(6)).await.unwrap();
        assert!(
            !never.allowed && never.retry_after.is_none(),
            "{choice:?}: a cost above the capacity never fits: {never:?}"
        );
    }
}

#[tokio::test]
async fn resetting_a_whole_limit_is_not_cut_off_at_the_decision_timeout() {
    let flaky = Flaky::new();
    let store = policy(flaky.clone(), FailurePolicy::Local);
    let l = limit("1/hour");
    decide(&store, &request(&l, "k")).await.unwrap();
    let removed = store.reset_limit(&l).await;
    assert!(
        removed.is_ok(),
        "300 ms is past the 100 ms decision timeout: {removed:?}"
    );
    assert!(decide(&store, &request(&l, "k")).await.unwrap().allowed);
}
