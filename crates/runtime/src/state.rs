//! The state every front door shares: the live (reloadable) configuration, the
//! decision path and the metrics registry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sluice_config::Config;
use sluice_engine::Store;

use crate::access::Access;
use crate::decider::Decider;
use crate::live::{Live, LiveConfig, ReloadError};
use crate::metrics::Metrics;

/// Everything a request handler needs.
pub struct AppState {
    /// The reloadable configuration.
    pub config: LiveConfig,
    /// The decision path.
    pub decider: Decider,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The runtime entries (plans, overrides, block and allow lists) every decision
    /// reads; also reachable from the decider.
    pub access: Arc<Access>,
    /// `storage.on_error`: what decides while a shared store is down (bound at start).
    pub on_error: sluice_config::OnError,
    started: Instant,
}

impl AppState {
    /// State for `config` (read from `path`, for reloads) over `store`.
    pub fn new(config: &Config, path: Option<PathBuf>, store: Arc<dyn Store>) -> Self {
        let top_keys = config
            .stats
            .top_keys
            .then_some(config.stats.top_keys_capacity);
        let metrics = Arc::new(Metrics::new(crate::live::every_limit(config), top_keys));
        let access = Arc::new(Access::new(&config.limits));
        AppState {
            config: LiveConfig::new(config, path),
            decider: Decider::new(store, Arc::clone(&metrics), Arc::clone(&access)),
            metrics,
            access,
            on_error: config.storage.on_error,
            started: Instant::now(),
        }
    }

    /// The configuration snapshot a request works with.
    pub fn live(&self) -> Arc<Live> {
        self.config.load()
    }

    /// Reloads the config file (see [`LiveConfig::reload`]).
    pub fn reload(&self) -> Result<u64, ReloadError> {
        let version = self.config.reload(&self.metrics)?;
        self.access.rebuild(&self.live().limits);
        Ok(version)
    }

    /// Refreshes the runtime entries from the store when they changed (see
    /// [`crate::access`]); a failure keeps the entries last read.
    pub async fn refresh_access(&self) -> bool {
        let limits = self.live().limits.clone();
        match self.access.refresh(&**self.decider.store(), &limits).await {
            Ok(changed) => changed,
            Err(error) => {
                self.metrics.access_refresh_errors.inc();
                tracing::debug!(%error, "reading runtime entries failed; the last ones read stay in force");
                false
            }
        }
    }

    /// Refreshes the runtime entries every [`crate::access::POLL_INTERVAL`], and removes
    /// expired ones about once a minute, until the runtime stops.
    pub async fn poll_access(self: Arc<Self>) {
        let mut ticks = 0u64;
        loop {
            self.refresh_access().await;
            ticks += 1;
            if ticks.is_multiple_of(240) {
                self.access.remove_expired(&**self.decider.store()).await;
            }
            tokio::time::sleep(crate::access::POLL_INTERVAL).await;
        }
    }

    /// Seconds since the server started.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
