//! `POST /v1/reserve`, `/v1/settle`, `/v1/release`: charge an estimate before a call
//! whose cost is known only after it, then settle what it really cost
//! (docs/design/front-doors.md, "Reservations"; the arithmetic is the engine's
//! `reservation` module).
//!
//! A reservation is decided like a check. When it is allowed the answer carries a
//! `reservation` token; settling it moves every window it charged by `actual -
//! estimate` (a refund when less, a charge past the limit when more: the key is then
//! in debt and waits until it has drained), releasing it gives the whole estimate
//! back, and either frees its concurrency slots. Settling twice changes nothing the
//! second time. A reservation never settled counts at its estimate once it expires.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_engine::{SettleStatus, millis_ceil};
use sluice_runtime::{AppState, ReserveError, Ticket};

use crate::answer::result_bodies;
use crate::check::{CheckBody, CheckItem, build_request};
use crate::error::{ApiError, json_response};
use crate::request::{parse_cost, parse_json, read_body, read_json};

/// How long a reservation stays open when `ttl_ms` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// The longest a reservation may stay open.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

const RESERVE_SHAPE: &str = r#"{"checks": [{"limit": "<name>", "key": "<key>", "cost": 1}], "cost": <estimate>, "ttl_ms": 60000}"#;
const SETTLE_SHAPE: &str = r#"{"reservation": "<token from /v1/reserve>", "cost": <actual>} or {"reservation": "...", "costs": [<actual per check>]}"#;
const RELEASE_SHAPE: &str = r#"{"reservation": "<token from /v1/reserve>"}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReserveBody<'a> {
    #[serde(borrow)]
    checks: Vec<CheckItem<'a>>,
    #[serde(default)]
    cost: Option<Value>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    ttl_ms: Option<Value>,
    #[serde(default)]
    plan: Option<String>,
}

#[derive(Serialize)]
struct ReserveAnswer<'a> {
    allowed: bool,
    retry_after_ms: Option<u64>,
    degraded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listed: Option<crate::answer::ListedBody<'a>>,
    results: Vec<crate::answer::ResultBody<'a>>,
}

/// `POST /v1/reserve`.
pub async fn reserve(
    State(app): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    // The head is read in place: axum's `HeaderMap` extractor would copy every header.
    let (head, body) = request.into_parts();
    let live = app.live();
    let bytes = read_body(&head.headers, body, &live).await?;
    let body: ReserveBody = parse_json(&bytes, RESERVE_SHAPE)?;
    let ttl = parse_ttl(body.ttl_ms.as_ref())?;
    let mut request = build_request(
        &live.limits,
        CheckBody {
            checks: body.checks,
            cost: body.cost,
            dry_run: body.dry_run,
            plan: body.plan,
        },
        true,
    )?;
    let (decision, held) =
        app.decider
            .reserve(&mut request, ttl)
            .await
            .map_err(|error| match error {
                ReserveError::Store(_) => ApiError::store_unavailable("the reservation"),
                ReserveError::Ticket(error) => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reservation_failed",
                    error.to_string(),
                ),
            })?;
    let (reservation, expires_at_ms) = match held {
        Some((ticket, token)) => (Some(token), Some(ticket.expires_at_ms)),
        None => (None, None),
    };
    Ok(json_response(
        StatusCode::OK,
        &ReserveAnswer {
            allowed: decision.allowed,
            retry_after_ms: decision.retry_after.map(millis_ceil),
            degraded: decision.degraded,
            reservation,
            expires_at_ms,
            listed: crate::answer::listed_body(&decision),
            results: result_bodies(&request, &decision),
        },
    ))
}

fn parse_ttl(value: Option<&Value>) -> Result<Duration, ApiError> {
    let Some(value) = value else {
        return Ok(DEFAULT_TTL);
    };
    let ms = parse_cost(Some(value), 0, "ttl_ms").map_err(|_| invalid_ttl(value))?;
    let ttl = Duration::from_millis(ms);
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(invalid_ttl(value));
    }
    Ok(ttl)
}

fn invalid_ttl(value: &Value) -> ApiError {
    ApiError::bad_request(
        "invalid_ttl",
        format!(
            "ttl_ms is {value}; give how long the reservation stays open in whole milliseconds, from 1 to {} (default {})",
            MAX_TTL.as_millis(),
            DEFAULT_TTL.as_millis()
        ),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    reservation: Value,
    #[serde(default)]
    cost: Option<Value>,
    #[serde(default)]
    costs: Option<Vec<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    reservation: Value,
}

#[derive(Serialize)]
struct SettleAnswer<'a> {
    settled: bool,
    already_settled: bool,
    reservation_id: &'a str,
    /// The costs this call applied; absent when it applied nothing (already settled):
    /// the ones that were booked are the first settlement's, which the store does not
    /// keep, and echoing this call's would show figures that were never applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    costs: Option<&'a [u64]>,
}

/// `POST /v1/settle`.
pub async fn settle(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    let body: SettleBody = read_json(&headers, body, &live, SETTLE_SHAPE).await?;
    let (ticket, hold) = read_ticket(&body.reservation)?;
    let actual = match (&body.cost, &body.costs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "give either cost (one actual cost for every check) or costs (one per check), not both",
            ));
        }
        (Some(cost), None) => {
            let cost = parse_cost(Some(cost), 0, "cost")?;
            vec![cost; ticket.checks.len()]
        }
        (None, Some(costs)) => {
            if costs.len() != ticket.checks.len() {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!(
                        "costs has {} entries and the reservation {} checks; give one actual cost per check, in the order they were reserved",
                        costs.len(),
                        ticket.checks.len()
                    ),
                ));
            }
            costs
                .iter()
                .enumerate()
                .map(|(i, c)| parse_cost(Some(c), 0, format!("costs[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "say what the call really cost: {SETTLE_SHAPE}; to give the whole estimate back call /v1/release"
                ),
            ));
        }
    };
    settle_answer(&app, &live, &ticket, hold, &actual).await
}

/// `POST /v1/release`: the call never ran; the whole estimate comes back.
pub async fn release(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    let body: ReleaseBody = read_json(&headers, body, &live, RELEASE_SHAPE).await?;
    let (ticket, hold) = read_ticket(&body.reservation)?;
    let nothing = vec![0; ticket.checks.len()];
    settle_answer(&app, &live, &ticket, hold, &nothing).await
}

fn read_ticket(value: &Value) -> Result<(Ticket, sluice_engine::HoldId), ApiError> {
    let Value::String(token) = value else {
        return Err(ApiError::bad_request(
            "invalid_reservation",
            "reservation must be the string /v1/reserve answered",
        ));
    };
    Ticket::decode(token)
        .map_err(|error| ApiError::bad_request("invalid_reservation", error.to_string()))
}

async fn settle_answer(
    app: &AppState,
    live: &sluice_runtime::Live,
    ticket: &Ticket,
    hold: sluice_engine::HoldId,
    actual: &[u64],
) -> Result<Response, ApiError> {
    let status = app
        .decider
        .settle_ticket(ticket, hold, &live.limits, actual)
        .await
        .map_err(|_| ApiError::store_unavailable("the settlement"))?;
    match status {
        SettleStatus::Settled | SettleStatus::AlreadySettled => Ok(json_response(
            StatusCode::OK,
            &SettleAnswer {
                settled: true,
                already_settled: status == SettleStatus::AlreadySettled,
                reservation_id: &ticket.id,
                costs: (status == SettleStatus::Settled).then_some(actual),
            },
        )),
        SettleStatus::Unknown => {
            let now_ms = std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let why = if now_ms >= ticket.expires_at_ms {
                "it expired, so it counts at its estimate; reserve with a longer ttl_ms for calls that take longer"
            } else {
                "no open reservation has this id and content (was the token changed, or reserved against another store?)"
            };
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_reservation",
                format!("reservation {} cannot be settled: {why}", ticket.id),
            ))
        }
    }
}
