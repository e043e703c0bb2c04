//! Calls that change state for everyone: behind `admin.token`, compared in constant time.
//! Without a configured token they are refused outright.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::check::{find_limit, parse_key, read_json};
use crate::error::{ApiError, json_response};

/// Checks the `Authorization: Bearer <token>` header against the configured token.
pub fn authorize(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = app.settings.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "admin calls are disabled: set admin.token in the config (or SLUICE_ADMIN__TOKEN) to enable them",
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
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

/// The request shape `POST /v1/reset` expects, quoted in its errors.
pub const RESET_SHAPE: &str = r#"{"limit": "<name>", "key": "<key>"}"#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetBody {
    limit: String,
    key: Value,
}

#[derive(Serialize)]
struct ResetDone<'a> {
    reset: bool,
    limit: &'a str,
    key: &'a str,
}

/// `POST /v1/reset`: forgets one key's counters of one limit.
pub async fn reset(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if let Err(error) = authorize(&app, &headers) {
        return error.into_response();
    }
    let result = async {
        let body: ResetBody =
            read_json(&headers, body, app.settings.max_body_bytes, RESET_SHAPE).await?;
        let limit = find_limit(&app.limits, &body.limit, "limit")?;
        let key = parse_key(body.key, "key")?;
        crate::check::make_check(Arc::clone(limit), key.clone(), 0, "key")?;
        app.decider
            .store()
            .reset(limit, &key)
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("reset failed: {error}"),
                )
            })?;
        tracing::info!(limit = limit.name(), "counter reset by admin");
        Ok::<_, ApiError>(json_response(
            StatusCode::OK,
            &ResetDone {
                reset: true,
                limit: limit.name(),
                key: &key,
            },
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
