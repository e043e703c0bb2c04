//! sluice inside a Rust app: a [`tower::Layer`] that applies sluice's routes and limits
//! to every request an axum (or any tower/hyper) service handles, deciding with any
//! sluice [`Store`] directly: the in-process memory store, or a shared one so several
//! instances count together.
//!
//! It is the same machinery as the sluice server's front doors: routes and key
//! templates, client-IP resolution behind trusted proxies, one atomic decision per
//! request over every matching limit, and the same answers (`429` or the configured
//! status, `Retry-After`, `RateLimit`/`RateLimit-Policy` and `X-RateLimit-*` headers,
//! the JSON body template). Allowed responses get the rate-limit headers added.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use sluice_tower::RateLimitLayer;
//!
//! # async fn run(config: sluice_config::Config) {
//! let store = Arc::new(sluice_store_memory::MemoryStore::new(Default::default()));
//! let layer = RateLimitLayer::from_config(&config, store);
//! let app: Router = Router::new()
//!     .route("/chat/message", post(|| async { "hello" }))
//!     .layer(layer);
//! // Serve with the peer address, so {client_ip} resolves:
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await.unwrap();
//! # }
//! ```
//!
//! Runtime entries (plan assignments, rate overrides, block and allow lists; see the
//! README's "Plans, overrides and block lists at run time") apply here too when the
//! layer is built with [`RateLimitLayer::from_config`] or given the limits with
//! [`RateLimitLayer::with_entries`]: they are read from the store the layer decides
//! with, so on a shared store an entry written through any sluice server's admin API
//! is enforced by the app within [`sluice_access::POLL_INTERVAL`] plus one round trip.
//! The first request reads them before it is decided; later ones never wait for a read.
//!
//! Routes charged from the answer (`cost: usage`) or holding a concurrency slot until it
//! ends are settled by sluice's reverse proxy only: the layer answers them
//! `500 needs_reverse_proxy` rather than decide half of them.
//!
//! The socket peer is read from axum's `ConnectInfo<SocketAddr>` extension (serve with
//! `into_make_service_with_connect_info`; `MockConnectInfo` in tests), or from a plain `SocketAddr` extension that a
//! hyper app inserts itself. Without either, `{client_ip}` does not resolve and limits
//! keyed only by it are skipped: never silently one bucket for everyone.
//!
//! ## Compared with tower-governor
//!
//! | | sluice-tower | tower-governor |
//! |---|---|---|
//! | setup | routes and limits in sluice's YAML (or built in code), one layer for the app | one layer per quota, wrapped around the routes it covers |
//! | limits per request | any number, layered (user, IP, key, global), decided atomically: a denial charges nothing | one quota per layer; stacked layers charge independently |
//! | keys | templates over headers, cookies, query, client IP, with fallbacks (`user:{header.x-user-id}` then `ip:{client_ip}`) | a `KeyExtractor` per layer (peer IP, smart IP, or your own code) |
//! | client IP | trusted proxy list, right-to-left `X-Forwarded-For` / `Forwarded` walk, IPv6 /64 grouping, optional hashing | `SmartIpKeyExtractor` trusts forwarding headers from anyone |
//! | algorithms | gcra (with burst), sliding window, fixed window (UTC-aligned); several rates per limit; cost per request | gcra |
//! | storage | memory (bounded, swept) or a shared store, so several instances count together | in-process only; counters reset on restart |
//! | answers | 429 (configurable), `Retry-After` rounded up from the real wait, IETF `RateLimit` headers and legacy `X-RateLimit-*`, JSON body template | 429 with `x-ratelimit-after`/`retry-after` headers, plain text body |
//! | shadow mode, `charge_denied` | yes | no |
//! | metrics | not from the layer yet (the sluice server exports them) | no |
//!
//! tower-governor is the lighter choice for a single in-process quota per route group;
//! sluice-tower is for layered limits that must agree with other instances and with
//! the sluice server.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, OriginalUri};
use http::{HeaderValue, Request, Response, StatusCode};
use sluice_access::{Access, POLL_INTERVAL, Screen, now_ms};
use sluice_engine::{LimitSet, Store};
use sluice_http::{HttpPolicy, IncomingRequest};
use tower::{Layer, Service};

/// The layer: wraps services in [`RateLimit`].
#[derive(Clone)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

struct Shared {
    policy: HttpPolicy,
    store: Arc<dyn Store>,
    entries: Option<Entries>,
}

/// The runtime entries the layer enforces, and when they were last polled.
struct Entries {
    access: Access,
    /// The configured limits: overrides and plans are built against them.
    limits: LimitSet,
    /// Milliseconds since the Unix epoch when the last poll started; one request in
    /// each [`POLL_INTERVAL`] starts the next.
    polled_at_ms: AtomicU64,
}

impl RateLimitLayer {
    /// A layer deciding with `store` by `policy`, without runtime entries (see
    /// [`RateLimitLayer::with_entries`]).
    pub fn new(policy: HttpPolicy, store: Arc<dyn Store>) -> Self {
        RateLimitLayer {
            shared: Arc::new(Shared {
                policy,
                store,
                entries: None,
            }),
        }
    }

    /// This layer, also enforcing the runtime entries kept in its store, against the
    /// configured `limits` (the ones the policy's routes use; an override or plan
    /// naming another limit is skipped).
    pub fn with_entries(self, limits: LimitSet) -> Self {
        let shared = match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared,
            // Still shared with services made from it: they keep what they had.
            Err(shared) => Shared {
                policy: shared.policy.clone(),
                store: Arc::clone(&shared.store),
                entries: None,
            },
        };
        RateLimitLayer {
            shared: Arc::new(Shared {
                entries: Some(Entries {
                    access: Access::new(&limits),
                    limits,
                    polled_at_ms: AtomicU64::new(0),
                }),
                ..shared
            }),
        }
    }

    /// A layer with the routes, client-IP settings and answers of a loaded sluice
    /// config, enforcing the runtime entries kept in `store`.
    pub fn from_config(config: &sluice_config::Config, store: Arc<dyn Store>) -> Self {
        Self::new(
            HttpPolicy {
                rules: config.routes.clone(),
                client_ip: sluice_http::ClientIpResolver::new(config.client_ip.clone()),
                responses: config.responses.clone(),
                identity: config.identity.clone(),
                plan_from: config.plan_from.clone(),
            },
            store,
        )
        .with_entries(config.limits.clone())
    }
}

impl Shared {
    /// Starts a poll of the entries when the last one is [`POLL_INTERVAL`] old: in the
    /// background, or in line while none has been read yet, so the first request is
    /// decided with them.
    async fn poll_entries(self: &Arc<Self>) {
        let Some(entries) = &self.entries else {
            return;
        };
        let now = now_ms();
        let last = entries.polled_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < POLL_INTERVAL.as_millis() as u64
            || entries
                .polled_at_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if !entries.access.has_read() {
            self.refresh_entries().await;
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = Arc::clone(self);
                runtime.spawn(async move { shared.refresh_entries().await });
            }
            Err(_) => self.refresh_entries().await,
        }
    }

    async fn refresh_entries(&self) {
        if let Some(entries) = &self.entries
            && let Err(error) = entries.access.refresh(&*self.store, &entries.limits).await
        {
            // The entries last read stay in force.
            tracing::warn!(%error, "reading sluice's runtime entries failed; the ones last read stay in force");
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The service: decides each request before passing it on.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn peer<B>(request: &Request<B>) -> Option<IpAddr> {
    let extensions = request.extensions();
    // In the order axum's own `ConnectInfo` extractor looks, then a plain `SocketAddr`.
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
        .or_else(|| {
            extensions
                .get::<MockConnectInfo<SocketAddr>>()
                .map(|info| info.0.ip())
        })
        .or_else(|| extensions.get::<SocketAddr>().map(SocketAddr::ip))
}

fn plain<B: From<Vec<u8>>>(
    status: StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> Response<B> {
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: From<Vec<u8>> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone is not driven to readiness; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            // Under `Router::nest` axum strips the prefix from the URI; routes are written
            // against the full path, which axum keeps as `OriginalUri`.
            let uri = request
                .extensions()
                .get::<OriginalUri>()
                .map_or_else(|| request.uri().clone(), |original| original.0.clone());
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            let incoming = IncomingRequest {
                peer: peer(&request),
                method: request.method().as_str(),
                path_and_query,
                headers: request.headers(),
                session: None,
            };
            let (mut decision_request, client) = match shared
                .policy
                .screened_request(&incoming, false)
            {
                Ok(screened) => screened,
                // A path or key the app could read in more than one way is refused
                // rather than guessed (see `sluice_http::path`); so, with a 500, is a
                // route the layer cannot decide (`cost: usage`, concurrency limits:
                // settled when the answer ends, which only sluice's proxy does).
                Err(error) => {
                    let mut headers = http::HeaderMap::new();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    if error.status() == http::StatusCode::UNAUTHORIZED {
                        // A bearer token that did not verify (RFC 6750).
                        headers.insert(
                            http::header::WWW_AUTHENTICATE,
                            HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                        );
                    }
                    let body =
                        serde_json::json!({"error": error.code(), "message": error.to_string()});
                    return Ok(plain(
                        error.status(),
                        headers,
                        body.to_string().into_bytes(),
                    ));
                }
            };
            let responses = &shared.policy.responses;
            if let Some(entries) = &shared.entries {
                shared.poll_entries().await;
                let directory = entries.access.current();
                if !directory.is_empty() {
                    let now = now_ms();
                    // A blocked address is blocked on every path, limited or not.
                    match directory.screen(&decision_request, client, now) {
                        Screen::Blocked(listed) => {
                            let blocked = responses.blocked(&listed);
                            return Ok(plain(blocked.status, blocked.headers, blocked.body));
                        }
                        Screen::Allowed(_) => return inner.call(request).await,
                        Screen::Limits => {
                            directory.assign(&mut decision_request, now);
                        }
                    }
                }
            }
            if decision_request.checks.is_empty() {
                return inner.call(request).await;
            }
            let decision = match sluice_engine::decide(&*shared.store, &decision_request).await {
                Ok(decision) => decision,
                Err(error) => {
                    tracing::warn!(%error, "sluice store failed; answering 503");
                    let mut headers = http::HeaderMap::new();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    let body = br#"{"error": "store_unavailable", "message": "the rate limiter's store could not decide"}"#;
                    return Ok(plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        headers,
                        body.to_vec(),
                    ));
                }
            };
            if !decision.allowed {
                let denial = responses.denial(&decision_request, &decision);
                return Ok(plain(denial.status, denial.headers, denial.body));
            }
            let mut response = inner.call(request).await?;
            responses.add_rate_limit_headers(&decision_request, &decision, response.headers_mut());
            Ok(response)
        })
    }
}
