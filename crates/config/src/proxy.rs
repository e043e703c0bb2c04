//! The reverse-proxy sections, `proxy:` and `sessions:`, as derived types, and the
//! checks that build [`ProxyConfig`] and [`SessionsConfig`] from them.
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

use std::fmt;

use http::Uri;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::de::{FromText, HINT, Located, OneOrMany, Parsed, Whole, WholeVisitor};
use crate::error::Fail;
use crate::tree::shorten;
use crate::{AdminConfig, ProxyConfig, Secret, SessionsConfig, SluiceEndpoints};

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

/// `proxy:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxySection {
    upstream: Parsed<Uri>,
    connect_timeout_ms: Option<Whole<1, MAX_TIMEOUT_MS>>,
    timeout_ms: Option<Whole<1, MAX_TIMEOUT_MS>>,
    refund_on_status: Option<OneOrMany<RefundStatus>>,
    quota_path: Option<Located<Parsed<QuotaPath>>>,
    sluice_endpoints: Option<Located<Parsed<SluiceEndpoints>>>,
}

/// `sessions:` (only with `proxy:`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionsSection {
    cookie: Option<Parsed<CookieName>>,
    /// Never shown in a message.
    secret: Option<Located<String>>,
    secure: Option<bool>,
    max_age_seconds: Option<Whole<1, MAX_AGE_SECONDS>>,
}

impl ProxySection {
    pub(crate) fn build(self, admin: &AdminConfig) -> Result<ProxyConfig, Fail> {
        let mut config = ProxyConfig::new(self.upstream.0);
        if let Some(timeout) = self.connect_timeout_ms {
            config.connect_timeout_ms = timeout.0;
        }
        if let Some(timeout) = self.timeout_ms {
            config.timeout_ms = timeout.0;
        }
        for status in self
            .refund_on_status
            .map_or(Vec::new(), |statuses| statuses.0)
        {
            match status {
                RefundStatus::Code(code) => config.refund_on_status.add_code(code),
                RefundStatus::Class(digit) => config.refund_on_status.add_class(digit),
            }
        }
        if let Some(endpoints) = self.sluice_endpoints {
            if endpoints.value.0 == SluiceEndpoints::Admin && admin.listen.is_none() {
                return Err(endpoints.at.fail(
                    "sluice_endpoints: admin serves sluice's endpoints on admin.listen, which is not set: add `admin: {listen: 127.0.0.1:8081}`, or use a prefix such as /_sluice",
                ));
            }
            config.sluice_endpoints = endpoints.value.0;
        }
        if let Some(Located { value, at }) = self.quota_path {
            let quota = value.0.0;
            if let SluiceEndpoints::Prefix(prefix) = &config.sluice_endpoints
                && (quota == *prefix || quota.starts_with(&format!("{prefix}/")))
            {
                return Err(at.fail(format!(
                    "quota_path `{quota}` is under sluice_endpoints `{prefix}`, where sluice's own endpoints are: move it out, e.g. /_quota"
                )));
            }
            config.quota_path = Some(quota);
        }
        Ok(config)
    }
}

impl FromText for Uri {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let fail = |why: &str| {
            format!(
                "upstream `{}` {why}: write it as http://host:port, optionally with a path prefix, e.g. http://127.0.0.1:9000",
                shorten(text)
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
}

/// `proxy.quota_path`, normalised.
struct QuotaPath(String);

impl FromText for QuotaPath {
    fn from_text(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let normalized = sluice_http::normalize_path(text);
        if !text.starts_with('/') || text.contains(['?', '#']) || normalized == "/" {
            return Err(format!(
                "quota_path `{}` must be a path below `/` without a query, e.g. /_sluice/quota",
                shorten(text)
            ));
        }
        if OWN_PATHS.contains(&normalized.as_str()) {
            return Err(format!(
                "quota_path `{normalized}` is one of sluice's own endpoints: pick another path, e.g. /_sluice/quota"
            ));
        }
        Ok(QuotaPath(normalized))
    }
}

impl FromText for SluiceEndpoints {
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "main" => Ok(SluiceEndpoints::Main),
            "admin" => Ok(SluiceEndpoints::Admin),
            prefix if prefix.starts_with('/') => {
                let normalized = sluice_http::normalize_path(prefix);
                if normalized == "/" || prefix.contains(['?', '#', '*', '{', '}']) {
                    return Err(format!(
                        "`{}` is not a usable prefix: write a plain path below `/`, e.g. /_sluice",
                        shorten(prefix)
                    ));
                }
                Ok(SluiceEndpoints::Prefix(normalized))
            }
            other => Err(format!(
                "unknown sluice_endpoints `{}`: use `admin` (only on admin.listen, the default), `main` (sluice's paths win over the upstream's, open to every client) or a prefix such as /_sluice",
                shorten(other)
            )),
        }
    }
}

/// One of `proxy.refund_on_status`: a code (`404`) or a class (`"5xx"`).
enum RefundStatus {
    Code(u16),
    Class(u8),
}

const STATUS_HINT: &str = ": write a status code such as 404 or a class such as \"5xx\"";

impl<'de> Deserialize<'de> for RefundStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl V {
            fn code<E: de::Error>(value: i128) -> Result<RefundStatus, E> {
                let visitor = WholeVisitor {
                    min: 100,
                    max: 599,
                    hint: STATUS_HINT,
                };
                let code = visitor.visit_i128::<E>(value)?;
                Ok(RefundStatus::Code(u16::try_from(code).map_err(E::custom)?))
            }
        }
        impl<'de> Visitor<'de> for V {
            type Value = RefundStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a status{HINT}{STATUS_HINT}")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RefundStatus, E> {
                V::code(i128::from(value))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RefundStatus, E> {
                V::code(i128::from(value))
            }
            fn visit_i128<E: de::Error>(self, value: i128) -> Result<RefundStatus, E> {
                V::code(value)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<RefundStatus, E> {
                let class = text.trim().to_ascii_lowercase();
                let digit = class
                    .strip_suffix("xx")
                    .and_then(|d| d.parse::<u8>().ok())
                    .filter(|d| (1..=5).contains(d));
                match (digit, class.parse::<u16>()) {
                    (Some(digit), _) => Ok(RefundStatus::Class(digit)),
                    (None, Ok(code)) if (100..=599).contains(&code) => Ok(RefundStatus::Code(code)),
                    _ => Err(E::custom(format!(
                        "`{}` is not a status{STATUS_HINT}",
                        shorten(text)
                    ))),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `sessions.cookie`.
struct CookieName(String);

impl FromText for CookieName {
    fn from_text(text: &str) -> Result<Self, String> {
        let name = text.trim();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(format!(
                "`{}` is not a usable cookie name: use 1 to 64 letters, digits, `_`, `-` or `.`, e.g. sluice_session",
                shorten(name)
            ));
        }
        Ok(CookieName(name.to_string()))
    }
}

impl SessionsSection {
    pub(crate) fn build(self) -> Result<SessionsConfig, Fail> {
        let mut config = SessionsConfig::default();
        if let Some(cookie) = self.cookie {
            config.cookie.name = cookie.0.0;
        }
        if let Some(Located { value: secret, at }) = self.secret {
            if secret.len() < sluice_http::session::MIN_SECRET_BYTES {
                return Err(at.fail(format!(
                    "the session secret must be at least {} bytes: use a long random value, e.g. from `openssl rand -hex 32`",
                    sluice_http::session::MIN_SECRET_BYTES
                )));
            }
            config.secret = Some(Secret::new(secret));
        }
        if let Some(secure) = self.secure {
            config.cookie.always_secure = secure;
        }
        if let Some(max_age) = self.max_age_seconds {
            config.cookie.max_age_seconds = max_age.0;
        }
        Ok(config)
    }
}
