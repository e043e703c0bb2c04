//! The shared semantic suite against the disk store on a manual clock, each test in a
//! fresh data directory.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::{Clock, ManualClock, Store};
use sluice_store_disk::{DiskStore, DiskStoreConfig};
use sluice_testkit::{Harness, semantic_suite};

/// 2024-10-04T00:00:00Z plus a quarter second: day-aligned, but not on a boundary.
const START: i64 = 20_000 * 86_400 * 1_000_000 + 250_000;

struct DiskHarness {
    clock: Arc<ManualClock>,
    store: Arc<DiskStore>,
    // Dropped after the store.
    _dir: tempfile::TempDir,
}

impl DiskHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(START));
        let store = DiskStore::open_with_clock(DiskStoreConfig::new(dir.path()), clock.clone())
            .expect("open disk store");
        DiskHarness {
            clock,
            store: Arc::new(store),
            _dir: dir,
        }
    }
}

impl Harness for DiskHarness {
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

semantic_suite!(async { DiskHarness::new() });
