//! The admin API of runtime entries (see `sluice_access`): plan assignments, rate
//! overrides, block and allow lists, stored in the counters' store so every instance
//! enforces them (within `sluice_runtime::access::POLL_INTERVAL`).
//!
//! - `GET /v1/admin/entries`: every entry, and records skipped because they no longer
//!   fit the config.
//! - `POST /v1/admin/entries`: adds or replaces one (same kind, limit and target).
//! - `POST /v1/admin/entries/remove`: removes one, named as it was added.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use sluice_access::{Entry, EntryError, Kind};
use sluice_engine::Record;
use sluice_runtime::AppState;
use sluice_runtime::access::now_ms;

use crate::admin::authorize;
use crate::error::{ApiError, json_response};
use crate::request::read_json;

const ENTRY_SHAPE: &str = r#"{"kind": "plan" | "rate" | "block" | "allow", "subject": "customer:42" | "ip": "203.0.113.0/24", "plan": "pro", "limit": "api", "rate": "2000/hour", "ttl_ms": 86400000 | "expires_at_ms": ..., "reason": "..."}"#;
const REMOVE_SHAPE: &str = r#"{"kind": "block", "subject": "customer:42" | "ip": "203.0.113.0/24", "limit": "api" (for kind "rate")}"#;

/// What the answer to a write of an allow entry for a subject says of the keys it can
/// match (see `sluice_engine::Check::key_is_trusted`).
pub const ALLOW_SUBJECT_NOTE: &str = "an allow subject matches only keys the client cannot choose: a key given to /v1/check or /v1/reserve, an Envoy descriptor entry or rule key, and keys of route templates that read only {client_ip}, {jwt.*}, {session} and literals; a key from a template that reads a header, cookie, query parameter, {path} or {method} never matches it and is limited as usual";

/// `GET /v1/admin/entries`.
pub async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let live = app.live();
    authorize(&live, &headers)?;
    // Read now, so the list is the store's and not this instance's last poll.
    app.refresh_access().await;
    let directory = app.access.directory();
    let now = now_ms();
    let entries: Vec<serde_json::Value> = directory
        .entries()
        .into_iter()
        .map(|entry| {
            let mut value = serde_json::to_value(entry).unwrap_or_default();
            value["live"] = json!(entry.is_live(now));
            value
        })
        .collect();
    let skipped: Vec<serde_json::Value> = directory
        .skipped()
        .map(|(id, why)| json!({"id": id, "why": why}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"version": directory.version(), "entries": entries, "skipped": skipped}),
    ))
}

/// The most entries one `POST /v1/admin/entries` writes (a JSON array of them).
pub const MAX_ENTRIES_PER_CALL: usize = 1000;

/// `POST /v1/admin/entries`: one entry, or an array of up to [`MAX_ENTRIES_PER_CALL`]
/// (a bulk import). Every entry is checked before any is written: one bad entry fails
/// the call, naming its index, and nothing is written.
pub async fn add(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    authorize(&live, &headers)?;
    let body: serde_json::Value = read_json(&headers, body, &live, ENTRY_SHAPE).await?;
    let (many, values) = match body {
        serde_json::Value::Array(values) => (true, values),
        value => (false, vec![value]),
    };
    if values.len() > MAX_ENTRIES_PER_CALL || values.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_entry",
            format!(
                "give one entry, or an array of 1 to {MAX_ENTRIES_PER_CALL}; this array has {}",
                values.len()
            ),
        ));
    }
    let now = now_ms();
    let mut checked = Vec::with_capacity(values.len());
    for (index, value) in values.into_iter().enumerate() {
        let at = |message: String| {
            if many {
                format!("entry {index}: {message}")
            } else {
                message
            }
        };
        let entry: Entry = serde_json::from_value(value).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                at(format!("{e}; expected {ENTRY_SHAPE}")),
            )
        })?;
        let entry = entry.checked(&live.limits, now).map_err(|error| {
            let mut answer = entry_error(&error);
            answer.message = at(error.to_string());
            answer
        })?;
        checked.push(entry);
    }
    let store = app.decider.store();
    for (written, entry) in checked.iter().enumerate() {
        let record = Record {
            id: entry.id(),
            body: entry.body(),
        };
        if let Err(error) = store.put_record(&record).await {
            tracing::warn!(%error, written, "writing a runtime entry failed");
            app.refresh_access().await;
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "the store failed after {written} of {} entries were written (the first {written}, in order); write the rest again",
                    checked.len()
                ),
            ));
        }
    }
    app.refresh_access().await;
    // Targets are not logged: they may be clients' addresses.
    tracing::info!(entries = checked.len(), "runtime entries written by admin");
    let mut answer = if many {
        json!({"written": checked.len()})
    } else {
        json!({"written": 1, "entry": checked[0]})
    };
    // Said in the answer, not only in the docs: an operator allowing a subject should
    // know at once which keys it can match (and that a client-written key never will).
    if checked
        .iter()
        .any(|e| e.kind == Kind::Allow && e.subject.is_some())
    {
        answer["note"] = json!(ALLOW_SUBJECT_NOTE);
    }
    Ok(json_response(StatusCode::OK, &answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveBody {
    kind: Kind,
    subject: Option<String>,
    ip: Option<String>,
    limit: Option<String>,
}

/// `POST /v1/admin/entries/remove`.
pub async fn remove(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let live = app.live();
    authorize(&live, &headers)?;
    let body: RemoveBody = read_json(&headers, body, &live, REMOVE_SHAPE).await?;
    let ip = match &body.ip {
        Some(ip) => Some(
            sluice_access::parse_net(ip)
                .map_err(|e| entry_error(&e))?
                .to_string(),
        ),
        None => None,
    };
    if body.subject.is_some() == ip.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_entry",
            "name the entry with exactly one of \"subject\" or \"ip\", as it was added",
        ));
    }
    let named = Entry {
        kind: body.kind,
        subject: body.subject,
        ip,
        plan: None,
        limit: body.limit,
        rate: None,
        expires_at_ms: None,
        ttl_ms: None,
        reason: None,
        created_at_ms: 0,
    };
    let removed = app
        .decider
        .store()
        .remove_record(&named.id())
        .await
        .map_err(|error| {
            tracing::warn!(%error, "removing a runtime entry failed");
            ApiError::store_unavailable("removing the entry")
        })?;
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_entry",
            "no such entry: GET /v1/admin/entries lists them (a rate entry is named by kind, subject and limit)",
        ));
    }
    app.refresh_access().await;
    tracing::info!(kind = ?named.kind, "runtime entry removed by admin");
    Ok(json_response(StatusCode::OK, &json!({"removed": true})))
}

fn entry_error(error: &EntryError) -> ApiError {
    let code = match error {
        EntryError::UnknownPlan { .. } => "unknown_plan",
        EntryError::UnknownLimit(_) => "unknown_limit",
        EntryError::BadIp(_) => "invalid_ip",
        EntryError::ExpiryInThePast { .. } => "expiry_in_the_past",
        _ => "invalid_entry",
    };
    ApiError::new(StatusCode::BAD_REQUEST, code, error.to_string())
}
