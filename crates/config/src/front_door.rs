//! The HTTP front-door sections: `client_ip`, `responses`, `forward_auth` and `routes`,
//! converted into `sluice_http`'s types with every error placed at its node.

use std::net::IpAddr;
use std::str::FromStr;

use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use ipnet::IpNet;
use sluice_engine::LimitSet;
use sluice_http::{
    BodyTemplate, ClientIpConfig, ForwardedHeader, KeyTemplate, PathPattern, ResponseConfig, Route,
    RouteLimit, RouteMatch, Rules,
};

use crate::ForwardAuthConfig;
use crate::convert::{Fields, boolean, string, whole};
use crate::error::{Fail, Origin};
use crate::tree::{Kind, Node, Scalar, Value, shorten};

const CLIENT_IP_FIELDS: &[&str] = &[
    "trusted_proxies",
    "header",
    "ipv6_prefix",
    "hash",
    "hash_secret",
];
const RESPONSES_FIELDS: &[&str] = &["deny_status", "headers", "body", "content_type"];
const FORWARD_AUTH_FIELDS: &[&str] = &["deny_status"];
const ROUTE_FIELDS: &[&str] = &["match", "limits"];
const MATCH_FIELDS: &[&str] = &["path", "methods", "header"];
const ROUTE_LIMIT_FIELDS: &[&str] = &["limit", "key", "cost"];

/// Shortest `client_ip.hash_secret` accepted, in bytes.
const MIN_HASH_SECRET_BYTES: usize = 16;

/// Most limit names listed in an "unknown limit" error.
const MAX_NAMES_SHOWN: usize = 20;

/// A list's items with their paths (`path[i]`), or a single value as a list of one.
fn one_or_many<'a>(node: &'a Node, path: &str) -> Vec<(&'a Node, String)> {
    match &node.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (item, format!("{path}[{i}]")))
            .collect(),
        _ => vec![(node, path.to_string())],
    }
}

// ---- client_ip ----

pub(crate) fn client_ip(node: &Node, path: &str) -> Result<ClientIpConfig, Fail> {
    let mut config = ClientIpConfig::default();
    let Some(fields) = Fields::of(node, path, CLIENT_IP_FIELDS)? else {
        return Ok(config);
    };
    if let Some((node, path)) = fields.get("trusted_proxies") {
        config.trusted_proxies = one_or_many(node, &path)
            .into_iter()
            .map(|(node, path)| trusted_proxy(node, &path))
            .collect::<Result<_, _>>()?;
    }
    if let Some((node, path)) = fields.get("header") {
        let text = string(node, &path)?;
        config.header = match text.trim().to_ascii_lowercase().as_str() {
            "x-forwarded-for" => ForwardedHeader::XForwardedFor,
            "forwarded" => ForwardedHeader::Forwarded,
            _ => {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    format!(
                        "unknown forwarding header `{}`, expected `x-forwarded-for` or `forwarded` (RFC 7239)",
                        shorten(text)
                    ),
                ));
            }
        };
    }
    if let Some((node, path)) = fields.get("ipv6_prefix") {
        config.ipv6_prefix = u8::try_from(whole(node, &path, 1, 128)?).unwrap_or(128);
    }
    let hash = match fields.get("hash") {
        Some((node, path)) => Some((boolean(node, &path)?, node, path)),
        None => None,
    };
    // The secret's value never goes into a message.
    match (hash, fields.get("hash_secret")) {
        (Some((true, _, _)), Some((node, path))) => {
            let secret = string(node, &path)?;
            if secret.len() < MIN_HASH_SECRET_BYTES {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    format!(
                        "hash_secret must be at least {MIN_HASH_SECRET_BYTES} bytes: use a long random value, e.g. from `openssl rand -hex 32`"
                    ),
                ));
            }
            config.hash_secret = Some(secret.as_bytes().to_vec());
        }
        (Some((true, node, path)), None) => {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "hash: true needs hash_secret, a secret of at least {MIN_HASH_SECRET_BYTES} bytes, e.g. `hash_secret: ${{SLUICE_IP_HASH_SECRET}}`"
                ),
            ));
        }
        (_, Some((node, path))) => {
            return Err(Fail::new(
                &node.origin,
                &path,
                "hash_secret is set but hash is not true, so addresses would not be hashed: add `hash: true`, or remove hash_secret",
            ));
        }
        (_, None) => {}
    }
    Ok(config)
}

/// A CIDR range (`10.0.0.0/8`) or a single address (`127.0.0.1`, `::1`: /32 or /128).
fn trusted_proxy(node: &Node, path: &str) -> Result<IpNet, Fail> {
    let text = string(node, path)?.trim();
    if let Ok(net) = IpNet::from_str(text) {
        return Ok(net);
    }
    if let Ok(ip) = IpAddr::from_str(text) {
        // Peers are compared in canonical form: `::ffff:10.0.0.1` is 10.0.0.1.
        return Ok(IpNet::from(sluice_http::client_ip::canonical(ip)));
    }
    Err(Fail::new(
        &node.origin,
        path,
        format!(
            "`{}` is not an IP address or CIDR range: write e.g. 10.0.0.0/8, 192.168.1.10 or \"::1\"",
            shorten(text)
        ),
    ))
}

// ---- responses and forward_auth ----

pub(crate) fn responses(node: &Node, path: &str) -> Result<ResponseConfig, Fail> {
    let mut config = ResponseConfig::default();
    let Some(fields) = Fields::of(node, path, RESPONSES_FIELDS)? else {
        return Ok(config);
    };
    if let Some((node, path)) = fields.get("deny_status") {
        config.deny_status = deny_status(node, &path)?;
    }
    if let Some((node, path)) = fields.get("headers") {
        config.headers.ietf = false;
        config.headers.legacy = false;
        for (node, path) in one_or_many(node, &path) {
            match string(node, &path)? {
                "ietf" => config.headers.ietf = true,
                "legacy" => config.headers.legacy = true,
                other => {
                    return Err(Fail::new(
                        &node.origin,
                        &path,
                        format!(
                            "unknown header style `{}`, expected `ietf` (RateLimit-Policy, RateLimit) or `legacy` (X-RateLimit-*); [] sends none",
                            shorten(other)
                        ),
                    ));
                }
            }
        }
    }
    if let Some((node, path)) = fields.get("body") {
        if let Value::Map(_) | Value::Seq(_) = node.value {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "expected the body as a string, found {}: quote it, e.g. body: '{{\"error\": \"rate_limited\", \"limit\": \"{{limit}}\"}}'",
                    node.describe()
                ),
            ));
        }
        config.body = BodyTemplate::from_str(string(node, &path)?)
            .map_err(|error| Fail::new(&node.origin, &path, error.to_string()))?;
    }
    if let Some((node, path)) = fields.get("content_type") {
        let text = string(node, &path)?.trim();
        if text.is_empty() {
            return Err(Fail::new(
                &node.origin,
                &path,
                "content_type is empty: set it (e.g. application/json) or remove it",
            ));
        }
        config.content_type = HeaderValue::from_str(text).map_err(|_| {
            Fail::new(
                &node.origin,
                &path,
                format!(
                    "`{}` is not a valid header value: use visible ASCII, e.g. application/json",
                    shorten(text)
                ),
            )
        })?;
    }
    Ok(config)
}

pub(crate) fn forward_auth(node: &Node, path: &str) -> Result<ForwardAuthConfig, Fail> {
    let mut config = ForwardAuthConfig::default();
    let Some(fields) = Fields::of(node, path, FORWARD_AUTH_FIELDS)? else {
        return Ok(config);
    };
    if let Some((node, path)) = fields.get("deny_status") {
        config.deny_status = Some(deny_status(node, &path)?);
    }
    Ok(config)
}

/// A 4xx or 5xx status.
fn deny_status(node: &Node, path: &str) -> Result<StatusCode, Fail> {
    let code = whole(node, path, 400, 599).map_err(|fail| Fail {
        message: format!(
            "{}: a deny status is a client or server error code, e.g. 429 or 403",
            fail.message
        ),
        ..fail
    })?;
    u16::try_from(code)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| Fail::new(&node.origin, path, format!("{code} is not a status code")))
}

// ---- routes ----

/// `sessions`: whether `{session}` can resolve (the reverse proxy issues session cookies).
pub(crate) fn routes(
    node: &Node,
    path: &str,
    limits: &LimitSet,
    sessions: bool,
) -> Result<Rules, Fail> {
    if node.is_null() {
        return Ok(Rules::default());
    }
    let Value::Seq(items) = &node.value else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!(
                "expected a list of routes, e.g. `- match: {{path: /api/*}}` with `limits: [...]`, found {}",
                node.describe()
            ),
        ));
    };
    let mut routes = Vec::with_capacity(items.len());
    // The first default route: its path and where it was written.
    let mut default: Option<(String, &Origin)> = None;
    for (i, item) in items.iter().enumerate() {
        let path = format!("{path}[{i}]");
        let (route, match_node) = route(item, &path, limits, sessions)?;
        if route.default {
            if let Some((first, origin)) = &default {
                let on_line = match origin {
                    Origin::File { line, .. } => format!(", on line {line}"),
                    Origin::Env { .. } => String::new(),
                };
                return Err(Fail::new(
                    &match_node.origin,
                    &format!("{path}.match"),
                    format!(
                        "a second default route (the first is {first}{on_line}): there can be only one; merge their limits"
                    ),
                ));
            }
            default = Some((path.clone(), &match_node.origin));
        }
        routes.push(route);
    }
    Rules::new(routes).map_err(|error| Fail::new(&node.origin, path, error.to_string()))
}

/// One route, and its `match` node.
fn route<'a>(
    node: &'a Node,
    path: &str,
    limits: &LimitSet,
    sessions: bool,
) -> Result<(Route, &'a Node), Fail> {
    let example =
        "e.g. `- match: {path: /api/*}` with `limits: [{limit: api, key: \"{client_ip}\"}]`";
    let Some(fields) = Fields::of(node, path, ROUTE_FIELDS)? else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!("route has no settings: give it `match` and `limits`, {example}"),
        ));
    };
    let Some((match_node, match_path)) = fields.get("match") else {
        return Err(Fail::new(
            &node.origin,
            path,
            "missing field `match`: write `match: {path: /api/*}`, `match: {}` for every request, or `match: default` for requests no other route matches",
        ));
    };
    let matcher = matcher(match_node, &match_path)?;
    let Some((limits_node, limits_path)) = fields.get("limits") else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!("missing field `limits`: a route applies at least one limit, {example}"),
        ));
    };
    let route = Route {
        default: matcher.is_none(),
        matcher: matcher.unwrap_or_default(),
        limits: route_limits(limits_node, &limits_path, limits, sessions)?,
    };
    Ok((route, match_node))
}

/// `match: default` (`None`) or `match: {path, methods, header}`.
fn matcher(node: &Node, path: &str) -> Result<Option<RouteMatch>, Fail> {
    if let Value::Scalar(Scalar { text, kind }) = &node.value {
        if *kind == Kind::Str && text.trim() == "default" {
            return Ok(None);
        }
        let hint = if text.starts_with(['/', '~']) {
            format!(": write `match: {{path: {}}}`", shorten(text))
        } else {
            String::new()
        };
        return Err(Fail::new(
            &node.origin,
            path,
            format!(
                "expected `default` or a mapping such as {{path: /api/*, methods: [GET]}}, found {}{hint}",
                node.describe()
            ),
        ));
    }
    let Some(fields) = Fields::of(node, path, MATCH_FIELDS)? else {
        return Ok(Some(RouteMatch::default()));
    };
    let mut matcher = RouteMatch::default();
    if let Some((node, path)) = fields.get("path") {
        let pattern = PathPattern::from_str(string(node, &path)?)
            .map_err(|error| Fail::new(&node.origin, &path, error.to_string()))?;
        matcher.path = Some(pattern);
    }
    if let Some((node, path)) = fields.get("methods") {
        if matches!(&node.value, Value::Seq(items) if items.is_empty()) {
            return Err(Fail::new(
                &node.origin,
                &path,
                "methods is empty: list at least one (e.g. [GET, POST]), or remove it to match every method",
            ));
        }
        matcher.methods = one_or_many(node, &path)
            .into_iter()
            .map(|(node, path)| method(node, &path))
            .collect::<Result<_, _>>()?;
    }
    if let Some((node, path)) = fields.get("header") {
        let text = string(node, &path)?.trim();
        let name = HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()).map_err(|_| {
            Fail::new(
                &node.origin,
                &path,
                format!(
                    "`{}` is not a valid header name, e.g. x-api-key",
                    shorten(text)
                ),
            )
        })?;
        matcher.header = Some(name);
    }
    Ok(Some(matcher))
}

fn method(node: &Node, path: &str) -> Result<Method, Fail> {
    let text = string(node, path)?.trim();
    Method::from_bytes(text.to_ascii_uppercase().as_bytes()).map_err(|_| {
        Fail::new(
            &node.origin,
            path,
            format!(
                "`{}` is not an HTTP method: write one name per item, e.g. [GET, POST]",
                shorten(text)
            ),
        )
    })
}

fn route_limits(
    node: &Node,
    path: &str,
    limits: &LimitSet,
    sessions: bool,
) -> Result<Vec<RouteLimit>, Fail> {
    let items = match &node.value {
        Value::Seq(items) if !items.is_empty() => items,
        _ => {
            return Err(Fail::new(
                &node.origin,
                path,
                format!(
                    "expected a non-empty list of limits, e.g. `[{{limit: api, key: \"{{client_ip}}\"}}]`, found {}",
                    node.describe()
                ),
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| route_limit(item, &format!("{path}[{i}]"), limits, sessions))
        .collect()
}

fn route_limit(
    node: &Node,
    path: &str,
    limits: &LimitSet,
    sessions: bool,
) -> Result<RouteLimit, Fail> {
    let example = "e.g. `{limit: api, key: \"{client_ip}\"}`";
    let Some(fields) = Fields::of(node, path, ROUTE_LIMIT_FIELDS)? else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!("empty entry: name a limit and a key, {example}"),
        ));
    };
    let Some((limit_node, limit_path)) = fields.get("limit") else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!("missing field `limit`: name one of the configured limits, {example}"),
        ));
    };
    let name = string(limit_node, &limit_path)?;
    let Some(limit) = limits.get(name).cloned() else {
        return Err(Fail::new(
            &limit_node.origin,
            &limit_path,
            unknown_limit(name, limits),
        ));
    };
    let Some((key_node, key_path)) = fields.get("key") else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!(
                "missing field `key`: give a key template or a list of them to try in order, {example}"
            ),
        ));
    };
    if matches!(&key_node.value, Value::Seq(items) if items.is_empty()) {
        return Err(Fail::new(
            &key_node.origin,
            &key_path,
            "key is an empty list: give at least one key template, e.g. \"{client_ip}\"",
        ));
    }
    let keys = one_or_many(key_node, &key_path)
        .into_iter()
        .map(|(node, path)| key_template(node, &path, sessions))
        .collect::<Result<_, _>>()?;
    let cost = match fields.get("cost") {
        Some((node, path)) => whole(node, &path, 0, u64::MAX)?,
        None => 1,
    };
    Ok(RouteLimit { limit, keys, cost })
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

fn key_template(node: &Node, path: &str, sessions: bool) -> Result<KeyTemplate, Fail> {
    if let Value::Map(_) = node.value {
        // `key: {client_ip}` unquoted is a YAML mapping.
        return Err(Fail::new(
            &node.origin,
            path,
            "expected a key template, found a mapping: quote templates that start with `{`, e.g. key: \"{client_ip}\"",
        ));
    }
    let template = KeyTemplate::from_str(string(node, path)?)
        .map_err(|error| Fail::new(&node.origin, path, error.to_string()))?;
    if template.uses_session() && !sessions {
        // Only the reverse proxy issues session cookies (it alone writes the response the
        // client sees): without it a limit keyed by {session} would silently never apply.
        return Err(Fail::new(
            &node.origin,
            path,
            "{session} needs sluice's session cookies, which only the reverse proxy issues: add a `proxy:` section, or key anonymous callers by {client_ip} or a {cookie.NAME} your app sets",
        ));
    }
    Ok(template)
}
