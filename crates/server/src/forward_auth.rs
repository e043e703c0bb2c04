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

/// The most descriptions of the original request one call may carry (distinct method
/// and URI pairs over every copy of every source); a proxy sends one or two.
const MAX_ORIGINALS: usize = 8;

/// Every copy of a header as text: bytes outside visible ASCII (raw UTF-8 that nginx
/// passes through from the request line, say) are percent-encoded, so the value is
/// decided for what it is and never read as another path. Blank copies are left out.
/// Every copy, not the first: a proxy that appends its header after the client's copy
/// instead of replacing it would otherwise let the client's copy decide.
fn header_copies(headers: &HeaderMap, name: &str) -> Vec<String> {
    let mut copies: Vec<String> = Vec::new();
    for value in headers.get_all(name) {
        let text = sluice_http::path::encode_raw_bytes(value.as_bytes().trim_ascii());
        if !text.is_empty() && !copies.contains(&text) {
            copies.push(text);
        }
    }
    copies
}

/// Every description of the original request that arrived: Traefik's headers, nginx's
/// headers, and the path after `/v1/forward-auth` (Envoy). A proxy sets its own pair,
/// but may pass the client's copy of the other pair through unchanged (nginx does not
/// strip `X-Forwarded-Uri`), or append its own copy after the client's, so no single
/// source or copy can be believed over the others. More than [`MAX_ORIGINALS`] distinct
/// descriptions is refused rather than some of them decided.
fn originals(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Vec<(String, String)>, ApiError> {
    let own_method = method.as_str();
    let mut candidates: Vec<(String, String)> = Vec::with_capacity(2);
    for (method_header, uri_header) in [
        ("x-forwarded-method", "x-forwarded-uri"),
        ("x-original-method", "x-original-uri"),
    ] {
        let (methods, uris) = (
            header_copies(headers, method_header),
            header_copies(headers, uri_header),
        );
        if methods.is_empty() && uris.is_empty() {
            continue;
        }
        if methods.len().max(1) * uris.len().max(1) > MAX_ORIGINALS {
            return Err(ApiError::bad_request(
                "ambiguous_request",
                format!(
                    "{method_header} and {uri_header} describe more than {MAX_ORIGINALS} different original requests; the proxy should set each header once, replacing any copy the client sent"
                ),
            ));
        }
        let methods = if methods.is_empty() {
            vec![own_method.to_string()]
        } else {
            methods
        };
        let uris = if uris.is_empty() {
            vec!["/".to_string()]
        } else {
            uris
        };
        for m in &methods {
            for u in &uris {
                candidates.push((m.clone(), u.clone()));
            }
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
    let mut distinct: Vec<(String, String)> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        if !distinct.contains(&candidate) {
            distinct.push(candidate);
        }
    }
    if distinct.len() > MAX_ORIGINALS {
        return Err(ApiError::bad_request(
            "ambiguous_request",
            format!(
                "the forwarding headers describe {} different original requests, at most {MAX_ORIGINALS} are decided; the proxy should set its headers once, replacing any copy the client sent",
                distinct.len()
            ),
        ));
    }
    Ok(distinct)
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
    let originals = originals(method, uri, headers).map_err(|mut answer| {
        // Refused like an ambiguous path: through the configured deny status, which
        // the proxy relays.
        if let Some(status) = live.forward_auth_deny_status {
            answer.status = status;
        }
        answer
    })?;
    for (original_method, path_and_query) in originals {
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
