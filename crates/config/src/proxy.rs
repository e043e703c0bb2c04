//! The reverse-proxy sections, `proxy:` and `sessions:`, with every error placed at its
//! node.
//!
//! ```yaml
//! proxy:
//!   upstream: http://127.0.0.1:9000      # required; http only; a path is a prefix
//!   connect_timeout_ms: 5000             # connecting to the upstream
//!   timeout_ms: 60000                    # from sending the request to the response head
//!   refund_on_status: [404, "5xx"]       # codes or classes whose cost is given back
//!   quota_path: /_sluice/quota           # the caller's own quota, without charging
//!   sluice_endpoints: admin              # admin (default) | main | a prefix such as /_sluice
//! sessions:                              # only with proxy
//!   cookie: sluice_session
//!   secret: ${SLUICE_SESSION_SECRET}     # at least 16 bytes; random per start if absent
//!   secure: false                        # true: Secure on every cookie, not only over TLS
//!   max_age_seconds: 2592000
//! ```

use http::Uri;

use crate::convert::{Fields, boolean, string, whole};
use crate::error::Fail;
use crate::tree::{Kind, Node, Scalar, Value, shorten};
use crate::{AdminConfig, ProxyConfig, Secret, SessionsConfig, SluiceEndpoints, StatusSet};

const PROXY_FIELDS: &[&str] = &[
    "upstream",
    "connect_timeout_ms",
    "timeout_ms",
    "refund_on_status",
    "quota_path",
    "sluice_endpoints",
];
const SESSIONS_FIELDS: &[&str] = &["cookie", "secret", "secure", "max_age_seconds"];

/// The paths sluice serves itself on the main listener (besides admin calls).
pub(crate) const OWN_PATHS: &[&str] = &[
    "/v1/check",
    "/v1/forward-auth",
    "/v1/limits",
    "/v1/stats",
    "/v1/reset",
    "/v1/status",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// Longest timeout accepted: a day (streams may be long; the head should not be).
const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// Longest cookie lifetime browsers keep: 400 days.
const MAX_AGE_SECONDS: u64 = 400 * 24 * 3600;

pub(crate) fn proxy(node: &Node, path: &str, admin: &AdminConfig) -> Result<ProxyConfig, Fail> {
    let Some(fields) = Fields::of(node, path, PROXY_FIELDS)? else {
        return Err(Fail::new(
            &node.origin,
            path,
            "proxy has no settings: give it an upstream, e.g. `proxy: {upstream: http://127.0.0.1:9000}`",
        ));
    };
    let Some((node_upstream, path_upstream)) = fields.get("upstream") else {
        return Err(Fail::new(
            &node.origin,
            path,
            "missing field `upstream`: the app to forward allowed requests to, e.g. `upstream: http://127.0.0.1:9000`",
        ));
    };
    let mut config = ProxyConfig::new(upstream(node_upstream, &path_upstream)?);
    if let Some((node, path)) = fields.get("connect_timeout_ms") {
        config.connect_timeout_ms = whole(node, &path, 1, MAX_TIMEOUT_MS)?;
    }
    if let Some((node, path)) = fields.get("timeout_ms") {
        config.timeout_ms = whole(node, &path, 1, MAX_TIMEOUT_MS)?;
    }
    if let Some((node, path)) = fields.get("refund_on_status") {
        config.refund_on_status = statuses(node, &path)?;
    }
    if let Some((node, path)) = fields.get("quota_path") {
        let text = string(node, &path)?.trim();
        let normalized = sluice_http::normalize_path(text);
        if !text.starts_with('/') || text.contains(['?', '#']) || normalized == "/" {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "quota_path `{}` must be a path below `/` without a query, e.g. /_sluice/quota",
                    shorten(text)
                ),
            ));
        }
        if OWN_PATHS.contains(&normalized.as_str()) {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "quota_path `{normalized}` is one of sluice's own endpoints: pick another path, e.g. /_sluice/quota"
                ),
            ));
        }
        config.quota_path = Some(normalized);
    }
    if let Some((node, path)) = fields.get("sluice_endpoints") {
        config.sluice_endpoints = match string(node, &path)?.trim() {
            "main" => SluiceEndpoints::Main,
            "admin" if admin.listen.is_none() => {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    "sluice_endpoints: admin serves sluice's endpoints on admin.listen, which is not set: add `admin: {listen: 127.0.0.1:8081}`, or use a prefix such as /_sluice",
                ));
            }
            "admin" => SluiceEndpoints::Admin,
            prefix if prefix.starts_with('/') => {
                let normalized = sluice_http::normalize_path(prefix);
                if normalized == "/" || prefix.contains(['?', '#', '*', '{', '}']) {
                    return Err(Fail::new(
                        &node.origin,
                        &path,
                        format!(
                            "`{}` is not a usable prefix: write a plain path below `/`, e.g. /_sluice",
                            shorten(prefix)
                        ),
                    ));
                }
                SluiceEndpoints::Prefix(normalized)
            }
            other => {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    format!(
                        "unknown sluice_endpoints `{}`: use `admin` (only on admin.listen, the default), `main` (sluice's paths win over the upstream's, open to every client) or a prefix such as /_sluice",
                        shorten(other)
                    ),
                ));
            }
        };
    }
    if let (Some(quota), SluiceEndpoints::Prefix(prefix)) =
        (&config.quota_path, &config.sluice_endpoints)
        && (quota == prefix || quota.starts_with(&format!("{prefix}/")))
    {
        let (node, path) = fields
            .get("quota_path")
            .unwrap_or((node_upstream, path_upstream.clone()));
        return Err(Fail::new(
            &node.origin,
            &path,
            format!(
                "quota_path `{quota}` is under sluice_endpoints `{prefix}`, where sluice's own endpoints are: move it out, e.g. /_quota"
            ),
        ));
    }
    Ok(config)
}

fn upstream(node: &Node, path: &str) -> Result<Uri, Fail> {
    let text = string(node, path)?.trim();
    let fail = |why: &str| {
        Fail::new(
            &node.origin,
            path,
            format!(
                "upstream `{}` {why}: write it as http://host:port, optionally with a path prefix, e.g. http://127.0.0.1:9000",
                shorten(text)
            ),
        )
    };
    let uri: Uri = text.parse().map_err(|_| fail("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(fail(
                "uses https, which this version cannot speak to an upstream (run the app on plain HTTP on a private address, or terminate TLS in front of it)",
            ));
        }
        Some(_) => return Err(fail("has a scheme other than http")),
        None => return Err(fail("has no scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(fail("has no host"));
    }
    if uri.query().is_some() {
        return Err(fail("has a query"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(fail("carries credentials"));
    }
    Ok(uri)
}

/// `[404, "5xx"]`, or one of them alone.
fn statuses(node: &Node, path: &str) -> Result<StatusSet, Fail> {
    let mut set = StatusSet::default();
    let items: Vec<(&Node, String)> = match &node.value {
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| (item, format!("{path}[{i}]")))
            .collect(),
        _ => vec![(node, path.to_string())],
    };
    for (node, path) in items {
        let hint = "write a status code such as 404 or a class such as \"5xx\"";
        match &node.value {
            Value::Scalar(Scalar {
                kind: Kind::Int, ..
            }) => {
                let code = whole(node, &path, 100, 599).map_err(|fail| Fail {
                    message: format!("{}: {hint}", fail.message),
                    ..fail
                })?;
                set.add_code(code as u16);
            }
            Value::Scalar(Scalar {
                text,
                kind: Kind::Str,
            }) => {
                let class = text.trim().to_ascii_lowercase();
                let digit = class
                    .strip_suffix("xx")
                    .and_then(|d| d.parse::<u8>().ok())
                    .filter(|d| (1..=5).contains(d));
                match (digit, class.parse::<u16>()) {
                    (Some(digit), _) => set.add_class(digit),
                    (None, Ok(code)) if (100..=599).contains(&code) => set.add_code(code),
                    _ => {
                        return Err(Fail::new(
                            &node.origin,
                            &path,
                            format!("`{}` is not a status: {hint}", shorten(text)),
                        ));
                    }
                }
            }
            _ => {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    format!("expected a status, found {}: {hint}", node.describe()),
                ));
            }
        }
    }
    Ok(set)
}

pub(crate) fn sessions(node: &Node, path: &str) -> Result<SessionsConfig, Fail> {
    let mut config = SessionsConfig::default();
    let Some(fields) = Fields::of(node, path, SESSIONS_FIELDS)? else {
        return Ok(config);
    };
    if let Some((node, path)) = fields.get("cookie") {
        let name = string(node, &path)?.trim();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "`{}` is not a usable cookie name: use 1 to 64 letters, digits, `_`, `-` or `.`, e.g. sluice_session",
                    shorten(name)
                ),
            ));
        }
        config.cookie.name = name.to_string();
    }
    if let Some((node, path)) = fields.get("secret") {
        let secret = string(node, &path)?;
        if secret.len() < sluice_http::session::MIN_SECRET_BYTES {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "the session secret must be at least {} bytes: use a long random value, e.g. from `openssl rand -hex 32`",
                    sluice_http::session::MIN_SECRET_BYTES
                ),
            ));
        }
        config.secret = Some(Secret::new(secret));
    }
    if let Some((node, path)) = fields.get("secure") {
        config.cookie.always_secure = boolean(node, &path)?;
    }
    if let Some((node, path)) = fields.get("max_age_seconds") {
        config.cookie.max_age_seconds = whole(node, &path, 1, MAX_AGE_SECONDS)?;
    }
    Ok(config)
}
