//! Metered routes through the reverse proxy (docs/design/front-doors.md, "Metered
//! routes"): an LLM-like upstream reports usage in its answer, and what sluice's budgets
//! spend is exactly that usage (or the estimate when the answer says nothing), while
//! a concurrency limit holds a slot for the whole call and no longer.
//!
//! The upstream is a raw-socket server in this file, one thread per connection; the
//! test chooses the usage it reports with `X-Usage: <input>,<output>`:
//! - `/v1/json`: a Chat Completions JSON answer with that usage;
//! - `/v1/sse`: a chunked event stream, one content chunk, then (after `X-Delay-Ms`) two
//!   more and the usage chunk, then `[DONE]`;
//! - `/v1/none`: a JSON answer without usage;
//! - `/v1/missing`: `404` (with usage, which must not count: refunded by status);
//! - `/v1/hang`: a stream that sends one chunk and then a comment every 50 ms for 30 s,
//!   until the client goes away;
//! - `/v1/stall`: answers only after 2 s (the JSON answer with usage).
//!
//! What sluice spent is read from the quota endpoint (`/_quota`) as a client would.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKENS: u64 = 100_000;
const DOLLARS: u64 = 10_000_000;

/// What the upstream saw of each request: target and lower-cased header lines.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Vec<(String, String)>)>,
}

struct Upstream {
    port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Upstream {
    fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let record = Arc::clone(&record);
                thread::spawn(move || serve(stream, &record));
            }
        });
        Upstream { port, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests to the metered routes (the test kit's readiness probe is not one).
    fn requests(&self) -> usize {
        let seen = self.seen.lock().expect("lock");
        seen.requests
            .iter()
            .filter(|(target, _)| target.starts_with("/v1/"))
            .count()
    }

    fn last_header(&self, name: &str) -> Option<String> {
        let seen = self.seen.lock().expect("lock");
        let (_, headers) = seen.requests.last()?;
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

fn chunk(writer: &mut TcpStream, data: &str) -> std::io::Result<()> {
    write!(writer, "{:x}\r\n{data}\r\n", data.len())?;
    writer.flush()
}

fn usage_json(input: u64, output: u64) -> String {
    format!(
        r#"{{"prompt_tokens": {input}, "completion_tokens": {output}, "total_tokens": {}}}"#,
        input + output
    )
}

fn serve(stream: TcpStream, seen: &Mutex<Seen>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    while let Some(request) = read_request(&mut reader) {
        let target = request.target.clone();
        let header = |name: &str| request.header(name).map(str::to_string);
        seen.lock()
            .expect("lock")
            .requests
            .push((target.clone(), request.headers.clone()));
        let (input, output) = header("x-usage")
            .and_then(|v| {
                let (i, o) = v.split_once(',')?;
                Some((i.trim().parse().ok()?, o.trim().parse().ok()?))
            })
            .unwrap_or((0, 0));
        let delay =
            Duration::from_millis(header("x-delay-ms").map_or(0, |v| v.parse().unwrap_or(0)));
        let json = |status: &str, body: String| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let sse_head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        let result = match target.as_str() {
            "/v1/json" => writer.write_all(
                json(
                    "200 OK",
                    format!(
                        r#"{{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{{"index": 0, "message": {{"role": "assistant", "content": "Hi"}}}}], "usage": {}}}"#,
                        usage_json(input, output)
                    ),
                )
                .as_bytes(),
            ),
            "/v1/stall" => {
                thread::sleep(Duration::from_secs(2));
                writer.write_all(
                    json(
                        "200 OK",
                        format!(r#"{{"choices": [], "usage": {}}}"#, usage_json(input, output)),
                    )
                    .as_bytes(),
                )
            }
            "/v1/none" => writer.write_all(
                json(
                    "200 OK",
                    r#"{"id": "chatcmpl-2", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}]}"#.to_string(),
                )
                .as_bytes(),
            ),
            "/v1/missing" => writer.write_all(
                json(
                    "404 Not Found",
                    format!(r#"{{"error": "no such model", "usage": {}}}"#, usage_json(input, output)),
                )
                .as_bytes(),
            ),
            "/v1/sse" => (|| {
                writer.write_all(sse_head.as_bytes())?;
                chunk(&mut writer, "data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}], \"usage\": null}\n\n")?;
                thread::sleep(delay);
                chunk(&mut writer, "data: {\"choices\": [{\"delta\": {\"content\": \"lo\"}}], \"usage\": null}\n\n")?;
                chunk(&mut writer, "data: {\"choices\": [{\"delta\": {}, \"finish_reason\": \"stop\"}], \"usage\": null}\n\n")?;
                chunk(
                    &mut writer,
                    &format!("data: {{\"choices\": [], \"usage\": {}}}\n\n", usage_json(input, output)),
                )?;
                chunk(&mut writer, "data: [DONE]\n\n")?;
                writer.write_all(b"0\r\n\r\n")
            })(),
            "/anthropic/hang" => (|| {
                // message_start reports the input and the first output token; the
                // message_delta with the real output count would come at the end.
                writer.write_all(sse_head.as_bytes())?;
                chunk(
                    &mut writer,
                    &format!(
                        "event: message_start\ndata: {{\"type\": \"message_start\", \"message\": {{\"usage\": {{\"input_tokens\": {input}, \"output_tokens\": 1}}}}}}\n\n"
                    ),
                )?;
                chunk(&mut writer, "event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \"delta\": {\"type\": \"text_delta\", \"text\": \"Hel\"}}\n\n")?;
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until {
                    thread::sleep(Duration::from_millis(50));
                    chunk(&mut writer, "event: ping\ndata: {\"type\": \"ping\"}\n\n")?;
                }
                writer.write_all(b"0\r\n\r\n")
            })(),
            "/v1/hang" => (|| {
                writer.write_all(sse_head.as_bytes())?;
                chunk(&mut writer, "data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}], \"usage\": null}\n\n")?;
                let until = Instant::now() + Duration::from_secs(30);
                while Instant::now() < until {
                    thread::sleep(Duration::from_millis(50));
                    chunk(&mut writer, ": still thinking\n\n")?;
                }
                writer.write_all(b"0\r\n\r\n")
            })(),
            _ => writer.write_all(json("404 Not Found", "{}".to_string()).as_bytes()),
        };
        if result.is_err() {
            return;
        }
    }
}

/// 12 bytes of prompt text ("user" and "hello world!") is 4 tokens; 500 out.
const REQUEST: &[u8] =
    br#"{"model": "m", "max_tokens": 500, "messages": [{"role": "user", "content": "hello world!"}]}"#;
const ESTIMATE_IN: u64 = 4;
const ESTIMATE_OUT: u64 = 500;

fn config(upstream: &str, admin_port: u16, concurrency: u64) -> String {
    format!(
        r#"admin: {{listen: 127.0.0.1:{admin_port}}}
limits:
  tokens_day: {{rate: {TOKENS}/day, algorithm: fixed_window}}
  dollars_day: {{rate: {DOLLARS}/day, algorithm: fixed_window}}
  in_flight: {{concurrency: {concurrency}}}
routes:
  - match: {{path: "/v1/*", methods: [POST]}}
    usage: {{format: openai, max_request_bytes: 2048}}
    limits:
      - {{limit: tokens_day, key: "user:{{header.x-user-id}}", cost: usage}}
      - {{limit: dollars_day, key: "user:{{header.x-user-id}}", cost: usage, weights: {{input: 3, output: 15}}}}
      - {{limit: in_flight, key: "user:{{header.x-user-id}}"}}
  - match: {{path: "/anthropic/*", methods: [POST]}}
    usage: {{format: anthropic, max_request_bytes: 2048}}
    limits:
      - {{limit: tokens_day, key: "user:{{header.x-user-id}}", cost: usage}}
      - {{limit: dollars_day, key: "user:{{header.x-user-id}}", cost: usage, weights: {{input: 3, output: 15}}}}
      - {{limit: in_flight, key: "user:{{header.x-user-id}}"}}
proxy:
  upstream: {upstream}
  refund_on_status: [404]
  quota_path: /_quota
"#
    )
}

struct Setup {
    upstream: Upstream,
    server: Server,
    admin_port: u16,
}

fn setup(concurrency: u64) -> Setup {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let server = Server::start(&config(&upstream.url(), admin_port, concurrency));
    wait_port(admin_port);
    Setup {
        upstream,
        server,
        admin_port,
    }
}

fn call(s: &Setup, path: &str, user: &str, usage: (u64, u64), extra: &[(&str, &str)]) -> HttpResp {
    let usage = format!("{},{}", usage.0, usage.1);
    let mut headers = vec![
        ("Content-Type", "application/json"),
        ("X-User-Id", user),
        ("X-Usage", usage.as_str()),
        ("Accept-Encoding", "gzip, br"),
    ];
    headers.extend_from_slice(extra);
    http_request(s.server.port, "POST", path, &headers, REQUEST).expect("proxied")
}

/// `remaining` of each limit for `user`, from the quota endpoint.
fn remaining(s: &Setup, user: &str) -> (u64, u64, u64) {
    let answer = http_request(
        s.server.port,
        "GET",
        "/_quota?path=/v1/json&method=POST",
        &[("X-User-Id", user)],
        b"",
    )
    .expect("quota");
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let json = answer.json();
    let of = |name: &str| {
        json["limits"]
            .as_array()
            .expect("limits")
            .iter()
            .find(|l| l["limit"] == name)
            .unwrap_or_else(|| panic!("{name} in {json}"))["remaining"]
            .as_u64()
            .expect("remaining")
    };
    (of("tokens_day"), of("dollars_day"), of("in_flight"))
}

/// Waits until the quota reads `expected` (settlements run just after the answer ends).
fn settles_to(s: &Setup, user: &str, expected: (u64, u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = remaining(s, user);
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "remaining (tokens, dollars, slots) is {now:?}, expected {expected:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn spent(tokens: u64, dollars: u64) -> (u64, u64, u64) {
    (TOKENS - tokens, DOLLARS - dollars, 2)
}

fn settlements(s: &Setup, outcome: &str) -> f64 {
    let text = http_request(s.admin_port, "GET", "/metrics", &[], b"")
        .expect("metrics")
        .body;
    let line = format!("sluice_proxy_settlements_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
}

#[test]
fn a_json_answer_spends_exactly_its_usage_in_tokens_and_in_money() {
    let s = setup(2);
    let answer = call(&s, "/v1/json", "alice", (12, 34), &[]);
    assert_eq!(answer.status, 200, "{}", answer.describe());
    assert!(
        answer.body.contains(r#""completion_tokens": 34"#),
        "unchanged body"
    );
    // The headers are the reservation's: the estimate was charged when it was decided.
    let state = answer.header("ratelimit").expect("RateLimit header");
    assert!(
        state.contains(&format!(
            "\"tokens_day\";r={}",
            TOKENS - ESTIMATE_IN - ESTIMATE_OUT
        )),
        "{state}"
    );
    assert!(state.contains("\"in_flight\";r=1"), "{state}");
    assert_eq!(
        s.upstream.last_header("accept-encoding").as_deref(),
        Some("identity"),
        "the usage is read from a plain body"
    );
    settles_to(&s, "alice", spent(12 + 34, 12 * 3 + 34 * 15));
    assert_eq!(settlements(&s, "usage"), 1.0);

    // The next one adds up.
    call(&s, "/v1/json", "alice", (100, 7), &[]);
    settles_to(&s, "alice", spent(46 + 107, 546 + 300 + 105));
}

#[test]
fn a_stream_spends_the_usage_of_its_final_chunk() {
    let s = setup(2);
    let answer = call(&s, "/v1/sse", "bob", (321, 54), &[]);
    assert_eq!(answer.status, 200, "{}", answer.describe());
    assert!(
        answer
            .body
            .starts_with("data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}]")
    );
    assert!(answer.body.ends_with("data: [DONE]\n\n"), "{}", answer.body);
    settles_to(&s, "bob", spent(321 + 54, 321 * 3 + 54 * 15));
}

#[test]
fn an_answer_without_usage_keeps_the_estimate() {
    let s = setup(2);
    let answer = call(&s, "/v1/none", "carol", (999, 999), &[]);
    assert_eq!(answer.status, 200, "{}", answer.describe());
    settles_to(
        &s,
        "carol",
        spent(
            ESTIMATE_IN + ESTIMATE_OUT,
            ESTIMATE_IN * 3 + ESTIMATE_OUT * 15,
        ),
    );
    assert_eq!(settlements(&s, "estimate"), 1.0);
}

#[test]
fn a_refunded_status_spends_nothing_and_frees_the_slot_before_it_is_answered() {
    let s = setup(2);
    let answer = call(&s, "/v1/missing", "dave", (50, 50), &[]);
    assert_eq!(answer.status, 404, "{}", answer.describe());
    // Released before the answer was sent: no waiting.
    assert_eq!(remaining(&s, "dave"), (TOKENS, DOLLARS, 2));
    assert_eq!(settlements(&s, "released"), 1.0);
}

#[test]
fn a_body_over_the_cap_is_refused_and_never_reaches_the_app() {
    let s = setup(2);
    let big = format!(
        r#"{{"max_tokens": 5, "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "x".repeat(4000)
    );
    let answer = http_request(
        s.server.port,
        "POST",
        "/v1/json",
        &[("Content-Type", "application/json"), ("X-User-Id", "erin")],
        big.as_bytes(),
    )
    .expect("answer");
    assert_eq!(answer.status, 413, "{}", answer.describe());
    assert_eq!(answer.json()["error"], "body_too_large");
    let message = answer.json()["message"].as_str().unwrap_or("").to_string();
    assert!(message.contains("2048 bytes"), "{message}");
    assert_eq!(s.upstream.requests(), 0);
    assert_eq!(remaining(&s, "erin"), (TOKENS, DOLLARS, 2));
}

/// A client that declares a body over the cap and then trickles it cannot hold the
/// connection: draining the rest is bounded by the body timeout like reading it is.
#[test]
fn a_trickled_body_over_the_cap_is_cut_at_the_body_timeout() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let server = Server::start(&format!(
        "http: {{body_read_timeout_ms: 1000}}\n{}",
        config(&upstream.url(), admin_port, 2)
    ));
    let mut sock = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    sock.write_all(
        b"POST /v1/json HTTP/1.1\r\nHost: x\r\nX-User-Id: tom\r\nContent-Type: application/json\r\n\
          Content-Length: 100000\r\n\r\n",
    )
    .expect("write head");
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(6) {
        // One byte every 200 ms, far below the declared 100,000.
        if sock.write_all(b" ").is_err() {
            break;
        }
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "still held after 6 s with a 1 s body timeout; answer so far: {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(upstream.requests(), 0);
}

#[test]
fn a_call_in_flight_holds_its_slot_until_its_answer_ends() {
    let s = Arc::new(setup(2));
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let s = Arc::clone(&s);
            thread::spawn(move || call(&s, "/v1/sse", "frank", (10, 10), &[("X-Delay-Ms", "1500")]))
        })
        .collect();
    // Both hold a slot while their streams are open (and both reached the app).
    let deadline = Instant::now() + Duration::from_secs(5);
    while remaining(&s, "frank").2 != 0 || s.upstream.requests() != 2 {
        assert!(Instant::now() < deadline, "two calls in flight");
        thread::sleep(Duration::from_millis(20));
    }
    let third = call(&s, "/v1/json", "frank", (1, 1), &[]);
    assert_eq!(third.status, 429, "{}", third.describe());
    assert_eq!(third.json()["limit"], "in_flight");
    assert_eq!(s.upstream.requests(), 2, "the third never reached the app");
    for call in slow {
        assert_eq!(call.join().expect("call").status, 200);
    }
    settles_to(&s, "frank", spent(40, 2 * (30 + 150)));
    let fourth = call(&s, "/v1/json", "frank", (1, 1), &[]);
    assert_eq!(
        fourth.status,
        200,
        "the slots came back: {}",
        fourth.describe()
    );
}

/// Sends the standard request to `path` as `user` (with `extra` header lines) on a raw
/// connection and reads until the stream's first text ("Hel") arrives: the client is
/// mid-stream, and dropping the connection leaves.
fn stream_until_text(s: &Setup, path: &str, user: &str, extra: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", s.server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-User-Id: {user}\r\n{extra}Content-Length: {}\r\n\r\n",
        REQUEST.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(REQUEST).expect("body");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("Hel") {
        let n = stream.read(&mut buf).expect("the stream's first text");
        assert!(n > 0, "the stream started");
        received.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_slot_at_once() {
    let s = setup(1);
    let stream = stream_until_text(&s, "/v1/hang", "gina", "");
    assert_eq!(remaining(&s, "gina").2, 0, "the call holds the only slot");
    let left = Instant::now();
    drop(stream);
    // The upstream would stream for 30 s more; the slot comes back when sluice notices
    // the client is gone (its next write, within 50 ms), not then.
    let expected = (
        TOKENS - ESTIMATE_IN - ESTIMATE_OUT,
        DOLLARS - ESTIMATE_IN * 3 - ESTIMATE_OUT * 15,
        1,
    );
    settles_to(&s, "gina", expected);
    assert!(
        left.elapsed() < Duration::from_secs(3),
        "{:?}",
        left.elapsed()
    );
    let again = call(&s, "/v1/json", "gina", (1, 1), &[]);
    assert_eq!(again.status, 200, "{}", again.describe());
}

/// An Anthropic stream reports the input and one output token in its first event and
/// the real output count only in its last: a client that reads the text and leaves
/// before that event keeps the estimate charged, not 1 output token (it could otherwise
/// cut every stream just before its end and never drain its budget).
#[test]
fn a_client_that_leaves_an_anthropic_stream_before_its_usage_keeps_the_estimate() {
    let s = setup(2);
    let stream = stream_until_text(&s, "/anthropic/hang", "mallory", "X-Usage: 4,1\r\n");
    drop(stream);
    let estimate = (
        TOKENS - ESTIMATE_IN - ESTIMATE_OUT,
        DOLLARS - ESTIMATE_IN * 3 - ESTIMATE_OUT * 15,
        2,
    );
    settles_to(&s, "mallory", estimate);
    // It stays there: nothing later gives the estimate back down to 4 + 1 tokens.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(remaining(&s, "mallory"), estimate);
    assert_eq!(settlements(&s, "usage_so_far"), 0.0);
    assert_eq!(settlements(&s, "estimate"), 1.0);
}

#[test]
fn a_call_that_never_reached_the_app_is_released() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let admin_port = free_port();
    let server = Server::start(&config(&dead, admin_port, 2));
    let s = Setup {
        upstream: Upstream::start(),
        server,
        admin_port,
    };
    let answer = call(&s, "/v1/json", "hank", (5, 5), &[]);
    assert_eq!(answer.status, 502, "{}", answer.describe());
    assert_eq!(remaining(&s, "hank"), (TOKENS, DOLLARS, 2));
}

/// sluice's own 504 after the request was sent: the app may be doing the work, so the
/// estimate stays (not refunded, whatever `refund_on_status` says), and the slot is free.
#[test]
fn a_timeout_after_the_request_was_sent_keeps_the_estimate() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let config = config(&upstream.url(), admin_port, 2).replace(
        "  refund_on_status: [404]\n",
        "  refund_on_status: [404, \"5xx\"]\n  timeout_ms: 300\n",
    );
    let server = Server::start(&config);
    let s = Setup {
        upstream,
        server,
        admin_port,
    };
    let answer = call(&s, "/v1/stall", "kim", (5, 5), &[]);
    assert_eq!(answer.status, 504, "{}", answer.describe());
    assert_eq!(
        remaining(&s, "kim"),
        spent(
            ESTIMATE_IN + ESTIMATE_OUT,
            ESTIMATE_IN * 3 + ESTIMATE_OUT * 15
        )
    );
}

#[test]
fn the_quota_endpoint_shows_metered_limits() {
    let s = setup(2);
    let answer = http_request(
        s.server.port,
        "GET",
        "/_quota?path=/v1/json&method=POST",
        &[("X-User-Id", "ivy")],
        b"",
    )
    .expect("quota");
    let json: Value = answer.json();
    let limits = json["limits"].as_array().expect("limits");
    let tokens = limits
        .iter()
        .find(|l| l["limit"] == "tokens_day")
        .expect("tokens");
    assert_eq!(tokens["metered"], true);
    assert_eq!(
        tokens["cost"],
        Value::Null,
        "a call spends what its answer says"
    );
    assert_eq!(tokens["quota"], TOKENS);
    let slots = limits
        .iter()
        .find(|l| l["limit"] == "in_flight")
        .expect("slots");
    assert_eq!(slots["metered"], false);
    assert_eq!(slots["cost"], 1);
    assert_eq!(slots["rate"], "2 in flight");
    assert_eq!(slots["window_seconds"], 0);
}

#[test]
fn forward_auth_refuses_a_metered_route_it_cannot_settle() {
    let upstream = Upstream::start();
    let admin_port = free_port();
    let server = Server::start(&config(&upstream.url(), admin_port, 2));
    wait_port(admin_port);
    let answer = http_request(
        admin_port,
        "POST",
        "/v1/forward-auth",
        &[
            ("X-Original-Method", "POST"),
            ("X-Original-URI", "/v1/json"),
            ("X-User-Id", "jack"),
        ],
        b"",
    )
    .expect("answer");
    assert_eq!(answer.status, 500, "{}", answer.describe());
    assert_eq!(answer.json()["error"], "needs_reverse_proxy");
    let message = answer.json()["message"].as_str().unwrap_or("").to_string();
    assert!(
        message.contains("tokens_day") && message.contains("cost: usage"),
        "{message}"
    );
    drop(server);
}
