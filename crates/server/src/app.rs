//! The routers of the main and admin listeners: which of sluice's endpoints each
//! serves, where the reverse proxy takes over, and the small endpoints (limits, stats,
//! health, readiness, metrics).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Serialize;
use serde_json::json;
use sluice_config::SluiceEndpoints;
use sluice_runtime::AppState;

use crate::error::{ApiError, json_response};
use crate::express::{Express, Lane};

/// The endpoints of the main listener: its router, behind the express lane. With
/// `admin_separate` (an `admin.listen` address), the admin calls are served only by
/// [`admin_router`] and answer 404 here. With a reverse proxy configured, every request
/// that is not one of sluice's endpoints goes to the upstream, and
/// `proxy.sluice_endpoints` says where those endpoints are: at their paths (`main`),
/// only on the admin listener (`admin`), or under a prefix.
pub fn router(state: Arc<AppState>, admin_separate: bool) -> Express {
    let endpoints = state
        .live()
        .proxy
        .as_ref()
        .map(|proxy| proxy.sluice_endpoints.clone());
    let own = || {
        own_routes(admin_separate)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
    };
    // Each arm says which requests its router would give straight to a handler: where
    // it serves `POST /v1/check`, or all of them when it only proxies.
    let (routes, lane) = match endpoints {
        None => (own(), check_lane(CHECK_PATH)),
        Some(SluiceEndpoints::Main) => (
            own_routes(admin_separate)
                .fallback(crate::proxy::proxy)
                .method_not_allowed_fallback(method_not_allowed),
            check_lane(CHECK_PATH),
        ),
        // Nothing but the proxy: the lane takes every request there.
        Some(SluiceEndpoints::Admin) => (Router::new().fallback(crate::proxy::proxy), Lane::Proxy),
        Some(SluiceEndpoints::Prefix(prefix)) => (
            Router::new()
                .nest(&prefix, own())
                .fallback(crate::proxy::proxy),
            check_lane(&format!("{prefix}{CHECK_PATH}")),
        ),
    };
    Express::new(routes.with_state(Arc::clone(&state)), state, lane)
}

/// Where [`own_routes`] serves the decision API.
const CHECK_PATH: &str = "/v1/check";

/// The express lane for a router that serves the decision API at `path`.
fn check_lane(path: &str) -> Lane {
    Lane::Check(Arc::from(path))
}

/// sluice's own endpoints (and the admin calls unless they are served elsewhere),
/// without a fallback.
fn own_routes(admin_separate: bool) -> Router<Arc<AppState>> {
    let mut routes = Router::new()
        .route(CHECK_PATH, post(crate::check::check))
        .route("/v1/reserve", post(crate::reserve::reserve))
        .route("/v1/settle", post(crate::reserve::settle))
        .route("/v1/release", post(crate::reserve::release))
        .route(
            crate::forward_auth::PATH,
            any(crate::forward_auth::forward_auth),
        )
        .route(
            "/v1/forward-auth/{*original}",
            any(crate::forward_auth::forward_auth),
        )
        .route("/v1/limits", get(limits))
        .route("/v1/stats", get(stats))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if !admin_separate {
        routes = routes.merge(admin_routes());
    }
    routes
}

/// The admin calls alone, for a separate `admin.listen` address; with
/// `proxy.sluice_endpoints: admin`, every sluice endpoint.
pub fn admin_router(state: Arc<AppState>) -> Express {
    let all_endpoints_here = state
        .live()
        .proxy
        .as_ref()
        .is_some_and(|proxy| proxy.sluice_endpoints == SluiceEndpoints::Admin);
    let (routes, lane) = if all_endpoints_here {
        (own_routes(false), check_lane(CHECK_PATH))
    } else {
        (admin_routes().route("/healthz", get(healthz)), Lane::Closed)
    };
    let routes = routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::clone(&state));
    Express::new(routes, state, lane)
}

fn admin_routes() -> Router<Arc<AppState>> {
    use crate::admin;
    Router::new()
        .route("/v1/reset", post(admin::reset))
        .route("/v1/status", get(admin::status))
        .route("/v1/admin/reload", post(admin::reload))
        .route("/v1/admin/reset-limit", post(admin::reset_limit))
        .route("/v1/admin/state", get(admin::state))
        .route(
            "/v1/admin/entries",
            get(crate::entries::list).post(crate::entries::add),
        )
        .route("/v1/admin/entries/remove", post(crate::entries::remove))
        .route("/v1/admin/top", get(admin::top))
        .route(crate::dashboard::PAGE_PATH, get(crate::dashboard::page))
        .route(crate::dashboard::DATA_PATH, get(crate::dashboard::data))
        .route(crate::dashboard::SCRIPT_PATH, get(crate::dashboard::script))
        .route(crate::dashboard::STYLE_PATH, get(crate::dashboard::style))
}

/// One limit as `/v1/limits` and the dashboard list it.
#[derive(Serialize)]
pub(crate) struct LimitInfo<'a> {
    name: &'a str,
    algorithm: &'static str,
    rates: Vec<&'a str>,
    windows: Vec<WindowInfo<'a>>,
    charge_denied: bool,
    shadow: bool,
    /// Other plans' rates (`plans:`), besides the default ones above.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    plans: Vec<PlanInfo<'a>>,
}

/// One plan of a limit, as `/v1/limits` lists it.
#[derive(Serialize)]
struct PlanInfo<'a> {
    plan: &'a str,
    algorithm: &'a str,
    rates: Vec<&'a str>,
}

#[derive(Serialize)]
struct WindowInfo<'a> {
    rate: &'a str,
    limit_value: u64,
    period_seconds: u64,
}

impl<'a> LimitInfo<'a> {
    /// `limit`'s rates, windows and plans.
    pub(crate) fn of(l: &'a sluice_engine::Limit) -> Self {
        LimitInfo {
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
            plans: l
                .plans()
                .iter()
                .map(|p| PlanInfo {
                    plan: p.plan().unwrap_or_default(),
                    algorithm: p.algorithm().as_str(),
                    rates: p.windows().iter().map(|w| &*w.rate_text).collect(),
                })
                .collect(),
        }
    }
}

async fn limits(State(app): State<Arc<AppState>>) -> Response {
    let live = app.live();
    let limits: Vec<LimitInfo<'_>> = live.limits.iter().map(|l| LimitInfo::of(l)).collect();
    json_response(StatusCode::OK, &json!({ "limits": limits }))
}

/// `GET /v1/stats`: counts since start for teams without Prometheus.
async fn stats(State(app): State<Arc<AppState>>) -> Response {
    let live = app.live();
    let counters = app.metrics.limit_counters();
    let limits: serde_json::Map<String, serde_json::Value> = live
        .limits
        .iter()
        .map(|limit| {
            let counts = counters.get(limit.name()).map_or_else(
                || json!({"allowed": 0, "denied": 0, "shadow_denied": 0}),
                |c| json!({"allowed": c.allowed.get(), "denied": c.denied.get(), "shadow_denied": c.shadow_denied.get()}),
            );
            (limit.name().to_string(), counts)
        })
        .collect();
    let store = app.decider.store();
    // The known state, not a round trip: this endpoint needs no token.
    let reachable = store.health().await.is_ok();
    let store_stats = store.stats();
    json_response(
        StatusCode::OK,
        &json!({
            "limits": limits,
            "degraded": app.metrics.degraded.get(),
            "store": {
                "backend": store.backend(),
                "reachable": reachable,
                "keys": store_stats.keys,
                "evictions": store_stats.evictions,
            },
            "config_version": live.version,
            "uptime_seconds": app.uptime_seconds(),
        }),
    )
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    let store = app.decider.store();
    // The known state, not a round trip: this endpoint needs no token, and a flood of
    // it must not reach the store.
    match store.health().await {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({"status": "ready", "store": store.backend()}),
        ),
        Err(error) => {
            // The error may name hosts or carry a DSN: not in the answer. The failure
            // policy logs the outage once; a line per call would let callers flood the log.
            tracing::debug!(%error, backend = store.backend(), "store not ready");
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

const ENDPOINTS: &str = "POST /v1/check, ANY /v1/forward-auth, GET /v1/limits, GET /v1/stats, GET /healthz, GET /readyz, GET /metrics, and admin calls (POST /v1/reset, GET /v1/status, POST /v1/admin/reload, POST /v1/admin/reset-limit, GET /v1/admin/state, GET /v1/admin/top, GET /v1/admin/dashboard)";

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
