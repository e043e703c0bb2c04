//! Runtime records (see [`sluice_engine::records`]) in Redis: one hash of id → body at
//! `{prefix}{records}` and its version, a counter moved by every change, at
//! `{prefix}{records}:version`. Both share the hash tag `records`, so a cluster keeps
//! them in one slot and a change is one atomic script there. No counter's key has
//! `{records}` in it: a counter's tag always holds `limit:key`.

use std::sync::LazyLock;

use sluice_engine::{Record, Records, StoreError};

use crate::RedisStore;

/// Writes one record and moves the version: KEYS = hash, version; ARGV = id, body.
static PUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCR', KEYS[2])",
    )
});

/// Removes one record, moving the version only when there was one.
static REMOVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then redis.call('INCR', KEYS[2]) end
return removed",
    )
});

impl RedisStore {
    fn records_keys(&self) -> (String, String) {
        let hash = format!("{}{{records}}", self.prefix);
        let version = format!("{hash}:version");
        (hash, version)
    }

    pub(crate) async fn records_inner(&self) -> Result<Records, StoreError> {
        let (hash, version_key) = self.records_keys();
        let (version, map): (Option<u64>, Vec<(String, String)>) = self
            .with_retry(|mut connection| {
                // The version first, then the records, in order on one connection but
                // not in a transaction (no MULTI in the ACL): a write in between makes
                // the version older than the records, and the next poll reads again.
                let mut pipe = redis::pipe();
                pipe.get(&version_key).hgetall(&hash);
                async move { pipe.query_async(&mut connection).await }
            })
            .await?;
        Ok(Records {
            version: version.unwrap_or(0),
            records: map
                .into_iter()
                .map(|(id, body)| Record { id, body })
                .collect(),
        })
    }

    pub(crate) async fn records_version_inner(&self) -> Result<u64, StoreError> {
        let (_, version_key) = self.records_keys();
        let version: Option<u64> = self
            .with_retry(|mut connection| {
                let key = &version_key;
                async move {
                    redis::cmd("GET")
                        .arg(key)
                        .query_async(&mut connection)
                        .await
                }
            })
            .await?;
        Ok(version.unwrap_or(0))
    }

    // Repeating either script after a dropped connection is harmless: the same record
    // is written again, and the version moves once more.
    pub(crate) async fn put_record_inner(&self, record: &Record) -> Result<u64, StoreError> {
        let (hash, version_key) = self.records_keys();
        self.with_retry(|mut connection| {
            let mut invocation = PUT.key(&hash);
            invocation
                .key(&version_key)
                .arg(&record.id)
                .arg(&record.body);
            async move { invocation.invoke_async(&mut connection).await }
        })
        .await
    }

    pub(crate) async fn remove_record_inner(&self, id: &str) -> Result<bool, StoreError> {
        let (hash, version_key) = self.records_keys();
        let removed: u64 = self
            .with_retry(|mut connection| {
                let mut invocation = REMOVE.key(&hash);
                invocation.key(&version_key).arg(id);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok(removed == 1)
    }
}
