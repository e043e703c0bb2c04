//! The test crate's side of `sluice_testkit`: every helper comes from the testkit
//! (`sluice`, `http`, `metrics`, `servers`); this module only names the binary under
//! test, which the testkit cannot see (`CARGO_BIN_EXE_sluice` exists in this crate
//! alone), so that the test files keep writing `Server::start(config)` and `run_cli(..)`.

#![allow(dead_code, unused_imports)]

use std::ops::{Deref, DerefMut};
use std::process::ExitStatus;
use std::time::Duration;

pub use sluice_testkit::http::*;
pub use sluice_testkit::metrics::*;
pub use sluice_testkit::servers::{PostgresServer, RedisCluster, RedisServer};
pub use sluice_testkit::sluice::*;

/// The binary under test: `SLUICE_TEST_BIN` when set (to run a suite against another
/// build), else this build's.
pub fn bin() -> Binary {
    Binary::from_env_or(env!("CARGO_BIN_EXE_sluice"))
}

/// A running `sluice serve` of [`bin`] (everything else is the testkit's server's).
pub struct Server(sluice_testkit::sluice::Server);

impl Server {
    /// Starts `sluice serve` with `rest` after its `listen:` line.
    pub fn start(rest: &str) -> Server {
        Server::start_with(rest, &ServeOpts::default())
    }

    /// Like [`Server::start`], with extra command-line arguments and environment.
    pub fn start_with(rest: &str, opts: &ServeOpts) -> Server {
        Server(sluice_testkit::sluice::Server::start_with_bin(
            &bin(),
            rest,
            opts,
        ))
    }

    /// Starts a server with the standard limits (see [`STANDARD`]).
    pub fn standard() -> Server {
        Server::start(STANDARD)
    }
}

impl Deref for Server {
    type Target = sluice_testkit::sluice::Server;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `sluice <args>` run to completion (see [`Binary::run_cli`]).
pub fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    bin().run_cli(args)
}

/// See [`Binary::run_cli_timeout`].
pub fn run_cli_timeout(args: &[&str], timeout: Duration) -> Option<(ExitStatus, String, String)> {
    bin().run_cli_timeout(args, timeout)
}

/// See [`Binary::run_cli_env`].
pub fn run_cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> (ExitStatus, String, String) {
    bin().run_cli_env(args, env)
}
