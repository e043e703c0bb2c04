//! The quota endpoint (`proxy.quota_path`): a caller reads its own remaining quota for
//! a request, keyed exactly as that request would be, without charging anything.
//! Metered limits (`cost: usage`) are shown like the others, with `metered: true` and no
//! `cost` (a call spends what its answer reports); a concurrency limit's quota is its
//! slots, `remaining` the free ones, and it has no window (`window_seconds: 0`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sluice_engine::{Decision, DecisionRequest};
use sluice_http::{IncomingRequest, Session};
use sluice_runtime::{AppState, Live};

use crate::error::{ApiError, json_response};

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
    /// `None` for a metered check: its cost is known only from the answer.
    cost: Option<u64>,
    metered: bool,
    window_seconds: u64,
    reset_after_seconds: u64,
    reset_at: String,
    shadow: bool,
    /// The plan whose rates apply to the caller, when not the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<&'a str>,
}

fn quota_error(message: String) -> Response {
    ApiError::bad_request("invalid_query", message).into_response()
}

/// `GET <quota_path>?path=/search&method=POST`: the caller's own remaining quota for a
/// request to `path` (method default `GET`), one entry per window of every limit that
/// would apply to it, keyed exactly as that request would be (same IP, headers, cookies
/// and session). Nothing is charged: the windows are read with cost 0 as a dry run. Each
/// entry's `cost` is what one such request spends (`null` for a metered limit, whose
/// calls spend what their answers report). Bad queries are `400 invalid_query`.
pub(super) async fn quota(
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
    let plan = match live.policy.plan(&incoming, true) {
        Ok(plan) => plan,
        Err(error) => return quota_error(format!("`path`: {error}")),
    };
    let costs: Vec<Option<u64>> = plan
        .request
        .checks
        .iter()
        .zip(&plan.costs)
        .map(|(check, cost)| (!cost.is_metered()).then(|| check.cost()))
        .collect();
    let mut read = DecisionRequest {
        checks: plan
            .request
            .checks
            .iter()
            // At cost 0, keeping whether each key is trusted: the read is screened by
            // the entries like the request it previews.
            .map(|c| c.with_cost(0))
            .collect(),
        dry_run: true,
    };
    let decision = if read.checks.is_empty() {
        Decision {
            allowed: true,
            retry_after: Some(0),
            degraded: false,
            results: Vec::new(),
            listed: None,
        }
    } else {
        match app.decider.decide(&mut read).await {
            Ok(decision) => decision,
            Err(_) => {
                return ApiError::store_unavailable("reading the quota").into_response();
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
            let reset_after_seconds = sluice_engine::seconds_ceil(result.reset_after);
            let cost = costs.get(result.check).copied().unwrap_or(Some(1));
            QuotaWindow {
                limit: check.limit().name(),
                rate: &window.rate_text,
                quota: result.limit_value,
                remaining: result.remaining,
                cost,
                metered: cost.is_none(),
                // Slots in flight come back when calls end, not with a window.
                window_seconds: if check.limit().is_concurrency() {
                    0
                } else {
                    window.window.rate().period_secs()
                },
                reset_after_seconds,
                reset_at: humantime::format_rfc3339_seconds(
                    now + Duration::from_secs(reset_after_seconds),
                )
                .to_string(),
                shadow: result.shadow,
                plan: check.limit().plan(),
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
