//! One handle over a single Redis server or a Redis Cluster, so the store's calls are
//! written once.
//!
//! Both are multiplexed: concurrent decisions share the connections (pipelined on the
//! wire), they do not take one each. A single server gets one [`ConnectionManager`] per
//! thread that uses the store (each reconnects by itself): sluice serves HTTP on one
//! single-threaded runtime per core, and a connection driven by the thread that
//! decides saves two thread hand-offs (and their wake-ups) per decision. A cluster is redis-rs's cluster connection, which routes every
//! command by the slot of its first key, follows `MOVED`/`ASK` redirections and
//! refreshes its slot map when nodes change; it is opened lazily, so sluice starts (and
//! decides by `on_error`) while the cluster is down.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use thread_local::ThreadLocal;

/// Where a store's connections come from.
pub(crate) enum Connections {
    /// One Redis server: a multiplexed connection per thread, opened on its first use.
    Single(Box<PerThread>),
    /// A Redis Cluster: one connection (to every node) shared by all threads.
    Cluster(ClusterConnection),
}

/// One server's connections, one per thread.
pub(crate) struct PerThread {
    /// The server.
    pub client: Client,
    /// Timeouts and reconnection.
    pub config: ConnectionManagerConfig,
    /// This thread's connection.
    pub connections: ThreadLocal<ConnectionManager>,
}

impl Connections {
    /// The connection for this thread. Must be called inside a Tokio runtime: a new
    /// connection's driver runs on it.
    pub(crate) fn get(&self) -> RedisResult<Connection> {
        match self {
            Connections::Single(server) => server
                .connections
                .get_or_try(|| {
                    ConnectionManager::new_lazy_with_config(
                        server.client.clone(),
                        server.config.clone(),
                    )
                })
                .map(|manager| Connection::Single(manager.clone())),
            Connections::Cluster(cluster) => Ok(Connection::Cluster(cluster.clone())),
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
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}
