//! A deadline on every Envoy call, from its HEADERS to its answer.
//!
//! hyper hands an HTTP/2 request to tonic as soon as its HEADERS arrive, and tonic then
//! waits for the message (and for the end of the stream after it) with no limit of its
//! own; the serving loop's header and idle deadlines stand aside while a call is in
//! flight. A client could open every stream a connection allows, announce a large
//! message on each, send part of it and never finish, holding what it sent and the
//! connection for as long as it liked (found by review). So the whole call (reading
//! the message, deciding, building the answer) runs under one deadline: the client's
//! `grpc-timeout` when it sends one, never more than `http.body_read_timeout_ms`. The
//! deadline is fixed at the call's start, so trickling the message does not extend it.
//! When it passes, the call is dropped, which frees whatever tonic had buffered and
//! resets the client's half of the stream, and the answer is `DEADLINE_EXCEEDED`
//! (trailers only, which HTTP/2 flow control cannot hold back).
//!
//! Why not a ready-made layer: tonic's `Server::timeout` (which honours `grpc-timeout`)
//! lives in its transport server, which sluice does not use (the serving loop in
//! `sluice_runtime::serve` is what bounds connections), and its middleware is private;
//! `tower::timeout` has one fixed duration (no `grpc-timeout`, no reload of
//! `http.body_read_timeout_ms`) and fails with an error rather than a gRPC answer;
//! tower-http's body timeout restarts at each frame, so a trickle would extend it.

use std::future::Future;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;

/// How long a call may take: the client's `grpc-timeout`, capped at `bound`
/// (`http.body_read_timeout_ms`). A missing or malformed `grpc-timeout` gives `bound`,
/// as tonic's own server does: a client's bad header should not cost it its call.
pub fn call_timeout(headers: &HeaderMap, bound: Duration) -> Duration {
    headers
        .get("grpc-timeout")
        .and_then(|value| parse_grpc_timeout(value.as_bytes()))
        .map_or(bound, |asked| asked.min(bound))
}

/// A `grpc-timeout` value (gRPC over HTTP/2: at most 8 ASCII digits, then one of
/// `H M S m u n`), or `None` if it is not one.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow, even in hours.
    let n = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs `call`, or answers `DEADLINE_EXCEEDED` (naming `timeout` and `bound`) if it has
/// not finished within `timeout`. The call's future is dropped then, with the request
/// body and everything read from it.
pub async fn within(
    timeout: Duration,
    bound: Duration,
    call: impl Future<Output = Response>,
) -> Response {
    match tokio::time::timeout(timeout, call).await {
        Ok(response) => response,
        Err(_) => {
            let status = tonic::Status::deadline_exceeded(format!(
                "the call did not finish within {} ms (the client's grpc-timeout, at most http.body_read_timeout_ms = {} ms): its message did not arrive whole in time, or the decision took that long",
                timeout.as_millis(),
                bound.as_millis()
            ));
            status.into_http::<axum::body::Body>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use axum::response::IntoResponse;

    #[test]
    fn grpc_timeout_values_parse_as_the_spec_says() {
        let ms = Duration::from_millis;
        assert_eq!(parse_grpc_timeout(b"20m"), Some(ms(20)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(ms(3000)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(ms(120_000)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(ms(3_600_000)));
        assert_eq!(
            parse_grpc_timeout(b"1500u"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(parse_grpc_timeout(b"7n"), Some(Duration::from_nanos(7)));
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            &b""[..],
            b"m",
            b"20",
            b"20x",
            b"-1m",
            b"1.5S",
            b"123456789m",
            b" 20m",
            "2\u{661}m".as_bytes(),
        ] {
            assert_eq!(
                parse_grpc_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_clients_grpc_timeout_is_honoured_up_to_the_bound() {
        let bound = Duration::from_secs(10);
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_static(value));
            call_timeout(&headers, bound)
        };
        assert_eq!(call_timeout(&HeaderMap::new(), bound), bound);
        assert_eq!(with("20m"), Duration::from_millis(20));
        assert_eq!(with("1H"), bound);
        assert_eq!(with("soon"), bound);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_time_is_answered_unchanged() {
        let second = Duration::from_secs(1);
        let response = within(second, second, async { "answer".into_response() }).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("grpc-status").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_its_deadline_is_dropped_and_answered_deadline_exceeded() {
        // Dropped with the call: stands for the request body and what was read of it.
        struct Held(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Held {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = Held(std::sync::Arc::clone(&dropped));
        let started = tokio::time::Instant::now();
        let call = async move {
            let _held = held;
            tokio::time::sleep(Duration::from_secs(60)).await;
            "too late".into_response()
        };
        let response = within(Duration::from_millis(500), Duration::from_secs(10), call).await;
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(response.headers()["grpc-status"], "4");
        let message = response.headers()["grpc-message"].to_str().expect("ASCII");
        assert!(message.contains("500"), "{message}");
        assert!(message.contains("body_read_timeout_ms"), "{message}");
    }
}
