//! The shared semantic suite against the memory store on a manual clock.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Clock, ManualClock, Store};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};
use sluice_testkit::{Harness, semantic_suite};

/// 2024-10-04T00:00:00Z plus a quarter second: day-aligned, but not on a boundary.
const START: i64 = 20_000 * 86_400 * 1_000_000 + 250_000;

struct MemoryHarness {
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
}

impl MemoryHarness {
    fn new() -> Self {
        let clock = Arc::new(ManualClock::new(START));
        let store = Arc::new(MemoryStore::with_clock(
            MemoryStoreConfig::default(),
            clock.clone(),
        ));
        MemoryHarness { clock, store }
    }
}

impl Harness for MemoryHarness {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    async fn align_to(&self, period: Duration) {
        let period = period.as_micros() as i64;
        let now = self.clock.now();
        self.clock
            .set(now - now.rem_euclid(period) + period + 1_000);
    }

    fn slack(&self) -> Duration {
        Duration::ZERO
    }

    async fn live_counters(&self) -> u64 {
        self.store.sweep();
        self.store.len() as u64
    }

    fn now(&self) -> i64 {
        self.clock.now()
    }

    async fn jump_to(&self, at: i64) -> bool {
        self.clock.set(at);
        true
    }
}

semantic_suite!(async { MemoryHarness::new() });
