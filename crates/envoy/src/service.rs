//! `ShouldRateLimit`, end to end: every descriptor of a call is matched against the
//! domain's rules, all counted ones are decided together in one atomic
//! [`DecisionRequest`] through the shared [`sluice_runtime::Decider`] (so the store's
//! failure policy and the metrics apply), and the answer carries one status per
//! descriptor in the request's order.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sluice_config::envoy::{Rule, RuleKind, Unit};
use sluice_engine::{
    Algorithm, Check, DecisionRequest, Limit, LimitSpec, Rate, Settlement, WindowResult,
};
use sluice_runtime::AppState;
use tonic::{Request, Response, Status};

use crate::matcher::{self, Hit};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit as ProtoUnit,
};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService as RlsServer, RateLimitServiceServer,
};
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};

/// Most descriptors one call may carry, as `/v1/check` takes at most
/// [`sluice_runtime::MAX_CHECKS`] checks: every descriptor is matched and may be a
/// counter of one atomic decision, so an unbounded list is unbounded work per call.
pub const MAX_DESCRIPTORS: usize = sluice_runtime::MAX_CHECKS;

/// Most entries one descriptor may carry. Envoy's rate limit actions make a handful;
/// matching walks the configured tree entry by entry.
pub const MAX_ENTRIES: usize = 32;

/// The name of the limit that counts a descriptor carrying Envoy's own `limit` override.
const OVERRIDE_LIMIT: &str = "envoy.override";

/// The Envoy rate limit service over a running server's state.
#[derive(Clone)]
pub struct RateLimitService {
    state: Arc<AppState>,
    calls: Calls,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    code: &'static str,
}

/// `sluice_envoy_calls_total{code}`: calls by answer (ok, over_limit, error).
#[derive(Clone)]
pub struct Calls {
    ok: Counter,
    over_limit: Counter,
    error: Counter,
}

impl Calls {
    /// Registers the series in the shared registry; once per process.
    pub fn register(metrics: &sluice_runtime::Metrics) -> Self {
        let family = Family::<CallLabels, Counter>::default();
        metrics.register(
            "envoy_calls",
            "Envoy rate limit service calls, by answer (ok, over_limit, error)",
            family.clone(),
        );
        let code = |code| family.get_or_create(&CallLabels { code }).clone();
        Calls {
            ok: code("ok"),
            over_limit: code("over_limit"),
            error: code("error"),
        }
    }
}

/// What one descriptor's status is made from.
enum Plan {
    /// No rule: OK, no limit.
    NoLimit,
    /// `unlimited: true`: OK, everything remaining.
    Unlimited,
    /// `requests_per_unit: 0`: over the limit without asking the store.
    Blocked {
        limit: RateLimit,
        /// The window's length in seconds.
        period: u64,
        shadow: bool,
    },
    /// Decided by the store: the check's index in the decision request.
    Counted {
        check: usize,
        limit: RateLimit,
        /// The window's length in seconds.
        period: u64,
        /// A `debt` rule: its hits were booked before the decision, which only reads
        /// it; it is over the limit while nothing is left.
        debt: bool,
    },
}

/// A descriptor's rule before `replaces` is applied: a configured rule or Envoy's override.
enum Found<'a> {
    None,
    Rule(Hit<'a>),
    Override {
        unit: Unit,
        requests_per_unit: u32,
        key: String,
    },
}

impl RateLimitService {
    /// The service over `state` (its live config, domains and reloads, and decider),
    /// counting its calls in `calls`.
    pub fn new(state: Arc<AppState>, calls: Calls) -> Self {
        RateLimitService { state, calls }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self)
    }

    /// Answers one call (also counted in the `envoy_calls` metric by the gRPC handler).
    pub async fn answer(&self, request: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        if request.domain.is_empty() {
            return Err(Status::invalid_argument(
                "domain is empty: set `domain` in Envoy's rate limit filter to a domain of the sluice config's envoy section",
            ));
        }
        if request.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "no descriptors: a rate limit call needs at least one descriptor",
            ));
        }
        if request.descriptors.len() > MAX_DESCRIPTORS {
            return Err(Status::invalid_argument(format!(
                "{} descriptors in one call; at most {MAX_DESCRIPTORS} are accepted: split the route's rate limit actions over several rate_limits entries (each is its own call)",
                request.descriptors.len()
            )));
        }
        if let Some((i, descriptor)) = request
            .descriptors
            .iter()
            .enumerate()
            .find(|(_, d)| d.entries.len() > MAX_ENTRIES)
        {
            return Err(Status::invalid_argument(format!(
                "descriptor {i} has {} entries; at most {MAX_ENTRIES} are accepted: use fewer actions in that rate limit entry",
                descriptor.entries.len()
            )));
        }
        if let Some(i) = request.descriptors.iter().position(|d| d.is_negative_hits) {
            return Err(Status::invalid_argument(format!(
                "descriptor {i} has is_negative_hits: giving hits back is not supported by sluice; remove that rate limit action's negative hits"
            )));
        }
        let live = self.state.live();
        let envoy = live.envoy.as_ref();
        let level = envoy.and_then(|envoy| envoy.domains.get(&request.domain));
        if level.is_none() {
            tracing::debug!(domain = %request.domain, "unknown domain: every descriptor is OK");
        }
        let found: Vec<Found<'_>> = request
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, descriptor)| match (level, &descriptor.limit) {
                (None, _) => Ok(Found::None),
                (Some(_), Some(limit)) => override_of(&request.domain, i, descriptor, limit),
                (Some(level), None) => {
                    Ok(matcher::find(level, &descriptor.entries).map_or(Found::None, Found::Rule))
                }
            })
            .collect::<Result<_, Status>>()?;
        // A rule named in another matched rule's `replaces` does not apply to this call.
        let replaced: HashSet<&str> = found
            .iter()
            .filter_map(|found| match found {
                Found::Rule(hit) => Some(hit.rule.replaces.iter().map(String::as_str)),
                _ => None,
            })
            .flatten()
            .collect();

        let mut checks = Vec::new();
        let mut debts = Vec::new();
        let mut plans = Vec::with_capacity(found.len());
        // The rule each descriptor is decided by, for the dynamic metadata.
        let mut rules: Vec<Option<&Rule>> = Vec::with_capacity(found.len());
        for (descriptor, found) in request.descriptors.iter().zip(found) {
            let cost = cost_of(request, descriptor);
            let rule = match &found {
                Found::Rule(hit) if !is_replaced(hit.rule, &replaced) => Some(hit.rule),
                _ => None,
            };
            rules.push(rule);
            let plan = match found {
                Found::None => Plan::NoLimit,
                Found::Rule(hit) if is_replaced(hit.rule, &replaced) => Plan::NoLimit,
                Found::Rule(hit) => plan_rule(hit, cost, &mut checks, &mut debts)?,
                Found::Override {
                    unit,
                    requests_per_unit,
                    key,
                } => plan_override(unit, requests_per_unit, key, cost, &mut checks)?,
            };
            plans.push(plan);
        }

        if !debts.is_empty() {
            self.book(debts).await?;
        }
        // A block entry (admin API) refuses the whole call, whatever its descriptors say;
        // an allow entry lets it past every rule. Both also match a descriptor entry
        // (`user_id=42`) and the `remote_address` Envoy sends, on any call.
        let listing = self.state.decider.has_entries();
        let (subjects, client) = if listing {
            listing_subjects(request)
        } else {
            (Vec::new(), None)
        };
        let mut blocked = None;
        let mut allow_listed = false;
        let results = if checks.is_empty() && !listing {
            Vec::new()
        } else {
            let mut decision = DecisionRequest {
                checks,
                dry_run: false,
            };
            match self
                .state
                .decider
                .decide_listing(&mut decision, client, &subjects)
                .await
            {
                Ok(decision) => {
                    match decision.listed {
                        Some(listed) if listed.blocked => blocked = Some(listed),
                        Some(_) => allow_listed = true,
                        None => {}
                    }
                    decision.results
                }
                // The decider logged it; Envoy's failure_mode_deny decides what happens.
                Err(_) => {
                    return Err(Status::unavailable(
                        "the rate limit store is unavailable and storage.on_error gave no answer; Envoy's failure_mode_deny applies",
                    ));
                }
            }
        };

        let now = now_micros();
        let (mut statuses, went_over): (Vec<DescriptorStatus>, Vec<bool>) = plans
            .into_iter()
            // Allow-listed: past every rule, as on the HTTP front doors.
            .map(|plan| if allow_listed { Plan::NoLimit } else { plan })
            .map(|plan| status(plan, &results, now))
            .unzip();
        let mut raw_body = Vec::new();
        if let Some(listed) = &blocked {
            for status in &mut statuses {
                status.code = Code::OverLimit as i32;
            }
            raw_body = serde_json::json!({
                "error": "blocked",
                "message": "this client is blocked by the operator",
                "reason": listed.reason,
            })
            .to_string()
            .into_bytes();
        }
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        let dynamic_metadata = envoy
            .filter(|envoy| envoy.response_dynamic_metadata)
            .map(|_| crate::metadata::answer_metadata(request, &rules, &went_over));
        let response_headers_to_add = if envoy.is_some_and(|envoy| envoy.response_headers) {
            headers(&statuses)
        } else {
            Vec::new()
        };
        Ok(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add,
            request_headers_to_add: Vec::new(),
            raw_body,
            dynamic_metadata,
        })
    }
}

impl RateLimitService {
    /// Books the hits of `debt` rules (work already done) past their limits.
    async fn book(&self, debts: Vec<(Check, u64)>) -> Result<(), Status> {
        let (checks, actual): (Vec<Check>, Vec<u64>) = debts.into_iter().unzip();
        let request = DecisionRequest {
            checks,
            dry_run: false,
        };
        let settlement = Settlement {
            hold: None,
            windows: vec![true; request.window_count()],
            request,
            actual,
        };
        self.state
            .decider
            .settle(&settlement)
            .await
            .map(|_| ())
            .map_err(|_| {
                Status::unavailable(
                    "the rate limit store is unavailable: the hits of a debt rule were not booked",
                )
            })
    }
}

#[tonic::async_trait]
impl RlsServer for RateLimitService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let calls = &self.calls;
        match self.answer(request.get_ref()).await {
            Ok(response) => {
                if response.overall_code == Code::OverLimit as i32 {
                    calls.over_limit.inc();
                } else {
                    calls.ok.inc();
                }
                Ok(Response::new(response))
            }
            Err(status) => {
                calls.error.inc();
                Err(status)
            }
        }
    }
}

/// The cost of one descriptor: its own `hits_addend` (0 is a check that charges nothing),
/// else the request's, where 0 (unset) means 1.
fn cost_of(request: &RateLimitRequest, descriptor: &RateLimitDescriptor) -> u64 {
    match &descriptor.hits_addend {
        Some(own) => *own,
        None => u64::from(request.hits_addend.max(1)),
    }
}

fn is_replaced(rule: &Rule, replaced: &HashSet<&str>) -> bool {
    rule.name
        .as_deref()
        .is_some_and(|name| replaced.contains(name))
}

/// The limit reported for a rule.
fn reported(rule_name: Option<&str>, requests_per_unit: u32, unit: Unit) -> RateLimit {
    RateLimit {
        name: rule_name.unwrap_or_default().to_string(),
        requests_per_unit,
        unit: proto_unit(unit) as i32,
    }
}

fn plan_rule(
    hit: Hit<'_>,
    cost: u64,
    checks: &mut Vec<Check>,
    debts: &mut Vec<(Check, u64)>,
) -> Result<Plan, Status> {
    let rule = hit.rule;
    Ok(match &rule.kind {
        RuleKind::Unlimited => Plan::Unlimited,
        RuleKind::BlockAll { unit, multiplier } => Plan::Blocked {
            limit: reported(rule.name.as_deref(), 0, *unit),
            period: unit.seconds().saturating_mul(*multiplier),
            // A quota-mode rule answers OK over the limit, like a shadow one.
            shadow: rule.shadow || rule.quota_mode,
        },
        RuleKind::Limited {
            unit,
            multiplier,
            requests_per_unit,
            limit,
        } => {
            // A debt rule's hits are booked unconditionally before the decision, which
            // then only reads the counter (cost 0) to report it.
            let decided = if rule.debt { 0 } else { cost };
            // Trusted (allow entries may match it): the descriptors come from Envoy's
            // own rate limit actions, which the operator configured.
            let check = Check::new(Arc::clone(limit), hit.key, decided)
                .map_err(|error| Status::internal(format!("descriptor key: {error}")))?
                .with_trusted_key(true);
            if rule.debt && cost > 0 {
                debts.push((check.clone(), cost));
            }
            checks.push(check);
            Plan::Counted {
                check: checks.len() - 1,
                limit: reported(rule.name.as_deref(), *requests_per_unit, *unit),
                period: unit.seconds().saturating_mul(*multiplier),
                debt: rule.debt && !rule.shadow && !rule.quota_mode,
            }
        }
    })
}

/// What the runtime entries may name in `request`: every descriptor entry as the
/// subject `key=value`, and the address in a `remote_address` entry (Envoy's own
/// action for the downstream address) as the client.
fn listing_subjects(request: &RateLimitRequest) -> (Vec<String>, Option<std::net::IpAddr>) {
    let mut subjects = Vec::new();
    let mut client = None;
    for entry in request.descriptors.iter().flat_map(|d| &d.entries) {
        if client.is_none() && entry.key == "remote_address" {
            client = entry.value.parse().ok();
        }
        subjects.push(format!("{}={}", entry.key, entry.value));
    }
    (subjects, client)
}

/// Envoy's `limit` override on a descriptor of a known domain: the rate it carries,
/// counted on the domain and the descriptor's entries.
fn override_of<'a>(
    domain: &str,
    index: usize,
    descriptor: &RateLimitDescriptor,
    limit: &crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride,
) -> Result<Found<'a>, Status> {
    let unit = match limit.unit {
        1 => Unit::Second,
        2 => Unit::Minute,
        3 => Unit::Hour,
        4 => Unit::Day,
        5 => Unit::Month,
        6 => Unit::Year,
        other => {
            return Err(Status::invalid_argument(format!(
                "descriptor {index}: the limit override's unit is {other}, not one of SECOND, MINUTE, HOUR, DAY, MONTH, YEAR"
            )));
        }
    };
    let mut key = format!("{}:{domain}", domain.len());
    for entry in &descriptor.entries {
        for part in [&entry.key, &entry.value] {
            key.push_str(&part.len().to_string());
            key.push(':');
            key.push_str(part);
        }
    }
    Ok(Found::Override {
        unit,
        requests_per_unit: limit.requests_per_unit,
        key: matcher::bounded(key),
    })
}

fn plan_override(
    unit: Unit,
    requests_per_unit: u32,
    key: String,
    cost: u64,
    checks: &mut Vec<Check>,
) -> Result<Plan, Status> {
    let limit = reported(None, requests_per_unit, unit);
    if requests_per_unit == 0 {
        return Ok(Plan::Blocked {
            limit,
            period: unit.seconds(),
            shadow: false,
        });
    }
    let rate = Rate::new(u64::from(requests_per_unit), unit.seconds()).map_err(|error| {
        Status::invalid_argument(format!("the descriptor's limit override: {error}"))
    })?;
    let mut spec = LimitSpec::new(vec![rate]);
    spec.algorithm = Algorithm::FixedWindow;
    let counted = Limit::new(OVERRIDE_LIMIT, spec)
        .map_err(|error| Status::internal(format!("limit override: {error}")))?;
    // Trusted, as in `plan_rule`: Envoy made the descriptor.
    let check = Check::new(Arc::new(counted), key, cost)
        .map_err(|error| Status::internal(format!("descriptor key: {error}")))?
        .with_trusted_key(true);
    checks.push(check);
    Ok(Plan::Counted {
        check: checks.len() - 1,
        limit,
        period: unit.seconds(),
        debt: false,
    })
}

/// One descriptor's status from its plan and the decision's per-window results (each
/// rule's limit has exactly one window, so check `i` is result `i`).
/// Also says whether the descriptor went over its limit, whatever its status says (a
/// shadow or quota-mode rule reports OK over its limit).
fn status(plan: Plan, results: &[WindowResult], now: i64) -> (DescriptorStatus, bool) {
    match plan {
        Plan::NoLimit => (
            DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: None,
                limit_remaining: 0,
                duration_until_reset: None,
            },
            false,
        ),
        Plan::Unlimited => (
            DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: None,
                limit_remaining: u32::MAX,
                duration_until_reset: None,
            },
            false,
        ),
        Plan::Blocked {
            limit,
            period,
            shadow,
        } => (
            DescriptorStatus {
                // A shadow rule reports OK whatever it decided, as envoyproxy/ratelimit does.
                code: if shadow { Code::Ok } else { Code::OverLimit } as i32,
                current_limit: Some(limit),
                limit_remaining: 0,
                duration_until_reset: Some(until_window_end(period, now)),
            },
            true,
        ),
        Plan::Counted {
            check,
            limit,
            period,
            debt,
        } => {
            let Some(result) = results.iter().find(|r| r.check == check) else {
                // The engine answers every window; an answer without it is not a decision.
                let unknown = DescriptorStatus {
                    code: Code::Unknown as i32,
                    current_limit: Some(limit),
                    limit_remaining: 0,
                    duration_until_reset: None,
                };
                return (unknown, false);
            };
            let went_over = !result.allowed || (debt && result.remaining == 0);
            let (code, remaining) = match (result.allowed, result.shadow) {
                (true, _) if debt && result.remaining == 0 => (Code::OverLimit, 0),
                (true, _) => (
                    Code::Ok,
                    u32::try_from(result.remaining).unwrap_or(u32::MAX),
                ),
                (false, true) => (Code::Ok, 0),
                (false, false) => (Code::OverLimit, 0),
            };
            let reset = if result.reset_after > 0 {
                duration(result.reset_after)
            } else {
                until_window_end(period, now)
            };
            let status = DescriptorStatus {
                code: code as i32,
                current_limit: Some(limit),
                limit_remaining: remaining,
                duration_until_reset: Some(reset),
            };
            (status, went_over)
        }
    }
}

/// `X-RateLimit-*` for the descriptor closest to its limit (an over-limit one first), as
/// envoyproxy/ratelimit picks it; none when no descriptor has a limit.
fn headers(statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
    let mut chosen: Option<&DescriptorStatus> = None;
    for status in statuses.iter().filter(|s| s.current_limit.is_some()) {
        let over = status.code == Code::OverLimit as i32;
        let better = match chosen {
            None => true,
            Some(current) if current.code == Code::OverLimit as i32 => over,
            Some(current) => over || status.limit_remaining < current.limit_remaining,
        };
        if better {
            chosen = Some(status);
        }
    }
    let Some(status) = chosen else {
        return Vec::new();
    };
    let limit = status
        .current_limit
        .as_ref()
        .map_or(0, |limit| limit.requests_per_unit);
    let reset = status
        .duration_until_reset
        .as_ref()
        .map_or(0, |d| d.seconds + i64::from(d.nanos > 0));
    let header = |key: &str, value: String| HeaderValue {
        key: key.to_string(),
        value,
        raw_value: Vec::new(),
    };
    vec![
        header("X-RateLimit-Limit", limit.to_string()),
        header("X-RateLimit-Remaining", status.limit_remaining.to_string()),
        header("X-RateLimit-Reset", reset.to_string()),
    ]
}

fn proto_unit(unit: Unit) -> ProtoUnit {
    match unit {
        Unit::Second => ProtoUnit::Second,
        Unit::Minute => ProtoUnit::Minute,
        Unit::Hour => ProtoUnit::Hour,
        Unit::Day => ProtoUnit::Day,
        Unit::Week => ProtoUnit::Week,
        Unit::Month => ProtoUnit::Month,
        Unit::Year => ProtoUnit::Year,
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Time until the current epoch-aligned window of `unit` ends.
fn until_window_end(period_secs: u64, now: i64) -> prost_types::Duration {
    let period = i64::try_from(period_secs.max(1))
        .unwrap_or(i64::MAX / 1_000_000)
        .saturating_mul(1_000_000);
    duration(period - now.rem_euclid(period))
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: i32::try_from((micros % 1_000_000) * 1_000).unwrap_or(0),
    }
}
