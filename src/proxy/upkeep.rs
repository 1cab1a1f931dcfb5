//! Keeping the store right: purges, policy changes, dropping bad blobs, eviction victims, and
//! the background tasks (start-up reconciliation, retention, the scrub of large blobs).

use std::time::SystemTime;

use super::{Proxy, PurgeReport};
use crate::cache::Key;
use crate::cache::budget::Victim;
use crate::cache::index::Record;
use crate::error::ProxyError;
use crate::policy::Policy;

impl Proxy {
    /// Deletes a blob that cannot be served (corrupt, truncated, vanished) with every index
    /// record and memory entry naming it, so the next request refetches it.
    pub async fn drop_blob(&self, hash: &blake3::Hash, why: &str) {
        tracing::warn!(blob = %hash.to_hex(), why, "dropping blob");
        self.metrics.blobs_dropped.inc();
        let keys = self.budget.drop_blob(hash.as_bytes());
        self.remove_keys(keys).await;
        self.disk.remove(hash).await;
    }

    /// Evicts blobs chosen by the disk budget, with every key naming them.
    pub(super) async fn drop_victims(&self, victims: Vec<Victim>) {
        for victim in victims {
            self.metrics.evictions.inc();
            self.remove_keys(victim.keys).await;
            let path = self.disk.path(&blake3::Hash::from_bytes(victim.hash));
            self.budget.remove_if_unheld(&victim.hash, &path);
        }
    }

    pub(super) async fn remove_keys(&self, keys: Vec<Key>) {
        for key in &keys {
            self.memory.remove(key).await;
        }
        if let Err(e) = self.index.remove_many(keys).await {
            tracing::error!(error = %e, "cannot remove index records");
        }
    }

    /// Drops every entry whose record matches `doomed` from the index, the memory tier and,
    /// when no other entry shares the bytes, the disk.
    pub async fn purge(
        &self,
        doomed: impl Fn(&Record) -> bool + Send + 'static,
    ) -> Result<PurgeReport, ProxyError> {
        let purged = self.index.purge(doomed).await.map_err(ProxyError::internal)?;
        let mut report = PurgeReport { entries: purged.removed.len() as u64, ..Default::default() };
        for (key, record) in &purged.removed {
            self.memory.remove(key).await;
            let Some(hash) = record.blake3() else { continue };
            // The blob goes only with the last key naming it: identical bytes are shared.
            let last = self.budget.forget(hash.as_bytes(), key);
            if self.budget.remove_if_unheld(hash.as_bytes(), &self.disk.path(&hash)) || last {
                report.blobs += 1;
                report.bytes += record.len;
            }
        }
        Ok(report)
    }

    /// Drops everything cached for the source `url` (the original and its renditions) and
    /// any failure remembered for it, so the next view asks the origin again.
    /// URLs that share its cache entry (`[[policy.normalize]]`) go with it.
    pub async fn purge_url(&self, url: &url::Url) -> Result<PurgeReport, ProxyError> {
        let normalizer = self.normalizer.clone();
        let wanted = normalizer.cache_url(url).into_owned();
        let report = self
            .purge(move |r| {
                r.url == wanted
                    || url::Url::parse(&r.url).is_ok_and(|u| normalizer.cache_url(&u) == wanted)
            })
            .await?;
        let original = crate::api::ProxyRequest { source: url.clone(), variant: None };
        self.negative.invalidate(&original.key(&self.normalizer)).await;
        Ok(report)
    }

    /// Applies a new `[policy]` and purges everything cached from domains it now refuses.
    pub async fn apply_policy(
        &self,
        config: &crate::config::PolicyConfig,
    ) -> Result<PurgeReport, ProxyError> {
        let policy = Policy::new(config);
        self.fetcher.set_policy(policy.clone());
        let report = self
            .purge(move |r| {
                // The source's host, and the host the bytes came from after redirects.
                let (source, landed) = r.hosts();
                source.is_none_or(|h| policy.check(&h).is_err())
                    || landed.is_some_and(|h| policy.check(h).is_err())
            })
            .await?;
        tracing::info!(
            blocked = config.blocked_domains.len(),
            allowed = config.allowed_domains.len(),
            purged_entries = report.entries,
            purged_bytes = report.bytes,
            "domain policy applied"
        );
        Ok(report)
    }

    /// Rebuilds the disk budget from the index (records only, no blob is read), oldest first,
    /// evicting at once if `cache.disk_bytes` shrank since the last run.
    pub async fn load_budget(&self) -> Result<usize, ProxyError> {
        let mut records = self.index.all().await.map_err(ProxyError::internal)?;
        records.sort_by_key(|(_, r)| r.stored_at);
        let count = records.len();
        let mut victims = Vec::new();
        for (key, record) in records {
            if let Some(hash) = record.blake3() {
                victims.extend(self.budget.admit(*hash.as_bytes(), record.len, key).1);
            }
        }
        self.drop_victims(victims).await;
        Ok(count)
    }

    /// Background upkeep until the proxy is dropped: once, reconcile the budget with the blob
    /// files actually on disk; then, periodically, drop what `cache.retention` says nobody
    /// wanted for too long. Holds the proxy weakly so it never delays shutdown.
    pub async fn maintain(this: std::sync::Weak<Proxy>, started: SystemTime) {
        if let Some(proxy) = this.upgrade() {
            proxy.reconcile_disk(started).await;
        }
        tokio::spawn(Self::scrub(this.clone()));
        let retention = match this.upgrade() {
            Some(p) => p.config.cache.retention.0,
            None => return,
        };
        let every = (retention / 4)
            .clamp(std::time::Duration::from_millis(250), std::time::Duration::from_secs(600));
        loop {
            tokio::time::sleep(every).await;
            let Some(proxy) = this.upgrade() else { return };
            let cutoff = crate::cache::evict::now_secs().saturating_sub(retention.as_secs());
            let idle = proxy.budget.idle_since(cutoff);
            if !idle.is_empty() {
                tracing::info!(blobs = idle.len(), "retention: dropping blobs nobody asked for");
                proxy.drop_victims(idle).await;
            }
        }
    }

    /// Re-hashes every large blob (those served straight from their file, never re-hashed on
    /// load) once at start and then daily, one at a time, dropping any that no longer match.
    pub(super) async fn scrub(this: std::sync::Weak<Proxy>) {
        const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
        loop {
            let Some(proxy) = this.upgrade() else { return };
            let large = proxy.config.cache.memory_max_object_bytes.0;
            let records = proxy.index.all().await.unwrap_or_default();
            drop(proxy);
            let mut seen = std::collections::HashSet::new();
            let (mut checked, mut dropped) = (0u64, 0u64);
            for (_, record) in records.into_iter().filter(|(_, r)| r.len > large) {
                let Some(hash) = record.blake3().filter(|h| seen.insert(*h)) else { continue };
                let Some(proxy) = this.upgrade() else { return };
                let path = proxy.disk.path(&hash);
                let result =
                    tokio::task::spawn_blocking(move || crate::cache::verify::hash_file(&path))
                        .await;
                match result {
                    Ok(Ok((actual, len))) if actual == hash && len == record.len => checked += 1,
                    Ok(Ok(_)) => {
                        proxy.drop_blob(&hash, "scrub: blob does not match its hash").await;
                        dropped += 1;
                    }
                    // Gone meanwhile (evicted, purged) or unreadable for now (no file
                    // descriptor free): judged on load or on the next pass, never dropped here.
                    Ok(Err(_)) | Err(_) => {}
                }
                drop(proxy);
                // Yield the disk to viewers between blobs.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            tracing::info!(checked, dropped, "scrub of large blobs done");
            tokio::time::sleep(DAY).await;
        }
    }

    /// Deletes blob files the budget does not know (left by a crash between rename and index
    /// commit), and drops blobs whose file is missing or of another size than recorded. Files
    /// written since `started` are left alone: their fill may not have committed yet.
    pub(super) async fn reconcile_disk(&self, started: SystemTime) {
        let files = match self.disk.list().await {
            Ok(files) => files,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the blob store");
                return;
            }
        };
        let mut orphans = 0;
        for file in files {
            if file.modified >= started {
                continue;
            }
            if self.budget.remove_if_unheld(file.hash.as_bytes(), &self.disk.path(&file.hash)) {
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::warn!(orphans, "removed blob files no index record named");
        }
    }
}
