//! The config file as derived types (the reference for the fields each section accepts),
//! and the checks that build [`Config`] from them, each error placed at its node.
//!
//! Field order in these structs is the order "expected one of ..." messages list them.

use std::net::SocketAddr;
use std::str::FromStr;

use serde::Deserialize;
use sluice_engine::{Algorithm, Limit, LimitError, LimitSet, LimitSpec, Rate};
use sluice_store_rules::{after_scheme, postgres};

use crate::de::{FromText, Located, OneOrMany, Parsed, Place, Whole, from_node};
use crate::error::Fail;
use crate::tree::{Node, shorten};
use crate::{
    AdminConfig, Backend, Config, HttpConfig, OnError, Secret, StatsConfig, StorageConfig,
};
use crate::{envoy, front_door, proxy};

/// The whole file. Every section is optional; null is the same as absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Parsed<SocketAddr>>,
    admin: Option<AdminSection>,
    storage: Option<StorageSection>,
    limits: Option<Located<Limits>>,
    http: Option<HttpSection>,
    client_ip: Option<front_door::ClientIpSection>,
    responses: Option<front_door::ResponsesSection>,
    forward_auth: Option<front_door::ForwardAuthSection>,
    routes: Option<Located<front_door::Routes>>,
    envoy: Option<Located<envoy::EnvoySection>>,
    proxy: Option<proxy::ProxySection>,
    sessions: Option<Located<proxy::SessionsSection>>,
    jwt: Option<Located<crate::identity::JwtSection>>,
    plan_from: Option<Located<Parsed<sluice_http::KeyTemplate>>>,
    stats: Option<StatsSection>,
}

/// `stats:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsSection {
    top_keys: Option<bool>,
    top_keys_capacity: Option<
        Located<Whole<{ StatsConfig::MIN_CAPACITY as u64 }, { StatsConfig::MAX_CAPACITY as u64 }>>,
    >,
}

impl StatsSection {
    fn build(self) -> Result<StatsConfig, Fail> {
        let mut stats = StatsConfig::default();
        if let Some(on) = self.top_keys {
            stats.top_keys = on;
        }
        if let Some(Located { value, at }) = self.top_keys_capacity {
            if !stats.top_keys {
                return Err(at.fail(
                    "stats.top_keys_capacity is set but stats.top_keys is false: remove one of them",
                ));
            }
            stats.top_keys_capacity = value.0 as usize;
        }
        Ok(stats)
    }
}

/// `admin:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    token: Option<Located<String>>,
    listen: Option<Parsed<SocketAddr>>,
}

/// `storage:`; which fields apply depends on `backend`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    backend: Option<Located<Parsed<BackendName>>>,
    max_keys: Option<Whole<1, { usize::MAX as u64 }>>,
    on_error: Option<Parsed<OnError>>,
    prefix: Option<String>,
    sweep_interval_ms: Option<Whole<{ StorageConfig::MIN_SWEEP_INTERVAL_MS }, { u64::MAX }>>,
    path: Option<Located<String>>,
    sync: Option<Located<bool>>,
    url: Option<Located<String>>,
    timeout_ms: Option<Located<Whole<1, { Backend::MAX_TIMEOUT_MS }>>>,
    cluster: Option<Located<Cluster>>,
    tls: Option<Located<crate::redis::TlsSection>>,
    sentinel: Option<Located<crate::redis::SentinelSection>>,
    local_deny_cache: Option<Located<bool>>,
    schema: Option<Located<String>>,
    pool_size: Option<Located<Whole<1, { Backend::MAX_POOL_SIZE as u64 }>>>,
    migrate: Option<Located<bool>>,
    unlogged: Option<Located<bool>>,
}

/// `http:`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    max_body_bytes: Option<
        Whole<{ HttpConfig::MIN_MAX_BODY_BYTES as u64 }, { HttpConfig::MAX_MAX_BODY_BYTES as u64 }>,
    >,
    threads: Option<Whole<0, { HttpConfig::MAX_THREADS as u64 }>>,
    header_read_timeout_ms: Option<Whole<1, { HttpConfig::MAX_HEADER_READ_TIMEOUT_MS }>>,
    body_read_timeout_ms: Option<Whole<1, { HttpConfig::MAX_BODY_READ_TIMEOUT_MS }>>,
    idle_timeout_ms: Option<Whole<1, { HttpConfig::MAX_IDLE_TIMEOUT_MS }>>,
    max_connections: Option<Whole<1, { HttpConfig::MAX_MAX_CONNECTIONS as u64 }>>,
    shutdown_timeout_ms: Option<Whole<0, { HttpConfig::MAX_SHUTDOWN_TIMEOUT_MS }>>,
}

/// `limits:`, a mapping of names to limits, in file order.
struct Limits(Vec<(Located<String>, Option<LimitSection>)>);

impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Limits;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a mapping of limit names to settings, e.g. `chat_user: {rate: 5/minute}`",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Limits, A::Error> {
                let mut limits = Vec::new();
                while let Some(name) = map.next_key()? {
                    limits.push((name, map.next_value()?));
                }
                Ok(Limits(limits))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// One limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitSection {
    rate: Option<Located<OneOrMany<Located<Parsed<Rate>>>>>,
    algorithm: Option<Located<Parsed<Algorithm>>>,
    burst: Option<Located<Whole<1, { u64::MAX }>>>,
    charge_denied: Option<bool>,
    shadow: Option<bool>,
    /// Calls in flight per key, held by reservations (`/v1/reserve`, the proxy).
    concurrency: Option<Located<Whole<1, 1_000_000_000>>>,
    /// Other rates for callers on other plans: plan name → rate settings.
    plans: Option<Located<Limits>>,
}

/// `storage.cluster`: `true`/`false`, or a list of Redis Cluster node URLs.
enum Cluster {
    Flag(bool),
    Nodes(Vec<Located<String>>),
}

impl<'de> Deserialize<'de> for Cluster {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cluster;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or a list of node URLs")
            }
            fn visit_bool<E>(self, on: bool) -> Result<Cluster, E> {
                Ok(Cluster::Flag(on))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Cluster, A::Error> {
                let mut nodes = Vec::new();
                while let Some(node) = seq.next_element()? {
                    nodes.push(node);
                }
                Ok(Cluster::Nodes(nodes))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl FromText for SocketAddr {
    const EXPECTING: &'static str =
        "a string\0: write IP:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080";

    fn from_text(text: &str) -> Result<Self, String> {
        let hint = "write IP:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080";
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "`{text}` is a port without an address: {hint} (use 0.0.0.0 to listen on every interface)"
            ));
        }
        let parsed = match text.strip_prefix("localhost:") {
            Some(port) => SocketAddr::from_str(&format!("127.0.0.1:{port}")),
            None => SocketAddr::from_str(text),
        };
        parsed.map_err(|_| format!("`{}` is not an address to listen on: {hint}", shorten(text)))
    }
}

impl FromText for OnError {
    fn from_text(text: &str) -> Result<Self, String> {
        OnError::from_name(text).ok_or_else(|| {
            format!(
                "unknown on_error `{}`, expected one of `allow`, `deny`, `local`",
                shorten(text)
            )
        })
    }
}

/// `storage.backend`, before its fields are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendName {
    Memory,
    Disk,
    Redis,
    Postgres,
}

impl FromText for BackendName {
    fn from_text(text: &str) -> Result<Self, String> {
        match text {
            "memory" => Ok(BackendName::Memory),
            "disk" => Ok(BackendName::Disk),
            "redis" => Ok(BackendName::Redis),
            "postgres" => Ok(BackendName::Postgres),
            other => Err(format!(
                "unknown storage backend `{}`: use memory, disk, redis or postgres",
                shorten(other)
            )),
        }
    }
}

impl FromText for Rate {
    const EXPECTING: &'static str = "a rate such as 5/minute";
    fn from_text(text: &str) -> Result<Self, String> {
        Rate::from_str(text).map_err(|error| error.to_string())
    }
}

impl FromText for Algorithm {
    fn from_text(text: &str) -> Result<Self, String> {
        Algorithm::from_str(text).map_err(|error| error.to_string())
    }
}

/// The whole config from the document's root.
pub(crate) fn config(root: &Node, source: &str) -> Result<Config, Fail> {
    let file: File = from_node(root, "")?;
    let mut config = Config::default();
    if let Some(listen) = file.listen {
        config.listen = listen.0;
    }
    if let Some(admin) = file.admin {
        config.admin = admin.build()?;
    }
    if let Some(storage) = file.storage {
        config.storage = storage.build(source)?;
    }
    if let Some(limits) = &file.limits {
        config.limits = limits.value.build(&limits.at)?;
    }
    if let Some(http) = file.http {
        config.http = http.build();
    }
    if let Some(stats) = file.stats {
        config.stats = stats.build()?;
    }
    if let Some(client_ip) = file.client_ip {
        config.client_ip = client_ip.build()?;
    }
    if let Some(responses) = file.responses {
        config.responses = responses.build();
    }
    if let Some(forward_auth) = file.forward_auth {
        config.forward_auth.deny_status = forward_auth.deny_status.map(|status| status.0);
    }
    // After `admin`: `proxy.sluice_endpoints: admin` needs `admin.listen`.
    if let Some(section) = file.proxy {
        config.proxy = Some(section.build(&config.admin)?);
    }
    if let Some(sessions) = file.sessions {
        if config.proxy.is_none() {
            return Err(sessions.at.fail(
                "sessions are issued by the reverse proxy, which is not configured: add a `proxy:` section with an upstream, or remove sessions",
            ));
        }
        config.sessions = sessions.value.build()?;
    }
    if let Some(jwt) = file.jwt {
        config.identity = Some(jwt.value.build(&jwt.at, source)?);
    }
    // After `limits` and `proxy`: routes name limits, and `{session}` needs the proxy.
    if let Some(routes) = file.routes {
        config.routes = routes
            .value
            .build(&routes.at, &config.limits, config.proxy.is_some())?;
        if config.routes.uses_jwt() && config.identity.is_none() {
            return Err(routes.at.fail(
                "a key template reads {jwt.CLAIM}, but no `jwt:` section says how to verify tokens: add `jwt:` with `algorithms` and a key (secret, public_keys, jwks_file or jwks_url); sluice never reads an unverified token",
            ));
        }
    }
    if let Some(plan_from) = file.plan_from {
        let template = plan_from.value.0;
        if template.uses_jwt() && config.identity.is_none() {
            return Err(plan_from.at.fail(
                "plan_from reads {jwt.CLAIM}, but no `jwt:` section says how to verify tokens: add `jwt:`; a plan from an unverified token would let anyone pick theirs",
            ));
        }
        config.plan_from = Some(template);
    }
    if let Some(section) = file.envoy {
        let built = section.value.build(source)?;
        let taken = built.domains.limits().iter();
        if let Some(limit) = taken
            .into_iter()
            .find(|l| config.limits.get(l.name()).is_some())
        {
            let at = file
                .limits
                .as_ref()
                .map_or(&section.at, |limits| &limits.at);
            return Err(at.fail(format!(
                "limit `{}` has the name sluice gives an envoy descriptor rule: rename the limit (names starting with `envoy.` are best left to the envoy section)",
                limit.name()
            )));
        }
        config.envoy = Some(built);
    }
    Ok(config)
}

impl AdminSection {
    fn build(self) -> Result<AdminConfig, Fail> {
        let mut admin = AdminConfig::default();
        if let Some(Located { value: token, at }) = self.token {
            let trimmed = token.trim().len();
            if token.is_empty() {
                return Err(at.fail("admin.token is empty: set it or remove it"));
            }
            if trimmed == 0 {
                return Err(at.fail(
                    "admin.token is only whitespace: set a random token of at least 16 bytes (e.g. `openssl rand -hex 32`) or remove it",
                ));
            }
            // Admin calls reset counters and reload the config: a guessable token is no lock.
            if trimmed < AdminConfig::MIN_TOKEN_BYTES {
                return Err(at.fail(format!(
                    "admin.token is {trimmed} bytes, shorter than {}: use a random token (e.g. `openssl rand -hex 32`)",
                    AdminConfig::MIN_TOKEN_BYTES
                )));
            }
            admin.token = Some(Secret::new(token));
        }
        admin.listen = self.listen.map(|listen| listen.0);
        Ok(admin)
    }
}

impl StorageSection {
    fn build(mut self, source: &str) -> Result<StorageConfig, Fail> {
        let mut storage = StorageConfig::default();
        let backend = self.backend.take().map(|b| (b.value.0, b.at));
        let spelled = match backend
            .as_ref()
            .map_or(BackendName::Memory, |(name, _)| *name)
        {
            BackendName::Memory => "memory",
            BackendName::Disk => "disk",
            BackendName::Redis => "redis",
            BackendName::Postgres => "postgres",
        };
        // The fields only some backends have; the others refuse them.
        let own: &[(&str, Option<&Place>, &str)] = &[
            ("path", self.path.as_ref().map(|f| &f.at), "disk"),
            ("sync", self.sync.as_ref().map(|f| &f.at), "disk"),
            ("url", self.url.as_ref().map(|f| &f.at), "redis or postgres"),
            (
                "timeout_ms",
                self.timeout_ms.as_ref().map(|f| &f.at),
                "redis or postgres",
            ),
            ("cluster", self.cluster.as_ref().map(|f| &f.at), "redis"),
            ("tls", self.tls.as_ref().map(|f| &f.at), "redis"),
            ("sentinel", self.sentinel.as_ref().map(|f| &f.at), "redis"),
            (
                "local_deny_cache",
                self.local_deny_cache.as_ref().map(|f| &f.at),
                "redis",
            ),
            ("schema", self.schema.as_ref().map(|f| &f.at), "postgres"),
            (
                "pool_size",
                self.pool_size.as_ref().map(|f| &f.at),
                "postgres",
            ),
            ("migrate", self.migrate.as_ref().map(|f| &f.at), "postgres"),
            (
                "unlogged",
                self.unlogged.as_ref().map(|f| &f.at),
                "postgres",
            ),
        ];
        for (field, at, backends) in own {
            let Some(at) = at.filter(|_| !backends.split(" or ").any(|b| b == spelled)) else {
                continue;
            };
            let message = match *field {
                "path" => "storage.path only applies to backend disk: set `backend: disk` to keep counters there, or remove path".to_string(),
                "sync" => "storage.sync only applies to backend disk: set `backend: disk` and a path, or remove sync".to_string(),
                _ => {
                    let first = backends.split(' ').next().unwrap_or(backends);
                    format!("storage.{field} only applies to backend {backends}: set `backend: {first}`, or remove it")
                }
            };
            return Err(at.fail(message));
        }
        storage.backend = match backend {
            None | Some((BackendName::Memory, _)) => Backend::Memory,
            Some((BackendName::Disk, at)) => {
                let Some(path) = self.path.take() else {
                    return Err(Fail::new(
                        &at.origin,
                        "storage.path",
                        "backend disk needs a data directory: add `path: /var/lib/sluice` (any directory sluice may write) under storage",
                    ));
                };
                if path.value.trim().is_empty() {
                    return Err(path.at.fail(
                        "storage.path is empty: give the disk store's data directory, e.g. /var/lib/sluice",
                    ));
                }
                storage.path = Some(path.value.into());
                storage.sync = self.sync.take().is_some_and(|sync| sync.value);
                Backend::Disk
            }
            Some((name, at)) => self.shared(name, &at, source)?,
        };
        if let Some(max_keys) = self.max_keys {
            storage.max_keys = usize::try_from(max_keys.0).unwrap_or(usize::MAX);
        }
        if let Some(on_error) = self.on_error {
            storage.on_error = on_error.0;
        }
        if let Some(prefix) = self.prefix {
            storage.prefix = prefix;
        }
        if let Some(sweep) = self.sweep_interval_ms {
            storage.sweep_interval_ms = sweep.0;
        }
        Ok(storage)
    }

    /// Backends redis and postgres: `url` (or Redis's `cluster` list) is required.
    fn shared(
        &mut self,
        name: BackendName,
        backend_at: &Place,
        source: &str,
    ) -> Result<Backend, Fail> {
        let redis = name == BackendName::Redis;
        let sentinel = match self.sentinel.take() {
            Some(Located { value, at }) => {
                if let Some(cluster) = &self.cluster {
                    return Err(cluster.at.fail(
                        "storage.cluster and storage.sentinel exclude each other: a Redis Cluster fails over by itself; keep one",
                    ));
                }
                Some((value.build(&at)?, at))
            }
            None => None,
        };
        let (mut cluster, mut seeds) = (false, Vec::new());
        if let Some(Located { value, at }) = self.cluster.take() {
            (cluster, seeds) = match value {
                Cluster::Flag(on) => (on, Vec::new()),
                Cluster::Nodes(nodes) if nodes.is_empty() => {
                    return Err(at.fail(
                        "storage.cluster lists no node: list at least one, e.g. [redis://10.0.0.1:7000], or write `cluster: true` to use storage.url",
                    ));
                }
                Cluster::Nodes(nodes) => {
                    let nodes = nodes.iter().map(|node| store_url(node, true));
                    (true, nodes.collect::<Result<_, _>>()?)
                }
            };
        }
        let url = match self.url.take() {
            Some(url) => store_url(&url, redis)?,
            None if !seeds.is_empty() => seeds.remove(0),
            // The sentinels say where the primary is; a url would only add credentials.
            None if sentinel.is_some() => Secret::new(""),
            None => {
                let (name, example, cluster_hint) = if redis {
                    (
                        "redis",
                        REDIS_URL_EXAMPLE,
                        " (for a Redis Cluster, a node's url and `cluster: true`)",
                    )
                } else {
                    ("postgres", POSTGRES_URL_EXAMPLE, "")
                };
                let message = format!(
                    "backend {name} needs a url: add `url: {example}` under storage{cluster_hint}"
                );
                return Err(Fail::new(&backend_at.origin, "storage.url", message));
            }
        };
        let timeout_ms = self
            .timeout_ms
            .take()
            .map_or(Backend::DEFAULT_TIMEOUT_MS, |timeout| timeout.value.0);
        if redis {
            let tls = match self.tls.take() {
                Some(Located { value, at }) => {
                    // Certificates on a plain URL would silently not be used.
                    let plain = |url: &Secret| !url.expose().starts_with("rediss://");
                    let all_plain = match &sentinel {
                        Some((sentinel, _)) => {
                            (url.expose().is_empty() || plain(&url))
                                && sentinel.nodes.iter().all(plain)
                        }
                        None => plain(&url) || seeds.iter().any(plain),
                    };
                    if all_plain {
                        return Err(at.fail(
                            "storage.tls is set but storage.url is not rediss://: write rediss://host:port so the connection is encrypted (a redis:// URL would talk in the clear and ignore these certificates)",
                        ));
                    }
                    Some(value.build(&at, source)?)
                }
                None => None,
            };
            return Ok(Backend::Redis {
                url,
                timeout_ms,
                cluster,
                cluster_seeds: seeds,
                tls,
                sentinel: sentinel.map(|(sentinel, _)| sentinel),
                local_deny_cache: self.local_deny_cache.take().is_none_or(|on| on.value),
            });
        }
        let mut schema = Backend::DEFAULT_SCHEMA.to_string();
        if let Some(Located { value: name, at }) = self.schema.take() {
            if !postgres::is_plain_schema_name(&name) {
                return Err(at.fail(format!(
                    "schema `{}` is not a plain lowercase PostgreSQL identifier: {}, e.g. `schema: sluice`",
                    shorten(&name),
                    postgres::SCHEMA_NAME_RULE
                )));
            }
            schema = name;
        }
        let pool_size = self
            .pool_size
            .take()
            .map_or(Backend::DEFAULT_POOL_SIZE, |pool| {
                usize::try_from(pool.value.0).unwrap_or(Backend::MAX_POOL_SIZE)
            });
        Ok(Backend::Postgres {
            url,
            schema,
            pool_size,
            timeout_ms,
            migrate: self.migrate.take().is_none_or(|migrate| migrate.value),
            unlogged: self.unlogged.take().is_some_and(|unlogged| unlogged.value),
        })
    }
}

const REDIS_URL_EXAMPLE: &str = "redis://127.0.0.1:6379";
const POSTGRES_URL_EXAMPLE: &str = "postgres://sluice:${SLUICE_PG_PASSWORD}@127.0.0.1:5432/sluice";

/// A Redis or PostgreSQL URL, kept secret: the value may hold a password, so it never
/// goes into a message.
pub(crate) fn store_url(url: &Located<String>, redis: bool) -> Result<Secret, Fail> {
    let (schemes, kind, example): (&[&str], &str, String) = if redis {
        (
            sluice_store_rules::redis::URL_SCHEMES,
            "a Redis URL",
            format!("{REDIS_URL_EXAMPLE} (or rediss:// for TLS)"),
        )
    } else {
        (
            postgres::URL_SCHEMES,
            "a PostgreSQL URL",
            POSTGRES_URL_EXAMPLE.to_string(),
        )
    };
    let text = url.value.trim();
    // The store's own rule, and more: something after the scheme.
    let scheme_ok = after_scheme(text, schemes).is_some_and(|rest| !rest.is_empty());
    if !scheme_ok {
        let field = &url.at.path;
        return Err(url.at.fail(format!(
            "storage.{} must be {kind} such as {example}",
            field.strip_prefix("storage.").unwrap_or(field)
        )));
    }
    Ok(Secret::new(text))
}

impl HttpSection {
    fn build(self) -> HttpConfig {
        let size = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        let mut http = HttpConfig::default();
        if let Some(value) = self.max_body_bytes {
            http.max_body_bytes = size(value.0);
        }
        if let Some(value) = self.threads {
            http.threads = size(value.0);
        }
        if let Some(value) = self.header_read_timeout_ms {
            http.header_read_timeout_ms = value.0;
        }
        if let Some(value) = self.body_read_timeout_ms {
            http.body_read_timeout_ms = value.0;
        }
        if let Some(value) = self.idle_timeout_ms {
            http.idle_timeout_ms = value.0;
        }
        if let Some(value) = self.max_connections {
            http.max_connections = size(value.0);
        }
        if let Some(value) = self.shutdown_timeout_ms {
            http.shutdown_timeout_ms = value.0;
        }
        http
    }
}

impl Limits {
    fn build(&self, at: &Place) -> Result<LimitSet, Fail> {
        let limits = self
            .0
            .iter()
            .map(|(name, limit)| build_limit_with_plans(name, limit.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        LimitSet::new(limits).map_err(|error| at.fail(error.to_string()))
    }
}

/// A limit and its `plans:`, each plan built as a limit of its own and named after it.
fn build_limit_with_plans(
    name: &Located<String>,
    limit: Option<&LimitSection>,
) -> Result<Limit, Fail> {
    let built = build_limit(name, limit)?;
    let Some(plans) = limit.and_then(|l| l.plans.as_ref()) else {
        return Ok(built);
    };
    let mut named = Vec::with_capacity(plans.value.0.len());
    for (plan, section) in &plans.value.0 {
        if section.as_ref().is_some_and(|s| s.plans.is_some()) {
            return Err(plan.at.fail(
                "a plan cannot have plans of its own: list every plan under the limit's `plans:`",
            ));
        }
        let valid = !plan.value.is_empty()
            && plan.value.len() <= 32
            && plan
                .value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(plan
                .at
                .fail(LimitError::BadPlanName(plan.value.clone()).to_string()));
        }
        named.push((plan.value.clone(), build_limit(plan, section.as_ref())?));
    }
    built
        .with_plans(named)
        .map_err(|error| plans.at.fail(error.to_string()))
}

/// One limit, with the engine's errors placed at the field they are about.
fn build_limit(name: &Located<String>, limit: Option<&LimitSection>) -> Result<Limit, Fail> {
    let example = format!("e.g. `{}: {{rate: 5/minute}}`", shorten(&name.value));
    let Some(limit) = limit else {
        return Err(name
            .at
            .fail(format!("limit has no settings: give it a rate, {example}")));
    };
    if let Some(slots) = &limit.concurrency {
        let mut spec = LimitSpec::concurrency(slots.value.0);
        spec.shadow = limit.shadow.unwrap_or(false);
        let extra = [
            limit.rate.as_ref().map(|r| (&r.at, "rate")),
            limit.algorithm.as_ref().map(|a| (&a.at, "algorithm")),
            limit.burst.as_ref().map(|b| (&b.at, "burst")),
        ];
        if let Some((at, field)) = extra.into_iter().flatten().next() {
            return Err(at.fail(format!(
                "`{field}` does not apply to a concurrency limit: a limit counts either calls in flight (concurrency) or a rate; put the rate in a separate limit"
            )));
        }
        if limit.charge_denied == Some(true) {
            return Err(name.at.fail(
                "charge_denied does not apply to a concurrency limit: a denied call holds no slot; remove it",
            ));
        }
        return Limit::new(&name.value, spec).map_err(|error| slots.at.fail(error.to_string()));
    }
    let Some(rate) = &limit.rate else {
        return Err(name.at.fail(format!(
            "missing field `rate`: a limit needs at least one rate, {example} (or `concurrency: N` for calls in flight)"
        )));
    };
    let rates = &rate.value.0;
    let mut spec = LimitSpec::new(rates.iter().map(|rate| rate.value.0).collect());
    if let Some(algorithm) = &limit.algorithm {
        spec.algorithm = algorithm.value.0;
    }
    spec.burst = limit.burst.as_ref().map(|burst| burst.value.0);
    spec.charge_denied = limit.charge_denied.unwrap_or(false);
    spec.shadow = limit.shadow.unwrap_or(false);
    Limit::new(&name.value, spec).map_err(|error| {
        let burst = limit.burst.as_ref().map(|burst| &burst.at);
        let at = match &error {
            // The later of the two rates sharing a period.
            LimitError::SamePeriod(_, second) => rates
                .iter()
                .rev()
                .find(|r| r.value.0 == *second)
                .map(|r| &r.at),
            // At the rate: it is what asks for a fixed window, whether or not the
            // algorithm was written.
            LimitError::RateTooFine(rate) | LimitError::CalendarMonthNeedsFixedWindow(rate, _) => {
                rates.iter().find(|r| r.value.0 == *rate).map(|r| &r.at)
            }
            LimitError::NoRates => Some(&rate.at),
            LimitError::BurstNeedsGcra(_)
            | LimitError::BurstNeedsOneRate
            | LimitError::BadBurst(_) => burst,
            LimitError::UnknownAlgorithm(_) => limit.algorithm.as_ref().map(|a| &a.at),
            LimitError::BadName(_)
            | LimitError::DuplicateName(_)
            | LimitError::BadConcurrency(_)
            | LimitError::ConcurrencyWithRates
            | LimitError::BadPlanName(_)
            | LimitError::DuplicatePlan(_) => None,
        };
        at.unwrap_or(&name.at).fail(error.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Origin;

    #[test]
    fn origin_is_reported_for_env_values() {
        let origin = Origin::Env {
            var: "SLUICE_LISTEN".to_string(),
        };
        let fail = Fail::new(&origin, "listen", "bad");
        let error = fail.into_error("f.yaml");
        assert_eq!(error.to_string(), "SLUICE_LISTEN (overrides listen): bad");
    }

    /// `SLUICE_*` overrides address the sections `File` reads: the two lists agree.
    #[test]
    fn overrides_know_every_section() {
        let root = crate::tree::parse("unknown_section: 1", None)
            .unwrap()
            .unwrap();
        let error = from_node::<File>(&root, "").err().unwrap();
        let listed: Vec<String> = crate::overrides::TOP_LEVEL
            .iter()
            .map(|name| format!("`{name}`"))
            .collect();
        assert!(
            error.message.ends_with(&listed.join(", ")),
            "{}",
            error.message
        );
    }
}
