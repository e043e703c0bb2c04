//! `/v1/forward-auth`: the rate-limit check for proxies that ask before they forward —
//! nginx `auth_request`, Traefik ForwardAuth, Envoy ext_authz (HTTP).
//!
//! The original request is read from Traefik's `X-Forwarded-Method` / `X-Forwarded-Uri`,
//! nginx's `X-Original-Method` / `X-Original-URI`, or, as Envoy sends it with a path
//! prefix, the path after `/v1/forward-auth`. When more than one is present and they
//! disagree, the checks of all of them are decided together, so a client cannot dodge
//! a limit by adding the other proxy's headers to its request. The answer is `200` to allow and the deny
//! status to deny (`forward_auth.deny_status`, e.g. 403 for nginx, which only passes
//! 2xx/401/403 through), both with the rate-limit headers.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use sluice_engine::DecisionRequest;
use sluice_http::IncomingRequest;
use sluice_runtime::Peer;

use crate::error::ApiError;
use sluice_runtime::AppState;

/// Where the forward-auth endpoint lives.
pub const PATH: &str = "/v1/forward-auth";

/// A header's value as text: bytes outside visible ASCII (raw UTF-8 that nginx passes
/// through from the request line, say) are percent-encoded, so the value is decided
/// for what it is and never read as another path. `None` when absent or blank.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?;
    let text = sluice_http::path::encode_raw_bytes(value.as_bytes().trim_ascii());
    (!text.is_empty()).then_some(text)
}

/// Every description of the original request that arrived: Traefik's headers, nginx's
/// headers, and the path after `/v1/forward-auth` (Envoy). A proxy sets its own pair,
/// but may pass the client's copy of the other pair through unchanged (nginx does not
/// strip `X-Forwarded-Uri`), so no single source can be believed over the others.
fn originals(method: &Method, uri: &Uri, headers: &HeaderMap) -> Vec<(String, String)> {
    let own_method = method.as_str();
    let mut candidates = Vec::with_capacity(2);
    for (method_header, uri_header) in [
        ("x-forwarded-method", "x-forwarded-uri"),
        ("x-original-method", "x-original-uri"),
    ] {
        let (m, u) = (header(headers, method_header), header(headers, uri_header));
        if m.is_some() || u.is_some() {
            candidates.push((
                m.unwrap_or_else(|| own_method.to_string()),
                u.unwrap_or_else(|| "/".to_string()),
            ));
        }
    }
    let suffix = uri.path().strip_prefix(PATH).unwrap_or("");
    if !suffix.is_empty() || candidates.is_empty() {
        let path = if suffix.is_empty() { "/" } else { suffix };
        let path_and_query = match uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path.to_string(),
        };
        candidates.push((own_method.to_string(), path_and_query));
    }
    candidates.dedup();
    candidates
}

/// `ANY /v1/forward-auth[/<original path>]`.
pub async fn forward_auth(
    State(app): State<Arc<AppState>>,
    Peer(peer): Peer,
    request: Request,
) -> Result<Response, ApiError> {
    // The head is read in place: axum's extractors would copy the headers and the URI.
    let (head, _) = request.into_parts();
    let (method, uri, headers) = (&head.method, &head.uri, &head.headers);
    // When the sources disagree, every candidate's checks go into one atomic decision:
    // a spoofed header can add a charge, never remove the real route's.
    let live = app.live();
    let mut request = DecisionRequest::default();
    let mut client = None;
    for (original_method, path_and_query) in originals(method, uri, headers) {
        let incoming = IncomingRequest {
            peer: Some(peer.ip()),
            method: &original_method,
            path_and_query: &path_and_query,
            headers,
            session: None,
        };
        let (checks, resolved) =
            live.policy
                .screened_request(&incoming, false)
                .map_err(|error| {
                    // Refused, not guessed. The proxy must relay it: nginx passes only
                    // 401 and 403 through, so the configured deny status is used if set.
                    // A route forward-auth cannot decide (it needs the answer) is the
                    // deployment's mistake, not the client's: it stays a 500.
                    let mut answer = ApiError::from(error);
                    if let Some(status) = live.forward_auth_deny_status
                        && answer.status.is_client_error()
                    {
                        answer.status = status;
                    }
                    answer
                })?;
        // The same headers and peer every time: the same address.
        client = resolved;
        for check in checks.checks {
            let seen = request
                .checks
                .iter()
                .any(|c| Arc::ptr_eq(c.limit(), check.limit()) && c.key() == check.key());
            if !seen {
                request.checks.push(check);
            }
        }
    }
    // Screened even when no route limits it: a blocked address is blocked everywhere.
    let decision = app
        .decider
        .decide_from(&mut request, client)
        .await
        .map_err(|_| ApiError::store_unavailable("the decision"))?;
    let responses = &live.policy.responses;
    if decision.allowed {
        let mut response = StatusCode::OK.into_response();
        responses.add_rate_limit_headers(&request, &decision, response.headers_mut());
        return Ok(response);
    }
    let status = live
        .forward_auth_deny_status
        .unwrap_or(responses.deny_status);
    let denial = responses.denial_with_status(&request, &decision, status);
    Ok((denial.status, denial.headers, denial.body).into_response())
}
