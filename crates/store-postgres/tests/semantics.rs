//! The shared semantic suite against a real PostgreSQL on the real clock: each test
//! starts its own cluster (stopped and removed when the test ends) and lets time pass
//! by sleeping. The database's clock is the machine's clock, so the harness aligns to
//! period boundaries with the system time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_engine::Store;
use sluice_store_postgres::{PostgresStore, PostgresStoreConfig};
use sluice_testkit::servers::PostgresServer;
use sluice_testkit::{Harness, semantic_suite};

const PREFIX: &str = "sluice:test:";

struct PostgresHarness {
    store: Arc<PostgresStore>,
    // Dropped after the store: stops the cluster.
    server: PostgresServer,
}

/// Sleeps until `margin` past the next multiple of `period` since the Unix epoch.
async fn sleep_to_boundary(period: Duration, margin: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros();
    let period = period.as_micros();
    let wait = period - now % period;
    tokio::time::sleep(Duration::from_micros(wait as u64) + margin).await;
}

impl PostgresHarness {
    async fn new() -> Self {
        let server = PostgresServer::start().expect("PostgreSQL starts (scripts/test installs it)");
        let mut config = PostgresStoreConfig::new(server.url());
        config.prefix = PREFIX.to_string();
        config.timeout = Duration::from_secs(5);
        let store = PostgresStore::new(config).expect("config");
        store.prepare().await.expect("schema installed");
        // Start every case just past a second boundary, so a burst of writes to
        // one-second windows (the expiry case) never straddles one.
        sleep_to_boundary(Duration::from_secs(1), Duration::from_millis(5)).await;
        PostgresHarness {
            store: Arc::new(store),
            server,
        }
    }
}

impl Harness for PostgresHarness {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    async fn align_to(&self, period: Duration) {
        sleep_to_boundary(period, Duration::from_millis(5)).await;
    }

    /// Real time passes between two calls; 300 ms covers a loaded 2-core machine.
    fn slack(&self) -> Duration {
        Duration::from_millis(300)
    }

    /// The server runs on this machine, on its clock.
    fn now(&self) -> i64 {
        sluice_testkit::system_now()
    }

    /// A real server's clock cannot be set.
    async fn jump_to(&self, _at: i64) -> bool {
        false
    }

    /// Rows whose state still matters on the database's clock (the sweep deletes the
    /// others a little later; `sweep.rs` tests that it does).
    async fn live_counters(&self) -> u64 {
        let sql = format!(
            "SELECT count(*) FROM public.sluice_counters WHERE key LIKE '{PREFIX}%' \
             AND expires_at > (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
        );
        let server = &self.server;
        tokio::task::block_in_place(|| server.psql(&sql))
            .expect("count rows")
            .parse()
            .expect("a count")
    }
}

semantic_suite!(PostgresHarness::new());
