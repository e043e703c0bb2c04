//! Logs: text (coloured only on a terminal) or JSON lines on stderr, filtered by
//! `SLUICE_LOG`.
use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Installs the global subscriber.
pub(crate) fn init(format: LogFormat) {
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
