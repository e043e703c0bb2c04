//! The shared semantic suite against a real `redis-server` and against a real
//! three-master Redis Cluster, on the real clock: each test starts its own servers
//! (killed when the test ends) and lets time pass by sleeping. The Redis servers' clock
//! is the machine's clock, so the harness aligns to period boundaries with the system
//! time. In the cluster, the checks of one decision land in different slots (their
//! keys hash differently), so the suite's atomicity cases run through the
//! reserve-then-refund path. The suite runs a second time on each as a least-privilege
//! ACL user allowed only [`ACL_COMMANDS`] on the suite's keys, so the ACL line README
//! gives is exactly enough.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_engine::Store;
use sluice_store_redis::{ACL_COMMANDS, RedisStore, RedisStoreConfig};
use sluice_testkit::servers::{RedisCluster, RedisServer};
use sluice_testkit::{Harness, semantic_suite};

const PREFIX: &str = "sluice:test:";

/// The servers behind a harness.
enum Deployment {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Deployment {
    fn node_urls(&self) -> Vec<String> {
        match self {
            Deployment::Single(server) => vec![server.url()],
            Deployment::Cluster(cluster) => cluster.urls(),
        }
    }
}

struct RedisHarness {
    store: Arc<RedisStore>,
    // Dropped after the store: kills the servers.
    deployment: Deployment,
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
    async fn single() -> Self {
        let server = RedisServer::start().expect("redis-server starts (scripts/test installs it)");
        Self::on(Deployment::Single(server)).await
    }

    async fn cluster() -> Self {
        let cluster = RedisCluster::start(3).expect("a 3-master Redis Cluster starts");
        Self::on(Deployment::Cluster(cluster)).await
    }

    /// One server, the store connecting as a user allowed only [`ACL_COMMANDS`].
    async fn single_as_acl_user() -> Self {
        let server = RedisServer::start().expect("redis-server starts (scripts/test installs it)");
        create_acl_user(&server);
        Self::on_as(Deployment::Single(server), Some(ACL_USER)).await
    }

    /// A cluster, every node with the same least-privilege user.
    async fn cluster_as_acl_user() -> Self {
        let cluster = RedisCluster::start(3).expect("a 3-master Redis Cluster starts");
        for node in cluster.nodes() {
            create_acl_user(node);
        }
        Self::on_as(Deployment::Cluster(cluster), Some(ACL_USER)).await
    }

    async fn on(deployment: Deployment) -> Self {
        Self::on_as(deployment, None).await
    }

    async fn on_as(deployment: Deployment, user: Option<(&str, &str)>) -> Self {
        let as_user = |url: String| match user {
            None => url,
            Some((name, password)) => {
                url.replace("redis://", &format!("redis://{name}:{password}@"))
            }
        };
        let mut config = match &deployment {
            Deployment::Single(server) => RedisStoreConfig::new(as_user(server.url())),
            Deployment::Cluster(cluster) => {
                RedisStoreConfig::cluster(cluster.urls().into_iter().map(as_user))
            }
        };
        config.prefix = PREFIX.to_string();
        config.timeout = Duration::from_secs(5);
        let store = RedisStore::connect(config).await.expect("connect");
        // Start every case just past a second boundary, so a burst of writes to
        // one-second windows (the expiry case) never straddles one.
        sleep_to_boundary(Duration::from_secs(1), Duration::from_millis(5)).await;
        RedisHarness {
            store: Arc::new(store),
            deployment,
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

    /// The server runs on this machine, on its clock.
    fn now(&self) -> i64 {
        sluice_testkit::system_now()
    }

    /// A real server's clock cannot be set.
    async fn jump_to(&self, _at: i64) -> bool {
        false
    }

    async fn live_counters(&self) -> u64 {
        let mut count = 0;
        for url in self.deployment.node_urls() {
            count += live_keys_on(&url).await;
        }
        count
    }
}

/// Keys of this suite still alive on one node.
async fn live_keys_on(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("url");
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

/// The least-privilege user's name and password.
const ACL_USER: (&str, &str) = ("sluice", "sluice-test-password");

/// README's least-privilege user, for the suite's prefix.
fn create_acl_user(server: &RedisServer) {
    let (name, password) = ACL_USER;
    server
        .create_acl_user(name, password, &format!("{PREFIX}*"), ACL_COMMANDS)
        .expect("ACL SETUSER");
}

mod single_server {
    use super::*;
    semantic_suite!(RedisHarness::single());
}

mod cluster {
    use super::*;
    semantic_suite!(RedisHarness::cluster());
}

mod single_server_as_acl_user {
    use super::*;
    semantic_suite!(RedisHarness::single_as_acl_user());
}

mod cluster_as_acl_user {
    use super::*;
    semantic_suite!(RedisHarness::cluster_as_acl_user());
}
