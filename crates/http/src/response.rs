//! How a decision is told to an HTTP client: the deny status, `Retry-After`, the
//! JSON body, and rate-limit headers on allowed and denied answers alike.
//!
//! Headers (`headers: [ietf, legacy]`):
//! - `ietf`: the IETF httpapi draft's structured fields, one list item per window:
//!   `RateLimit-Policy: "chat_user";q=5;w=60` and `RateLimit: "chat_user";r=0;t=12`.
//!   A limit with several windows names them `"<limit>-<seconds>s"`.
//! - `legacy`: `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`
//!   (seconds) for the most constrained window.
//!
//! `Retry-After` is whole seconds rounded up from the real time left, at least 1, and
//! absent when the request can never fit.

use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use sluice_engine::{
    Decision, DecisionRequest, Listed, Micros, Period, WindowResult, seconds_ceil,
};

/// Which rate-limit header families to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderStyles {
    /// `RateLimit-Policy` and `RateLimit`.
    pub ietf: bool,
    /// `X-RateLimit-*`.
    pub legacy: bool,
}

impl Default for HeaderStyles {
    fn default() -> Self {
        HeaderStyles {
            ietf: true,
            legacy: true,
        }
    }
}

/// The default denied body. Placeholders: `{limit}`, `{retry_after_seconds}`,
/// `{retry_after_ms}`, `{message}`, `{status}`; numbers are `null` when the request can
/// never fit.
pub const DEFAULT_BODY: &str = r#"{"error": "rate_limited", "message": "{message}", "limit": "{limit}", "retry_after_seconds": {retry_after_seconds}}"#;

/// Why a body template was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyTemplateError {
    /// An unknown placeholder.
    #[error(
        "unknown placeholder {{{0}}} in the deny body: use limit, retry_after_seconds, retry_after_ms, message or status"
    )]
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyPart {
    Text(String),
    Limit,
    RetryAfterSeconds,
    RetryAfterMs,
    Message,
    Status,
}

/// A parsed deny body template. Placeholders are written `{name}`; any other brace
/// (such as JSON's) is text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTemplate {
    parts: Vec<BodyPart>,
}

impl std::str::FromStr for BodyTemplate {
    type Err = BodyTemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            match name_end.filter(|&end| end > 0 && after[end..].starts_with('}')) {
                Some(end) => {
                    let part = match &after[..end] {
                        "limit" => BodyPart::Limit,
                        "retry_after_seconds" => BodyPart::RetryAfterSeconds,
                        "retry_after_ms" => BodyPart::RetryAfterMs,
                        "message" => BodyPart::Message,
                        "status" => BodyPart::Status,
                        other => return Err(BodyTemplateError::Unknown(other.to_string())),
                    };
                    if !literal.is_empty() {
                        parts.push(BodyPart::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(part);
                    rest = &after[end + 1..];
                }
                None => {
                    literal.push('{');
                    rest = after;
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(BodyPart::Text(literal));
        }
        Ok(BodyTemplate { parts })
    }
}

impl Default for BodyTemplate {
    fn default() -> Self {
        DEFAULT_BODY
            .parse()
            .unwrap_or(BodyTemplate { parts: Vec::new() })
    }
}

/// How denials and rate-limit state are answered.
#[derive(Debug, Clone)]
pub struct ResponseConfig {
    /// Status of a denied answer (default 429).
    pub deny_status: StatusCode,
    /// Status of a request a block entry refuses (default 403).
    pub block_status: StatusCode,
    /// Header families on every answer.
    pub headers: HeaderStyles,
    /// The denied body.
    pub body: BodyTemplate,
    /// Its content type (default `application/json`).
    pub content_type: HeaderValue,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        ResponseConfig {
            deny_status: StatusCode::TOO_MANY_REQUESTS,
            block_status: StatusCode::FORBIDDEN,
            headers: HeaderStyles::default(),
            body: BodyTemplate::default(),
            content_type: HeaderValue::from_static("application/json"),
        }
    }
}

/// A denied answer, ready for any HTTP framework.
#[derive(Debug, Clone)]
pub struct Denial {
    /// The status.
    pub status: StatusCode,
    /// `Retry-After`, rate-limit headers and `Content-Type`.
    pub headers: HeaderMap,
    /// The rendered body.
    pub body: Vec<u8>,
}

/// `Retry-After` in whole seconds: rounded up, at least 1; `None` when never.
pub fn retry_after_seconds(decision: &Decision) -> Option<u64> {
    decision
        .retry_after
        .map(|micros| seconds_ceil(micros).max(1))
}

/// The enforced window that denied with the longest wait (the one `Retry-After` is about).
fn deciding_window(decision: &Decision) -> Option<&WindowResult> {
    decision
        .results
        .iter()
        .filter(|r| !r.allowed && !r.shadow)
        .max_by_key(|r| r.retry_after.unwrap_or(Micros::MAX))
}

/// Appends the name a window goes by in `RateLimit` headers: the limit's name, with the
/// window's period when the limit has several.
fn push_policy_name(out: &mut String, request: &DecisionRequest, result: &WindowResult) {
    let limit = request.checks[result.check].limit();
    out.push_str(limit.name());
    if limit.windows().len() > 1 {
        match limit.windows()[result.window].window.rate().period() {
            Period::Seconds(secs) => {
                out.push('-');
                push_number(out, secs);
                out.push('s');
            }
            // The nominal month in seconds would read as a 30.4-day window.
            Period::CalendarMonth => out.push_str("-1mo"),
        }
    }
}

/// Appends one item of a `RateLimit` field: `"name";<a>=<n>;<b>=<m>` (policy: quota
/// and window; state: remaining and reset).
fn push_item(
    out: &mut String,
    request: &DecisionRequest,
    result: &WindowResult,
    (a, n): (&str, u64),
    (b, m): (&str, u64),
) {
    out.push('"');
    push_policy_name(out, request, result);
    out.push_str("\";");
    out.push_str(a);
    out.push('=');
    push_number(out, n);
    out.push(';');
    out.push_str(b);
    out.push('=');
    push_number(out, m);
}

/// Appends `n` in decimal (these headers are written on every proxied and forward-auth
/// request: `format!` costs several times as much).
fn push_number(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// The headers' names, built once rather than parsed per request.
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl ResponseConfig {
    /// Adds the configured rate-limit headers for `decision` to `headers`.
    pub fn add_rate_limit_headers(
        &self,
        request: &DecisionRequest,
        decision: &Decision,
        headers: &mut HeaderMap,
    ) {
        if decision.results.is_empty() {
            return;
        }
        if self.headers.ietf {
            let mut policy = String::with_capacity(32 * decision.results.len());
            let mut state = String::with_capacity(32 * decision.results.len());
            for (n, result) in decision.results.iter().enumerate() {
                let window = &request.checks[result.check].limit().windows()[result.window];
                if n > 0 {
                    policy.push_str(", ");
                    state.push_str(", ");
                }
                let period = window.window.rate().period_secs();
                push_item(
                    &mut policy,
                    request,
                    result,
                    ("q", result.limit_value),
                    ("w", period),
                );
                // The plan that applied, when not the default one: an extension
                // parameter, which the draft lets clients ignore.
                if let Some(plan) = request.checks[result.check].limit().plan() {
                    policy.push_str(";plan=\"");
                    policy.push_str(plan);
                    policy.push('"');
                }
                let reset = seconds_ceil(result.reset_after);
                push_item(
                    &mut state,
                    request,
                    result,
                    ("r", result.remaining),
                    ("t", reset),
                );
            }
            insert(headers, RATELIMIT_POLICY, policy);
            insert(headers, RATELIMIT, state);
        }
        if self.headers.legacy {
            // The most constrained window: least left, then longest to reset.
            if let Some(tightest) = decision
                .results
                .iter()
                .filter(|r| !r.shadow)
                .min_by_key(|r| (r.remaining, std::cmp::Reverse(r.reset_after)))
            {
                let number = |n: u64| HeaderValue::from(n);
                headers.insert(X_RATELIMIT_LIMIT, number(tightest.limit_value));
                headers.insert(X_RATELIMIT_REMAINING, number(tightest.remaining));
                headers.insert(
                    X_RATELIMIT_RESET,
                    number(seconds_ceil(tightest.reset_after)),
                );
            }
        }
    }

    /// The answer to a denied request, with the configured deny status.
    pub fn denial(&self, request: &DecisionRequest, decision: &Decision) -> Denial {
        self.denial_with_status(request, decision, self.deny_status)
    }

    /// The answer to a request a block entry refused: `block_status` and a JSON body
    /// with the operator's reason; no rate-limit headers, no `Retry-After` (waiting
    /// does not help) and nothing of what matched (it may be the client's address).
    pub fn blocked(&self, listed: &Listed) -> Denial {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = serde_json::json!({
            "error": "blocked",
            "message": "This client is blocked by the operator of this service.",
            "reason": listed.reason,
            "expires_at_ms": listed.expires_at_ms,
        });
        Denial {
            status: self.block_status,
            headers,
            body: body.to_string().into_bytes(),
        }
    }

    /// The answer to a denied request with `status` (a front door's own deny status);
    /// the body's `{status}` says the same.
    pub fn denial_with_status(
        &self,
        request: &DecisionRequest,
        decision: &Decision,
        status: StatusCode,
    ) -> Denial {
        if let Some(listed) = decision.listed.as_ref().filter(|l| l.blocked) {
            return self.blocked(listed);
        }
        let mut headers = HeaderMap::new();
        let retry = retry_after_seconds(decision);
        if let Some(seconds) = retry {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        self.add_rate_limit_headers(request, decision, &mut headers);
        headers.insert(http::header::CONTENT_TYPE, self.content_type.clone());
        let limit = deciding_window(decision)
            .map(|r| request.checks[r.check].limit().name())
            .unwrap_or("");
        let message = match retry {
            Some(s) => format!(
                "Too many requests for {limit}; retry in {s} second{}.",
                if s == 1 { "" } else { "s" }
            ),
            None => format!("This request costs more than {limit} can ever allow."),
        };
        let number = |n: Option<u64>| n.map_or("null".to_string(), |n| n.to_string());
        let mut body = String::new();
        for part in &self.body.parts {
            match part {
                BodyPart::Text(text) => body.push_str(text),
                BodyPart::Limit => body.push_str(limit),
                BodyPart::RetryAfterSeconds => body.push_str(&number(retry)),
                BodyPart::RetryAfterMs => body.push_str(&number(
                    decision.retry_after.map(sluice_engine::millis_ceil),
                )),
                BodyPart::Message => body.push_str(&message),
                BodyPart::Status => body.push_str(status.as_str()),
            }
        }
        Denial {
            status,
            headers,
            body: body.into_bytes(),
        }
    }
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Every value above is ASCII we wrote ourselves (limit names are [A-Za-z0-9_.-]).
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}
