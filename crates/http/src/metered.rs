//! Routes whose calls are charged what they turn out to cost: the LLM usage an answer
//! reports (`cost: usage`), and calls in flight (concurrency limits).
//!
//! Such a call is decided as a reservation: its metered checks are charged an estimate
//! read from the request ([`RouteUsage::estimate`]), every concurrency limit holds one
//! slot, and when the answer has passed through, the reservation is settled at the
//! usage the answer reported (or released). Only a front door that sees the answer can
//! do that (sluice's reverse proxy): [`RequestPlan::needs_reservation`] tells the others
//! to refuse such routes rather than charge half of what was configured.
//!
//! A route's `usage:` settings are [`RouteUsage`]; a check's price is [`RouteCost`];
//! what one request makes of them is a [`RequestPlan`] (see
//! [`Rules::plan`](crate::Rules::plan)).

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::DecisionRequest;
use sluice_usage::{CostWeights, EstimateConfig, Usage, UsageFormat};

/// What one check of a route costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteCost {
    /// The same cost for every request (`cost: N`, default 1). A concurrency limit's
    /// check is always `Fixed(1)`: one slot per call.
    Fixed(u64),
    /// What the answer's usage costs under these weights (`cost: usage`): reserved at the
    /// estimate, settled at the usage.
    Usage(CostWeights),
}

impl RouteCost {
    /// Whether the cost is read from the answer.
    pub fn is_metered(&self) -> bool {
        matches!(self, RouteCost::Usage(_))
    }
}

/// Where a metered route's estimate comes from (`usage.estimate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateSource {
    /// `request`: read from the request body (its output maximum and prompt size; see
    /// [`sluice_usage::estimate`]).
    Request(EstimateConfig),
    /// A number of tokens, counted as output tokens (the dearer kind) under each
    /// check's weights, whatever the request says.
    Tokens(u64),
}

/// A route's `usage:` settings: how its answers report usage and what to reserve first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUsage {
    /// Where the answer reports its usage.
    pub format: UsageFormat,
    /// What to reserve before the answer is known.
    pub estimate: EstimateSource,
    /// How long the reservation may stay open; `None`: the front door's default (the
    /// proxy's `timeout_ms` plus a margin for the body).
    pub ttl: Option<Duration>,
    /// The largest request body read to estimate from; a larger one is refused.
    pub max_request_bytes: usize,
}

impl RouteUsage {
    /// Default `max_request_bytes`: 4 MiB.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

    /// Settings for `format`, estimating from the request with the defaults.
    pub fn new(format: UsageFormat) -> Self {
        RouteUsage {
            format,
            estimate: EstimateSource::Request(EstimateConfig::default()),
            ttl: None,
            max_request_bytes: Self::DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Whether the estimate needs the request body.
    pub fn reads_request(&self) -> bool {
        matches!(self.estimate, EstimateSource::Request(_))
    }

    /// The estimated usage of a request whose body is `body` (`None`: not read). A body
    /// that is no JSON object (or none) still gets an estimate: the default output and
    /// its whole size as prompt, since the upstream may bill whatever it makes of it.
    pub fn estimate(&self, body: Option<&[u8]>) -> (Usage, Option<sluice_usage::EstimateError>) {
        match self.estimate {
            EstimateSource::Tokens(tokens) => (Usage::new(0, tokens), None),
            EstimateSource::Request(config) => {
                let body = body.unwrap_or_default();
                match sluice_usage::estimate(body, &config) {
                    Ok(estimate) => (estimate.usage(), None),
                    Err(error) => (
                        Usage::new(
                            (body.len() as u64).div_ceil(4),
                            config.default_output_tokens,
                        ),
                        Some(error),
                    ),
                }
            }
        }
    }
}

/// What one request makes of the routes it matched: the checks of its decision, each
/// one's price, and the usage settings that meter it.
#[derive(Debug, Clone, Default)]
pub struct RequestPlan {
    /// The decision: fixed checks at their cost, concurrency checks at 1, metered checks
    /// at 0 until [`RequestPlan::priced`] gives them their estimate.
    pub request: DecisionRequest,
    /// How each check of `request` is priced, in order.
    pub costs: Vec<RouteCost>,
    /// The `usage:` settings of the first matching route that has a metered check here;
    /// `None` when no check is metered.
    pub usage: Option<Arc<RouteUsage>>,
    /// The client's address as the policy resolved it (behind trusted proxies, the
    /// forwarded one), when the socket peer is known: for the runtime entries' address
    /// lists, so a front door does not resolve it a second time.
    pub client: Option<std::net::IpAddr>,
}

impl RequestPlan {
    /// Whether some check is charged from the answer's usage.
    pub fn is_metered(&self) -> bool {
        self.costs.iter().any(RouteCost::is_metered)
    }

    /// Whether some check holds a concurrency slot for the length of the call.
    pub fn holds_slots(&self) -> bool {
        self.request
            .checks
            .iter()
            .any(|check| check.limit().is_concurrency())
    }

    /// Whether the request must be decided as a reservation and settled when its answer
    /// ends: only a front door that sees the answer can decide it.
    pub fn needs_reservation(&self) -> bool {
        self.is_metered() || self.holds_slots()
    }

    /// The first check that needs the answer, and whether it is metered (else it holds
    /// a slot): what a front door that cannot see the answer names when it refuses.
    pub fn needing_answer(&self) -> Option<(&str, bool)> {
        self.request
            .checks
            .iter()
            .zip(&self.costs)
            .find(|(check, cost)| cost.is_metered() || check.limit().is_concurrency())
            .map(|(check, cost)| (check.limit().name(), cost.is_metered()))
    }

    /// The decision with every metered check charged `estimate` under its weights, and
    /// at least 1: a cost of 0 is a read, which a spent budget (or one in debt) would
    /// allow, whatever the call then uses.
    pub fn priced(&self, estimate: &Usage) -> DecisionRequest {
        DecisionRequest {
            checks: self
                .request
                .checks
                .iter()
                .zip(&self.costs)
                .map(|(check, cost)| match cost {
                    RouteCost::Usage(weights) => check.with_cost(weights.cost(estimate).max(1)),
                    RouteCost::Fixed(_) => check.clone(),
                })
                .collect(),
            dry_run: self.request.dry_run,
        }
    }

    /// What each check of `priced` really cost, for its settlement: a metered check the
    /// usage under its weights, or its estimate when the usage is unknown; any other check
    /// what it was charged.
    pub fn actual(&self, priced: &DecisionRequest, usage: Option<&Usage>) -> Vec<u64> {
        priced
            .checks
            .iter()
            .zip(&self.costs)
            .map(|(check, cost)| match (cost, usage) {
                (RouteCost::Usage(weights), Some(usage)) => weights.cost(usage),
                _ => check.cost(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_engine::{Check, Limit, LimitSpec};

    fn limit(name: &str, spec: LimitSpec) -> Arc<Limit> {
        Arc::new(Limit::new(name, spec).unwrap())
    }

    fn plan() -> RequestPlan {
        let tokens = limit("tokens", LimitSpec::new(vec!["1000/day".parse().unwrap()]));
        let dollars = limit(
            "dollars",
            LimitSpec::new(vec!["100000/day".parse().unwrap()]),
        );
        let calls = limit("calls", LimitSpec::new(vec!["10/minute".parse().unwrap()]));
        let flight = limit("flight", LimitSpec::concurrency(2));
        let money = CostWeights {
            input: 3,
            output: 15,
            ..CostWeights::default()
        };
        RequestPlan {
            request: DecisionRequest {
                checks: vec![
                    Check::new(tokens, "u", 0).unwrap(),
                    Check::new(dollars, "u", 0).unwrap(),
                    Check::new(calls, "u", 2).unwrap(),
                    Check::new(flight, "u", 1).unwrap(),
                ],
                dry_run: false,
            },
            costs: vec![
                RouteCost::Usage(CostWeights::default()),
                RouteCost::Usage(money),
                RouteCost::Fixed(2),
                RouteCost::Fixed(1),
            ],
            usage: Some(Arc::new(RouteUsage::new(UsageFormat::OpenAi))),
            client: None,
        }
    }

    #[test]
    fn metered_checks_are_priced_at_the_estimate_and_settled_at_the_usage() {
        let plan = plan();
        assert!(plan.is_metered() && plan.holds_slots() && plan.needs_reservation());
        assert_eq!(plan.needing_answer(), Some(("tokens", true)));
        let priced = plan.priced(&Usage::new(10, 100));
        let costs: Vec<u64> = priced.checks.iter().map(Check::cost).collect();
        assert_eq!(costs, [110, 30 + 1500, 2, 1]);
        assert_eq!(
            plan.actual(&priced, Some(&Usage::new(7, 20))),
            [27, 21 + 300, 2, 1]
        );
        assert_eq!(plan.actual(&priced, None), costs, "unknown: the estimate");
        // An estimate of nothing still reserves 1, so a spent budget refuses the call;
        // the settlement is what the answer says, 0 included.
        let priced = plan.priced(&Usage::default());
        let costs: Vec<u64> = priced.checks.iter().map(Check::cost).collect();
        assert_eq!(costs, [1, 1, 2, 1]);
        assert_eq!(plan.actual(&priced, Some(&Usage::default())), [0, 0, 2, 1]);
    }

    #[test]
    fn estimates_from_the_request_a_number_or_a_body_that_is_no_request() {
        let mut usage = RouteUsage::new(UsageFormat::Auto);
        let body = br#"{"max_tokens": 50, "messages": [{"role": "user", "content": "abcdefgh"}]}"#;
        assert_eq!(usage.estimate(Some(body)).0, Usage::new(3, 50));
        let (fallback, error) = usage.estimate(Some(b"not json at all"));
        assert_eq!(fallback, Usage::new(4, 1024));
        assert!(error.is_some());
        assert_eq!(usage.estimate(None).0, Usage::new(0, 1024));
        usage.estimate = EstimateSource::Tokens(700);
        let (fixed, error) = usage.estimate(Some(body));
        assert_eq!(fixed, Usage::new(0, 700));
        assert!(error.is_none());
        assert!(!usage.reads_request());
    }
}
