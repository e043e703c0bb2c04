//! Reading what a client sent to sluice's own JSON endpoints (`/v1/check`, the admin
//! calls; the bounded body readers also serve the proxy's metered routes): the body within its size cap, costs, limit names and keys. Each mistake is a
//! 400 whose `error` code names its kind and whose `message` names the field and the fix.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::Poll;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sluice_engine::{Check, Limit, LimitSet, MAX_KEY_BYTES};

use sluice_runtime::Live;

use crate::error::ApiError;

/// How much of a rejected body is read and discarded before answering, so a client
/// that is still writing sees the 400 instead of a reset connection.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

/// Reads and discards up to `limit` more bytes; true when the body ended.
async fn drain(mut body: Body, limit: usize) -> bool {
    use http_body_util::BodyExt;
    let mut seen = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                seen += frame.data_ref().map_or(0, |d| d.len());
                if seen > limit {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Why a body could not be collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Larger than the cap; `read_to_end`: the rest was drained, so the connection can
    /// carry another request.
    TooLarge { read_to_end: bool },
    /// Cut short or badly framed (a bad chunk, fewer bytes than `Content-Length`):
    /// the connection cannot carry another request.
    Broken,
}

impl BodyError {
    /// The answer: `too_large` for an oversized body, a `400 invalid_body` otherwise.
    pub(crate) fn answer(self, too_large: impl FnOnce() -> ApiError) -> ApiError {
        match self {
            BodyError::TooLarge { read_to_end } => too_large().closing_unless(read_to_end),
            BodyError::Broken => ApiError::bad_request(
                "invalid_body",
                "the request body ended early or its framing is broken (a bad chunk, or fewer bytes than Content-Length says); send the whole body, framed by Content-Length or valid chunked encoding",
            )
            .closing_unless(false),
        }
    }
}

/// Whether the client waits for `100 Continue` before it sends its body. Refusing such
/// a request before reading the body spares it the upload, and reading the body is
/// what would make hyper send `100 Continue`.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// Collects a body of at most `max` bytes (see [`collect_limited`]), refusing one whose
/// `Content-Length` is already over without collecting it: a client waiting for `100
/// Continue` is not invited to upload, and from any other a small rest is drained so
/// that it sees the answer rather than a reset. Callers bound it with their body
/// timeout, drain included.
pub(crate) async fn collect_capped(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        let read_to_end = !expects_continue(headers)
            && declared.is_some_and(|len| len <= DRAIN_LIMIT as u64)
            && drain(body, DRAIN_LIMIT).await;
        return Err(BodyError::TooLarge { read_to_end });
    }
    collect_limited(body, max).await
}

/// Collects at most `max` bytes; on overflow, drains a bounded amount more (see
/// [`BodyError`]). A body that arrives in one frame (a small one sent with its head)
/// is returned as that frame, without a copy.
async fn collect_limited(mut body: Body, max: usize) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    // The body while it is one frame; copied into `joined` once a second one comes.
    let mut whole = Bytes::new();
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(BodyError::Broken);
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let held = joined.as_ref().map_or(whole.len(), Vec::len);
        if held + data.len() > max {
            return Err(BodyError::TooLarge {
                read_to_end: drain(body, DRAIN_LIMIT).await,
            });
        }
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if whole.is_empty() => whole = data,
            None => joined = Some([&whole[..], &data[..]].concat()),
        }
    }
    Ok(joined.map_or(whole, Bytes::from))
}

/// Reads a JSON body within `http.body_read_timeout_ms` and `http.max_body_bytes` and
/// parses it (see [`read_body`] and [`parse_json`]).
pub async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    live: &Live,
    shape: &str,
) -> Result<T, ApiError> {
    parse_json(&read_body(headers, body, live).await?, shape)
}

/// Reads a JSON body within `http.body_read_timeout_ms` and `http.max_body_bytes`
/// (see [`read_body_unbounded`]), for [`parse_json`] to parse in place. A client that
/// sends its head and then trickles the body gets `408 request_timeout` and the
/// connection is closed, so it cannot hold a connection and a serving slot for as long
/// as it likes.
pub async fn read_body(headers: &HeaderMap, body: Body, live: &Live) -> Result<Bytes, ApiError> {
    let mut read = std::pin::pin!(read_body_unbounded(headers, body, live.max_body_bytes));
    // A body small enough to arrive with its head is read without arming a timer (a
    // timer entry per request costs as much as parsing it); the clock starts only if
    // the first look does not find the whole body.
    let first_look = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first_look {
        return result;
    }
    match tokio::time::timeout(live.body_read_timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms (http.body_read_timeout_ms); send the whole body at once",
                live.body_read_timeout.as_millis()
            ),
        )
        .closing_unless(false)),
    }
}

/// Reads a JSON body's bytes: checks the content type and the size cap.
async fn read_body_unbounded(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
) -> Result<Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        let got = if content_type.is_empty() {
            "none".to_string()
        } else {
            format!("{content_type:?}")
        };
        let error = ApiError::bad_request(
            "unsupported_media_type",
            format!(
                "Content-Type must be application/json (got {got}); send the header Content-Type: application/json"
            ),
        );
        return Err(error.closing_unless(drain(body, DRAIN_LIMIT).await));
    }
    collect_capped(headers, body, max_bytes)
        .await
        .map_err(|error| {
            error.answer(|| {
                ApiError::bad_request(
                    "body_too_large",
                    format!(
                        "the request body is larger than {max_bytes} bytes; send fewer checks or shorter keys"
                    ),
                )
            })
        })
}

/// Parses a JSON body read by [`read_body`]; `T` may borrow strings from it. `shape` is
/// the expected body, quoted when the body does not fit it.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => {
                ApiError::bad_request("invalid_request", format!("{error}; expected {shape}"))
            }
            _ => ApiError::bad_request(
                "invalid_json",
                format!("the body is not valid JSON: {error}; expected {shape}"),
            ),
        }
    })
}

/// Reads a cost: a whole number ≥ 0 (`2.0` counts as whole), or the default when absent.
pub fn parse_cost(
    value: Option<&Value>,
    default: u64,
    field: impl fmt::Display,
) -> Result<u64, ApiError> {
    let invalid = |what: String| {
        ApiError::bad_request(
            "invalid_cost",
            format!("{field} is {what}; cost must be a whole number ≥ 0, e.g. 1"),
        )
    };
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            if let Some(cost) = n.as_u64() {
                Ok(cost)
            } else if n.as_i64().is_some() {
                Err(invalid(format!("negative ({n})")))
            } else {
                // Not a u64 or an i64: a float, or an integer beyond 64 bits that JSON
                // parsing turned into one. Floats are exact up to 2^53; past that a
                // whole-looking float may not be the number that was written.
                const EXACT: f64 = (1u64 << 53) as f64;
                match n.as_f64() {
                    Some(f) if f < 0.0 => Err(invalid(format!("negative ({n})"))),
                    Some(f) if f > EXACT => Err(invalid(format!(
                        "too large ({n}): the largest cost is {}",
                        u64::MAX
                    ))),
                    Some(f) if f.fract() == 0.0 => Ok(f as u64),
                    _ => Err(invalid(format!("not a whole number ({n})"))),
                }
            }
        }
        Some(other) => Err(invalid(format!(
            "{} rather than a number",
            json_type(other)
        ))),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Resolves a limit name, or says which exist.
pub fn find_limit<'a>(
    limits: &'a LimitSet,
    name: &str,
    field: impl fmt::Display,
) -> Result<&'a Arc<Limit>, ApiError> {
    limits.get(name).ok_or_else(|| {
        let known: Vec<&str> = limits.iter().map(|l| l.name()).collect();
        ApiError::bad_request(
            "unknown_limit",
            format!(
                "{field}: no limit named {name:?} is configured; configured limits: {}",
                known.join(", ")
            ),
        )
    })
}

/// Reads a key: a non-empty string of at most [`MAX_KEY_BYTES`] bytes.
pub fn parse_key(value: Value, field: impl fmt::Display) -> Result<String, ApiError> {
    match value {
        Value::String(key) => {
            check_key_text(&key, field)?;
            Ok(key)
        }
        other => Err(not_a_string_key(json_type(&other), field)),
    }
}

/// Reads a check's key as parsed in place ([`JsonKey`]), with [`parse_key`]'s rules.
pub fn parse_json_key(
    key: JsonKey<'_>,
    field: impl fmt::Display,
) -> Result<Cow<'_, str>, ApiError> {
    match key {
        JsonKey::Text(text) => {
            check_key_text(&text, field)?;
            Ok(text)
        }
        JsonKey::Not(kind) => Err(not_a_string_key(kind, field)),
    }
}

fn check_key_text(key: &str, field: impl fmt::Display) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::bad_request("invalid_key", format!("{field}: {why}"));
    if key.is_empty() {
        return Err(invalid(
            "key is empty: give each check a non-empty key such as \"user:42\"".into(),
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "key is {} bytes long: keys may be at most {MAX_KEY_BYTES} bytes; hash long identifiers first",
            key.len()
        )));
    }
    Ok(())
}

fn not_a_string_key(kind: &str, field: impl fmt::Display) -> ApiError {
    ApiError::bad_request(
        "invalid_key",
        format!("{field} is {kind} rather than a string; keys are strings such as \"user:42\""),
    )
}

/// A check's `key` as parsed from the body: its text, borrowed from the body unless it
/// has escapes, or the JSON type sent instead ([`parse_json_key`] refuses those with
/// the same answer as [`parse_key`]). Parsing into a [`Value`] would copy every key.
#[derive(Debug)]
pub enum JsonKey<'a> {
    /// A JSON string.
    Text(Cow<'a, str>),
    /// Another JSON type: `"a number"`, `"null"`, ...
    Not(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonKey<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonKeyVisitor(std::marker::PhantomData))
    }
}

struct JsonKeyVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> serde::de::Visitor<'de> for JsonKeyVisitor<'a> {
    type Value = JsonKey<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Text(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Text(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Text(Cow::Owned(v)))
    }
    fn visit_bool<E>(self, _: bool) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Not("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Not("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Not("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Not("a number"))
    }
    fn visit_unit<E>(self) -> Result<JsonKey<'a>, E> {
        Ok(JsonKey::Not("null"))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonKey<'a>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(JsonKey::Not("an array"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonKey<'a>, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(JsonKey::Not("an object"))
    }
}

/// Builds a check, turning key problems into `invalid_key`. Its key is trusted (allow
/// entries may match it): the decision API's caller is the application, which chose
/// the key itself (see `Check::key_is_trusted`).
pub fn make_check(
    limit: Arc<Limit>,
    key: impl Into<compact_str::CompactString>,
    cost: u64,
    field: impl fmt::Display,
) -> Result<Check, ApiError> {
    Check::new(limit, key, cost)
        .map(|check| check.with_trusted_key(true))
        .map_err(|error| ApiError::bad_request("invalid_key", format!("{field}: {error}")))
}

/// The name of field `name` of the check at `index` (`checks[2].key`) in an error,
/// formatted only when one is reported.
#[derive(Debug, Clone, Copy)]
pub struct CheckField {
    /// The check's index in `checks`.
    pub index: usize,
    /// The field's name.
    pub name: &'static str,
}

impl fmt::Display for CheckField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "checks[{}].{}", self.index, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::Context;

    /// A body that yields the given chunks as separate frames.
    struct Frames(VecDeque<&'static [u8]>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.0
                    .pop_front()
                    .map(|chunk| Ok(http_body::Frame::data(Bytes::from_static(chunk)))),
            )
        }
    }

    fn body(chunks: &[&'static [u8]]) -> Body {
        Body::new(Frames(chunks.iter().copied().collect()))
    }

    #[tokio::test]
    async fn a_body_is_collected_whole_from_one_frame_or_many() {
        let one = collect_limited(body(&[b"{\"checks\":[]}"]), 100).await;
        assert_eq!(one.as_deref(), Ok(&b"{\"checks\":[]}"[..]));
        let many = collect_limited(body(&[b"{\"che", b"cks\"", b":[]}"]), 100).await;
        assert_eq!(many.as_deref(), Ok(&b"{\"checks\":[]}"[..]));
        let none = collect_limited(body(&[]), 100).await;
        assert_eq!(none.as_deref(), Ok(&b""[..]));
    }

    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        key: JsonKey<'a>,
        after: u8,
    }

    fn key_of(json: &str) -> (Result<String, String>, bool) {
        let item: Item = serde_json::from_str(json).expect("parses");
        assert_eq!(item.after, 7, "the rest of {json} parsed");
        let borrowed = matches!(item.key, JsonKey::Text(Cow::Borrowed(_)));
        let key = parse_json_key(item.key, "checks[0].key")
            .map(Cow::into_owned)
            .map_err(|error| format!("{error:?}"));
        (key, borrowed)
    }

    #[test]
    fn a_key_is_read_in_place_and_anything_but_a_string_is_refused_by_its_type() {
        assert_eq!(
            key_of(r#"{"key":"user:42","after":7}"#),
            (Ok("user:42".into()), true)
        );
        assert_eq!(
            key_of(r#"{"key":"a\"b","after":7}"#),
            (Ok("a\"b".into()), false)
        );
        for (json, kind) in [
            ("1", "a number"),
            ("-1", "a number"),
            ("1.5", "a number"),
            ("null", "null"),
            ("true", "a boolean"),
            (r#"[1,[2,{"x":3}]]"#, "an array"),
            (r#"{"a":[1,2],"b":{"c":null}}"#, "an object"),
        ] {
            let (key, _) = key_of(&format!(r#"{{"key":{json},"after":7}}"#));
            let error = key.expect_err(json);
            assert!(
                error.contains(&format!("checks[0].key is {kind} rather than a string")),
                "{json}: {error}"
            );
        }
        let (empty, _) = key_of(r#"{"key":"","after":7}"#);
        assert!(empty.expect_err("empty").contains("key is empty"));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_in_one_frame_or_many() {
        assert!(collect_limited(body(&[b"0123456789"]), 9).await.is_err());
        assert!(
            collect_limited(body(&[b"01234", b"56789"]), 9)
                .await
                .is_err()
        );
        assert!(
            collect_limited(body(&[b"0123", b"4567", b"89"]), 9)
                .await
                .is_err()
        );
        assert!(
            collect_limited(body(&[b"0123", b"4567", b"8"]), 9)
                .await
                .is_ok()
        );
    }
}
