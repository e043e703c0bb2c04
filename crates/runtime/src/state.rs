//! The state every front door shares: the live (reloadable) configuration, the
//! decision path and the metrics registry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sluice_config::Config;
use sluice_engine::Store;

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
    started: Instant,
}

impl AppState {
    /// State for `config` (read from `path`, for reloads) over `store`.
    pub fn new(config: &Config, path: Option<PathBuf>, store: Arc<dyn Store>) -> Self {
        let metrics = Arc::new(Metrics::new(crate::live::every_limit(config)));
        AppState {
            config: LiveConfig::new(config, path),
            decider: Decider::new(store, Arc::clone(&metrics)),
            metrics,
            started: Instant::now(),
        }
    }

    /// The configuration snapshot a request works with.
    pub fn live(&self) -> Arc<Live> {
        self.config.load()
    }

    /// Reloads the config file (see [`LiveConfig::reload`]).
    pub fn reload(&self) -> Result<u64, ReloadError> {
        self.config.reload(&self.metrics)
    }

    /// Seconds since the server started.
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
