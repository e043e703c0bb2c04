//! Opening the configured store: memory, disk, Redis (single or cluster) or
//! PostgreSQL, the shared ones wrapped in the `on_error` failure policy.
use std::sync::Arc;
use std::time::Duration;

use sluice_config::{Backend, Config};
use sluice_engine::Store;
use sluice_store_disk::{DiskStore, DiskStoreConfig};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};
use sluice_store_policy::{PolicyConfig, PolicyStore};
use sluice_store_postgres::{PostgresStore, PostgresStoreConfig, PostgresStoreError};
use sluice_store_redis::{RedisStore, RedisStoreConfig, SentinelSettings, TlsSettings};

/// The store `config.storage` names, ready to decide (a shared store that is down at
/// start is opened lazily: `on_error` decides until it answers).
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let memory = MemoryStoreConfig {
        max_keys: config.storage.max_keys,
        sweep_interval: Duration::from_millis(config.storage.sweep_interval_ms),
    };
    Ok(match &config.storage.backend {
        Backend::Redis {
            url,
            timeout_ms,
            cluster,
            cluster_seeds,
            tls,
            sentinel,
            local_deny_cache,
        } => {
            let mut redis = RedisStoreConfig::new(url.expose());
            redis.cluster = *cluster;
            redis.cluster_seeds = cluster_seeds
                .iter()
                .map(|s| s.expose().to_string())
                .collect();
            redis.tls = tls.as_ref().map(|tls| TlsSettings {
                ca: tls.ca.as_ref().map(|pem| pem.as_bytes().to_vec()),
                client: tls.client.as_ref().map(|(cert, key)| {
                    (cert.as_bytes().to_vec(), key.expose().as_bytes().to_vec())
                }),
            });
            redis.sentinel = sentinel.as_ref().map(|sentinel| SentinelSettings {
                master: sentinel.master.clone(),
                nodes: sentinel
                    .nodes
                    .iter()
                    .map(|node| node.expose().to_string())
                    .collect(),
            });
            redis.prefix = config.storage.prefix.clone();
            redis.timeout = Duration::from_millis(*timeout_ms);
            redis.local_deny_cache = *local_deny_cache;
            // A Redis that is down at start does not stop sluice (a crash loop helps no
            // one during a deploy): the on_error policy decides until it answers, and
            // /readyz says it is not reachable.
            let store = match RedisStore::connect(redis.clone()).await {
                Ok(store) => {
                    tracing::info!(
                        address = store.address(),
                        prefix = store.prefix(),
                        cluster = store.is_cluster(),
                        "redis store connected"
                    );
                    store
                }
                // A certificate that fails or credentials refused are settings to fix:
                // deciding by on_error would hide them.
                Err(error) if error.is_misconfiguration() => return Err(error.into()),
                Err(error) => {
                    tracing::error!(%error, on_error = %config.storage.on_error, "cannot reach Redis at start; deciding by on_error until it answers");
                    RedisStore::lazy(redis)?
                }
            };
            with_failure_policy(Arc::new(store), *timeout_ms, config)
        }
        Backend::Postgres { timeout_ms, .. } => {
            let store = Arc::new(PostgresStore::new(postgres_settings(config)?)?);
            // As for Redis, a database that is down at start does not stop sluice: the
            // schema is checked (or installed) on its first answer. A database that
            // answers but refuses the schema is a configuration error: stop and say so.
            match store.prepare().await {
                Ok(status) => tracing::info!(
                    address = store.address(),
                    schema = store.schema(),
                    prefix = store.prefix(),
                    status = ?status,
                    "postgres store ready"
                ),
                Err(error @ PostgresStoreError::Unreachable { .. }) => {
                    tracing::error!(%error, on_error = %config.storage.on_error, "cannot reach PostgreSQL at start; deciding by on_error until it answers");
                }
                Err(error) => return Err(error.into()),
            }
            store.start_sweeper(Duration::from_millis(config.storage.sweep_interval_ms));
            with_failure_policy(store, *timeout_ms, config)
        }
        Backend::Memory => Arc::new(MemoryStore::new(memory)),
        Backend::Disk => {
            // The config loader refuses backend disk without a path.
            let path = config
                .storage
                .path
                .clone()
                .ok_or_else(|| anyhow::anyhow!("storage.path is required for backend disk"))?;
            let mut disk = DiskStoreConfig::new(path);
            disk.sync = config.storage.sync;
            disk.memory = memory;
            let store = DiskStore::open(disk)?;
            let loaded = store.load_report();
            tracing::info!(
                path = %store.path().display(),
                sync = config.storage.sync,
                restored = loaded.restored,
                expired = loaded.expired,
                unreadable = loaded.unreadable,
                "disk store opened"
            );
            Arc::new(store)
        }
    })
}

/// A shared store wrapped in the `on_error` policy, every call bounded by `timeout_ms`.
fn with_failure_policy(store: Arc<dyn Store>, timeout_ms: u64, config: &Config) -> Arc<dyn Store> {
    Arc::new(PolicyStore::new(
        store,
        PolicyConfig {
            policy: config.storage.on_error,
            timeout: Duration::from_millis(timeout_ms),
            probe_interval: Duration::from_secs(1),
            local_max_keys: config.storage.max_keys,
        },
    ))
}

/// The PostgreSQL store's settings from `storage:` (backend postgres).
/// The PostgreSQL store's settings, from a `backend: postgres` storage section.
pub(crate) fn postgres_settings(config: &Config) -> anyhow::Result<PostgresStoreConfig> {
    let Backend::Postgres {
        url,
        schema,
        pool_size,
        timeout_ms,
        migrate,
        unlogged,
    } = &config.storage.backend
    else {
        anyhow::bail!(
            "storage.backend is {}, not postgres: sluice migrate installs the PostgreSQL schema; set `backend: postgres` and a url",
            config.storage.backend
        );
    };
    let mut settings = PostgresStoreConfig::new(url.expose());
    settings.schema = schema.clone();
    settings.prefix = config.storage.prefix.clone();
    settings.pool_size = *pool_size;
    settings.timeout = Duration::from_millis(*timeout_ms);
    settings.migrate = *migrate;
    settings.unlogged = *unlogged;
    Ok(settings)
}
