//! Purges the proxy asks for (a URL with its renditions and remembered failure, a new domain
//! policy) and the background upkeep of the store (start-up reconciliation, retention, the
//! scrub of large blobs), run while the proxy lives.

use std::time::SystemTime;

use super::{Proxy, PurgeReport};
use crate::error::ProxyError;
use crate::policy::Policy;

impl Proxy {
    /// Drops everything cached for the source `url` (the original and its renditions) and
    /// any failure remembered for it, so the next view asks the origin again.
    /// URLs that share its cache entry (`[[policy.normalize]]`) go with it.
    pub async fn purge_url(&self, url: &url::Url) -> Result<PurgeReport, ProxyError> {
        let normalizer = self.normalizer.clone();
        let wanted = normalizer.cache_url(url).into_owned();
        let report = self
            .store
            .purge(move |r| {
                r.url == wanted
                    || url::Url::parse(&r.url).is_ok_and(|u| normalizer.cache_url(&u) == wanted)
            })
            .await?;
        let original = crate::api::ProxyRequest::new(url.clone(), None);
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
            .store
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

    /// Background upkeep until the proxy is dropped: once, reconcile the budget with the blob
    /// files actually on disk; then, periodically, drop what `cache.retention` says nobody
    /// wanted for too long. Holds the proxy weakly so it never delays shutdown.
    pub async fn maintain(this: std::sync::Weak<Proxy>, started: SystemTime) {
        if let Some(proxy) = this.upgrade() {
            proxy.store.reconcile(started).await;
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
            proxy.store.drop_idle(cutoff).await;
        }
    }

    /// Re-hashes every large blob (those served straight from their file, never re-hashed on
    /// load) once at start and then daily, one at a time, dropping any that no longer match.
    pub(super) async fn scrub(this: std::sync::Weak<Proxy>) {
        const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
        loop {
            let Some(proxy) = this.upgrade() else { return };
            let large = proxy.store.memory_max_object_bytes();
            let records = proxy.store.records().await.unwrap_or_default();
            drop(proxy);
            let mut seen = std::collections::HashSet::new();
            let (mut checked, mut dropped) = (0u64, 0u64);
            for (_, record) in records.into_iter().filter(|(_, r)| r.len > large) {
                let Some(hash) = record.blake3().filter(|h| seen.insert(*h)) else { continue };
                let Some(proxy) = this.upgrade() else { return };
                let path = proxy.store.blob_path(&hash);
                // The file as hashed: a request that found it bad meanwhile may have dropped
                // it and stored a good copy under the same name, which must not be dropped.
                let identity = |path: &std::path::Path| {
                    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
                };
                let result = tokio::task::spawn_blocking(move || {
                    let before = identity(&path);
                    let hashed = crate::cache::verify::hash_file(&path);
                    hashed.map(|h| (h, before.is_some() && before == identity(&path)))
                })
                .await;
                match result {
                    Ok(Ok(((actual, len), _))) if actual == hash && len == record.len => {
                        checked += 1
                    }
                    Ok(Ok((_, true))) => {
                        proxy.store.drop_blob(&hash, "scrub: blob does not match its hash").await;
                        dropped += 1;
                    }
                    // Replaced while it was hashed: judged on the next pass.
                    Ok(Ok((_, false))) => {}
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
}
