//! The `sluice` command: a thin shell over the library crates. This file only parses
//! the command line and dispatches:
//!
//! - `sluice serve --config FILE` ([`serve`]): opens the store ([`stores`]), serves
//!   every front door, reloads on change ([`reload`]);
//! - `sluice check-config FILE` ([`check_config`]): validates a file, starts nothing;
//! - `sluice migrate --config FILE [--print]` ([`migrate`]): the PostgreSQL schema;
//! - `sluice admin ...` ([`admin_cli`]): a running server's admin API;
//! - `sluice init MODE` ([`init`]): a commented starter config;
//! - `sluice health` ([`health`]): exit 0 when a running sluice answers.

mod admin_cli;
mod check_config;
mod health;
mod init;
mod logging;
mod migrate;
mod reload;
mod serve;
mod stores;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

// Many small, short-lived allocations per request (JSON in and out): mimalloc's
// thread-local free lists serve them faster than glibc's arenas, and sluice_alloc
// asks it for plain blocks where the `mimalloc` crate's wrapper took its slow aligned
// path (see that crate's docs).
#[global_allocator]
static ALLOCATOR: sluice_alloc::Mimalloc = sluice_alloc::Mimalloc;

/// Keeps the process off transparent huge pages unless the operator chose with
/// `MIMALLOC_ALLOW_THP` (or mimalloc's large-page variables). With THP, mimalloc's arena
/// is resident in 2 MiB pages: 21 MB idle instead of 11.7, and about 14 more bytes per
/// held key at 300k keys (BENCHMARKS.md, "Memory per held key"), while decisions
/// measured no faster with it, even with 100,000 runtime entries read at random
/// ("Runtime entries": 0.959-0.997x none with THP off, 0.950-1.014x with it).
fn keep_off_huge_pages() {
    let chosen = [
        "MIMALLOC_ALLOW_THP",
        "MIMALLOC_ALLOW_LARGE_OS_PAGES",
        "MIMALLOC_LARGE_OS_PAGES",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some());
    #[cfg(target_os = "linux")]
    if !chosen {
        // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's address space
        // (checked when a page is faulted in); it reads no memory of ours. A kernel that
        // refuses it leaves THP as it was, which is harmless.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = chosen;
}

/// The version and the commit it was built from (`SLUICE_COMMIT`, see `build.rs`).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SLUICE_COMMIT"), ")");

/// A rate limiter for HTTP APIs.
#[derive(Parser)]
#[command(name = "sluice", version = VERSION, about)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
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
    /// Write a commented starter config for one way of running sluice.
    Init {
        /// api (your app calls /v1/check), forward-auth (nginx, Traefik, Envoy) or proxy.
        #[arg(value_enum)]
        mode: init::Mode,
        /// The app to protect, with `proxy`: e.g. http://127.0.0.1:8000.
        #[arg(long)]
        upstream: Option<String>,
        /// Where to write it (`-` for standard output).
        #[arg(long, short, default_value = "sluice.yaml")]
        output: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Exit 0 when a running sluice answers 200 at --url (for container health checks).
    Health {
        /// What to ask.
        #[arg(long, default_value = health::DEFAULT_URL)]
        url: String,
        /// How long to wait for the answer, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
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
    keep_off_huge_pages();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Command::CheckConfig { file } => check_config::run(&file),
        Command::Serve { config } => serve::run(&config),
        Command::Admin(args) => admin_cli::run(args),
        Command::Migrate { config, print } => migrate::run(&config, print),
        Command::Init {
            mode,
            upstream,
            output,
            force,
        } => init::run(mode, upstream.as_deref(), &output, force),
        Command::Health { url, timeout_ms } => {
            health::run(&url, std::time::Duration::from_millis(timeout_ms))
        }
    }
}

/// A single-threaded Tokio runtime for a subcommand's async work, or `None` after
/// saying why it could not start.
fn current_thread_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            None
        }
    }
}
