//! One handle over a single Redis server or a Redis Cluster, so the store's calls are
//! written once.
//!
//! Both are multiplexed: concurrent decisions share the connections (pipelined on the
//! wire), they do not take one each. A single server is one [`ConnectionManager`] for the
//! whole process, which reconnects by itself. (One per serving thread saved two thread
//! hand-offs per decision, about 10% in BENCHMARKS.md, but then every thread found out
//! about a Redis restart on its own first call after it, and recovery flapped.) A cluster is redis-rs's cluster connection, which routes every
//! command by the slot of its first key, follows `MOVED`/`ASK` redirections and
//! refreshes its slot map when nodes change; it is opened lazily, so sluice starts (and
//! decides by `on_error`) while the cluster is down.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where a store's connections come from.
pub(crate) enum Connections {
    /// One Redis server: one multiplexed connection, reconnected when it drops.
    Single(ConnectionManager),
    /// A Redis Cluster: one connection (to every node) shared by all threads.
    Cluster(ClusterConnection),
}

impl Connections {
    /// A handle on the connection (cheap: both are multiplexed).
    pub(crate) fn get(&self) -> Connection {
        match self {
            Connections::Single(manager) => Connection::Single(manager.clone()),
            Connections::Cluster(cluster) => Connection::Cluster(cluster.clone()),
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
