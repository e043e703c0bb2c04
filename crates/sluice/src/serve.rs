//! `sluice serve`: loads the config, opens the store and serves every front door (the
//! HTTP API or reverse proxy, the admin listener, the Envoy rate limit service), each
//! with one single-threaded runtime per core, until SIGTERM or Ctrl-C.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use sluice_config::Config;
use sluice_runtime::{AppState, Limits, Protocol, bind_listeners, serve_per_thread};

use crate::reload::{reload_on_sighup, watch_config_file};
use crate::stores::open_store;

/// Serves until a shutdown signal; exit 0 after a clean shutdown.
pub(crate) fn run(path: &Path) -> ExitCode {
    let config = match sluice_config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    // This runtime waits for signals and runs store background tasks; HTTP is served by
    // one single-threaded runtime per core (see `sluice_runtime::serve_per_thread`).
    let Some(runtime) = crate::current_thread_runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(serve(config, path.to_path_buf())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    use anyhow::Context;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let store = open_store(&config).await?;
    let listen = config.listen;
    let state = Arc::new(AppState::new(
        &config,
        Some(path.clone()),
        Arc::clone(&store),
    ));
    let threads = match config.http.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = bind_listeners(listen, threads).with_context(|| {
        format!("cannot listen on {listen}: pick a free address for `listen:` (or SLUICE_LISTEN)")
    })?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin_listen = config.admin.listen;
    // One cap per listener: a flood of the public port cannot lock operators out of
    // the admin port.
    let limits = || Limits::new(&config.http);
    let admin_server = match admin_listen {
        Some(admin_listen) => {
            let listener = tokio::net::TcpListener::bind(admin_listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {admin_listen}: pick a free address for `admin.listen:`"
                    )
                })?;
            let mut stopped = stopped.clone();
            let router = sluice_server::admin_router(Arc::clone(&state));
            let limits = limits();
            tracing::info!(%admin_listen, "admin calls served only here");
            Some(tokio::spawn(async move {
                let stop = async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(error) = sluice_runtime::serve(listener, router, limits, stop).await {
                    tracing::error!(%error, "the admin listener stopped");
                }
            }))
        }
        None => None,
    };
    tracing::info!(
        %listen,
        backend = store.backend(),
        limits = config.limits.len(),
        routes = config.routes.len(),
        threads,
        "sluice listening"
    );
    // The Envoy rate limit service: its own listener, served like HTTP (one runtime per
    // thread), deciding through the same state, store and reloadable config.
    let mut envoy_server = match &config.envoy {
        Some(envoy) => {
            let envoy_listen = envoy.listen;
            let listeners = bind_listeners(envoy_listen, threads).with_context(|| {
                format!("cannot listen on {envoy_listen}: pick a free address for `envoy.listen:` (or SLUICE_ENVOY__LISTEN)")
            })?;
            tracing::info!(
                %envoy_listen,
                domains = envoy.domains.len(),
                rules = envoy.domains.limits().len(),
                "Envoy rate limit service (gRPC) listening"
            );
            let router = sluice_envoy::router(Arc::clone(&state));
            let limits = limits();
            let stopped = stopped.clone();
            Some(tokio::task::spawn_blocking(move || {
                serve_per_thread(listeners, router, Protocol::Http2, &limits, stopped)
            }))
        }
        None => None,
    };
    if let Some(proxy) = &config.proxy {
        tracing::info!(upstream = %proxy.upstream, "reverse proxy: requests that are not sluice's own go upstream");
    }
    watch_config_file(Arc::clone(&state), path);
    tokio::spawn(reload_on_sighup(Arc::clone(&state)));
    // Runtime entries (blocks, plans, overrides) are read before the first request, so a
    // restart never lets a blocked client through; then polled.
    state.refresh_access().await;
    tokio::spawn(Arc::clone(&state).poll_access());
    let router = sluice_server::router(Arc::clone(&state), admin_listen.is_some());
    let http_limits = limits();
    let mut server = tokio::task::spawn_blocking(move || {
        serve_per_thread(listeners, router, Protocol::Http1, &http_limits, stopped)
    });
    let envoy_stopped = async {
        match envoy_server.as_mut() {
            Some(handle) => handle.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        finished = &mut server => {
            finished.context("the HTTP server stopped unexpectedly")??;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
        finished = envoy_stopped => {
            finished.context("the Envoy rate limit service stopped unexpectedly")??;
            anyhow::bail!("the Envoy rate limit service stopped unexpectedly");
        }
        _ = shutdown_signal() => {}
    }
    let _ = stop.send(true);
    server
        .await
        .context("the HTTP server did not shut down cleanly")??;
    if let Some(envoy_server) = envoy_server {
        envoy_server
            .await
            .context("the Envoy rate limit service did not shut down cleanly")??;
    }
    if let Some(admin_server) = admin_server {
        // Its errors were logged by the task.
        let _ = admin_server.await;
    }
    tracing::info!("sluice stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests (up to http.shutdown_timeout_ms)");
}
