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
//!   is appended to `X-Forwarded-For` and its `X-Forwarded-Proto`/`-Host` and
//!   `Forwarded` are kept. From anyone else the client's own copies are dropped and
//!   replaced: `X-Forwarded-For: <peer>`, `X-Forwarded-Proto: http`,
//!   `X-Forwarded-Host: <Host>`, no `Forwarded`. (nginx's `$proxy_add_x_forwarded_for`
//!   appends to whatever the client sent, so a spoofed entry reaches the app; sluice
//!   drops it, as Traefik does by default, so the app can believe the header.)
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
//! - **Quota** (`proxy.quota_path`): see [`quota`].

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use sluice_config::ProxyConfig;
use sluice_engine::{Check, Decision, DecisionRequest};
use sluice_http::{IncomingRequest, Session, normalize_path};

use crate::error::{ApiError, json_response};
use sluice_runtime::AppState;
use sluice_runtime::Live;

type UpstreamClient = Client<HttpConnector, Body>;

thread_local! {
    /// One connection pool per serving thread (each runs its own event loop), made for
    /// one connect timeout.
    static CLIENT: RefCell<Option<(Duration, UpstreamClient)>> = const { RefCell::new(None) };
}

/// The pooled client of this thread.
fn client(connect_timeout: Duration) -> UpstreamClient {
    CLIENT.with(|cell| {
        let mut cell = cell.borrow_mut();
        match &*cell {
            Some((timeout, client)) if *timeout == connect_timeout => client.clone(),
            _ => {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect_timeout));
                connector.set_nodelay(true);
                let client = Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(connector);
                *cell = Some((connect_timeout, client.clone()));
                client
            }
        }
    })
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus
/// `Expect`, which sluice's own HTTP server has already answered.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
];

/// Removes hop-by-hop headers, including those `Connection` names (but never the
/// message's framing and addressing: `Host`, `Content-Length`).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| *name != header::HOST && *name != header::CONTENT_LENGTH)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` and `Upgrade: x`).
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Sets `X-Forwarded-For`, `-Proto` and `-Host` (see the module doc).
fn set_forwarding_headers(headers: &mut HeaderMap, peer: IpAddr, trusted: bool) {
    let peer = sluice_http::client_ip::canonical(peer).to_string();
    let xff = HeaderName::from_static("x-forwarded-for");
    let proto = HeaderName::from_static("x-forwarded-proto");
    let host = HeaderName::from_static("x-forwarded-host");
    let forwarded_for = if trusted && headers.contains_key(&xff) {
        let mut chain: Vec<&str> = headers
            .get_all(&xff)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        chain.push(&peer);
        chain.join(", ")
    } else {
        peer
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(xff, value);
    }
    if !(trusted && headers.contains_key(&proto)) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    if !(trusted && headers.contains_key(&host)) {
        match headers.get(header::HOST).cloned() {
            Some(value) => {
                headers.insert(host, value);
            }
            None => {
                headers.remove(host);
            }
        }
    }
    if !trusted {
        headers.remove(header::FORWARDED);
    }
}

/// Whether the client reached the edge over TLS, as a trusted proxy says.
fn over_tls(headers: &HeaderMap, trusted: bool) -> bool {
    trusted
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// The upstream URI for `uri`: the upstream's scheme and authority, its path prefix,
/// then the request's path and query.
fn upstream_uri(upstream: &Uri, uri: &Uri) -> Result<Uri, axum::http::Error> {
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let base = upstream.path().trim_end_matches('/');
    let mut builder = Uri::builder();
    if let Some(scheme) = upstream.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = upstream.authority() {
        builder = builder.authority(authority.clone());
    }
    if base.is_empty() {
        builder.path_and_query(path_and_query).build()
    } else {
        builder
            .path_and_query(format!("{base}{path_and_query}"))
            .build()
    }
}

/// Whether `error` (or what caused it) is a timeout.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Marks an answer that sluice wrote in place of the upstream's. `request_sent` says
/// whether the request may have reached the upstream, which may then have done the
/// work: such an answer is never refunded, whatever its status.
#[derive(Debug, Clone, Copy)]
struct AnsweredBySluice {
    request_sent: bool,
}

fn upstream_failure(
    app: &AppState,
    status: StatusCode,
    code: &'static str,
    why: &str,
    request_sent: bool,
) -> Response {
    app.metrics.upstream_failures.inc();
    let mut response = ApiError::new(
        status,
        code,
        format!("the upstream app {why}; try again later"),
    )
    .into_response();
    response
        .extensions_mut()
        .insert(AnsweredBySluice { request_sent });
    response
}

/// Whether the cost of a request answered by `response` is given back: its status is
/// in `refund_on_status`, and the upstream answered it (or never got the request).
/// sluice's own 504 after the request was sent is not refunded: the upstream may be
/// finishing the work, and a client able to make calls slow would get them free.
fn refundable(proxy: &ProxyConfig, response: &Response) -> bool {
    proxy.refund_on_status.contains(response.status().as_u16())
        && response
            .extensions()
            .get::<AnsweredBySluice>()
            .is_none_or(|answer| !answer.request_sent)
}

/// Forwards an allowed request and returns the upstream's answer (or a 502/504).
async fn forward(
    app: &AppState,
    proxy: &ProxyConfig,
    live: &Live,
    peer: IpAddr,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let upgrade = requested_upgrade(&parts.headers);
    let client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let trusted = live.policy.client_ip.is_trusted_peer(peer);
    strip_hop_by_hop(&mut parts.headers);
    set_forwarding_headers(&mut parts.headers, peer, trusted);
    if let Some(protocol) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    let uri = match upstream_uri(&proxy.upstream, &parts.uri) {
        Ok(uri) => uri,
        Err(_) => {
            return ApiError::bad_request(
                "invalid_path",
                "the request path cannot be forwarded: send an origin-form path such as /search?q=x",
            )
            .into_response();
        }
    };
    let mut outgoing = axum::http::Request::new(body);
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = uri;
    *outgoing.version_mut() = Version::HTTP_11;
    *outgoing.headers_mut() = parts.headers;

    let client = client(Duration::from_millis(proxy.connect_timeout_ms));
    let timeout = Duration::from_millis(proxy.timeout_ms);
    let mut response = match tokio::time::timeout(timeout, client.request(outgoing)).await {
        Err(_) => {
            return upstream_failure(
                app,
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                &format!("did not answer within {} ms", proxy.timeout_ms),
                true,
            );
        }
        Ok(Err(error)) => {
            tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "upstream request failed");
            return if is_timeout(&error) {
                upstream_failure(
                    app,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    &format!(
                        "could not be connected to within {} ms",
                        proxy.connect_timeout_ms
                    ),
                    !error.is_connect(),
                )
            } else {
                upstream_failure(
                    app,
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "could not be reached or closed the connection",
                    !error.is_connect(),
                )
            };
        }
        Ok(Ok(response)) => response,
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            // The upstream switched protocols nobody asked for: the client could not follow.
            return upstream_failure(
                app,
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "switched protocols without being asked to",
                true,
            );
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, upstream_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut upstream_io = TokioIo::new(upstream_io);
                    // Ends when either side closes; errors are the other side going away.
                    let _ = tokio::io::copy_bidirectional(&mut client_io, &mut upstream_io).await;
                }
                Err(error) => tracing::debug!(%error, "upgrade was not completed"),
            }
        });
        let (mut parts, _) = response.into_parts();
        let protocol = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = protocol {
            parts.headers.insert(header::UPGRADE, protocol);
        }
        return Response::from_parts(parts, Body::empty());
    }

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

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

/// The fallback of the main router while proxying: the quota endpoint, or a decided and
/// forwarded request.
pub async fn proxy(
    State(app): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let live = app.live();
    let Some(proxy) = live.proxy.as_ref() else {
        // The proxy section was removed by a reload: it ends with a restart.
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the reverse proxy was removed from the config; restart sluice to stop proxying",
        )
        .into_response();
    };
    let peer = peer.ip();
    let trusted = live.policy.client_ip.is_trusted_peer(peer);
    let tls = over_tls(request.headers(), trusted);
    let session = session(&live, request.headers());
    if let Some(quota_path) = &proxy.quota_path
        && normalize_path(request.uri().path()) == *quota_path
    {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let mut response = quota(
            &app,
            &live,
            peer,
            (&method, &uri, request.headers()),
            &session,
        )
        .await;
        set_session_cookie(&live, &session, tls, response.headers_mut());
        return response;
    }

    let decision_request = {
        let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let incoming = IncomingRequest {
            peer: Some(peer),
            method: request.method().as_str(),
            path_and_query,
            headers: request.headers(),
            session: session.as_ref().map(|s| s.id.as_str()),
        };
        match live.policy.decision_request(&incoming, false) {
            Ok(decision_request) => decision_request,
            Err(error) => {
                let mut response = ApiError::from(error)
                    .closing_unless(!has_body(request.headers()))
                    .into_response();
                set_session_cookie(&live, &session, tls, response.headers_mut());
                return response;
            }
        }
    };
    let decision = if decision_request.checks.is_empty() {
        None
    } else {
        match app.decider.decide(&decision_request).await {
            Ok(decision) => Some(decision),
            Err(_) => {
                // The decider logged the store's error; its text stays out of answers.
                let mut response = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the counter store could not decide; see sluice's log",
                )
                .closing_unless(!has_body(request.headers()))
                .into_response();
                set_session_cookie(&live, &session, tls, response.headers_mut());
                return response;
            }
        }
    };

    if let Some(decision) = decision.as_ref().filter(|d| !d.allowed) {
        let denial = live.policy.responses.denial(&decision_request, decision);
        let body_unread = has_body(request.headers());
        let mut response = (denial.status, denial.headers, denial.body).into_response();
        if body_unread {
            // The body was never read: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        set_session_cookie(&live, &session, tls, response.headers_mut());
        return response;
    }

    let mut response = forward(&app, proxy, &live, peer, request).await;
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
    set_session_cookie(&live, &session, tls, response.headers_mut());
    response
}

#[derive(Serialize)]
struct QuotaAnswer<'a> {
    path: &'a str,
    method: &'a str,
    limits: Vec<QuotaWindow<'a>>,
}

#[derive(Serialize)]
struct QuotaWindow<'a> {
    limit: &'a str,
    rate: &'a str,
    quota: u64,
    remaining: u64,
    cost: u64,
    window_seconds: u64,
    reset_after_seconds: u64,
    reset_at: String,
    shadow: bool,
}

fn quota_error(message: String) -> Response {
    ApiError::bad_request("invalid_query", message).into_response()
}

/// `GET <quota_path>?path=/search&method=POST`: the caller's own remaining quota for a
/// request to `path` (method default `GET`), one entry per window of every limit that
/// would apply to it, keyed exactly as that request would be (same IP, headers, cookies
/// and session). Nothing is charged: the windows are read with cost 0 as a dry run. Each
/// entry's `cost` is what one such request spends. Bad queries are `400 invalid_query`.
async fn quota(
    app: &AppState,
    live: &Live,
    peer: IpAddr,
    (request_method, uri, headers): (&Method, &Uri, &HeaderMap),
    session: &Option<Session>,
) -> Response {
    let usage = "ask e.g. GET <quota_path>?path=/search&method=POST";
    if request_method != Method::GET && request_method != Method::HEAD {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("the quota endpoint answers GET only; {usage}"),
        )
        .into_response();
    }
    let mut path = None;
    let mut method = None;
    for (name, value) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        let slot = match &*name {
            "path" => &mut path,
            "method" => &mut method,
            other => {
                return quota_error(format!(
                    "unknown query parameter `{}`: only path and method are read; {usage}",
                    other.chars().take(64).collect::<String>()
                ));
            }
        };
        if slot.replace(value.into_owned()).is_some() {
            return quota_error(format!("`{name}` is given twice; give it once; {usage}"));
        }
    }
    let Some(path) = path else {
        return quota_error(format!(
            "the query needs `path`, the request to report on; {usage}"
        ));
    };
    if !path.starts_with('/') || path.len() > 2048 {
        return quota_error(format!(
            "path must be an absolute path of at most 2048 bytes starting with `/`; {usage}"
        ));
    }
    let method = match method {
        None => Method::GET,
        Some(text) => match Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes()) {
            Ok(method) if !text.trim().is_empty() => method,
            _ => {
                return quota_error(format!(
                    "`{}` is not an HTTP method; {usage}",
                    text.chars().take(64).collect::<String>()
                ));
            }
        },
    };
    let incoming = IncomingRequest {
        peer: Some(peer),
        method: method.as_str(),
        path_and_query: &path,
        headers,
        session: session.as_ref().map(|s| s.id.as_str()),
    };
    let priced = match live.policy.decision_request(&incoming, true) {
        Ok(priced) => priced,
        Err(error) => return quota_error(format!("`path`: {error}")),
    };
    let costs: Vec<u64> = priced.checks.iter().map(Check::cost).collect();
    let read = DecisionRequest {
        checks: priced
            .checks
            .iter()
            .filter_map(|c| Check::new(Arc::clone(c.limit()), c.key(), 0).ok())
            .collect(),
        dry_run: true,
    };
    let decision = if read.checks.is_empty() {
        Decision {
            allowed: true,
            retry_after: Some(0),
            degraded: false,
            results: Vec::new(),
        }
    } else {
        match app.decider.decide(&read).await {
            Ok(decision) => decision,
            Err(_) => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the counter store could not answer; see sluice's log",
                )
                .into_response();
            }
        }
    };
    let now = SystemTime::now();
    let limits = decision
        .results
        .iter()
        .map(|result| {
            let check = &read.checks[result.check];
            let window = &check.limit().windows()[result.window];
            let reset_after_seconds = (result.reset_after.max(0) as u64).div_ceil(1_000_000);
            QuotaWindow {
                limit: check.limit().name(),
                rate: &window.rate_text,
                quota: result.limit_value,
                remaining: result.remaining,
                cost: costs.get(result.check).copied().unwrap_or(1),
                window_seconds: window.window.rate().period_secs(),
                reset_after_seconds,
                reset_at: humantime::format_rfc3339_seconds(
                    now + Duration::from_secs(reset_after_seconds),
                )
                .to_string(),
                shadow: result.shadow,
            }
        })
        .collect();
    let mut response = json_response(
        StatusCode::OK,
        &QuotaAnswer {
            path: &path,
            method: method.as_str(),
            limits,
        },
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret-hop, content-length"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("x-secret-hop", "1"),
            ("content-length", "3"),
            ("x-user-id", "42"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-length", "x-user-id"]);
    }

    #[test]
    fn forwarding_headers_trust_only_trusted_peers() {
        let mut spoofed = HeaderMap::new();
        spoofed.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        spoofed.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        spoofed.insert("x-forwarded-host", HeaderValue::from_static("evil"));
        spoofed.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        spoofed.insert("host", HeaderValue::from_static("api.example"));
        let mut untrusted = spoofed.clone();
        set_forwarding_headers(&mut untrusted, "203.0.113.7".parse().unwrap(), false);
        assert_eq!(untrusted["x-forwarded-for"], "203.0.113.7");
        assert_eq!(untrusted["x-forwarded-proto"], "http");
        assert_eq!(untrusted["x-forwarded-host"], "api.example");
        assert!(!untrusted.contains_key("forwarded"));
        assert!(!over_tls(&spoofed, false));

        let mut trusted = spoofed.clone();
        set_forwarding_headers(&mut trusted, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(trusted["x-forwarded-for"], "6.6.6.6, 10.0.0.1");
        assert_eq!(trusted["x-forwarded-proto"], "https");
        assert_eq!(trusted["x-forwarded-host"], "evil");
        assert!(over_tls(&spoofed, true));
    }

    #[test]
    fn upstream_path_prefixes_are_prepended() {
        let base: Uri = "http://app:9000/api/".parse().unwrap();
        let uri: Uri = "/search?q=1".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, &uri).unwrap().to_string(),
            "http://app:9000/api/search?q=1"
        );
        let bare: Uri = "http://app:9000".parse().unwrap();
        assert_eq!(
            upstream_uri(&bare, &uri).unwrap().to_string(),
            "http://app:9000/search?q=1"
        );
    }
}
