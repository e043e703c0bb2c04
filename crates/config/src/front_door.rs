//! The HTTP front-door sections, `client_ip`, `responses`, `forward_auth` and `routes`, as
//! derived types, and their checks building `sluice_http`'s types.
//!
//! A route may meter its calls (`usage:` and `cost: usage`, see `sluice_http::metered`)
//! and apply concurrency limits; both are settled when the answer ends, which only the
//! reverse proxy sees, so they are refused in a config without `proxy:`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use sluice_engine::LimitSet;
use sluice_http::{
    BodyTemplate, ClientIpConfig, EstimateSource, ForwardedHeader, KeyTemplate, PathPattern,
    ResponseConfig, Route, RouteCost, RouteLimit, RouteMatch, RouteUsage, Rules,
};
use sluice_usage::{CostWeights, EstimateConfig, UsageFormat};

use crate::de::{
    FromText, HINT, ListKind, ListOf, Located, OneOrMany, Parsed, Place, Whole, WholeOrWordVisitor,
    WholeVisitor, by_shape,
};
use crate::error::Fail;
use crate::tree::shorten;

/// Shortest `client_ip.hash_secret` accepted, in bytes.
const MIN_HASH_SECRET_BYTES: usize = 16;

/// Most limit names listed in an "unknown limit" error.
const MAX_NAMES_SHOWN: usize = 20;

/// `client_ip:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientIpSection {
    /// CIDR ranges or single addresses.
    trusted_proxies: Option<OneOrMany<Parsed<TrustedProxy>>>,
    header: Option<Parsed<ForwardedHeader>>,
    ipv6_prefix: Option<Whole<1, 128>>,
    hash: Option<Located<bool>>,
    /// Never shown in a message.
    hash_secret: Option<Located<String>>,
}

/// `responses:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResponsesSection {
    deny_status: Option<DenyStatus>,
    /// The status of a request a block entry refuses (default 403).
    block_status: Option<DenyStatus>,
    /// `ietf`, `legacy`, both or none.
    headers: Option<OneOrMany<Parsed<HeaderStyle>>>,
    body: Option<Parsed<BodyTemplate>>,
    content_type: Option<Parsed<HeaderValue>>,
}

/// `forward_auth:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForwardAuthSection {
    pub deny_status: Option<DenyStatus>,
}

/// `routes:`
pub(crate) type Routes = ListOf<RouteSection, RoutesList>;

pub(crate) struct RoutesList;
impl ListKind for RoutesList {
    const EXPECTING: &'static str =
        "a list of routes, e.g. `- match: {path: /api/*}` with `limits: [...]`";
}

/// One route.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteSection {
    #[serde(rename = "match")]
    matcher: Located<Matcher>,
    limits: ListOf<RouteLimitSection, RouteLimitsList>,
    /// How the answers report LLM usage, for the route's `cost: usage` limits.
    usage: Option<Located<UsageSection>>,
}

/// A route's `usage:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageSection {
    /// openai | anthropic | openai_responses | auto (default) | a JSON pointer.
    format: Option<Parsed<UsageFormat>>,
    /// `request` (default) or a number of tokens.
    estimate: Option<EstimateSetting>,
    /// Output tokens expected when the request sets no maximum (default 1024).
    default_output_tokens: Option<Whole<1, MAX_TOKENS>>,
    /// How long the reservation stays open (default: proxy.timeout_ms + 5 minutes).
    ttl_ms: Option<Whole<1, MAX_RESERVATION_TTL_MS>>,
    /// The largest request body read to estimate from (default 4 MiB).
    max_request_bytes: Option<Whole<MIN_REQUEST_BYTES, MAX_REQUEST_BYTES>>,
}

/// Most tokens an estimate may name.
const MAX_TOKENS: u64 = 1_000_000_000;
/// Longest `usage.ttl_ms`: a day, as for `/v1/reserve`.
const MAX_RESERVATION_TTL_MS: u64 = 86_400_000;
/// Smallest `usage.max_request_bytes`: a short prompt must fit.
const MIN_REQUEST_BYTES: u64 = 1024;
/// Largest `usage.max_request_bytes` (256 MiB): the body is held in memory.
const MAX_REQUEST_BYTES: u64 = 256 << 20;

pub(crate) struct RouteLimitsList;
impl ListKind for RouteLimitsList {
    const EXPECTING: &'static str =
        "a non-empty list of limits, e.g. `[{limit: api, key: \"{client_ip}\"}]`";
    const NON_EMPTY: bool = true;
}

const MATCH_EXPECTING: &str = "`default` or a mapping such as {path: /api/*, methods: [GET]}";

/// `match: default`, or `match: {path, methods, header}`.
enum Matcher {
    Default,
    Match(MatchSection),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSection {
    path: Option<Parsed<PathPattern>>,
    methods: Option<Located<OneOrMany<Parsed<Method>>>>,
    header: Option<Parsed<HeaderName>>,
}

/// One limit a route applies.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteLimitSection {
    limit: Located<String>,
    key: Located<OneOrMany<Located<Parsed<KeyTemplate>>>>,
    /// A whole number, or `usage`.
    cost: Option<Located<CostSetting>>,
    /// Only with `cost: usage`: what each kind of token costs in this limit's unit.
    weights: Option<Located<CostWeights>>,
}

const COST_HINT: &str =
    ": a fixed cost per request such as 1, or `usage` to charge what the answer reports it used";

/// A route limit's `cost`: a whole number, or `usage`.
enum CostSetting {
    Fixed(u64),
    Usage,
}

impl<'de> Deserialize<'de> for CostSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let visitor = WholeOrWordVisitor {
            min: 0,
            max: u64::MAX,
            word: "usage",
            expecting: "a whole number or `usage`",
            hint: COST_HINT,
        };
        let cost = deserializer.deserialize_any(visitor)?;
        Ok(cost.map_or(CostSetting::Usage, CostSetting::Fixed))
    }
}

/// `usage.estimate`: `request`, or a whole number of tokens.
enum EstimateSetting {
    Request,
    Tokens(u64),
}

const ESTIMATE_HINT: &str = ": `request` to read max_tokens and the prompt from the request body, or a number of tokens to reserve for every call";

impl<'de> Deserialize<'de> for EstimateSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // At least 1: a reservation of 0 is a read, which a spent budget allows.
        let visitor = WholeOrWordVisitor {
            min: 1,
            max: MAX_TOKENS,
            word: "request",
            expecting: "`request` or a number of tokens",
            hint: ESTIMATE_HINT,
        };
        let tokens = deserializer.deserialize_any(visitor)?;
        Ok(tokens.map_or(EstimateSetting::Request, EstimateSetting::Tokens))
    }
}

impl FromText for UsageFormat {
    fn from_text(text: &str) -> Result<Self, String> {
        text.trim()
            .parse()
            .map_err(|error: sluice_usage::FormatError| error.to_string())
    }
}

impl UsageSection {
    fn build(self) -> RouteUsage {
        let mut usage = RouteUsage::new(self.format.map_or(UsageFormat::Auto, |f| f.0));
        let mut config = EstimateConfig::default();
        if let Some(tokens) = self.default_output_tokens {
            config.default_output_tokens = tokens.0;
        }
        usage.estimate = match self.estimate {
            None | Some(EstimateSetting::Request) => EstimateSource::Request(config),
            Some(EstimateSetting::Tokens(tokens)) => EstimateSource::Tokens(tokens),
        };
        usage.ttl = self
            .ttl_ms
            .map(|ttl| std::time::Duration::from_millis(ttl.0));
        if let Some(bytes) = self.max_request_bytes {
            usage.max_request_bytes = usize::try_from(bytes.0).unwrap_or(usize::MAX);
        }
        usage
    }
}

impl<'de> Deserialize<'de> for Matcher {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Matcher;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(MATCH_EXPECTING)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Matcher, E> {
                if text.trim() == "default" {
                    return Ok(Matcher::Default);
                }
                let hint = if text.starts_with(['/', '~']) {
                    format!(": write `match: {{path: {}}}`", shorten(text))
                } else {
                    String::new()
                };
                let expected = format!("{MATCH_EXPECTING}{HINT}{hint}");
                Err(E::invalid_type(Unexpected::Str(text), &expected.as_str()))
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Matcher, D::Error> {
                MatchSection::deserialize(d).map(Matcher::Match)
            }
        }
        by_shape(deserializer, V)
    }
}

/// A 4xx or 5xx status.
pub(crate) struct DenyStatus(pub StatusCode);

impl<'de> Deserialize<'de> for DenyStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = deserializer.deserialize_any(WholeVisitor {
            min: 400,
            max: 599,
            hint: ": a deny status is a client or server error code, e.g. 429 or 403",
        })?;
        // Every code from 400 to 599 is a status, so this error cannot happen (and would
        // be placed at the section rather than the value).
        let code = u16::try_from(code).map_err(de::Error::custom)?;
        StatusCode::from_u16(code)
            .map(DenyStatus)
            .map_err(de::Error::custom)
    }
}

/// A CIDR range (`10.0.0.0/8`) or a single address (`127.0.0.1`, `::1`: /32 or /128).
struct TrustedProxy(IpNet);

impl FromText for TrustedProxy {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(net) = IpNet::from_str(text) {
            return Ok(TrustedProxy(net));
        }
        match IpAddr::from_str(text) {
            // Peers are compared in canonical form: `::ffff:10.0.0.1` is 10.0.0.1.
            Ok(ip) => Ok(TrustedProxy(IpNet::from(
                sluice_http::client_ip::canonical(ip),
            ))),
            Err(_) => Err(format!(
                "`{}` is not an IP address or CIDR range: write e.g. 10.0.0.0/8, 192.168.1.10 or \"::1\"",
                shorten(text)
            )),
        }
    }
}

impl FromText for ForwardedHeader {
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err(format!(
                "unknown forwarding header `{}`, expected `x-forwarded-for` or `forwarded` (RFC 7239)",
                shorten(text)
            )),
        }
    }
}

/// One of `responses.headers`.
#[derive(PartialEq, Eq)]
enum HeaderStyle {
    Ietf,
    Legacy,
}

impl FromText for HeaderStyle {
    fn from_text(text: &str) -> Result<Self, String> {
        match text {
            "ietf" => Ok(HeaderStyle::Ietf),
            "legacy" => Ok(HeaderStyle::Legacy),
            other => Err(format!(
                "unknown header style `{}`, expected `ietf` (RateLimit-Policy, RateLimit) or `legacy` (X-RateLimit-*); [] sends none",
                shorten(other)
            )),
        }
    }
}

impl FromText for BodyTemplate {
    const EXPECTING: &'static str = "the body as a string\0: quote it, e.g. body: '{\"error\": \"rate_limited\", \"limit\": \"{limit}\"}'";
    fn from_text(text: &str) -> Result<Self, String> {
        BodyTemplate::from_str(text).map_err(|error| error.to_string())
    }
}

impl FromText for HeaderValue {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(
                "content_type is empty: set it (e.g. application/json) or remove it".to_string(),
            );
        }
        HeaderValue::from_str(text).map_err(|_| {
            format!(
                "`{}` is not a valid header value: use visible ASCII, e.g. application/json",
                shorten(text)
            )
        })
    }
}

impl FromText for PathPattern {
    fn from_text(text: &str) -> Result<Self, String> {
        PathPattern::from_str(text).map_err(|error| error.to_string())
    }
}

impl FromText for Method {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        Method::from_bytes(text.to_ascii_uppercase().as_bytes()).map_err(|_| {
            format!(
                "`{}` is not an HTTP method: write one name per item, e.g. [GET, POST]",
                shorten(text)
            )
        })
    }
}

impl FromText for HeaderName {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()).map_err(|_| {
            format!(
                "`{}` is not a valid header name, e.g. x-api-key",
                shorten(text)
            )
        })
    }
}

impl FromText for KeyTemplate {
    // `key: {client_ip}` unquoted is a YAML mapping.
    const EXPECTING: &'static str =
        "a key template\0: quote templates that start with `{`, e.g. key: \"{client_ip}\"";
    fn from_text(text: &str) -> Result<Self, String> {
        KeyTemplate::from_str(text).map_err(|error| error.to_string())
    }
}

impl ClientIpSection {
    pub(crate) fn build(self) -> Result<ClientIpConfig, Fail> {
        let mut config = ClientIpConfig::default();
        if let Some(proxies) = self.trusted_proxies {
            config.trusted_proxies = proxies.0.into_iter().map(|proxy| proxy.0.0).collect();
        }
        if let Some(header) = self.header {
            config.header = header.0;
        }
        if let Some(prefix) = self.ipv6_prefix {
            config.ipv6_prefix = u8::try_from(prefix.0).unwrap_or(128);
        }
        // The secret's value never goes into a message.
        match (self.hash, self.hash_secret) {
            (Some(hash), Some(secret)) if hash.value => {
                if secret.value.len() < MIN_HASH_SECRET_BYTES {
                    return Err(secret.at.fail(format!(
                        "hash_secret must be at least {MIN_HASH_SECRET_BYTES} bytes: use a long random value, e.g. from `openssl rand -hex 32`"
                    )));
                }
                config.hash_secret = Some(secret.value.into_bytes());
            }
            (Some(hash), None) if hash.value => {
                return Err(hash.at.fail(format!(
                    "hash: true needs hash_secret, a secret of at least {MIN_HASH_SECRET_BYTES} bytes, e.g. `hash_secret: ${{SLUICE_IP_HASH_SECRET}}`"
                )));
            }
            (_, Some(secret)) => {
                return Err(secret.at.fail(
                    "hash_secret is set but hash is not true, so addresses would not be hashed: add `hash: true`, or remove hash_secret",
                ));
            }
            (_, None) => {}
        }
        Ok(config)
    }
}

impl ResponsesSection {
    pub(crate) fn build(self) -> ResponseConfig {
        let mut config = ResponseConfig::default();
        if let Some(status) = self.deny_status {
            config.deny_status = status.0;
        }
        if let Some(status) = self.block_status {
            config.block_status = status.0;
        }
        if let Some(styles) = self.headers {
            config.headers.ietf = styles.0.iter().any(|s| s.0 == HeaderStyle::Ietf);
            config.headers.legacy = styles.0.iter().any(|s| s.0 == HeaderStyle::Legacy);
        }
        if let Some(body) = self.body {
            config.body = body.0;
        }
        if let Some(content_type) = self.content_type {
            config.content_type = content_type.0;
        }
        config
    }
}

impl Routes {
    /// `proxy`: whether the reverse proxy runs: it alone issues session cookies (for
    /// `{session}`) and sees answers (for `usage` and concurrency limits).
    pub(crate) fn build(self, at: &Place, limits: &LimitSet, proxy: bool) -> Result<Rules, Fail> {
        let mut routes = Vec::with_capacity(self.0.len());
        // The first default route: its index and where it was written.
        let mut default: Option<(usize, usize)> = None;
        for (i, route) in self.0.into_iter().enumerate() {
            let matcher = match route.matcher.value {
                Matcher::Default => {
                    if let Some((first, line)) = default {
                        let on_line = match line {
                            0 => String::new(),
                            line => format!(", on line {line}"),
                        };
                        return Err(route.matcher.at.fail(format!(
                            "a second default route (the first is {}[{first}]{on_line}): there can be only one; merge their limits",
                            at.path
                        )));
                    }
                    default = Some((i, route.matcher.at.line()));
                    None
                }
                Matcher::Match(section) => Some(section.build()?),
            };
            if let Some(usage) = route.usage.as_ref().filter(|_| !proxy) {
                return Err(usage.at.fail(
                    "usage is read from the upstream's answer, which only the reverse proxy sees (forward-auth and the tower layer decide before the call): add a `proxy:` section, or have the app reserve and settle with /v1/reserve and /v1/settle",
                ));
            }
            let mut metered = None;
            let mut route_limits = Vec::with_capacity(route.limits.0.len());
            for limit in route.limits.0 {
                let (built, cost_at) = limit.build(limits, proxy)?;
                if built.cost.is_metered() && metered.is_none() {
                    metered = cost_at;
                }
                route_limits.push(built);
            }
            let usage = match (route.usage, metered) {
                (Some(usage), None) => {
                    return Err(usage.at.fail(
                        "usage is set but no limit of this route is charged from it: add `cost: usage` to the limits that should be charged what the answer used (e.g. `{limit: tokens_day, key: \"user:{header.x-user-id}\", cost: usage}`), or remove usage",
                    ));
                }
                (None, Some(cost_at)) => {
                    return Err(cost_at.fail(
                        "cost: usage charges what the answer reports it used, and this route does not say how its answers report it: add `usage: {format: openai}` (or anthropic, openai_responses, auto, a JSON pointer) to the route",
                    ));
                }
                (usage, _) => usage.map(|usage| std::sync::Arc::new(usage.value.build())),
            };
            routes.push(Route {
                default: matcher.is_none(),
                matcher: matcher.unwrap_or_default(),
                limits: route_limits,
                usage,
            });
        }
        Rules::new(routes).map_err(|error| at.fail(error.to_string()))
    }
}

impl MatchSection {
    fn build(self) -> Result<RouteMatch, Fail> {
        let mut matcher = RouteMatch {
            path: self.path.map(|path| path.0),
            header: self.header.map(|header| header.0),
            ..RouteMatch::default()
        };
        if let Some(methods) = self.methods {
            if methods.value.0.is_empty() {
                return Err(methods.at.fail(
                    "methods is empty: list at least one (e.g. [GET, POST]), or remove it to match every method",
                ));
            }
            matcher.methods = methods.value.0.into_iter().map(|m| m.0).collect();
        }
        Ok(matcher)
    }
}

impl RouteLimitSection {
    /// The route limit, and where a `cost: usage` was written.
    fn build(self, limits: &LimitSet, proxy: bool) -> Result<(RouteLimit, Option<Place>), Fail> {
        let Some(limit) = limits.get(&self.limit.value).cloned() else {
            return Err(self.limit.at.fail(unknown_limit(&self.limit.value, limits)));
        };
        if limit.is_concurrency() {
            if !proxy {
                return Err(self.limit.at.fail(format!(
                    "limit `{}` counts calls in flight, and only the reverse proxy sees when a call ends (forward-auth and the tower layer decide before it): add a `proxy:` section, or have the app hold slots with /v1/reserve and /v1/release",
                    limit.name()
                )));
            }
            if let Some(cost) = &self.cost {
                return Err(cost.at.fail(format!(
                    "cost does not apply to limit `{}`, a concurrency limit: each call holds one slot until its answer ends; remove cost",
                    limit.name()
                )));
            }
        }
        if self.key.value.0.is_empty() {
            return Err(self.key.at.fail(
                "key is an empty list: give at least one key template, e.g. \"{client_ip}\"",
            ));
        }
        let mut keys = Vec::with_capacity(self.key.value.0.len());
        for key in self.key.value.0 {
            // Only the reverse proxy issues session cookies (it alone writes the response
            // the client sees): without it a limit keyed by {session} would never apply.
            if key.value.0.uses_session() && !proxy {
                return Err(key.at.fail(
                    "{session} needs sluice's session cookies, which only the reverse proxy issues: add a `proxy:` section, or key anonymous callers by {client_ip} or a {cookie.NAME} your app sets",
                ));
            }
            keys.push(key.value.0);
        }
        let (cost, usage_at) = match (self.cost, self.weights) {
            (
                Some(Located {
                    value: CostSetting::Usage,
                    at,
                }),
                weights,
            ) => {
                let weights = weights.map_or_else(CostWeights::default, |w| w.value);
                (RouteCost::Usage(weights), Some(at))
            }
            (_, Some(weights)) => {
                return Err(weights.at.fail(
                    "weights price the usage an answer reports, so they apply only with `cost: usage`: add it, or remove weights",
                ));
            }
            (
                Some(Located {
                    value: CostSetting::Fixed(cost),
                    ..
                }),
                None,
            ) => (RouteCost::Fixed(cost), None),
            (None, None) => (RouteCost::Fixed(1), None),
        };
        Ok((RouteLimit { limit, keys, cost }, usage_at))
    }
}

fn unknown_limit(name: &str, limits: &LimitSet) -> String {
    let name = shorten(name);
    if limits.is_empty() {
        return format!(
            "unknown limit `{name}`: no limits are configured; define it under `limits:`"
        );
    }
    let mut names: Vec<String> = limits
        .iter()
        .take(MAX_NAMES_SHOWN)
        .map(|limit| format!("`{}`", limit.name()))
        .collect();
    if limits.len() > MAX_NAMES_SHOWN {
        names.push(format!("and {} more", limits.len() - MAX_NAMES_SHOWN));
    }
    format!(
        "unknown limit `{name}`: the configured limits are {}; define it under `limits:` or use one of those",
        names.join(", ")
    )
}
