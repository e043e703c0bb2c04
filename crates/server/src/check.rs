//! `POST /v1/check`: the JSON decision API (docs/design/front-doors.md, "Decision API").
//!
//! Every malformed request is a 400 whose `error` code says what kind of mistake it
//! is and whose `message` names the field and how to fix it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_engine::{Check, CheckError, Decision, DecisionRequest, LimitSet, Micros};

use crate::error::{ApiError, json_response};
use sluice_runtime::AppState;

pub use sluice_runtime::MAX_CHECKS;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    checks: Vec<CheckItem>,
    #[serde(default)]
    cost: Option<Value>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckItem {
    limit: String,
    key: Value,
    #[serde(default)]
    cost: Option<Value>,
}

#[derive(Serialize)]
struct DecisionBody<'a> {
    allowed: bool,
    retry_after_ms: Option<u64>,
    degraded: bool,
    results: Vec<ResultBody<'a>>,
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
}

/// Microseconds to whole milliseconds, rounded up so waiting that long is always enough.
pub fn millis_ceil(micros: Micros) -> u64 {
    (micros.max(0) as u64).div_ceil(1_000)
}

/// How much of a rejected body is read and discarded before answering, so a client
/// that is still writing sees the 400 instead of a reset connection.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

/// The request shape `POST /v1/check` expects, quoted in its errors.
pub const CHECK_SHAPE: &str =
    r#"{"checks": [{"limit": "<name>", "key": "<key>", "cost": 1}], "cost": 1, "dry_run": false}"#;

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

/// Collects at most `max` bytes; on overflow, drains a bounded amount more and says
/// whether the body was read to its end.
async fn collect_limited(mut body: Body, max: usize) -> Result<Vec<u8>, bool> {
    use http_body_util::BodyExt;
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(false);
        };
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > max {
                return Err(drain(body, DRAIN_LIMIT).await);
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(bytes)
}

/// Reads a JSON body: checks the content type and the size cap, then parses it.
/// `shape` is the expected body, quoted when the body does not fit it.
pub async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
    shape: &str,
) -> Result<T, ApiError> {
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
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        ApiError::bad_request(
            "body_too_large",
            format!(
                "the request body is larger than {max_bytes} bytes; send fewer checks or shorter keys"
            ),
        )
    };
    if declared.is_some_and(|len| len > max_bytes as u64) {
        let read_to_end =
            declared.is_some_and(|len| len <= DRAIN_LIMIT as u64) && drain(body, DRAIN_LIMIT).await;
        return Err(too_large().closing_unless(read_to_end));
    }
    let bytes = collect_limited(body, max_bytes)
        .await
        .map_err(|read_to_end| too_large().closing_unless(read_to_end))?;
    serde_json::from_slice(&bytes).map_err(|error| {
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
pub fn parse_cost(value: Option<&Value>, default: u64, field: &str) -> Result<u64, ApiError> {
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
    field: &str,
) -> Result<&'a Arc<sluice_engine::Limit>, ApiError> {
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

/// Reads a key: a non-empty string of at most 512 bytes.
pub fn parse_key(value: Value, field: &str) -> Result<String, ApiError> {
    match value {
        Value::String(key) => Ok(key),
        other => Err(ApiError::bad_request(
            "invalid_key",
            format!(
                "{field} is {} rather than a string; keys are strings such as \"user:42\"",
                json_type(&other)
            ),
        )),
    }
}

/// Builds a check, turning key problems into `invalid_key`.
pub fn make_check(
    limit: Arc<sluice_engine::Limit>,
    key: String,
    cost: u64,
    field: &str,
) -> Result<Check, ApiError> {
    Check::new(limit, key, cost).map_err(|error: CheckError| {
        ApiError::bad_request("invalid_key", format!("{field}: {error}"))
    })
}

fn build_request(limits: &LimitSet, body: CheckBody) -> Result<DecisionRequest, ApiError> {
    if body.checks.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "checks is empty; give at least one {\"limit\": \"<name>\", \"key\": \"<key>\"}",
        ));
    }
    if body.checks.len() > MAX_CHECKS {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "checks has {} entries; at most {MAX_CHECKS} are decided together",
                body.checks.len()
            ),
        ));
    }
    let default_cost = parse_cost(body.cost.as_ref(), 1, "cost")?;
    let checks = body
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            // Field names are only formatted when a check is rejected.
            let field = |name: &str| format!("checks[{i}].{name}");
            let limit = limits
                .get(&item.limit)
                .map_or_else(|| find_limit(limits, &item.limit, &field("limit")), Ok)?;
            let cost = match &item.cost {
                None => default_cost,
                cost => parse_cost(cost.as_ref(), default_cost, &field("cost"))?,
            };
            let key = match item.key {
                Value::String(key) => key,
                other => parse_key(other, &field("key"))?,
            };
            Check::new(Arc::clone(limit), key, cost).map_err(|error| {
                ApiError::bad_request("invalid_key", format!("{}: {error}", field("key")))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DecisionRequest {
        checks,
        dry_run: body.dry_run,
    })
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
            }
        })
        .collect()
}

/// Renders a decision as the decision API's JSON (docs/design/front-doors.md), one
/// result per window.
pub fn decision_json(request: &DecisionRequest, decision: &Decision) -> Response {
    let results = result_bodies(request, decision);
    json_response(
        StatusCode::OK,
        &DecisionBody {
            allowed: decision.allowed,
            retry_after_ms: decision.retry_after.map(millis_ceil),
            degraded: decision.degraded,
            results,
        },
    )
}

/// `POST /v1/check`.
pub async fn check(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let live = app.live();
    let body: CheckBody = match read_json(&headers, body, live.max_body_bytes, CHECK_SHAPE).await {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    let request = match build_request(&live.limits, body) {
        Ok(request) => request,
        Err(error) => return error.into_response(),
    };
    match app.decider.decide(&request).await {
        Ok(decision) => decision_json(&request, &decision),
        // The decider logged the store's error; its text (addresses, DSNs) stays out of answers.
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the counter store could not decide; see sluice's log",
        )
        .into_response(),
    }
}
