//! End to end with a real nginx (docs/design/front-doors.md, "Forward-auth"): nginx
//! `auth_request` asks sluice's `/v1/forward-auth` about every request before proxying
//! it to an upstream, and copies sluice's rate-limit headers to the client.
//!
//! ```text
//! client ──> nginx :front ──auth_request──> sluice /v1/forward-auth
//!                  └──proxy_pass──> nginx :upstream ("upstream ok", logs every hit)
//! ```
//!
//! sluice denies with 403 (`forward_auth.deny_status`, what `auth_request` understands);
//! nginx maps that to a 429 for the client with `error_page 403 =429 @limited`.
//!
//! Needs the `nginx` binary (Debian's `nginx-light`); `scripts/test` installs it. When
//! it is missing the test fails and says so — it does not skip.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Status nginx gives the client when sluice denies (the 403 is mapped to it).
const CLIENT_DENY_STATUS: u16 = 429;

fn nginx_binary() -> PathBuf {
    let candidates = [
        "nginx",
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ];
    for c in candidates {
        let ok = Command::new(c)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return PathBuf::from(c);
        }
    }
    panic!(
        "nginx is not installed (looked for {candidates:?}); this end-to-end test needs it. \
         Run `scripts/test`, which installs Debian's nginx-light, or `apt-get install nginx-light`."
    );
}

/// A foreground, single-process nginx; killed (and its files kept on failure) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    fn start(dir: &Path, conf: &str, probe_port: u16) -> Nginx {
        let bin = nginx_binary();
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let stderr = File::create(dir.join("nginx.stderr")).unwrap();
        let child = Command::new(&bin)
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut n = Nginx {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = n.child.try_wait().unwrap() {
                panic!(
                    "nginx exited at startup with {st}\nconfig:\n{conf}\nstderr:\n{}\nerror.log:\n{}",
                    n.read("nginx.stderr"),
                    n.read("error.log")
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", probe_port)).is_ok() {
                return n;
            }
            if Instant::now() > deadline {
                panic!(
                    "nginx did not listen on {probe_port} within 10 s\nerror.log:\n{}",
                    n.read("error.log")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// Requests the upstream has served so far (lines of its access log).
    fn upstream_hits(&self) -> Vec<String> {
        self.read("upstream.log")
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "nginx files kept in {}; error.log:\n{}",
                self.dir.display(),
                self.read("error.log")
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn nginx_conf(dir: &Path, front: u16, upstream: u16, sluice: u16) -> String {
    let d = dir.display();
    format!(
        r#"user root;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {d}/front.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    log_format upstream '$request_method $request_uri user=$http_x_user_id';

    # the application behind nginx
    server {{
        listen 127.0.0.1:{upstream};
        access_log {d}/upstream.log upstream;
        location / {{
            default_type text/plain;
            return 200 "upstream ok";
        }}
    }}

    # the public entry point, guarded by sluice
    server {{
        listen 127.0.0.1:{front};

        location = /_sluice {{
            internal;
            proxy_pass http://127.0.0.1:{sluice}/v1/forward-auth;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}

        location / {{
            auth_request /_sluice;
            auth_request_set $sluice_retry_after $upstream_http_retry_after;
            auth_request_set $sluice_ratelimit $upstream_http_ratelimit;
            auth_request_set $sluice_policy $upstream_http_ratelimit_policy;
            auth_request_set $sluice_remaining $upstream_http_x_ratelimit_remaining;
            add_header Retry-After $sluice_retry_after always;
            add_header RateLimit $sluice_ratelimit always;
            add_header RateLimit-Policy $sluice_policy always;
            add_header X-RateLimit-Remaining $sluice_remaining always;
            error_page 403 =429 @limited;
            proxy_pass http://127.0.0.1:{upstream};
        }}

        location @limited {{
            default_type application/json;
            add_header Retry-After $sluice_retry_after always;
            add_header RateLimit $sluice_ratelimit always;
            add_header RateLimit-Policy $sluice_policy always;
            add_header X-RateLimit-Remaining $sluice_remaining always;
            return 429 '{{"error": "rate_limited"}}';
        }}
    }}
}}
"#
    )
}

/// `r=` of item `name` in a `RateLimit` field.
fn remaining_in(field: &str, name: &str) -> Option<i64> {
    parse_sf_list(field)
        .into_iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, p)| p.get("r").copied())
}

/// Polls the upstream log until it has `n` lines (a log line is written as the
/// upstream finishes, a hair after the client may have its answer).
fn wait_hits(ng: &Nginx, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let hits = ng.upstream_hits();
        if hits.len() >= n || Instant::now() > deadline {
            return hits;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nginx_auth_request_enforces_sluice_limits_end_to_end() {
    // fail (not skip) right away when nginx is missing
    nginx_binary();

    let sluice = Server::start(
        "\
client_ip: {trusted_proxies: [127.0.0.1]}
forward_auth: {deny_status: 403}
limits:
  chat_user: {rate: 3/minute}
routes:
  - match: {path: /chat/message, methods: [POST]}
    limits:
      - {limit: chat_user, key: \"user:{header.x-user-id}\"}
",
    );
    let front = free_port();
    let mut upstream = free_port();
    while upstream == front {
        upstream = free_port();
    }
    let dir = scratch_dir("nginx");
    let conf = nginx_conf(&dir, front, upstream, sluice.port);
    let ng = Nginx::start(&dir, &conf, front);
    // wait for the upstream listener too
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", upstream)).is_err() {
        assert!(
            Instant::now() < deadline,
            "upstream server block never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let post = |user: &str| {
        http_request(
            front,
            "POST",
            "/chat/message",
            &[("X-User-Id", user), ("Content-Type", "text/plain")],
            b"hello",
        )
        .unwrap_or_else(|e| {
            panic!(
                "POST /chat/message via nginx: {e}\nnginx error.log:\n{}\nsluice stderr:\n{}",
                ng.read("error.log"),
                sluice.stderr()
            )
        })
    };
    let ctx = |r: &HttpResp| {
        format!(
            "response:\n{}\nnginx error.log:\n{}\nsluice stderr:\n{}",
            r.describe(),
            ng.read("error.log"),
            sluice.stderr()
        )
    };

    // 1..3: allowed, proxied to the upstream, sluice's headers reach the client
    for (i, want) in [2i64, 1, 0].into_iter().enumerate() {
        let n = i + 1;
        let r = post("alice");
        assert_eq!(
            r.status,
            200,
            "request {n} of 3/minute should pass; {}",
            ctx(&r)
        );
        assert_eq!(
            r.body,
            "upstream ok",
            "request {n} should reach the upstream; {}",
            ctx(&r)
        );
        let rl = r.header("ratelimit").unwrap_or_else(|| {
            panic!(
                "request {n}: no RateLimit header at the client; {}",
                ctx(&r)
            )
        });
        assert_eq!(
            remaining_in(rl, "chat_user"),
            Some(want),
            "request {n}: RateLimit {rl:?} should say \"chat_user\";r={want}; {}",
            ctx(&r)
        );
        let pol = r.header("ratelimit-policy").unwrap_or("");
        assert!(
            pol.contains("\"chat_user\";q=3;w=60"),
            "request {n}: RateLimit-Policy {pol:?}; {}",
            ctx(&r)
        );
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(want.to_string().as_str()),
            "request {n}: X-RateLimit-Remaining; {}",
            ctx(&r)
        );
        assert!(
            r.header("retry-after").is_none(),
            "request {n}: allowed, so no Retry-After; {}",
            ctx(&r)
        );
        let hits = wait_hits(&ng, n);
        assert_eq!(
            hits.len(),
            n,
            "upstream should have served {n} requests: {hits:?}"
        );
    }

    // 4: denied by sluice (403) and answered by nginx as 429, never proxied
    let r = post("alice");
    assert_eq!(
        r.status,
        CLIENT_DENY_STATUS,
        "request 4 of 3/minute should be denied (sluice 403, mapped to {CLIENT_DENY_STATUS}); {}",
        ctx(&r)
    );
    assert_ne!(
        r.body,
        "upstream ok",
        "a denied request must not reach the upstream; {}",
        ctx(&r)
    );
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "denied request: Retry-After missing or not seconds; {}",
                ctx(&r)
            )
        });
    assert!(
        (1..=20).contains(&retry),
        "denied request: Retry-After {retry} should be 1..=20 (3/minute: one every 20 s); {}",
        ctx(&r)
    );
    let rl = r.header("ratelimit").unwrap_or_else(|| {
        panic!(
            "denied request: no RateLimit header at the client; {}",
            ctx(&r)
        )
    });
    assert_eq!(
        remaining_in(rl, "chat_user"),
        Some(0),
        "denied RateLimit {rl:?}; {}",
        ctx(&r)
    );
    std::thread::sleep(Duration::from_millis(300));
    let hits = ng.upstream_hits();
    assert_eq!(
        hits.len(),
        3,
        "the denied request must not reach the upstream; upstream log: {hits:?}"
    );

    // another user has their own bucket
    let r = post("bob");
    assert_eq!(
        r.status,
        200,
        "bob is a different user and should pass; {}",
        ctx(&r)
    );
    assert_eq!(
        r.body,
        "upstream ok",
        "bob's request reaches the upstream; {}",
        ctx(&r)
    );
    assert_eq!(
        r.header("ratelimit")
            .and_then(|f| remaining_in(f, "chat_user")),
        Some(2),
        "bob's first request; {}",
        ctx(&r)
    );
    let hits = wait_hits(&ng, 4);
    assert_eq!(hits.len(), 4, "upstream log: {hits:?}");
    assert!(
        hits[3].contains("user=bob"),
        "4th upstream hit should be bob's: {hits:?}"
    );

    // a path no route matches passes untouched, without rate-limit headers
    let r = http_request(front, "GET", "/health", &[], b"").expect("GET /health via nginx");
    assert_eq!(r.status, 200, "GET /health; {}", ctx(&r));
    assert_eq!(
        r.body,
        "upstream ok",
        "GET /health reaches the upstream; {}",
        ctx(&r)
    );
    for h in [
        "ratelimit",
        "ratelimit-policy",
        "x-ratelimit-remaining",
        "retry-after",
    ] {
        assert!(
            r.header(h).is_none(),
            "GET /health matched no route: no {h} expected; {}",
            ctx(&r)
        );
    }

    // alice is still limited, and sluice counted the decisions
    let r = post("alice");
    assert_eq!(
        r.status,
        CLIENT_DENY_STATUS,
        "alice is still over quota; {}",
        ctx(&r)
    );
    let m = sluice.metrics();
    let denied = metric_value(
        &m,
        "sluice_decisions_total",
        &[("limit", "chat_user"), ("outcome", "denied")],
    );
    assert_eq!(denied, Some(2.0), "sluice should count alice's two denials");
}
