//! The reverse proxy against a tiny raw-socket upstream: what reaches the app (headers,
//! body, forwarding headers), what reaches the client (hop-by-hop headers dropped both
//! ways), WebSocket upgrades copied both ways, timeouts and a dead upstream as 502/504
//! JSON, upstream connections kept alive and stale ones replaced without a failed
//! request, where sluice's own endpoints live, and reload-time settings.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Server, free_port, http_request, read_request};

/// An upstream on a free port, one thread per connection:
/// - `/ws`: answers `101` and then echoes every byte upper-cased until the client closes;
/// - `/slow`: waits 3 s, then answers like `/echo`;
/// - anything else: `200` whose body is the request's method, target, header lines and
///   body, with hop-by-hop headers of its own that must not reach the client.
struct Upstream {
    port: u16,
    requests: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || serve_connection(stream, &counter));
            }
        });
        Upstream { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve_connection(stream: TcpStream, counter: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        counter.fetch_add(1, Ordering::SeqCst);
        let (head, body) = (request.head, request.body);
        let target = head[0].split(' ').nth(1).unwrap_or("/").to_string();
        if target == "/ws" {
            let _ = writer.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: test\r\n\r\n",
            );
            let mut buf = [0u8; 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if writer.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        if target == "/slow" {
            std::thread::sleep(Duration::from_secs(3));
        }
        let mut echo = head.join("\n");
        echo.push_str("\n\n");
        echo.push_str(&String::from_utf8_lossy(&body));
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: keep-alive, X-Upstream-Hop\r\nX-Upstream-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Upstream-End: kept\r\n\r\n{echo}",
            echo.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn proxy_config(upstream: &str, extra: &str) -> String {
    format!(
        "limits:\n  per_ip: {{rate: 2/minute}}\nroutes:\n  - match: {{path: /limited}}\n    limits:\n      - {{limit: per_ip, key: \"{{client_ip}}\"}}\nproxy:\n  upstream: {upstream}\n{extra}"
    )
}

/// The header lines the upstream saw, lower-cased names.
fn seen_headers(body: &str) -> Vec<(String, String)> {
    body.split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

fn seen<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn requests_reach_the_app_whole_and_hop_by_hop_headers_stay_behind() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    let response = http_request(
        server.port,
        "POST",
        "/api/items?x=1&y=%20z",
        &[
            ("Content-Type", "application/json"),
            ("X-User-Id", "42"),
            ("Connection", "X-Private-Hop"),
            ("X-Private-Hop", "drop me"),
            ("Keep-Alive", "timeout=9"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("CF-Connecting-IP", "6.6.6.6"),
            ("True-Client-IP", "6.6.6.6"),
        ],
        br#"{"name": "widget"}"#,
    )
    .expect("proxied");
    assert_eq!(response.status, 200, "{}", response.describe());
    let body = &response.body;
    assert!(
        body.starts_with("POST /api/items?x=1&y=%20z HTTP/1.1\n"),
        "method, path and query unchanged: {body}"
    );
    assert!(body.ends_with(r#"{"name": "widget"}"#), "the body: {body}");
    let headers = seen_headers(body);
    assert_eq!(seen(&headers, "x-user-id"), Some("42"));
    assert_eq!(seen(&headers, "content-type"), Some("application/json"));
    assert_eq!(
        seen(&headers, "host"),
        Some(format!("127.0.0.1:{}", server.port).as_str()),
        "Host is the client's"
    );
    for hop in [
        "x-private-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "forwarded",
        "cf-connecting-ip",
        "true-client-ip",
    ] {
        assert_eq!(
            seen(&headers, hop),
            None,
            "{hop} must not reach the app: {body}"
        );
    }
    assert_ne!(
        seen(&headers, "connection").map(str::to_ascii_lowercase),
        Some("close".into()),
        "the client's Connection is not the upstream connection's"
    );
    assert_eq!(
        seen(&headers, "x-forwarded-for"),
        Some("127.0.0.1"),
        "an untrusted client's X-Forwarded-For is replaced, not appended to"
    );
    assert_eq!(seen(&headers, "x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen(&headers, "x-forwarded-host"),
        Some(format!("127.0.0.1:{}", server.port).as_str())
    );
    assert_eq!(
        seen(&headers, "x-real-ip"),
        Some("127.0.0.1"),
        "an untrusted client's X-Real-IP is replaced by its address"
    );

    for hop in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(
            response.header(hop),
            None,
            "{hop} must not reach the client: {}",
            response.describe()
        );
    }
    assert_eq!(response.header("x-upstream-end"), Some("kept"));
}

#[test]
fn a_trusted_proxy_s_forwarding_headers_are_extended() {
    let upstream = Upstream::start();
    let server = Server::start(&format!(
        "client_ip: {{trusted_proxies: [127.0.0.1]}}\n{}",
        proxy_config(&upstream.url(), "")
    ));
    let response = http_request(
        server.port,
        "GET",
        "/limited",
        &[
            ("X-Forwarded-For", "198.51.100.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "api.example"),
            ("X-Real-IP", "198.51.100.7"),
            ("CF-Connecting-IP", "198.51.100.7"),
        ],
        b"",
    )
    .expect("proxied");
    let headers = seen_headers(&response.body);
    assert_eq!(
        seen(&headers, "x-forwarded-for"),
        Some("198.51.100.7, 127.0.0.1")
    );
    assert_eq!(seen(&headers, "x-real-ip"), Some("198.51.100.7"));
    assert_eq!(seen(&headers, "cf-connecting-ip"), Some("198.51.100.7"));
    assert_eq!(seen(&headers, "x-forwarded-proto"), Some("https"));
    assert_eq!(seen(&headers, "x-forwarded-host"), Some("api.example"));
    // The limit is counted on the client the trusted proxy named.
    assert_eq!(
        response.header("x-ratelimit-remaining"),
        Some("1"),
        "{}",
        response.describe()
    );
    let other = http_request(
        server.port,
        "GET",
        "/limited",
        &[("X-Forwarded-For", "198.51.100.8")],
        b"",
    )
    .expect("proxied");
    assert_eq!(other.header("x-ratelimit-remaining"), Some("1"));
}

#[test]
fn denied_requests_never_reach_the_upstream() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    for remaining in ["1", "0"] {
        let ok = http_request(server.port, "GET", "/limited", &[], b"").expect("proxied");
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-ratelimit-remaining"), Some(remaining));
        assert_eq!(ok.header("ratelimit-policy"), Some("\"per_ip\";q=2;w=60"));
    }
    let before = upstream.requests();
    let denied =
        http_request(server.port, "POST", "/limited", &[], b"a body never read").expect("answer");
    assert_eq!(denied.status, 429, "{}", denied.describe());
    assert!(denied.header("retry-after").is_some());
    assert_eq!(denied.json()["error"], "rate_limited");
    assert_eq!(denied.json()["limit"], "per_ip");
    assert_eq!(upstream.requests(), before, "the upstream saw nothing");
    // Paths without a route are not limited.
    let free = http_request(server.port, "GET", "/free", &[], b"").expect("proxied");
    assert_eq!(free.status, 200);
    assert_eq!(free.header("x-ratelimit-remaining"), None);
}

#[test]
fn connect_is_refused_and_never_reaches_the_upstream() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    let before = upstream.requests();
    for target in ["example.com:443", "127.0.0.1:22"] {
        let (status, text) = common::raw_http(
            server.port,
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .expect("answered");
        assert_eq!(status, 405, "{text}");
        assert!(text.contains("\"method_not_allowed\""), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("\nallow: get, "),
            "a 405 says what is allowed: {text}"
        );
    }
    // One with a body it will not get to send: the answer says the connection closes.
    let (status, text) = common::raw_http(
        server.port,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nContent-Length: 5\r\n\r\n",
    )
    .expect("answered");
    assert_eq!(status, 405, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("\nconnection: close"),
        "{text}"
    );
    assert_eq!(upstream.requests(), before, "the upstream saw no CONNECT");
    // The connection and the proxy still serve ordinary requests.
    let ok = http_request(server.port, "GET", "/free", &[], b"").expect("proxied");
    assert_eq!(ok.status, 200, "{}", ok.describe());
}

#[test]
fn websocket_upgrades_are_copied_both_ways() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("write upgrade");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_ascii_lowercase());
    }
    assert!(head.contains(&"upgrade: websocket".to_string()), "{head:?}");
    assert!(
        head.contains(&"connection: upgrade".to_string()),
        "{head:?}"
    );
    assert!(
        head.contains(&"sec-websocket-accept: test".to_string()),
        "{head:?}"
    );
    for message in ["hello", "second frame"] {
        stream.write_all(message.as_bytes()).expect("send");
        let mut echoed = vec![0; message.len()];
        reader.read_exact(&mut echoed).expect("echo");
        assert_eq!(echoed, message.to_ascii_uppercase().as_bytes());
    }
}

#[test]
fn a_dead_or_slow_upstream_is_a_json_502_or_504() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let server = Server::start(&proxy_config(&dead, "  refund_on_status: [\"5xx\"]\n"));
    let response = http_request(server.port, "GET", "/limited", &[], b"").expect("answer");
    assert_eq!(response.status, 502, "{}", response.describe());
    assert_eq!(response.json()["error"], "upstream_unavailable");
    assert!(
        response
            .header("content-type")
            .unwrap_or("")
            .contains("json")
    );
    // Refunded (5xx): the limit of two was never spent.
    for _ in 0..3 {
        let again = http_request(server.port, "GET", "/limited", &[], b"").expect("answer");
        assert_eq!(again.status, 502, "{}", again.describe());
    }

    let upstream = Upstream::start();
    let slow = Server::start(&proxy_config(&upstream.url(), "  timeout_ms: 300\n"));
    let started = Instant::now();
    let response = http_request(slow.port, "GET", "/slow", &[], b"").expect("answer");
    assert_eq!(response.status, 504, "{}", response.describe());
    assert_eq!(response.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the timeout"
    );
}

/// Who answers `method path` on `port`: `"sluice"` (a decision, or sluice's own 404 or
/// 405), `"upstream"` (the app echoed the request) or the status.
fn who_answers_check(port: u16, method: &str, path: &str) -> String {
    let answer = http_request(
        port,
        method,
        path,
        &[("Content-Type", "application/json")],
        br#"{"checks":[{"limit":"per_ip","key":"k"}]}"#,
    )
    .expect("answer");
    if answer
        .body
        .starts_with(&format!("{method} {path} HTTP/1.1"))
    {
        "upstream".into()
    } else if answer.status == 200 && answer.body.starts_with("{\"allowed\":true") {
        "sluice".into()
    } else {
        format!("{} {}", answer.status, answer.body)
    }
}

/// The decision API is served ahead of the router (the express lane) at exactly the
/// path where the router serves it, so wherever `sluice_endpoints` puts sluice's own
/// endpoints, `POST /v1/check` is answered by the same party as before, and any other
/// spelling of it is not taken for it.
#[test]
fn the_decision_api_is_where_sluice_endpoints_puts_it_and_nowhere_else() {
    let upstream = Upstream::start();
    let main = Server::start(&proxy_config(&upstream.url(), "  sluice_endpoints: main\n"));
    assert_eq!(who_answers_check(main.port, "POST", "/v1/check"), "sluice");
    for (method, path) in [
        ("POST", "/v1/check/"),
        ("POST", "/v1/%63heck"),
        ("POST", "/V1/check"),
        ("POST", "//v1/check"),
        ("PUT", "/v1/check"),
    ] {
        let who = who_answers_check(main.port, method, path);
        let expected = if method == "PUT" { "405" } else { "upstream" };
        assert!(who.starts_with(expected), "{method} {path} on main: {who}");
    }

    let prefixed = Server::start(&proxy_config(
        &upstream.url(),
        "  sluice_endpoints: /_sluice\n",
    ));
    assert_eq!(
        who_answers_check(prefixed.port, "POST", "/_sluice/v1/check"),
        "sluice"
    );
    assert_eq!(
        who_answers_check(prefixed.port, "POST", "/v1/check"),
        "upstream"
    );

    let admin_port = free_port();
    let moved = Server::start(&format!(
        "admin: {{listen: 127.0.0.1:{admin_port}}}\n{}",
        proxy_config(&upstream.url(), "  sluice_endpoints: admin\n")
    ));
    assert_eq!(
        who_answers_check(moved.port, "POST", "/v1/check"),
        "upstream"
    );
    common::wait_port(admin_port);
    assert_eq!(who_answers_check(admin_port, "POST", "/v1/check"), "sluice");

    let no_proxy = Server::start("limits:\n  per_ip: {rate: 2/minute}\n");
    assert_eq!(
        who_answers_check(no_proxy.port, "POST", "/v1/check"),
        "sluice"
    );
    let slash = who_answers_check(no_proxy.port, "POST", "/v1/check/");
    assert!(slash.starts_with("404"), "{slash}");
    let get = who_answers_check(no_proxy.port, "GET", "/v1/check");
    assert!(get.starts_with("405"), "{get}");
}

#[test]
fn sluice_endpoints_can_move_out_of_the_upstream_s_way() {
    let upstream = Upstream::start();
    // `main`: sluice's paths win.
    let main = Server::start(&proxy_config(&upstream.url(), "  sluice_endpoints: main\n"));
    let metrics = http_request(main.port, "GET", "/metrics", &[], b"").expect("answer");
    assert!(
        metrics.body.contains("sluice_decisions"),
        "{}",
        metrics.describe()
    );

    let prefixed = Server::start(&proxy_config(
        &upstream.url(),
        "  sluice_endpoints: /_sluice\n",
    ));
    let app_metrics = http_request(prefixed.port, "GET", "/metrics", &[], b"").expect("answer");
    assert!(
        app_metrics.body.starts_with("GET /metrics HTTP/1.1"),
        "the app's /metrics: {}",
        app_metrics.describe()
    );
    let own = http_request(prefixed.port, "GET", "/_sluice/metrics", &[], b"").expect("answer");
    assert!(own.body.contains("sluice_decisions"), "{}", own.describe());
    let health = http_request(prefixed.port, "GET", "/_sluice/healthz", &[], b"").expect("answer");
    assert_eq!(health.status, 200);
    let unknown = http_request(prefixed.port, "GET", "/_sluice/nothing", &[], b"").expect("answer");
    assert_eq!(unknown.status, 404, "sluice's own 404 under its prefix");

    let admin_port = free_port();
    let moved = Server::start(&format!(
        "admin: {{listen: 127.0.0.1:{admin_port}}}\n{}",
        proxy_config(&upstream.url(), "  sluice_endpoints: admin\n")
    ));
    let app_health = http_request(moved.port, "GET", "/healthz", &[], b"").expect("answer");
    assert!(
        app_health.body.starts_with("GET /healthz"),
        "{}",
        app_health.describe()
    );
    common::wait_port(admin_port);
    let own = http_request(admin_port, "GET", "/metrics", &[], b"").expect("answer");
    assert!(own.body.contains("sluice_decisions"), "{}", own.describe());
}

/// The proxied clients are the public: by default none of sluice's own endpoints is
/// theirs to call. Before, any client could `POST /v1/check` to lock another user
/// out, or read anyone's quota with a dry run.
#[test]
fn sluice_s_own_api_is_not_served_to_proxied_clients_by_default() {
    let upstream = Upstream::start();
    let config = proxy_config(&upstream.url(), "");
    let server = Server::start(&config);
    let check = http_request(
        server.port,
        "POST",
        "/v1/check",
        &[("Content-Type", "application/json")],
        br#"{"checks":[{"limit":"per_ip","key":"127.0.0.1","cost":2}]}"#,
    )
    .expect("answer");
    assert!(
        check.body.starts_with("POST /v1/check HTTP/1.1"),
        "/v1/check went to the app, not to sluice: {}",
        check.describe()
    );
    for path in [
        "/metrics",
        "/v1/stats",
        "/v1/limits",
        "/v1/forward-auth",
        "/readyz",
    ] {
        let r = http_request(server.port, "GET", path, &[], b"").expect("answer");
        assert!(
            r.body.starts_with(&format!("GET {path} HTTP/1.1")),
            "{path} went to the app: {}",
            r.describe()
        );
    }
    // The client's quota was not spent by its /v1/check call.
    let r = http_request(server.port, "GET", "/limited", &[], b"").expect("answer");
    assert_eq!(r.status, 200, "{}", r.describe());

    // check-config says where the endpoints are when they are public, or nowhere.
    let dir = common::scratch_dir("endpoints-warning");
    for (extra, warning) in [
        (
            "  sluice_endpoints: main\n",
            "any of them can spend or read any key's quota",
        ),
        (
            "  sluice_endpoints: /_sluice\n",
            "every client that learns the prefix",
        ),
        ("", "not served anywhere"),
    ] {
        let file = common::write_file(&dir, "sluice.yaml", &proxy_config(&upstream.url(), extra));
        let (status, stdout, _) = common::run_cli(&["check-config", file.to_str().unwrap()]);
        assert!(status.success(), "{stdout}");
        assert!(
            stdout.contains("warning: ") && stdout.contains(warning),
            "{extra:?}: {stdout}"
        );
    }
}

/// Paths that the app would decode into a limited route are refused and never reach
/// it; other spellings of the route count against its bucket.
#[test]
fn spellings_of_a_limited_path_are_charged_or_refused() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    for (target, status) in [
        ("/limited", 200),
        ("/LIMITED", 200),
        ("/%6cimited", 429),
        ("/limited/", 429),
        ("//limited", 429),
    ] {
        let r = http_request(server.port, "GET", target, &[], b"").expect("answer");
        assert_eq!(r.status, status, "GET {target}: {}", r.describe());
    }
    let (status, head) = common::raw_http(
        server.port,
        b"HEAD /limited HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("answer");
    assert_eq!(status, 429, "HEAD is limited like GET: {head}");
    let reached = upstream.requests();
    for target in [
        "/limited%2F",
        "/x%2F..%2Flimited",
        "/limited;x=1",
        "/limited%3B",
        "/limited%00",
        "/limited%5C",
        "/x/../limited",
        "/./limited",
        "/%2e%2e/limited",
        "/limited/%ff",
    ] {
        let r = http_request(server.port, "GET", target, &[], b"").expect("answer");
        assert_eq!(r.status, 400, "GET {target}: {}", r.describe());
        assert_eq!(r.json()["error"], "invalid_path", "GET {target}");
    }
    assert_eq!(
        upstream.requests(),
        reached,
        "no refused path reached the app"
    );
}

/// sluice's own 504 comes after the request was sent: the upstream may still be doing
/// the (costly) work, so it is not refunded, even with `refund_on_status: ["5xx"]`.
/// A 502 for an upstream that could not be connected to is (see the dead upstream test).
#[test]
fn sluice_s_own_504_after_sending_is_not_refunded() {
    let upstream = Upstream::start();
    let server = Server::start(&format!(
        "limits:\n  per_ip: {{rate: 2/minute}}\nroutes:\n  - match: {{path: /slow}}\n    limits:\n      - {{limit: per_ip, key: \"{{client_ip}}\"}}\nproxy:\n  upstream: {}\n  timeout_ms: 200\n  refund_on_status: [\"5xx\"]\n",
        upstream.url()
    ));
    for status in [504, 504, 429] {
        let r = http_request(server.port, "GET", "/slow", &[], b"").expect("answer");
        assert_eq!(r.status, status, "{}", r.describe());
    }
}

/// A WebSocket taken over through the proxy still holds its connection slot: a flood of
/// upgrades cannot get past `http.max_connections`.
#[test]
fn an_upgraded_connection_counts_under_the_connection_cap() {
    let upstream = Upstream::start();
    let server = Server::start(&proxy_config(
        &upstream.url(),
        "  sluice_endpoints: main\nhttp: {max_connections: 1, threads: 1}\n",
    ));
    let mut ws = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .expect("write upgrade");
    let mut reader = BufReader::new(ws.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
    }
    ws.write_all(b"ping").expect("send");
    let mut echoed = [0; 4];
    reader.read_exact(&mut echoed).expect("echo");
    // The upgrade holds the only slot: another connection waits, unserved.
    let mut other = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 64];
    let waited = other.read(&mut buf);
    assert!(
        waited.is_err(),
        "served while the WebSocket held the only slot: {waited:?}"
    );
    // Once the WebSocket closes, the waiting connection is served.
    drop(reader);
    drop(ws);
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = String::new();
    other.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Top keys (issue 18) count proxied requests, and the dashboard works under a
/// `sluice_endpoints` prefix: its script and data are fetched by relative paths.
#[test]
fn proxied_requests_feed_top_keys_and_the_dashboard_works_under_a_prefix() {
    let upstream = Upstream::start();
    let server = Server::start(&format!(
        "admin: {{token: {ADMIN_TOKEN}}}\n{}",
        proxy_config(&upstream.url(), "  sluice_endpoints: /_sluice\n")
    ));
    let codes: Vec<u16> = (0..3)
        .map(|_| {
            http_request(server.port, "GET", "/limited", &[], b"")
                .expect("proxied")
                .status
        })
        .collect();
    assert_eq!(codes, [200, 200, 429]);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let top = |by: &str| {
        let r = http_request(
            server.port,
            "GET",
            &format!("/_sluice/v1/admin/top?limit=per_ip&by={by}"),
            &[("Authorization", &auth)],
            b"",
        )
        .expect("answer");
        assert_eq!(r.status, 200, "{}", r.describe());
        r.json()["limits"][0]["keys"].clone()
    };
    let spend = top("spend");
    assert_eq!(spend[0]["key"], "127.0.0.1", "{spend}");
    assert_eq!(spend[0]["count"], 2);
    assert_eq!(top("denials")[0]["count"], 1);
    // The page refers to its script and data relatively: both resolve under the prefix.
    let page =
        http_request(server.port, "GET", "/_sluice/v1/admin/dashboard", &[], b"").expect("answer");
    assert_eq!(page.status, 200, "{}", page.describe());
    assert!(page.body.contains(r#"src="dashboard/app.js""#));
    let script = http_request(
        server.port,
        "GET",
        "/_sluice/v1/admin/dashboard/app.js",
        &[],
        b"",
    )
    .expect("answer");
    assert_eq!(script.status, 200);
    assert!(script.body.contains("fetch('dashboard/data'"));
    let data = http_request(
        server.port,
        "GET",
        "/_sluice/v1/admin/dashboard/data",
        &[("Authorization", &auth)],
        b"",
    )
    .expect("answer");
    assert_eq!(data.status, 200, "{}", data.describe());
    assert_eq!(data.json()["limits"][0]["top_denied"]["total"], 1);
}

/// An upstream on a free port that answers every request `200` with a body on a
/// kept-alive connection, counting connections and requests. With `close_idle_after`,
/// it closes each connection that long after answering without a word, as uvicorn
/// does after its keep-alive timeout, so the proxy's idle connection to it goes stale.
struct CountingUpstream {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingUpstream {
    fn start(close_idle_after: Option<Duration>) -> CountingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (opened, answered) = (Arc::clone(&connections), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                opened.fetch_add(1, Ordering::SeqCst);
                let answered = Arc::clone(&answered);
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut writer = stream;
                    while read_request(&mut reader).is_some() {
                        let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
                        let body = format!("answer {n}");
                        let response = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if writer.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                        if let Some(after) = close_idle_after {
                            std::thread::sleep(after);
                            return;
                        }
                    }
                });
            }
        });
        CountingUpstream {
            port,
            connections,
            requests,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[test]
fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = CountingUpstream::start(None);
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    // The harness's readiness probe may have been forwarded too.
    let before = upstream.requests.load(Ordering::SeqCst);
    for n in before + 1..=before + 30 {
        let response = http_request(server.port, "GET", "/items", &[], b"").expect("proxied");
        assert_eq!(response.status, 200, "{}", response.describe());
        assert_eq!(response.body, format!("answer {n}"));
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), before + 30);
    // Each serving thread keeps its own connection (the config runs one per core).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let connections = upstream.connections.load(Ordering::SeqCst);
    assert!(
        connections <= threads,
        "30 requests one after another opened {connections} upstream connections"
    );
}

#[test]
fn an_upstream_closing_idle_connections_never_costs_a_client_a_request() {
    let upstream = CountingUpstream::start(Some(Duration::from_millis(30)));
    let server = Server::start(&proxy_config(&upstream.url(), ""));
    let before = upstream.requests.load(Ordering::SeqCst);
    for n in before + 1..=before + 12 {
        // Long enough for the upstream to have closed the connection the last request
        // left idle in sluice's pool.
        std::thread::sleep(Duration::from_millis(120));
        let response = http_request(server.port, "GET", "/items", &[], b"").expect("proxied");
        assert_eq!(
            response.status,
            200,
            "request {n} after the upstream closed its idle connection: {}",
            response.describe()
        );
        assert_eq!(response.body, format!("answer {n}"));
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), before + 12);
    assert_eq!(upstream.connections.load(Ordering::SeqCst), before + 12);
}
