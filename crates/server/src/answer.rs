//! The decision API's answer: one JSON result per window (`/v1/check`, and the admin
//! state read), with every time in milliseconds rounded up.

use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use sluice_engine::{Decision, DecisionRequest, millis_ceil};

use crate::error::json_response;

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
    let results = result_bodies(request, decision);
    json_response(
        StatusCode::OK,
        &DecisionBody {
            allowed: decision.allowed,
            retry_after_ms: decision.retry_after.map(millis_ceil),
            degraded: decision.degraded,
            listed: listed_body(decision),
            results,
        },
    )
}
