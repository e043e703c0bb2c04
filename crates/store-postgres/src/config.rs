//! The store's settings, and the checks that refuse settings which can never work
//! before anything connects: the URL's scheme and TLS mode, the schema name.
//!
//! The URL holds a password: [`PostgresStoreConfig`]'s `Debug` redacts it, and no error
//! repeats it.
//!
//! Sessions run with `statement_timeout` = the store timeout, so a statement stuck
//! behind a lock cannot outlive the caller's patience, and `synchronous_commit = off`: a
//! PostgreSQL crash may lose the last fraction of a second of counting, and nothing
//! waits for a disk flush.

use std::time::Duration;

use sluice_store_rules::after_scheme;
use sluice_store_rules::postgres::{
    DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, URL_SCHEMES, is_plain_schema_name,
};

use crate::PostgresStoreError;

/// Settings of a [`PostgresStore`](crate::PostgresStore).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStoreConfig {
    /// `postgres://user:password@host:port/database[?options]`. Holds a password: never
    /// logged.
    pub url: String,
    /// The schema holding sluice's table and functions. Default `public`.
    pub schema: String,
    /// Prepended to every key, so deployments can share one table. Default `sluice:`.
    pub prefix: String,
    /// Connections kept at most. Default 16.
    pub pool_size: usize,
    /// How long one call (including waiting for or opening a connection) may take; also
    /// the sessions' `statement_timeout`. Default 200 ms.
    pub timeout: Duration,
    /// Install or upgrade the schema when needed. Default true.
    pub migrate: bool,
    /// Keep counters in an `UNLOGGED` table. Default false.
    pub unlogged: bool,
}

impl std::fmt::Debug for PostgresStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStoreConfig")
            .field("url", &"[redacted]")
            .field("schema", &self.schema)
            .field("prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("migrate", &self.migrate)
            .field("unlogged", &self.unlogged)
            .finish()
    }
}

impl PostgresStoreConfig {
    /// Settings with the defaults above.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresStoreConfig {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_string(),
            prefix: "sluice:".to_string(),
            pool_size: DEFAULT_POOL_SIZE,
            timeout: Duration::from_millis(200),
            migrate: true,
            unlogged: false,
        }
    }

    /// The connection settings of every session, or why these settings can never work.
    pub(crate) fn session(&self) -> Result<tokio_postgres::Config, PostgresStoreError> {
        check_schema_name(&self.schema)?;
        if after_scheme(&self.url, URL_SCHEMES).is_none() {
            return Err(PostgresStoreError::BadUrl(
                "it must start with postgres:// or postgresql://".to_string(),
            ));
        }
        let mut pg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e: tokio_postgres::Error| PostgresStoreError::BadUrl(e.to_string()))?;
        match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable | tokio_postgres::config::SslMode::Prefer => {}
            _ => {
                return Err(PostgresStoreError::BadUrl(
                    "sslmode asks for TLS, which this build does not include; use sslmode=disable or prefer, or reach PostgreSQL through a TLS-terminating proxy on a trusted network".to_string(),
                ));
            }
        }
        let timeout_ms = self.timeout.as_millis().max(1);
        // Ours first, so settings in the URL's own `options` win.
        let mut options = format!("-c statement_timeout={timeout_ms} -c synchronous_commit=off");
        if let Some(theirs) = pg.get_options() {
            options.push(' ');
            options.push_str(theirs);
        }
        pg.options(&options);
        if pg.get_application_name().is_none() {
            pg.application_name("sluice");
        }
        pg.connect_timeout(self.timeout);
        Ok(pg)
    }
}

/// Refuses a schema name that would need quoting rules (the shared rule of the config
/// loader and the store).
pub(crate) fn check_schema_name(schema: &str) -> Result<(), PostgresStoreError> {
    if is_plain_schema_name(schema) {
        Ok(())
    } else {
        Err(PostgresStoreError::BadSchema(schema.to_string()))
    }
}

/// `host:port` of the first host, for messages.
pub(crate) fn address_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PostgresStore;

    #[test]
    fn schema_names_are_checked_by_the_shared_rule() {
        assert!(check_schema_name("rate").is_ok());
        let error = check_schema_name("Rate").expect_err("uppercase refused");
        assert!(error.to_string().contains("at most 63 bytes"), "{error}");
    }

    #[test]
    fn debug_output_hides_the_password() {
        let config = PostgresStoreConfig::new("postgres://u:hunter2@h/db");
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("schema: \"public\""), "{shown}");
    }

    #[tokio::test]
    async fn urls_that_cannot_work_are_refused_without_echoing_them() {
        for url in [
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2@h/db?sslmode=require",
            "host=h password=hunter2",
        ] {
            let error = PostgresStore::new(PostgresStoreConfig::new(url))
                .err()
                .unwrap_or_else(|| panic!("{url} refused"));
            let message = error.to_string();
            assert!(message.contains("storage.url"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }
}
