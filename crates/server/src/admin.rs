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
