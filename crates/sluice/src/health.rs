//! `sluice health [--url URL]`: exit 0 when a running sluice answers `200` at URL
//! (default `http://127.0.0.1:8080/healthz`), 1 otherwise. A container's `HEALTHCHECK`
//! and a systemd `ExecStartPost` use it, so images need no curl.

use std::process::ExitCode;
use std::time::Duration;

/// Where `sluice health` asks when no `--url` is given.
pub(crate) const DEFAULT_URL: &str = "http://127.0.0.1:8080/healthz";

/// Asks `url` once, within `timeout`.
pub(crate) fn run(url: &str, timeout: Duration) -> ExitCode {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into();
    match agent.get(url).call() {
        Ok(response) if response.status().as_u16() == 200 => ExitCode::SUCCESS,
        Ok(response) => {
            eprintln!("unhealthy: {url} answered {}", response.status());
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("unhealthy: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}
