//! A Redis Sentinel deployment for tests: a primary, one replica and three sentinels
//! (Debian's `redis-sentinel`) on free loopback ports, tuned to fail over within a few
//! seconds (`down-after-milliseconds 1000`), all killed and cleaned up on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::{READY_TIMEOUT, RedisServer, ServerError, find_binary, free_port, io};

/// The service name the sentinels watch.
pub const MASTER_NAME: &str = "mymaster";

/// How long the sentinels may take to know the replica and each other, or to fail over.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(40);

/// One `redis-sentinel` process.
struct SentinelProcess {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A primary, a replica of it and three sentinels watching them as [`MASTER_NAME`].
pub struct SentinelGroup {
    /// The servers: the primary first, then the replica (roles change on a failover).
    servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

impl SentinelGroup {
    /// Starts them and waits until every sentinel knows the replica and the two other
    /// sentinels, so a failover can be agreed on.
    pub fn start() -> Result<Self, ServerError> {
        let binary = find_binary("redis-sentinel")
            .map_err(|_| ServerError::NotInstalled("redis-sentinel", "redis-sentinel"))?;
        let primary = RedisServer::start()?;
        let replica_of = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of])?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(start_sentinel(&binary, primary.port())?);
        }
        let group = SentinelGroup {
            servers: vec![primary, replica],
            sentinels,
        };
        group.wait_until("the sentinels know the replica and each other", |group| {
            group.sentinels.iter().all(|s| {
                let info = sentinel_cli(s.port, &["SENTINEL", "MASTER", MASTER_NAME]);
                field(&info, "num-slaves") == Some("1")
                    && field(&info, "num-other-sentinels") == Some("2")
            })
        })?;
        Ok(group)
    }

    /// `redis://127.0.0.1:PORT` of every sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The servers: the first started as the primary, the second as its replica.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// Kills the server that is primary now (SIGKILL).
    pub fn kill_primary(&mut self) -> Result<u16, ServerError> {
        let port = self.primary_port()?;
        if let Some(server) = self.servers.iter_mut().find(|s| s.port() == port) {
            server.stop();
        }
        Ok(port)
    }

    /// The port of the primary the sentinels name now.
    pub fn primary_port(&self) -> Result<u16, ServerError> {
        for sentinel in &self.sentinels {
            let answer = sentinel_cli(
                sentinel.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
            );
            if let Some(port) = answer.lines().nth(1).and_then(|p| p.trim().parse().ok()) {
                return Ok(port);
            }
        }
        Err(ServerError::NotReady(
            "an answer from the sentinels".into(),
            READY_TIMEOUT,
        ))
    }

    /// Waits until the sentinels name a primary other than `old` (a failover happened).
    pub fn wait_for_failover(&self, old: u16) -> Result<u16, ServerError> {
        self.wait_until("the sentinels promote the replica", |group| {
            group.primary_port().is_ok_and(|port| port != old)
        })?;
        self.primary_port()
    }

    fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&SentinelGroup) -> bool,
    ) -> Result<(), ServerError> {
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        while !done(self) {
            if Instant::now() > deadline {
                return Err(ServerError::NotReady(what.to_string(), SENTINEL_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

fn start_sentinel(binary: &PathBuf, primary: u16) -> Result<SentinelProcess, ServerError> {
    let dir = tempfile::Builder::new()
        .prefix("sluice-sentinel-")
        .tempdir()
        .map_err(io("creating a temp dir for redis-sentinel"))?;
    let port = free_port()?;
    // The sentinel rewrites its config file, so it lives in the temporary directory.
    let config = dir.path().join("sentinel.conf");
    std::fs::write(
        &config,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            dir = dir.path().display()
        ),
    )
    .map_err(io("writing sentinel.conf"))?;
    let child = Command::new(binary)
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("starting redis-sentinel"))?;
    let sentinel = SentinelProcess {
        port,
        child: Some(child),
        _dir: dir,
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    while sentinel_cli(port, &["PING"]) != "PONG" {
        if Instant::now() > deadline {
            return Err(ServerError::NotReady(
                format!("redis-sentinel on port {port}"),
                READY_TIMEOUT,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(sentinel)
}

/// What `redis-cli` prints for `args` sent to the sentinel on `port` (empty on failure).
fn sentinel_cli(port: u16, args: &[&str]) -> String {
    let Ok(cli) = find_binary("redis-cli") else {
        return String::new();
    };
    Command::new(cli)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The value after line `name` in a flat `SENTINEL MASTER` reply as redis-cli prints it.
fn field<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let mut lines = reply.lines();
    while let Some(line) = lines.next() {
        if line.trim() == name {
            return lines.next().map(str::trim);
        }
    }
    None
}
