//! From the document tree to typed, validated config, with every error placed at its node.

use std::net::SocketAddr;
use std::str::FromStr;

use sluice_engine::{Algorithm, Limit, LimitError, LimitSet, LimitSpec, Rate};
use sluice_store_rules::{after_scheme, postgres};

use crate::error::{Fail, join};
use crate::front_door;
use crate::overrides::TOP_LEVEL;
use crate::tree::{Entry, Kind, Node, Scalar, Value, parse_int};
use crate::{AdminConfig, Backend, Config, HttpConfig, OnError, Secret, StorageConfig};

const ADMIN_FIELDS: &[&str] = &["token", "listen"];
const STORAGE_FIELDS: &[&str] = &[
    "backend",
    "max_keys",
    "on_error",
    "prefix",
    "sweep_interval_ms",
    "path",
    "sync",
    "url",
    "timeout_ms",
    "cluster",
    "schema",
    "pool_size",
    "migrate",
    "unlogged",
];
const HTTP_FIELDS: &[&str] = &[
    "max_body_bytes",
    "threads",
    "header_read_timeout_ms",
    "idle_timeout_ms",
    "max_connections",
    "shutdown_timeout_ms",
];
const LIMIT_FIELDS: &[&str] = &["rate", "algorithm", "burst", "charge_denied", "shadow"];

/// The fields of a mapping, checked against the known ones.
pub(crate) struct Fields<'a> {
    entries: &'a [Entry],
    path: String,
}

impl<'a> Fields<'a> {
    /// `node`'s fields; `None` when the section is null (absent). Unknown keys are errors.
    pub(crate) fn of(node: &'a Node, path: &str, known: &[&str]) -> Result<Option<Self>, Fail> {
        if node.is_null() {
            return Ok(None);
        }
        let Value::Map(entries) = &node.value else {
            if path.is_empty() {
                return Err(Fail::new(
                    &node.origin,
                    path,
                    format!(
                        "the config must be a mapping of settings ({}), found {}",
                        known.join(", "),
                        node.describe()
                    ),
                ));
            }
            let example = match known.first() {
                Some(first) => format!(", e.g. `{first}: ...`"),
                None => String::new(),
            };
            return Err(Fail::new(
                &node.origin,
                path,
                format!(
                    "expected a mapping of fields{example}, found {}",
                    node.describe()
                ),
            ));
        };
        if let Some(entry) = entries
            .iter()
            .find(|entry| !known.contains(&entry.key.as_str()))
        {
            let expected = known
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(Fail::new(
                &entry.key_origin,
                &join(path, &entry.key),
                format!(
                    "unknown field `{}`, expected one of {expected}",
                    crate::tree::shorten(&entry.key)
                ),
            ));
        }
        Ok(Some(Fields {
            entries,
            path: path.to_string(),
        }))
    }

    /// The field's value and path, unless absent or null.
    pub(crate) fn get(&self, name: &str) -> Option<(&'a Node, String)> {
        self.entries
            .iter()
            .find(|entry| entry.key == name && !entry.value.is_null())
            .map(|entry| (&entry.value, join(&self.path, name)))
    }
}

/// Any non-null scalar, as its text (so `prefix: 123` is the string "123").
pub(crate) fn string<'a>(node: &'a Node, path: &str) -> Result<&'a str, Fail> {
    match &node.value {
        Value::Scalar(Scalar { text, kind }) if *kind != Kind::Null => Ok(text),
        _ => Err(Fail::new(
            &node.origin,
            path,
            format!("expected a string, found {}", node.describe()),
        )),
    }
}

/// A whole number in `min..=max`.
pub(crate) fn whole(node: &Node, path: &str, min: u64, max: u64) -> Result<u64, Fail> {
    let fail = |message: String| Fail::new(&node.origin, path, message);
    let range = || {
        if max == u64::MAX {
            format!("at least {min}")
        } else {
            format!("from {min} to {max}")
        }
    };
    match &node.value {
        Value::Scalar(Scalar {
            text,
            kind: Kind::Int,
        }) => {
            let value = parse_int(text)
                .and_then(|value| u64::try_from(value).ok())
                .filter(|value| (min..=max).contains(value));
            value.ok_or_else(|| fail(format!("must be {}, found {text}", range())))
        }
        Value::Scalar(Scalar {
            text,
            kind: Kind::Str,
        }) if parse_int(text.trim()).is_some() => Err(fail(format!(
            "expected a number, found the string `{text}`: remove the quotes"
        ))),
        _ => Err(fail(format!(
            "expected a whole number {}, found {}",
            range(),
            node.describe()
        ))),
    }
}

/// `true` or `false`.
pub(crate) fn boolean(node: &Node, path: &str) -> Result<bool, Fail> {
    match &node.value {
        Value::Scalar(Scalar {
            kind: Kind::Bool(value),
            ..
        }) => Ok(*value),
        _ => Err(Fail::new(
            &node.origin,
            path,
            format!("expected true or false, found {}", node.describe()),
        )),
    }
}

/// The whole config from the document's root.
pub(crate) fn config(root: &Node, source: &str) -> Result<Config, Fail> {
    let mut config = Config::default();
    let Some(fields) = Fields::of(root, "", TOP_LEVEL)? else {
        return Ok(config);
    };
    if let Some((node, path)) = fields.get("listen") {
        config.listen = listen(node, &path)?;
    }
    if let Some((node, path)) = fields.get("admin") {
        config.admin = admin(node, &path)?;
    }
    if let Some((node, path)) = fields.get("storage") {
        config.storage = storage(node, &path)?;
    }
    if let Some((node, path)) = fields.get("limits") {
        config.limits = limits(node, &path)?;
    }
    if let Some((node, path)) = fields.get("http") {
        config.http = http(node, &path)?;
    }
    if let Some((node, path)) = fields.get("client_ip") {
        config.client_ip = front_door::client_ip(node, &path)?;
    }
    if let Some((node, path)) = fields.get("responses") {
        config.responses = front_door::responses(node, &path)?;
    }
    if let Some((node, path)) = fields.get("forward_auth") {
        config.forward_auth = front_door::forward_auth(node, &path)?;
    }
    // After `admin`: `proxy.sluice_endpoints: admin` needs `admin.listen`.
    if let Some((node, path)) = fields.get("proxy") {
        config.proxy = Some(crate::proxy::proxy(node, &path, &config.admin)?);
    }
    if let Some((node, path)) = fields.get("sessions") {
        if config.proxy.is_none() {
            return Err(Fail::new(
                &node.origin,
                &path,
                "sessions are issued by the reverse proxy, which is not configured: add a `proxy:` section with an upstream, or remove sessions",
            ));
        }
        config.sessions = crate::proxy::sessions(node, &path)?;
    }
    // After `limits` and `proxy`, wherever each is in the file: routes name limits, and
    // `{session}` needs the proxy's cookies.
    if let Some((node, path)) = fields.get("routes") {
        config.routes = front_door::routes(node, &path, &config.limits, config.proxy.is_some())?;
    }
    if let Some((node, path)) = fields.get("envoy") {
        config.envoy = crate::envoy::envoy(node, &path, source)?;
        let taken = config
            .envoy
            .iter()
            .flat_map(|envoy| envoy.domains.limits().iter());
        if let Some(limit) = taken
            .into_iter()
            .find(|l| config.limits.get(l.name()).is_some())
        {
            let (node, path) = fields.get("limits").unwrap_or((node, path));
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "limit `{}` has the name sluice gives an envoy descriptor rule: rename the limit (names starting with `envoy.` are best left to the envoy section)",
                    limit.name()
                ),
            ));
        }
    }
    Ok(config)
}

pub(crate) fn listen(node: &Node, path: &str) -> Result<SocketAddr, Fail> {
    let hint = "write IP:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080";
    if let Value::Scalar(Scalar {
        text,
        kind: Kind::Int,
    }) = &node.value
    {
        return Err(Fail::new(
            &node.origin,
            path,
            format!(
                "`{text}` is a port without an address: {hint} (use 0.0.0.0 to listen on every interface)"
            ),
        ));
    }
    let text = string(node, path)
        .map_err(|fail| Fail {
            message: format!("{}: {hint}", fail.message),
            ..fail
        })?
        .trim();
    let parsed = match text.strip_prefix("localhost:") {
        Some(port) => SocketAddr::from_str(&format!("127.0.0.1:{port}")),
        None => SocketAddr::from_str(text),
    };
    parsed.map_err(|_| {
        Fail::new(
            &node.origin,
            path,
            format!(
                "`{}` is not an address to listen on: {hint}",
                crate::tree::shorten(text)
            ),
        )
    })
}

fn admin(node: &Node, path: &str) -> Result<AdminConfig, Fail> {
    let mut admin = AdminConfig::default();
    let Some(fields) = Fields::of(node, path, ADMIN_FIELDS)? else {
        return Ok(admin);
    };
    if let Some((node, path)) = fields.get("token") {
        let token = string(node, &path)?;
        if token.is_empty() {
            return Err(Fail::new(
                &node.origin,
                &path,
                "admin.token is empty: set it or remove it",
            ));
        }
        if token.trim().is_empty() {
            return Err(Fail::new(
                &node.origin,
                &path,
                "admin.token is only whitespace: set a random token of at least 16 bytes (e.g. `openssl rand -hex 32`) or remove it",
            ));
        }
        // Admin calls reset counters and reload the config: a guessable token is no lock.
        if token.trim().len() < AdminConfig::MIN_TOKEN_BYTES {
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "admin.token is {} bytes, shorter than {}: use a random token (e.g. `openssl rand -hex 32`)",
                    token.trim().len(),
                    AdminConfig::MIN_TOKEN_BYTES
                ),
            ));
        }
        admin.token = Some(Secret::new(token));
    }
    if let Some((node, path)) = fields.get("listen") {
        admin.listen = Some(listen(node, &path)?);
    }
    Ok(admin)
}

fn storage(node: &Node, path: &str) -> Result<StorageConfig, Fail> {
    let mut storage = StorageConfig::default();
    let Some(fields) = Fields::of(node, path, STORAGE_FIELDS)? else {
        return Ok(storage);
    };
    let backend = fields.get("backend");
    if let Some((node, path)) = &backend {
        storage.backend = match string(node, path)? {
            "memory" => Backend::Memory,
            "disk" => Backend::Disk,
            // Filled in from url, timeout_ms and the backend's own fields below.
            "redis" => Backend::Redis {
                url: Secret::new(""),
                timeout_ms: Backend::DEFAULT_TIMEOUT_MS,
                cluster: false,
                cluster_seeds: Vec::new(),
            },
            "postgres" => Backend::Postgres {
                url: Secret::new(""),
                schema: Backend::DEFAULT_SCHEMA.to_string(),
                pool_size: Backend::DEFAULT_POOL_SIZE,
                timeout_ms: Backend::DEFAULT_TIMEOUT_MS,
                migrate: true,
                unlogged: false,
            },
            other => {
                return Err(Fail::new(
                    &node.origin,
                    path,
                    format!(
                        "unknown storage backend `{}`: use memory, disk, redis or postgres",
                        crate::tree::shorten(other)
                    ),
                ));
            }
        };
    }
    let data_path = fields.get("path");
    if let Some((node, path)) = &data_path {
        let text = string(node, path)?;
        if text.trim().is_empty() {
            return Err(Fail::new(
                &node.origin,
                path,
                "storage.path is empty: give the disk store's data directory, e.g. /var/lib/sluice",
            ));
        }
        storage.path = Some(text.into());
    }
    let sync = fields.get("sync");
    if let Some((node, path)) = &sync {
        storage.sync = boolean(node, path)?;
    }
    let backend_node = backend.as_ref().map_or(node, |(node, _)| *node);
    shared_store_fields(&mut storage, &fields, backend_node, path)?;
    let is_disk = storage.backend == Backend::Disk;
    match (&storage.backend, &backend, &data_path) {
        (Backend::Disk, Some((node, _)), None) => {
            return Err(Fail::new(
                &node.origin,
                &join(path, "path"),
                "backend disk needs a data directory: add `path: /var/lib/sluice` (any directory sluice may write) under storage",
            ));
        }
        (_, _, Some((node, field))) if !is_disk => {
            return Err(Fail::new(
                &node.origin,
                field,
                "storage.path only applies to backend disk: set `backend: disk` to keep counters there, or remove path",
            ));
        }
        _ => {}
    }
    if let (false, Some((node, field))) = (is_disk, &sync) {
        return Err(Fail::new(
            &node.origin,
            field,
            "storage.sync only applies to backend disk: set `backend: disk` and a path, or remove sync",
        ));
    }
    if let Some((node, path)) = fields.get("max_keys") {
        let max = usize::MAX as u64;
        storage.max_keys = usize::try_from(whole(node, &path, 1, max)?).unwrap_or(usize::MAX);
    }
    if let Some((node, path)) = fields.get("on_error") {
        let name = string(node, &path)?;
        storage.on_error = OnError::from_name(name).ok_or_else(|| {
            Fail::new(
                &node.origin,
                &path,
                format!(
                    "unknown on_error `{}`, expected one of `allow`, `deny`, `local`",
                    crate::tree::shorten(name)
                ),
            )
        })?;
    }
    if let Some((node, path)) = fields.get("prefix") {
        storage.prefix = string(node, &path)?.to_string();
    }
    if let Some((node, path)) = fields.get("sweep_interval_ms") {
        storage.sweep_interval_ms =
            whole(node, &path, StorageConfig::MIN_SWEEP_INTERVAL_MS, u64::MAX)?;
    }
    Ok(storage)
}

/// The fields of the shared stores (`url`, `timeout_ms`; Redis's `cluster`; PostgreSQL's
/// `schema`, `pool_size`, `migrate`, `unlogged`): required or refused depending on the
/// backend.
fn shared_store_fields(
    storage: &mut StorageConfig,
    fields: &Fields<'_>,
    backend_node: &Node,
    path: &str,
) -> Result<(), Fail> {
    for (field, backends) in [
        ("url", "redis or postgres"),
        ("timeout_ms", "redis or postgres"),
        ("cluster", "redis"),
        ("schema", "postgres"),
        ("pool_size", "postgres"),
        ("migrate", "postgres"),
        ("unlogged", "postgres"),
    ] {
        let applies = match &storage.backend {
            Backend::Redis { .. } => backends.contains("redis"),
            Backend::Postgres { .. } => backends.contains("postgres"),
            Backend::Memory | Backend::Disk => false,
        };
        if let (false, Some((node, path))) = (applies, fields.get(field)) {
            let first = backends.split(' ').next().unwrap_or(backends);
            return Err(Fail::new(
                &node.origin,
                &path,
                format!(
                    "storage.{field} only applies to backend {backends}: set `backend: {first}`, or remove it"
                ),
            ));
        }
    }
    let (name, example) = match &storage.backend {
        Backend::Redis { .. } => ("redis", REDIS_URL_EXAMPLE),
        Backend::Postgres { .. } => ("postgres", POSTGRES_URL_EXAMPLE),
        Backend::Memory | Backend::Disk => return Ok(()),
    };
    // Redis Cluster: `cluster: true`, or a list of seed nodes (the first stands in for
    // an absent `url`).
    let (mut cluster_flag, mut cluster_seeds) = (false, Vec::new());
    if let (Backend::Redis { .. }, Some((node, field))) = (&storage.backend, fields.get("cluster"))
    {
        (cluster_flag, cluster_seeds) = redis_cluster(node, &field)?;
    }
    let text = match fields.get("url") {
        Some((node, field)) => store_url(node, &field, name)?,
        None if !cluster_seeds.is_empty() => cluster_seeds.remove(0),
        None => {
            let cluster_hint = if name == "redis" {
                " (for a Redis Cluster, a node's url and `cluster: true`)"
            } else {
                ""
            };
            return Err(Fail::new(
                &backend_node.origin,
                &join(path, "url"),
                format!(
                    "backend {name} needs a url: add `url: {example}` under storage{cluster_hint}"
                ),
            ));
        }
    };
    let timeout = match fields.get("timeout_ms") {
        Some((node, field)) => Some(whole(node, &field, 1, Backend::MAX_TIMEOUT_MS)?),
        None => None,
    };
    match &mut storage.backend {
        Backend::Redis {
            url,
            timeout_ms,
            cluster,
            cluster_seeds: seeds,
        } => {
            *url = text;
            *timeout_ms = timeout.unwrap_or(*timeout_ms);
            *cluster = cluster_flag;
            *seeds = cluster_seeds;
        }
        Backend::Postgres {
            url,
            schema,
            pool_size,
            timeout_ms,
            migrate,
            unlogged,
        } => {
            *url = text;
            *timeout_ms = timeout.unwrap_or(*timeout_ms);
            if let Some((node, field)) = fields.get("schema") {
                let name = string(node, &field)?;
                if !postgres::is_plain_schema_name(name) {
                    return Err(Fail::new(
                        &node.origin,
                        &field,
                        format!(
                            "schema `{}` is not a plain lowercase PostgreSQL identifier: {}, e.g. `schema: sluice`",
                            crate::tree::shorten(name),
                            postgres::SCHEMA_NAME_RULE
                        ),
                    ));
                }
                *schema = name.to_string();
            }
            if let Some((node, field)) = fields.get("pool_size") {
                let value = whole(node, &field, 1, Backend::MAX_POOL_SIZE as u64)?;
                *pool_size = usize::try_from(value).unwrap_or(Backend::MAX_POOL_SIZE);
            }
            if let Some((node, field)) = fields.get("migrate") {
                *migrate = boolean(node, &field)?;
            }
            if let Some((node, field)) = fields.get("unlogged") {
                *unlogged = boolean(node, &field)?;
            }
        }
        Backend::Memory | Backend::Disk => {}
    }
    Ok(())
}

/// `storage.cluster`: `true`/`false`, or a list of Redis Cluster node URLs (a cluster).
fn redis_cluster(node: &Node, field: &str) -> Result<(bool, Vec<Secret>), Fail> {
    let Value::Seq(items) = &node.value else {
        let on = boolean(node, field).map_err(|_| {
            Fail::new(
                &node.origin,
                field,
                format!(
                    "storage.cluster is true, false or a list of node URLs, found {}",
                    node.describe()
                ),
            )
        })?;
        return Ok((on, Vec::new()));
    };
    if items.is_empty() {
        return Err(Fail::new(
            &node.origin,
            field,
            "storage.cluster lists no node: list at least one, e.g. [redis://10.0.0.1:7000], or write `cluster: true` to use storage.url",
        ));
    }
    let seeds = items
        .iter()
        .enumerate()
        .map(|(i, item)| store_url(item, &format!("{field}[{i}]"), "redis"))
        .collect::<Result<_, _>>()?;
    Ok((true, seeds))
}

const REDIS_URL_EXAMPLE: &str = "redis://127.0.0.1:6379";
const POSTGRES_URL_EXAMPLE: &str = "postgres://sluice:${SLUICE_PG_PASSWORD}@127.0.0.1:5432/sluice";

/// A store URL of backend `name` (`redis` or `postgres`), kept secret: the value may
/// hold a password, so it never goes into a message.
fn store_url(node: &Node, field: &str, name: &str) -> Result<Secret, Fail> {
    let (schemes, kind, example): (&[&str], &str, String) = if name == "redis" {
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
    let text = string(node, field)?.trim();
    // The store's own rule, and more: something after the scheme.
    let scheme_ok = after_scheme(text, schemes).is_some_and(|rest| !rest.is_empty());
    if !scheme_ok {
        return Err(Fail::new(
            &node.origin,
            field,
            format!(
                "storage.{} must be {kind} such as {example}",
                field.strip_prefix("storage.").unwrap_or(field)
            ),
        ));
    }
    Ok(Secret::new(text))
}

fn http(node: &Node, path: &str) -> Result<HttpConfig, Fail> {
    let mut http = HttpConfig::default();
    let Some(fields) = Fields::of(node, path, HTTP_FIELDS)? else {
        return Ok(http);
    };
    if let Some((node, path)) = fields.get("max_body_bytes") {
        let value = whole(
            node,
            &path,
            HttpConfig::MIN_MAX_BODY_BYTES as u64,
            HttpConfig::MAX_MAX_BODY_BYTES as u64,
        )?;
        http.max_body_bytes = usize::try_from(value).unwrap_or(HttpConfig::MAX_MAX_BODY_BYTES);
    }
    if let Some((node, path)) = fields.get("threads") {
        let value = whole(node, &path, 0, HttpConfig::MAX_THREADS as u64)?;
        http.threads = usize::try_from(value).unwrap_or(0);
    }
    if let Some((node, path)) = fields.get("header_read_timeout_ms") {
        http.header_read_timeout_ms =
            whole(node, &path, 1, HttpConfig::MAX_HEADER_READ_TIMEOUT_MS)?;
    }
    if let Some((node, path)) = fields.get("idle_timeout_ms") {
        http.idle_timeout_ms = whole(node, &path, 1, HttpConfig::MAX_IDLE_TIMEOUT_MS)?;
    }
    if let Some((node, path)) = fields.get("max_connections") {
        let value = whole(node, &path, 1, HttpConfig::MAX_MAX_CONNECTIONS as u64)?;
        http.max_connections =
            usize::try_from(value).unwrap_or(HttpConfig::DEFAULT_MAX_CONNECTIONS);
    }
    if let Some((node, path)) = fields.get("shutdown_timeout_ms") {
        http.shutdown_timeout_ms = whole(node, &path, 0, HttpConfig::MAX_SHUTDOWN_TIMEOUT_MS)?;
    }
    Ok(http)
}

fn limits(node: &Node, path: &str) -> Result<LimitSet, Fail> {
    if node.is_null() {
        return Ok(LimitSet::default());
    }
    let Value::Map(entries) = &node.value else {
        return Err(Fail::new(
            &node.origin,
            path,
            format!(
                "expected a mapping of limit names to settings, e.g. `chat_user: {{rate: 5/minute}}`, found {}",
                node.describe()
            ),
        ));
    };
    let limits = entries
        .iter()
        .map(|entry| limit(entry, &join(path, &entry.key)))
        .collect::<Result<Vec<_>, _>>()?;
    LimitSet::new(limits).map_err(|error| Fail::new(&node.origin, path, error.to_string()))
}

/// One rate and where it was written.
struct RateAt<'a> {
    rate: Rate,
    node: &'a Node,
    path: String,
}

fn limit(entry: &Entry, path: &str) -> Result<Limit, Fail> {
    let name = entry.key.as_str();
    let example = format!("e.g. `{}: {{rate: 5/minute}}`", crate::tree::shorten(name));
    let Some(fields) = Fields::of(&entry.value, path, LIMIT_FIELDS)? else {
        return Err(Fail::new(
            &entry.key_origin,
            path,
            format!("limit has no settings: give it a rate, {example}"),
        ));
    };

    let Some((rate_node, rate_path)) = fields.get("rate") else {
        return Err(Fail::new(
            &entry.key_origin,
            path,
            format!("missing field `rate`: a limit needs at least one rate, {example}"),
        ));
    };
    let rates = rates(rate_node, &rate_path)?;

    let mut spec = LimitSpec::new(rates.iter().map(|at| at.rate).collect());
    let algorithm = fields.get("algorithm");
    if let Some((node, path)) = &algorithm {
        spec.algorithm = Algorithm::from_str(string(node, path)?)
            .map_err(|error| Fail::new(&node.origin, path, error.to_string()))?;
    }
    let burst = fields.get("burst");
    if let Some((node, path)) = &burst {
        spec.burst = Some(whole(node, path, 1, u64::MAX)?);
    }
    if let Some((node, path)) = fields.get("charge_denied") {
        spec.charge_denied = boolean(node, &path)?;
    }
    if let Some((node, path)) = fields.get("shadow") {
        spec.shadow = boolean(node, &path)?;
    }

    Limit::new(name, spec).map_err(|error| {
        let message = error.to_string();
        let at_rate = |pick: &dyn Fn(&RateAt<'_>) -> bool| {
            rates
                .iter()
                .find(|at| pick(at))
                .map(|at| Fail::new(&at.node.origin, &at.path, message.clone()))
        };
        let at_field = |field: &Option<(&Node, String)>| {
            field
                .as_ref()
                .map(|(node, path)| Fail::new(&node.origin, path, message.clone()))
        };
        let placed = match &error {
            LimitError::SamePeriod(_, second) => {
                // The later of the two rates sharing a period.
                rates
                    .iter()
                    .rev()
                    .find(|at| at.rate == *second)
                    .map(|at| Fail::new(&at.node.origin, &at.path, message.clone()))
            }
            LimitError::RateTooFine(rate) => at_rate(&|at| at.rate == *rate),
            LimitError::NoRates => Some(Fail::new(&rate_node.origin, &rate_path, message.clone())),
            LimitError::BurstNeedsGcra(_)
            | LimitError::BurstNeedsOneRate
            | LimitError::BadBurst(_) => at_field(&burst),
            LimitError::UnknownAlgorithm(_) => at_field(&algorithm),
            LimitError::BadName(_) | LimitError::DuplicateName(_) => None,
        };
        placed.unwrap_or_else(|| Fail::new(&entry.key_origin, path, message))
    })
}

/// `rate: 5/minute` or `rate: [5/minute, 60/hour]`.
fn rates<'a>(node: &'a Node, path: &str) -> Result<Vec<RateAt<'a>>, Fail> {
    let one = |node: &'a Node, path: String| -> Result<RateAt<'a>, Fail> {
        let text = match &node.value {
            Value::Scalar(Scalar { text, kind }) if *kind != Kind::Null => text,
            _ => {
                return Err(Fail::new(
                    &node.origin,
                    &path,
                    format!(
                        "expected a rate such as 5/minute, found {}",
                        node.describe()
                    ),
                ));
            }
        };
        let rate = Rate::from_str(text)
            .map_err(|error| Fail::new(&node.origin, &path, error.to_string()))?;
        Ok(RateAt { rate, node, path })
    };
    match &node.value {
        Value::Seq(items) if items.is_empty() => Err(Fail::new(
            &node.origin,
            path,
            LimitError::NoRates.to_string(),
        )),
        Value::Seq(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| one(item, format!("{path}[{i}]")))
            .collect(),
        _ => Ok(vec![one(node, path.to_string())?]),
    }
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
}
