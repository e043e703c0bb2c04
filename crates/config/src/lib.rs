//! sluice's configuration: one YAML file loaded into typed, validated values.
//!
//! [`load`] reads the file named by `--config`; [`load_str`] does the same from text, with the
//! environment passed in (for tests, `check-config` and reload). Loading:
//!
//! 1. parses the YAML (1.2 core schema: `true`/`false`, `null`/`~`, integers and floats are
//!    typed when written plain; quoted scalars are always strings) into a tree whose every
//!    value remembers its line and column. Duplicate keys, a second document, tags other than
//!    the core ones and nesting deeper than 64 are rejected;
//! 2. interpolates `${VAR}` and `${VAR:-default}` inside each scalar value (never keys, never
//!    the file's text, so a value containing `:` or `#` cannot change the structure); the
//!    default applies when `VAR` is unset or empty; `$$` is a literal `$`; a `$` not followed
//!    by `{` or `$` stays as it is. An interpolated plain value is typed as if written there
//!    (`max_keys: ${MAX:-5000}` is a number), except that an empty result is an empty string
//!    rather than null;
//! 3. applies `SLUICE_*` environment overrides: the name after `SLUICE_`, split on `__` and
//!    lowercased, is a path into the document (`SLUICE_STORAGE__MAX_KEYS=5000`,
//!    `SLUICE_LIMITS__CHAT_USER__RATE='[5/minute, 60/hour]'`); missing mappings on the way
//!    are created (`SLUICE_RESPONSES__DENY_STATUS=403`,
//!    `SLUICE_CLIENT_IP__TRUSTED_PROXIES='[10.0.0.0/8]'`). Only names whose first segment is
//!    a top-level key (`listen`, `admin`, `storage`, `limits`, `http`, `client_ip`,
//!    `responses`, `forward_auth`, `routes`, `envoy`, `proxy`, `sessions`, `jwt`, `plan_from`) are overrides; other `SLUICE_*` variables
//!    (`SLUICE_LOG`, `SLUICE_LOG_FORMAT`, `SLUICE_CONFIG`, `SLUICE_ADMIN_TOKEN`,
//!    `SLUICE_IP_HASH_SECRET`) are ignored. A value that
//!    starts with `[`, `{` or a quote is read as YAML; any other is taken literally as one
//!    plain scalar (so a token containing `: ` or `#` stays intact); an empty value is an
//!    empty string. Override values are not interpolated;
//! 4. converts the tree into [`Config`], rejecting unknown fields everywhere and checking
//!    every value, with limits validated by `sluice_engine` and the HTTP sections
//!    (`client_ip`, `responses`, `forward_auth`, `routes`) built into `sluice_http`'s types.
//!    Routes name limits; they may come before or after `limits:` in the file.
//!
//! The HTTP sections, all optional:
//!
//! ```yaml
//! client_ip:
//!   trusted_proxies: [10.0.0.0/8, 127.0.0.1, "::1"]  # CIDRs or single addresses; default none
//!   header: x-forwarded-for       # or `forwarded` (RFC 7239)
//!   ipv6_prefix: 64               # 1 to 128
//!   hash: true                    # needs hash_secret, at least 16 bytes
//!   hash_secret: ${SLUICE_IP_HASH_SECRET}
//! responses:
//!   deny_status: 429              # 400 to 599
//!   block_status: 403             # a request a block entry refuses (admin API), 400 to 599
//!   headers: [ietf, legacy]       # any subset; [] sends none
//!   body: '{"error": "rate_limited", "limit": "{limit}", "retry_after_seconds": {retry_after_seconds}}'
//!   content_type: application/json
//! forward_auth:
//!   deny_status: 403              # in place of responses.deny_status on /v1/forward-auth
//! routes:
//!   - match: {path: /chat/message, methods: [POST], header: x-api-key}
//!     limits:
//!       - {limit: chat_user, key: ["user:{header.x-user-id}", "ip:{client_ip}"], cost: 1}
//!   - match: {path: "/api/*"}     # a prefix; "~^/v[0-9]+/" is a regex; {} matches everything
//!     limits: [{limit: global, key: all}]
//!   - match: default              # only when no other route matches; at most one
//!     limits: [{limit: chat_ip, key: "{client_ip}"}]
//!   - match: {path: /v1/chat/completions, methods: [POST]}   # only with `proxy:`
//!     usage:                      # how answers report LLM usage, for `cost: usage`
//!       format: openai            # anthropic | openai_responses | auto (default) | /json/pointer
//!       estimate: request         # default; or a number of tokens
//!       default_output_tokens: 1024
//!       ttl_ms: 600000            # default proxy.timeout_ms + 5 minutes
//!       max_request_bytes: 4194304
//!     limits:
//!       - {limit: tokens_day, key: "user:{header.x-user-id}", cost: usage}
//!       - {limit: dollars_day, key: "user:{header.x-user-id}", cost: usage, weights: {input: 3, output: 15}}
//!       - {limit: in_flight, key: "user:{header.x-user-id}"}  # a concurrency limit: one slot per call
//! ```
//!
//! `usage` and concurrency limits on routes are settled when the answer ends, which only
//! the reverse proxy sees: they need `proxy:` (and a store that keeps reservations, for
//! now the memory store).
//!
//! The Envoy rate limit service (`envoy:`, see [`envoy`]) takes envoyproxy/ratelimit's
//! descriptor documents, inline under `domains:` or from `config_files:`.
//! The reverse proxy's sections, `proxy:` and `sessions:`, are described in the `proxy`
//! module's source (crates/config/src/proxy.rs); `{session}` keys are accepted only with
//! `proxy:`.
//!
//! Every error is a [`ConfigError`] naming the file, line, column and field, or the override
//! variable the bad value came from. Null (`~` or nothing) for an optional setting means "use
//! the default". Loading never panics, whatever the input.

mod convert;
mod de;
pub mod envoy;
mod error;
mod front_door;
mod identity;
mod overrides;
mod proxy;
mod redis;
mod tree;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

pub use envoy::EnvoyConfig;
pub use error::ConfigError;

/// The whole configuration, validated.
///
/// Its `Debug` output hides secrets (the admin token and `client_ip.hash_secret`).
#[derive(Clone)]
pub struct Config {
    /// Address of the HTTP listener (decision API, forward-auth, proxy, `/metrics`).
    /// Default `127.0.0.1:8080`: loopback unless configured otherwise.
    pub listen: SocketAddr,
    /// Admin API settings.
    pub admin: AdminConfig,
    /// Where counters are kept.
    pub storage: StorageConfig,
    /// The configured limits, in file order.
    pub limits: sluice_engine::LimitSet,
    /// HTTP front-door settings.
    pub http: HttpConfig,
    /// How the client's address is found behind proxies, grouped and hashed (`client_ip:`).
    /// Default: no trusted proxies (the socket peer is the client), `x-forwarded-for`,
    /// IPv6 grouped by /64, no hashing.
    pub client_ip: sluice_http::ClientIpConfig,
    /// How denials and rate-limit state are answered (`responses:`). Default: 429, both
    /// header styles, the default JSON body, `application/json`.
    pub responses: sluice_http::ResponseConfig,
    /// Forward-auth endpoint settings (`forward_auth:`).
    pub forward_auth: ForwardAuthConfig,
    /// Which limits apply to which HTTP requests, on which keys (`routes:`). Default: no
    /// routes, so no request is limited by the proxy or forward-auth.
    pub routes: sluice_http::Rules,
    /// The Envoy rate limit service (`envoy:`): served only when the section is present.
    pub envoy: Option<EnvoyConfig>,
    /// The reverse proxy (`proxy:`); `None` when sluice does not proxy.
    pub proxy: Option<ProxyConfig>,
    /// Session cookies for `{session}` keys (`sessions:`, only with `proxy`).
    pub sessions: SessionsConfig,
    /// How a caller's bearer token is verified, for `{jwt.CLAIM}` keys (`jwt:`).
    pub identity: Option<std::sync::Arc<sluice_identity::JwtVerifier>>,
    /// Which plan an HTTP request is on (`plan_from:`, e.g. `{jwt.plan}`): limits with
    /// `plans:` apply that plan's rates to it.
    pub plan_from: Option<sluice_http::KeyTemplate>,
    /// What sluice keeps about who is spending (`stats:`). Default: top keys on, 100
    /// counters per sketch.
    pub stats: StatsConfig,
}

/// What sluice keeps about who is spending (`stats:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsConfig {
    /// `stats.top_keys`: track each limit's heaviest keys by spend and by denials
    /// (`GET /v1/admin/top`, the dashboard). Default `true`.
    pub top_keys: bool,
    /// `stats.top_keys_capacity`: counters per sketch, `k`; reported counts are at most
    /// `N / k` above the truth. Default 100.
    pub top_keys_capacity: usize,
}

impl StatsConfig {
    /// The default `stats.top_keys_capacity`.
    pub const DEFAULT_CAPACITY: usize = 100;
    /// The smallest `stats.top_keys_capacity`.
    pub const MIN_CAPACITY: usize = 10;
    /// The largest `stats.top_keys_capacity`: memory is `36 × k` keys per limit per
    /// shard (one shard per core, at most 8).
    pub const MAX_CAPACITY: usize = 10_000;
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            top_keys: true,
            top_keys_capacity: Self::DEFAULT_CAPACITY,
        }
    }
}

impl Config {
    /// The default listen address, `127.0.0.1:8080`.
    pub const DEFAULT_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));

    /// What a valid config does that its author may not mean: `sluice check-config`
    /// prints these and `sluice serve` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(proxy) = &self.proxy {
            match &proxy.sluice_endpoints {
                SluiceEndpoints::Main => warnings.push(format!(
                    "proxy.sluice_endpoints: main serves /v1/check, /v1/forward-auth, /v1/limits, /v1/stats and /metrics on {} to every client the proxy serves: any of them can spend or read any key's quota; use `admin` (with admin.listen) or a prefix the public cannot reach",
                    self.listen
                )),
                SluiceEndpoints::Prefix(prefix) => warnings.push(format!(
                    "proxy.sluice_endpoints: {prefix} serves /v1/check and the other endpoints under {prefix} on {} to every client that learns the prefix: any of them can spend or read any key's quota; prefer `admin` with admin.listen, or block {prefix} at the edge",
                    self.listen
                )),
                SluiceEndpoints::Admin if self.admin.listen.is_none() => warnings.push(
                    "proxy mode: sluice's own endpoints (/metrics, /readyz, /v1/check, admin calls) are not served anywhere, since they stay off the public listener and admin.listen is not set; add `admin: {listen: 127.0.0.1:8081}` to reach them".to_string(),
                ),
                SluiceEndpoints::Admin => {}
            }
            if let Some(plan_from) = self.plan_from.as_ref().filter(|t| t.reads_client_input()) {
                warnings.push(format!(
                    "plan_from: {plan_from} reads a header, cookie or query parameter, which the proxied clients write themselves: any of them can name the plan with the highest rates; read the plan from a verified token ({{jwt.plan}}) instead"
                ));
            }
        }
        if let Some(url) = self.identity.as_ref().and_then(|i| i.jwks_url()) {
            let host = url
                .strip_prefix("http://")
                .map(|rest| rest.split(['/', ':']).next().unwrap_or(""));
            if let Some(host) = host.filter(|h| !matches!(*h, "127.0.0.1" | "localhost" | "[::1]"))
            {
                warnings.push(format!(
                    "jwt.jwks_url fetches the signing keys over plain http from {host}: anyone on the path can swap them and sign tokens for any user; use https"
                ));
            }
        }
        warnings
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Config::DEFAULT_LISTEN,
            admin: AdminConfig::default(),
            storage: StorageConfig::default(),
            limits: sluice_engine::LimitSet::default(),
            http: HttpConfig::default(),
            client_ip: sluice_http::ClientIpConfig::default(),
            responses: sluice_http::ResponseConfig::default(),
            forward_auth: ForwardAuthConfig::default(),
            routes: sluice_http::Rules::default(),
            envoy: None,
            proxy: None,
            sessions: SessionsConfig::default(),
            identity: None,
            plan_from: None,
            stats: StatsConfig::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be left out unnoticed.
        let Config {
            listen,
            admin,
            storage,
            limits,
            http,
            client_ip,
            responses,
            forward_auth,
            routes,
            envoy,
            proxy,
            sessions,
            identity,
            plan_from,
            stats,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("admin", admin)
            .field("storage", storage)
            .field("limits", limits)
            .field("http", http)
            .field("client_ip", &RedactedClientIp(client_ip))
            .field("responses", responses)
            .field("forward_auth", forward_auth)
            .field("routes", routes)
            .field("envoy", envoy)
            .field("proxy", proxy)
            .field("sessions", sessions)
            .field("identity", identity)
            .field("plan_from", plan_from)
            .field("stats", stats)
            .finish()
    }
}

/// `ClientIpConfig`'s `Debug` with the hash secret redacted.
struct RedactedClientIp<'a>(&'a sluice_http::ClientIpConfig);

impl fmt::Debug for RedactedClientIp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sluice_http::ClientIpConfig {
            trusted_proxies,
            header,
            ipv6_prefix,
            hash_secret,
        } = self.0;
        f.debug_struct("ClientIpConfig")
            .field("trusted_proxies", trusted_proxies)
            .field("header", header)
            .field("ipv6_prefix", ipv6_prefix)
            .field("hash_secret", &hash_secret.as_ref().map(|_| Redacted))
            .finish()
    }
}

/// Shows as `[redacted]`.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Forward-auth endpoint settings (`forward_auth:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardAuthConfig {
    /// Status of a denied answer on `/v1/forward-auth` (400 to 599), in place of
    /// `responses.deny_status` (nginx `auth_request` only understands 401 and 403).
    /// Default `None`: `responses.deny_status` applies.
    pub deny_status: Option<http::StatusCode>,
}

/// The reverse proxy (`proxy:`): allowed requests go to `upstream`, denied ones are
/// answered by sluice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where allowed requests go: `http://host:port`, optionally with a path prefix.
    pub upstream: http::Uri,
    /// Longest wait for a connection to the upstream, in milliseconds. Default 5000.
    pub connect_timeout_ms: u64,
    /// Longest wait from sending a request to the upstream's response head, in
    /// milliseconds (the body then streams for as long as it takes). Default 60000.
    pub timeout_ms: u64,
    /// Upstream statuses whose cost is given back. Default none.
    pub refund_on_status: StatusSet,
    /// Where a caller reads its own quota (`GET <quota_path>?path=/x&method=POST`),
    /// normalised. Default none.
    pub quota_path: Option<String>,
    /// Where sluice's own endpoints are served while it proxies. Default `admin`: only on
    /// `admin.listen`, never to the proxied clients.
    pub sluice_endpoints: SluiceEndpoints,
}

impl ProxyConfig {
    /// Default `connect_timeout_ms`.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
    /// Default `timeout_ms`.
    pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;

    /// Proxying to `upstream` with every other setting at its default.
    pub fn new(upstream: http::Uri) -> Self {
        ProxyConfig {
            upstream,
            connect_timeout_ms: Self::DEFAULT_CONNECT_TIMEOUT_MS,
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
            refund_on_status: StatusSet::default(),
            quota_path: None,
            sluice_endpoints: SluiceEndpoints::Admin,
        }
    }
}

/// Where sluice's own endpoints (`/v1/check`, `/v1/forward-auth`, `/healthz`, `/readyz`,
/// `/metrics`, ...) are served while it proxies (`proxy.sluice_endpoints`).
///
/// The default is [`SluiceEndpoints::Admin`]: the proxied clients are the public, and
/// `/v1/check` would let any of them spend or read any key's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum SluiceEndpoints {
    /// On the main listener, at their usual paths: they win over the upstream's, and
    /// every proxied client can call them.
    Main,
    /// Only on `admin.listen` (nowhere when it is not set): every path of the main
    /// listener goes to the upstream. The default.
    #[default]
    Admin,
    /// On the main listener under this prefix (e.g. `/_sluice/metrics`).
    Prefix(String),
}

/// A set of HTTP statuses: single codes and whole classes (`"5xx"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusSet {
    codes: Vec<u16>,
    /// Bit `d` set: every `dxx` status.
    classes: u8,
}

impl StatusSet {
    /// Adds one code.
    pub fn add_code(&mut self, code: u16) {
        if !self.codes.contains(&code) {
            self.codes.push(code);
        }
    }

    /// Adds a class by its first digit (1 to 5).
    pub fn add_class(&mut self, digit: u8) {
        self.classes |= 1 << digit;
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: u16) -> bool {
        let digit = status / 100;
        (digit < 8 && self.classes & (1 << digit) != 0) || self.codes.contains(&status)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty() && self.classes == 0
    }
}

/// Session cookies (`sessions:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionsConfig {
    /// The signing secret; `None`: a random one per start (sessions then reset on
    /// restart and are not shared across instances).
    pub secret: Option<Secret>,
    /// Name, lifetime and `Secure`.
    pub cookie: sluice_http::SessionCookie,
}

/// Admin API settings (`admin:`).
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Bearer token for `/v1/reset` and other admin calls; with none, no admin call works.
    pub token: Option<Secret>,
    /// A separate address for the admin calls; when set, they are served only there.
    pub listen: Option<SocketAddr>,
}

impl AdminConfig {
    /// Shortest `admin.token` accepted, in bytes (not counting surrounding whitespace).
    pub const MIN_TOKEN_BYTES: usize = 16;
}

/// A secret string (such as the admin token) that never shows in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for comparing with what a caller presents.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Storage settings (`storage:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Which store keeps the counters. Default `memory`.
    pub backend: Backend,
    /// Most keys the memory store tracks at once (at least 1). Default 1 000 000.
    pub max_keys: usize,
    /// What to do when the store fails. Default `local`.
    pub on_error: OnError,
    /// Prefix of every key in the store, so deployments can share one. Default `sluice:`.
    pub prefix: String,
    /// How often expired entries are swept, in milliseconds (at least 10). Default 1000.
    pub sweep_interval_ms: u64,
    /// The disk store's data directory (required for, and only for, backend `disk`);
    /// a relative path is taken from the working directory.
    pub path: Option<std::path::PathBuf>,
    /// Backend `disk`: `fdatasync` every group commit, so acknowledged decisions also
    /// survive a power loss (without it they survive a crash of the process). Default false.
    pub sync: bool,
}

impl StorageConfig {
    /// Default `max_keys`.
    pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
    /// Default `prefix`.
    pub const DEFAULT_PREFIX: &'static str = "sluice:";
    /// Default `sweep_interval_ms`.
    pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 1_000;
    /// Smallest `sweep_interval_ms` accepted.
    pub const MIN_SWEEP_INTERVAL_MS: u64 = 10;
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::default(),
            max_keys: Self::DEFAULT_MAX_KEYS,
            on_error: OnError::default(),
            prefix: Self::DEFAULT_PREFIX.to_string(),
            sweep_interval_ms: Self::DEFAULT_SWEEP_INTERVAL_MS,
            path: None,
            sync: false,
        }
    }
}

/// A storage backend (`storage.backend`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Sharded, in-process, bounded by `max_keys` (config value `memory`).
    #[default]
    Memory,
    /// Embedded and durable: counters in `path`, surviving restarts and `kill -9`
    /// (config value `disk`).
    Disk,
    /// Shared by every instance pointing at one Redis (config value `redis`); keys start
    /// with `storage.prefix`.
    Redis {
        /// `storage.url`, required (but with `sentinel`, where it is optional and empty
        /// when absent): `redis://[user:password@]host:port[/db]` or `rediss://`. May
        /// carry a password, so it never shows in `Debug` output.
        url: Secret,
        /// `storage.timeout_ms`: the longest one store call may take before `on_error`
        /// applies (1 to 60000). Default 200.
        timeout_ms: u64,
        /// `storage.cluster`: the URL names one node of a Redis Cluster (`true`, or a list
        /// of node URLs). Default false.
        cluster: bool,
        /// More Redis Cluster nodes to learn the cluster's layout from, when
        /// `storage.cluster` is a list (its first entry is `url` when `url` is absent).
        cluster_seeds: Vec<Secret>,
        /// `storage.tls`: certificates for `rediss://` (a private CA, a client
        /// certificate); the URL must then be `rediss://`.
        tls: Option<RedisTls>,
        /// `storage.sentinel`: find the primary through Redis Sentinel. `url` (optional
        /// then, empty when absent) gives the primary's user, password, database and TLS.
        sentinel: Option<RedisSentinel>,
        /// `storage.local_deny_cache`: answer a decision Redis denied again from this
        /// process, without a round trip, until it could first be allowed (refunds and
        /// resets on any instance end it). Default true.
        local_deny_cache: bool,
    },
    /// Shared by every instance pointing at one PostgreSQL database (config value
    /// `postgres`); keys start with `storage.prefix`.
    Postgres {
        /// `storage.url`, required: `postgres://user:password@host:port/database`. May
        /// carry a password, so it never shows in `Debug` output.
        url: Secret,
        /// `storage.schema`: where sluice's table and functions live; a lowercase
        /// identifier. Default `public`.
        schema: String,
        /// `storage.pool_size`: connections kept at most (1 to 1000). Default 16.
        pool_size: usize,
        /// `storage.timeout_ms`: the longest one store call may take before `on_error`
        /// applies (1 to 60000). Default 200.
        timeout_ms: u64,
        /// `storage.migrate`: install or upgrade the schema at start. Default true.
        migrate: bool,
        /// `storage.unlogged`: keep counters in an UNLOGGED table (no WAL: faster, but
        /// emptied by a crash of PostgreSQL). Default false.
        unlogged: bool,
    },
}

impl Backend {
    /// Default `storage.timeout_ms` of backends redis and postgres.
    pub const DEFAULT_TIMEOUT_MS: u64 = 200;
    /// Largest `storage.timeout_ms`.
    pub const MAX_TIMEOUT_MS: u64 = 60_000;
    /// Default `storage.schema` of backend postgres.
    pub const DEFAULT_SCHEMA: &'static str = sluice_store_rules::postgres::DEFAULT_SCHEMA;
    /// Default `storage.pool_size` of backend postgres.
    pub const DEFAULT_POOL_SIZE: usize = sluice_store_rules::postgres::DEFAULT_POOL_SIZE;
    /// Largest `storage.pool_size`.
    pub const MAX_POOL_SIZE: usize = 1_000;

    /// The config spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Disk => "disk",
            Backend::Redis { .. } => "redis",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `storage.tls`: PEM text read from the files the config names, each checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisTls {
    /// `ca_file`: the CAs that may sign the server's certificate, instead of the
    /// system's.
    pub ca: Option<String>,
    /// `cert_file` and `key_file`: a client certificate (chain) and its private key.
    pub client: Option<(String, Secret)>,
}

/// `storage.sentinel`: which service the sentinels watch, and where they are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedisSentinel {
    /// `master`: the service's name (`sentinel monitor <name> ...`).
    pub master: String,
    /// `nodes`: the sentinels' URLs (may hold passwords).
    pub nodes: Vec<Secret>,
}

/// What to do when the store fails or times out (`storage.on_error`): the failure
/// policy's own type, so the value goes to the store wrapper as it is.
pub use sluice_store_rules::FailurePolicy as OnError;

/// HTTP front-door settings (`http:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Largest request body the decision API reads, in bytes (64 to 16 MiB). Default 65536.
    pub max_body_bytes: usize,
    /// Threads serving HTTP, each with its own event loop and listener; 0 (the
    /// default) means one per CPU core.
    pub threads: usize,
    /// The longest a client may take to send a complete request head, counted from
    /// when the connection opens or, on a kept-alive connection, from the first byte of
    /// the next request; then the connection is closed. Default 10 s.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send the body of a request to sluice's own JSON
    /// endpoints (`/v1/check`, admin calls) once its head has arrived; then it gets
    /// `408 request_timeout` and the connection is closed. Proxied bodies stream to the
    /// upstream instead, under `proxy.timeout_ms`, except on a metered route (`usage:`),
    /// whose body is read first, within this, to estimate the call. Default 10 s.
    pub body_read_timeout_ms: u64,
    /// How long a connection with no request in flight stays open waiting for the next
    /// request before it is closed. Default 60 s.
    pub idle_timeout_ms: u64,
    /// Most connections open at once on each listener (main, admin, Envoy), over all
    /// serving threads; further connections wait in the listen backlog. Default 10000.
    pub max_connections: usize,
    /// After SIGTERM, how long requests in flight get to finish before the remaining
    /// connections are closed and the process exits. Default 25 s.
    pub shutdown_timeout_ms: u64,
}

impl HttpConfig {
    /// Default `max_body_bytes`.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 65_536;
    /// Smallest `max_body_bytes` accepted.
    pub const MIN_MAX_BODY_BYTES: usize = 64;
    /// Most serving threads accepted.
    pub const MAX_THREADS: usize = 256;
    /// Largest `max_body_bytes` accepted (16 MiB).
    pub const MAX_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
    /// Default `header_read_timeout_ms`: ample for a head of any accepted size on a slow
    /// link, short enough that a client trickling a head holds a connection briefly.
    pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    /// Largest `header_read_timeout_ms` accepted (10 minutes).
    pub const MAX_HEADER_READ_TIMEOUT_MS: u64 = 600_000;
    /// Default `body_read_timeout_ms`: a 64 KiB body arrives well within it on any link
    /// a client should use.
    pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 10_000;
    /// Largest `body_read_timeout_ms` accepted (10 minutes).
    pub const MAX_BODY_READ_TIMEOUT_MS: u64 = 600_000;
    /// Default `idle_timeout_ms`: as long as common load balancers keep idle upstream
    /// connections (AWS ALB, nginx `keepalive_timeout` upstream), so pools are reused.
    pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
    /// Largest `idle_timeout_ms` accepted (one hour).
    pub const MAX_IDLE_TIMEOUT_MS: u64 = 3_600_000;
    /// Default `max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    /// Largest `max_connections` accepted.
    pub const MAX_MAX_CONNECTIONS: usize = 1_000_000;
    /// Default `shutdown_timeout_ms`: under Kubernetes' default 30 s grace period, so
    /// sluice exits by itself before the SIGKILL.
    pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 25_000;
    /// Largest `shutdown_timeout_ms` accepted (10 minutes).
    pub const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 600_000;
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            threads: 0,
            header_read_timeout_ms: Self::DEFAULT_HEADER_READ_TIMEOUT_MS,
            body_read_timeout_ms: Self::DEFAULT_BODY_READ_TIMEOUT_MS,
            idle_timeout_ms: Self::DEFAULT_IDLE_TIMEOUT_MS,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout_ms: Self::DEFAULT_SHUTDOWN_TIMEOUT_MS,
        }
    }
}

/// Loads the config file at `path`, resolving `${VAR}` from the process environment and
/// applying the process's `SLUICE_*` overrides in name order (so `SLUICE_LIMITS__X__RATE`
/// applies after `SLUICE_LIMITS__X`).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigError::whole_file(&source, format!("cannot read the config file: {error}"))
    })?;
    let mut overrides: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .filter(|(name, _)| name.starts_with(overrides::PREFIX))
        .collect();
    overrides.sort();
    let env = |name: &str| std::env::var(name).ok();
    load_str(&text, &source, &env, &overrides)
}

/// Loads a config from `text`. `source` is the file name shown in errors; `env` resolves
/// `${VAR}`; `overrides` are `(name, value)` environment pairs, applied in order, of which
/// only `SLUICE_*` names whose first segment is a top-level key are used.
pub fn load_str(
    text: &str,
    source: &str,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let root = tree::parse(text, Some(env)).map_err(|fail| fail.into_error(source))?;
    let mut root = match root {
        Some(root) if !root.is_null() => root,
        _ => tree::Node::empty_map(error::Origin::File { line: 1, column: 1 }),
    };
    overrides::apply(&mut root, overrides).map_err(|fail| fail.into_error(source))?;
    convert::config(&root, source).map_err(|fail| fail.into_error(source))
}
