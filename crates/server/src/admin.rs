//! Calls that change state for everyone: behind `admin.token`, compared in constant time.
//! Without a configured token they are refused outright. With `admin.listen` they are
//! served only on that address.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_engine::DecisionRequest;
use subtle::ConstantTimeEq;

use crate::answer::result_bodies;
use crate::error::{ApiError, json_response};
use crate::request::{find_limit, make_check, parse_key, read_json};
use sluice_runtime::AppState;
use sluice_runtime::Live;

/// The request shape `POST /v1/reset` expects, quoted in its errors.
pub const RESET_SHAPE: &str = r#"{"limit": "<name>", "key": "<key>"}"#;

/// The request shape `POST /v1/admin/reset-limit` expects, quoted in its errors.
pub const RESET_LIMIT_SHAPE: &str = r#"{"limit": "<name>"}"#;

/// Checks the `Authorization: Bearer <token>` header against the configured token.
pub fn authorize(live: &Live, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = live.admin_token.as_ref().map(|t| t.expose()) else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin calls are disabled: set admin.token in the config (or SLUICE_ADMIN__TOKEN) to enable them",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    match presented {
        // Digests first: equal lengths, so the comparison's time says nothing about the
        // token's length or content.
        Some(token) if bool::from(Sha256::digest(token).ct_eq(&Sha256::digest(expected))) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token does not match admin.token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this call needs the admin token: send Authorization: Bearer <admin.token>",
        )),
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 9110 §11.1: `bearer`, `BEARER`), separated by spaces or tabs.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    limit: String,
    key: Value,
}

/// `POST /v1/reset`: forgets one key's counters of one limit.
pub async fn reset(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    {
        authorize(&live, &headers)?;
        let body: ResetBody = read_json(&headers, body, &live, RESET_SHAPE).await?;
        let limit = find_limit(&live.limits, &body.limit, "limit")?;
        let key = parse_key(body.key, "key")?;
        make_check(Arc::clone(limit), key.clone(), 0, "key")?;
        app.decider
            .store()
            .reset(limit, &key)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "reset failed");
                ApiError::store_unavailable("reset")
            })?;
        tracing::info!(limit = limit.name(), "counter reset by admin");
        Ok(json_response(
            StatusCode::OK,
            &json!({"reset": true, "limit": limit.name(), "key": key}),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetLimitBody {
    limit: String,
}

/// `POST /v1/admin/reset-limit`: forgets every key's counters of one limit.
pub async fn reset_limit(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    {
        authorize(&live, &headers)?;
        let body: ResetLimitBody = read_json(&headers, body, &live, RESET_LIMIT_SHAPE).await?;
        let limit = find_limit(&live.limits, &body.limit, "limit")?;
        let removed = app
            .decider
            .store()
            .reset_limit(limit)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "reset of a whole limit failed");
                ApiError::store_unavailable("resetting the limit")
            })?;
        tracing::info!(
            limit = limit.name(),
            counters_removed = removed,
            "limit reset by admin"
        );
        Ok(json_response(
            StatusCode::OK,
            &json!({"reset": true, "limit": limit.name(), "counters_removed": removed}),
        ))
    }
}

/// `GET /v1/admin/state?limit=L&key=K`: one key's windows, read without charging.
pub async fn state(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let live = app.live();
    {
        authorize(&live, &headers)?;
        let missing = |name: &str| {
            ApiError::bad_request(
                "invalid_request",
                format!(
                    "missing query parameter {name}: call /v1/admin/state?limit=<name>&key=<key>"
                ),
            )
        };
        let name = query.get("limit").ok_or_else(|| missing("limit"))?;
        let key = query.get("key").ok_or_else(|| missing("key"))?;
        let limit = find_limit(&live.limits, name, "limit")?;
        // The state now (cost 0), and what a request of cost 1 would be told now: both
        // read without charging.
        let read = |cost| -> Result<DecisionRequest, ApiError> {
            let check = make_check(Arc::clone(limit), key.clone(), cost, "key")?;
            Ok(DecisionRequest {
                checks: vec![check],
                dry_run: true,
            })
        };
        let (now, next) = (read(0)?, read(1)?);
        let store = app.decider.store();
        let failed = |error: sluice_engine::StoreError| {
            tracing::warn!(%error, "state read failed");
            ApiError::store_unavailable("reading the state")
        };
        let state = sluice_engine::decide(&**store, &now)
            .await
            .map_err(failed)?;
        let verdict = sluice_engine::decide(&**store, &next)
            .await
            .map_err(failed)?;
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "limit": limit.name(),
                "key": key,
                "results": result_bodies(&now, &state),
                "next_request": {
                    "allowed": verdict.allowed,
                    "retry_after_ms": verdict.retry_after.map(sluice_engine::millis_ceil),
                },
            }),
        ))
    }
}

/// `GET /v1/status`: the config version and the reload history.
pub async fn status(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app.live(), &headers)?;
    Ok(json_response(StatusCode::OK, &app.config.status()))
}

/// `POST /v1/admin/reload`: reads the config file again now.
pub async fn reload(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&app.live(), &headers)?;
    let state = Arc::clone(&app);
    // Reading and validating the file is blocking work.
    match tokio::task::spawn_blocking(move || state.reload()).await {
        Ok(Ok(version)) => Ok(json_response(
            StatusCode::OK,
            &json!({"reloaded": true, "config_version": version}),
        )),
        Ok(Err(error)) => Err(ApiError::bad_request("invalid_config", error.0)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reload_failed",
            "the reload did not finish; see sluice's log",
        )),
    }
}

/// The query parameters `GET /v1/admin/top` takes, quoted in its errors.
pub const TOP_SHAPE: &str =
    "/v1/admin/top?limit=<name>&by=spend|denials&window=minute|hour&n=<1..100>";

/// The most keys one `GET /v1/admin/top` lists per limit.
pub const MAX_TOP_N: usize = 100;

/// `GET /v1/admin/top`'s parameters, read and checked.
pub struct TopQuery {
    /// One limit, or every limit.
    pub limit: Option<String>,
    /// What keys are ranked by.
    pub by: sluice_topkeys::By,
    /// Over which window.
    pub window: sluice_topkeys::Window,
    /// How many keys per limit.
    pub n: usize,
}

impl TopQuery {
    /// Reads `limit`, `by` (default `spend`), `window` (default `minute`) and `n`
    /// (default 10); anything else is refused.
    pub fn parse(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let invalid = |message: String| {
            ApiError::bad_request("invalid_request", format!("{message}; call {TOP_SHAPE}"))
        };
        if let Some(other) = query
            .keys()
            .find(|k| !["limit", "by", "window", "n"].contains(&k.as_str()))
        {
            let other: String = other.chars().take(40).collect();
            return Err(invalid(format!("unknown query parameter {other:?}")));
        }
        let by = match query.get("by") {
            None => sluice_topkeys::By::Spend,
            Some(by) => by.parse().map_err(|e| invalid(format!("by: {e}")))?,
        };
        let window = match query.get("window") {
            None => sluice_topkeys::Window::Minute,
            Some(window) => window
                .parse()
                .map_err(|e| invalid(format!("window: {e}")))?,
        };
        let n = match query.get("n") {
            None => 10,
            Some(n) => match n.parse::<usize>() {
                Ok(n) if (1..=MAX_TOP_N).contains(&n) => n,
                _ => {
                    let n: String = n.chars().take(40).collect();
                    return Err(invalid(format!(
                        "n: {n:?} is not a whole number from 1 to {MAX_TOP_N}"
                    )));
                }
            },
        };
        Ok(TopQuery {
            limit: query.get("limit").cloned(),
            by,
            window,
            n,
        })
    }
}

/// One limit's heaviest keys as JSON.
pub fn top_body(limit: &str, top: &sluice_topkeys::Top) -> Value {
    json!({
        "limit": limit,
        "total": top.total,
        "error_bound": top.error_bound,
        "keys": top.keys.iter().map(|e| json!({
            "key": e.key,
            "count": e.count,
            "error": e.error,
        })).collect::<Vec<_>>(),
    })
}

/// The refusal when `stats.top_keys` is off.
pub fn top_keys_disabled() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "top_keys_disabled",
        "top keys are not tracked: stats.top_keys is false in the config (it takes a restart to turn on)",
    )
}

/// `GET /v1/admin/top?limit=L&by=spend|denials&window=minute|hour&n=10`: the heaviest
/// keys of one limit (or of every limit), by cost charged or by denials.
pub async fn top(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authorize(&app.live(), &headers)?;
    let query = TopQuery::parse(&query)?;
    let Some(capacity) = app.metrics.top_keys_capacity() else {
        return Err(top_keys_disabled());
    };
    let counters = app.metrics.limit_counters();
    let mut names: Vec<&String> = match &query.limit {
        Some(name) => match counters.get_key_value(name) {
            Some((name, _)) => vec![name],
            None => {
                let mut known: Vec<&str> = counters.keys().map(String::as_str).collect();
                known.sort_unstable();
                let name: String = name.chars().take(80).collect();
                return Err(ApiError::bad_request(
                    "unknown_limit",
                    format!(
                        "limit: no limit named {name:?} is configured; configured limits: {}",
                        known.join(", ")
                    ),
                ));
            }
        },
        None => counters.keys().collect(),
    };
    names.sort_unstable();
    let now = app.decider.clock_secs();
    let limits: Vec<Value> = names
        .into_iter()
        .filter_map(|name| {
            let top = counters.get(name)?.top.as_ref()?;
            Some(top_body(
                name,
                &top.top(query.window, query.by, query.n, now),
            ))
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "window": query.window.as_str(),
            "by": query.by.as_str(),
            "capacity": capacity,
            "limits": limits,
        }),
    ))
}
