//! Who is calling: the claims of a bearer JWT that sluice verifies itself, for key
//! templates such as `user:{jwt.sub}` (docs/design/http.md, "Verified identity").
//!
//! A header a client sets (`x-user-id`) is whatever the client says: keyed on it, any
//! client can spend another user's quota or rotate ids to get a fresh one. A token
//! signed by the application's identity provider cannot be forged, so its claims are
//! safe to key on, once verified:
//!
//! - **Keys**: an HMAC `secret` (HS256/384/512), public keys in PEM files (RS*, PS*,
//!   ES256/384, EdDSA), a JWKS file, or a JWKS URL fetched in the background (with a
//!   timeout and a size cap) and refreshed; keys are chosen by the token's `kid`, else
//!   every key of the algorithm's family is tried.
//! - **Algorithms** are configured, never taken from the token: a token whose `alg` is
//!   not in the list (`none` never is) does not verify, and a key is only ever used
//!   with its own family, so an HMAC token "signed" with an RSA public key (the HS/RS
//!   confusion) does not verify either.
//! - **Claims**: `exp` is required; `nbf`, `iss` and `aud` are checked when configured,
//!   with a small clock `leeway`.
//! - **Verified once**: a signature check costs more than the rest of a request (tens of
//!   microseconds for RS256 or ES256), and a caller sends the same token for minutes. A
//!   token that verified is remembered by its exact bytes, with its claims, until its
//!   `exp` (plus the leeway) or until the JWKS URL's keys change; only verified tokens
//!   are remembered, so made-up tokens cannot fill the cache or push real ones out.
//!
//! A token that is absent, malformed, forged, expired or for another audience gives no
//! claims: the template does not render, and the route falls back to its next key
//! template, as it does for a missing header. Nothing unverified is ever returned.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};

pub use jsonwebtoken::Algorithm;

/// A verified token's claims.
pub type Claims = Map<String, Value>;

/// The longest token read: bigger ones are refused unread.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest JWKS document accepted from a URL.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// The shortest time between two fetches of the JWKS URL asked for by tokens that name
/// a key sluice does not know.
pub const EARLY_FETCH_SECONDS: u64 = 10;

/// How many verified tokens are remembered unless configured (`jwt.cache_entries`).
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;

/// A remembered token counts as one entry per started KiB of token, so the cache's
/// memory stays near `cache_entries` × 3 KiB (token, claims, table) whatever the
/// tokens' size.
const CACHE_ENTRY_UNIT_BYTES: usize = 1024;

/// Where the token is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>` (the scheme in any case).
    Bearer,
    /// A cookie of this name.
    Cookie(String),
}

/// Settings of a [`JwtVerifier`] (`jwt:` in the config).
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// The algorithms accepted; at least one.
    pub algorithms: Vec<Algorithm>,
    /// The HMAC secret, for HS256/384/512. Never logged.
    pub secret: Option<String>,
    /// PEM files with public keys (RSA, EC or Ed25519).
    pub public_keys: Vec<PathBuf>,
    /// A JWKS document on disk.
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`https://.../.well-known/jwks.json`), fetched in the background.
    pub jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again.
    pub jwks_refresh: Duration,
    /// How long one fetch of the JWKS URL may take.
    pub jwks_timeout: Duration,
    /// Accepted `iss` values; empty: not checked.
    pub issuers: Vec<String>,
    /// Accepted `aud` values; empty: not checked.
    pub audiences: Vec<String>,
    /// Clock leeway for `exp` and `nbf`.
    pub leeway: Duration,
    /// Where the token is.
    pub source: TokenSource,
    /// How many verified tokens are remembered (a token over 1 KiB counts once per
    /// started KiB); 0 verifies every request's token afresh.
    pub cache_entries: usize,
    /// What a JWT that does not verify counts as.
    pub unverified: Unverified,
}

impl JwtConfig {
    /// Settings for `algorithms` with no keys yet, the bearer header, a 30 s leeway, a
    /// JWKS refresh every 5 minutes, a 2 s fetch timeout and [`DEFAULT_CACHE_ENTRIES`]
    /// verified tokens remembered.
    pub fn new(algorithms: Vec<Algorithm>) -> Self {
        JwtConfig {
            algorithms,
            secret: None,
            public_keys: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_timeout: Duration::from_secs(2),
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: Duration::from_secs(30),
            source: TokenSource::Bearer,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            unverified: Unverified::Refuse,
        }
    }
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No algorithm, or `none`.
    #[error(
        "jwt.algorithms is empty: list the algorithms your identity provider signs with, e.g. [RS256]"
    )]
    NoAlgorithms,
    /// No key for the algorithms.
    #[error(
        "jwt: no key for {0}: give jwt.secret (HS*), jwt.public_keys (PEM files), jwt.jwks_file or jwt.jwks_url"
    )]
    NoKeys(String),
    /// A key file could not be read or parsed.
    #[error("jwt: cannot use the key in {path}: {why}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A JWKS document could not be read or parsed.
    #[error("jwt: cannot use the JWKS in {source_name}: {why}")]
    BadJwks {
        /// The file or URL.
        source_name: String,
        /// What went wrong.
        why: String,
    },
    /// The secret is too short to be a secret.
    #[error("jwt.secret is {0} bytes: use at least 32 random bytes for HMAC keys")]
    ShortSecret(usize),
}

/// One key with the algorithm family it may verify.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    family: Family,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

fn family(algorithm: Algorithm) -> Family {
    match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Family::Rsa,
        Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
        Algorithm::EdDSA => Family::Ed,
    }
}

/// The keys last fetched from the JWKS URL.
#[derive(Default)]
struct FetchedKeys {
    /// Counts the documents applied (a fetch of the same document changes nothing): a
    /// remembered token is trusted only while the keys it was verified with are still
    /// the ones served.
    generation: u64,
    keys: Vec<Key>,
}

/// A token that verified, and for how long its verdict holds.
#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    /// `exp`, and `nbf` when the token has one, in seconds since the epoch.
    expires: u64,
    not_before: Option<u64>,
    /// The [`FetchedKeys::generation`] it was verified under.
    keys_generation: u64,
}

/// Weighs a remembered token by its size (see [`CACHE_ENTRY_UNIT_BYTES`]).
#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<String, Verified> for TokenWeight {
    fn weight(&self, token: &String, _: &Verified) -> u64 {
        token.len().div_ceil(CACHE_ENTRY_UNIT_BYTES).max(1) as u64
    }
}

type TokenCache =
    quick_cache::sync::Cache<String, Verified, TokenWeight, hashbrown::DefaultHashBuilder>;

/// Counts of [`JwtVerifier::signature_checks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureChecks {
    /// Tokens whose signature and claims were checked (not answered from memory).
    pub checked: u64,
    /// Of those, the ones that verified.
    pub verified: u64,
}

/// Signature checks made by every verifier of this process (a reload builds a new
/// verifier; these keep counting): `/metrics` reads them.
static PROCESS_SIGNATURES_CHECKED: AtomicU64 = AtomicU64::new(0);
static PROCESS_SIGNATURES_GOOD: AtomicU64 = AtomicU64::new(0);

/// [`JwtVerifier::signature_checks`] summed over every verifier this process built.
pub fn process_signature_checks() -> SignatureChecks {
    SignatureChecks {
        checked: PROCESS_SIGNATURES_CHECKED.load(Ordering::Relaxed),
        verified: PROCESS_SIGNATURES_GOOD.load(Ordering::Relaxed),
    }
}

/// Verifies tokens; cheap to share behind an `Arc`.
pub struct JwtVerifier {
    algorithms: Vec<Algorithm>,
    source: TokenSource,
    unverified: Unverified,
    jwks_url: Option<String>,
    /// One validation per configured algorithm: jsonwebtoken checks that every algorithm
    /// of a validation belongs to the key's family, so each family gets its own.
    validations: Vec<(Algorithm, Validation)>,
    leeway: u64,
    fixed: Vec<Key>,
    fetched: Arc<ArcSwap<FetchedKeys>>,
    /// Tokens that verified, by their exact text; `None` when `cache_entries` is 0.
    verified: Option<TokenCache>,
    /// Tokens whose signature was checked, and how many of them verified.
    signatures_checked: AtomicU64,
    signatures_good: AtomicU64,
    // Dropping the sender stops the JWKS refresher; a message asks it to fetch now.
    refresher: Option<mpsc::Sender<()>>,
    /// When (seconds since the epoch) a token last asked for an early fetch.
    last_early_fetch: AtomicU64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.algorithms)
            .field("source", &self.source)
            .field("keys", &self.fixed.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Loads the keys; with a JWKS URL, starts fetching it in the background (tokens
    /// signed by its keys verify once it has answered: a provider that is down at
    /// start delays them, it does not stop sluice).
    pub fn new(config: &JwtConfig) -> Result<Self, IdentityError> {
        if config.algorithms.is_empty() {
            return Err(IdentityError::NoAlgorithms);
        }
        let mut fixed = Vec::new();
        if let Some(secret) = &config.secret {
            if secret.len() < 32 {
                return Err(IdentityError::ShortSecret(secret.len()));
            }
            fixed.push(Key {
                kid: None,
                family: Family::Hmac,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        for path in &config.public_keys {
            fixed.push(pem_key(path)?);
        }
        if let Some(path) = &config.jwks_file {
            let text = std::fs::read_to_string(path).map_err(|e| IdentityError::BadJwks {
                source_name: path.display().to_string(),
                why: e.to_string(),
            })?;
            fixed.extend(jwks_keys(&text, &path.display().to_string())?);
        }
        let fetched = Arc::new(ArcSwap::from_pointee(FetchedKeys::default()));
        let has_url = config.jwks_url.is_some();
        for algorithm in &config.algorithms {
            let family = family(*algorithm);
            if !has_url && !fixed.iter().any(|k| k.family == family) {
                return Err(IdentityError::NoKeys(format!("{algorithm:?}")));
            }
        }
        let stop = config.jwks_url.as_ref().map(|url| {
            let (stop, stopped) = mpsc::channel();
            let weak = Arc::downgrade(&fetched);
            let (url, refresh, timeout) = (url.clone(), config.jwks_refresh, config.jwks_timeout);
            // If the thread cannot start, tokens signed by the URL's keys never verify:
            // closed, as a provider that is down.
            let _ = std::thread::Builder::new()
                .name("sluice-jwks".into())
                .spawn(move || refresh_jwks(&url, weak, &stopped, refresh, timeout));
            stop
        });
        let validations = config
            .algorithms
            .iter()
            .map(|&algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.leeway = config.leeway.as_secs();
                validation.validate_nbf = true;
                // jsonwebtoken checks `iss` and `aud` only when the token has them as
                // strings: a configured one must also be present, or a token made for
                // another service (no `aud`) would pass.
                let mut required = vec!["exp"];
                if !config.issuers.is_empty() {
                    required.push("iss");
                }
                if !config.audiences.is_empty() {
                    required.push("aud");
                }
                validation.set_required_spec_claims(&required);
                if config.issuers.is_empty() {
                    validation.iss = None;
                } else {
                    validation.set_issuer(&config.issuers);
                }
                if config.audiences.is_empty() {
                    validation.validate_aud = false;
                } else {
                    validation.set_audience(&config.audiences);
                }
                (algorithm, validation)
            })
            .collect();
        let verified = (config.cache_entries > 0).then(|| {
            TokenCache::with(
                config.cache_entries,
                config.cache_entries as u64,
                TokenWeight,
                hashbrown::DefaultHashBuilder::default(),
                Default::default(),
            )
        });
        Ok(JwtVerifier {
            algorithms: config.algorithms.clone(),
            source: config.source.clone(),
            unverified: config.unverified,
            jwks_url: config.jwks_url.clone(),
            validations,
            leeway: config.leeway.as_secs(),
            fixed,
            fetched,
            verified,
            signatures_checked: AtomicU64::new(0),
            signatures_good: AtomicU64::new(0),
            refresher: stop,
            last_early_fetch: AtomicU64::new(0),
        })
    }

    /// Takes over the keys `previous` fetched from the same JWKS URL while this verifier
    /// has fetched none: a config reload builds a new verifier, and must not forget the
    /// provider's keys because the provider happens to be down at that moment (a failed
    /// refresh keeps them too). This verifier's own fetches replace them as usual.
    pub fn keep_fetched_keys_of(&self, previous: &JwtVerifier) {
        if self.jwks_url.is_none() || self.jwks_url != previous.jwks_url {
            return;
        }
        let known = previous.fetched.load_full();
        if known.keys.is_empty() {
            return;
        }
        self.fetched.rcu(|current| {
            if current.keys.is_empty() {
                Arc::new(FetchedKeys {
                    generation: current.generation,
                    keys: known.keys.clone(),
                })
            } else {
                Arc::clone(current)
            }
        });
    }

    /// Where the token is read from.
    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// The JWKS URL the keys are fetched from, if any.
    pub fn jwks_url(&self) -> Option<&str> {
        self.jwks_url.as_deref()
    }

    /// The claims of `token` when it verifies; `None` otherwise. A token that verified
    /// before is answered from memory while its `exp` and `nbf` still hold and the keys
    /// it was verified with are still served.
    pub fn verify(&self, token: &str) -> Option<Arc<Claims>> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let fetched = self.fetched.load();
        let Some(cache) = &self.verified else {
            return self.verify_signature(token, &fetched.keys).map(Arc::new);
        };
        if let Some(now) = unix_seconds()
            && let Some(known) = cache.get(token)
            && known.keys_generation == fetched.generation
            && self.still_valid(&known, now)
        {
            return Some(known.claims);
        }
        let claims = Arc::new(self.verify_signature(token, &fetched.keys)?);
        // Remembered only with both times readable as validation read them, so the
        // verdict can be checked again without the signature.
        let expires = claims.get("exp").and_then(numeric_date);
        let not_before = match claims.get("nbf") {
            Some(value) => numeric_date(value).map(Some),
            None => Some(None),
        };
        if let (Some(expires), Some(not_before)) = (expires, not_before) {
            cache.insert(
                token.to_string(),
                Verified {
                    claims: Arc::clone(&claims),
                    expires,
                    not_before,
                    keys_generation: fetched.generation,
                },
            );
        }
        Some(claims)
    }

    /// Whether a remembered token's times still hold at `now`: the same comparisons
    /// jsonwebtoken's validation makes, with the same leeway.
    fn still_valid(&self, known: &Verified, now: u64) -> bool {
        known.expires >= now.saturating_sub(self.leeway)
            && known
                .not_before
                .is_none_or(|nbf| nbf <= now.saturating_add(self.leeway))
    }

    /// How many tokens had their signature checked since this verifier was built, and
    /// how many of those verified: the work a remembered token saves, and what made-up
    /// tokens cost.
    pub fn signature_checks(&self) -> SignatureChecks {
        SignatureChecks {
            checked: self.signatures_checked.load(Ordering::Relaxed),
            verified: self.signatures_good.load(Ordering::Relaxed),
        }
    }

    /// Checks `token`'s signature and claims against the configured and fetched keys.
    fn verify_signature(&self, token: &str, fetched: &[Key]) -> Option<Claims> {
        let claims = self.check_signature(token, fetched);
        self.signatures_checked.fetch_add(1, Ordering::Relaxed);
        PROCESS_SIGNATURES_CHECKED.fetch_add(1, Ordering::Relaxed);
        if claims.is_some() {
            self.signatures_good.fetch_add(1, Ordering::Relaxed);
            PROCESS_SIGNATURES_GOOD.fetch_add(1, Ordering::Relaxed);
        }
        claims
    }

    fn check_signature(&self, token: &str, fetched: &[Key]) -> Option<Claims> {
        let header = decode_header(token).ok()?;
        // The token's `alg` only picks among the configured algorithms; `decode` checks
        // it again against that algorithm's validation.
        let (_, validation) = self.validations.iter().find(|(a, _)| *a == header.alg)?;
        let family = family(header.alg);
        if let Some(kid) = &header.kid {
            let known = self
                .fixed
                .iter()
                .chain(fetched.iter())
                .any(|k| k.family == family && k.kid.as_deref() == Some(kid.as_str()));
            // Before the first fetch has answered, the refresher is already trying.
            if !known && !fetched.is_empty() {
                self.fetch_keys_early();
            }
        }
        let candidates = self
            .fixed
            .iter()
            .chain(fetched.iter())
            .filter(|k| k.family == family)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(wanted), Some(kid)) => wanted == kid,
                _ => true,
            });
        for key in candidates {
            if let Ok(data) = decode::<Claims>(token, &key.key, validation) {
                return Some(data.claims);
            }
        }
        None
    }

    /// Asks the JWKS refresher to fetch now rather than at its next refresh: a token named
    /// a key (`kid`) no known key has, which is how a provider's new signing key first
    /// shows. At most once per [`EARLY_FETCH_SECONDS`], so tokens with made-up `kid`s
    /// cannot turn sluice into a client hammering the provider.
    fn fetch_keys_early(&self) {
        let Some(refresher) = &self.refresher else {
            return;
        };
        let Some(now) = unix_seconds() else { return };
        let last = self.last_early_fetch.load(Ordering::Relaxed);
        if now >= last.saturating_add(EARLY_FETCH_SECONDS)
            && self
                .last_early_fetch
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = refresher.send(());
        }
    }

    /// The token a request carries where this verifier reads it: what its
    /// `Authorization` headers carry (see `authorization_tokens`), or its cookie of the
    /// configured name. Read from the bytes as sent (a byte outside ASCII does not hide
    /// the header), a cookie's value unquoted; copies that are the same text are one
    /// token. Copies that differ
    /// are [`Credential::Conflicting`] when any of them is a JWT: frameworks disagree
    /// on which copy the application reads.
    pub fn credential<'h>(&self, headers: &'h http::HeaderMap) -> Credential<'h> {
        let mut copies: Vec<Cow<'h, str>> = Vec::new();
        match &self.source {
            TokenSource::Bearer => {
                for value in headers.get_all(http::header::AUTHORIZATION) {
                    authorization_tokens(value.as_bytes(), &mut copies);
                }
            }
            TokenSource::Cookie(name) => {
                for line in headers.get_all(http::header::COOKIE) {
                    cookie_values(line.as_bytes(), name, &mut copies);
                }
            }
        }
        copies.sort_unstable();
        copies.dedup();
        match copies.len() {
            0 => Credential::None,
            1 => Credential::One(copies.swap_remove(0)),
            _ if copies.iter().any(|copy| self.is_meant_as_jwt(copy)) => Credential::Conflicting,
            _ => Credential::None,
        }
    }

    /// Who is calling, by the request's token: see [`Caller`].
    pub fn caller(&self, headers: &http::HeaderMap) -> Caller {
        let refused = match self.unverified {
            Unverified::Refuse => Caller::Refused,
            Unverified::Anonymous => Caller::Anonymous,
        };
        match self.credential(headers) {
            Credential::None => Caller::Anonymous,
            Credential::Conflicting => refused,
            Credential::One(token) => match self.verify(&token) {
                Some(claims) => Caller::Verified(claims),
                // Until a JWKS URL has answered once, sluice knows no key to judge
                // by: a provider that is down must not refuse every caller.
                None if self.is_meant_as_jwt(&token) && self.knows_keys() => refused,
                None => Caller::Anonymous,
            },
        }
    }

    /// Whether any key is known: configured, or fetched from the JWKS URL.
    fn knows_keys(&self) -> bool {
        !self.fixed.is_empty() || !self.fetched.load().keys.is_empty()
    }

    /// The verified claims of a request's token, if any.
    pub fn claims(&self, headers: &http::HeaderMap) -> Option<Arc<Claims>> {
        match self.caller(headers) {
            Caller::Verified(claims) => Some(claims),
            Caller::Anonymous | Caller::Refused => None,
        }
    }
}

/// The credential a request carries where a [`JwtVerifier`] reads its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential<'h> {
    /// None there, or only credentials of another scheme.
    None,
    /// One token (every copy the same text).
    One(Cow<'h, str>),
    /// Copies that differ, at least one of them a JWT.
    Conflicting,
}

/// Who is calling, as far as the request's token tells.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No token sluice reads: none sent, another scheme, or a bearer credential that is
    /// not a JWT (an API key). `{jwt.CLAIM}` does not resolve; a route's next key does.
    Anonymous,
    /// A token that verified.
    Verified(Arc<Claims>),
    /// A JWT that did not verify (forged, expired, for another issuer or audience, or
    /// spelled in a way sluice does not read, such as a padded signature that
    /// lenient decoders accept), or differing copies of the credential. (Before a JWKS
    /// URL has answered once, no key is known to judge by: such tokens are anonymous.) The application
    /// behind sluice may still accept it and know the user, so it must not count as
    /// anonymous: a route that keys on a claim refuses the request
    /// (`jwt.unverified: refuse`, the default).
    Refused,
}

/// What a JWT that does not verify counts as (`jwt.unverified`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unverified {
    /// [`Caller::Refused`]: a route keyed on a claim answers `401 invalid_token`.
    #[default]
    Refuse,
    /// [`Caller::Anonymous`]: the route's next key applies. Only safe when the
    /// application accepts no token that sluice does not: otherwise a user who sends
    /// its valid token in another spelling is counted as a stranger.
    Anonymous,
}

impl JwtVerifier {
    /// Whether a credential where the token is read is meant as a JWT. The cookie named
    /// for it holds nothing else, whatever its spelling (Python's cookie parser turns
    /// `\056` inside quotes into a dot). `Authorization: Bearer` also carries API keys,
    /// so there only a credential of a JWT's shape is one ([`has_jwt_shape`]).
    fn is_meant_as_jwt(&self, credential: &str) -> bool {
        match self.source {
            TokenSource::Cookie(_) => true,
            TokenSource::Bearer => has_jwt_shape(credential.as_bytes()),
        }
    }
}

/// Whether a credential has a compact JWT's shape: three parts separated by dots (API
/// keys and most opaque tokens have none). Only the dots are looked at: a lenient
/// decoder reads parts that are not clean base64url, so neither may this.
fn has_jwt_shape(credential: &[u8]) -> bool {
    credential.iter().filter(|&&b| b == b'.').count() >= 2
}

/// Seconds since the Unix epoch as JWTs count them; `None` for a clock set before it
/// (jsonwebtoken's own reading panics there; a remembered token is then not believed).
fn unix_seconds() -> Option<u64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|since| since.as_secs())
}

/// The bytes an application may take for whitespace around a header's parts: ASCII's,
/// and the two more Python's `str.strip()` and `str.split()` remove from a header
/// decoded as Latin-1 (NEL 0x85, no-break space 0xA0; JavaScript's `\s` also matches
/// the latter). Trimming only ASCII's let `\xa0token=<jwt>` name no cookie for sluice
/// and the `token` cookie for Starlette.
fn is_loose_space(byte: u8) -> bool {
    matches!(
        byte,
        b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f | b' ' | 0x85 | 0xa0
    )
}

fn trim_loose(mut bytes: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = bytes
        && is_loose_space(*first)
    {
        bytes = rest;
    }
    while let [rest @ .., last] = bytes
        && is_loose_space(*last)
    {
        bytes = rest;
    }
    bytes
}

/// Adds the tokens one `Authorization` value carries. The credential after `Bearer` (the
/// scheme in any case, any [loose space](is_loose_space) after it), and every other
/// part of the value that has a JWT's two dots, whatever comes before it: applications
/// also take a bare token (`replace("Bearer ", "")`), another scheme (`JWT <token>`)
/// or `Bearer` followed by a no-break space, and must not meet a user sluice counted
/// as a stranger. Parts are split on loose spaces and commas.
fn authorization_tokens<'h>(value: &'h [u8], tokens: &mut Vec<Cow<'h, str>>) {
    let mut parts = value
        .split(|&b| is_loose_space(b) || b == b',')
        .filter(|part| !part.is_empty());
    let Some(first) = parts.next() else { return };
    if first.eq_ignore_ascii_case(b"bearer") {
        if let Some(credential) = parts.next() {
            tokens.push(String::from_utf8_lossy(credential));
        }
    } else if has_jwt_shape(first) {
        tokens.push(String::from_utf8_lossy(first));
    }
    tokens.extend(
        parts
            .filter(|part| has_jwt_shape(part))
            .map(String::from_utf8_lossy),
    );
}

/// Adds the values of the cookies named `name` in one `Cookie` line: read from its
/// bytes, names and values trimmed of [loose spaces](is_loose_space), values unquoted
/// (`"<token>"`, as Starlette and Django read it).
fn cookie_values<'h>(line: &'h [u8], name: &str, values: &mut Vec<Cow<'h, str>>) {
    for pair in line.split(|&b| b == b';') {
        let Some(equals) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        if trim_loose(&pair[..equals]) != name.as_bytes() {
            continue;
        }
        let mut value = trim_loose(&pair[equals + 1..]);
        if let [b'"', inner @ .., b'"'] = value {
            value = inner;
        }
        if !value.is_empty() {
            values.push(String::from_utf8_lossy(value));
        }
    }
}

/// A claim as a key part: strings as they are, whole numbers and booleans as written;
/// other values (fractions and whole numbers past 64 bits, which JSON reads as
/// rounded floats so that two users' ids could meet; objects, arrays, null, empty
/// strings) do not resolve.
pub fn claim_text(claims: &Claims, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A JWT `NumericDate` read as jsonwebtoken reads `exp` and `nbf`: a whole number of
/// seconds, or a non-negative finite number rounded to one.
fn numeric_date(value: &Value) -> Option<u64> {
    match value.as_u64() {
        Some(seconds) => Some(seconds),
        None => value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64),
    }
}

/// Reads one kind of PEM public key.
type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

fn pem_key(path: &PathBuf) -> Result<Key, IdentityError> {
    let bad = |why: String| IdentityError::BadKey {
        path: path.clone(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let text = String::from_utf8_lossy(&pem);
    let attempts: [(Family, PemParser); 3] = [
        (Family::Rsa, DecodingKey::from_rsa_pem),
        (Family::Ec, DecodingKey::from_ec_pem),
        (Family::Ed, DecodingKey::from_ed_pem),
    ];
    if text.contains("PRIVATE KEY") {
        return Err(bad(
            "it holds a private key: give the public key only (openssl pkey -pubout)".into(),
        ));
    }
    for (family, parse) in attempts {
        if let Ok(key) = parse(&pem) {
            return Ok(Key {
                kid: None,
                family,
                key,
            });
        }
    }
    Err(bad(
        "not a PEM public key (RSA, EC P-256/P-384 or Ed25519)".into()
    ))
}

/// The signing keys of a JWKS document. Each key is read on its own: a key of a kind
/// jsonwebtoken does not know (an X25519 encryption key, ES512, secp256k1) is skipped,
/// where reading the set whole would refuse the document and keep keys the provider
/// has since dropped. Keys meant for encryption (`"use": "enc"`) and symmetric keys,
/// which do not belong in a published set, are skipped too.
fn jwks_keys(text: &str, source_name: &str) -> Result<Vec<Key>, IdentityError> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document = serde_json::from_str(text).map_err(|e| IdentityError::BadJwks {
        source_name: source_name.to_string(),
        why: e.to_string(),
    })?;
    let mut keys = Vec::new();
    let mut skipped = 0;
    for value in document.keys {
        use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            skipped += 1;
            continue;
        };
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
            AlgorithmParameters::OctetKey(_) => continue,
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(Key {
                kid: jwk.common.key_id.clone(),
                family,
                key,
            }),
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::debug!(
            source = source_name,
            skipped,
            "jwt: JWKS keys of kinds sluice cannot verify with were skipped"
        );
    }
    Ok(keys)
}

/// Fetches the JWKS URL now and every `refresh` until the verifier is dropped; a fetch
/// that fails keeps the keys already known.
fn refresh_jwks(
    url: &str,
    keys: Weak<ArcSwap<FetchedKeys>>,
    stop: &mpsc::Receiver<()>,
    refresh: Duration,
    timeout: Duration,
) {
    // The system's trust store (with the platform's verifier), so a provider behind a
    // company CA verifies as the rest of the machine sees it.
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::PlatformVerifier)
        .build();
    // A provider that serves its keys over https must not be able to redirect the fetch
    // to plain http, where anyone on the path could swap them.
    let https = url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .https_only(https)
        .tls_config(tls)
        .build()
        .into();
    // Until the first success, try again sooner than the refresh interval.
    let mut wait = Duration::ZERO;
    // The document last applied: the same one again changes no key, and keeps the
    // tokens verified under it remembered.
    let mut applied: Option<String> = None;
    loop {
        match stop.recv_timeout(wait) {
            // Time for the refresh, or a token asked for one early.
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let Some(keys) = keys.upgrade() else { return };
        match fetch(&agent, url) {
            Ok((text, fresh)) => {
                if applied.as_ref() != Some(&text) {
                    let generation = keys.load().generation + 1;
                    keys.store(Arc::new(FetchedKeys {
                        generation,
                        keys: fresh,
                    }));
                    applied = Some(text);
                }
                wait = refresh.max(Duration::from_secs(1));
            }
            Err(why) => {
                tracing::warn!(%why, "jwt: the JWKS URL could not be read; keeping the keys known so far");
                wait = if keys.load().keys.is_empty() {
                    Duration::from_secs(5).min(refresh)
                } else {
                    refresh.max(Duration::from_secs(1))
                };
            }
        }
    }
}

/// The JWKS document at `url`, and its keys.
fn fetch(agent: &ureq::Agent, url: &str) -> Result<(String, Vec<Key>), String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_JWKS_BYTES)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    let keys = jwks_keys(&text, url).map_err(|e| e.to_string())?;
    Ok((text, keys))
}
