//! The shared semantic suite against a real `redis-server` on the real clock: each
//! test starts its own server (killed when the test ends) and lets time pass by
//! sleeping. The Redis server's clock is the machine's clock, so the harness aligns
//! to period boundaries with the system time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_engine::Store;
use sluice_store_redis::{RedisStore, RedisStoreConfig};
use sluice_testkit::servers::RedisServer;
use sluice_testkit::{Harness, semantic_suite};

const PREFIX: &str = "sluice:test:";

struct RedisHarness {
    store: Arc<RedisStore>,
    // Dropped after the store: kills the server.
    _server: RedisServer,
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

impl RedisHarness {
    async fn new() -> Self {
        let server = RedisServer::start().expect("redis-server starts (scripts/test installs it)");
        let mut config = RedisStoreConfig::new(server.url());
        config.prefix = PREFIX.to_string();
        config.timeout = Duration::from_secs(5);
        let store = RedisStore::connect(config).await.expect("connect");
        // Start every case just past a second boundary, so a burst of writes to
        // one-second windows (the expiry case) never straddles one.
        sleep_to_boundary(Duration::from_secs(1), Duration::from_millis(5)).await;
        RedisHarness {
            store: Arc::new(store),
            _server: server,
        }
    }
}

impl Harness for RedisHarness {
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

    async fn live_counters(&self) -> u64 {
        let client = redis::Client::open(self._server.url()).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let mut cursor: u64 = 0;
        let mut count = 0;
        loop {
            // SCAN skips keys that have expired.
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await
                .expect("scan");
            count += keys.len() as u64;
            if next == 0 {
                return count;
            }
            cursor = next;
        }
    }
}

semantic_suite!(RedisHarness::new());
