//! `POST /v1/check`: the JSON decision API (docs/design/front-doors.md, "Decision API").
//!
//! Every malformed request is a 400 whose `error` code says what kind of mistake it
//! is and whose `message` names the field and how to fix it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::{DecisionRequest, LimitSet};

use crate::answer::decision_json;
use crate::error::ApiError;
use crate::request::{find_limit, make_check, parse_cost, parse_key, read_json};
use sluice_runtime::AppState;

pub use sluice_runtime::MAX_CHECKS;

/// The request shape `POST /v1/check` expects, quoted in its errors.
pub const CHECK_SHAPE: &str =
    r#"{"checks": [{"limit": "<name>", "key": "<key>", "cost": 1}], "cost": 1, "dry_run": false}"#;

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
            let limit = find_limit(limits, &item.limit, &field("limit"))?;
            let cost = match &item.cost {
                None => default_cost,
                cost => parse_cost(cost.as_ref(), default_cost, &field("cost"))?,
            };
            let key = parse_key(item.key, &field("key"))?;
            make_check(Arc::clone(limit), key, cost, &field("key"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DecisionRequest {
        checks,
        dry_run: body.dry_run,
    })
}

/// `POST /v1/check`.
pub async fn check(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    let body: CheckBody = read_json(&headers, body, &live, CHECK_SHAPE).await?;
    let request = build_request(&live.limits, body)?;
    let decision = app
        .decider
        .decide(&request)
        .await
        .map_err(|_| ApiError::store_unavailable("the decision"))?;
    Ok(decision_json(&request, &decision))
}
