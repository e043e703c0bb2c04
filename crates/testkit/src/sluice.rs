//! Driving the real `sluice` binary: [`Server`] runs `sluice serve` on a free port with
//! a config a test writes, [`Binary`] runs the CLI's other commands, and a few helpers
//! read what a user would see (a decision's JSON, `/readyz`).
//!
//! Nothing here knows sluice's internals. The testkit cannot see the binary that Cargo
//! builds for a test crate (`CARGO_BIN_EXE_sluice` exists only there), so the test
//! crate hands its path in as a [`Binary`].

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::http::{HttpResp, Resp, agent, free_port, http_request};
use crate::metrics::Sample;

/// The `sluice` binary under test.
#[derive(Debug, Clone)]
pub struct Binary {
    path: PathBuf,
}

impl Binary {
    /// The environment variable that overrides the built binary, to run a suite against
    /// another build (e.g. to watch a new test fail on the previous release).
    pub const OVERRIDE: &str = "SLUICE_TEST_BIN";

    /// `$SLUICE_TEST_BIN` when set, else `built` (the test crate's
    /// `env!("CARGO_BIN_EXE_sluice")`).
    pub fn from_env_or(built: impl Into<PathBuf>) -> Binary {
        let path = std::env::var_os(Self::OVERRIDE)
            .map(PathBuf::from)
            .unwrap_or_else(|| built.into());
        Binary { path }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts `sluice serve` with `rest` as its config (see [`Server::start_with_bin`]).
    pub fn serve(&self, rest: &str) -> Server {
        Server::start_with_bin(self, rest, &ServeOpts::default())
    }

    /// Runs `sluice serve` with `rest` after a `listen:` line and expects it to stop
    /// with a failure within ten seconds (a setting it refuses at start); returns its
    /// stderr. Panics if it keeps running or succeeds.
    pub fn serve_refuses(&self, rest: &str) -> String {
        let dir = scratch_dir("serve-refuses");
        let path = dir.join("sluice.yaml");
        fs::write(&path, format!("listen: 127.0.0.1:{}\n{rest}", free_port())).expect("config");
        let (status, _out, err) = self
            .run_cli_timeout(
                &["serve", "--config", &path.display().to_string()],
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("sluice serve kept running with:\n{rest}"));
        assert!(
            !status.success(),
            "sluice serve must not start:\n{rest}\n{err}"
        );
        err
    }

    /// Runs `sluice <args>` to completion (10 s timeout) and returns status, stdout, stderr.
    pub fn run_cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        self.run_cli_timeout(args, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("`sluice {}` did not exit within 10 s", args.join(" ")))
    }

    /// Like [`Binary::run_cli`] but returns None (after killing it) if it does not exit in time.
    pub fn run_cli_timeout(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Option<(ExitStatus, String, String)> {
        self.run_cli_env_timeout(args, &[], timeout)
    }

    /// Like [`Binary::run_cli`] with extra environment variables (`(name, Some(value))` sets one,
    /// `(name, None)` removes it from the inherited environment).
    pub fn run_cli_env(
        &self,
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> (ExitStatus, String, String) {
        self.run_cli_env_timeout(args, env, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("`sluice {}` did not exit within 10 s", args.join(" ")))
    }

    /// Like [`Binary::run_cli_env`] with a timeout; None (after killing it) if it does not
    /// exit in time.
    pub fn run_cli_env_timeout(
        &self,
        args: &[&str],
        env: &[(&str, Option<&str>)],
        timeout: Duration,
    ) -> Option<(ExitStatus, String, String)> {
        let dir = scratch_dir("cli");
        let out_path = dir.join("stdout");
        let err_path = dir.join("stderr");
        let mut command = Command::new(&self.path);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap());
        for (name, value) in env {
            match value {
                Some(v) => command.env(name, v),
                None => command.env_remove(name),
            };
        }
        let mut child = command.spawn().expect("spawn sluice");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = fs::read_to_string(&out_path).unwrap_or_default();
        let err = fs::read_to_string(&err_path).unwrap_or_default();
        status.map(|s| (s, out, err))
    }
}

/// Sends the decision `checks` (a JSON list) `quota + 1` times to `s`: the first `quota`
/// must be allowed and the last denied, each decided by the store (not degraded).
pub fn admits_exactly(s: &Server, checks: &Value, quota: usize) {
    for i in 0..=quota {
        let d = s.check(serde_json::json!({ "checks": checks }));
        assert_eq!(
            d["degraded"],
            false,
            "decided by the store: {d}\n{}",
            s.stderr()
        );
        assert_eq!(d["allowed"], i < quota, "request {i} of {}: {d}", quota + 1);
    }
}

/// The admin token of [`STANDARD`].
pub const ADMIN_TOKEN: &str = "secret-token-for-tests";

/// `admin:` + `storage:` + `limits:` of the reference config, plus a few
/// single-purpose limits the tests use so that they do not depend on each other.
pub const STANDARD: &str = "\
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
limits:
  chat_user: {rate: [5/minute, 60/hour]}
  chat_ip: {rate: 30/minute, algorithm: sliding_window}
  daily: {rate: 50/day, algorithm: fixed_window}
  widget_ip: {rate: 3/minute, charge_denied: true}
  global: {rate: 2/hour, shadow: true}
  burst_demo: {rate: 10/second, burst: 20}
  five: {rate: 5/minute}
  plain3: {rate: 3/minute}
  tiny: {rate: 1/hour}
  conc: {rate: 100/hour, algorithm: fixed_window}
";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh, unique scratch directory under the system temp dir, removed when the
/// guard is dropped. A failing test keeps it (and says where) so its files can be read.
///
/// Hold the guard for as long as the directory is used: `scratch_dir("x").join("f")`
/// removes the directory at the end of that statement.
pub fn scratch_dir(tag: &str) -> ScratchDir {
    ScratchDir {
        path: new_scratch_path(tag),
    }
}

/// Creates a fresh, unique directory under the system temp dir; the caller removes it.
fn new_scratch_path(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!(
        "sluice-it-{tag}-{}-{nanos}-{n}",
        std::process::id()
    ));
    fs::create_dir_all(&path).expect("create scratch dir");
    path
}

/// A scratch directory from [`scratch_dir`]; derefs to its [`Path`].
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl std::ops::Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scratch files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A running `sluice serve`, killed when dropped (its scratch directory is removed
/// unless the test is failing, when it is kept and its stderr printed).
pub struct Server {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its scratch directory (config, stdout and stderr logs).
    pub dir: PathBuf,
    /// The config file it was started with.
    pub config_path: PathBuf,
    /// Where its stderr (the log) goes.
    pub stderr_path: PathBuf,
    child: Child,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `bin serve` with `listen: 127.0.0.1:<free port>` followed by `rest`
    /// (admin/storage/limits/... YAML), extra arguments and environment from `opts`,
    /// and waits until it answers.
    pub fn start_with_bin(bin: &Binary, rest: &str, opts: &ServeOpts) -> Server {
        let port = free_port();
        let dir = new_scratch_path("serve");
        let config_path = dir.join("sluice.yaml");
        let config = format!("listen: 127.0.0.1:{port}\n{rest}");
        fs::write(&config_path, &config).expect("write config");
        let stderr_path = dir.join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let stdout = File::create(dir.join("stdout.log")).expect("create stdout log");
        let mut command = Command::new(bin.path());
        command
            .args(&opts.args_before)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(&opts.args_after)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        for (name, value) in &opts.env {
            command.env(name, value);
        }
        let child = command.spawn().expect("spawn sluice serve");
        let mut server = Server {
            port,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            config_path,
            stderr_path,
            child,
            agent: agent(),
        };
        server.wait_ready(&config);
        server
    }

    fn wait_ready(&mut self, config: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let probe: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(500)))
            .build()
            .into();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "sluice serve exited early with {status}\nconfig:\n{config}\nstderr:\n{}",
                    self.stderr()
                );
            }
            // Any answer means the listener serves: in proxy mode /healthz belongs to
            // the app (sluice's own endpoints are not public), which may be down.
            if probe.get(format!("{}/healthz", self.base)).call().is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "sluice serve did not answer on /healthz within 10 s\nconfig:\n{config}\nstderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its stderr so far (the log).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }

    fn finish(&self, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Resp {
        let r = r.unwrap_or_else(|e| {
            panic!(
                "{what}: transport error {e}\nserver stderr:\n{}",
                self.stderr()
            )
        });
        let resp = Resp::read(r, what);
        if resp.status >= 500 {
            panic!(
                "{what}: server answered {} (never allowed), body {:?}\nserver stderr:\n{}",
                resp.status,
                resp.body,
                self.stderr()
            );
        }
        resp
    }

    /// GET `path` on the pooled client.
    pub fn get(&self, path: &str) -> Resp {
        let r = self.agent.get(self.url(path)).call();
        self.finish(r, &format!("GET {path}"))
    }

    /// POST raw bytes; `content_type: None` sends no Content-Type header.
    pub fn post_raw(&self, path: &str, body: &[u8], content_type: Option<&str>) -> Resp {
        let mut req = self.agent.post(self.url(path));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send(body);
        self.finish(r, &format!("POST {path}"))
    }

    /// Like [`Server::post_raw`] but on a new client (no pooled connection).
    pub fn post_raw_fresh(&self, path: &str, body: &[u8], content_type: Option<&str>) -> Resp {
        let agent = agent();
        let mut req = agent.post(self.url(path));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let r = req.send(body);
        self.finish(
            r,
            &format!("POST {path} ({} bytes, fresh connection)", body.len()),
        )
    }

    /// POST `body` as JSON.
    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.post_raw(path, body.to_string().as_bytes(), Some("application/json"))
    }

    /// POST /v1/check with a JSON body; asserts 200 and returns the decision.
    pub fn check(&self, body: Value) -> Value {
        let r = self.post_json("/v1/check", &body);
        assert_eq!(
            r.status, 200,
            "POST /v1/check {body} answered {} {}",
            r.status, r.body
        );
        r.json()
    }

    /// One check of cost 1 (unless `cost` is Some) against `limit`/`key`.
    pub fn hit(&self, limit: &str, key: &str, cost: Option<u64>) -> Value {
        let mut c = serde_json::json!({"limit": limit, "key": key});
        if let Some(cost) = cost {
            c["cost"] = cost.into();
        }
        self.check(serde_json::json!({ "checks": [c] }))
    }

    /// POST /v1/reset with `body` and an optional bearer token.
    pub fn reset(&self, token: Option<&str>, body: &Value) -> Resp {
        let mut req = self
            .agent
            .post(self.url("/v1/reset"))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send(body.to_string().as_bytes());
        self.finish(r, "POST /v1/reset")
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name `kill` understands: `HUP`, `TERM`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `timeout` for the server to exit; None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The config file's text for `rest` (with this server's `listen:` line first).
    pub fn config_text(&self, rest: &str) -> String {
        format!("listen: 127.0.0.1:{}\n{rest}", self.port)
    }

    /// Rewrites the config file in place (truncate and write, as `echo >` does).
    pub fn write_config_in_place(&self, rest: &str) {
        fs::write(&self.config_path, self.config_text(rest)).expect("rewrite config");
    }

    /// Replaces the config file atomically: writes a temp file in the same directory
    /// and renames it over the config (what editors and config-map mounts do).
    pub fn replace_config(&self, rest: &str) {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tmp = self.dir.join(format!(".sluice.yaml.tmp{n}"));
        fs::write(&tmp, self.config_text(rest)).expect("write temp config");
        fs::rename(&tmp, &self.config_path).expect("rename temp config over the config");
    }

    /// An HTTP call with an optional bearer token and JSON body (see [`crate::http::call`]).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        crate::http::call(&self.base, method, path, token, body)
    }

    /// One raw request (see [`http_request`]); panics with the server's stderr on a
    /// transport error.
    pub fn request(&self, method: &str, target: &str, headers: &[(&str, &str)]) -> HttpResp {
        http_request(self.port, method, target, headers, b"").unwrap_or_else(|e| {
            panic!(
                "{method} {target} {headers:?}: transport error {e}\nserver stderr:\n{}",
                self.stderr()
            )
        })
    }

    /// GET /metrics (asserting 200), parsed.
    pub fn metrics(&self) -> Vec<Sample> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        crate::metrics::parse_prometheus(&r.body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "sluice server files kept in {}; stderr:\n{}",
                self.dir.display(),
                self.stderr()
            );
        }
    }
}

/// `/readyz`'s status (503 is an answer here, not a failure).
pub fn readyz(s: &Server) -> u16 {
    match agent().get(s.url("/readyz")).call() {
        Ok(r) => r.status().as_u16(),
        Err(e) => panic!("GET /readyz: {e}"),
    }
}

/// Whether `/readyz` answers `status` within `within`.
pub fn readyz_becomes(s: &Server, status: u16, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        if readyz(s) == status {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// How long `/readyz` took to answer `status`; panics (with the server's log) if it
/// does not within `within`.
pub fn readyz_turns(s: &Server, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    assert!(
        readyz_becomes(s, status, within),
        "/readyz not {status} within {within:?}\nstderr:\n{}",
        s.stderr()
    );
    started.elapsed()
}

/// Hits `limit`/`key` until a decision is not degraded (the shared store decided it
/// again) and returns that decision; panics if every one within `within` was.
pub fn hit_until_not_degraded(s: &Server, limit: &str, key: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let d = s.hit(limit, key, None);
        if d["degraded"] == false {
            return d;
        }
        assert!(
            started.elapsed() < within,
            "still degraded {within:?} after the store came back: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Extra command-line arguments and environment for [`Server::start_with_bin`].
#[derive(Default, Clone)]
pub struct ServeOpts {
    /// Arguments before `serve` (global flags such as `--log-format json`).
    pub args_before: Vec<String>,
    /// Arguments after `serve --config FILE`.
    pub args_after: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---- small accessors over a decision

/// A decision's `results` array.
pub fn results(d: &Value) -> &Vec<Value> {
    d["results"]
        .as_array()
        .unwrap_or_else(|| panic!("decision has no results array: {d}"))
}

/// The result for `limit` (and `rate`, when a limit has several windows).
pub fn result<'a>(d: &'a Value, limit: &str, rate: Option<&str>) -> &'a Value {
    let hits: Vec<&Value> = results(d)
        .iter()
        .filter(|r| r["limit"] == limit && rate.is_none_or(|rt| r["rate"] == rt))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected exactly one result for limit {limit} rate {rate:?} in {d}"
    );
    hits[0]
}

/// `v[field]` as a non-negative integer.
pub fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} is not a non-negative integer in {v}"))
}

/// A decision's `allowed`.
pub fn allowed(d: &Value) -> bool {
    d["allowed"]
        .as_bool()
        .unwrap_or_else(|| panic!("`allowed` is not a bool in {d}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_dir_is_removed_when_dropped_and_kept_when_the_test_fails() {
        let dir = scratch_dir("guard");
        fs::write(dir.join("file"), "x").expect("write");
        let path = dir.to_path_buf();
        drop(dir);
        assert!(!path.exists(), "{} was left behind", path.display());

        let kept = std::thread::spawn(|| {
            let dir = scratch_dir("guard-failing");
            let path = dir.to_path_buf();
            std::panic::panic_any(path);
        })
        .join()
        .expect_err("the thread panicked");
        let kept = kept.downcast::<PathBuf>().expect("the path");
        assert!(kept.exists(), "a failing test's files are kept");
        fs::remove_dir_all(*kept).expect("remove");
    }
}
