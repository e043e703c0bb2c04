//! The admin dashboard: one page on the admin listener showing every limit with its
//! rates and plans, checks and denials per minute over the last hour, the top spenders
//! and the most denied keys, the store's health and `on_error`, and the reload status.
//!
//! The page, its script and its style are embedded (`include_str!`) and served with a
//! strict Content-Security-Policy (nothing from elsewhere, no inline script or style);
//! the charts are drawn as SVG by the page's own script. The page itself holds no data:
//! its script asks for the admin token (a form, or `#token=` in the URL, which it
//! removes from the address bar at once), keeps it in `sessionStorage`, and polls
//! [`DATA_PATH`] with `Authorization: Bearer`, which [`crate::admin::authorize`] checks
//! like every admin call. No cookie is set, so there is nothing for another site to
//! ride on. See docs/design/operations.md ("Dashboard").

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_runtime::AppState;
use sluice_topkeys::{By, Window};

use crate::admin::{authorize, top_body};
use crate::app::LimitInfo;
use crate::error::{ApiError, json_response};

/// The page.
pub const PAGE_PATH: &str = "/v1/admin/dashboard";
/// What the page polls (JSON, behind the admin token).
pub const DATA_PATH: &str = "/v1/admin/dashboard/data";
/// The page's script.
pub const SCRIPT_PATH: &str = "/v1/admin/dashboard/app.js";
/// The page's style.
pub const STYLE_PATH: &str = "/v1/admin/dashboard/app.css";

/// Nothing but this server's own script, style and JSON; no frames, forms that post
/// elsewhere, or `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// Keys listed per limit and ranking.
const TOP_N: usize = 10;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// `GET /v1/admin/dashboard`: the page (no data; it asks for the token).
pub async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

/// The page's script.
pub async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

/// The page's style.
pub async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// `GET /v1/admin/dashboard/data`: everything the page shows, behind the admin token.
pub async fn data(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let live = app.live();
    authorize(&live, &headers)?;
    let counters = app.metrics.limit_counters();
    let now = app.decider.clock_secs();
    let envoy_limits = live
        .envoy
        .iter()
        .flat_map(|envoy| envoy.domains.limits().iter());
    let limits: Vec<Value> = live
        .limits
        .iter()
        .chain(envoy_limits)
        .map(|limit| {
            let name = limit.name();
            let counter = counters.get(name);
            let minutes: Vec<Value> = counter
                .map(|c| c.timeline.minutes(now))
                .unwrap_or_default()
                .iter()
                .map(|m| {
                    json!({
                        "minutes_ago": (now / 60).saturating_sub(m.start_secs / 60),
                        "decisions": m.decisions,
                        "denied": m.denied,
                    })
                })
                .collect();
            let top = |by| {
                counter
                    .and_then(|c| c.top.as_ref())
                    .map(|t| top_body(name, &t.top(Window::Minute, by, TOP_N, now)))
            };
            json!({
                "limit": LimitInfo::of(limit),
                "totals": counter.map(|c| json!({
                    "allowed": c.allowed.get(),
                    "denied": c.denied.get(),
                    "shadow_denied": c.shadow_denied.get(),
                })),
                "minutes": minutes,
                "top_spend": top(By::Spend),
                "top_denied": top(By::Denials),
            })
        })
        .collect();
    let store = app.decider.store();
    let reachable = store.health().await.is_ok();
    let stats = store.stats();
    let shared = !matches!(store.backend(), "memory" | "disk");
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "uptime_seconds": app.uptime_seconds(),
            "config_version": live.version,
            "top_keys": {
                "enabled": app.metrics.top_keys_capacity().is_some(),
                "capacity": app.metrics.top_keys_capacity(),
                "window": Window::Minute.as_str(),
            },
            "limits": limits,
            "store": {
                "backend": store.backend(),
                "reachable": reachable,
                "shared": shared,
                "on_error": app.on_error.as_str(),
                "deciding_by_on_error": shared && !reachable,
                "keys": stats.keys,
                "evictions": stats.evictions,
                "degraded_decisions": app.metrics.degraded.get(),
                "store_errors": app.metrics.store_errors.get(),
            },
            "reload": app.config.status(),
        }),
    ))
}
