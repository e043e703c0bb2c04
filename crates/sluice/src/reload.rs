//! Reloading the config while serving: on SIGHUP, and when the config file (or an
//! `envoy.config_files` file it names) changes. Both watch Unix things (signals, inode
//! numbers); elsewhere only `POST /v1/admin/reload` reloads.
use std::sync::Arc;

use sluice_runtime::AppState;

/// Reloads the config on every SIGHUP.
pub(crate) async fn reload_on_sighup(state: Arc<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!(
                "cannot listen for SIGHUP; reload by file change or POST /v1/admin/reload"
            );
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            let state = Arc::clone(&state);
            // Errors are logged and recorded for /v1/status by the reload itself.
            let _ = tokio::task::spawn_blocking(move || state.reload()).await;
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// Reloads the config when its file, or an `envoy.config_files` file it names, changes.
/// The paths are looked at once a second, following symlinks, so an editor's rename-over
/// and a Kubernetes ConfigMap's `..data` symlink swap are seen as surely as an in-place
/// write; the config is only reloaded when some file's content differs from what was
/// last read.
#[cfg(unix)]
pub(crate) fn watch_config_file(state: Arc<AppState>, path: std::path::PathBuf) {
    use std::path::{Path, PathBuf};
    use std::time::Duration;
    type Fingerprint = Option<(u64, u64, std::time::SystemTime)>;
    fn fingerprint(path: &Path) -> Fingerprint {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.ino(), meta.len(), meta.modified().ok()?))
    }
    /// The config file and the envoy files the running config names.
    fn watched(state: &AppState, path: &Path) -> Vec<PathBuf> {
        let mut paths = vec![path.to_path_buf()];
        if let Some(envoy) = &state.live().envoy {
            paths.extend(envoy.config_files.iter().cloned());
        }
        paths
    }
    let spawned = std::thread::Builder::new()
        .name("sluice-config-watch".into())
        .spawn(move || {
            let read = |paths: &[PathBuf]| -> Vec<(Fingerprint, Option<Vec<u8>>)> {
                paths
                    .iter()
                    .map(|p| (fingerprint(p), std::fs::read(p).ok()))
                    .collect()
            };
            let mut paths = watched(&state, &path);
            let mut seen = read(&paths);
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now: Vec<Fingerprint> = paths.iter().map(|p| fingerprint(p)).collect();
                if now.iter().eq(seen.iter().map(|(f, _)| f)) {
                    continue;
                }
                let new = read(&paths);
                let changed = new
                    .iter()
                    .zip(&seen)
                    .position(|((_, new), (_, old))| new.is_some() && new != old);
                seen = new;
                let Some(changed) = changed else {
                    continue;
                };
                tracing::info!(path = %paths[changed].display(), "config file changed: reloading");
                // Errors are logged and recorded for /v1/status by the reload itself.
                let _ = state.reload();
                // The new config may name other envoy files.
                paths = watched(&state, &path);
                seen = read(&paths);
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot watch the config file; reload with SIGHUP or POST /v1/admin/reload");
    }
}

/// Without Unix file metadata there is no watcher: reload with the admin call.
#[cfg(not(unix))]
pub(crate) fn watch_config_file(state: Arc<AppState>, path: std::path::PathBuf) {
    let _ = (state, path);
    tracing::info!(
        "the config file is not watched on this platform; reload with POST /v1/admin/reload"
    );
}
