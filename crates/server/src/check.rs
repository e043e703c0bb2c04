//! `POST /v1/check`: the JSON decision API (docs/design/front-doors.md, "Decision API").
//!
//! Every malformed request is a 400 whose `error` code says what kind of mistake it
//! is and whose `message` names the field and how to fix it.

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::Value;
use sluice_engine::{DecisionRequest, LimitSet};

use crate::answer::decision_json;
use crate::error::ApiError;
use crate::request::{
    CheckField, JsonKey, find_limit, make_check, parse_cost, parse_json, parse_json_key, read_body,
};
use sluice_runtime::AppState;

pub use sluice_runtime::MAX_CHECKS;

/// The request shape `POST /v1/check` expects, quoted in its errors.
pub const CHECK_SHAPE: &str = r#"{"checks": [{"limit": "<name>", "key": "<key>", "cost": 1}], "cost": 1, "dry_run": false, "plan": "<optional plan>"}"#;

/// A `/v1/check` body, parsed in place: limit names and keys borrow from the body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckBody<'a> {
    #[serde(borrow)]
    pub(crate) checks: Vec<CheckItem<'a>>,
    #[serde(default)]
    pub(crate) cost: Option<Value>,
    #[serde(default)]
    pub(crate) dry_run: bool,
    /// The caller's plan: limits with that plan decide at its rates.
    #[serde(default)]
    pub(crate) plan: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckItem<'a> {
    #[serde(borrow)]
    limit: Cow<'a, str>,
    #[serde(borrow)]
    key: JsonKey<'a>,
    #[serde(default)]
    cost: Option<Value>,
}

/// Builds the decision request of a `/v1/check` or `/v1/reserve` body. Concurrency
/// limits hold their slots until a reservation ends, so only a reservation may name
/// them; in a reservation each holds one slot, whatever the cost.
pub(crate) fn build_request(
    limits: &LimitSet,
    body: CheckBody<'_>,
    reserving: bool,
) -> Result<DecisionRequest, ApiError> {
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
    if let Some(plan) = &body.plan {
        let known: std::collections::BTreeSet<&str> = limits
            .iter()
            .flat_map(|l| l.plans().iter().filter_map(|p| p.plan()))
            .collect();
        if !known.contains(plan.as_str()) {
            let listed: Vec<&str> = known.into_iter().collect();
            return Err(ApiError::bad_request(
                "unknown_plan",
                format!(
                    "plan {plan:?} is not configured on any limit; configured plans: {} (omit plan for the default rates)",
                    if listed.is_empty() {
                        "none".to_string()
                    } else {
                        listed.join(", ")
                    }
                ),
            ));
        }
    }
    let plan = body.plan.as_deref();
    let checks = body
        .checks
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |name| CheckField { index: i, name };
            let limit = find_limit(limits, &item.limit, field("limit"))?.for_plan(plan);
            let mut cost = match &item.cost {
                None => default_cost,
                cost => parse_cost(cost.as_ref(), default_cost, field("cost"))?,
            };
            if limit.is_concurrency() {
                if !reserving {
                    return Err(ApiError::bad_request(
                        "concurrency_needs_reserve",
                        format!(
                            "{}: limit {:?} counts calls in flight, which only a reservation can hold; call POST /v1/reserve and settle or release it when the call ends",
                            field("limit"),
                            limit.name()
                        ),
                    ));
                }
                cost = 1;
            }
            let key = parse_json_key(item.key, field("key"))?;
            make_check(Arc::clone(limit), key, cost, field("key"))
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
    request: Request,
) -> Result<Response, ApiError> {
    // The head is read in place: axum's `HeaderMap` extractor would copy every header.
    let (head, body) = request.into_parts();
    let live = app.live();
    let bytes = read_body(&head.headers, body, &live).await?;
    let body: CheckBody = parse_json(&bytes, CHECK_SHAPE)?;
    let mut request = build_request(&live.limits, body, false)?;
    let decision = app
        .decider
        .decide(&mut request)
        .await
        .map_err(|_| ApiError::store_unavailable("the decision"))?;
    Ok(decision_json(&request, &decision))
}
