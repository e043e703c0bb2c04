//! The runtime-records behaviour every store must show (`Store::records`,
//! `Store::put_record`, `Store::remove_record`; see `sluice_engine::records`): what is
//! written is read back whole, a change moves the version, a removal of nothing does not.

use std::collections::BTreeMap;

use sluice_engine::{Record, Store};

use crate::Harness;

fn record(id: &str, body: &str) -> Record {
    Record {
        id: id.to_string(),
        body: body.to_string(),
    }
}

async fn read(store: &dyn Store) -> (u64, BTreeMap<String, String>) {
    let records = store.records().await.expect("records are read");
    let version = store.records_version().await.expect("version is read");
    assert_eq!(version, records.version, "both calls agree on the version");
    let map = records
        .records
        .into_iter()
        .map(|r| (r.id, r.body))
        .collect();
    (records.version, map)
}

/// Written records are read back whole; every change moves the version, and only a change.
pub async fn records_are_written_read_back_and_removed<H: Harness>(harness: &H) {
    let store = harness.store();
    let (empty, map) = read(&*store).await;
    assert!(map.is_empty(), "a new store has no records: {map:?}");

    // Bodies are opaque: quotes, newlines, non-ASCII and a NUL-free JSON document.
    let plan =
        r#"{"kind":"plan","subject":"customer:42","plan":"pro","note":"é \"quoted\"\nline"}"#;
    let first = store
        .put_record(&record("plan/customer:42", plan))
        .await
        .expect("put");
    assert_ne!(first, empty, "a write moves the version");
    let second = store
        .put_record(&record("block/ip:10.0.0.0/8", "{\"kind\":\"block\"}"))
        .await
        .expect("put");
    assert_ne!(second, first);

    let (version, map) = read(&*store).await;
    assert_eq!(version, second);
    assert_eq!(map.len(), 2);
    assert_eq!(map["plan/customer:42"], plan, "read back byte for byte");

    // Same id: replaced, not added.
    let replaced = store
        .put_record(&record("plan/customer:42", "{\"plan\":\"free\"}"))
        .await
        .expect("put");
    let (version, map) = read(&*store).await;
    assert_eq!(version, replaced);
    assert_eq!(map.len(), 2);
    assert_eq!(map["plan/customer:42"], "{\"plan\":\"free\"}");

    assert!(
        store
            .remove_record("plan/customer:42")
            .await
            .expect("remove")
    );
    let (after_remove, map) = read(&*store).await;
    assert_ne!(after_remove, replaced, "a removal moves the version");
    assert_eq!(map.keys().collect::<Vec<_>>(), ["block/ip:10.0.0.0/8"]);

    assert!(
        !store
            .remove_record("plan/customer:42")
            .await
            .expect("remove"),
        "removing what is not there says so"
    );
    let (version, _) = read(&*store).await;
    assert_eq!(version, after_remove, "removing nothing leaves the version");
}
