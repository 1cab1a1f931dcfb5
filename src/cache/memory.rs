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
    budget: u64,
}

/// What `entry` weighs against the budget.
fn weight(entry: &Entry) -> u64 {
    entry.body.as_ref().map_or(0, |b| b.len() as u64) + ENTRY_OVERHEAD
}

impl MemoryTier {
    /// A tier of `budget_bytes`.
    pub fn new(budget_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|_k, e: &Arc<Entry>| u32::try_from(weight(e)).unwrap_or(u32::MAX))
            .build();
        Self { cache, budget: budget_bytes }
    }

    /// The entry of `key`, if held.
    pub async fn get(&self, key: &Key) -> Option<Arc<Entry>> {
        self.cache.get(key).await
    }

    /// Holds `entry` under `key` (the tier decides by its weight; one heavier than the whole
    /// budget is not taken in, to be evicted again at the next upkeep).
    pub async fn insert(&self, key: Key, entry: Arc<Entry>) {
        if weight(&entry) <= self.budget {
            self.cache.insert(key, entry).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(len: usize) -> Arc<Entry> {
        let body = bytes::Bytes::from(vec![7u8; len]);
        Arc::new(Entry::new(blake3::hash(&body), len as u64, "image/png", Some(body)))
    }

    /// An entry heavier than the whole tier is not held even for a moment (moka would keep it
    /// until its next upkeep, and a load that should go to disk would be a memory hit).
    #[tokio::test]
    async fn an_entry_heavier_than_the_budget_is_not_held() {
        let tier = MemoryTier::new(16 << 10);
        let (small, large) = (Key::new("http://a.test/s", None), Key::new("http://a.test/l", None));
        tier.insert(small, entry(4 << 10)).await;
        tier.insert(large, entry(64 << 10)).await;
        assert!(tier.get(&small).await.is_some(), "what fits is held");
        assert!(tier.get(&large).await.is_none(), "what cannot fit is not");
    }
}
