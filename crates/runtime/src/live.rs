//! The configuration a running server swaps on reload, and the reload itself.
//!
//! Every request reads one [`Live`] snapshot, so it sees one whole configuration; a
//! reload validates the new file completely and swaps the snapshot in one step. Counters
//! live in the store, keyed by limit name, algorithm and period, so limits that did not
//! change keep theirs. Settings bound at start (addresses, storage, threads) are not
//! changed by a reload: it applies the rest and says which need a restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use serde_json::{Value, json};
use sluice_config::{Config, ProxyConfig, Secret, SluiceEndpoints, StorageConfig};
use sluice_engine::LimitSet;
use sluice_http::{ClientIpResolver, HttpPolicy, Sessions};

use crate::metrics::Metrics;

/// What a request reads: the parts of the config a reload can change.
#[derive(Debug)]
pub struct Live {
    /// Increments with every successful reload; 1 at start.
    pub version: u64,
    /// The limits.
    pub limits: LimitSet,
    /// Routes, client identity and answers.
    pub policy: HttpPolicy,
    /// The admin bearer token; `None` disables admin calls.
    pub admin_token: Option<Secret>,
    /// `/v1/forward-auth`'s own deny status.
    pub forward_auth_deny_status: Option<StatusCode>,
    /// The largest request body read.
    pub max_body_bytes: usize,
    /// How long the body of a request to sluice's own JSON endpoints may take.
    pub body_read_timeout: std::time::Duration,
    /// The Envoy rate limit service's descriptors and answer settings, when configured.
    pub envoy: Option<sluice_config::EnvoyConfig>,
    /// The reverse proxy, when configured.
    pub proxy: Option<ProxyConfig>,
    /// Session cookies, when the proxy runs and a route keys by `{session}`.
    pub sessions: Option<Sessions>,
}

impl Live {
    /// The live part of `config`, as `version`. Sessions without a configured secret are
    /// signed with a random one made here (see [`LiveConfig`], which keeps one per start).
    pub fn from_config(config: &Config, version: u64) -> Self {
        let secret = sluice_http::session::random_bytes::<32>().ok();
        Self::with_session_secret(config, version, secret.as_ref().map(|s| &s[..]))
    }

    /// The live part of `config`, signing sessions with `fallback_secret` unless the
    /// config names its own (with neither, no sessions are issued and `{session}` never
    /// resolves).
    pub fn with_session_secret(
        config: &Config,
        version: u64,
        fallback_secret: Option<&[u8]>,
    ) -> Self {
        let sessions = (config.proxy.is_some() && config.routes.uses_session())
            .then(|| {
                let secret = match &config.sessions.secret {
                    Some(secret) => secret.expose().as_bytes(),
                    None => fallback_secret?,
                };
                Sessions::new(secret, config.sessions.cookie.clone()).ok()
            })
            .flatten();
        Live {
            version,
            limits: config.limits.clone(),
            policy: HttpPolicy {
                rules: config.routes.clone(),
                client_ip: ClientIpResolver::new(config.client_ip.clone()),
                responses: config.responses.clone(),
                identity: config.identity.clone(),
                plan_from: config.plan_from.clone(),
            },
            admin_token: config.admin.token.clone(),
            forward_auth_deny_status: config.forward_auth.deny_status,
            max_body_bytes: config.http.max_body_bytes,
            body_read_timeout: std::time::Duration::from_millis(config.http.body_read_timeout_ms),
            envoy: config.envoy.clone(),
            proxy: config.proxy.clone(),
            sessions,
        }
    }
}

/// Every limit `config` decides with: the named `limits:` and the Envoy descriptor rules.
pub fn every_limit(config: &Config) -> impl Iterator<Item = &std::sync::Arc<sluice_engine::Limit>> {
    config.limits.iter().chain(
        config
            .envoy
            .iter()
            .flat_map(|envoy| envoy.domains.limits().iter()),
    )
}

/// Settings bound when the server started.
#[derive(Debug, Clone, PartialEq)]
struct StartupSettings {
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    storage: StorageConfig,
    threads: usize,
    /// `http.header_read_timeout_ms`, `idle_timeout_ms`, `max_connections` and
    /// `shutdown_timeout_ms`: the listeners' bounds.
    connection_bounds: [(&'static str, u64); 4],
    envoy_listen: Option<SocketAddr>,
    /// Whether requests go to an upstream, and where sluice's own endpoints are: the
    /// router is built from these once.
    proxy_routing: Option<SluiceEndpoints>,
    proxy_connect_timeout_ms: Option<u64>,
    /// Whether top keys are tracked, and in how many counters: the sketches are made
    /// once.
    stats: sluice_config::StatsConfig,
}

impl StartupSettings {
    fn of(config: &Config) -> Self {
        StartupSettings {
            listen: config.listen,
            admin_listen: config.admin.listen,
            storage: config.storage.clone(),
            threads: config.http.threads,
            connection_bounds: [
                (
                    "http.header_read_timeout_ms",
                    config.http.header_read_timeout_ms,
                ),
                ("http.idle_timeout_ms", config.http.idle_timeout_ms),
                ("http.max_connections", config.http.max_connections as u64),
                ("http.shutdown_timeout_ms", config.http.shutdown_timeout_ms),
            ],
            envoy_listen: config.envoy.as_ref().map(|envoy| envoy.listen),
            proxy_routing: config.proxy.as_ref().map(|p| p.sluice_endpoints.clone()),
            proxy_connect_timeout_ms: config.proxy.as_ref().map(|p| p.connect_timeout_ms),
            stats: config.stats,
        }
    }

    /// The fields of `new` that differ and only a restart applies.
    fn needing_restart(&self, new: &StartupSettings) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.listen != new.listen {
            fields.push("listen");
        }
        if self.admin_listen != new.admin_listen {
            fields.push("admin.listen");
        }
        if self.storage != new.storage {
            fields.push("storage");
        }
        if self.threads != new.threads {
            fields.push("http.threads");
        }
        for ((name, old), (_, new)) in self.connection_bounds.iter().zip(&new.connection_bounds) {
            if old != new {
                fields.push(*name);
            }
        }
        if self.envoy_listen != new.envoy_listen {
            fields.push("envoy.listen");
        }
        if self.proxy_routing.is_some() != new.proxy_routing.is_some() {
            fields.push("proxy");
        } else if self.proxy_routing != new.proxy_routing {
            fields.push("proxy.sluice_endpoints");
        }
        if self.proxy_routing.is_some()
            && new.proxy_routing.is_some()
            && self.proxy_connect_timeout_ms != new.proxy_connect_timeout_ms
        {
            fields.push("proxy.connect_timeout_ms");
        }
        if self.stats != new.stats {
            fields.push("stats");
        }
        fields
    }
}

#[derive(Debug, Clone)]
struct ReloadRecord {
    at: SystemTime,
    error: Option<String>,
}

#[derive(Debug)]
struct ReloadLog {
    loaded_at: SystemTime,
    last: Option<ReloadRecord>,
    restart_required: Vec<&'static str>,
}

/// The live configuration, its source file and the reload history.
pub struct LiveConfig {
    current: ArcSwap<Live>,
    /// Signs sessions when the config names no secret: made once per start, so a reload
    /// keeps every session valid.
    session_secret: Option<[u8; 32]>,
    path: Option<PathBuf>,
    startup: StartupSettings,
    log: Mutex<ReloadLog>,
}

/// Why a reload was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadError(pub String);

impl LiveConfig {
    /// The configuration the server started with, read from `path` (if any).
    pub fn new(config: &Config, path: Option<PathBuf>) -> Self {
        let session_secret = match sluice_http::session::random_bytes::<32>() {
            Ok(secret) => Some(secret),
            Err(error) => {
                tracing::error!(%error, "no random source for a session secret: set sessions.secret, or {{session}} keys will not resolve");
                None
            }
        };
        let live = Live::with_session_secret(config, 1, session_secret.as_ref().map(|s| &s[..]));
        if live.sessions.is_some() && config.sessions.secret.is_none() {
            tracing::warn!(
                "sessions.secret is not set: session cookies are signed with a random secret made at start, so every session resets when sluice restarts and sessions are not shared between instances; set sessions.secret (at least 16 bytes) to keep them"
            );
        }
        LiveConfig {
            session_secret,
            current: ArcSwap::from_pointee(live),
            path,
            startup: StartupSettings::of(config),
            log: Mutex::new(ReloadLog {
                loaded_at: SystemTime::now(),
                last: None,
                restart_required: Vec::new(),
            }),
        }
    }

    /// The snapshot a request works with.
    pub fn load(&self) -> Arc<Live> {
        self.current.load_full()
    }

    /// Reads the config file again and, if it is valid, swaps it in; otherwise keeps the
    /// running config. Serialised: concurrent reloads (SIGHUP, file change, admin call)
    /// happen one after the other.
    pub fn reload(&self, metrics: &Metrics) -> Result<u64, ReloadError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(path) = &self.path else {
            return Err(ReloadError(
                "the server was not started from a config file".into(),
            ));
        };
        let at = SystemTime::now();
        let config = match sluice_config::load(path) {
            Ok(config) => config,
            Err(error) => {
                let message = error.to_string();
                tracing::error!(error = %message, "config reload rejected; the running config stays");
                log.last = Some(ReloadRecord {
                    at,
                    error: Some(message.clone()),
                });
                return Err(ReloadError(message));
            }
        };
        let restart = self.startup.needing_restart(&StartupSettings::of(&config));
        if !restart.is_empty() {
            tracing::warn!(fields = ?restart, "these settings change only on restart; the rest of the new config is applied");
        }
        let running = self.current.load();
        if let (Some(new), Some(old)) = (&config.identity, &running.policy.identity) {
            new.keep_fetched_keys_of(old);
        }
        let version = running.version + 1;
        metrics.track_limits(every_limit(&config));
        self.current.store(Arc::new(Live::with_session_secret(
            &config,
            version,
            self.session_secret.as_ref().map(|s| &s[..]),
        )));
        tracing::info!(
            version,
            limits = config.limits.len(),
            routes = config.routes.len(),
            envoy_domains = config.envoy.as_ref().map_or(0, |envoy| envoy.domains.len()),
            "config reloaded"
        );
        log.loaded_at = at;
        log.last = Some(ReloadRecord { at, error: None });
        log.restart_required = restart;
        Ok(version)
    }

    /// `GET /v1/status`'s answer.
    pub fn status(&self) -> Value {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let time = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        json!({
            "config_version": self.current.load().version,
            "config_path": self.path.as_ref().map(|p| p.display().to_string()),
            "loaded_at": time(log.loaded_at),
            "last_reload": log.last.as_ref().map(|r| json!({
                "at": time(r.at),
                "ok": r.error.is_none(),
                "error": r.error,
            })),
            "restart_required": log.restart_required,
        })
    }
}
