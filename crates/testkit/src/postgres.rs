//! A real PostgreSQL cluster for tests: [`PostgresServer`].
//!
//! Each server is a fresh cluster (`initdb` into its own temporary directory, trust
//! authentication, `fsync=off`) started with `pg_ctl` on a free loopback port, its
//! Unix socket in the same directory so parallel tests never share anything. The
//! binaries come from Debian's `postgresql` package (`pg_config --bindir`, else the
//! newest `/usr/lib/postgresql/*/bin`). `initdb` refuses to run as root, so as root the
//! directory is handed to the `postgres` user and every server command runs through
//! `runuser -u postgres`. Dropping the server stops it and removes the directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::servers::{READY_TIMEOUT, ServerError, find_binary, free_port, io};

/// The system user that owns the cluster when the tests run as root.
const POSTGRES_USER: &str = "postgres";

/// A PostgreSQL cluster of its own, stopped and removed on drop.
pub struct PostgresServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    settings: Vec<String>,
    running: bool,
    as_postgres: bool,
}

impl PostgresServer {
    /// Initialises a cluster, starts it on a free loopback port and waits until it
    /// accepts connections.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(&[])
    }

    /// Like [`PostgresServer::start`], with extra server settings as `name=value`
    /// (e.g. `["shared_preload_libraries=pg_stat_statements"]`).
    pub fn start_with(settings: &[&str]) -> Result<Self, ServerError> {
        let bin = bindir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .map_err(io("creating a temp dir for PostgreSQL"))?;
        let mut server = PostgresServer {
            bin,
            dir,
            port: 0,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            running: false,
            as_postgres,
        };
        if as_postgres {
            run(Command::new("chown")
                .arg(format!("{POSTGRES_USER}:"))
                .arg(server.dir.path()))?;
        }
        let initdb = server.bin.join("initdb");
        let data = server.data_dir();
        run(server
            .command(&initdb)
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync"))?;
        // A port found free may be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| ServerError::NotReady("PostgreSQL".to_string(), READY_TIMEOUT)))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command run as the cluster's owner.
    fn command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", POSTGRES_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }

    fn launch(&mut self) -> Result<(), ServerError> {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c shared_buffers=32MB -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        for setting in &self.settings {
            options.push_str(" -c ");
            options.push_str(setting);
        }
        let pg_ctl = self.bin.join("pg_ctl");
        run(self
            .command(&pg_ctl)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(options)
            .args(["-w", "-t"])
            .arg(READY_TIMEOUT.as_secs().to_string())
            .arg("start"))
        .map_err(|error| match std::fs::read_to_string(self.log_path()) {
            Ok(log) => ServerError::Command {
                command: format!("pg_ctl start on port {}", self.port),
                output: format!("{error}\nserver log:\n{log}"),
            },
            Err(_) => error,
        })?;
        self.running = true;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its working directory (data directory, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`): clients'
    /// connections drop. The data directory stays, so [`PostgresServer::restart`] goes
    /// through crash recovery (unlogged tables come back empty).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = run(self.command(&pg_ctl).arg("-D").arg(self.data_dir()).args([
            "-m",
            "immediate",
            "-w",
            "stop",
        ]));
        self.running = false;
    }

    /// Starts it again on the same port with the same data, and waits until it
    /// accepts connections.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        self.launch()
    }

    /// Runs SQL with `psql` as the superuser and returns its unaligned, tuples-only
    /// output (fields separated by `|`, one row a line).
    pub fn psql(&self, sql: &str) -> Result<String, ServerError> {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running psql"))?;
        if !output.status.success() {
            return Err(ServerError::Command {
                command: format!("psql -c {sql:?}"),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether this process runs as root (`initdb` refuses to).
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Where the server binaries are: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`.
fn bindir() -> Result<PathBuf, ServerError> {
    let not_installed = || ServerError::NotInstalled("PostgreSQL (initdb, pg_ctl)", "postgresql");
    if let Ok(pg_config) = find_binary("pg_config")
        && let Ok(output) = Command::new(pg_config).arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| not_installed())?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(not_installed)
}

/// Runs a setup command to completion; its output becomes the error when it fails.
fn run(command: &mut Command) -> Result<(), ServerError> {
    let described = format!("{command:?}");
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(io(format!("starting {described}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(ServerError::Command {
        command: described,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// How long to wait for a restarted server's first answer in the tests below.
#[cfg(test)]
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(server: &PostgresServer) -> bool {
        let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if server.psql("SELECT 1").is_ok_and(|out| out == "1") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    #[test]
    fn postgres_starts_answers_keeps_data_over_a_restart_and_is_cleaned_up() {
        let mut server = PostgresServer::start().expect("PostgreSQL starts");
        let (port, dir) = (server.port(), server.dir().to_path_buf());
        assert!(answers(&server));
        server
            .psql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
            .expect("create");
        server.stop();
        assert!(server.psql("SELECT 1").is_err(), "stopped");
        server.restart().expect("restarts");
        assert_eq!(server.port(), port, "same port again");
        assert_eq!(server.psql("SELECT n FROM kept").expect("select"), "7");
        drop(server);
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "stopped on drop"
        );
        assert!(!dir.exists(), "temp dir removed");
    }

    #[test]
    fn several_servers_run_side_by_side() {
        let servers: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3).map(|_| scope.spawn(PostgresServer::start)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("starts"))
                .collect()
        });
        for (i, server) in servers.iter().enumerate() {
            server
                .psql(&format!(
                    "CREATE TABLE mine (n int); INSERT INTO mine VALUES ({i})"
                ))
                .expect("create");
        }
        for (i, server) in servers.iter().enumerate() {
            assert_eq!(
                server.psql("SELECT n FROM mine").expect("select"),
                i.to_string()
            );
        }
    }
}
