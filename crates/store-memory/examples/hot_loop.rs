//! A single hot key decided in a loop: for profiling the fixed cost of one decision.
//! Run: `cargo run --release -p sluice-store-memory --example hot_loop -- [ITERATIONS]`

use std::sync::Arc;
use std::time::Instant;

use sluice_engine::{Check, DecisionRequest, Limit, LimitSpec};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};

fn main() {
    let iterations: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000_000);
    let store = MemoryStore::new(MemoryStoreConfig::default());
    let limit = Arc::new(
        Limit::new(
            "hot",
            LimitSpec::new(vec!["1000000000/day".parse().unwrap()]),
        )
        .unwrap(),
    );
    let started = Instant::now();
    let mut allowed = 0u64;
    for _ in 0..iterations {
        let request = DecisionRequest {
            checks: vec![Check::new(Arc::clone(&limit), "user:42", 1).unwrap()],
            dry_run: false,
        };
        allowed += u64::from(store.decide_sync(&request).windows[0].allowed);
    }
    let elapsed = started.elapsed();
    println!(
        "{allowed} allowed, {:.1} ns per decision",
        elapsed.as_nanos() as f64 / iterations as f64
    );
}
