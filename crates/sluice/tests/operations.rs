//! Black-box tests for operations (issue #9): hot reload (SIGHUP, file change, rename
//! over the file, `POST /v1/admin/reload`), `/v1/status`, `/v1/stats`, the admin
//! endpoints and `admin.listen`, structured logs without secrets, graceful shutdown on
//! SIGTERM, and the `sluice admin` CLI. Everything goes through the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = ADMIN_TOKEN;

/// The admin endpoints as (method, path, body), each valid for a server with limit `five`.
fn admin_endpoints() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        (
            "POST",
            "/v1/reset",
            Some(json!({"limit": "five", "key": "k"})),
        ),
        (
            "POST",
            "/v1/admin/reset-limit",
            Some(json!({"limit": "five"})),
        ),
        ("GET", "/v1/admin/state?limit=five&key=k", None),
        ("POST", "/v1/admin/reload", None),
        ("GET", "/v1/status", None),
        ("GET", "/v1/admin/top?limit=five", None),
        ("GET", "/v1/admin/dashboard/data", None),
        ("GET", "/v1/admin/entries", None),
        (
            "POST",
            "/v1/admin/entries",
            Some(json!({"kind": "block", "subject": "k"})),
        ),
        (
            "POST",
            "/v1/admin/entries/remove",
            Some(json!({"kind": "block", "subject": "k"})),
        ),
    ]
}

/// `GET /v1/status` with the admin token on `base`; asserts 200.
fn status_at(base: &str) -> Value {
    let r = call(base, "GET", "/v1/status", Some(TOKEN), None);
    assert_eq!(r.status, 200, "GET /v1/status with the token: {}", r.body);
    r.json()
}

fn status(s: &Server) -> Value {
    status_at(&s.base)
}

fn version(st: &Value) -> u64 {
    st["config_version"]
        .as_u64()
        .unwrap_or_else(|| panic!("/v1/status has no integer config_version: {st}"))
}

/// Polls `/v1/status` until `done(status)` or `timeout`; returns the last status and
/// how long it took. Panics with the last status on timeout.
fn wait_status(
    s: &Server,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let st = status(s);
        if done(&st) {
            return (st, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!(
                "{what}: not seen within {timeout:?}; last /v1/status: {st}\nserver stderr:\n{}",
                s.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a successful reload to `min_version` or later.
fn wait_version(s: &Server, min_version: u64, what: &str) -> (Value, Duration) {
    wait_status(s, Duration::from_secs(5), what, |st| {
        version(st) >= min_version && st["last_reload"]["ok"] == true
    })
}

/// `POST /v1/admin/reload` with the token.
fn admin_reload(s: &Server) -> Resp {
    s.call("POST", "/v1/admin/reload", Some(TOKEN), None)
}

fn is_rfc3339(t: &Value) -> bool {
    let Some(t) = t.as_str() else { return false };
    let b = t.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && (t.ends_with('Z') || t.ends_with('z') || t[19..].contains('+') || t[19..].contains('-'))
}

/// The line of `needle` (1-based) in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
        + 1
}

/// First 16 hex digits of SHA-256(`key`), computed with `sha256sum`.
fn key_hash(key: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..16].to_string()
}

/// One keep-alive HTTP/1.1 connection on which several requests are sent in turn.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends the head and `body` (possibly only part of what Content-Length announces).
    fn write_request(&mut self, method: &str, path: &str, content_length: usize, body: &[u8]) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
        );
        self.stream.write_all(head.as_bytes()).expect("write head");
        self.stream.write_all(body).expect("write body");
        self.stream.flush().unwrap();
    }

    /// Reads one response with a Content-Length; returns (status, body, head).
    fn read_response(&mut self, what: &str) -> (u16, String, String) {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or_else(|| panic!("{what}: response without Content-Length:\n{head}"));
                if self.buf.len() >= end + 4 + len {
                    let body =
                        String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).into_owned();
                    self.buf.drain(..end + 4 + len);
                    let code = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    return (code, body, head);
                }
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "{what}: the server closed the connection (got so far: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!(
                    "{what}: read error {e} (got so far: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    fn post_json(&mut self, path: &str, body: &Value) -> (u16, String) {
        let bytes = body.to_string().into_bytes();
        self.write_request("POST", path, bytes.len(), &bytes);
        let (code, body, _) =
            self.read_response(&format!("POST {path} on a kept-alive connection"));
        (code, body)
    }
}

fn check_one(limit: &str, key: &str) -> Value {
    json!({"checks": [{"limit": limit, "key": key}]})
}

// ---- hot reload -------------------------------------------------------------

fn grow_config(rate: &str) -> String {
    format!(
        "\
admin: {{token: {TOKEN}}}
storage: {{backend: memory, max_keys: 100000}}
limits:
  grow: {{rate: {rate}, algorithm: sliding_window}}
  five: {{rate: 5/minute}}
"
    )
}

#[test]
fn sighup_reload_raises_a_quota_and_keeps_the_counter() {
    let s = Server::start(&grow_config("3/hour"));
    assert_eq!(version(&status(&s)), 1, "config_version starts at 1");
    for i in 0..3 {
        let d = s.hit("grow", "k", None);
        assert!(allowed(&d), "hit {} of 3/hour: {d}", i + 1);
    }
    let d = s.hit("grow", "k", None);
    assert!(!allowed(&d), "4th hit of 3/hour is denied: {d}");
    let d = s.hit("five", "k", None);
    assert_eq!(u(result(&d, "five", None), "remaining"), 4);

    s.write_config_in_place(&grow_config("10/hour"));
    s.signal("HUP");
    let (st, _) = wait_version(&s, 2, "reload after SIGHUP (file edited in place)");
    assert!(st["last_reload"]["error"].is_null(), "{st}");

    let d = s.hit("grow", "k", None);
    let g = result(&d, "grow", None);
    assert!(
        allowed(&d),
        "after raising grow to 10/hour the denied key is admitted: {d}"
    );
    assert_eq!(u(g, "limit_value"), 10, "new quota in effect: {g}");
    assert_eq!(
        u(g, "remaining"),
        6,
        "the counter was kept across the reload (3 earlier charges + this one of 10): {g}"
    );
    let d = s.hit("five", "k", None);
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        3,
        "an unchanged limit keeps its counter: {d}"
    );
}

#[test]
fn sighup_alone_reloads_and_bumps_the_version() {
    let mut s = Server::start(&grow_config("3/hour"));
    assert_eq!(version(&status(&s)), 1);
    s.signal("HUP");
    let (st, _) = wait_version(&s, 2, "reload after SIGHUP with an unchanged file");
    assert_eq!(version(&st), 2, "exactly one reload: {st}");
    assert!(
        is_rfc3339(&st["last_reload"]["at"]),
        "last_reload.at is RFC 3339: {st}"
    );
    assert!(s.is_running());
}

fn rename_config(plain3: &str, algo: &str, extra: &str) -> String {
    format!(
        "\
admin: {{token: {TOKEN}}}
storage: {{backend: memory, max_keys: 100000}}
limits:
  plain3: {{rate: {plain3}}}
  five: {{rate: 5/minute}}
  algo: {{rate: 2/hour, algorithm: {algo}}}
{extra}"
    )
}

#[test]
fn rename_over_the_file_is_reloaded_without_a_signal_every_time() {
    let s = Server::start(&rename_config("3/minute", "gcra", ""));
    for _ in 0..3 {
        s.hit("plain3", "k", None);
    }
    assert!(!allowed(&s.hit("plain3", "k", None)), "plain3 k exhausted");
    s.hit("five", "k", Some(2));
    s.hit("algo", "k", Some(2));
    assert!(!allowed(&s.hit("algo", "k", None)), "algo k exhausted");
    let r = s.post_json("/v1/check", &check_one("added", "k"));
    assert_eq!(r.status, 400, "no limit `added` yet: {}", r.body);
    let fa = s.request("GET", "/v1/forward-auth/chat", &[]);
    assert_eq!(fa.status, 200, "no route yet: {}", fa.describe());

    // plain3's period changes (3/minute -> 3/second): new counters; algo's algorithm
    // changes: new counters; five is unchanged: kept. A limit and a route are added.
    let extra = concat!(
        "  added: {rate: 2/minute}\n",
        "routes:\n",
        "  - match: {path: /chat}\n",
        "    limits:\n",
        "      - {limit: added, key: \"{client_ip}\"}\n",
    );
    s.replace_config(&rename_config("3/second", "fixed_window", extra));
    let (_, took) = wait_version(&s, 2, "reload after renaming a new file over the config");
    eprintln!("rename-over reload seen after {took:?}");
    assert!(
        took < Duration::from_millis(3000),
        "docs/design/operations.md: the config file is polled once a second; took {took:?}"
    );

    let d = s.hit("plain3", "k", None);
    assert!(allowed(&d), "plain3 with a new period starts fresh: {d}");
    assert_eq!(u(result(&d, "plain3", None), "remaining"), 2, "{d}");
    let d = s.hit("algo", "k", None);
    assert!(allowed(&d), "algo with a new algorithm starts fresh: {d}");
    let d = s.hit("five", "k", None);
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        2,
        "five unchanged keeps its counter: {d}"
    );
    assert!(allowed(&s.hit("added", "k", None)), "the added limit works");

    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(s.request("GET", "/v1/forward-auth/chat", &[]));
    }
    assert_eq!(statuses[0].status, 200, "{}", statuses[0].describe());
    assert!(
        statuses[2].status >= 400,
        "the added route limits /chat at 2/minute: third answer {}",
        statuses[2].describe()
    );

    // A second rename: the watcher must still be watching the (new) file.
    s.replace_config(&rename_config("4/second", "fixed_window", extra));
    wait_version(&s, 3, "second rename-over reload");
    let d = s.hit("plain3", "other", None);
    assert_eq!(u(result(&d, "plain3", None), "limit_value"), 4, "{d}");
    // And a plain in-place write is seen too.
    s.write_config_in_place(&rename_config("6/second", "fixed_window", extra));
    wait_version(&s, 4, "in-place write reload");
    let d = s.hit("plain3", "third", None);
    assert_eq!(u(result(&d, "plain3", None), "limit_value"), 6, "{d}");
}

#[test]
fn invalid_new_file_is_rejected_and_the_old_config_keeps_running() {
    let good = "\
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
limits:
  plain3: {rate: 3/minute}
  five: {rate: 5/minute}
";
    let s = Server::start(good);
    s.hit("five", "k", Some(2));
    let bad = good.replace("five: {rate: 5/minute}", "five: {rate: 5/minit}");
    let bad_line = line_of(&s.config_text(&bad), "5/minit");
    s.replace_config(&bad);
    s.signal("HUP");
    let (st, _) = wait_status(
        &s,
        Duration::from_secs(5),
        "a failed reload in /v1/status",
        |st| st["last_reload"]["ok"] == false,
    );
    assert_eq!(
        version(&st),
        1,
        "a failed reload does not bump config_version: {st}"
    );
    let error = st["last_reload"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("last_reload.error is a string after a failed reload: {st}"));
    assert!(
        error.contains(&format!("sluice.yaml:{bad_line}:")),
        "the error names the file and line {bad_line}: {error:?}"
    );
    assert!(
        error.contains("five"),
        "the error names the field: {error:?}"
    );
    assert!(is_rfc3339(&st["last_reload"]["at"]), "{st}");

    // the old config still decides, with its counters
    let d = s.hit("five", "k", None);
    assert!(allowed(&d));
    assert_eq!(
        u(result(&d, "five", None), "remaining"),
        2,
        "old five, old counter: {d}"
    );
    assert!(allowed(&s.hit("plain3", "k", None)));

    let log = s.stderr();
    assert!(
        log.contains(&format!("sluice.yaml:{bad_line}:")),
        "the rejected reload's error (file:line) is logged; stderr:\n{log}"
    );

    // POST /v1/admin/reload on the same bad file: 400 invalid_config
    let r = admin_reload(&s);
    assert_eq!(r.status, 400, "reload of an invalid file: {}", r.body);
    let j = r.json();
    assert_eq!(j["error"], "invalid_config", "{j}");
    let msg = j["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("sluice.yaml:{bad_line}:")) && msg.contains("five"),
        "message is file:line:col: field: message: {msg:?}"
    );
    assert_eq!(version(&status(&s)), 1);

    // fixing the file: the next reload works
    s.replace_config(&good.replace("5/minute", "7/minute"));
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["reloaded"], true, "{}", r.body);
    // the watcher may also have reloaded the fixed file
    let st = status(&s);
    assert!(version(&st) >= 2, "{st}");
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    assert!(
        st["last_reload"]["error"].is_null(),
        "error cleared after a good reload: {st}"
    );
    let d = s.hit("five", "fresh", None);
    assert_eq!(u(result(&d, "five", None), "limit_value"), 7, "{d}");
}

#[test]
fn admin_reload_endpoint_and_status_fields() {
    let s = Server::start(&grow_config("3/hour"));
    let st = status(&s);
    assert_eq!(version(&st), 1, "{st}");
    let path = st["config_path"].as_str().unwrap_or_default();
    assert!(
        path.ends_with("sluice.yaml") && std::path::Path::new(path).exists(),
        "config_path is the file served: {st}"
    );
    assert!(is_rfc3339(&st["loaded_at"]), "loaded_at is RFC 3339: {st}");
    assert!(
        st["restart_required"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "nothing needs a restart at start: {st}"
    );
    assert!(
        st.get("last_reload").is_some(),
        "last_reload is present (null or an object): {st}"
    );

    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"reloaded": true, "config_version": 2}));
    let r = admin_reload(&s);
    assert_eq!(r.json(), json!({"reloaded": true, "config_version": 3}));
    let st = status(&s);
    assert_eq!(version(&st), 3, "{st}");
    assert_eq!(st["last_reload"]["ok"], true, "{st}");
    assert!(st["last_reload"]["error"].is_null(), "{st}");
    assert!(is_rfc3339(&st["last_reload"]["at"]), "{st}");
    assert!(is_rfc3339(&st["loaded_at"]), "{st}");
}

#[test]
fn restart_only_settings_are_reported_and_the_rest_is_applied() {
    let rest = "\
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
http: {threads: 1}
limits:
  five: {rate: 5/minute}
";
    let s = Server::start(rest);
    let other = free_port();
    let changed = format!(
        "\
listen: 127.0.0.1:{other}
admin: {{token: secret-token-for-tests}}
storage: {{backend: memory, max_keys: 5000}}
http: {{threads: 2}}
limits:
  five: {{rate: 9/minute}}
"
    );
    std::fs::write(&s.config_path, changed).unwrap();
    let r = admin_reload(&s);
    assert_eq!(
        r.status, 200,
        "restart-only changes do not fail the reload: {}",
        r.body
    );
    let st = status(&s);
    let needs: Vec<String> = st["restart_required"]
        .as_array()
        .unwrap_or_else(|| panic!("restart_required is an array: {st}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    for field in ["listen", "storage", "http.threads"] {
        assert!(
            needs
                .iter()
                .any(|n| n == field || n.starts_with(&format!("{field}."))),
            "restart_required names {field}: {needs:?}"
        );
    }
    let d = s.hit("five", "k", None);
    assert_eq!(
        u(result(&d, "five", None), "limit_value"),
        9,
        "the limit change is applied: {d}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", other)).is_err(),
        "listen is not changed by a reload"
    );
    let log = s.stderr();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    for field in ["listen", "storage", "http.threads"] {
        assert!(
            warnings.iter().any(|l| l.contains(field)),
            "a WARN line names {field}; stderr:\n{log}"
        );
    }
}

#[test]
fn a_keep_alive_connection_survives_a_reload_and_sees_the_new_config() {
    let s = Server::start(&grow_config("3/hour"));
    let mut conn = Conn::open(s.port);
    let (code, body) = conn.post_json("/v1/check", &check_one("five", "k"));
    assert_eq!(code, 200, "{body}");
    let (code, body) = conn.post_json("/v1/check", &check_one("added", "k"));
    assert_eq!(code, 400, "no `added` limit yet: {body}");

    s.write_config_in_place(&format!(
        "{}  added: {{rate: 2/minute}}\n",
        grow_config("3/hour")
    ));
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);

    let (code, body) = conn.post_json("/v1/check", &check_one("added", "k"));
    assert_eq!(
        code, 200,
        "the connection opened before the reload still works and sees the new limit: {body}"
    );
    let (code, body) = conn.post_json("/v1/check", &check_one("five", "k"));
    assert_eq!(code, 200, "{body}");
    let d: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(u(result(&d, "five", None), "remaining"), 3, "{d}");

    // the same after a SIGHUP reload
    let min = version(&status(&s)) + 1;
    s.signal("HUP");
    wait_version(&s, min, "SIGHUP reload");
    let (code, body) = conn.post_json("/v1/check", &check_one("added", "k"));
    assert_eq!(code, 200, "after SIGHUP: {body}");
}

// ---- stats --------------------------------------------------------------------

const STATS_CONFIG: &str = "\
admin: {token: secret-token-for-tests}
storage: {backend: memory, max_keys: 100000}
limits:
  five: {rate: 5/minute}
  shadow2: {rate: 2/hour, shadow: true}
  plain3: {rate: 3/minute}
  tiny: {rate: 1/hour}
  idle: {rate: 1/hour}
";

fn limit_stats(stats: &Value, limit: &str) -> (u64, u64, u64) {
    let l = &stats["limits"][limit];
    let n = |f: &str| {
        l[f].as_u64()
            .unwrap_or_else(|| panic!("stats.limits.{limit}.{f} is an integer: {stats}"))
    };
    (n("allowed"), n("denied"), n("shadow_denied"))
}

#[test]
fn stats_count_decisions_per_check_without_a_token() {
    let s = Server::start(STATS_CONFIG);
    for _ in 0..7 {
        s.hit("five", "a", None);
    }
    for _ in 0..3 {
        s.hit("shadow2", "g", None);
    }
    let pair = json!({"checks": [{"limit": "plain3", "key": "p"}, {"limit": "tiny", "key": "t"}]});
    assert!(allowed(&s.check(pair.clone())));
    assert!(
        !allowed(&s.check(pair)),
        "tiny (1/hour) denies the second pair"
    );

    let r = s.get("/v1/stats");
    assert_eq!(r.status, 200, "GET /v1/stats needs no token: {}", r.body);
    let st = r.json();
    assert_eq!(
        limit_stats(&st, "five"),
        (5, 2, 0),
        "five: 5 allowed, 2 denied: {st}"
    );
    assert_eq!(limit_stats(&st, "shadow2"), (2, 0, 1), "shadow2: {st}");
    assert_eq!(
        limit_stats(&st, "plain3"),
        (2, 0, 0),
        "a check that allowed inside a denied decision counts as allowed: {st}"
    );
    assert_eq!(limit_stats(&st, "tiny"), (1, 1, 0), "tiny: {st}");
    if let Some(idle) = st["limits"].get("idle") {
        assert_eq!(limit_stats(&st, "idle"), (0, 0, 0), "{idle}");
    }
    assert_eq!(st["degraded"], 0, "{st}");
    assert_eq!(st["store"]["backend"], "memory", "{st}");
    assert_eq!(st["store"]["reachable"], true, "{st}");
    assert_eq!(st["store"]["evictions"], 0, "{st}");
    let keys = st["store"]["keys"]
        .as_u64()
        .unwrap_or_else(|| panic!("store.keys: {st}"));
    assert!(keys >= 4, "at least the 4 counters charged: {st}");
    assert_eq!(st["config_version"], 1, "{st}");
    let up = st["uptime_seconds"]
        .as_u64()
        .or_else(|| st["uptime_seconds"].as_f64().map(|f| f as u64))
        .unwrap_or_else(|| panic!("uptime_seconds is a number: {st}"));
    assert!(up < 600, "{st}");

    // the same numbers as /metrics
    let m = s.metrics();
    for (limit, outcome, want) in [
        ("five", "allowed", 5.0),
        ("five", "denied", 2.0),
        ("shadow2", "shadow_denied", 1.0),
        ("plain3", "allowed", 2.0),
        ("tiny", "denied", 1.0),
    ] {
        let got = metric_value(
            &m,
            "sluice_decisions_total",
            &[("limit", limit), ("outcome", outcome)],
        );
        assert_eq!(
            got,
            Some(want),
            "/metrics {limit} {outcome} agrees with /v1/stats"
        );
    }

    // counts are since start: a reload does not reset them
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    let st = s.get("/v1/stats").json();
    assert_eq!(limit_stats(&st, "five"), (5, 2, 0), "after a reload: {st}");
    assert_eq!(st["config_version"], 2, "{st}");
}

// ---- admin endpoints ----------------------------------------------------------

#[test]
fn admin_endpoints_need_the_token_and_are_refused_without_one_configured() {
    let s = Server::start(STATS_CONFIG);
    for (method, path, body) in admin_endpoints() {
        let what = format!("{method} {path}");
        let r = s.call(method, path, None, body.as_ref());
        assert_eq!(r.status, 401, "{what} without a token: {}", r.body);
        assert_eq!(r.json()["error"], "unauthorized", "{what}: {}", r.body);
        for wrong in [
            "wrong-token",
            "secret-token-for-testS",
            "secret-token-for-tests-longer",
            "secret-token",
            "x",
        ] {
            let r = s.call(method, path, Some(wrong), body.as_ref());
            assert_eq!(r.status, 401, "{what} with token {wrong:?}: {}", r.body);
        }
        let r = s.call(method, path, Some(TOKEN), body.as_ref());
        assert_eq!(r.status, 200, "{what} with the token: {}", r.body);
    }
    let r = s.get("/v1/stats");
    assert_eq!(r.status, 200, "/v1/stats needs no token: {}", r.body);

    let open = Server::start(&STATS_CONFIG.replace("admin: {token: secret-token-for-tests}\n", ""));
    for (method, path, body) in admin_endpoints() {
        for token in [None, Some(TOKEN)] {
            let r = open.call(method, path, token, body.as_ref());
            assert_eq!(
                r.status, 403,
                "{method} {path} (token {token:?}) with no admin.token configured: {}",
                r.body
            );
            assert_eq!(r.json()["error"], "admin_disabled", "{}", r.body);
        }
    }
    assert_eq!(open.get("/v1/stats").status, 200);
}

#[test]
fn admin_listen_serves_admin_calls_only_on_the_admin_address() {
    let aport = free_port();
    let s = Server::start(&STATS_CONFIG.replace(
        "admin: {token: secret-token-for-tests}",
        &format!("admin: {{token: secret-token-for-tests, listen: 127.0.0.1:{aport}}}"),
    ));
    wait_port(aport);
    let admin_base = format!("http://127.0.0.1:{aport}");
    for (method, path, body) in admin_endpoints() {
        let r = s.call(method, path, Some(TOKEN), body.as_ref());
        assert_eq!(
            r.status, 404,
            "{method} {path} on the main listener is 404 when admin.listen is set: {}",
            r.body
        );
        let r = call(&admin_base, method, path, Some(TOKEN), body.as_ref());
        assert_eq!(r.status, 200, "{method} {path} on admin.listen: {}", r.body);
        let r = call(&admin_base, method, path, None, body.as_ref());
        assert_eq!(
            r.status, 401,
            "{method} {path} on admin.listen without token: {}",
            r.body
        );
    }
    // the main listener still decides, and a reset on the admin address reaches it
    for _ in 0..3 {
        s.hit("plain3", "k", None);
    }
    assert!(!allowed(&s.hit("plain3", "k", None)));
    let r = call(
        &admin_base,
        "POST",
        "/v1/reset",
        Some(TOKEN),
        Some(&json!({"limit": "plain3", "key": "k"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let d = s.hit("plain3", "k", None);
    assert_eq!(u(result(&d, "plain3", None), "remaining"), 2, "{d}");
    assert_eq!(
        s.get("/v1/stats").status,
        200,
        "/v1/stats stays on the main listener"
    );
    assert_eq!(s.get("/metrics").status, 200);

    // the CLI against the admin address
    let (st, out, err) = run_cli_env(
        &["admin", "--url", &admin_base, "--token", TOKEN, "status"],
        &[("SLUICE_ADMIN_URL", None), ("SLUICE_ADMIN_TOKEN", None)],
    );
    assert!(st.success(), "sluice admin status on admin.listen: {err}");
    let j: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(j["config_version"], 2, "one reload above: {j}");
}

fn state(s: &Server, limit: &str, key: &str) -> Value {
    let r = s.call(
        "GET",
        &format!("/v1/admin/state?limit={limit}&key={key}"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "state {limit} {key}: {}", r.body);
    let j = r.json();
    assert_eq!(j["limit"], limit, "{j}");
    assert_eq!(j["key"], key, "{j}");
    j
}

#[test]
fn reset_limit_forgets_every_key_and_state_reads_without_charging() {
    let s = Server::start(&format!(
        "{STATS_CONFIG}  two: {{rate: [5/minute, 60/hour]}}\n"
    ));
    for _ in 0..3 {
        s.hit("plain3", "a", None);
    }
    for _ in 0..4 {
        s.hit("plain3", "b", None);
    }
    s.hit("five", "a", Some(2));
    s.hit("two", "a", None);

    let j = state(&s, "plain3", "a");
    let rs = j["results"]
        .as_array()
        .unwrap_or_else(|| panic!("results array: {j}"));
    assert_eq!(rs.len(), 1, "{j}");
    for field in [
        "limit",
        "key",
        "rate",
        "allowed",
        "limit_value",
        "remaining",
        "reset_after_ms",
        "retry_after_ms",
        "shadow",
    ] {
        assert!(
            rs[0].get(field).is_some(),
            "state result has {field} like a check result: {j}"
        );
    }
    assert_eq!(rs[0]["remaining"], 0, "{j}");
    assert_eq!(rs[0]["limit_value"], 3, "{j}");
    assert_eq!(
        state(&s, "two", "a")["results"].as_array().map(Vec::len),
        Some(2)
    );

    // reading does not charge
    assert_eq!(state(&s, "five", "a")["results"][0]["remaining"], 3);
    assert_eq!(state(&s, "five", "a")["results"][0]["remaining"], 3);
    let d = s.hit("five", "a", None);
    assert_eq!(u(result(&d, "five", None), "remaining"), 2, "{d}");
    // a key never seen is at full quota
    assert_eq!(state(&s, "plain3", "never")["results"][0]["remaining"], 3);

    let r = s.call(
        "POST",
        "/v1/admin/reset-limit",
        Some(TOKEN),
        Some(&json!({"limit": "plain3"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"reset": true, "limit": "plain3", "counters_removed": 2}),
        "two keys of plain3 (one window each) forgotten"
    );
    for key in ["a", "b"] {
        let j = state(&s, "plain3", key);
        assert_eq!(
            j["results"][0]["remaining"], 3,
            "full quota after reset-limit: {j}"
        );
        assert_eq!(j["results"][0]["reset_after_ms"], 0, "{j}");
    }
    assert!(allowed(&s.hit("plain3", "b", None)));
    assert_eq!(
        state(&s, "five", "a")["results"][0]["remaining"],
        2,
        "other limits keep their counters"
    );

    let r = s.call(
        "POST",
        "/v1/admin/reset-limit",
        Some(TOKEN),
        Some(&json!({"limit": "nope"})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "unknown_limit", "{}", r.body);
    let r = s.call("GET", "/v1/admin/state?limit=nope&key=a", Some(TOKEN), None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "unknown_limit", "{}", r.body);
    let r = s.call("GET", "/v1/admin/state?limit=five", Some(TOKEN), None);
    assert_eq!(r.status, 400, "state without key: {}", r.body);
}

// ---- logs -----------------------------------------------------------------------

const LOG_TOKEN: &str = "adm-TOKEN-s3cr3t-9f8e7d6c";
const LOG_TOKEN_2: &str = "adm-TOKEN-rotated-5a4b3c2d";
const WRONG_TOKEN: &str = "wrong-TOKEN-presented-77aa";
const HASH_SECRET: &str = "hash-SECRET-0123456789abcdef";
const RAW_IP: &str = "198.51.100.77";

fn secrets_config(token: &str, five: &str) -> String {
    format!(
        "\
admin: {{token: {token}}}
storage: {{backend: memory, max_keys: 100000}}
client_ip:
  trusted_proxies: [127.0.0.1]
  header: x-forwarded-for
  hash: true
  hash_secret: {HASH_SECRET}
limits:
  per_ip: {{rate: 2/minute}}
  five: {{rate: {five}}}
routes:
  - match: default
    limits:
      - {{limit: per_ip, key: \"{{client_ip}}\"}}
"
    )
}

fn secrets_never_logged(format: &str) {
    let level = if format == "text" { "trace" } else { "info" };
    let opts = ServeOpts {
        args_before: vec!["--log-format".into(), format.into()],
        env: vec![("SLUICE_LOG".into(), level.into())],
        ..Default::default()
    };
    let mut s = Server::start_with(&secrets_config(LOG_TOKEN, "5/minute"), &opts);
    let mut denied = 0;
    for _ in 0..4 {
        let r = s.request(
            "GET",
            "/v1/forward-auth",
            &[
                ("x-forwarded-for", RAW_IP),
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/anything"),
            ],
        );
        if r.status != 200 {
            denied += 1;
        }
    }
    assert_eq!(
        denied, 2,
        "per_ip 2/minute denies 2 of 4 forward-auth calls"
    );
    for _ in 0..6 {
        s.hit("five", "user:42", None);
    }
    let r = s.call("GET", "/v1/status", Some(WRONG_TOKEN), None);
    assert_eq!(r.status, 401);
    let r = s.call("POST", "/v1/admin/reload", Some(WRONG_TOKEN), None);
    assert_eq!(r.status, 401);
    let r = s.call("POST", "/v1/admin/reload", None, None);
    assert_eq!(r.status, 401);
    let r = s.call("GET", "/v1/status", Some(LOG_TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);

    // a successful reload that rotates the token, a failing one, a SIGHUP one
    s.write_config_in_place(&secrets_config(LOG_TOKEN_2, "6/minute"));
    let r = s.call("POST", "/v1/admin/reload", Some(LOG_TOKEN), None);
    assert_eq!(r.status, 200, "reload rotating the token: {}", r.body);
    s.write_config_in_place(&secrets_config(LOG_TOKEN_2, "6/minit"));
    let r = s.call("POST", "/v1/admin/reload", Some(LOG_TOKEN_2), None);
    assert_eq!(r.status, 400, "invalid reload: {}", r.body);
    s.write_config_in_place(&secrets_config(LOG_TOKEN_2, "7/minute"));
    s.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = call(&s.base, "GET", "/v1/status", Some(LOG_TOKEN_2), None).json();
        if st["last_reload"]["ok"] == true && st["config_version"].as_u64() >= Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP reload not seen: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        s.request(
            "GET",
            "/v1/forward-auth",
            &[("x-forwarded-for", RAW_IP), ("x-forwarded-uri", "/x")],
        );
    }
    s.signal("TERM");
    let exit = s.wait_exit(Duration::from_secs(5));
    assert!(
        exit.is_some_and(|e| e.success()),
        "exit after SIGTERM: {exit:?}"
    );

    let log = s.stderr();
    assert!(log.contains("denied"), "denials are logged; stderr:\n{log}");
    for (what, secret) in [
        ("the admin token", LOG_TOKEN),
        ("the rotated admin token", LOG_TOKEN_2),
        ("client_ip.hash_secret", HASH_SECRET),
        ("a raw client IP with client_ip.hash: true", RAW_IP),
        ("a wrong token presented to an admin call", WRONG_TOKEN),
    ] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            hits.is_empty(),
            "--log-format {format}: {what} ({secret}) appears in the log:\n{}",
            hits.join("\n")
        );
    }
    if format == "json" {
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
                "--log-format json: every stderr line is a JSON object; got {line:?}"
            );
        }
    }
}

#[test]
fn secrets_never_appear_in_json_logs() {
    secrets_never_logged("json");
}

#[test]
fn secrets_never_appear_in_text_logs_even_at_trace_level() {
    secrets_never_logged("text");
}

/// A field of a JSON log line, at the top level or under `fields` (tracing-subscriber).
fn log_field<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line.get("fields")
        .and_then(|f| f.get(name))
        .or_else(|| line.get(name))
}

#[test]
fn each_denial_is_logged_with_limit_and_key_hash_json() {
    let key = "user:raw-KEY-Zq9x";
    let opts = ServeOpts {
        env: vec![("SLUICE_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    };
    let s = Server::start_with(STATS_CONFIG, &opts);
    for _ in 0..5 {
        s.hit("plain3", key, None);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = s.stderr();
    assert!(
        !log.contains("raw-KEY-Zq9x"),
        "the raw key is never logged:\n{log}"
    );
    let want_hash = key_hash(key);
    let denials: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| log_field(v, "message").and_then(Value::as_str) == Some("denied"))
        .collect();
    // 2 of 5 hits on 3/minute are denied; within a second, only the first gets a line
    // (at most one denial line per limit per second: see tests/log_flood.rs).
    assert_eq!(
        denials.len(),
        1,
        "one denial line per limit per second (2 of 5 hits denied):\n{log}"
    );
    for d in &denials {
        assert_eq!(d["level"], "INFO", "denials are logged at INFO: {d}");
        assert_eq!(
            log_field(d, "limit").and_then(Value::as_str),
            Some("plain3"),
            "{d}"
        );
        assert_eq!(
            log_field(d, "key_hash").and_then(Value::as_str),
            Some(want_hash.as_str()),
            "key_hash = first 16 hex of SHA-256(key): {d}"
        );
        let retry = log_field(d, "retry_after_ms")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("retry_after_ms is an integer: {d}"));
        assert!(retry > 0 && retry <= 60_000, "{d}");
    }
}

#[test]
fn each_denial_is_logged_with_limit_and_key_hash_text() {
    let key = "user:raw-KEY-Tx7y";
    let opts = ServeOpts {
        args_after: vec!["--log-format".into(), "text".into()],
        ..Default::default()
    };
    let s = Server::start_with(STATS_CONFIG, &opts);
    for _ in 0..4 {
        s.hit("plain3", key, None);
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = s.stderr();
    assert!(
        !log.contains("raw-KEY-Tx7y"),
        "the raw key is never logged:\n{log}"
    );
    let want_hash = key_hash(key);
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("denied") && l.contains("key_hash"))
        .collect();
    assert_eq!(lines.len(), 1, "one denial line:\n{log}");
    let l = lines[0];
    assert!(l.contains("INFO"), "{l}");
    assert!(l.contains("plain3"), "{l}");
    assert!(l.contains(&want_hash), "key_hash {want_hash} in {l}");
    assert!(l.contains("retry_after_ms"), "{l}");
}

#[test]
fn log_format_json_before_or_after_the_subcommand_or_from_env() {
    let variants: [(&str, ServeOpts); 3] = [
        (
            "sluice --log-format json serve",
            ServeOpts {
                args_before: vec!["--log-format".into(), "json".into()],
                ..Default::default()
            },
        ),
        (
            "sluice serve --config F --log-format json",
            ServeOpts {
                args_after: vec!["--log-format".into(), "json".into()],
                ..Default::default()
            },
        ),
        (
            "SLUICE_LOG_FORMAT=json sluice serve",
            ServeOpts {
                env: vec![("SLUICE_LOG_FORMAT".into(), "json".into())],
                ..Default::default()
            },
        ),
    ];
    for (what, opts) in variants {
        let s = Server::start_with(STATS_CONFIG, &opts);
        std::thread::sleep(Duration::from_millis(100));
        let log = s.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "{what}: the start is logged");
        for l in lines {
            assert!(
                serde_json::from_str::<Value>(l).is_ok(),
                "{what}: every line is JSON, got {l:?}"
            );
        }
    }
}

// ---- graceful shutdown -------------------------------------------------------------

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let mut s = Server::start(STATS_CONFIG);
    // an idle keep-alive connection must not hold up the shutdown
    let mut idle = Conn::open(s.port);
    let (code, _) = idle.post_json("/v1/check", &check_one("five", "idle"));
    assert_eq!(code, 200);
    // an in-flight request: head and half the body sent
    let body = check_one("five", "inflight").to_string().into_bytes();
    let half = body.len() / 2;
    let mut inflight = Conn::open(s.port);
    inflight.write_request("POST", "/v1/check", body.len(), &body[..half]);
    std::thread::sleep(Duration::from_millis(200));

    let sent = Instant::now();
    s.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    inflight
        .stream
        .write_all(&body[half..])
        .expect("finish the in-flight body");
    let (code, text, _) = inflight.read_response("the request in flight at SIGTERM");
    assert_eq!(code, 200, "the in-flight request is answered: {text}");
    let d: Value = serde_json::from_str(&text).unwrap();
    assert!(allowed(&d), "{d}");

    let exit = s.wait_exit(Duration::from_secs(5));
    let exit =
        exit.unwrap_or_else(|| panic!("still running 5 s after SIGTERM; stderr:\n{}", s.stderr()));
    assert_eq!(
        exit.code(),
        Some(0),
        "exit code after SIGTERM; stderr:\n{}",
        s.stderr()
    );
    eprintln!("exited {:?} after SIGTERM", sent.elapsed());
    assert!(
        TcpStream::connect(("127.0.0.1", s.port)).is_err(),
        "no longer accepting after exit"
    );
}

#[test]
fn sigterm_with_the_disk_store_keeps_counters_for_the_next_start() {
    let data = scratch_dir("ops-disk");
    let rest = format!(
        "\
storage: {{backend: disk, path: {}}}
limits:
  plain3: {{rate: 3/minute}}
",
        data.display()
    );
    let mut s = Server::start(&rest);
    s.hit("plain3", "k", Some(2));
    s.signal("TERM");
    let exit = s.wait_exit(Duration::from_secs(5));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "stderr:\n{}",
        s.stderr()
    );
    drop(s);
    let s = Server::start(&rest);
    let d = s.hit("plain3", "k", None);
    assert_eq!(
        u(result(&d, "plain3", None), "remaining"),
        0,
        "the 2 charges before SIGTERM survive the restart: {d}"
    );
    drop(s);
}

// ---- the admin CLI -------------------------------------------------------------------

const NO_ENV: [(&str, Option<&str>); 2] =
    [("SLUICE_ADMIN_URL", None), ("SLUICE_ADMIN_TOKEN", None)];

fn admin_cli(s: &Server, token: &str, rest: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut args: Vec<&str> = vec!["admin", "--url", &s.base, "--token", token];
    args.extend_from_slice(rest);
    run_cli_env(&args, &NO_ENV)
}

fn cli_json(what: &str, r: &(std::process::ExitStatus, String, String)) -> Value {
    let (st, out, err) = r;
    assert_eq!(
        st.code(),
        Some(0),
        "{what}: exit 0 expected; stdout {out:?} stderr {err:?}"
    );
    assert!(
        out.contains("\n  "),
        "{what}: pretty JSON expected: {out:?}"
    );
    serde_json::from_str(out)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {out:?}"))
}

fn assert_cli_error(what: &str, r: &(std::process::ExitStatus, String, String), code: &str) {
    let (st, out, err) = r;
    assert_eq!(
        st.code(),
        Some(1),
        "{what}: exit 1 expected; stdout {out:?} stderr {err:?}"
    );
    assert!(
        err.starts_with(&format!("error: {code}: ")),
        "{what}: stderr is `error: {code}: <message>`: {err:?}"
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
}

#[test]
fn admin_cli_subcommands_against_a_running_server() {
    let s = Server::start(STATS_CONFIG);
    s.hit("plain3", "k", Some(2));

    let j = cli_json("state", &admin_cli(&s, TOKEN, &["state", "plain3", "k"]));
    assert_eq!(j["limit"], "plain3", "{j}");
    assert_eq!(j["key"], "k", "{j}");
    assert_eq!(j["results"][0]["remaining"], 1, "{j}");

    let j = cli_json("status", &admin_cli(&s, TOKEN, &["status"]));
    assert_eq!(j["config_version"], 1, "{j}");

    let j = cli_json("reset", &admin_cli(&s, TOKEN, &["reset", "plain3", "k"]));
    assert_eq!(j["reset"], true, "{j}");
    let j = cli_json(
        "state after reset",
        &admin_cli(&s, TOKEN, &["state", "plain3", "k"]),
    );
    assert_eq!(j["results"][0]["remaining"], 3, "{j}");

    s.hit("plain3", "a", None);
    s.hit("plain3", "b", None);
    let j = cli_json(
        "reset-limit",
        &admin_cli(&s, TOKEN, &["reset-limit", "plain3"]),
    );
    assert_eq!(
        j,
        json!({"reset": true, "limit": "plain3", "counters_removed": 2})
    );

    let j = cli_json("reload", &admin_cli(&s, TOKEN, &["reload"]));
    assert_eq!(j, json!({"reloaded": true, "config_version": 2}));

    // keys with characters that need encoding in the query string
    s.hit("plain3", "user:a b&c=d/é", None);
    let j = cli_json(
        "state with an odd key",
        &admin_cli(&s, TOKEN, &["state", "plain3", "user:a b&c=d/é"]),
    );
    assert_eq!(j["key"], "user:a b&c=d/é", "{j}");
    assert_eq!(j["results"][0]["remaining"], 2, "{j}");

    // URL and token from the environment
    let r = run_cli_env(
        &["admin", "status"],
        &[
            ("SLUICE_ADMIN_URL", Some(s.base.as_str())),
            ("SLUICE_ADMIN_TOKEN", Some(TOKEN)),
        ],
    );
    assert_eq!(cli_json("status from env", &r)["config_version"], 2);

    // errors from the server
    assert_cli_error(
        "unknown limit",
        &admin_cli(&s, TOKEN, &["state", "nope", "k"]),
        "unknown_limit",
    );
    std::fs::write(
        &s.config_path,
        s.config_text("limits:\n  five: {rate: 5/minit}\n"),
    )
    .unwrap();
    let r = admin_cli(&s, TOKEN, &["reload"]);
    assert_cli_error("reload of a bad file", &r, "invalid_config");
    assert!(
        r.2.contains("sluice.yaml:3:"),
        "the file:line reaches the user: {:?}",
        r.2
    );
}

#[test]
fn admin_cli_wrong_or_missing_token_and_unreachable_server() {
    let s = Server::start(STATS_CONFIG);
    let wrong = "wrong-cli-TOKEN-31337";
    for (what, r) in [
        ("--token wrong", admin_cli(&s, wrong, &["status"])),
        (
            "SLUICE_ADMIN_TOKEN=wrong",
            run_cli_env(
                &["admin", "--url", &s.base, "reload"],
                &[
                    ("SLUICE_ADMIN_URL", None),
                    ("SLUICE_ADMIN_TOKEN", Some(wrong)),
                ],
            ),
        ),
    ] {
        assert_cli_error(what, &r, "unauthorized");
        assert!(
            !r.1.contains(wrong) && !r.2.contains(wrong),
            "{what}: the token is never printed: {r:?}"
        );
        assert!(
            !r.1.contains(TOKEN) && !r.2.contains(TOKEN),
            "{what}: {r:?}"
        );
    }
    let r = run_cli_env(&["admin", "--url", &s.base, "status"], &NO_ENV);
    assert_cli_error("no token", &r, "unauthorized");
    assert_eq!(version(&status(&s)), 1, "the failed reload did nothing");

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (st, out, err) = run_cli_env(
        &["admin", "--url", &url, "--token", TOKEN, "status"],
        &NO_ENV,
    );
    assert_eq!(
        st.code(),
        Some(1),
        "unreachable server: stdout {out:?} stderr {err:?}"
    );
    assert!(err.starts_with("error: "), "{err:?}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")),
        "names the URL tried: {err:?}"
    );
    assert!(!err.contains("panicked") && !err.contains(TOKEN), "{err:?}");
    assert!(out.is_empty(), "{out:?}");
}

// ---- more reload edges -------------------------------------------------------------

#[test]
fn kubernetes_configmap_data_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let s = Server::start(&grow_config("3/hour"));
    // Lay the file out as a ConfigMap mount does: sluice.yaml -> ..data/sluice.yaml,
    // ..data -> ..2026_01_01_v1 (a directory holding the real file).
    let v1 = s.dir.join("..2026_01_01_v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("sluice.yaml"),
        s.config_text(&grow_config("3/hour")),
    )
    .unwrap();
    symlink("..2026_01_01_v1", s.dir.join("..data")).unwrap();
    symlink("..data/sluice.yaml", s.dir.join("sluice.yaml.link")).unwrap();
    std::fs::rename(s.dir.join("sluice.yaml.link"), &s.config_path).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let before = version(&status(&s));

    // The kubelet's update: a new directory, a new ..data_tmp link, renamed over ..data.
    let v2 = s.dir.join("..2026_01_01_v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("sluice.yaml"),
        s.config_text(&grow_config("11/hour")),
    )
    .unwrap();
    symlink("..2026_01_01_v2", s.dir.join("..data_tmp")).unwrap();
    std::fs::rename(s.dir.join("..data_tmp"), s.dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_version(&s, before + 1, "reload after a ConfigMap-style ..data swap");
    let d = s.hit("grow", "k", None);
    assert_eq!(u(result(&d, "grow", None), "limit_value"), 11, "{d}");
}

#[test]
fn a_reload_rotates_the_admin_token() {
    let s = Server::start(&grow_config("3/hour"));
    s.write_config_in_place(&grow_config("3/hour").replace(TOKEN, "rotated-token-0002"));
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.call("GET", "/v1/status", Some(TOKEN), None);
    assert_eq!(r.status, 401, "the old token no longer works: {}", r.body);
    let r = s.call("GET", "/v1/status", Some("rotated-token-0002"), None);
    assert_eq!(r.status, 200, "the new token works: {}", r.body);
    assert!(
        r.json()["restart_required"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "admin.token needs no restart: {}",
        r.body
    );
}

#[test]
fn admin_listen_added_by_a_reload_needs_a_restart_and_reverting_clears_it() {
    let s = Server::start(STATS_CONFIG);
    let aport = free_port();
    let with_listen = STATS_CONFIG.replace(
        "admin: {token: secret-token-for-tests}",
        &format!("admin: {{token: secret-token-for-tests, listen: 127.0.0.1:{aport}}}"),
    );
    s.write_config_in_place(&with_listen);
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    let st = status(&s);
    assert!(
        st["restart_required"]
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f == "admin.listen" || f == "admin")),
        "restart_required names admin.listen: {st}"
    );
    // still served where they were; nothing new listens
    let r = s.call("GET", "/v1/admin/state?limit=five&key=k", Some(TOKEN), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(TcpStream::connect(("127.0.0.1", aport)).is_err());

    s.write_config_in_place(STATS_CONFIG);
    let r = admin_reload(&s);
    assert_eq!(r.status, 200, "{}", r.body);
    let st = status(&s);
    assert!(
        st["restart_required"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        "back to the running settings: nothing needs a restart: {st}"
    );
}

#[test]
fn state_reads_charge_nothing_and_are_not_counted() {
    let s = Server::start(&format!(
        "{STATS_CONFIG}  wid: {{rate: 2/minute, charge_denied: true}}\n"
    ));
    for _ in 0..3 {
        s.hit("wid", "w", None);
    }
    let first = state(&s, "wid", "w");
    for _ in 0..5 {
        state(&s, "wid", "w");
    }
    let last = state(&s, "wid", "w");
    let reset = |j: &Value| u(&j["results"][0], "reset_after_ms");
    assert!(
        reset(&last) <= reset(&first),
        "reading a charge_denied limit does not charge it: {first} then {last}"
    );
    let st = s.get("/v1/stats").json();
    assert_eq!(
        limit_stats(&st, "wid"),
        (2, 1, 0),
        "state reads are not decisions: {st}"
    );
    let m = s.metrics();
    assert_eq!(
        metric_value(
            &m,
            "sluice_decisions_total",
            &[("limit", "wid"), ("outcome", "allowed")]
        ),
        Some(2.0)
    );
}

#[test]
fn reset_limit_on_the_disk_store_survives_a_restart() {
    let data = scratch_dir("ops-disk-reset");
    let rest = format!(
        "\
admin: {{token: secret-token-for-tests}}
storage: {{backend: disk, path: {}}}
limits:
  plain3: {{rate: 3/minute}}
  five: {{rate: 5/minute}}
",
        data.display()
    );
    let mut s = Server::start(&rest);
    s.hit("plain3", "a", Some(3));
    s.hit("plain3", "b", Some(2));
    s.hit("five", "a", Some(2));
    let r = s.call(
        "POST",
        "/v1/admin/reset-limit",
        Some(TOKEN),
        Some(&json!({"limit": "plain3"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["counters_removed"], 2, "{}", r.body);
    s.signal("TERM");
    let exit = s.wait_exit(Duration::from_secs(5));
    assert_eq!(
        exit.and_then(|e| e.code()),
        Some(0),
        "stderr:\n{}",
        s.stderr()
    );
    drop(s);
    let s = Server::start(&rest);
    for key in ["a", "b"] {
        let j = state(&s, "plain3", key);
        assert_eq!(
            j["results"][0]["remaining"], 3,
            "plain3 {key} stays forgotten after a restart: {j}"
        );
    }
    assert_eq!(
        state(&s, "five", "a")["results"][0]["remaining"],
        3,
        "five a keeps its 2 charges across the restart"
    );
    drop(s);
}

#[test]
fn reloads_under_load_never_drop_requests_or_over_admit() {
    let cfg = |other: &str| {
        format!(
            "\
admin: {{token: secret-token-for-tests}}
storage: {{backend: memory, max_keys: 100000}}
limits:
  big: {{rate: 50/hour}}
  other: {{rate: {other}}}
"
        )
    };
    let mut s = Server::start(&cfg("5/minute"));
    let url = s.url("/v1/check");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The load lasts until at least three reloads have happened during it (a loaded CI
    // machine can take a few hundred milliseconds over one), and at least 40 requests
    // per worker: more than `big` admits either way.
    let reloads_done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            let reloads_done = std::sync::Arc::clone(&reloads_done);
            std::thread::spawn(move || {
                let agent = agent(); // one pooled keep-alive connection per worker
                let (mut sent, mut allowed_n) = (0u64, 0u64);
                while sent < 40
                    || (reloads_done.load(std::sync::atomic::Ordering::SeqCst) < 3 && sent < 2_000)
                {
                    let mut r = agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(check_one("big", "k").to_string())
                        .unwrap_or_else(|e| panic!("request {sent}: transport error {e}"));
                    assert_eq!(r.status().as_u16(), 200, "request {sent}");
                    let d: Value =
                        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                    if allowed(&d) {
                        allowed_n += 1;
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                (sent, allowed_n)
            })
        })
        .collect();
    let reloader = {
        let stop = std::sync::Arc::clone(&stop);
        let reloads_done = std::sync::Arc::clone(&reloads_done);
        let base = s.base.clone();
        let path = s.config_path.clone();
        let port = s.port;
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                let text = format!(
                    "listen: 127.0.0.1:{port}\n{}",
                    cfg(&format!("{}/minute", 5 + n))
                );
                std::fs::write(&path, text).unwrap();
                let r = call(&base, "POST", "/v1/admin/reload", Some(TOKEN), None);
                assert_eq!(r.status, 200, "reload {n}: {}", r.body);
                reloads_done.store(n, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(30));
            }
            n
        })
    };
    let (sent, total) = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .fold((0, 0), |(s, a), (sent, allowed)| (s + sent, a + allowed));
    let during_load = reloads_done.load(std::sync::atomic::Ordering::SeqCst);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reloads = reloader.join().unwrap();
    assert!(
        during_load >= 3,
        "only {during_load} reloads happened during {sent} requests"
    );
    assert_eq!(
        total, 50,
        "big (50/hour) admits exactly 50 of {sent} across {reloads} reloads"
    );
    assert!(s.is_running());
}

/// The state read says what a next request would be told: an exhausted key is
/// reported as denied with the real wait, while `results` show the state as it is.
#[test]
fn state_reports_whether_the_next_request_would_be_admitted() {
    let s = Server::start(STATS_CONFIG);
    for _ in 0..3 {
        s.hit("plain3", "spent", None);
    }
    let j = state(&s, "plain3", "spent");
    assert_eq!(j["results"][0]["remaining"], 0, "{j}");
    assert_eq!(j["next_request"]["allowed"], false, "{j}");
    let wait = j["next_request"]["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("a wait: {j}"));
    assert!(wait > 0 && wait <= 20_000, "{j}");
    let fresh = state(&s, "plain3", "fresh");
    assert_eq!(fresh["next_request"]["allowed"], true, "{fresh}");
    assert_eq!(fresh["next_request"]["retry_after_ms"], 0, "{fresh}");
    assert_eq!(
        state(&s, "plain3", "spent")["results"][0]["remaining"],
        0,
        "reading charged nothing"
    );
}
