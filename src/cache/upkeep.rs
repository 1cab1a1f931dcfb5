//! The store's own upkeep, a task the store starts and owns, and which stops when the store is
//! dropped (as mini-redis's `Db` purges expired keys from a task its drop guard ends):
//! - once at start, the budget is reconciled with the blob files on disk;
//! - periodically, what `cache.retention` says nobody wanted for too long is dropped;
//! - once at start and then daily, every large blob (served straight from its file, never
//!   re-hashed on load) is re-hashed, one at a time, and dropped when it no longer matches.
//!
//! The task holds the store weakly, so it never keeps it (and its index) open at shutdown.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::store::Store;

/// How often the scrub runs.
const DAY: Duration = Duration::from_secs(86_400);

impl Store {
    /// Starts the upkeep (reconciliation of files written before `started`, retention of
    /// `retention`, the scrub), owned by this store: it ends when the store is dropped.
    pub fn start_upkeep(self: &Arc<Self>, retention: Duration, started: SystemTime) {
        let this = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            if let Some(store) = this.upgrade() {
                store.reconcile(started).await;
            }
            tokio::join!(retain(this.clone(), retention), scrub(this));
        });
        self.own_upkeep(task.abort_handle());
    }
}

/// Drops, every quarter of `retention`, what nobody asked for within `retention`.
async fn retain(this: Weak<Store>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(600));
    loop {
        tokio::time::sleep(every).await;
        let Some(store) = this.upgrade() else { return };
        let cutoff = super::evict::now_secs().saturating_sub(retention.as_secs());
        store.drop_idle(cutoff).await;
    }
}

/// Re-hashes every large blob once, then daily, dropping any that no longer match.
async fn scrub(this: Weak<Store>) {
    loop {
        let Some(store) = this.upgrade() else { return };
        let large = store.memory_max_object_bytes();
        let records = store.records().await.unwrap_or_default();
        drop(store);
        let mut seen = std::collections::HashSet::new();
        let (mut checked, mut dropped) = (0u64, 0u64);
        for (_, record) in records.into_iter().filter(|(_, r)| r.len > large) {
            let Some(hash) = record.blake3().filter(|h| seen.insert(*h)) else { continue };
            let Some(store) = this.upgrade() else { return };
            let path = store.blob_path(&hash);
            // The file as hashed: a request that found it bad meanwhile may have dropped it
            // and stored a good copy under the same name, which must not be dropped.
            let identity = |path: &std::path::Path| {
                std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
            };
            let result = tokio::task::spawn_blocking(move || {
                let before = identity(&path);
                let hashed = super::verify::hash_file(&path);
                hashed.map(|h| (h, before.is_some() && before == identity(&path)))
            })
            .await;
            match result {
                Ok(Ok(((actual, len), _))) if actual == hash && len == record.len => checked += 1,
                Ok(Ok((_, true))) => {
                    store.drop_blob(&hash, "scrub: blob does not match its hash").await;
                    dropped += 1;
                }
                // Replaced while it was hashed: judged on the next pass.
                Ok(Ok((_, false))) => {}
                // Gone meanwhile (evicted, purged) or unreadable for now (no file descriptor
                // free): judged on load or on the next pass, never dropped here.
                Ok(Err(_)) | Err(_) => {}
            }
            drop(store);
            // Yield the disk to viewers between blobs.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!(checked, dropped, "scrub of large blobs done");
        tokio::time::sleep(DAY).await;
    }
}
