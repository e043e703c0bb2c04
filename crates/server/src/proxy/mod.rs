//! The reverse proxy (`proxy.upstream`): every request that is not one of sluice's own
//! endpoints is decided by the routes and, when allowed, forwarded to the upstream; a
//! denied request is answered by sluice and never reaches it.
//!
//! - **Forwarding.** Method, path and query (under the upstream's path prefix, if any),
//!   headers and body go to the upstream over a pooled HTTP/1.1 connection (one pool per
//!   serving thread, so a request never waits on another thread's connection). Bodies
//!   stream both ways, frame by frame, with nothing buffered: server-sent events and
//!   chunked LLM output reach the client as the upstream writes them.
//! - **Hop-by-hop headers** (RFC 9110 §7.6.1) are dropped both ways: `Connection` and the
//!   headers it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization`, `Proxy-Authenticate`; also
//!   `Expect` (sluice answers `100-continue` itself). `Host` is passed through as the
//!   client sent it.
//! - **Forwarding headers.** From a trusted proxy (`client_ip.trusted_proxies`) the peer
//!   is appended to `X-Forwarded-For` and its `X-Forwarded-Proto`/`-Host`, `X-Real-IP`
//!   and `Forwarded` are kept (`X-Real-IP: <peer>` when it sent none). From anyone else
//!   the client's own copies are dropped and replaced: `X-Forwarded-For: <peer>`,
//!   `X-Forwarded-Proto: http`, `X-Forwarded-Host: <Host>`, `X-Real-IP: <peer>`, no
//!   `Forwarded` and no CDN-style address header (`True-Client-IP`, `CF-Connecting-IP`
//!   and the like). (nginx's `$proxy_add_x_forwarded_for` appends to whatever the
//!   client sent, so a spoofed entry reaches the app; sluice drops it, as Traefik does
//!   by default, so the app can believe the header.)
//! - **Upgrades** (WebSocket): the `Upgrade` request is forwarded with its
//!   `Connection: upgrade`; when the upstream answers `101`, both connections are taken
//!   over and bytes are copied both ways until either side closes.
//! - **Failures.** No connection within `proxy.connect_timeout_ms` or no response head
//!   within `proxy.timeout_ms`: `504 {"error": "upstream_timeout"}`; refused or broken:
//!   `502 {"error": "upstream_unavailable"}`.
//! - **Answers.** Allowed responses carry the rate-limit headers; a new session's cookie
//!   is set on every answer (see [`sluice_http::session`]). When the upstream's status
//!   is in `proxy.refund_on_status`, the decision's cost is given back before the answer
//!   is sent, so the caller's next request already sees it. sluice's own 502/504 are
//!   refunded only when the request never reached the upstream (no connection): after
//!   it was sent, the upstream may still be doing the work.
//! - **Paths** that applications could read in more than one way (`%2F`, `\`, `;`,
//!   `%00`, dot segments) are refused with `400 invalid_path` and never forwarded (see
//!   [`sluice_http::path`]).
//! - **Metered routes** (`cost: usage`: an LLM call charged what its answer reports it
//!   used) and **concurrency limits** are decided as reservations and settled when the
//!   answer ends: see [`metered`].
//! - **Quota** (`proxy.quota_path`): see [`quota`].
//!
//! [`forward`] talks to the upstream; this module decides and answers.

mod forward;
mod metered;
mod quota;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_http::{IncomingRequest, Session, normalize_path};
use sluice_runtime::Peer;
use sluice_runtime::{AppState, Live};

use crate::error::ApiError;
use forward::{forward, over_tls, refundable};

/// Whether a request carries a body sluice did not read.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The session of this request, when sessions are on. A broken random source leaves
/// the request without one (its `{session}` keys fall through to the next template).
fn session(live: &Live, headers: &HeaderMap) -> Option<Session> {
    let sessions = live.sessions.as_ref()?;
    match sessions.session(headers) {
        Ok(session) => Some(session),
        Err(error) => {
            tracing::error!(%error, "cannot issue a session");
            None
        }
    }
}

fn set_session_cookie(live: &Live, session: &Option<Session>, tls: bool, headers: &mut HeaderMap) {
    if let (
        Some(sessions),
        Some(Session {
            issue: Some(value), ..
        }),
    ) = (&live.sessions, session)
        && let Some(cookie) = sessions.set_cookie(value, tls)
    {
        headers.append(header::SET_COOKIE, cookie);
    }
}

/// The answer to a denied request, never forwarded; `body_read`: the request has no
/// body left unread (else the connection is closed after the answer).
fn denied(
    live: &Live,
    request: &sluice_engine::DecisionRequest,
    decision: &sluice_engine::Decision,
    body_read: bool,
) -> Response {
    let denial = live.policy.responses.denial(request, decision);
    let mut response = (denial.status, denial.headers, denial.body).into_response();
    if !body_read {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The fallback of the main router while proxying: the quota endpoint, or a decided and
/// forwarded request. A new session's cookie is set on whatever the answer is.
pub async fn proxy(
    State(app): State<Arc<AppState>>,
    Peer(peer): Peer,
    request: Request,
) -> Response {
    let live = app.live();
    let peer = peer.ip();
    let trusted = live.policy.client_ip.is_trusted_peer(peer);
    let tls = over_tls(request.headers(), trusted);
    let session = session(&live, request.headers());
    let mut response = match answer(&app, &live, peer, &session, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    set_session_cookie(&live, &session, tls, response.headers_mut());
    response
}

/// `405` to a `CONNECT`: a tunnel to wherever the client names is a forward proxy's
/// job, and forwarding the request would ask the upstream to open one. `body_read`:
/// it came without a body, so the connection can carry another request.
fn connect_refused(body_read: bool) -> Response {
    let mut refused = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "CONNECT asks for a tunnel, which this reverse proxy does not open: send the request itself (GET /path, POST /path, ...) to this address",
    )
    .closing_unless(body_read)
    .into_response();
    refused.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
    );
    refused
}

/// The answer to one proxied request: refused, denied, or the upstream's.
async fn answer(
    app: &Arc<AppState>,
    live: &Live,
    peer: std::net::IpAddr,
    session: &Option<Session>,
    request: Request,
) -> Result<Response, ApiError> {
    let Some(proxy) = live.proxy.as_ref() else {
        // The proxy section was removed by a reload: it ends with a restart.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the reverse proxy was removed from the config; restart sluice to stop proxying",
        ));
    };
    if request.method() == Method::CONNECT {
        return Ok(connect_refused(!has_body(request.headers())));
    }
    if let Some(quota_path) = &proxy.quota_path
        && normalize_path(request.uri().path()) == *quota_path
    {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        return Ok(
            quota::quota(app, live, peer, (&method, &uri, request.headers()), session).await,
        );
    }
    // A body sluice does not read leaves the connection unusable after an early answer.
    let body_read = !has_body(request.headers());
    let plan = {
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let incoming = IncomingRequest {
            peer: Some(peer),
            method: request.method().as_str(),
            path_and_query,
            headers: request.headers(),
            session: session.as_ref().map(|s| s.id.as_str()),
        };
        live.policy
            .plan(&incoming, false)
            .map_err(|error| ApiError::from(error).closing_unless(body_read))?
    };
    if plan.needs_reservation() {
        return metered::answer(app, live, proxy, peer, request, plan, body_read).await;
    }
    // Screened even when no route limits it: a blocked address never reaches the upstream.
    let client = plan.client;
    let mut decision_request = plan.request;
    let decision = app
        .decider
        .decide_from(&mut decision_request, client)
        .await
        .map_err(|_| ApiError::store_unavailable("the decision").closing_unless(body_read))?;
    let decision =
        (!decision_request.checks.is_empty() || decision.listed.is_some()).then_some(decision);

    if let Some(decision) = decision.as_ref().filter(|d| !d.allowed) {
        return Ok(denied(live, &decision_request, decision, body_read));
    }

    let mut response = forward(app, proxy, live, peer, request).await;
    if let Some(decision) = &decision {
        if !decision.degraded && refundable(proxy, &response) {
            app.decider.refund(&decision_request, decision).await;
        }
        live.policy.responses.add_rate_limit_headers(
            &decision_request,
            decision,
            response.headers_mut(),
        );
    }
    Ok(response)
}
