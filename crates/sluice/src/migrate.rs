//! `sluice migrate`: installs or upgrades sluice's PostgreSQL schema, or prints its SQL
//! for a DBA.
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use sluice_store_postgres::{PostgresStore, PostgresStoreError, SCHEMA_VERSION, SchemaStatus};

use crate::stores::postgres_settings;

/// `sluice migrate`: applies the schema now (whatever `storage.migrate` says), or prints it.
pub(crate) fn run(path: &Path, print: bool) -> ExitCode {
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
    let Some(runtime) = crate::current_thread_runtime() else {
        return ExitCode::FAILURE;
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
