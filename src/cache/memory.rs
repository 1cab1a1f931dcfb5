//! The memory tier: moka, weighed in body bytes, so `cache.memory_bytes` bounds what it holds.

use std::sync::Arc;

use super::{Entry, Key};

/// Bookkeeping cost charged per entry on top of its body, so that many disk-only entries
/// (which carry no body) still count against the budget.
const ENTRY_OVERHEAD: u64 = 512;

/// The memory tier: entries weighed by their body's length, within a byte budget (moka).
#[derive(Clone)]
pub struct MemoryTier {
    cache: moka::future::Cache<Key, Arc<Entry>>,
}

impl MemoryTier {
    /// A tier of `budget_bytes`.
    pub fn new(budget_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|_k, e: &Arc<Entry>| {
                let body = e.body.as_ref().map_or(0, |b| b.len() as u64);
                u32::try_from(body + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .build();
        Self { cache }
    }

    /// The entry of `key`, if held.
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key).await
    }

    /// Holds `entry` under `key` (the tier decides by its weight).
    pub async fn insert(&self, key: Key, entry: Arc<Entry>) {
        self.cache.insert(key, entry).await;
    }

    /// Removes the entry of `key`, whose blob is leaving the disk: the file it may hold open
    /// is closed now, not whenever the last copy of the entry goes.
    pub async fn remove(&self, key: &Key) {
        if let Some(entry) = self.cache.remove(key).await {
            entry.release_file();
        }
    }

    /// Weighted size in bytes and entry count, for metrics (moka updates them lazily).
    pub async fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}
