//! `/v1/forward-auth`: the rate-limit check for proxies that ask before they forward —
//! nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz (HTTP).
//!
//! The original request is read from Traefik's `X-Forwarded-Method` / `X-Forwarded-Uri`,
//! nginx's `X-Original-Method` / `X-Original-URI`, or, as Envoy sends it with a path
//! prefix, the path after `/v1/forward-auth`. The answer is `200` to allow and the deny
//! status to deny (`forward_auth.deny_status`, e.g. 403 for nginx, which only passes
//! 2xx/401/403 through), both with the rate-limit headers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sluice_http::IncomingRequest;

use crate::app::AppState;
use crate::error::ApiError;

/// Where the forward-auth endpoint lives.
pub const PATH: &str = "/v1/forward-auth";

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The original request's method and path-and-query.
fn original<'a>(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> (&'a str, String) {
    let method = header(headers, "x-forwarded-method")
        .or_else(|| header(headers, "x-original-method"))
        .unwrap_or(method.as_str());
    let path =
        match header(headers, "x-forwarded-uri").or_else(|| header(headers, "x-original-uri")) {
            Some(uri) => uri.to_string(),
            None => {
                let suffix = uri.path().strip_prefix(PATH).unwrap_or("");
                let path = if suffix.is_empty() { "/" } else { suffix };
                match uri.query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path.to_string(),
                }
            }
        };
    (method, path)
}

/// `ANY /v1/forward-auth[/<original path>]`.
pub async fn forward_auth(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let (original_method, path_and_query) = original(&method, &uri, &headers);
    let incoming = IncomingRequest {
        peer: Some(peer.ip()),
        method: original_method,
        path_and_query: &path_and_query,
        headers: &headers,
        session: None,
    };
    let request = app.policy.decision_request(&incoming, false);
    if request.checks.is_empty() {
        return StatusCode::OK.into_response();
    }
    let decision = match app.decider.decide(&request).await {
        Ok(decision) => decision,
        Err(error) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the counter store could not decide: {error}"),
            )
            .into_response();
        }
    };
    let responses = &app.policy.responses;
    if decision.allowed {
        let mut response = StatusCode::OK.into_response();
        responses.add_rate_limit_headers(&request, &decision, response.headers_mut());
        return response;
    }
    let denial = responses.denial(&request, &decision);
    let status = app
        .settings
        .forward_auth_deny_status
        .unwrap_or(denial.status);
    (status, denial.headers, denial.body).into_response()
}
