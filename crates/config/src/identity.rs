//! The `jwt:` section: how sluice verifies a caller's bearer token, so key templates
//! can read its claims (`{jwt.sub}`). Built into a `sluice_identity::JwtVerifier` at
//! load time: a key file that cannot be read is a config error, with its place.
//!
//! ```yaml
//! jwt:
//!   algorithms: [RS256]                  # required; the algorithms your provider signs with
//!   jwks_url: https://id.example.com/.well-known/jwks.json   # or jwks_file, public_keys, secret
//!   jwks_refresh_seconds: 300
//!   jwks_timeout_ms: 2000
//!   issuer: https://id.example.com       # checked when given (one or a list)
//!   audience: api                        # checked when given (one or a list)
//!   leeway_seconds: 30                   # clock skew allowed for exp and nbf
//!   cookie: id_token                     # read the token from this cookie, not Authorization
//!   cache_entries: 10000                 # verified tokens remembered until exp; 0: verify every time
//!   unverified: refuse                   # a JWT that does not verify: 401 where a key reads a claim; or anonymous
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sluice_identity::{Algorithm, JwtConfig, JwtVerifier, TokenSource, Unverified};

use crate::de::{FromText, Located, OneOrMany, Parsed, Whole};
use crate::error::Fail;
use crate::tree::shorten;

/// `jwt:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtSection {
    algorithms: Option<OneOrMany<Parsed<SignedWith>>>,
    /// Never shown in a message.
    secret: Option<Located<String>>,
    public_keys: Option<OneOrMany<Located<String>>>,
    jwks_file: Option<Located<String>>,
    jwks_url: Option<Located<String>>,
    jwks_refresh_seconds: Option<Whole<1, 86_400>>,
    jwks_timeout_ms: Option<Whole<1, 60_000>>,
    issuer: Option<OneOrMany<String>>,
    audience: Option<OneOrMany<String>>,
    leeway_seconds: Option<Whole<0, 600>>,
    cookie: Option<String>,
    cache_entries: Option<Whole<0, 10_000_000>>,
    unverified: Option<Parsed<UnverifiedAs>>,
}

/// `jwt.unverified`: what a JWT that does not verify counts as.
struct UnverifiedAs(Unverified);

impl FromText for UnverifiedAs {
    const EXPECTING: &'static str = "refuse or anonymous";
    fn from_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "refuse" => Ok(UnverifiedAs(Unverified::Refuse)),
            "anonymous" => Ok(UnverifiedAs(Unverified::Anonymous)),
            other => Err(format!(
                "unknown `{}`: use refuse (the default: a route keyed on a claim answers 401 to a JWT that does not verify) or anonymous (it falls back to the route's next key, which lets a user escape its own limit if the application accepts a token sluice does not)",
                shorten(other)
            )),
        }
    }
}

/// A signing algorithm as JWT headers name it; `none` is not one.
struct SignedWith(Algorithm);

impl FromText for SignedWith {
    const EXPECTING: &'static str = "an algorithm such as RS256";
    fn from_text(text: &str) -> Result<Self, String> {
        text.trim().parse::<Algorithm>().map(SignedWith).map_err(|_| {
            format!(
                "unknown JWT algorithm `{}`: use HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA (`none` is never accepted)",
                shorten(text)
            )
        })
    }
}

impl JwtSection {
    /// The verifier; relative key files are read from the config file's directory.
    pub(crate) fn build(
        self,
        at: &crate::de::Place,
        source: &str,
    ) -> Result<Arc<JwtVerifier>, Fail> {
        let Some(algorithms) = self.algorithms else {
            return Err(at.fail(
                "missing `algorithms`: list the algorithms your identity provider signs tokens with, e.g. `algorithms: [RS256]`",
            ));
        };
        let base = Path::new(source).parent().unwrap_or(Path::new(""));
        let mut config = JwtConfig::new(algorithms.0.into_iter().map(|a| a.0.0).collect());
        config.secret = self.secret.map(|s| s.value);
        config.public_keys = self
            .public_keys
            .map_or(Vec::new(), |keys| keys.0)
            .into_iter()
            .map(|path| base.join(path.value.trim()))
            .collect();
        config.jwks_file = self.jwks_file.map(|path| base.join(path.value.trim()));
        if let Some(url) = self.jwks_url {
            let text = url.value.trim();
            if !(text.starts_with("https://") || text.starts_with("http://")) {
                return Err(url.at.fail(format!(
                    "jwt.jwks_url `{}` is not an http(s) URL: give the provider's JWKS address, e.g. https://id.example.com/.well-known/jwks.json",
                    shorten(text)
                )));
            }
            config.jwks_url = Some(text.to_string());
        }
        if let Some(refresh) = self.jwks_refresh_seconds {
            config.jwks_refresh = Duration::from_secs(refresh.0);
        }
        if let Some(timeout) = self.jwks_timeout_ms {
            config.jwks_timeout = Duration::from_millis(timeout.0);
        }
        config.issuers = self.issuer.map_or(Vec::new(), |i| i.0);
        config.audiences = self.audience.map_or(Vec::new(), |a| a.0);
        if let Some(leeway) = self.leeway_seconds {
            config.leeway = Duration::from_secs(leeway.0);
        }
        if let Some(cookie) = self.cookie {
            config.source = TokenSource::Cookie(cookie);
        }
        if let Some(entries) = self.cache_entries {
            config.cache_entries = entries.0 as usize;
        }
        if let Some(unverified) = self.unverified {
            config.unverified = unverified.0.0;
        }
        JwtVerifier::new(&config)
            .map(Arc::new)
            .map_err(|error| at.fail(error.to_string()))
    }
}
