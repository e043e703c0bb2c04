//! The shared state of a running server and its routes.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Serialize;
use serde_json::json;
use sluice_engine::{LimitSet, Store};
use sluice_http::HttpPolicy;

use crate::decider::Decider;
use crate::error::{ApiError, json_response};
use crate::metrics::Metrics;

/// Settings of the HTTP front door.
#[derive(Clone)]
pub struct ServerSettings {
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// The bearer token for admin calls; `None` disables them.
    pub admin_token: Option<String>,
    /// The deny status of `/v1/forward-auth`, when it differs from the policy's.
    pub forward_auth_deny_status: Option<axum::http::StatusCode>,
}

/// Prints everything but the admin token.
impl std::fmt::Debug for ServerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSettings")
            .field("max_body_bytes", &self.max_body_bytes)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "[redacted]"),
            )
            .field("forward_auth_deny_status", &self.forward_auth_deny_status)
            .finish()
    }
}

/// Everything a request handler needs.
pub struct AppState {
    /// The configured limits.
    pub limits: LimitSet,
    /// Routes, client identity and answers for the HTTP front doors.
    pub policy: HttpPolicy,
    /// The decision path.
    pub decider: Decider,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Front-door settings.
    pub settings: ServerSettings,
}

impl AppState {
    /// State over `store` with `limits` and the HTTP `policy`.
    pub fn new(
        limits: LimitSet,
        policy: HttpPolicy,
        store: Arc<dyn Store>,
        settings: ServerSettings,
    ) -> Self {
        let metrics = Arc::new(Metrics::new(&limits));
        AppState {
            decider: Decider::new(store, Arc::clone(&metrics)),
            limits,
            policy,
            metrics,
            settings,
        }
    }
}

/// The routes of the decision API.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/check", post(crate::check::check))
        .route("/v1/limits", get(limits))
        .route("/v1/reset", post(crate::admin::reset))
        .route(
            crate::forward_auth::PATH,
            any(crate::forward_auth::forward_auth),
        )
        .route(
            "/v1/forward-auth/{*original}",
            any(crate::forward_auth::forward_auth),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Binds `count` listeners on `listen` with `SO_REUSEPORT`, one per serving thread.
/// Must be called inside a Tokio runtime.
pub fn bind_listeners(
    listen: std::net::SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    // SO_REUSEPORT would let a second process bind the same port and quietly take half
    // the traffic. A plain bind first fails if anything holds the address, and turns
    // port 0 into one concrete port for every listener.
    let listen = std::net::TcpListener::bind(listen)?.local_addr()?;
    (0..count.max(1))
        .map(|_| {
            let socket = if listen.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(listen)?;
            socket.listen(1024)?.into_std()
        })
        .collect()
}

/// Serves `router` with one single-threaded runtime per listener: the kernel spreads
/// connections over the `SO_REUSEPORT` listeners and no thread ever wakes another, the
/// way nginx runs one event loop per worker. Blocks until every thread has finished its
/// in-flight requests after `shutdown` turns true.
pub fn serve_per_thread(
    listeners: Vec<std::net::TcpListener>,
    router: Router,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let router = router.clone();
            let mut shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("sluice-http-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        let stop = async move {
                            let _ = shutdown.wait_for(|stop| *stop).await;
                        };
                        serve(listener, router, stop).await
                    })
                })
        })
        .collect::<std::io::Result<_>>()?;
    for handle in handles {
        handle
            .join()
            .map_err(|_| std::io::Error::other("an HTTP thread panicked"))??;
    }
    Ok(())
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Answers are small: send them now rather than wait to coalesce.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // Front doors that resolve the client's address need the socket peer.
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Serialize)]
struct LimitInfo<'a> {
    name: &'a str,
    algorithm: &'static str,
    rates: Vec<&'a str>,
    windows: Vec<WindowInfo<'a>>,
    charge_denied: bool,
    shadow: bool,
}

#[derive(Serialize)]
struct WindowInfo<'a> {
    rate: &'a str,
    limit_value: u64,
    period_seconds: u64,
}

async fn limits(State(app): State<Arc<AppState>>) -> Response {
    let limits: Vec<LimitInfo<'_>> = app
        .limits
        .iter()
        .map(|l| LimitInfo {
            name: l.name(),
            algorithm: l.algorithm().as_str(),
            rates: l.windows().iter().map(|w| &*w.rate_text).collect(),
            windows: l
                .windows()
                .iter()
                .map(|w| WindowInfo {
                    rate: &w.rate_text,
                    limit_value: w.window.capacity(),
                    period_seconds: w.window.rate().period_secs(),
                })
                .collect(),
            charge_denied: l.charge_denied(),
            shadow: l.shadow(),
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "limits": limits }))
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    let store = app.decider.store();
    match store.ping().await {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({"status": "ready", "store": store.backend()}),
        ),
        Err(error) => {
            // The error may name hosts or carry a DSN: log it, answer without it.
            tracing::warn!(%error, backend = store.backend(), "store not ready");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "unavailable", "store": store.backend()}),
            )
        }
    }
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let store = app.decider.store();
    let text = app.metrics.render(store.backend(), store.stats());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

const ENDPOINTS: &str = "POST /v1/check, ANY /v1/forward-auth, GET /v1/limits, POST /v1/reset, GET /healthz, GET /readyz, GET /metrics";

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "no endpoint {method} {}; sluice serves {ENDPOINTS}",
            uri.path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not accept {method}; sluice serves {ENDPOINTS}",
            uri.path()
        ),
    )
    .into_response()
}
