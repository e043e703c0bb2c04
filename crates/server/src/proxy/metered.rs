//! Proxied calls decided as reservations: routes with `cost: usage` checks (an LLM
//! call charged the tokens or money its answer reports) or concurrency limits (a slot
//! for the whole call). See docs/design/front-doors.md, "Metered routes".
//!
//! 1. **Estimate.** With `usage.estimate: request` the request body is read first (at
//!    most `usage.max_request_bytes`, else `413 body_too_large`; within
//!    `http.body_read_timeout_ms`, else `408`), estimated (`sluice_usage::estimate`), and
//!    the same bytes are forwarded. A body that is no JSON request is estimated from its
//!    size and `default_output_tokens` (the upstream may still bill whatever it makes of
//!    it). Each metered check is priced at the estimate under its own weights, at
//!    least 1, so a spent budget (or one in debt) refuses the next call.
//! 2. **Reserve.** The priced checks are one reservation (`Decider::reserve`): denied is
//!    the usual denial and nothing is held; allowed holds the estimate and every
//!    concurrency slot until the reservation is settled or expires (`usage.ttl_ms`, else
//!    `proxy.timeout_ms` plus [`BODY_MARGIN`]).
//! 3. **Forward**, asking for `Accept-Encoding: identity` on metered routes: the usage
//!    is read from the decoded body.
//! 4. **Settle.** Released (every cost given back, the slots freed) before the answer is
//!    sent when its status is in `proxy.refund_on_status`, or when sluice answered 502/504
//!    without the request ever reaching the upstream. sluice's own 502/504 after the
//!    request was sent is settled at the estimate (the upstream may have done the work).
//!    Otherwise the answer's body passes through [`MeteredBody`] unchanged and undelayed,
//!    each frame fed to a `UsageReader`; when the body ends, or is dropped because the
//!    client went away, the reservation is settled in a spawned task at the usage (what
//!    was reported so far, for a stream cut short) or at the estimate when none is known.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use sluice_config::ProxyConfig;
use sluice_engine::{DecisionRequest, HoldId, SettleStatus};
use sluice_http::{RequestPlan, RouteUsage};
use sluice_runtime::{AppState, Live, ReserveError, Ticket};
use sluice_usage::{ReaderLimits, Usage, UsageFormat, UsageReader};

use crate::error::ApiError;
use crate::request::collect_capped;

use super::forward::{answered_by_sluice, forward};

/// What a reservation's default lifetime adds to `proxy.timeout_ms` (which only bounds
/// the wait for the response head): time for the body to stream.
pub const BODY_MARGIN: Duration = Duration::from_secs(300);

/// The longest a reservation stays open (as for `/v1/reserve`).
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often, at most, an answer without usage is logged (each one is counted).
const UNKNOWN_USAGE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How long a reservation of `usage` (or of a route without usage settings) stays open.
fn reservation_ttl(proxy: &ProxyConfig, usage: Option<&RouteUsage>) -> Duration {
    usage
        .and_then(|usage| usage.ttl)
        .unwrap_or_else(|| Duration::from_millis(proxy.timeout_ms).saturating_add(BODY_MARGIN))
        .min(MAX_TTL)
}

/// Reads a metered request's body for its estimate: at most `max` bytes, within
/// `timeout`.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is larger than {max} bytes, the most this route reads to estimate what the call may cost (usage.max_request_bytes); send a smaller request"
            ),
        )
    };
    // The timeout covers draining an oversized body too: a client trickling one must
    // not hold the connection for as long as it likes.
    match tokio::time::timeout(timeout, collect_capped(headers, body, max)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => Err(error.answer(too_large)),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} ms (http.body_read_timeout_ms); a metered route reads it before forwarding, to estimate what the call may cost",
                timeout.as_millis()
            ),
        )
        .closing_unless(false)),
    }
}

/// Decides `request` as a reservation, forwards it when allowed, and settles what it
/// cost (see the module doc). `body_read`: the request has no body left to read.
pub(super) async fn answer(
    app: &Arc<AppState>,
    live: &Live,
    proxy: &ProxyConfig,
    peer: std::net::IpAddr,
    mut request: Request,
    plan: RequestPlan,
    mut body_read: bool,
) -> Result<Response, ApiError> {
    // Rules refuse metered checks on a route without usage settings; should a plan
    // ever lack them, `auto` still reads every known format.
    let usage = plan.is_metered().then(|| {
        plan.usage
            .clone()
            .unwrap_or_else(|| Arc::new(RouteUsage::new(UsageFormat::Auto)))
    });
    let estimate = match &usage {
        None => Usage::default(),
        Some(usage) if usage.reads_request() => {
            let (mut parts, body) = request.into_parts();
            let bytes = read_body(
                &parts.headers,
                body,
                usage.max_request_bytes,
                live.body_read_timeout,
            )
            .await?;
            body_read = true;
            let (estimate, error) = usage.estimate(Some(&bytes));
            if let Some(error) = error {
                tracing::debug!(%error, "metered request estimated from its size and usage.default_output_tokens");
            }
            // The same bytes go on, whole: a chunked body now has a length.
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            request = Request::from_parts(parts, Body::from(bytes));
            estimate
        }
        Some(usage) => usage.estimate(None).0,
    };
    let mut priced = plan.priced(&estimate);
    let ttl = reservation_ttl(proxy, usage.as_deref());
    let (decision, held) = app
        .decider
        .reserve_from(&mut priced, ttl, plan.client)
        .await
        .map_err(|error| match error {
            ReserveError::Store(_) => {
                ApiError::store_unavailable("the reservation").closing_unless(body_read)
            }
            ReserveError::Ticket(error) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "reservation_failed",
                error.to_string(),
            )
            .closing_unless(body_read),
        })?;
    if !decision.allowed {
        return Ok(super::denied(live, &priced, &decision, body_read));
    }
    let Some((ticket, _)) = held else {
        // An allowed reservation always holds; should one ever not, nothing can be settled.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "reservation_failed",
            "the reservation was allowed but not held; try again",
        )
        .closing_unless(body_read));
    };
    let (_, hold) = ticket.encode();
    let pending = Pending {
        app: Arc::clone(app),
        ticket,
        hold,
        plan,
        priced: priced.clone(),
        handle: tokio::runtime::Handle::current(),
    };

    if usage.is_some() {
        // The usage is read from the body as the upstream encodes it: ask for it plain.
        request.headers_mut().insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    let mut response = forward(app, proxy, live, peer, request).await;
    let status = response.status().as_u16();
    match answered_by_sluice(&response) {
        Some(false) => pending.release(false).await,
        // The upstream may have done the work: the estimate stays.
        Some(true) => {
            let actual = pending.plan.actual(&pending.priced, None);
            pending.settle(actual, "estimate").await;
        }
        None if proxy.refund_on_status.contains(status) => pending.release(true).await,
        None => {
            let reader = usage.map(|usage| {
                let headers = response.headers();
                let compressed = headers
                    .get(header::CONTENT_ENCODING)
                    .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
                // A compressed answer cannot be read (the upstream ignored the request
                // for identity): read nothing and settle at the estimate.
                let content_type = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .filter(|_| !compressed);
                Reading {
                    reader: UsageReader::new(
                        usage.format.clone(),
                        content_type,
                        ReaderLimits::default(),
                    ),
                    format: usage.format.clone(),
                    compressed,
                }
            });
            let (parts, body) = response.into_parts();
            response = Response::from_parts(
                parts,
                Body::new(MeteredBody {
                    inner: body,
                    meter: Some(Meter { reader, pending }),
                }),
            );
        }
    }
    live.policy
        .responses
        .add_rate_limit_headers(&priced, &decision, response.headers_mut());
    Ok(response)
}

/// An allowed reservation waiting to be settled.
struct Pending {
    app: Arc<AppState>,
    ticket: Ticket,
    hold: HoldId,
    /// How each check is priced.
    plan: RequestPlan,
    /// The checks as reserved, each at its estimate.
    priced: DecisionRequest,
    /// The serving thread's runtime: a body may be dropped outside its context.
    handle: tokio::runtime::Handle,
}

impl Pending {
    /// Gives every cost back and frees the slots: the call did not run
    /// (`by_status: false`) or its status is refunded.
    async fn release(self, by_status: bool) {
        if by_status {
            self.app.metrics.refunds.inc();
        }
        let nothing = vec![0; self.priced.checks.len()];
        self.settle(nothing, "released").await;
    }

    /// Settles at `actual` (one cost per check), counting it as `outcome`.
    async fn settle(self, actual: Vec<u64>, outcome: &'static str) {
        let live = self.app.live();
        let result = self
            .app
            .decider
            .settle_ticket(&self.ticket, self.hold, &live.limits, &actual)
            .await;
        let metrics = &self.app.metrics;
        match result {
            Ok(SettleStatus::Settled | SettleStatus::AlreadySettled) => {
                metrics.proxy_settled(outcome);
            }
            Ok(SettleStatus::Unknown) => {
                metrics.proxy_settled("expired");
                tracing::warn!(
                    reservation = %self.ticket.id,
                    "a proxied call ended after its reservation expired: its estimate stays charged; raise the route's usage.ttl_ms (or proxy.timeout_ms) above the longest answer"
                );
            }
            // The decider logged the store's error; the reservation expires at its estimate.
            Err(_) => metrics.proxy_settled("failed"),
        }
    }

    /// Settles at `actual` in a task of its own, so no answer waits for it.
    fn spawn(self, actual: Vec<u64>, outcome: &'static str) {
        let handle = self.handle.clone();
        handle.spawn(self.settle(actual, outcome));
    }
}

/// A metered answer's usage reader.
struct Reading {
    reader: UsageReader,
    format: UsageFormat,
    /// The answer came compressed, so nothing is read.
    compressed: bool,
}

/// What a passing answer body settles when it ends.
struct Meter {
    /// `None` on a route without metered checks (only concurrency limits).
    reader: Option<Reading>,
    pending: Pending,
}

impl Meter {
    fn feed(&mut self, data: &[u8]) {
        if let Some(reading) = &mut self.reader {
            reading.reader.feed(data);
        }
    }

    /// The body ended (`complete`) or was cut short: settle at what it reported.
    fn finish(self, complete: bool) {
        let Meter { reader, pending } = self;
        let (usage, outcome) = match reader {
            None => (None, "fixed"),
            Some(reading) => {
                let over_limit = reading.reader.over_limit();
                let usage = reading.reader.finish();
                let outcome = match (&usage, complete) {
                    (Some(_), true) => "usage",
                    (Some(_), false) => "usage_so_far",
                    (None, _) => {
                        log_unknown_usage(
                            &reading.format,
                            reading.compressed,
                            over_limit,
                            complete,
                        );
                        "estimate"
                    }
                };
                (usage, outcome)
            }
        };
        let actual = pending.plan.actual(&pending.priced, usage.as_ref());
        pending.spawn(actual, outcome);
    }
}

/// Milliseconds (from the first call, plus one so that 0 means never) of the last line
/// about an answer without usage: callers choose how many such answers there are.
static UNKNOWN_USAGE_LOGGED: AtomicU64 = AtomicU64::new(0);

fn log_unknown_usage(format: &UsageFormat, compressed: bool, over_limit: bool, complete: bool) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = UNKNOWN_USAGE_LOGGED.load(Ordering::Acquire);
    let due = last == 0 || now >= last + UNKNOWN_USAGE_LOG_INTERVAL.as_millis() as u64;
    if !due
        || UNKNOWN_USAGE_LOGGED
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        return;
    }
    let why = if compressed {
        "the answer was compressed although identity was asked for"
    } else if over_limit {
        "the answer (or one of its events) was larger than the usage reader keeps"
    } else if !complete {
        "the answer was cut short before it reported its usage (an Anthropic stream reports the output only in its last event)"
    } else {
        "the answer has none where the format puts it (an OpenAI stream reports it only when the request sets stream_options.include_usage)"
    };
    tracing::warn!(
        format = %format,
        "a metered answer reported no usage, so its estimate stays charged: {why}; logged at most once a minute, each one counted in sluice_proxy_settlements_total{{outcome=\"estimate\"}}"
    );
}

/// An answer's body on its way to the client, unchanged and undelayed: each frame is
/// fed to the meter as it passes, and the reservation is settled when the body ends, or
/// when it is dropped before (the client went away, the upstream broke off).
struct MeteredBody {
    inner: Body,
    /// Taken when settled.
    meter: Option<Meter>,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(meter)) = (frame.data_ref(), this.meter.as_mut()) {
                    meter.feed(data);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(meter) = this.meter.take() {
                    meter.finish(false);
                }
            }
            Poll::Ready(None) => {
                if let Some(meter) = this.meter.take() {
                    meter.finish(true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            // A body of known length may be dropped once its last byte was written,
            // without being asked for its end.
            let complete = http_body::Body::is_end_stream(&self.inner);
            meter.finish(complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_last_the_head_timeout_and_a_margin_unless_the_route_says() {
        let mut proxy = ProxyConfig::new("http://127.0.0.1:9".parse().unwrap());
        proxy.timeout_ms = 30_000;
        assert_eq!(
            reservation_ttl(&proxy, None),
            Duration::from_secs(30) + BODY_MARGIN
        );
        let mut usage = RouteUsage::new(UsageFormat::OpenAi);
        usage.ttl = Some(Duration::from_secs(7));
        assert_eq!(
            reservation_ttl(&proxy, Some(&usage)),
            Duration::from_secs(7)
        );
        proxy.timeout_ms = 86_400_000;
        assert_eq!(reservation_ttl(&proxy, None), MAX_TTL);
    }
}
