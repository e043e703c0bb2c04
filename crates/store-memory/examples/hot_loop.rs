//! Decisions in a loop, for profiling and for pairing with governor in one run
//! (`bench/engine-vs-governor.sh` alternates the two): one hot key (the fixed cost of a
//! decision), or a stream over many keys, uniform or Zipf(1.0), the table's cache
//! misses on top. The streams are the criterion benchmark's (`benches/memory_store.rs`).
//!
//! Run: `cargo run --release -p sluice-store-memory --example hot_loop --
//! [ITERATIONS] [KEYS] [sluice|governor] [uniform|zipf] [RATE]` (RATE for sluice; a
//! long one such as `1000/day` keeps states alive under valgrind's slowdown).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

// The server's allocator: a decision allocates its request and answer as the server's do.
#[global_allocator]
static ALLOCATOR: sluice_alloc::Mimalloc = sluice_alloc::Mimalloc;

#[path = "../benches/support/streams.rs"]
mod streams;
use streams::STREAM;

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000_000);
    let key_count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let on_governor = args.next().as_deref() == Some("governor");
    let zipf = args.next().as_deref() == Some("zipf");
    let rate_arg = args.next();

    // One hot key never runs out; with many keys each state outlives a pass over the
    // stream, as in the criterion benchmark.
    let rate = match (&rate_arg, key_count) {
        (Some(rate), _) => rate.as_str(),
        (None, 1) => "1000000000/day",
        (None, _) => "1000/hour",
    };
    let limit = Arc::new(Limit::new("hot", LimitSpec::new(vec![rate.parse().unwrap()])).unwrap());
    let store = MemoryStore::new(MemoryStoreConfig {
        max_keys: (2 * key_count).max(1_000_000),
        ..Default::default()
    });
    let governor =
        governor::RateLimiter::keyed(governor::Quota::per_hour(NonZeroU32::new(1000).unwrap()));
    let decide = |key: &String| -> u64 {
        if on_governor {
            return u64::from(governor.check_key(key).is_ok());
        }
        // As the server does: an owned request per decision.
        let request = DecisionRequest {
            checks: vec![Check::new(Arc::clone(&limit), key.as_str(), 1).unwrap()],
            dry_run: false,
        };
        u64::from(store.decide_sync(&request).windows[0].allowed)
    };

    let keys: Vec<String> = (0..key_count).map(|i| format!("user:{i}")).collect();
    let draws = if zipf {
        streams::zipf(key_count)
    } else {
        streams::uniform(key_count)
    };
    for key in &keys {
        decide(key);
    }
    let started = Instant::now();
    let mut allowed = 0u64;
    for i in 0..iterations {
        allowed += decide(&keys[draws[i & (STREAM - 1)]]);
    }
    let elapsed = started.elapsed();
    println!(
        "{allowed} allowed, {:.1} ns per decision",
        elapsed.as_nanos() as f64 / iterations as f64
    );
}
