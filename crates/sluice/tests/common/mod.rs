//! Helpers for black-box tests that drive the real `sluice` binary over HTTP.
//!
//! Nothing here knows about sluice's internals: a test writes a YAML config,
//! starts `sluice serve --config FILE` on a free port, talks to it with a plain
//! HTTP client and reads what a user would see (status, JSON, metrics text).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// The binary under test: `SLUICE_TEST_BIN` when set (to run a suite against another
/// build, e.g. to watch a new test fail on the previous release), else this build's.
pub fn bin() -> String {
    std::env::var("SLUICE_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}
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

/// A fresh, unique scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "sluice-it-{tag}-{}-{nanos}-{n}",
        std::process::id()
    ));
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A port that was free a moment ago (bind :0, read it, drop the listener).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// An HTTP response reduced to what the tests look at.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Resp {
    /// The body as JSON; panics with the status and raw body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}); status {}, body: {:?}",
                self.status, self.body
            )
        })
    }
}

pub struct Server {
    pub port: u16,
    pub base: String,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub stderr_path: PathBuf,
    child: Child,
    agent: ureq::Agent,
}

impl Server {
    /// Starts `sluice serve` with `listen: 127.0.0.1:<free port>` followed by
    /// `rest` (admin/storage/limits/... YAML).
    pub fn start(rest: &str) -> Server {
        Server::start_with(rest, &ServeOpts::default())
    }

    /// Like [`Server::start`], with extra command-line arguments and environment.
    pub fn start_with(rest: &str, opts: &ServeOpts) -> Server {
        let port = free_port();
        let dir = scratch_dir("serve");
        let config_path = dir.join("sluice.yaml");
        let config = format!("listen: 127.0.0.1:{port}\n{rest}");
        fs::write(&config_path, &config).expect("write config");
        let stderr_path = dir.join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let stdout = File::create(dir.join("stdout.log")).expect("create stdout log");
        let mut command = Command::new(bin());
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
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
        };
        server.wait_ready(&config);
        server
    }

    /// Starts a server with the standard limits (see [`STANDARD`]).
    pub fn standard() -> Server {
        Server::start(STANDARD)
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

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().map(|s| s.is_none()).unwrap_or(false)
    }

    fn finish(&self, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>, what: &str) -> Resp {
        let mut r = r.unwrap_or_else(|e| {
            panic!(
                "{what}: transport error {e}\nserver stderr:\n{}",
                self.stderr()
            )
        });
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap_or_else(|e| panic!("{what}: reading body: {e}"));
        if status >= 500 {
            panic!(
                "{what}: server answered {status} (never allowed), body {body:?}\nserver stderr:\n{}",
                self.stderr()
            );
        }
        Resp {
            status,
            content_type,
            body,
        }
    }

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

    /// An HTTP call with an optional bearer token and JSON body (see [`call`]).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        call(&self.base, method, path, token, body)
    }

    pub fn metrics(&self) -> Vec<Sample> {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        parse_prometheus(&r.body)
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

/// Extra command-line arguments and environment for [`Server::start_with`].
#[derive(Default, Clone)]
pub struct ServeOpts {
    /// Arguments before `serve` (global flags such as `--log-format json`).
    pub args_before: Vec<String>,
    /// Arguments after `serve --config FILE`.
    pub args_after: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// One HTTP call to `base` + `path` on a fresh client: `method` GET or POST, an optional
/// `Authorization: Bearer <token>` and an optional JSON body (a POST without one sends
/// an empty body). Panics on a transport error or a 5xx.
pub fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let agent = agent();
    let url = format!("{base}{path}");
    let what = format!("{method} {url}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let r = match method {
        "GET" => {
            let mut req = agent.get(&url);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            req.call()
        }
        "POST" => {
            let mut req = agent.post(&url);
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            match body {
                Some(b) => req
                    .header("content-type", "application/json")
                    .send(b.to_string()),
                None => req.send_empty(),
            }
        }
        other => panic!("call: unsupported method {other}"),
    };
    let mut r = r.unwrap_or_else(|e| panic!("{what}: transport error {e}"));
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("{what}: reading body: {e}"));
    assert!(
        status < 500,
        "{what}: server answered {status} (never allowed), body {body:?}"
    );
    Resp {
        status,
        content_type,
        body,
    }
}

/// Waits up to 10 s until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends raw bytes over a fresh TCP connection and returns the status line's
/// code and the whole response text. Write errors are ignored (a server may
/// answer and close before it has read an oversized body).
pub fn raw_http(port: u16, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let _ = s.write_all(request);
    let _ = s.flush();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if response_complete(&buf) {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, text))
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(len) => buf.len() >= end + 4 + len,
        None => false,
    }
}

/// One Prometheus sample line.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Loose parser for Prometheus / OpenMetrics text: ignores comments, reads
/// `name{a="b",c="d"} value [timestamp]`. Label order does not matter.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = if let Some(open) = line.find('{') {
            let Some(close) = line.rfind('}') else {
                continue;
            };
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        } else {
            let mut it = line.splitn(2, char::is_whitespace);
            let name = it.next().unwrap_or("");
            (name, BTreeMap::new(), it.next().unwrap_or(""))
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name: name.trim().to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let key = s[start..i].trim().to_string();
        i += 1; // '='
        if i >= b.len() || b[i] != b'"' {
            break;
        }
        i += 1;
        let mut val = String::new();
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' && i + 1 < b.len() {
                i += 1;
                val.push(match b[i] {
                    b'n' => '\n',
                    c => c as char,
                });
            } else {
                // labels here are ASCII; keep multi-byte text intact anyway
                let ch = s[i..].chars().next().unwrap();
                val.push(ch);
                i += ch.len_utf8() - 1;
            }
            i += 1;
        }
        i += 1; // closing quote
        m.insert(key, val);
    }
    m
}

/// Sum of the samples named `name` whose labels include all of `labels`.
pub fn metric_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name) {
        if labels
            .iter()
            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// Runs `sluice <args>` to completion (10 s timeout) and returns status, stdout, stderr.
pub fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    run_cli_timeout(args, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("`sluice {}` did not exit within 10 s", args.join(" ")))
}

/// Like [`run_cli`] but returns None (after killing it) if it does not exit in time.
pub fn run_cli_timeout(args: &[&str], timeout: Duration) -> Option<(ExitStatus, String, String)> {
    run_cli_env_timeout(args, &[], timeout)
}

/// Like [`run_cli`] with extra environment variables (`(name, Some(value))` sets one,
/// `(name, None)` removes it from the inherited environment).
pub fn run_cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> (ExitStatus, String, String) {
    run_cli_env_timeout(args, env, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("`sluice {}` did not exit within 10 s", args.join(" ")))
}

fn run_cli_env_timeout(
    args: &[&str],
    env: &[(&str, Option<&str>)],
    timeout: Duration,
) -> Option<(ExitStatus, String, String)> {
    let dir = scratch_dir("cli");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut command = Command::new(bin());
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
    let _ = fs::remove_dir_all(&dir);
    status.map(|s| (s, out, err))
}

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

// ---- small accessors over a decision -------------------------------------

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

pub fn u(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} is not a non-negative integer in {v}"))
}

pub fn allowed(d: &Value) -> bool {
    d["allowed"]
        .as_bool()
        .unwrap_or_else(|| panic!("`allowed` is not a bool in {d}"))
}

// ---- raw HTTP with headers (forward-auth, nginx) --------------------------

/// An HTTP response with its headers, as a client on the wire sees it.
#[derive(Debug, Clone)]
pub struct HttpResp {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResp {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, joined with ", " as one field (RFC 9110 §5.3).
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if values.is_empty() {
            None
        } else {
            Some(values.join(", "))
        }
    }

    /// The status, headers and body, for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = format!("status {}\n", self.status);
        for (n, v) in &self.headers {
            s.push_str(&format!("  {n}: {v}\n"));
        }
        s.push_str(&format!("  body: {:?}", self.body));
        s
    }

    /// The body as JSON; panics with the whole response when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}); response:\n{}", self.describe()))
    }
}

/// Sends one HTTP/1.1 request over a fresh connection (`Connection: close`) with the
/// request target exactly as given (no URL normalisation on the client side), and
/// reads the whole response. A `Content-Length` is sent for a non-empty body and for
/// POST/PUT/PATCH.
pub fn http_request(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)?;
    s.flush()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if http_response_complete(&buf, method == "HEAD") {
                    break;
                }
            }
            Err(e) if buf.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    parse_http_response(&buf, method == "HEAD").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "unparseable HTTP response: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        )
    })
}

fn http_response_complete(buf: &[u8], head_only: bool) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    if head_only {
        return true;
    }
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(len) => buf.len() >= end + 4 + len,
        // chunked or close-delimited: read to EOF (the request said Connection: close)
        None => {
            head.contains("transfer-encoding: chunked") && buf[end + 4..].ends_with(b"0\r\n\r\n")
        }
    }
}

fn parse_http_response(buf: &[u8], head_only: bool) -> Option<HttpResp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    for line in lines {
        let (n, v) = line.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let raw = if head_only { &[][..] } else { &buf[end + 4..] };
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut rest = raw;
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&rest[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        out
    } else {
        let len = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok());
        match len {
            Some(len) => raw.get(..len)?.to_vec(),
            None => raw.to_vec(),
        }
    };
    Some(HttpResp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

impl Server {
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
}

/// Parses an IETF `RateLimit` / `RateLimit-Policy` field (`"name";r=1;t=2, "other";q=3`)
/// into (name, parameters) items in order. Panics on a malformed field.
pub fn parse_sf_list(field: &str) -> Vec<(String, BTreeMap<String, i64>)> {
    let mut out = Vec::new();
    for item in field.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut parts = item.split(';');
        let name = parts.next().unwrap().trim();
        let name = name
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or_else(|| panic!("item name {name:?} is not a quoted string in {field:?}"));
        let mut params = BTreeMap::new();
        for p in parts {
            let (k, v) = p
                .trim()
                .split_once('=')
                .unwrap_or_else(|| panic!("parameter {p:?} has no value in {field:?}"));
            let v: i64 = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("parameter {p:?} is not an integer in {field:?}"));
            params.insert(k.trim().to_string(), v);
        }
        out.push((name.to_string(), params));
    }
    out
}

// ---- a real redis-server (for the Redis store) ---------------------------

pub use sluice_testkit::servers::RedisServer;

/// Raw commands against a test [`RedisServer`], for looking at what the store wrote.
pub trait RedisCommands {
    /// One command; panics on a transport error.
    fn command(&self, args: &[&str]) -> RedisReply;

    /// `INFO commandstats` as (command, field) → value, e.g.
    /// `("evalsha", "calls") → 300`.
    fn command_stats(&self) -> BTreeMap<(String, String), u64>;
}

impl RedisCommands for RedisServer {
    fn command(&self, args: &[&str]) -> RedisReply {
        let port = self.port();
        redis_command(port, args).unwrap_or_else(|e| panic!("redis {args:?} on port {port}: {e}"))
    }

    fn command_stats(&self) -> BTreeMap<(String, String), u64> {
        let RedisReply::Bulk(Some(text)) = self.command(&["INFO", "commandstats"]) else {
            panic!("INFO commandstats did not answer a bulk string");
        };
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
        out
    }
}

/// A Redis reply (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisReply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<RedisReply>),
}

/// Sends one command to the Redis on loopback `port` over a fresh connection and
/// reads its reply.
pub fn redis_command(port: u16, args: &[&str]) -> std::io::Result<RedisReply> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req)?;
    let mut reader = std::io::BufReader::new(s);
    read_redis_reply(&mut reader)
}

fn read_redis_reply(r: &mut impl std::io::BufRead) -> std::io::Result<RedisReply> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| bad("empty reply".into()))?;
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| bad(format!("bad length {line:?}")))
    };
    Ok(match kind {
        "+" => RedisReply::Status(rest.to_string()),
        "-" => RedisReply::Error(rest.to_string()),
        ":" => RedisReply::Int(number()?),
        "$" => match number()? {
            n if n < 0 => RedisReply::Bulk(None),
            n => {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                RedisReply::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
            }
        },
        "*" => match number()? {
            n if n < 0 => RedisReply::Array(Vec::new()),
            n => RedisReply::Array(
                (0..n)
                    .map(|_| read_redis_reply(r))
                    .collect::<std::io::Result<_>>()?,
            ),
        },
        _ => return Err(bad(format!("unexpected reply {line:?}"))),
    })
}

// ---- a real PostgreSQL (for the PostgreSQL store) -------------------------

// Only the PostgreSQL tests use it; every test binary compiles this module.
#[allow(unused_imports)]
pub use sluice_testkit::servers::PostgresServer;
