//! The `sluice` command: a thin shell over the library crates.
//!
//! `sluice serve --config FILE` loads the config, opens the store and serves the HTTP
//! front door; `sluice check-config FILE` validates a file without starting anything;
//! `sluice migrate --config FILE [--print]` installs (or prints) the PostgreSQL schema.

mod admin_cli;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_config::{Backend, Config, OnError};
use sluice_engine::Store;
use sluice_server::AppState;
use sluice_store_disk::{DiskStore, DiskStoreConfig};
use sluice_store_memory::{MemoryStore, MemoryStoreConfig};
use sluice_store_policy::{FailurePolicy, PolicyConfig, PolicyStore};
use sluice_store_postgres::{
    PostgresStore, PostgresStoreConfig, PostgresStoreError, SCHEMA_VERSION, SchemaStatus,
};
use sluice_store_redis::{RedisStore, RedisStoreConfig};
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
    /// Talk to a running server's admin API: reset, reset-limit, state, reload, status.
    Admin(admin_cli::AdminArgs),
    /// Install or upgrade sluice's PostgreSQL schema (storage.backend: postgres), or
    /// print its SQL for a DBA to apply.
    Migrate {
        /// The YAML config file (its storage section names the database and schema).
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Print the SQL instead of applying it; connects to nothing.
        #[arg(long)]
        print: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Serve { config } => serve(&config),
        Command::Admin(args) => admin_cli::run(args),
        Command::Migrate { config, print } => migrate(&config, print),
    }
}

fn init_logging(format: LogFormat) {
    // The PostgreSQL client and pool log every dropped connection and server notice;
    // the store-failure policy already logs an outage once each way.
    let filter = EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_postgres=warn,deadpool=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only for a terminal: piped logs (files, Docker, journald) stay greppable.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
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
            if let Some(envoy) = &config.envoy {
                println!(
                    "ok: envoy: {} domains, {} counted rules, listen {}",
                    envoy.domains.len(),
                    envoy.domains.limits().len(),
                    envoy.listen
                );
            }
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
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

async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
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
        } => {
            let mut redis = RedisStoreConfig::new(url.expose());
            redis.cluster = *cluster;
            redis.cluster_seeds = cluster_seeds
                .iter()
                .map(|s| s.expose().to_string())
                .collect();
            redis.prefix = config.storage.prefix.clone();
            redis.timeout = Duration::from_millis(*timeout_ms);
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
            policy: match config.storage.on_error {
                OnError::Allow => FailurePolicy::Allow,
                OnError::Deny => FailurePolicy::Deny,
                OnError::Local => FailurePolicy::Local,
            },
            timeout: Duration::from_millis(timeout_ms),
            probe_interval: Duration::from_secs(1),
            local_max_keys: config.storage.max_keys,
        },
    ))
}

/// The PostgreSQL store's settings from `storage:` (backend postgres).
fn postgres_settings(config: &Config) -> anyhow::Result<PostgresStoreConfig> {
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

/// `sluice migrate`: applies the schema now (whatever `storage.migrate` says), or prints it.
fn migrate(path: &Path, print: bool) -> ExitCode {
    let config = match sluice_config::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match postgres_settings(&config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {}: {error:#}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if print {
        return match sluice_store_postgres::migration_sql(&settings.schema, settings.unlogged) {
            Ok(sql) => {
                print!("{sql}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        };
    }
    // Migrations may take longer than a decision: wait at least ten seconds for the
    // connection and the lock other instances may hold.
    let mut settings = settings;
    settings.timeout = settings.timeout.max(Duration::from_secs(10));
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
    let schema = settings.schema.clone();
    let outcome = runtime.block_on(async move {
        let store = PostgresStore::new(settings)?;
        let status = store.migrate().await?;
        Ok::<_, PostgresStoreError>((store.address().to_string(), status))
    });
    match outcome {
        Ok((address, status)) => {
            match status {
                SchemaStatus::Migrated { from } => println!(
                    "sluice schema version {SCHEMA_VERSION} installed in schema {schema} at {address} (was {from})"
                ),
                SchemaStatus::UpToDate => println!(
                    "sluice schema in schema {schema} at {address} is already at version {SCHEMA_VERSION}"
                ),
                SchemaStatus::Newer { found } => println!(
                    "sluice schema in schema {schema} at {address} is at version {found}, newer than this sluice's {SCHEMA_VERSION}: left as it is"
                ),
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
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
    match runtime.block_on(run(config, path.to_path_buf())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
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
    let listeners = sluice_server::bind_listeners(listen, threads).with_context(|| {
        format!("cannot listen on {listen}: pick a free address for `listen:` (or SLUICE_LISTEN)")
    })?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin_listen = config.admin.listen;
    // One cap per listener: a flood of the public port cannot lock operators out of
    // the admin port.
    let limits = || sluice_server::Limits::new(&config.http);
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
                if let Err(error) = sluice_server::serve(listener, router, limits, stop).await {
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
            let listeners = sluice_server::bind_listeners(envoy_listen, threads).with_context(|| {
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
                sluice_server::serve_per_thread(
                    listeners,
                    router,
                    sluice_server::Protocol::Http2,
                    &limits,
                    stopped,
                )
            }))
        }
        None => None,
    };
    if let Some(proxy) = &config.proxy {
        tracing::info!(upstream = %proxy.upstream, "reverse proxy: requests that are not sluice's own go upstream");
    }
    watch_config_file(Arc::clone(&state), path);
    tokio::spawn(reload_on_sighup(Arc::clone(&state)));
    let router = sluice_server::router(Arc::clone(&state), admin_listen.is_some());
    let http_limits = limits();
    let mut server = tokio::task::spawn_blocking(move || {
        sluice_server::serve_per_thread(
            listeners,
            router,
            sluice_server::Protocol::Http1,
            &http_limits,
            stopped,
        )
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

/// Reloads the config on every SIGHUP.
async fn reload_on_sighup(state: Arc<AppState>) {
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
fn watch_config_file(state: Arc<AppState>, path: PathBuf) {
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
