//! Named limits. A limit has one or more windows (`[5/minute, 60/hour]`) that all
//! apply to the same key, plus the `charge_denied` and `shadow` switches; or it counts
//! calls in flight (`concurrency: N`), one window whose slots reservations hold.

use std::collections::HashMap;
use std::sync::Arc;

use crate::algorithm::{Algorithm, Window};
use crate::rate::Rate;

/// Why a limit definition was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The name has characters that cannot appear in counter keys and metric labels.
    #[error("limit name {0:?} is invalid: use 1 to 64 letters, digits, '_', '-' or '.'")]
    BadName(String),
    /// Two limits share a name.
    #[error("limit {0:?} is defined twice")]
    DuplicateName(String),
    /// No rate given.
    #[error("a limit needs at least one rate, e.g. rate: 5/minute or rate: [5/minute, 60/hour]")]
    NoRates,
    /// Two rates with the same period would share one counter.
    #[error(
        "rates {0} and {1} have the same period; keep one, or put the other in a separate limit"
    )]
    SamePeriod(Rate, Rate),
    /// Algorithm name not known.
    #[error("unknown algorithm {0:?}: use gcra, sliding_window or fixed_window")]
    UnknownAlgorithm(String),
    /// `burst` given for an algorithm that has none.
    #[error("burst only applies to algorithm gcra, not {0}; remove burst or use gcra")]
    BurstNeedsGcra(Algorithm),
    /// `burst` given for a limit with several rates.
    #[error("burst applies to a limit with one rate; split the rates into separate limits")]
    BurstNeedsOneRate,
    /// `burst` out of range.
    #[error(
        "burst {0} is out of range: use 1 up to the bucket a rate can refill within 2000 periods"
    )]
    BadBurst(u64),
    /// `concurrency` out of range.
    #[error("concurrency {0} is out of range: use 1 to 1000000000 calls in flight")]
    BadConcurrency(u64),
    /// Both `concurrency` and rates given.
    #[error(
        "a limit counts either calls in flight (concurrency) or a rate, not both; put them in separate limits"
    )]
    ConcurrencyWithRates,
    /// A plan name with characters that do not belong in one.
    #[error(
        "plan name {0:?} is invalid: use 1 to 32 letters, digits, '_', '-' or '.' (\"override\" is taken: it names a rate set for one subject at run time)"
    )]
    BadPlanName(String),
    /// A plan given twice for one limit.
    #[error("plan {0:?} is given twice for this limit")]
    DuplicatePlan(String),
    /// gcra's interval would be below a microsecond.
    #[error(
        "rate {0} is too fine for gcra (more than one request per microsecond); use fixed_window or sliding_window"
    )]
    RateTooFine(Rate),
    /// A calendar-month rate with an algorithm that needs a fixed period.
    #[error(
        "rate {0} counts UTC calendar months, which only algorithm fixed_window can do, not {1}; set algorithm: fixed_window"
    )]
    CalendarMonthNeedsFixedWindow(Rate, Algorithm),
}

/// A limit as configured, before it is named and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    /// One or more rates, each its own window on the same key.
    pub rates: Vec<Rate>,
    /// How every window counts.
    pub algorithm: Algorithm,
    /// gcra burst (default: the quota).
    pub burst: Option<u64>,
    /// Denied attempts still count against this limit.
    pub charge_denied: bool,
    /// Decide and report, never deny.
    pub shadow: bool,
    /// Calls in flight per key instead of rates: slots held by open reservations.
    pub concurrency: Option<u64>,
}

impl LimitSpec {
    /// A gcra limit with the given rates and no switches.
    pub fn new(rates: Vec<Rate>) -> Self {
        LimitSpec {
            rates,
            algorithm: Algorithm::Gcra,
            burst: None,
            charge_denied: false,
            shadow: false,
            concurrency: None,
        }
    }

    /// A limit of at most `slots` calls in flight per key.
    pub fn concurrency(slots: u64) -> Self {
        LimitSpec {
            concurrency: Some(slots),
            ..LimitSpec::new(Vec::new())
        }
    }
}

/// One window of a named limit, with the counter name stores key it by.
#[derive(Debug, Clone)]
pub struct LimitWindow {
    /// The algorithm and rate.
    pub window: Window,
    /// `"<limit>:<algorithm tag><period tag>"`, e.g. `chat_user:g60` (seconds) or
    /// `budget:f1mo` (a calendar month; see [`Rate::period_tag`]). Stable across
    /// reloads while the limit's name, algorithm and period stay the same, so counters survive.
    pub counter: Arc<str>,
    /// The rate as shown to users, e.g. `5/minute`.
    pub rate_text: Arc<str>,
}

/// The plan name of a rate override made at run time ([`Limit::with_override`]); no
/// configured plan may be called this.
pub const OVERRIDE_PLAN: &str = "override";

/// A named, validated limit.
#[derive(Debug, Clone)]
pub struct Limit {
    name: Arc<str>,
    windows: Vec<LimitWindow>,
    charge_denied: bool,
    shadow: bool,
    /// The plan this limit is the rates of (`None`: the default plan).
    plan: Option<Arc<str>>,
    /// The limit's other plans, by name: the same limit (name, counters) at other rates.
    plans: Vec<Arc<Limit>>,
}

impl Limit {
    /// Validates `spec` and names it.
    pub fn new(name: &str, spec: LimitSpec) -> Result<Self, LimitError> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !name_ok {
            return Err(LimitError::BadName(name.to_string()));
        }
        if let Some(slots) = spec.concurrency {
            if !spec.rates.is_empty() || spec.burst.is_some() {
                return Err(LimitError::ConcurrencyWithRates);
            }
            return Ok(Limit {
                name: name.into(),
                windows: vec![LimitWindow {
                    window: Window::concurrency(slots)?,
                    counter: format!("{name}:c").into(),
                    rate_text: format!("{slots} in flight").into(),
                }],
                charge_denied: false,
                shadow: spec.shadow,
                plan: None,
                plans: Vec::new(),
            });
        }
        if spec.rates.is_empty() {
            return Err(LimitError::NoRates);
        }
        if spec.burst.is_some() && spec.rates.len() > 1 {
            return Err(LimitError::BurstNeedsOneRate);
        }
        for (i, a) in spec.rates.iter().enumerate() {
            if let Some(b) = spec.rates[i + 1..]
                .iter()
                .find(|b| b.period() == a.period())
            {
                return Err(LimitError::SamePeriod(*a, *b));
            }
        }
        let windows = spec
            .rates
            .iter()
            .map(|rate| {
                let window = Window::new(spec.algorithm, *rate, spec.burst)?;
                Ok(LimitWindow {
                    window,
                    counter: format!("{name}:{}{}", spec.algorithm.tag(), rate.period_tag()).into(),
                    rate_text: rate.to_string().into(),
                })
            })
            .collect::<Result<Vec<_>, LimitError>>()?;
        Ok(Limit {
            name: name.into(),
            windows,
            charge_denied: spec.charge_denied,
            shadow: spec.shadow,
            plan: None,
            plans: Vec::new(),
        })
    }

    /// This limit with other plans: `plans` are the same limit at other rates, each
    /// named (`pro`, `enterprise`). A plan keeps the limit's name, so a key that changes
    /// plan keeps what it spent in every window whose algorithm and period stay the same.
    pub fn with_plans(
        mut self,
        plans: impl IntoIterator<Item = (String, Limit)>,
    ) -> Result<Self, LimitError> {
        for (plan, mut limit) in plans {
            let valid = !plan.is_empty()
                && plan != OVERRIDE_PLAN
                && plan.len() <= 32
                && plan
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !valid {
                return Err(LimitError::BadPlanName(plan));
            }
            if self
                .plans
                .iter()
                .any(|p| p.plan.as_deref() == Some(plan.as_str()))
            {
                return Err(LimitError::DuplicatePlan(plan));
            }
            limit.name = self.name.clone();
            limit.plan = Some(plan.into());
            limit.plans = Vec::new();
            self.plans.push(Arc::new(limit));
        }
        Ok(self)
    }

    /// This limit at `rates` for one subject (a rate override set at run time): the same
    /// name, algorithm and flags, so a key keeps what it spent in every window whose
    /// period stays the same, and its plan reads [`OVERRIDE_PLAN`]. Concurrency limits
    /// have no rates to override.
    pub fn with_override(&self, rates: Vec<Rate>) -> Result<Limit, LimitError> {
        if self.is_concurrency() {
            return Err(LimitError::ConcurrencyWithRates);
        }
        let mut spec = LimitSpec::new(rates);
        spec.algorithm = self.algorithm();
        spec.charge_denied = self.charge_denied;
        spec.shadow = self.shadow;
        let mut limit = Limit::new(&self.name, spec)?;
        limit.plan = Some(OVERRIDE_PLAN.into());
        Ok(limit)
    }

    /// The plan these rates belong to; `None` for the default plan.
    pub fn plan(&self) -> Option<&str> {
        self.plan.as_deref()
    }

    /// The limit's other plans (not the default one).
    pub fn plans(&self) -> &[Arc<Limit>] {
        &self.plans
    }

    /// The limit as it applies to a caller on `plan`: that plan's rates when the limit
    /// has such a plan, the default ones otherwise (no plan, or one it does not know).
    pub fn for_plan<'a>(self: &'a Arc<Self>, plan: Option<&str>) -> &'a Arc<Limit> {
        match plan {
            Some(plan) => self
                .plans
                .iter()
                .find(|p| p.plan.as_deref() == Some(plan))
                .unwrap_or(self),
            None => self,
        }
    }

    /// The limit's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its windows, in the order the rates were written.
    pub fn windows(&self) -> &[LimitWindow] {
        &self.windows
    }

    /// Whether denied attempts are charged.
    pub fn charge_denied(&self) -> bool {
        self.charge_denied
    }

    /// Whether the limit only reports.
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// The algorithm every window uses.
    pub fn algorithm(&self) -> Algorithm {
        self.windows[0].window.algorithm()
    }

    /// Whether the limit counts calls in flight (`concurrency: N`): only a reservation
    /// can hold its slots.
    pub fn is_concurrency(&self) -> bool {
        self.algorithm() == Algorithm::Concurrency
    }
}

/// All configured limits, by name, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct LimitSet {
    ordered: Vec<Arc<Limit>>,
    /// Hashed with foldhash rather than SipHash: every check looks its limit up here by
    /// a name the client sent, and the map is only ever built from configuration, so
    /// no client can fill it with colliding names.
    by_name: HashMap<Arc<str>, Arc<Limit>, hashbrown::DefaultHashBuilder>,
}

impl LimitSet {
    /// A set of limits; names must be unique.
    pub fn new(limits: impl IntoIterator<Item = Limit>) -> Result<Self, LimitError> {
        let mut set = LimitSet::default();
        for limit in limits {
            let limit = Arc::new(limit);
            if set
                .by_name
                .insert(limit.name.clone(), limit.clone())
                .is_some()
            {
                return Err(LimitError::DuplicateName(limit.name().to_string()));
            }
            set.ordered.push(limit);
        }
        Ok(set)
    }

    /// The limit called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Limit>> {
        self.by_name.get(name)
    }

    /// Every limit in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Limit>> {
        self.ordered.iter()
    }

    /// How many limits there are.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}
