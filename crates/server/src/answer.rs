//! The decision API's answer: one JSON result per window (`/v1/check`, and the admin
//! state read), with every time in milliseconds rounded up.
//!
//! `/v1/check` writes its answer with [`write_decision`] rather than through serde: the
//! answer is sluice's hottest output, and serde_json escapes every field name byte by
//! byte, which cost as much as the decision itself. The serde types below remain the
//! definition of the shape (the other answers use them), and a test holds the two to
//! the same bytes.

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde::Serialize;
use sluice_engine::{Decision, DecisionRequest, millis_ceil};

#[cfg(test)]
#[derive(Serialize)]
struct DecisionBody<'a> {
    allowed: bool,
    retry_after_ms: Option<u64>,
    degraded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    listed: Option<ListedBody<'a>>,
    results: Vec<ResultBody<'a>>,
}

/// A block or allow entry that decided the request, as the decision API shows it.
#[derive(Serialize)]
pub struct ListedBody<'a> {
    /// `block` or `allow`.
    list: &'static str,
    reason: Option<&'a str>,
    expires_at_ms: Option<u64>,
}

/// What the decision API says of a block or allow entry that decided `decision`.
pub fn listed_body(decision: &Decision) -> Option<ListedBody<'_>> {
    decision.listed.as_ref().map(|listed| ListedBody {
        list: if listed.blocked { "block" } else { "allow" },
        reason: listed.reason.as_deref(),
        expires_at_ms: listed.expires_at_ms,
    })
}

/// One window's result as `/v1/check` shows it.
#[derive(Serialize)]
pub struct ResultBody<'a> {
    limit: &'a str,
    key: &'a str,
    rate: &'a str,
    allowed: bool,
    limit_value: u64,
    remaining: u64,
    reset_after_ms: u64,
    retry_after_ms: Option<u64>,
    shadow: bool,
    /// The plan whose rates decided, when not the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
}

/// One JSON result per window of `decision`, in order.
pub fn result_bodies<'a>(request: &'a DecisionRequest, decision: &Decision) -> Vec<ResultBody<'a>> {
    decision
        .results
        .iter()
        .map(|r| {
            let check = &request.checks[r.check];
            let window = &check.limit().windows()[r.window];
            ResultBody {
                limit: check.limit().name(),
                key: check.key(),
                rate: &window.rate_text,
                allowed: r.allowed,
                limit_value: r.limit_value,
                remaining: r.remaining,
                reset_after_ms: millis_ceil(r.reset_after),
                retry_after_ms: r.retry_after.map(millis_ceil),
                shadow: r.shadow,
                plan: check.limit().plan(),
            }
        })
        .collect()
}

/// Renders a decision as the decision API's JSON (docs/design/front-doors.md), one
/// result per window.
pub fn decision_json(request: &DecisionRequest, decision: &Decision) -> Response {
    let mut body = Vec::with_capacity(96 + 224 * decision.results.len());
    write_decision(&mut body, request, decision);
    // Built directly: a `(status, headers, Vec)` tuple would set an octet-stream
    // content type and then replace it, two header writes per answer.
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Writes the bytes serde_json would write for the decision API's answer (see the
/// module docs for why by hand).
fn write_decision(out: &mut Vec<u8>, request: &DecisionRequest, decision: &Decision) {
    out.extend_from_slice(b"{\"allowed\":");
    write_bool(out, decision.allowed);
    out.extend_from_slice(b",\"retry_after_ms\":");
    write_optional_u64(out, decision.retry_after.map(millis_ceil));
    out.extend_from_slice(b",\"degraded\":");
    write_bool(out, decision.degraded);
    if let Some(listed) = listed_body(decision) {
        out.extend_from_slice(b",\"listed\":");
        // Rare (a block or allow entry decided): serde is fast enough here.
        if serde_json::to_writer(&mut *out, &listed).is_err() {
            out.extend_from_slice(b"null");
        }
    }
    out.extend_from_slice(b",\"results\":[");
    for (n, r) in decision.results.iter().enumerate() {
        let check = &request.checks[r.check];
        let limit = check.limit();
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"limit\":");
        write_str(out, limit.name());
        out.extend_from_slice(b",\"key\":");
        write_str(out, check.key());
        out.extend_from_slice(b",\"rate\":");
        write_str(out, &limit.windows()[r.window].rate_text);
        out.extend_from_slice(b",\"allowed\":");
        write_bool(out, r.allowed);
        out.extend_from_slice(b",\"limit_value\":");
        write_u64(out, r.limit_value);
        out.extend_from_slice(b",\"remaining\":");
        write_u64(out, r.remaining);
        out.extend_from_slice(b",\"reset_after_ms\":");
        write_u64(out, millis_ceil(r.reset_after));
        out.extend_from_slice(b",\"retry_after_ms\":");
        write_optional_u64(out, r.retry_after.map(millis_ceil));
        out.extend_from_slice(b",\"shadow\":");
        write_bool(out, r.shadow);
        if let Some(plan) = limit.plan() {
            out.extend_from_slice(b",\"plan\":");
            write_str(out, plan);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

fn write_bool(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(if value { b"true" } else { b"false" });
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn write_optional_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => write_u64(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string. Names, keys and rates rarely need escaping: those that do (a key may
/// hold any character a client sent) go through serde_json.
fn write_str(out: &mut Vec<u8>, value: &str) {
    let plain = value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, value).is_err() {
        // Writing to a Vec cannot fail; never answer with half a string.
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_engine::{Check, Limit, LimitSpec, Listed, WindowResult};

    use super::*;

    /// The bytes serde writes for the same answer: the shape's definition.
    fn by_serde(request: &DecisionRequest, decision: &Decision) -> Vec<u8> {
        serde_json::to_vec(&DecisionBody {
            allowed: decision.allowed,
            retry_after_ms: decision.retry_after.map(millis_ceil),
            degraded: decision.degraded,
            listed: listed_body(decision),
            results: result_bodies(request, decision),
        })
        .expect("serialises")
    }

    fn result(check: usize, window: usize, allowed: bool) -> WindowResult {
        WindowResult {
            check,
            window,
            allowed,
            shadow: !allowed && check == 1,
            limit_value: 100,
            remaining: if allowed { 41 } else { 0 },
            reset_after: 1_500_001,
            retry_after: (!allowed).then_some(999),
        }
    }

    #[test]
    fn the_hand_written_answer_is_byte_for_byte_what_serde_writes() {
        let rates = |text: &str| {
            text.split(',')
                .map(|r| r.trim().parse().expect("rate"))
                .collect()
        };
        let plain = Limit::new("api", LimitSpec::new(rates("100/second, 1000/hour"))).unwrap();
        let planned = Limit::new("per_user", LimitSpec::new(rates("5/minute")))
            .unwrap()
            .with_plans([(
                "pro".to_string(),
                Limit::new("x", LimitSpec::new(rates("50/minute"))).unwrap(),
            )])
            .unwrap();
        let pro = Arc::clone(&planned.plans()[0]);
        let plain = Arc::new(plain);
        // Keys with every kind of character a client may send: quotes, backslashes,
        // control characters, DEL, and multi-byte UTF-8.
        let keys = [
            "k1",
            "say \"hi\"",
            "back\\slash",
            "nul\u{0}tab\tnewline\n",
            "del\u{7f}",
            "ünïcödé ✓",
        ];
        for key in keys {
            let request = DecisionRequest {
                checks: vec![
                    Check::new(Arc::clone(&plain), key, 1).unwrap(),
                    Check::new(Arc::clone(&pro), "user-7", 3).unwrap(),
                ],
                dry_run: false,
            };
            let decisions = [
                Decision {
                    allowed: true,
                    retry_after: None,
                    degraded: false,
                    results: vec![result(0, 0, true), result(0, 1, true), result(1, 0, true)],
                    listed: None,
                },
                Decision {
                    allowed: false,
                    retry_after: Some(1_234),
                    degraded: true,
                    results: vec![result(0, 1, false), result(1, 0, false)],
                    listed: None,
                },
                Decision {
                    allowed: false,
                    retry_after: None,
                    degraded: false,
                    results: vec![],
                    listed: Some(Listed {
                        blocked: true,
                        reason: Some(format!("abuse \"{key}\"")),
                        expires_at_ms: Some(1_700_000_000_000),
                    }),
                },
            ];
            for decision in &decisions {
                let mut ours = Vec::new();
                write_decision(&mut ours, &request, decision);
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(by_serde(&request, decision)).unwrap(),
                    "key {key:?}"
                );
            }
        }
    }
}
