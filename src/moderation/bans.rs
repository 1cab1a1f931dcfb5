//! Moderation's lifecycle: making and lifting bans (kept in the index, purged from every
//! tier, shared through the bucket and kept in step with it), loading hash lists and finding
//! what they match among files already cached, and the checks of a fill's bytes, the
//! scanner's among them.

use std::sync::Arc;

use serde::Serialize;

use super::lists::HashLists;
use super::scanner::Verdict;
use super::{Ban, BanKind, Digester, Moderation};
use crate::cache::received::Received;
use crate::cache::store::PurgeReport;
use crate::error::ProxyError;

/// SHA-256 and MD5 of the file at `path`, read on a blocking thread.
async fn read_digests(path: std::path::PathBuf) -> Option<super::Digests> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(path).ok()?;
        let (mut digester, mut buf) = (Digester::default(), vec![0u8; 1 << 16]);
        loop {
            match file.read(&mut buf) {
                Ok(0) => return Some(digester.finish()),
                Ok(n) => digester.update(&buf[..n]),
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// `ban` as the bucket keeps it: marked shared (a node that learns it from there knows it
/// came from there).
fn as_shared(ban: &Ban) -> serde_json::Value {
    let mut shared = ban.clone();
    shared.shared = true;
    serde_json::to_value(shared).unwrap_or_default()
}

/// What a ban did.
#[derive(Debug, Clone, Serialize)]
pub struct BanReport {
    /// The ban, as kept.
    pub ban: Ban,
    /// What it removed at once.
    pub purged: PurgeReport,
    /// A SHA-256 ban purges at once what was prepared from the bytes it names (their digests
    /// are kept with the entry); files stored as the origin sent them are read to be matched,
    /// in the background: what that purges is in the moderation log.
    pub scanning: bool,
    /// Cached entries the ban could not be matched against: prepared (stripped, rasterised)
    /// from origin bytes whose digests were not kept (before this version kept them all).
    pub unmatched: u64,
}

impl Moderation {
    /// Puts `ban` in force: kept in the index, purged from memory, disk and (for its content)
    /// the bucket, shared with other nodes, logged.
    pub async fn ban(self: &Arc<Self>, mut ban: Ban) -> Result<BanReport, ProxyError> {
        // Published first: once the bucket has it, the bucket governs it (a node lifting it
        // lifts it everywhere). One that could not be published is published at the next sync.
        if let (Some(shared), false) = (&self.shared, ban.shared) {
            match shared.put_ban(&ban.id(), &as_shared(&ban)).await {
                Ok(()) => ban.shared = true,
                Err(e) => shared.warn("ban", &e),
            }
        }
        let value = serde_json::to_vec(&ban).map_err(ProxyError::internal)?;
        self.store.put_ban(ban.id(), value).await?;
        self.add_rule(ban.clone());
        let hash =
            (ban.kind == BanKind::Hash).then(|| blake3::Hash::from_hex(&ban.value).ok()).flatten();
        let reason = ban.reason.as_deref();
        self.log.record(ban.kind.as_str(), "banned", hash.as_ref(), None, reason).await;
        let (purged, unmatched) = self.purge_banned(&ban).await?;
        if unmatched > 0 {
            tracing::warn!(
                unmatched,
                "cached entries prepared from origin bytes whose digests were not kept: not matched"
            );
        }
        if purged.entries > 0 {
            self.log.record(ban.kind.as_str(), "purged", hash.as_ref(), None, reason).await;
        }
        let scanning = ban.kind == BanKind::Sha256;
        if scanning {
            self.scan_cached();
        }
        Ok(BanReport { ban, purged, scanning, unmatched })
    }

    /// Lifts the ban `id` here and in the bucket; the ban, if there was one.
    pub async fn lift(&self, id: &str) -> Result<Option<Ban>, ProxyError> {
        // The bucket first: if its tombstone cannot be written, the next sync would put the ban
        // back, so the lift fails as a whole.
        if let Some(shared) = &self.shared {
            let tombstone = shared.lift_ban(id).await;
            tombstone.map_err(|e| ProxyError::internal(format!("shared bucket: {e}")))?;
        }
        self.store.remove_ban(id.to_string()).await?;
        let Some(ban) = self.remove_rule(id) else { return Ok(None) };
        self.forget_refusals();
        self.log.record(ban.kind.as_str(), "lifted", None, None, None).await;
        Ok(Some(ban))
    }

    /// A lifted ban applies at once: the refusals remembered in the negative cache go (all
    /// of it: lifts are rare, and the rest is refetched at most once each).
    fn forget_refusals(&self) {
        if let Some(forget) = self.on_lift.get() {
            forget();
        }
    }

    /// Removes what `ban` covers from every tier; with it, the entries it could not be
    /// matched against.
    async fn purge_banned(&self, ban: &Ban) -> Result<(PurgeReport, u64), ProxyError> {
        let purged = match ban.kind {
            BanKind::Url => {
                let url = ban.value.clone();
                self.store.purge(move |r| r.url == url).await
            }
            BanKind::Domain => self.store.purge_domain(ban.value.clone()).await,
            BanKind::Hash => match blake3::Hash::from_hex(&ban.value) {
                Ok(hash) => self.purge_content(&hash).await,
                Err(_) => Ok(PurgeReport::default()),
            },
            BanKind::Sha256 => return self.purge_by_origin_sha256(&ban.value).await,
        };
        purged.map(|p| (p, 0))
    }

    /// A SHA-256 ban's part that needs no file read: every entry prepared from the bytes it
    /// names (and, through [`Self::purge_content`], their renditions), found by the digests
    /// kept with it; and a count of the prepared entries whose origin digests are unknown.
    async fn purge_by_origin_sha256(&self, sha256: &str) -> Result<(PurgeReport, u64), ProxyError> {
        let mut doomed = std::collections::HashSet::new();
        let mut unmatched = std::collections::HashSet::new();
        for (_, record) in self.store.records().await? {
            let Some(origin) = &record.origin else { continue };
            match origin.sha256.as_deref() {
                Some(kept) if kept == sha256 => doomed.extend(record.blake3()),
                Some(_) => {}
                None => {
                    unmatched.insert(record.hash.clone());
                }
            }
        }
        let mut report = PurgeReport::default();
        for hash in doomed {
            let purged = self.purge_content(&hash).await?;
            report.entries += purged.entries;
            report.blobs += purged.blobs;
            report.bytes += purged.bytes;
        }
        Ok((report, unmatched.len() as u64))
    }

    /// Removes the file `hash` wherever it is, and every rendition made from it: the entries
    /// naming it, then every entry of the same source URLs.
    pub async fn purge_content(&self, hash: &blake3::Hash) -> Result<PurgeReport, ProxyError> {
        let hex = hash.to_hex().to_string();
        let urls = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let seen = urls.clone();
        let mut report = self
            .store
            .purge(move |r| {
                // The stored bytes, or the origin's bytes they were prepared from.
                let hit = r.hash == hex || r.origin.as_ref().is_some_and(|o| o.blake3 == hex);
                if hit {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).insert(r.url.clone());
                }
                hit
            })
            .await?;
        let urls = std::mem::take(&mut *urls.lock().unwrap_or_else(|p| p.into_inner()));
        if !urls.is_empty() {
            let renditions = self.store.purge(move |r| urls.contains(&r.url)).await?;
            report.entries += renditions.entries;
            report.blobs += renditions.blobs;
            report.bytes += renditions.bytes;
        }
        if let Some(shared) = &self.shared {
            shared.discard_blob(hash).await;
        }
        Ok(report)
    }

    /// At start: the bans kept in the index, and the configured hash lists (whose matches
    /// among cached files are then looked for in the background).
    pub async fn load(
        self: &Arc<Self>,
        hash_lists: &[std::path::PathBuf],
    ) -> Result<(), ProxyError> {
        let stored = self.store.bans().await?;
        let bans: Vec<Ban> =
            stored.iter().filter_map(|raw| serde_json::from_slice(raw).ok()).collect();
        if bans.len() < stored.len() {
            let unreadable = stored.len() - bans.len();
            tracing::error!(unreadable, "bans in the index that cannot be read");
        }
        self.set_rules(bans);
        self.reload_lists(hash_lists).await?;
        Ok(())
    }

    /// Reads the hash lists `paths` and puts them in force; matches among cached files are
    /// purged in the background. Digests held (SHA-256, MD5).
    pub async fn reload_lists(
        self: &Arc<Self>,
        paths: &[std::path::PathBuf],
    ) -> Result<(usize, usize), ProxyError> {
        let paths = paths.to_vec();
        let lists = tokio::task::spawn_blocking(move || HashLists::load(&paths))
            .await
            .map_err(ProxyError::internal)?
            .map_err(ProxyError::internal)?;
        let len = lists.len();
        if lists.skipped > 0 {
            tracing::warn!(skipped = lists.skipped, "hash list lines that are not digests");
        }
        let any = !lists.is_empty();
        self.set_lists(lists);
        tracing::info!(sha256 = len.0, md5 = len.1, "hash lists loaded");
        if any {
            self.scan_cached();
        }
        Ok(len)
    }

    /// Reads every cached file and purges those a SHA-256 ban or a hash list now matches.
    /// In the background, one file at a time: it reads the whole cache once.
    fn scan_cached(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let records = match this.upgrade() {
                Some(proxy) => proxy.store.records().await.ok(),
                None => None,
            };
            let (mut done, mut unmatchable) = (std::collections::HashSet::new(), 0usize);
            for (_, record) in records.unwrap_or_default() {
                // Holds the proxy one file at a time, so shutdown does not wait for the scan.
                let Some(proxy) = this.upgrade() else { return };
                let Some(hash) = record.blake3() else { continue };
                if !done.insert(hash) {
                    continue;
                }
                // The origin's bytes are what the rules name: their digests, when the record
                // kept them (every prepared entry since they are kept); otherwise the stored
                // bytes, unless preparing changed those (then there is nothing to match, and
                // the entry is counted).
                let kept = record.origin.as_ref().map(super::Digests::of_origin);
                let digests = match kept {
                    Some(Some(digests)) => Some(digests),
                    Some(None) => {
                        unmatchable += 1;
                        continue;
                    }
                    None => match proxy.store.record_input(&record).await {
                        Some(crate::cache::Input::File { path, .. }) => read_digests(path).await,
                        Some(crate::cache::Input::Memory(bytes)) => {
                            let mut digester = Digester::default();
                            digester.update(&bytes);
                            Some(digester.finish())
                        }
                        None => None,
                    },
                };
                let Some(digests) = digests else { continue };
                if let Err(ProxyError::Banned(rule)) = proxy.check_digests(&digests) {
                    let (host, _) = record.hosts();
                    match proxy.purge_content(&hash).await {
                        Ok(_) => {
                            let host = host.as_deref();
                            proxy.log.record(rule, "purged", Some(&hash), host, None).await
                        }
                        Err(e) => tracing::error!(error = %e, "cannot purge a listed file"),
                    }
                }
            }
            if unmatchable > 0 {
                tracing::warn!(
                    unmatchable,
                    "cached entries whose origin bytes are unknown (prepared before a list existed): not matched"
                );
            }
        });
    }

    /// The checks of a fill's bytes as the origin sent them, before anything is prepared or
    /// stored: a content ban of those bytes, SHA-256 bans, hash lists.
    pub async fn check_received(&self, r: &Received, host: &str) -> Result<(), ProxyError> {
        let landing = r.final_host.as_deref().map_or(Ok(()), |h| self.check_host(h));
        let hash = landing.and_then(|()| self.check_hash(&r.hash));
        let verdict = hash.and_then(|()| match &r.digests {
            Some(digests) => self.check_digests(digests),
            None => Ok(()),
        });
        // What a record from the bucket says of the origin's bytes (these are prepared ones).
        let verdict = verdict.and_then(|()| match &r.origin {
            Some(origin) => self.check_origin(origin),
            None => Ok(()),
        });
        if let Err(ProxyError::Banned(rule)) = &verdict {
            self.log.record(rule, "refused", Some(&r.hash), Some(host), None).await;
        }
        verdict
    }

    /// Rules about the origin's bytes, by the digests kept of them.
    fn check_origin(&self, origin: &crate::cache::index::OriginDigests) -> Result<(), ProxyError> {
        if let Ok(hash) = blake3::Hash::from_hex(&origin.blake3) {
            self.check_hash(&hash)?;
        }
        match super::Digests::of_origin(origin) {
            Some(digests) => self.check_digests(&digests),
            None => Ok(()),
        }
    }

    /// The checks of the bytes about to be stored and served: a content ban, then the
    /// scanner (once per file), whose no becomes a content ban.
    pub async fn check_prepared(
        self: &Arc<Self>,
        r: &mut Received,
        host: &str,
    ) -> Result<(), ProxyError> {
        if let Err(e) = self.check_hash(&r.hash) {
            self.log.record("hash", "refused", Some(&r.hash), Some(host), None).await;
            return Err(e);
        }
        let Some(scanner) = &self.scanner else { return Ok(()) };
        let scannable =
            r.content_type.starts_with("image/") || r.content_type.starts_with("video/");
        if !scannable || scanner.known_allowed(&r.hash).await {
            return Ok(());
        }
        let input = r.input().await.map_err(ProxyError::storage)?;
        match scanner.scan(&r.hash, r.content_type, host, input).await {
            Verdict::Allowed => {
                self.log.record("scanner", "allowed", Some(&r.hash), Some(host), None).await;
                Ok(())
            }
            Verdict::Refused(status) => {
                let reason = format!("scanner answered {status}");
                if let Ok(ban) = Ban::new(BanKind::Hash, &r.hash.to_hex(), Some(reason.clone())) {
                    if let Err(e) = self.ban(ban).await {
                        tracing::error!(error = %e, "cannot keep the scanner's ban");
                    }
                }
                self.log
                    .record("scanner", "refused", Some(&r.hash), Some(host), Some(&reason))
                    .await;
                Err(ProxyError::Banned("scanner"))
            }
            Verdict::Unavailable(why) => {
                tracing::warn!(why, "moderation scanner unavailable");
                self.log
                    .record("scanner", "unscanned", Some(&r.hash), Some(host), Some(&why))
                    .await;
                match scanner.fail {
                    crate::config::ScannerFail::Open => Ok(()),
                    crate::config::ScannerFail::Closed => Err(ProxyError::ScannerUnavailable),
                }
            }
        }
    }

    /// Keeps this node's bans and the bucket's in step until the proxy is dropped: bans from
    /// the bucket are put in force (and purged here), bans it holds a tombstone of are lifted,
    /// and this node's own bans it lacks are published. A ban merely missing from the bucket
    /// is never lifted.
    pub async fn sync_bans(this: std::sync::Weak<Moderation>, every: std::time::Duration) {
        loop {
            let Some(proxy) = this.upgrade() else { return };
            let Some(shared) = proxy.shared.clone() else { return };
            match shared.bans().await {
                Ok((remote, lifted)) => {
                    let remote: Vec<Ban> = remote
                        .into_iter()
                        .filter_map(|value| serde_json::from_value(value).ok())
                        .collect();
                    let local = proxy.bans();
                    let local_ids: std::collections::HashSet<String> =
                        local.iter().map(Ban::id).collect();
                    let remote_ids: std::collections::HashSet<String> =
                        remote.iter().map(Ban::id).collect();
                    for ban in remote.into_iter().filter(|b| !local_ids.contains(&b.id())) {
                        if let Err(e) = proxy.ban(ban).await {
                            tracing::error!(error = %e, "cannot apply a ban from the shared bucket");
                        }
                    }
                    for ban in &local {
                        let id = ban.id();
                        if lifted.contains(&id) && !remote_ids.contains(&id) {
                            let _ = proxy.lift_here(&id).await;
                        } else if !ban.shared && !remote_ids.contains(&id) {
                            // Made here while the bucket could not be written: published now
                            // (only published; it is in force here already).
                            proxy.republish(&shared, ban.clone()).await;
                        }
                    }
                }
                Err(e) => shared.warn("bans", &e),
            }
            drop(proxy);
            tokio::time::sleep(every).await;
        }
    }

    /// Publishes a ban made here that the bucket did not get, and records that it has it now.
    async fn republish(&self, shared: &crate::cache::shared::SharedTier, mut ban: Ban) {
        if let Err(e) = shared.put_ban(&ban.id(), &as_shared(&ban)).await {
            shared.warn("ban", &e);
            return;
        }
        ban.shared = true;
        if let Ok(value) = serde_json::to_vec(&ban) {
            let _ = self.store.put_ban(ban.id(), value).await;
        }
        self.add_rule(ban);
    }

    /// Lifts a ban on this node only (the bucket says it was lifted).
    async fn lift_here(&self, id: &str) -> Result<(), ProxyError> {
        self.store.remove_ban(id.to_string()).await?;
        if let Some(ban) = self.remove_rule(id) {
            self.forget_refusals();
            self.log.record(ban.kind.as_str(), "lifted", None, None, Some("shared")).await;
        }
        Ok(())
    }
}
