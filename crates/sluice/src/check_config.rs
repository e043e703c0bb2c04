//! `sluice check-config FILE`: validates a config file, prints what it holds and any
//! warnings (see `Config::warnings`), and starts nothing.
use std::path::Path;
use std::process::ExitCode;

/// Exit 0 with a summary when `file` is valid; 1 with `file:line:column: field: why`.
pub(crate) fn run(file: &Path) -> ExitCode {
    match sluice_config::load(file) {
        Ok(config) => {
            println!(
                "ok: {}: {} limits, storage {}, listen {}",
                file.display(),
                config.limits.len(),
                config.storage.backend.as_str(),
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
