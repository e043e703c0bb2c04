//! Routes: which limits apply to an HTTP request, and on which keys.
//!
//! A route matches on the request's canonical path (exact `/chat/message`, prefix
//! `/api/*`, or regex `~^/v[0-9]+/`; see [`crate::path`]), optionally on methods and
//! on a header being present. A request may match several routes; every limit of every
//! matching route goes into one atomic decision (the same limit on the same key only
//! once). A request that matches no route is not limited, unless a `default` route
//! exists.
//!
//! Paths match **without regard to ASCII case, repeated slashes or a trailing slash**,
//! because Express and ASP.NET route `/CHAT/message/` to the `/chat/message` handler.
//! An application that reads the path literally (Starlette, Django, axum) would send
//! such a request to a catch-all handler instead, so the `default` route also applies
//! whenever no route matches the literal path ([`RequestFacts::literal_path`]): every
//! reading of the path is charged. `HEAD` matches routes for `GET`, which frameworks
//! serve with the `GET` handler.
//!
//! A check's cost is fixed (`cost: N`) or metered (`cost: usage`, read from the answer:
//! see [`crate::metered`]); [`Rules::plan`] says which, with the route's usage settings.
//!
//! Matching cost does not grow with the number of exact and prefix routes: exact paths
//! are one hash lookup, prefixes one lookup per segment of the request path. Regex
//! routes are matched together in one pass of a `RegexSet`.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use http::header::HeaderName;
use regex::{RegexSet, RegexSetBuilder};
use sluice_engine::{Check, DecisionRequest, Limit};

use crate::metered::{RequestPlan, RouteCost, RouteUsage};
use crate::template::{KeyError, KeyTemplate, RequestFacts};

/// How a route matches the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// The path exactly, in its canonical spelling ([`crate::normalize_path`]).
    Exact(String),
    /// The path and everything below it: `/api/*` matches `/api` and `/api/x/y`.
    Prefix(String),
    /// A regular expression over the canonical path, matched without regard to case.
    Regex(String),
}

/// Why a route was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A path pattern that does not start with `/` or `~`.
    #[error("path {0:?} must start with '/' (exact, or a prefix ending in /*) or '~' (a regex)")]
    BadPath(String),
    /// A regex that does not compile.
    #[error("path regex {0:?} is invalid: {1}")]
    BadRegex(String, String),
    /// A `cost: usage` limit on a route without `usage` settings.
    #[error(
        "limit `{0}` is charged the usage its answer reports (cost: usage), but its route has no `usage:` settings saying how answers report it: add e.g. `usage: {{format: openai}}` to the route"
    )]
    MeteredWithoutUsage(String),
}

impl std::str::FromStr for PathPattern {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(regex) = s.strip_prefix('~') {
            regex::Regex::new(regex)
                .map_err(|e| RuleError::BadRegex(regex.to_string(), e.to_string()))?;
            return Ok(PathPattern::Regex(regex.to_string()));
        }
        if !s.starts_with('/') {
            return Err(RuleError::BadPath(s.to_string()));
        }
        if let Some(prefix) = s.strip_suffix("/*") {
            return Ok(PathPattern::Prefix(
                crate::path::normalize_path(prefix)
                    .trim_end_matches('/')
                    .to_string(),
            ));
        }
        Ok(PathPattern::Exact(crate::path::normalize_path(s)))
    }
}

/// What a route matches on; every part given must match.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// The path, or any path when `None`.
    pub path: Option<PathPattern>,
    /// The methods, or any method when empty.
    pub methods: Vec<Method>,
    /// A header that must be present (with any value).
    pub header: Option<HeaderName>,
}

/// One limit of a route: the keys to try in order, and the cost.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    /// The limit charged.
    pub limit: Arc<Limit>,
    /// Templates tried in order; the first that resolves is the key. None resolving skips the limit.
    pub keys: Vec<KeyTemplate>,
    /// What one request costs: fixed (default 1; always 1 for a concurrency limit), or
    /// the usage its answer reports.
    pub cost: RouteCost,
}

/// A route.
#[derive(Debug, Clone)]
pub struct Route {
    /// What it matches. Ignored for the default route.
    pub matcher: RouteMatch,
    /// Whether this is the default route, used only when no other route matches.
    pub default: bool,
    /// The limits it applies.
    pub limits: Vec<RouteLimit>,
    /// How its answers report usage, for its `cost: usage` limits (`usage:`).
    pub usage: Option<Arc<RouteUsage>>,
}

/// All routes, indexed for matching.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    routes: Vec<Route>,
    exact: HashMap<String, Vec<usize>>,
    prefix: HashMap<String, Vec<usize>>,
    /// Case-insensitive, for matching; case-sensitive, for the default route's test.
    regex: Option<(RegexSet, RegexSet, Vec<usize>)>,
    pathless: Vec<usize>,
    default: Option<usize>,
    uses_session: bool,
    uses_jwt: bool,
}

impl Rules {
    /// Indexes `routes` (kept in this order).
    pub fn new(routes: Vec<Route>) -> Result<Self, RuleError> {
        let mut rules = Rules::default();
        let mut patterns = Vec::new();
        let mut regex_routes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            if route.usage.is_none()
                && let Some(metered) = route.limits.iter().find(|l| l.cost.is_metered())
            {
                return Err(RuleError::MeteredWithoutUsage(
                    metered.limit.name().to_string(),
                ));
            }
            if route.default {
                rules.default = Some(i);
                continue;
            }
            match &route.matcher.path {
                Some(PathPattern::Exact(path)) => rules
                    .exact
                    .entry(path.to_ascii_lowercase())
                    .or_default()
                    .push(i),
                Some(PathPattern::Prefix(prefix)) => rules
                    .prefix
                    .entry(prefix.to_ascii_lowercase())
                    .or_default()
                    .push(i),
                Some(PathPattern::Regex(regex)) => {
                    patterns.push(regex.clone());
                    regex_routes.push(i);
                }
                None => rules.pathless.push(i),
            }
        }
        if !patterns.is_empty() {
            let build = |case_insensitive| {
                RegexSetBuilder::new(&patterns)
                    .case_insensitive(case_insensitive)
                    .build()
                    .map_err(|e| RuleError::BadRegex(patterns.join(" | "), e.to_string()))
            };
            rules.regex = Some((build(true)?, build(false)?, regex_routes));
        }
        rules.uses_session = routes
            .iter()
            .flat_map(|r| &r.limits)
            .flat_map(|l| &l.keys)
            .any(KeyTemplate::uses_session);
        rules.uses_jwt = routes
            .iter()
            .flat_map(|r| &r.limits)
            .flat_map(|l| &l.keys)
            .any(KeyTemplate::uses_jwt);
        rules.routes = routes;
        Ok(rules)
    }

    /// How many routes are configured.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no routes are configured (then no request is limited).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether any key template reads `{session}`.
    pub fn uses_session(&self) -> bool {
        self.uses_session
    }

    /// Whether any key template reads a verified token's claim (`{jwt.CLAIM}`), so a
    /// front door verifies the token only when it is read.
    pub fn uses_jwt(&self) -> bool {
        self.uses_jwt
    }

    /// The routes that apply to a request, in configuration order.
    pub fn matching(&self, facts: &RequestFacts<'_>) -> Vec<&Route> {
        let path = facts.path;
        // Most paths are lower case already: fold (and allocate) only when needed.
        let folded: std::borrow::Cow<'_, str> = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            path.to_ascii_lowercase().into()
        } else {
            path.into()
        };
        let mut hits: Vec<usize> = Vec::new();
        if let Some(routes) = self.exact.get(folded.as_ref()) {
            hits.extend(routes);
        }
        if !self.prefix.is_empty() {
            // "/a/b/c" is under the prefixes "/a/b/c", "/a/b", "/a" and "" (for "/*").
            let mut end = folded.len();
            loop {
                let candidate = folded[..end].trim_end_matches('/');
                if let Some(routes) = self.prefix.get(candidate) {
                    hits.extend(routes);
                }
                match candidate.rfind('/') {
                    Some(slash) => end = slash,
                    None => break,
                }
            }
        }
        if let Some((set, _, routes)) = &self.regex {
            hits.extend(set.matches(path).iter().map(|m| routes[m]));
        }
        hits.extend(&self.pathless);
        hits.sort_unstable();
        hits.dedup();
        let method = facts.method;
        hits.retain(|&i| {
            let m = &self.routes[i].matcher;
            (m.methods.is_empty()
                || m.methods.iter().any(|x| {
                    x.as_str().eq_ignore_ascii_case(method)
                        || (*x == Method::GET && method.eq_ignore_ascii_case("HEAD"))
                }))
                && m.header
                    .as_ref()
                    .is_none_or(|h| facts.headers.contains_key(h))
        });
        let case_matched = hits
            .iter()
            .any(|&i| self.matches_literally(i, facts.literal_path));
        let mut matched: Vec<&Route> = hits.into_iter().map(|i| &self.routes[i]).collect();
        if !case_matched {
            matched.extend(self.default.map(|i| &self.routes[i]));
        }
        matched
    }

    /// Whether route `i` (which matched the canonical path ignoring case) also matches
    /// the literal path, with case and every slash, as a decoding framework would.
    fn matches_literally(&self, i: usize, path: &str) -> bool {
        match &self.routes[i].matcher.path {
            None => true,
            Some(PathPattern::Exact(exact)) => path == exact,
            // As a mount: `/api/...`, not `/api` itself, which such an app may route
            // elsewhere.
            Some(PathPattern::Prefix(prefix)) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.starts_with('/')),
            Some(PathPattern::Regex(_)) => self.regex.as_ref().is_some_and(|(_, set, routes)| {
                routes
                    .iter()
                    .position(|&r| r == i)
                    .is_some_and(|p| set.matches(path).matched(p))
            }),
        }
    }

    /// Whether some route holds reservations: a `cost: usage` limit or a concurrency
    /// limit, which only a front door that sees the answer can decide.
    pub fn needs_reservations(&self) -> bool {
        self.routes
            .iter()
            .flat_map(|r| &r.limits)
            .any(|l| l.cost.is_metered() || l.limit.is_concurrency())
    }

    /// The checks a request makes: every limit of every matching route whose key
    /// resolves, each (limit, key) once; a key template that reads a repeated name
    /// gives a check per value (see [`KeyTemplate::render`]). Metered checks are at
    /// cost 0 here: see [`Rules::plan`].
    pub fn checks(&self, facts: &RequestFacts<'_>) -> Result<Vec<Check>, KeyError> {
        Ok(self.plan(facts, false)?.request.checks)
    }

    /// What a request makes of the routes: its checks (as [`Rules::checks`]), how each
    /// is priced, and the usage settings of the first matching route whose metered
    /// check applies (when several such routes match, the first one's settings meter
    /// the request).
    pub fn plan(&self, facts: &RequestFacts<'_>, dry_run: bool) -> Result<RequestPlan, KeyError> {
        let mut plan = RequestPlan {
            request: DecisionRequest {
                checks: Vec::new(),
                dry_run,
            },
            costs: Vec::new(),
            usage: None,
            // `HttpPolicy::plan` resolved it (the facts hold only its key).
            client: None,
        };
        for route in self.matching(facts) {
            for rl in &route.limits {
                // The caller's plan picks the limit's rates (the default plan otherwise).
                if facts.plan_unknown && !rl.limit.plans().is_empty() {
                    return Err(KeyError::UnverifiedToken);
                }
                let limit = rl.limit.for_plan(facts.plan);
                let mut keys = None;
                // Whether the template that rendered the keys reads nothing the client
                // writes: only such keys may match an allow entry.
                let mut trusted = false;
                for template in &rl.keys {
                    keys = template.render(facts)?;
                    if keys.is_some() {
                        trusted = template.is_trusted();
                        break;
                    }
                }
                for key in keys.into_iter().flatten() {
                    let checks = &mut plan.request.checks;
                    let seen = checks
                        .iter()
                        .position(|c| Arc::ptr_eq(c.limit(), limit) && c.key() == key);
                    if let Some(seen) = seen {
                        // Another route rendered the same key; when this one's template
                        // is trusted, the client did not choose it either way.
                        if trusted && !checks[seen].key_is_trusted() {
                            checks[seen] = checks[seen].clone().with_trusted_key(true);
                        }
                        continue;
                    }
                    // A metered check is priced once the estimate is known; a concurrency
                    // limit's check holds one slot, whatever the route says.
                    let cost = match rl.cost {
                        RouteCost::Usage(_) => 0,
                        RouteCost::Fixed(_) if limit.is_concurrency() => 1,
                        RouteCost::Fixed(cost) => cost,
                    };
                    // Keys were bounded by `render`, so this cannot fail; skip if it ever did.
                    if let Ok(check) = Check::new(Arc::clone(limit), key, cost) {
                        checks.push(check.with_trusted_key(trusted));
                        plan.costs.push(rl.cost);
                        if rl.cost.is_metered() && plan.usage.is_none() {
                            plan.usage.clone_from(&route.usage);
                        }
                    }
                }
            }
        }
        Ok(plan)
    }

    /// The decision request for a request: [`Rules::checks`] as one atomic decision
    /// (metered checks at cost 0: see [`Rules::plan`]).
    pub fn decision_request(
        &self,
        facts: &RequestFacts<'_>,
        dry_run: bool,
    ) -> Result<DecisionRequest, KeyError> {
        Ok(self.plan(facts, dry_run)?.request)
    }
}
