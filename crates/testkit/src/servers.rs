//! Real servers for tests, started from the machine's packages (no docker).
//!
//! [`RedisServer`] runs Debian's `redis-server` on a free loopback port with its own
//! temporary directory and no persistence, waits until it answers `PING`, and kills
//! it and removes the directory when dropped. Tests of the store-failure policy can
//! [`RedisServer::stop`] it and [`RedisServer::restart`] it on the same port.
//! [`RedisCluster`] starts several of them with cluster mode on and joins them into one
//! Redis Cluster with `redis-cli --cluster create`. [`RedisServer::start_tls`] and
//! [`RedisCluster::start_tls`] speak only TLS, with [`TestCertificates`] that `openssl`
//! makes for the test; [`RedisServer::cli`] talks to them through `redis-cli --tls`.
//! [`PostgresServer`] (in `postgres.rs`) does the same for a PostgreSQL cluster.
//! Tests look at what a store wrote through [`RedisServer::query`] (the `redis` crate's
//! sync client) and [`PostgresServer::psql`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};
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

/// Ports [`free_port`] has handed out in this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port nobody listens on right now (bind port 0, read it, let it go) and
/// that this process has not handed out before: the kernel may give a just-released
/// port again, and two listeners of one test (sluice's `listen` and `envoy.listen`,
/// once in CI) must not be told the same one.
pub fn free_port() -> Result<u16, ServerError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..1_000 {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("binding a free port"))?;
        let port = listener
            .local_addr()
            .map(|a| a.port())
            .map_err(io("reading the free port"))?;
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(ServerError::Io {
        what: "finding a free port".into(),
        source: std::io::Error::other("1,000 tries gave only ports handed out already"),
    })
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

/// Certificates made by `openssl` for a test: a CA, a server certificate it signed
/// (for the names given), a client certificate it signed, and a second CA that signed
/// nothing here (the "wrong CA"). PEM files in a temporary directory, removed on drop.
pub struct TestCertificates {
    dir: tempfile::TempDir,
}

impl TestCertificates {
    /// Makes them; `server_names` is the server certificate's subjectAltName, e.g.
    /// `IP:127.0.0.1` or `DNS:redis.example`.
    pub fn generate(server_names: &str) -> Result<Self, ServerError> {
        let openssl =
            find_binary("openssl").map_err(|_| ServerError::NotInstalled("openssl", "openssl"))?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-certs-")
            .tempdir()
            .map_err(io("creating a temp dir for certificates"))?;
        let run = |args: &[&str]| -> Result<(), ServerError> {
            let output = Command::new(&openssl)
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .output()
                .map_err(io("running openssl"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(ServerError::Command {
                    command: format!("openssl {}", args.join(" ")),
                    output: String::from_utf8_lossy(&output.stderr).into_owned(),
                })
            }
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, cert, subject) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=sluice test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout", &key, "-out", &cert, "-days", "2", "-subj", &subject,
            ]);
            run(&args)?;
        }
        let server_ext = format!("subjectAltName={server_names}");
        for (name, subject, ext) in [
            ("server", "/CN=redis", server_ext.as_str()),
            ("client", "/CN=sluice", "extendedKeyUsage=clientAuth"),
        ] {
            let (key, csr, cert) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
            run(&args)?;
            let ext_file = dir.path().join(format!("{name}.ext"));
            std::fs::write(&ext_file, format!("{ext}\n"))
                .map_err(io("writing an openssl extension file"))?;
            let ext_file = ext_file.display().to_string();
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext_file,
            ])?;
        }
        Ok(TestCertificates { dir })
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`, `server.key`,
    /// `client.pem`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// How a [`RedisServer`] takes connections.
#[derive(Clone)]
enum Transport {
    Plain,
    /// TLS only (`--port 0`), with these files.
    Tls(Box<TlsFiles>),
}

/// The files a TLS [`RedisServer`] and its `redis-cli` use.
#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// The server demands a client certificate.
    clients: bool,
}

impl Transport {
    fn tls(certificates: &TestCertificates, clients: bool) -> Self {
        Transport::Tls(Box::new(TlsFiles {
            ca: certificates.path("ca.pem"),
            cert: certificates.path("server.pem"),
            key: certificates.path("server.key"),
            client_cert: certificates.path("client.pem"),
            client_key: certificates.path("client.key"),
            clients,
        }))
    }
}

/// A `redis-server` of its own, killed and cleaned up on drop.
pub struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
    transport: Transport,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(&[])
    }

    /// Like [`RedisServer::start`], with extra command-line arguments
    /// (e.g. `["--cluster-enabled", "yes"]`).
    pub fn start_with(extra: &[&str]) -> Result<Self, ServerError> {
        Self::start_on(extra, Transport::Plain)
    }

    /// A server that speaks only TLS (`--port 0 --tls-port P`), with the server
    /// certificate of `certificates`; with `client_certificates`, it also demands a
    /// client certificate signed by their CA (`--tls-auth-clients yes`).
    pub fn start_tls(
        certificates: &TestCertificates,
        client_certificates: bool,
    ) -> Result<Self, ServerError> {
        Self::start_on(&[], Transport::tls(certificates, client_certificates))
    }

    fn start_on(extra: &[&str], transport: Transport) -> Result<Self, ServerError> {
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
                transport: transport.clone(),
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(ServerError::NotInstalled("redis-server", "redis-server")))
    }

    fn launch(&mut self) -> Result<(), ServerError> {
        let mut ports: Vec<String> = vec!["--port".into()];
        match &self.transport {
            Transport::Plain => ports.push(self.port.to_string()),
            Transport::Tls(files) => {
                let TlsFiles {
                    ca,
                    cert,
                    key,
                    clients,
                    ..
                } = files.as_ref();
                ports.extend(["0".into(), "--tls-port".into(), self.port.to_string()]);
                for (flag, file) in [
                    ("--tls-cert-file", cert),
                    ("--tls-key-file", key),
                    ("--tls-ca-cert-file", ca),
                ] {
                    ports.extend([flag.to_string(), file.display().to_string()]);
                }
                ports.extend([
                    "--tls-auth-clients".into(),
                    if *clients { "yes" } else { "no" }.into(),
                ]);
            }
        }
        let child = Command::new(&self.binary)
            .args(&ports)
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
            if self.answers() {
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

    /// Whether it answers `PING` (over TLS with the client certificate, for a TLS server).
    pub fn answers(&self) -> bool {
        match self.transport {
            Transport::Plain => redis_answers(self.port),
            Transport::Tls(_) => self.cli(&["PING"]).is_ok_and(|answer| answer == "PONG"),
        }
    }

    /// Runs `redis-cli` against it (with `--tls`, the test CA and the client certificate
    /// for a TLS server) and returns what it printed, trimmed. For a TLS server, where
    /// [`RedisServer::query`] cannot go.
    pub fn cli(&self, args: &[&str]) -> Result<String, ServerError> {
        let cli = find_binary("redis-cli")?;
        let mut command = Command::new(cli);
        command.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Transport::Tls(files) = &self.transport {
            let TlsFiles {
                ca,
                client_cert,
                client_key,
                ..
            } = files.as_ref();
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(client_cert)
                .arg("--key")
                .arg(client_key);
        }
        let output = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io("running redis-cli"))?;
        if !output.status.success() {
            return Err(ServerError::Command {
                command: format!("redis-cli {}", args.join(" ")),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// The port it listens on (loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        match self.transport {
            Transport::Plain => format!("redis://127.0.0.1:{}/", self.port),
            Transport::Tls(_) => format!("rediss://127.0.0.1:{}/", self.port),
        }
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

    /// Creates ACL user `name` as README's line does: `ACL SETUSER name on >password
    /// resetkeys ~keys resetchannels &keys -@all commands` (`keys` e.g. `sluice:*`, also the
    /// channels it may use; `commands` ACL rules such as `+ping +evalsha`).
    pub fn create_acl_user(
        &self,
        name: &str,
        password: &str,
        keys: &str,
        commands: &str,
    ) -> Result<(), ServerError> {
        let (password, channels, keys) = (
            format!(">{password}"),
            format!("&{keys}"),
            format!("~{keys}"),
        );
        let mut args = vec![
            "ACL",
            "SETUSER",
            name,
            "on",
            &password,
            "resetkeys",
            &keys,
            "resetchannels",
            &channels,
            "-@all",
        ];
        args.extend(commands.split(' '));
        self.query::<String>(&args).map(|_| ())
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
        Self::start_on(masters, None)
    }

    /// Like [`RedisCluster::start`], every node speaking only TLS (clients and the
    /// cluster bus alike: `--tls-cluster yes`) with `certificates`' server certificate.
    pub fn start_tls(masters: usize, certificates: &TestCertificates) -> Result<Self, ServerError> {
        Self::start_on(masters, Some(certificates))
    }

    fn start_on(
        masters: usize,
        certificates: Option<&TestCertificates>,
    ) -> Result<Self, ServerError> {
        let mut nodes = Vec::with_capacity(masters);
        let mut extra = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
        if certificates.is_some() {
            extra.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        for _ in 0..masters {
            nodes.push(match certificates {
                None => RedisServer::start_with(&extra)?,
                Some(certificates) => {
                    RedisServer::start_on(&extra, Transport::tls(certificates, false))?
                }
            });
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut create = vec!["--cluster".to_string(), "create".to_string()];
        create.extend(addresses.iter().cloned());
        create.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        nodes[0].cli(&create).map_err(|error| ServerError::Io {
            what: format!(
                "redis-cli --cluster create {}: {error}",
                addresses.join(" ")
            ),
            source: std::io::Error::other("cluster creation failed"),
        })?;
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !cluster.is_ok() {
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

    fn is_ok(&self) -> bool {
        self.nodes.iter().all(|node| {
            node.cli(&["CLUSTER", "INFO"])
                .is_ok_and(|info| info.contains("cluster_state:ok"))
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

    /// Without the memory of handed-out ports, a few thousand calls see the kernel
    /// give back a released port dozens of times.
    #[test]
    fn a_free_port_is_never_handed_out_twice() {
        let mut seen = BTreeSet::new();
        for _ in 0..3_000 {
            let port = free_port().expect("a free port");
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }

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
