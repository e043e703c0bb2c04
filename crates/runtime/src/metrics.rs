//! Prometheus metrics. Handles for each limit are created once, when the limits are
//! loaded, so recording a decision is a few atomic increments.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_engine::{Limit, StoreStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    limit: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
}

/// Every tracked limit's counters, by limit name. Hashed with foldhash rather than
/// SipHash: the names are the configured ones (a request naming another is refused
/// before it is counted), and the decision path looks one up per check.
pub type LimitCountersByName = HashMap<String, LimitCounters, hashbrown::DefaultHashBuilder>;

/// The counters of one limit.
#[derive(Clone, Debug)]
pub struct LimitCounters {
    /// This limit admitted the request.
    pub allowed: Counter,
    /// This limit denied the request.
    pub denied: Counter,
    /// This shadow limit would have denied the request.
    pub shadow_denied: Counter,
    /// How this limit's denials are logged: one line per interval (see
    /// [`crate::decider::DenialLog`]).
    pub denial_log: Arc<crate::decider::DenialLog>,
    /// This limit's heaviest keys by spend and by denials (`stats.top_keys`); `None`
    /// when top keys are off. Kept across reloads while the limit keeps its name.
    pub top: Option<Arc<sluice_topkeys::TopKeys>>,
    /// This limit's checks and denials per minute over the last hour (the dashboard's
    /// charts). Kept across reloads while the limit keeps its name.
    pub timeline: Arc<sluice_topkeys::Timeline>,
}

/// Every metric sluice exports.
pub struct Metrics {
    /// Locked to render, and to add a front door's series ([`Metrics::register`]).
    registry: std::sync::Mutex<Registry>,
    decisions: Family<DecisionLabels, Counter>,
    /// Read on every decision by every serving thread: an `ArcSwap`, whose reads write
    /// no shared cache line (a lock or an `Arc` clone would, twice per decision).
    per_limit: arc_swap::ArcSwap<LimitCountersByName>,
    /// Decisions made without the shared store.
    pub degraded: Counter,
    /// Store calls that failed.
    pub store_errors: Counter,
    /// Seconds each store call took.
    pub store_latency: Histogram,
    /// Proxied decisions whose cost was given back (`proxy.refund_on_status`).
    pub refunds: Counter,
    /// Proxied requests the upstream did not answer in time or at all (502/504).
    pub upstream_failures: Counter,
    /// Reservations settled (released ones included).
    pub settlements: Counter,
    /// Cost charged past an estimate by settlements and charges for work done: the debt
    /// booked over limits, in units of cost.
    pub settled_over_estimate: Counter,
    proxy_settlements: Family<OutcomeLabels, Counter>,
    /// Requests a block entry refused.
    pub blocked: Counter,
    /// Requests an allow entry let past every limit.
    pub allow_listed: Counter,
    /// Failed reads of the runtime entries (the last ones read stay in force).
    pub access_refresh_errors: Counter,
    keys: Family<BackendLabels, Gauge>,
    evictions: Family<BackendLabels, Counter>,
    local_denials: Family<BackendLabels, Counter>,
    /// Bearer tokens whose signature was checked, by result: a token remembered from an
    /// earlier check is not counted, so against requests this shows the cache at work,
    /// and a rise of `refused` shows clients sending tokens nobody signed.
    jwt_signature_checks: Family<ResultLabels, Counter>,
    /// Counters per top-keys sketch, or `None` when top keys are off.
    top_keys: Option<usize>,
}

impl Metrics {
    /// A registry with every metric, and counters for each of `limits`; with
    /// `top_keys` (counters per sketch), each limit also tracks its heaviest keys.
    pub fn new<'a>(
        limits: impl IntoIterator<Item = &'a Arc<Limit>>,
        top_keys: Option<usize>,
    ) -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Checks decided, by limit and outcome (allowed, denied, shadow_denied)",
            decisions.clone(),
        );
        let degraded = Counter::default();
        registry.register(
            "degraded_decisions",
            "Decisions made without the shared store",
            degraded.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Store calls that failed or timed out",
            store_errors.clone(),
        );
        let store_latency = Histogram::new([
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 1.0,
        ]);
        registry.register(
            "store_latency_seconds",
            "Time each store call took",
            store_latency.clone(),
        );
        let refunds = Counter::default();
        registry.register(
            "refunds",
            "Proxied decisions whose cost was given back because of the upstream's status",
            refunds.clone(),
        );
        let upstream_failures = Counter::default();
        registry.register(
            "upstream_failures",
            "Proxied requests the upstream could not be reached for or did not answer in time",
            upstream_failures.clone(),
        );
        let settlements = Counter::default();
        registry.register(
            "settlements",
            "Reservations settled or released",
            settlements.clone(),
        );
        let blocked = Counter::default();
        registry.register(
            "blocked_requests",
            "Requests refused by a block entry (admin API), before any limit",
            blocked.clone(),
        );
        let allow_listed = Counter::default();
        registry.register(
            "allow_listed_requests",
            "Requests an allow entry (admin API) let past every limit",
            allow_listed.clone(),
        );
        let access_refresh_errors = Counter::default();
        registry.register(
            "access_refresh_errors",
            "Failed reads of runtime plan assignments, overrides and block lists from the store; the last ones read stay in force",
            access_refresh_errors.clone(),
        );
        let settled_over_estimate = Counter::default();
        registry.register(
            "settled_over_estimate",
            "Cost charged beyond reservations' estimates (and for work already done), past the limit if need be",
            settled_over_estimate.clone(),
        );
        let proxy_settlements = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "proxy_settlements",
            "Proxied calls decided as reservations (metered routes, concurrency limits), by how they were settled: usage (the answer reported it), usage_so_far (cut short after it reported its usage), estimate (no usage known, or cut short before it), fixed (nothing metered), released (refunded, or never reached the upstream), expired (settled after the reservation's ttl: the estimate stays), failed (the store could not settle)",
            proxy_settlements.clone(),
        );
        let keys = Family::<BackendLabels, Gauge>::default();
        registry.register("store_keys", "Counters the store holds", keys.clone());
        let evictions = Family::<BackendLabels, Counter>::default();
        registry.register(
            "store_evictions",
            "Counters evicted before expiry because the store was full",
            evictions.clone(),
        );
        let local_denials = Family::<BackendLabels, Counter>::default();
        registry.register(
            "store_local_denials",
            "Decisions answered from the store's local deny cache, without a round trip (Redis: a denial replayed until it could be allowed)",
            local_denials.clone(),
        );
        let jwt_signature_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "jwt_signature_checks",
            "Bearer tokens whose signature and claims were checked (verified or refused); tokens remembered from an earlier check are not counted",
            jwt_signature_checks.clone(),
        );
        let metrics = Metrics {
            registry: std::sync::Mutex::new(registry),
            decisions,
            per_limit: Default::default(),
            degraded,
            store_errors,
            store_latency,
            refunds,
            upstream_failures,
            settlements,
            settled_over_estimate,
            proxy_settlements,
            blocked,
            allow_listed,
            access_refresh_errors,
            keys,
            evictions,
            local_denials,
            jwt_signature_checks,
            top_keys,
        };
        metrics.track_limits(limits);
        metrics
    }

    /// Creates counters for `limits` (after a reload, new limits get theirs; old series stay).
    pub fn track_limits<'a>(&self, limits: impl IntoIterator<Item = &'a Arc<Limit>>) {
        let old = self.limit_counters();
        let map = limits
            .into_iter()
            .map(|limit| {
                let handle = |outcome| {
                    self.decisions
                        .get_or_create(&DecisionLabels {
                            limit: limit.name().to_string(),
                            outcome,
                        })
                        .clone()
                };
                let counters = LimitCounters {
                    allowed: handle("allowed"),
                    denied: handle("denied"),
                    shadow_denied: handle("shadow_denied"),
                    denial_log: Arc::default(),
                    top: match old.get(limit.name()) {
                        Some(old) => old.top.clone(),
                        None => self
                            .top_keys
                            .map(|capacity| Arc::new(sluice_topkeys::TopKeys::new(capacity))),
                    },
                    timeline: old
                        .get(limit.name())
                        .map(|old| Arc::clone(&old.timeline))
                        .unwrap_or_default(),
                };
                (limit.name().to_string(), counters)
            })
            .collect();
        self.per_limit.store(Arc::new(map));
    }

    /// Counters per top-keys sketch, or `None` when top keys are off.
    pub fn top_keys_capacity(&self) -> Option<usize> {
        self.top_keys
    }

    /// The counters of every tracked limit.
    pub fn limit_counters(&self) -> Arc<LimitCountersByName> {
        self.per_limit.load_full()
    }

    /// Calls `f` with the counters of every tracked limit, without taking a reference
    /// count: for the decision path (hold it briefly).
    pub fn with_limit_counters<R>(&self, f: impl FnOnce(&LimitCountersByName) -> R) -> R {
        f(&self.per_limit.load())
    }

    /// Adds a front door's own series (`sluice_` is prefixed to `name`), such as the
    /// Envoy service's calls: this registry knows nothing of any front door's counters.
    /// Call it once per series, at start.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register(name, help, metric);
    }

    /// Counts one proxied reservation settled with `outcome` (see the series' help).
    pub fn proxy_settled(&self, outcome: &'static str) {
        self.proxy_settlements
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Records one store call's duration.
    pub fn observe_store(&self, took: Duration) {
        self.store_latency.observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition, with the store's own counts brought up to date.
    pub fn render(&self, backend: &'static str, stats: StoreStats) -> String {
        let labels = BackendLabels { backend };
        self.keys.get_or_create(&labels).set(stats.keys as i64);
        // Two scrapes at once (an HA Prometheus pair) must not both add the same delta.
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let evictions = self.evictions.get_or_create(&labels);
        evictions.inc_by(stats.evictions.saturating_sub(evictions.get()));
        let local_denials = self.local_denials.get_or_create(&labels);
        local_denials.inc_by(stats.local_denials.saturating_sub(local_denials.get()));
        let checks = sluice_identity::process_signature_checks();
        for (result, count) in [
            ("verified", checks.verified),
            ("refused", checks.checked.saturating_sub(checks.verified)),
        ] {
            let counter = self
                .jwt_signature_checks
                .get_or_create(&ResultLabels { result });
            counter.inc_by(count.saturating_sub(counter.get()));
        }
        let mut text = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}
