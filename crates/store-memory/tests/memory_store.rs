//! Behaviour of the memory store beyond the shared suite: real threads on one key,
//! lock ordering across shards, the `max_keys` bound and who gets evicted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sluice_engine::{Algorithm, Check, DecisionRequest, Limit, LimitSpec, ManualClock, Store};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

const START: i64 = 20_000 * 86_400 * 1_000_000 + 250_000;

fn limit(name: &str, rate: &str, algorithm: Algorithm) -> Arc<Limit> {
    let mut spec = LimitSpec::new(vec![rate.parse().unwrap()]);
    spec.algorithm = algorithm;
    Arc::new(Limit::new(name, spec).unwrap())
}

fn request(checks: &[(&Arc<Limit>, &str)]) -> DecisionRequest {
    DecisionRequest {
        checks: checks
            .iter()
            .map(|(l, k)| Check::new(Arc::clone(l), *k, 1).unwrap())
            .collect(),
        dry_run: false,
    }
}

fn store(max_keys: usize) -> (Arc<ManualClock>, MemoryStore) {
    let clock = Arc::new(ManualClock::new(START));
    let config = MemoryStoreConfig {
        max_keys,
        sweep_interval: Duration::from_secs(3600),
    };
    (clock.clone(), MemoryStore::with_clock(config, clock))
}

#[test]
fn threads_hammering_one_key_are_admitted_exactly_the_quota() {
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let (_clock, store) = store(100_000);
        let l = limit("hot", "1000/day", algorithm);
        let admitted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        if store.decide_sync(&request(&[(&l, "one-key")])).windows[0].allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            admitted.load(Ordering::Relaxed),
            1000,
            "{algorithm}: 4000 attempts, quota 1000"
        );
    }
}

#[test]
fn decisions_over_many_shards_in_opposite_orders_do_not_deadlock() {
    let (_clock, store) = store(1_000_000);
    let a = limit("a", "1000000/day", Algorithm::FixedWindow);
    let b = limit("b", "1000000/day", Algorithm::FixedWindow);
    let keys: Vec<String> = (0..64).map(|i| format!("key-{i}")).collect();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (store, keys, a, b) = (&store, &keys, &a, &b);
            scope.spawn(move || {
                for i in 0..5_000 {
                    let (x, y) = (&keys[i % 64], &keys[(i * 7 + t) % 64]);
                    let checks: Vec<(&Arc<Limit>, &str)> = if t % 2 == 0 {
                        vec![(a, x), (b, y), (a, y)]
                    } else {
                        vec![(a, y), (b, y), (a, x)]
                    };
                    store.decide_sync(&request(&checks));
                }
            });
        }
    });
    // 4 threads × 5000 decisions, each charging `a` twice (once when x == y twice over the same counter).
    let total: u64 = keys
        .iter()
        .map(|k| {
            1_000_000
                - store
                    .decide_sync(&DecisionRequest {
                        checks: vec![Check::new(Arc::clone(&a), k.as_str(), 0).unwrap()],
                        dry_run: false,
                    })
                    .windows[0]
                    .remaining
        })
        .sum();
    assert_eq!(total, 4 * 5_000 * 2, "every charge landed exactly once");
}

#[test]
fn a_key_flood_never_holds_more_than_max_keys() {
    let (_clock, store) = store(10_000);
    let l = limit("flood", "5/minute", Algorithm::Gcra);
    for i in 0..200_000 {
        store.decide_sync(&request(&[(&l, &format!("fake-{i}"))]));
        assert!(store.len() <= 10_000);
    }
    let stats = store.stats();
    assert!(
        stats.keys <= 10_000 && stats.keys > 9_000,
        "full but bounded: {}",
        stats.keys
    );
    assert!(
        stats.evictions >= 190_000,
        "the flood was evicted: {}",
        stats.evictions
    );
}

#[test]
fn a_full_store_evicts_the_counters_nearest_to_expiry_first() {
    let (clock, store) = store(100);
    let long = limit("long", "5/day", Algorithm::FixedWindow);
    let short = limit("short", "5/minute", Algorithm::Gcra);
    // 50 counters that live a day, spent down to 1 left: these must survive.
    for i in 0..50 {
        for _ in 0..4 {
            store.decide_sync(&request(&[(&long, &format!("user-{i}"))]));
        }
    }
    // Then a flood of counters that each live 12 seconds.
    for i in 0..1_000 {
        clock.advance(Duration::from_millis(1));
        store.decide_sync(&request(&[(&short, &format!("fake-{i}"))]));
    }
    assert!(store.stats().evictions > 0);
    for i in 0..50 {
        let d = store.decide_sync(&DecisionRequest {
            checks: vec![Check::new(Arc::clone(&long), format!("user-{i}"), 0).unwrap()],
            dry_run: false,
        });
        assert_eq!(
            d.windows[0].remaining, 1,
            "user-{i} kept its counter through the flood"
        );
    }
}

/// Every fixed window of a limit ends at once, so expiry alone cannot tell a key that
/// spent its quota from a flood of invented keys spent once each: evicting the spent one
/// would hand it a fresh quota. The least spent go first.
#[test]
fn a_flood_of_invented_keys_does_not_evict_a_spent_fixed_window() {
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let (_clock, store) = store(100);
        let l = limit("api", "3/hour", algorithm);
        for _ in 0..3 {
            assert!(store.decide_sync(&request(&[(&l, "me")])).windows[0].allowed);
        }
        assert!(!store.decide_sync(&request(&[(&l, "me")])).windows[0].allowed);
        for i in 0..2_400 {
            store.decide_sync(&request(&[(&l, &format!("fake-{i}"))]));
        }
        assert!(
            store.stats().evictions > 1_000,
            "{algorithm:?}: the flood was evicted"
        );
        assert!(
            !store.decide_sync(&request(&[(&l, "me")])).windows[0].allowed,
            "{algorithm:?}: the spent key kept its counter through the flood"
        );
    }
}

#[test]
fn a_decision_never_evicts_the_counters_it_just_charged() {
    // One shard of 16: full of long-lived counters, then a decision that inserts two
    // short-lived ones. Making room for the second must not evict the first.
    let (_clock, store) = store(16);
    let long = limit("long", "5/day", Algorithm::FixedWindow);
    for i in 0..16 {
        store.decide_sync(&request(&[(&long, &format!("old-{i}"))]));
    }
    let short = limit("short", "5/minute", Algorithm::Gcra);
    let d = store.decide_sync(&request(&[(&short, "new-a"), (&short, "new-b")]));
    assert!(d.windows.iter().all(|w| w.allowed));
    for key in ["new-a", "new-b"] {
        let read = store.decide_sync(&DecisionRequest {
            checks: vec![Check::new(Arc::clone(&short), key, 0).unwrap()],
            dry_run: false,
        });
        assert_eq!(
            read.windows[0].remaining, 4,
            "{key}'s charge survived the eviction"
        );
    }
}

#[test]
fn the_sweeper_drops_expired_counters_in_the_background() {
    let config = MemoryStoreConfig {
        max_keys: 1_000,
        sweep_interval: Duration::from_millis(20),
    };
    let store = MemoryStore::new(config);
    let l = limit("brief", "1/second", Algorithm::FixedWindow);
    for i in 0..100 {
        store.decide_sync(&request(&[(&l, &format!("k{i}"))]));
    }
    assert!(!store.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !store.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(store.is_empty(), "swept without any further decision");
}
