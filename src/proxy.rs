//! The request lifecycle behind every URL scheme: memory, then negative cache, then one
//! coalesced fill per key that checks the disk index and otherwise fetches from the origin.
//!
//! A fill runs on its own task, so a viewer who disconnects cancels nothing for the others;
//! every viewer asking for the same key meanwhile waits on that one fill.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::api::ProxyRequest;
use crate::audit::{AuditLog, Trigger};
use crate::cache::budget::{DiskBudget, Victim};
use crate::cache::disk::BlobStore;
use crate::cache::index::{Index, Record};
use crate::cache::memory::MemoryTier;
use crate::cache::{Entry, Key};
use crate::config::Config;
use crate::error::ProxyError;
use crate::fetch::Fetcher;
use crate::fetch::limit::FillLimits;
use crate::media::{SNIFF_LEN, TypePolicy};
use crate::policy::Policy;
use crate::telemetry::{CacheStatus, Metrics, OutcomeLabels};

/// Removes a key from the in-flight map when dropped.
struct InflightSlot {
    proxy: Arc<Proxy>,
    key: Key,
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.proxy.inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    /// Index entries (URL × variant) removed.
    pub entries: u64,
    /// Blobs deleted from disk (shared blobs stay while another entry names them).
    pub blobs: u64,
    /// Bytes those blobs held.
    pub bytes: u64,
}

/// A body received in full into a temp blob, not yet stored.
struct Received {
    temp: crate::cache::disk::TempBlob,
    hash: blake3::Hash,
    len: u64,
    content_type: &'static str,
}

type FillResult = Result<(Arc<Entry>, CacheStatus), ProxyError>;

/// Shared state of a running proxy.
pub struct Proxy {
    pub config: Config,
    pub fetcher: Fetcher,
    pub audit: AuditLog,
    pub memory: MemoryTier,
    /// Recent origin failures by key, so a dead origin is asked once per `cache.negative_ttl`
    /// rather than once per viewer.
    negative: moka::future::Cache<Key, ProxyError>,
    pub disk: BlobStore,
    pub index: Index,
    types: TypePolicy,
    pub limits: FillLimits,
    /// One render per core at a time; renders run on blocking threads.
    render_cpu: tokio::sync::Semaphore,
    /// Renders running or waiting; beyond it a render is refused with 503, not queued.
    render_queue: tokio::sync::Semaphore,
    /// What is on disk and what to evict: `cache.disk_bytes` by S3-FIFO.
    pub budget: DiskBudget,
    /// Fills in progress. A std mutex: it is held only to look up or insert, never across await.
    inflight: Mutex<HashMap<Key, watch::Receiver<Option<FillResult>>>>,
    pub metrics: Metrics,
}

impl Proxy {
    pub fn new(
        config: Config,
        fetcher: Fetcher,
        audit: AuditLog,
        disk: BlobStore,
        index: Index,
        metrics: Metrics,
    ) -> Self {
        let negative = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.cache.negative_ttl.0.max(std::time::Duration::from_millis(1)))
            .build();
        Self {
            memory: MemoryTier::new(config.cache.memory_bytes.0),
            types: TypePolicy::new(&config.media.allowed_types)
                .rasterizing_svg(config.media.svg == "rasterize"),
            budget: DiskBudget::new(config.cache.disk_bytes.0),
            render_cpu: tokio::sync::Semaphore::new(cores()),
            render_queue: tokio::sync::Semaphore::new(cores() * 8),
            limits: FillLimits::new(
                config.fetch.max_fills as usize,
                config.fetch.max_per_origin as usize,
            ),
            negative,
            fetcher,
            audit,
            disk,
            index,
            inflight: Mutex::new(HashMap::new()),
            metrics,
            config,
        }
    }

    /// Finds or fills the entry for `req`. Viewer-facing: errors come back with the cache
    /// status that produced them, for the log line and metrics.
    pub async fn get(
        self: &Arc<Self>,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)> {
        // Refused destinations and blocked domains are refused even when cached: a domain
        // blocked a second ago is not served from memory.
        self.fetcher.check_destination(&req.source).map_err(|e| (e, CacheStatus::Blocked))?;
        let key = req.key();
        let req = req.clone();
        self.lookup_or_fill(key, move |this| async move {
            // A fill that finished between this request's lookups and its leadership has
            // already published: use it rather than fetch a second time.
            if let Some(entry) = this.memory.get(&key).await {
                return Ok((entry, CacheStatus::HitMemory));
            }
            if let Some(err) = this.negative.get(&key).await {
                return Err(err);
            }
            this.fill(key, &req, trigger).await
        })
        .await
    }

    /// Whether `req` is held in memory or on disk (no fill needed).
    pub async fn is_cached(&self, req: &ProxyRequest) -> bool {
        let key = req.key();
        self.memory.get(&key).await.is_some() || self.index.get(key).await.ok().flatten().is_some()
    }

    /// Memory, then the negative cache, then one fill per key on its own task, which every
    /// concurrent caller for `key` waits on.
    async fn lookup_or_fill<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        fill: F,
    ) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)>
    where
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = FillResult> + Send + 'static,
    {
        if let Some(entry) = self.memory.get(&key).await {
            entry.hit();
            return Ok((entry, CacheStatus::HitMemory));
        }
        if let Some(err) = self.negative.get(&key).await {
            return Err((err, CacheStatus::Negative));
        }
        let (mut rx, leader) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(&key) {
                Some(rx) => (rx.clone(), false),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key, rx.clone());
                    let this = self.clone();
                    tokio::spawn(async move {
                        // Leaves the map however the task ends, a panic included, so a key is
                        // never stuck waiting on a fill that is gone.
                        let slot = InflightSlot { proxy: this.clone(), key };
                        let result = fill(this.clone()).await;
                        if let Err(e) = &result {
                            if e.is_negative_cacheable() && !this.negative.contains_key(&key) {
                                this.negative.insert(key, e.clone()).await;
                            }
                        }
                        // Publish before leaving the map, so a newcomer finds either the entry
                        // in a tier or this fill, never neither.
                        let _ = tx.send(Some(result));
                        drop(slot);
                    });
                    (rx, true)
                }
            }
        };
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("waited for Some"),
            Err(_) => Err(ProxyError::internal("fill task ended without a result")),
        };
        match outcome {
            Ok((entry, status)) if leader => Ok((entry, status)),
            Ok((entry, _)) => Ok((entry, CacheStatus::Coalesced)),
            // A redirect into a refused destination is still a refusal, not an origin miss.
            Err(
                e @ (ProxyError::BlockedDomain
                | ProxyError::BlockedDestination(_)
                | ProxyError::RedirectRefused),
            ) => Err((e, CacheStatus::Blocked)),
            Err(e) => Err((e, if leader { CacheStatus::Miss } else { CacheStatus::Coalesced })),
        }
    }

    /// The rendition `name` of the original `req`, keyed by the original's content (so one
    /// picture reached through two URLs is rendered once) and coalesced like fetches.
    pub async fn get_variant(
        self: &Arc<Self>,
        req: &ProxyRequest,
        name: &str,
        trigger: Trigger,
    ) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)> {
        let spec = self.config.variants.get(name).cloned();
        let spec = spec.ok_or((ProxyError::UnknownVariant, CacheStatus::Bypass))?;
        let original_req = ProxyRequest { source: req.source.clone(), variant: None };
        let (original, status) = self.get(&original_req, trigger).await?;
        if !original.content_type.to_str().is_ok_and(|t| t.starts_with("image/")) {
            // Video and audio have no renditions: the original is served.
            return Ok((original, status));
        }
        let key = Key::new(&format!("blake3:{}", original.hash.to_hex()), Some(name));
        let url = req.source.to_string();
        self.lookup_or_fill(key, move |this| async move {
            if let Some(entry) = this.load_from_disk(key).await? {
                this.memory.insert(key, entry.clone()).await;
                return Ok((entry, CacheStatus::HitDisk));
            }
            let entry = this.render_and_store(key, &url, &original, &spec).await?;
            this.memory.insert(key, entry.clone()).await;
            Ok((entry, CacheStatus::Miss))
        })
        .await
    }

    /// Renders on a blocking thread under the CPU semaphore; beyond the queue bound, 503.
    async fn render_and_store(
        &self,
        key: Key,
        url: &str,
        original: &Entry,
        spec: &crate::config::VariantConfig,
    ) -> Result<Arc<Entry>, ProxyError> {
        let _queued = self.render_queue.try_acquire().map_err(|_| ProxyError::Overloaded)?;
        let _cpu = self.render_cpu.acquire().await.map_err(|_| ProxyError::Overloaded)?;
        let source = match &original.body {
            Some(bytes) => bytes.clone(),
            None => Bytes::from(
                tokio::fs::read(self.disk.path(&original.hash))
                    .await
                    .map_err(ProxyError::internal)?,
            ),
        };
        let (spec, max_pixels) = (spec.clone(), self.config.media.max_pixels);
        self.metrics.renders.inc();
        let rendered = tokio::task::spawn_blocking(move || {
            crate::media::variants::render(&source, &spec, max_pixels)
        })
        .await
        .map_err(|_| ProxyError::internal("render task failed"))??;
        let received = self.received_from(rendered.bytes, rendered.content_type).await?;
        self.store(key, url, received).await
    }

    /// The leader's work: the disk index first, then the origin.
    async fn fill(&self, key: Key, req: &ProxyRequest, trigger: Trigger) -> FillResult {
        if let Some(entry) = self.load_from_disk(key).await? {
            self.memory.insert(key, entry.clone()).await;
            return Ok((entry, CacheStatus::HitDisk));
        }
        let entry = self.fetch_and_store(key, req, trigger).await?;
        self.memory.insert(key, entry.clone()).await;
        Ok((entry, CacheStatus::Miss))
    }

    /// Looks `key` up in the index and checks its blob. A record whose blob is missing or the
    /// wrong size is dropped, and a small blob whose bytes no longer hash to its name is
    /// deleted: both then count as a miss and are refetched, never served.
    async fn load_from_disk(&self, key: Key) -> Result<Option<Arc<Entry>>, ProxyError> {
        let Some(record) = self.index.get(key).await.map_err(ProxyError::internal)? else {
            return Ok(None);
        };
        let (Some(hash), 1..) = (record.blake3(), record.len) else {
            self.index.remove(key).await.map_err(ProxyError::internal)?;
            return Ok(None);
        };
        if self.disk.len(&hash).await != Some(record.len) {
            self.drop_blob(&hash, "blob missing or of the wrong size").await;
            return Ok(None);
        }
        let body = if record.len <= self.config.cache.memory_max_object_bytes.0 {
            let bytes =
                tokio::fs::read(self.disk.path(&hash)).await.map_err(ProxyError::internal)?;
            if blake3::hash(&bytes) != hash {
                self.drop_blob(&hash, "blob does not match its hash").await;
                return Ok(None);
            }
            Some(Bytes::from(bytes))
        } else {
            None
        };
        let (touch, victims) = match self.budget.touch(hash.as_bytes()) {
            Some(touch) => (touch, Vec::new()),
            None => self.budget.admit(*hash.as_bytes(), record.len, key),
        };
        touch.hit();
        self.drop_victims(victims).await;
        let entry = Entry::new(hash, record.len, &record.content_type, body).with_touch(touch);
        Ok(Some(Arc::new(entry)))
    }

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
    async fn drop_victims(&self, victims: Vec<Victim>) {
        for victim in victims {
            self.metrics.evictions.inc();
            self.remove_keys(victim.keys).await;
            let path = self.disk.path(&blake3::Hash::from_bytes(victim.hash));
            self.budget.remove_if_unheld(&victim.hash, &path);
        }
    }

    async fn remove_keys(&self, keys: Vec<Key>) {
        for key in &keys {
            self.memory.remove(key).await;
        }
        if let Err(e) = self.index.remove_many(keys).await {
            tracing::error!(error = %e, "cannot remove index records");
        }
    }

    /// Fetches `req.source` and stores it. `fetch.timeout` bounds the origin's part (waiting
    /// for a per-origin slot, headers, body); storing what arrived in time always runs to the
    /// end, so a deadline can never leave a blob on disk that the budget does not count.
    async fn fetch_and_store(
        &self,
        key: Key,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<Arc<Entry>, ProxyError> {
        let deadline = tokio::time::Instant::now() + self.config.fetch.timeout.0;
        let host = req.source.host_str().unwrap_or_default();
        let result = tokio::time::timeout_at(deadline, async {
            let permit = self.limits.acquire(host).await?;
            self.receive(req, trigger).await.map(|received| (permit, received))
        })
        .await
        .unwrap_or_else(|_| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: "origin_timeout" }).inc();
            Err(ProxyError::OriginTimeout)
        });
        let result = match result {
            Ok((_permit, received)) => match self.prepare(received).await {
                Ok(received) => self.store(key, req.source.as_str(), received).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(ProxyError::StorageFull) = result {
            // The disk filled before the budget did (other files share it, or disk_bytes is
            // set too high): make room for a few objects like this one, so the next try fits.
            let (used, _) = self.budget.usage();
            let room = self.config.cache.max_object_bytes.0.clamp(1 << 20, 64 << 20);
            let victims = self.budget.evict_to(used.saturating_sub(room));
            let freed: u64 = victims.iter().map(|v| v.len).sum();
            tracing::warn!(freed, "disk full: evicted to make room");
            self.drop_victims(victims).await;
        }
        result
    }

    /// What is stored is what may be served: an SVG becomes a PNG, metadata is stripped.
    async fn prepare(&self, received: Received) -> Result<Received, ProxyError> {
        let received = self.rasterize_svg(received).await?;
        self.strip_metadata(received).await
    }

    /// Replaces a received SVG (admitted only with `media.svg = "rasterize"`) by its PNG
    /// rendering; the SVG itself is never stored or served.
    async fn rasterize_svg(&self, mut r: Received) -> Result<Received, ProxyError> {
        if r.content_type != crate::media::SVG {
            return Ok(r);
        }
        if r.len > crate::media::svg::MAX_SVG_BYTES {
            return Err(ProxyError::BadImage("SVG too large to render"));
        }
        let svg = r.temp.read_back().await.map_err(storage_error)?;
        let max_pixels = self.config.media.max_pixels;
        let _cpu = self.render_cpu.acquire().await.map_err(|_| ProxyError::Overloaded)?;
        self.metrics.renders.inc();
        let png =
            tokio::task::spawn_blocking(move || crate::media::svg::rasterize(&svg, max_pixels))
                .await
                .map_err(|_| ProxyError::internal("render task failed"))??;
        self.received_from(png, "image/png").await
    }

    /// A temp blob holding `bytes`, ready to store.
    async fn received_from(
        &self,
        bytes: Vec<u8>,
        content_type: &'static str,
    ) -> Result<Received, ProxyError> {
        let mut temp = self.disk.create_temp().await.map_err(storage_error)?;
        temp.file.write_all(&bytes).await.map_err(storage_error)?;
        let (hash, len) = (blake3::hash(&bytes), bytes.len() as u64);
        Ok(Received { temp, hash, len, content_type })
    }

    /// Replaces a received JPEG, PNG or WebP by a copy without metadata (`media.strip_metadata`),
    /// so the bytes stored, hashed and served (and their ETag) carry no GPS position.
    async fn strip_metadata(&self, mut r: Received) -> Result<Received, ProxyError> {
        const LARGEST: u64 = 64 << 20;
        let strippable = matches!(r.content_type, "image/jpeg" | "image/png" | "image/webp");
        if !self.config.media.strip_metadata || !strippable || r.len > LARGEST {
            return Ok(r);
        }
        let bytes = Bytes::from(r.temp.read_back().await.map_err(storage_error)?);
        let content_type = r.content_type;
        let stripped =
            tokio::task::spawn_blocking(move || crate::media::strip::strip(&bytes, content_type))
                .await
                .map_err(|_| ProxyError::internal("strip task failed"))?;
        let Some(stripped) = stripped else { return Ok(r) };
        self.received_from(stripped.to_vec(), content_type).await
    }

    /// Streams the origin's body into a temp blob while hashing, sniffing and counting; anything
    /// refused leaves no file behind (the temp blob removes itself when dropped).
    async fn receive(&self, req: &ProxyRequest, trigger: Trigger) -> Result<Received, ProxyError> {
        let started = Instant::now();
        let origin = self.fetcher.get(&req.source, trigger).await.inspect_err(|e| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: e.code() }).inc();
        })?;
        let status = origin.response.status().as_u16();
        let mut response = origin.response;
        let mut count = 0u64;
        let result = self.read_body(&mut response, &mut count).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        origin.pending.finish(Some(status), count, outcome).await;
        self.metrics.origin.get_or_create(&OutcomeLabels { outcome }).inc();
        self.metrics.origin_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.bytes_fetched.inc_by(count);
        result
    }

    async fn read_body(
        &self,
        response: &mut reqwest::Response,
        received: &mut u64,
    ) -> Result<Received, ProxyError> {
        let max = self.config.cache.max_object_bytes.0;
        let declared = response.content_length();
        if declared.is_some_and(|n| n > max) {
            return Err(ProxyError::TooLarge);
        }
        // An HTTP/1 body delimited only by the connection closing cannot be told apart from
        // one cut short, so it is refused rather than cached truncated.
        let chunked = response
            .headers()
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let http1 = response.version() <= http::Version::HTTP_11;
        if http1 && declared.is_none() && !chunked {
            return Err(ProxyError::OriginInvalid(
                "body without Content-Length or chunked framing",
            ));
        }
        let mut temp = self.disk.create_temp().await.map_err(storage_error)?;
        let mut hasher = blake3::Hasher::new();
        let mut head = Vec::with_capacity(SNIFF_LEN);
        let mut content_type = None;
        while let Some(chunk) = response.chunk().await.map_err(body_error)? {
            *received += chunk.len() as u64;
            if *received > max {
                return Err(ProxyError::TooLarge);
            }
            if content_type.is_none() {
                let take = (SNIFF_LEN - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                if head.len() == SNIFF_LEN {
                    content_type = Some(self.types.sniff(&head)?);
                }
            }
            hasher.update(&chunk);
            temp.file.write_all(&chunk).await.map_err(storage_error)?;
        }
        if *received == 0 {
            return Err(ProxyError::OriginInvalid("empty body"));
        }
        if declared.is_some_and(|n| n != *received) {
            return Err(ProxyError::OriginInvalid("body shorter than Content-Length"));
        }
        let content_type = match content_type {
            Some(t) => t,
            None => self.types.sniff(&head)?,
        };
        Ok(Received { temp, hash: hasher.finalize(), len: *received, content_type })
    }

    /// Makes a received blob durable and findable: budget first (so a concurrent eviction of
    /// the same bytes, which deletes only blobs the budget no longer holds, cannot delete
    /// it), then the rename into place, then the index record.
    async fn store(&self, key: Key, url: &str, r: Received) -> Result<Arc<Entry>, ProxyError> {
        let Received { temp, hash, len, content_type } = r;
        let (touch, victims) = self.budget.admit(*hash.as_bytes(), len, key);
        let record = Record {
            hash: hash.to_hex().to_string(),
            len,
            content_type: content_type.to_string(),
            url: url.to_string(),
            stored_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let stored = match self.disk.commit(temp, &hash).await {
            Ok(_) => self.index.put(key, &record).await.map_err(ProxyError::internal),
            Err(e) => Err(storage_error(e)),
        };
        if let Err(e) = stored {
            if self.budget.forget(hash.as_bytes(), &key) {
                self.budget.remove_if_unheld(hash.as_bytes(), &self.disk.path(&hash));
            }
            self.drop_victims(victims).await;
            return Err(e);
        }
        self.drop_victims(victims).await;
        // Small bodies go to the memory tier, read back from the page cache: no fill ever
        // holds a whole body in memory while it streams.
        let body = if len <= self.config.cache.memory_max_object_bytes.0 {
            match tokio::fs::read(self.disk.path(&hash)).await {
                Ok(bytes) if bytes.len() as u64 == len => Some(Bytes::from(bytes)),
                _ => None,
            }
        } else {
            None
        };
        Ok(Arc::new(Entry::new(hash, len, content_type, body).with_touch(touch)))
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

    /// Applies a new `[policy]` and purges everything cached from domains it now refuses.
    pub async fn apply_policy(
        &self,
        config: &crate::config::PolicyConfig,
    ) -> Result<PurgeReport, ProxyError> {
        let policy = Policy::new(config);
        self.fetcher.set_policy(policy.clone());
        let report = self
            .purge(move |r| {
                let host =
                    url::Url::parse(&r.url).ok().and_then(|u| u.host_str().map(String::from));
                host.is_none_or(|h| policy.check(&h).is_err())
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
    async fn scrub(this: std::sync::Weak<Proxy>) {
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
    async fn reconcile_disk(&self, started: SystemTime) {
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

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A write that failed for lack of space is [`ProxyError::StorageFull`] (503, and eviction);
/// any other local I/O failure is internal.
fn storage_error(e: std::io::Error) -> ProxyError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28) {
        ProxyError::StorageFull
    } else {
        ProxyError::internal(e)
    }
}

/// A body that ends early (reset, bad chunking) is invalid; one that stalls is a timeout.
fn body_error(e: reqwest::Error) -> ProxyError {
    if e.is_timeout() {
        ProxyError::OriginTimeout
    } else {
        ProxyError::OriginInvalid("body cut short")
    }
}
