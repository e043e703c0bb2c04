//! Forwarding an allowed request to the upstream and its answer back: the pooled
//! client (one per serving thread), hop-by-hop headers, `X-Forwarded-*` and
//! `X-Real-IP`, WebSocket upgrades, and the 502/504 sluice writes when the upstream
//! fails (marked, so that such an answer is not refunded once the request was sent).

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::ProxyConfig;
use sluice_runtime::{AppState, Live};

use crate::error::ApiError;

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
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "expect"
    )
}

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
    // Each removal hashes its name: remove only those present (usually none, or the
    // `Connection` an upstream answers with).
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in present {
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// Headers that name the client's address in a CDN's or load balancer's convention.
/// Behind one, its proxy is trusted and they pass; from anyone else they are the
/// client's own words about itself, and an app that believes one could be told any
/// address.
const CLIENT_ADDRESS_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
];

/// Sets `X-Forwarded-For`, `-Proto`, `-Host` and `X-Real-IP`, and drops the client's
/// own `Forwarded` and [`CLIENT_ADDRESS_HEADERS`] unless a trusted proxy sent them (see
/// the module doc).
fn set_forwarding_headers(headers: &mut HeaderMap, peer: IpAddr, trusted: bool) {
    let peer = sluice_http::client_ip::ip_text(peer);
    // Apps behind nginx often take the client from `X-Real-IP`: one a client wrote
    // itself must not reach them. As Traefik does: a trusted proxy's is kept, any
    // other is the peer.
    if !(trusted && headers.contains_key(&X_REAL_IP))
        && let Ok(value) = HeaderValue::from_str(&peer)
    {
        headers.insert(X_REAL_IP, value);
    }
    let (xff, proto, host) = (X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST);
    // A trusted proxy's lines are kept as bytes: one skipped for a byte outside ASCII
    // (the client's, at its left) would take the address that proxy appended with it,
    // and the app would see the client as that proxy.
    let forwarded_for: Vec<u8> = if trusted && headers.contains_key(&xff) {
        let mut chain = Vec::new();
        for line in headers.get_all(&xff) {
            chain.extend_from_slice(line.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(peer.as_bytes());
        chain
    } else {
        peer.into_bytes()
    };
    if let Ok(value) = HeaderValue::from_bytes(&forwarded_for) {
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
        // Most requests carry none of them: one pass over the few names the request
        // has is cheaper than a hashed removal of each absent one.
        let unvouched: Vec<HeaderName> = headers
            .keys()
            .filter(|name| *name == header::FORWARDED || CLIENT_ADDRESS_HEADERS.contains(name))
            .cloned()
            .collect();
        for name in unvouched {
            headers.remove(name);
        }
    }
}

/// Whether the client reached the edge over TLS, as a trusted proxy says.
pub(super) fn over_tls(headers: &HeaderMap, trusted: bool) -> bool {
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

/// Whether `response` was written by sluice in place of the upstream's (a 502/504), and
/// if so whether the request may have reached the upstream: `Some(false)` means the
/// call never ran.
pub(super) fn answered_by_sluice(response: &Response) -> Option<bool> {
    response
        .extensions()
        .get::<AnsweredBySluice>()
        .map(|answer| answer.request_sent)
}

/// Whether the cost of a request answered by `response` is given back: its status is
/// in `refund_on_status`, and the upstream answered it (or never got the request).
/// sluice's own 504 after the request was sent is not refunded: the upstream may be
/// finishing the work, and a client able to make calls slow would get them free.
pub(super) fn refundable(proxy: &ProxyConfig, response: &Response) -> bool {
    proxy.refund_on_status.contains(response.status().as_u16())
        && response
            .extensions()
            .get::<AnsweredBySluice>()
            .is_none_or(|answer| !answer.request_sent)
}

/// Forwards an allowed request and returns the upstream's answer (or a 502/504).
pub(super) async fn forward(
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
    // An upgraded connection still counts under http.max_connections while it is copied.
    let slot = parts
        .extensions
        .remove::<sluice_runtime::Connection>()
        .map(|connection| connection.slot);
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
            let _slot = slot;
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
        spoofed.append("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        spoofed.append("x-real-ip", HeaderValue::from_static("7.7.7.7"));
        spoofed.insert("cf-connecting-ip", HeaderValue::from_static("6.6.6.6"));
        spoofed.insert("true-client-ip", HeaderValue::from_static("6.6.6.6"));
        let mut untrusted = spoofed.clone();
        set_forwarding_headers(&mut untrusted, "203.0.113.7".parse().unwrap(), false);
        assert_eq!(untrusted["x-forwarded-for"], "203.0.113.7");
        let real: Vec<_> = untrusted.get_all("x-real-ip").iter().collect();
        assert_eq!(real, ["203.0.113.7"], "every spoofed X-Real-IP is replaced");
        for name in CLIENT_ADDRESS_HEADERS {
            assert!(!untrusted.contains_key(&name), "{name} is dropped");
        }
        assert_eq!(untrusted["x-forwarded-proto"], "http");
        assert_eq!(untrusted["x-forwarded-host"], "api.example");
        assert!(!untrusted.contains_key("forwarded"));
        assert!(!over_tls(&spoofed, false));

        let mut trusted = spoofed.clone();
        set_forwarding_headers(&mut trusted, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(trusted["x-forwarded-for"], "6.6.6.6, 10.0.0.1");
        assert_eq!(trusted["x-forwarded-proto"], "https");
        assert_eq!(trusted["x-forwarded-host"], "evil");
        assert_eq!(trusted["x-real-ip"], "6.6.6.6", "a trusted proxy's is kept");
        assert_eq!(trusted["cf-connecting-ip"], "6.6.6.6");
        assert_eq!(trusted["true-client-ip"], "6.6.6.6");
        assert!(over_tls(&spoofed, true));

        let mut plain = HeaderMap::new();
        set_forwarding_headers(&mut plain, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(plain["x-real-ip"], "10.0.0.1", "none sent: the peer");

        // A trusted proxy's line that starts with the client's non-ASCII byte keeps the
        // address the proxy appended to it, and so does every other line.
        let mut raw = HeaderMap::new();
        raw.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff, 198.51.100.7").unwrap(),
        );
        raw.append("x-forwarded-for", HeaderValue::from_static("10.0.0.9"));
        set_forwarding_headers(&mut raw, "10.0.0.1".parse().unwrap(), true);
        assert_eq!(
            raw["x-forwarded-for"].as_bytes(),
            b"\xff, 198.51.100.7, 10.0.0.9, 10.0.0.1"
        );
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
