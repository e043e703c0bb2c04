//! The `sluice` command: a thin shell over the library crates.
//!
//! `sluice serve --config FILE` loads the config, opens the store and serves the HTTP
//! front door; `sluice check-config FILE` validates a file without starting anything.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_config::{Backend, Config};
use sluice_engine::Store;
use sluice_http::{ClientIpResolver, HttpPolicy};
use sluice_server::{AppState, ServerSettings};
use sluice_store_disk::{DiskStore, DiskStoreConfig};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};
use tracing_subscriber::EnvFilter;

// Many small, short-lived allocations per request (JSON in and out): mimalloc's
// thread-local free lists serve them faster than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A rate limiter for HTTP APIs.
#[derive(Parser)]
#[command(name = "sluice", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// The YAML config file.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and exit: 0 when valid, 1 with file:line: field: message when not.
    CheckConfig {
        /// The YAML config file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve { config } => serve(&config),
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(file: &Path) -> ExitCode {
    match sluice_config::load(file) {
        Ok(config) => {
            println!(
                "ok: {}: {} limits, storage {}, listen {}",
                file.display(),
                config.limits.len(),
                backend_name(&config),
                config.listen
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn backend_name(config: &Config) -> &'static str {
    config.storage.backend.as_str()
}

fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let memory = MemoryStoreConfig {
        max_keys: config.storage.max_keys,
        sweep_interval: Duration::from_millis(config.storage.sweep_interval_ms),
    };
    Ok(match config.storage.backend {
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

fn serve(path: &Path) -> ExitCode {
    let config = match sluice_config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    // This runtime waits for signals and runs store background tasks; HTTP is served by
    // one single-threaded runtime per core (see `sluice_server::serve_per_thread`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let store = open_store(&config)?;
    let listen = config.listen;
    let limit_count = config.limits.len();
    let policy = HttpPolicy {
        rules: config.routes,
        client_ip: ClientIpResolver::new(config.client_ip),
        responses: config.responses,
    };
    let state = Arc::new(AppState::new(
        config.limits,
        policy,
        Arc::clone(&store),
        ServerSettings {
            max_body_bytes: config.http.max_body_bytes,
            admin_token: config.admin.token.map(|t| t.expose().to_string()),
            forward_auth_deny_status: config.forward_auth.deny_status,
        },
    ));
    let threads = match config.http.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = sluice_server::bind_listeners(listen, threads).with_context(|| {
        format!("cannot listen on {listen}: pick a free address for `listen:` (or SLUICE_LISTEN)")
    })?;
    tracing::info!(%listen, backend = store.backend(), limits = limit_count, threads, "sluice listening");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let router = sluice_server::router(state);
    let mut server = tokio::task::spawn_blocking(move || {
        sluice_server::serve_per_thread(listeners, router, stopped)
    });
    tokio::select! {
        finished = &mut server => {
            finished.context("the HTTP server stopped unexpectedly")??;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
        _ = shutdown_signal() => {}
    }
    let _ = stop.send(true);
    server
        .await
        .context("the HTTP server did not shut down cleanly")??;
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
    tracing::info!("shutting down: finishing in-flight requests");
}
