//! Clients that hold the server: a request head sent in part, a kept-alive connection
//! left idle, more connections than `http.max_connections`, connections open at SIGTERM,
//! a silent TCP connection to the Envoy port, and gRPC calls to it whose message never
//! finishes arriving, that set their own `grpc-timeout`, or whose answers are never read.
//! Each against the real binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// What happened to a connection while we waited for the server to speak.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    /// The server closed the connection (EOF or reset) after this long.
    Closed(Duration),
    /// The server sent bytes.
    Data(String),
    /// Nothing within the wait.
    Nothing,
}

/// Reads from `stream` until it closes, sends something, or `wait` passes.
fn listen(stream: &mut TcpStream, wait: Duration) -> Heard {
    let started = Instant::now();
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => Heard::Closed(started.elapsed()),
        Ok(n) => Heard::Data(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Heard::Nothing
        }
        Err(_) => Heard::Closed(started.elapsed()),
    }
}

/// Reads and discards what the server sends (an HTTP/2 server speaks first: its
/// SETTINGS) until it closes the connection or `wait` passes.
fn until_closed(stream: &mut TcpStream, wait: Duration) -> Heard {
    let started = Instant::now();
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Heard::Nothing;
        }
        match listen(stream, left) {
            Heard::Data(_) => continue,
            Heard::Closed(_) => return Heard::Closed(started.elapsed()),
            Heard::Nothing => return Heard::Nothing,
        }
    }
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).expect("connect")
}

/// Sends a whole keep-alive `GET /healthz` and reads its whole response.
fn healthz_keep_alive(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    match listen(stream, Duration::from_secs(5)) {
        Heard::Data(text) => {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            text
        }
        other => panic!("GET /healthz on a kept-alive connection: {other:?}"),
    }
}

fn assert_closed_between(heard: Heard, at_least: Duration, at_most: Duration, what: &str) {
    match heard {
        Heard::Closed(after) => assert!(
            after >= at_least && after <= at_most,
            "{what}: closed after {after:?}, expected between {at_least:?} and {at_most:?}"
        ),
        other => panic!("{what}: expected the server to close the connection, got {other:?}"),
    }
}

const LIMITS: &str = "storage: {backend: memory}\nlimits:\n  five: {rate: 5/minute}\n";

/// A head that arrives whole, then a body that never does: sluice's own endpoints answer
/// 408 at the body timeout and close, rather than hold the connection and its slot.
#[test]
fn a_trickled_body_gets_408_at_the_body_timeout() {
    let s = Server::start(&format!(
        "http: {{body_read_timeout_ms: 400, idle_timeout_ms: 60000}}\n{LIMITS}"
    ));
    let mut stream = connect(s.port);
    stream
        .write_all(b"POST /v1/check HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"checks\":")
        .expect("write");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = Instant::now();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(
        answer.contains("request_timeout") && answer.contains("body_read_timeout_ms"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at the 400 ms timeout, took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_half_sent_request_head_is_closed_after_the_header_timeout() {
    let s = Server::start(&format!(
        "http: {{header_read_timeout_ms: 400, idle_timeout_ms: 60000}}\n{LIMITS}"
    ));
    let mut half = connect(s.port);
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut silent = connect(s.port);
    assert_closed_between(
        listen(&mut half, Duration::from_secs(5)),
        Duration::from_millis(250),
        Duration::from_secs(3),
        "a head without its blank line",
    );
    assert_closed_between(
        listen(&mut silent, Duration::from_secs(5)),
        Duration::ZERO,
        Duration::from_secs(3),
        "a connection that never sends a byte",
    );
    // On a kept-alive connection, the next head is due a header timeout after its first
    // byte, however long the idle timeout: also when the connection was idle for longer
    // than the header timeout before that byte.
    let mut kept = connect(s.port);
    healthz_keep_alive(&mut kept);
    std::thread::sleep(Duration::from_millis(700));
    kept.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    assert_closed_between(
        listen(&mut kept, Duration::from_secs(5)),
        Duration::from_millis(250),
        Duration::from_secs(3),
        "a second head sent in part",
    );
    // The server still serves.
    assert_eq!(s.get("/healthz").status, 200);
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let s = Server::start(&format!(
        "http: {{header_read_timeout_ms: 60000, idle_timeout_ms: 500}}\n{LIMITS}"
    ));
    let mut kept = connect(s.port);
    // Requests closer together than the idle timeout keep it open.
    for _ in 0..4 {
        healthz_keep_alive(&mut kept);
        std::thread::sleep(Duration::from_millis(250));
    }
    healthz_keep_alive(&mut kept);
    assert_closed_between(
        listen(&mut kept, Duration::from_secs(5)),
        Duration::from_millis(350),
        Duration::from_secs(3),
        "an idle kept-alive connection",
    );
}

#[test]
fn connections_over_the_cap_wait_and_are_served_once_others_close() {
    // Two serving threads share one cap of 3.
    let s = Server::start(&format!(
        "http: {{max_connections: 3, threads: 2, idle_timeout_ms: 60000, header_read_timeout_ms: 60000}}\n{LIMITS}"
    ));
    // Let the readiness probe's connection close.
    std::thread::sleep(Duration::from_millis(300));
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = connect(s.port);
            healthz_keep_alive(&mut c);
            c
        })
        .collect();
    // Three more: connected (the kernel's backlog), but not served while 3 are held.
    // They keep their connection after their answer, so each one served holds a slot.
    let mut waiting: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = connect(s.port);
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    for (i, c) in waiting.iter_mut().enumerate() {
        assert_eq!(
            listen(c, Duration::from_millis(400)),
            Heard::Nothing,
            "connection {} over the cap of 3 was served",
            i + 4
        );
    }
    assert!(
        s_running(&s),
        "the server must not stop with connections over the cap"
    );
    // One held connection closes: one waiting connection is served.
    drop(held.pop());
    let mut served = vec![false; waiting.len()];
    for (c, served) in waiting.iter_mut().zip(&mut served) {
        if let Heard::Data(text) = listen(c, Duration::from_millis(1500)) {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            *served = true;
        }
    }
    assert_eq!(
        served.iter().filter(|s| **s).count(),
        1,
        "one slot freed, so exactly one waiting connection is served"
    );
    // The other two held close: the other waiting connections are served.
    held.clear();
    for (c, _) in waiting.iter_mut().zip(&served).filter(|(_, s)| !**s) {
        match listen(c, Duration::from_secs(5)) {
            Heard::Data(text) => assert!(text.starts_with("HTTP/1.1 200"), "{text}"),
            other => {
                panic!("a waiting connection was not served after the others closed: {other:?}")
            }
        }
    }
    drop(waiting);
    assert_eq!(s.get("/healthz").status, 200);
}

/// Sends SIGTERM, asserts the server exits 0 within 10 s, and says how long it took.
fn terminate(s: &mut Server) -> Duration {
    let started = Instant::now();
    s.signal("TERM");
    let status = s
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("sluice still running 10 s after SIGTERM\n{}", s.stderr()));
    assert!(status.success(), "exit status {status}\n{}", s.stderr());
    started.elapsed()
}

fn s_running(s: &Server) -> bool {
    // A signal 0 checks the process exists without touching it.
    std::process::Command::new("kill")
        .args(["-0", &s.pid().to_string()])
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn sigterm_with_a_half_sent_head_exits_promptly() {
    let mut s = Server::start(&format!(
        "http: {{header_read_timeout_ms: 60000, idle_timeout_ms: 60000, shutdown_timeout_ms: 5000}}\n{LIMITS}"
    ));
    let mut half = connect(s.port);
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut idle = connect(s.port);
    healthz_keep_alive(&mut idle);
    std::thread::sleep(Duration::from_millis(100));
    let took = terminate(&mut s);
    // Neither connection has a request in flight: closed at once, not at the deadline.
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}\n{}",
        s.stderr()
    );
    assert!(matches!(
        listen(&mut half, Duration::from_secs(1)),
        Heard::Closed(_)
    ));
}

#[test]
fn sigterm_closes_requests_still_in_flight_at_the_shutdown_deadline() {
    // An upstream that accepts and never answers: a proxied request stays in flight.
    // (sluice's endpoints stay on the main listener, so its /healthz is not proxied.)
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || {
        let held: Vec<TcpStream> = upstream.incoming().take(1).filter_map(Result::ok).collect();
        std::thread::sleep(Duration::from_secs(20));
        drop(held);
    });
    let mut s = Server::start(&format!(
        "http: {{shutdown_timeout_ms: 700}}\n{LIMITS}proxy: {{upstream: 'http://127.0.0.1:{upstream_port}', sluice_endpoints: main}}\n"
    ));
    let mut in_flight = connect(s.port);
    in_flight
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let took = terminate(&mut s);
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(4),
        "exited {took:?} after SIGTERM; the deadline is 700 ms\n{}",
        s.stderr()
    );
    assert!(
        s.stderr().contains("shutdown deadline passed"),
        "{}",
        s.stderr()
    );
    drop(accepted);
}

#[test]
fn a_silent_connection_to_the_envoy_port_is_closed_and_does_not_block_shutdown() {
    let grpc_port = free_port();
    let mut s = Server::start(&format!(
        "http: {{header_read_timeout_ms: 400, idle_timeout_ms: 60000, shutdown_timeout_ms: 20000}}\n{LIMITS}\
         envoy:\n  listen: 127.0.0.1:{grpc_port}\n  domains:\n    - domain: edge\n      descriptors:\n        - key: k\n          rate_limit: {{unit: minute, requests_per_unit: 3}}\n"
    ));
    let mut silent = connect(grpc_port);
    assert_closed_between(
        until_closed(&mut silent, Duration::from_secs(5)),
        Duration::from_millis(250),
        Duration::from_secs(3),
        "a TCP connection to the Envoy port that never sends the HTTP/2 preface",
    );
    // Another one held at SIGTERM does not hold the process for the deadline.
    let _held = connect(grpc_port);
    let mut half = connect(grpc_port);
    half.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let took = terminate(&mut s);
    assert!(
        took < Duration::from_secs(3),
        "took {took:?}\n{}",
        s.stderr()
    );
}

/// An HTTP/2 connection to the Envoy port, driven on the current runtime.
async fn h2_connect(port: u16) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the Envoy port");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The head of a `ShouldRateLimit` call.
fn should_rate_limit() -> http::Request<()> {
    http::Request::post("http://sluice/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request head")
}

/// A gRPC message frame's 5-byte prefix announcing `len` bytes.
fn grpc_prefix(len: u32) -> bytes::Bytes {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&len.to_be_bytes());
    bytes::Bytes::from(prefix)
}

/// The call's `grpc-status`, from a trailers-only answer or from its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> (u32, String) {
    let response = response.await.expect("an answer");
    let read = |headers: &http::HeaderMap| {
        let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some((code, message))
    };
    if let Some(status) = read(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.expect("the answer's body");
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    read(&trailers).expect("grpc-status in the trailers")
}

/// A call whose message never finishes arriving is ended with `DEADLINE_EXCEEDED` at
/// `http.body_read_timeout_ms` (a trickle does not extend it), a message over the cap is
/// refused as soon as its length is announced, and another client's call is answered
/// meanwhile. Before, such calls held what they sent and the connection indefinitely.
#[test]
fn an_envoy_call_whose_message_never_arrives_ends_at_the_body_deadline() {
    use prost::Message;
    let grpc_port = free_port();
    let _s = Server::start(&format!(
        "http: {{body_read_timeout_ms: 700, idle_timeout_ms: 60000}}\n{LIMITS}\
         envoy:\n  listen: 127.0.0.1:{grpc_port}\n  domains:\n    - domain: edge\n      descriptors:\n        - key: k\n          rate_limit: {{unit: minute, requests_per_unit: 3}}\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", grpc_port)).is_err() {
        assert!(Instant::now() < deadline, "the Envoy port never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut stalled = h2_connect(grpc_port).await;
        let started = Instant::now();
        let mut calls = Vec::new();
        for _ in 0..20 {
            let (response, mut send) = stalled
                .send_request(should_rate_limit(), false)
                .expect("open a stream");
            send.send_data(grpc_prefix(200 * 1024), false).expect("prefix");
            send.send_data(bytes::Bytes::from(vec![b'x'; 10_000]), false)
                .expect("part of the message");
            calls.push((response, send));
        }
        // Meanwhile a whole call on another connection is answered at once.
        let message = sluice_envoy::RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![sluice_envoy::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor {
                entries: vec![sluice_envoy::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry {
                    key: "k".into(),
                    value: "v".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut other = h2_connect(grpc_port).await;
        let (response, mut send) = other
            .send_request(should_rate_limit(), false)
            .expect("open a stream");
        let mut framed = grpc_prefix(message.len() as u32).to_vec();
        framed.extend_from_slice(&message);
        send.send_data(bytes::Bytes::from(framed), true).expect("message");
        let (code, message) = grpc_status(response).await;
        assert_eq!(code, 0, "a whole call is answered: {message}");
        assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());

        for (response, _send) in calls {
            let (code, message) = tokio::time::timeout(Duration::from_secs(5), grpc_status(response))
                .await
                .expect("the stalled call was ended");
            assert_eq!(code, 4, "DEADLINE_EXCEEDED: {message}");
            assert!(message.contains("body_read_timeout_ms"), "{message}");
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(650) && took < Duration::from_secs(3),
            "stalled calls ended after {took:?}, the deadline is 700 ms"
        );

        // Announcing more than the cap is refused without waiting for the bytes.
        let (response, mut send) = stalled
            .send_request(should_rate_limit(), false)
            .expect("the connection still takes calls");
        send.send_data(grpc_prefix(4 << 20), false).expect("prefix");
        let asked = Instant::now();
        let (code, message) = tokio::time::timeout(Duration::from_secs(5), grpc_status(response))
            .await
            .expect("answered");
        assert_eq!(code, 11, "OUT_OF_RANGE: {message}");
        assert!(message.contains("262144"), "the message names the cap: {message}");
        assert!(asked.elapsed() < Duration::from_millis(500), "{:?}", asked.elapsed());
    });
}

/// sluice serving an Envoy domain `edge` (descriptor `k`, 3 a minute) on a port of its
/// own, with `http` as the `http:` settings; the port is open when this returns.
fn envoy_server(http: &str) -> (Server, u16) {
    let grpc_port = free_port();
    let server = Server::start(&format!(
        "http: {{{http}}}\n{LIMITS}\
         envoy:\n  listen: 127.0.0.1:{grpc_port}\n  domains:\n    - domain: edge\n      descriptors:\n        - key: k\n          rate_limit: {{unit: minute, requests_per_unit: 3}}\n"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", grpc_port)).is_err() {
        assert!(Instant::now() < deadline, "the Envoy port never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, grpc_port)
}

/// A whole `ShouldRateLimit` message for domain `edge`, descriptor `k=v`, framed.
fn whole_call() -> bytes::Bytes {
    use prost::Message;
    use sluice_envoy::proto::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    let message = sluice_envoy::RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "k".into(),
                value: "v".into(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = grpc_prefix(message.len() as u32).to_vec();
    framed.extend_from_slice(&message);
    bytes::Bytes::from(framed)
}

/// A runtime for a test's HTTP/2 clients.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The client's `grpc-timeout` ends a call sooner than `http.body_read_timeout_ms`, and
/// a longer one is capped at it. This is how Envoy sends its own timeout (20 ms by default
/// on the rate limit filter), so sluice stops working on a call Envoy has given up on.
#[test]
fn an_envoy_call_ends_at_its_grpc_timeout_capped_at_the_body_deadline() {
    let (_s, port) = envoy_server("body_read_timeout_ms: 1500, idle_timeout_ms: 60000");
    client_runtime().block_on(async {
        let mut client = h2_connect(port).await;
        let stalled = |client: &mut h2::client::SendRequest<bytes::Bytes>, timeout: &str| {
            let mut head = should_rate_limit();
            head.headers_mut()
                .insert("grpc-timeout", timeout.parse().expect("header value"));
            let (response, mut send) = client.send_request(head, false).expect("open a stream");
            send.send_data(grpc_prefix(1000), false).expect("prefix");
            send.send_data(bytes::Bytes::from(vec![b'x'; 100]), false)
                .expect("part of the message");
            (response, send)
        };
        let started = Instant::now();
        let (soon, _keep_soon) = stalled(&mut client, "300m");
        let (late, _keep_late) = stalled(&mut client, "1H");

        // A whole call under a short grpc-timeout is answered as usual.
        let mut head = should_rate_limit();
        head.headers_mut()
            .insert("grpc-timeout", "300m".parse().expect("header value"));
        let (response, mut send) = client.send_request(head, false).expect("open a stream");
        send.send_data(whole_call(), true).expect("message");
        let (code, message) = grpc_status(response).await;
        assert_eq!(code, 0, "a whole call is answered: {message}");

        let (code, message) = tokio::time::timeout(Duration::from_secs(5), grpc_status(soon))
            .await
            .expect("the call was ended");
        let took = started.elapsed();
        assert_eq!(code, 4, "DEADLINE_EXCEEDED: {message}");
        assert!(message.contains("300%20ms"), "{message}");
        assert!(
            took >= Duration::from_millis(280) && took < Duration::from_millis(1200),
            "ended after {took:?}, its grpc-timeout is 300 ms"
        );

        let (code, message) = tokio::time::timeout(Duration::from_secs(5), grpc_status(late))
            .await
            .expect("the call was ended");
        let took = started.elapsed();
        assert_eq!(code, 4, "DEADLINE_EXCEEDED: {message}");
        assert!(message.contains("1500%20ms"), "{message}");
        assert!(
            took >= Duration::from_millis(1450) && took < Duration::from_secs(4),
            "ended after {took:?}, the bound is 1500 ms"
        );
    });
}

/// A client that never reads its answers (a zero flow-control window: the answer's
/// DATA can never be sent) is disconnected once a call has been in flight
/// `body_read_timeout_ms + header_read_timeout_ms`, while another client is served.
/// Before, the unsent answers kept the connection open past every timeout.
#[test]
fn an_envoy_client_that_never_reads_its_answers_is_closed_at_the_answer_deadline() {
    let (_s, port) = envoy_server(
        "body_read_timeout_ms: 700, header_read_timeout_ms: 1000, idle_timeout_ms: 60000",
    );
    client_runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the Envoy port");
        let (mut client, connection) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("h2 handshake");
        let driven = tokio::spawn(connection);
        let started = Instant::now();
        let mut answers = Vec::new();
        for _ in 0..10 {
            let (response, mut send) = client
                .send_request(should_rate_limit(), false)
                .expect("open a stream");
            send.send_data(whole_call(), true).expect("message");
            answers.push(response);
        }
        // The answers' heads arrive (HEADERS are not flow controlled); their DATA cannot.
        // The answers are kept: dropping one would reset its stream.
        let mut unread = Vec::new();
        for response in answers {
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("an answer's head")
                .expect("an answer");
            assert_eq!(response.status(), 200);
            assert!(response.headers().get("grpc-status").is_none());
            unread.push(response);
        }

        // Meanwhile a call on another connection is answered at once.
        let mut other = h2_connect(port).await;
        let (response, mut send) = other
            .send_request(should_rate_limit(), false)
            .expect("open a stream");
        send.send_data(whole_call(), true).expect("message");
        let (code, message) = grpc_status(response).await;
        assert_eq!(code, 0, "another client's call is answered: {message}");

        let ended = tokio::time::timeout(Duration::from_secs(8), driven).await;
        let took = started.elapsed();
        assert!(
            ended.is_ok(),
            "the connection was still open after {took:?}"
        );
        assert!(
            took >= Duration::from_millis(1600) && took < Duration::from_secs(4),
            "closed after {took:?}, the answer deadline is 1.7 s"
        );
    });
}

#[test]
fn the_authorization_scheme_is_case_insensitive() {
    let s = Server::standard();
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = common::agent()
            .get(s.url("/v1/status"))
            .header("authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "scheme {scheme:?}");
    }
    for value in [
        format!("Basic {ADMIN_TOKEN}"),
        format!("Bearer{ADMIN_TOKEN}"),
        "Bearer ".to_string(),
    ] {
        let r = common::agent()
            .get(s.url("/v1/status"))
            .header("authorization", &value)
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "Authorization: {value:?}");
    }
}
