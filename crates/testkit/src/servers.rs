//! Real servers for tests, started from the machine's packages (no docker).
//!
//! [`RedisServer`] runs Debian's `redis-server` on a free loopback port with its own
//! temporary directory and no persistence, waits until it answers `PING`, and kills
//! it and removes the directory when dropped. Tests of the store-failure policy can
//! [`RedisServer::stop`] it and [`RedisServer::restart`] it on the same port.
//! [`RedisCluster`] starts several of them with cluster mode on and joins them into one
//! Redis Cluster with `redis-cli --cluster create`.
//! [`PostgresServer`] (in `postgres.rs`) does the same for a PostgreSQL cluster.
//! Tests look at what a store wrote through [`RedisServer::query`] (the `redis` crate's
//! sync client) and [`PostgresServer::psql`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use crate::postgres::PostgresServer;

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The binary is not installed (`scripts/test` installs it).
    #[error("{0} not found: run scripts/test, which installs it (Debian package {1})")]
    NotInstalled(&'static str, &'static str),
    /// Starting or talking to the process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command to a Redis server failed.
    #[error("redis {command}: {source}")]
    Redis {
        /// The command line.
        command: String,
        /// The client's error.
        source: redis::RedisError,
    },
    /// The server did not answer in time.
    #[error("{0} did not answer within {1:?}")]
    NotReady(String, Duration),
    /// A setup command (initdb, pg_ctl, psql) failed.
    #[error("{command} failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// How long a server may take to answer its first `PING`.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `binary` on `PATH`.
pub fn find_binary(binary: &'static str) -> Result<PathBuf, ServerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .ok_or(ServerError::NotInstalled(binary, binary))
}

/// A loopback port nobody listens on right now (bind port 0, read it, let it go).
pub fn free_port() -> Result<u16, ServerError> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding a free port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io("reading the free port"))
}

/// Whether a Redis server on `port` answers `PING` with `PONG` (within a second).
pub fn redis_answers(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return false;
    };
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    if connection
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_err()
    {
        return false;
    }
    redis::cmd("PING")
        .query::<String>(&mut connection)
        .is_ok_and(|answer| answer == "PONG")
}

/// A `redis-server` of its own, killed and cleaned up on drop.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra command-line arguments
    /// (e.g. `["--cluster-enabled", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Result<Self, ServerError> {
        let binary = find_binary("redis-server")
            .map_err(|_| ServerError::NotInstalled("redis-server", "redis-server"))?;
        // A port found free may be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            let mut server = RedisServer {
                binary: binary.clone(),
                port: free_port()?,
                dir: tempfile::Builder::new()
                    .prefix("sluice-redis-")
                    .tempdir()
                    .map_err(io("creating a temp dir for redis-server"))?,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(ServerError::NotInstalled("redis-server", "redis-server")))
    }

    fn launch(&mut self) -> Result<(), ServerError> {
        let child = Command::new(&self.binary)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if redis_answers(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return Err(ServerError::NotReady(
                    format!("redis-server on port {} (exited)", self.port),
                    READY_TIMEOUT,
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(ServerError::NotReady(
            format!("redis-server on port {}", self.port),
            READY_TIMEOUT,
        ))
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends one command (e.g. `["KEYS", "*"]`, `["CLUSTER", "KEYSLOT", key]`) over a
    /// fresh connection and converts the reply to `T`.
    pub fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> Result<T, ServerError> {
        let failed = |source| ServerError::Redis {
            command: args.join(" "),
            source,
        };
        let client = redis::Client::open(self.url()).map_err(failed)?;
        let mut connection = client
            .get_connection_with_timeout(Duration::from_millis(500))
            .map_err(failed)?;
        connection
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(failed)?;
        let mut command = redis::Cmd::new();
        for arg in args {
            command.arg(*arg);
        }
        command.query(&mut connection).map_err(failed)
    }

    /// `INFO commandstats` as (command, field) → value, e.g. `("evalsha", "calls") → 300`:
    /// how a test counts the round trips a store made.
    pub fn command_stats(&self) -> Result<BTreeMap<(String, String), u64>, ServerError> {
        let text: String = self.query(&["INFO", "commandstats"])?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some((name, fields)) = line.trim().split_once(':') else {
                continue;
            };
            let Some(command) = name.strip_prefix("cmdstat_") else {
                continue;
            };
            for field in fields.split(',') {
                if let Some((k, v)) = field.split_once('=')
                    && let Ok(v) = v.parse::<u64>()
                {
                    out.insert((command.to_string(), k.to_string()), v);
                }
            }
        }
        Ok(out)
    }

    /// Kills the server (SIGKILL) and waits for it to exit; the data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.launch()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `masters` loopback nodes and no replicas, every slot assigned,
/// killed and cleaned up on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, as `redis-cli --cluster create` demands),
    /// joins them and waits until every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> Result<Self, ServerError> {
        let cli = find_binary("redis-cli")?;
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
            ])?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running redis-cli --cluster create"))?;
        if !output.status.success() {
            return Err(ServerError::Io {
                what: format!(
                    "redis-cli --cluster create {}: {}",
                    addresses.join(" "),
                    String::from_utf8_lossy(&output.stdout)
                ),
                source: std::io::Error::other("cluster creation failed"),
            });
        }
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !cluster.is_ok(&cli) {
            if Instant::now() > deadline {
                return Err(ServerError::NotReady(
                    format!("Redis Cluster {}", addresses.join(" ")),
                    READY_TIMEOUT,
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    fn is_ok(&self, cli: &Path) -> bool {
        self.nodes.iter().all(|node| {
            Command::new(cli)
                .args(["-p", &node.port().to_string(), "CLUSTER", "INFO"])
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        })
    }

    /// `redis://127.0.0.1:PORT/` of every node: any one is enough as a seed.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes, to inspect (e.g. count keys on each) or to stop.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_server_starts_answers_and_is_cleaned_up() {
        let mut server = RedisServer::start().expect("redis-server starts");
        let (port, dir) = (server.port(), server.dir().to_path_buf());
        assert!(redis_answers(port));
        server.stop();
        assert!(!redis_answers(port), "stopped");
        server.restart().expect("restarts");
        assert!(redis_answers(port), "same port again");
        let set: String = server.query(&["SET", "k", "v"]).expect("SET");
        assert_eq!(set, "OK");
        let keys: Vec<String> = server.query(&["KEYS", "*"]).expect("KEYS");
        assert_eq!(keys, ["k"]);
        let stats = server.command_stats().expect("commandstats");
        assert_eq!(
            stats[&("set".to_string(), "calls".to_string())],
            1,
            "{stats:?}"
        );
        drop(server);
        assert!(!redis_answers(port), "killed on drop");
        assert!(!dir.exists(), "temp dir removed");
    }

    #[test]
    fn a_three_master_cluster_serves_every_slot() {
        let cluster = RedisCluster::start(3).expect("cluster starts");
        assert_eq!(cluster.urls().len(), 3);
        let cli = find_binary("redis-cli").expect("redis-cli");
        let info = Command::new(cli)
            .args([
                "-p",
                &cluster.nodes()[0].port().to_string(),
                "CLUSTER",
                "INFO",
            ])
            .output()
            .expect("cluster info");
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert!(info.contains("cluster_known_nodes:3"), "{info}");
    }
}
