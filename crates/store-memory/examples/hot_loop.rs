//! Decisions in a loop, for profiling: one hot key (the fixed cost of a decision), or
//! a uniform stream over many keys (the table's cache misses on top).
//! Run: `cargo run --release -p sluice-store-memory --example hot_loop -- [ITERATIONS] [KEYS]`

use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000_000);
    let key_count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let store = MemoryStore::new(MemoryStoreConfig {
        max_keys: (2 * key_count).max(1_000_000),
        ..Default::default()
    });
    // One hot key never runs out; with many keys each state outlives a pass over the
    // stream, as in the criterion benchmark, so the table is not swept under the loop.
    let rate = if key_count == 1 {
        "1000000000/day"
    } else {
        "1000/hour"
    };
    let limit = Arc::new(Limit::new("hot", LimitSpec::new(vec![rate.parse().unwrap()])).unwrap());
    let keys: Vec<String> = (0..key_count).map(|i| format!("user:{i}")).collect();
    let decide = |key: &str| {
        let request = DecisionRequest {
            checks: vec![Check::new(Arc::clone(&limit), key, 1).unwrap()],
            dry_run: false,
        };
        u64::from(store.decide_sync(&request).windows[0].allowed)
    };
    let governor = governor::RateLimiter::keyed(governor::Quota::per_hour(
        std::num::NonZeroU32::new(1000).unwrap(),
    ));
    let on_governor = args.next().as_deref() == Some("governor");
    let decide = |key: &String| {
        if on_governor {
            u64::from(governor.check_key(key).is_ok())
        } else {
            decide(key)
        }
    };
    for key in &keys {
        decide(key);
    }
    // xorshift64*: the same uniform stream on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let started = Instant::now();
    let mut allowed = 0u64;
    for _ in 0..iterations {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let index = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) % key_count as u64) as usize;
        allowed += decide(&keys[index]);
    }
    let elapsed = started.elapsed();
    println!(
        "{allowed} allowed, {:.1} ns per decision",
        elapsed.as_nanos() as f64 / iterations as f64
    );
}
