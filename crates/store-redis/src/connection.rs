//! One handle over a single Redis server, a Redis Cluster or a primary found through
//! Redis Sentinel, so the store's calls are written once.
//!
//! Both are multiplexed: concurrent decisions share the connections (pipelined on the
//! wire), they do not take one each. A single server is one [`ConnectionManager`] for the
//! whole process, which reconnects by itself. (One per serving thread saved two thread
//! hand-offs per decision, about 10% in BENCHMARKS.md, but then every thread found out
//! about a Redis restart on its own first call after it, and recovery flapped.) A cluster is redis-rs's cluster connection, which routes every
//! command by the slot of its first key, follows `MOVED`/`ASK` redirections and
//! refreshes its slot map when nodes change; it is opened lazily, so sluice starts (and
//! decides by `on_error`) while the cluster is down.
//!
//! With Sentinel, [`SentinelPrimary`] asks the sentinels which server is the primary,
//! keeps one multiplexed connection to it, and forgets that connection as soon as a
//! command on it fails in a way a failover causes (the connection drops or times out, or
//! the server answers `READONLY` because it was demoted): the next command asks the
//! sentinels again, so sluice follows a promoted replica without a restart. The command
//! that failed is not repeated here (it may have run); the store's caller decides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::SentinelClient;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// Where a store's connections come from (a clone shares them).
#[derive(Clone)]
pub(crate) enum Connections {
    /// One Redis server: one multiplexed connection, reconnected when it drops.
    Single(ConnectionManager),
    /// A Redis Cluster: one connection (to every node) shared by all threads.
    Cluster(ClusterConnection),
    /// The primary that Redis Sentinel names, followed across failovers.
    Sentinel(Arc<SentinelPrimary>),
}

impl Connections {
    /// A handle on the connection (cheap: all are multiplexed).
    pub(crate) fn get(&self) -> Connection {
        match self {
            Connections::Single(manager) => Connection::Single(manager.clone()),
            Connections::Cluster(cluster) => Connection::Cluster(cluster.clone()),
            Connections::Sentinel(primary) => Connection::Sentinel(Arc::clone(primary)),
        }
    }

    /// Whether keys must be grouped by slot (a script may only touch one slot's keys).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connections::Cluster(_))
    }
}

/// A multiplexed connection to one server or to a cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
    /// The primary Sentinel names.
    Sentinel(Arc<SentinelPrimary>),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
            Connection::Sentinel(primary) => Box::pin(async move {
                let (generation, mut connection) = primary.connection().await?;
                let answer = connection.req_packed_command(cmd).await;
                primary.after(generation, &answer);
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Sentinel(primary) => Box::pin(async move {
                let (generation, mut connection) = primary.connection().await?;
                let answer = connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                primary.after(generation, &answer);
                answer
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
            Connection::Sentinel(primary) => primary.db,
        }
    }
}

/// The primary of one Sentinel-monitored service: a connection to the server the
/// sentinels name, replaced after a failover.
pub(crate) struct SentinelPrimary {
    /// Asks the sentinels (one lookup at a time: concurrent callers wait for it).
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The connection in use and its generation; `None` until the first lookup and after
    /// a failure that a failover explains.
    current: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// Numbers the connections, so a late failure on an old one never drops a new one.
    generations: AtomicU64,
    /// Timeouts of the primary's connection.
    config: AsyncConnectionConfig,
    /// The database the primary's connection selects.
    db: i64,
}

impl SentinelPrimary {
    /// Follows the primary `sentinels` names; connects on first use.
    pub(crate) fn new(sentinels: SentinelClient, config: AsyncConnectionConfig, db: i64) -> Self {
        SentinelPrimary {
            sentinels: tokio::sync::Mutex::new(sentinels),
            current: RwLock::new(None),
            generations: AtomicU64::new(0),
            config,
            db,
        }
    }

    /// The connection to the primary, asking the sentinels first when there is none.
    async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.read() {
            return Ok(current);
        }
        let mut sentinels = self.sentinels.lock().await;
        // Another caller may have looked it up while this one waited.
        if let Some(current) = self.read() {
            return Ok(current);
        }
        let connection = sentinels
            .get_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut current) = self.current.write() {
            *current = Some((generation, connection.clone()));
        }
        Ok((generation, connection))
    }

    /// A client for the primary the sentinels name now: where the deny cache subscribes.
    pub(crate) async fn client(&self) -> RedisResult<redis::Client> {
        self.sentinels.lock().await.async_get_client().await
    }

    /// How many connections to a primary have been made: moves when a failure made the
    /// store ask the sentinels again (the deny cache subscribes again then).
    pub(crate) fn generation(&self) -> u64 {
        self.generations.load(Ordering::Relaxed)
    }

    fn read(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.read().ok().and_then(|current| current.clone())
    }

    /// Forgets connection `generation` when `answer` says the primary may have moved.
    fn after<T>(&self, generation: u64, answer: &RedisResult<T>) {
        let Err(error) = answer else { return };
        if !primary_may_have_moved(error) {
            return;
        }
        if let Ok(mut current) = self.current.write()
            && current.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            *current = None;
        }
    }
}

/// Failures after which the sentinels are asked again: the server is gone or slow, or it
/// is a replica now.
fn primary_may_have_moved(error: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading
            )
        )
}
