//! The request lifecycle behind every URL scheme: memory, then negative cache, then one
//! coalesced fill per key that checks the disk index and otherwise fetches from the origin.
//!
//! A fill runs on its own task, so a viewer who disconnects cancels nothing for the others;
//! every viewer asking for the same key meanwhile waits on that one fill.

mod prepare;
mod store;

pub use crate::cache::store::PurgeReport;
pub use crate::moderation::BanReport;

use std::sync::Arc;

use crate::api::ProxyRequest;
use crate::audit::{AuditLog, Trigger};
use crate::cache::growing::Growing;
use crate::cache::received::Received;
use crate::cache::store::Store;
use crate::cache::{Entry, Key};
use crate::config::Config;
use crate::error::ProxyError;
use crate::fetch::Fetcher;
use crate::fetch::limit::FillLimits;
use crate::media::TypePolicy;
use crate::media::worker::MediaPool;
use crate::telemetry::{CacheStatus, Metrics};

use crate::cache::coalesce::{Coalescer, FillResult, Joined};

/// What a lookup found: a stored entry, or a fill to read as it arrives.
pub enum Found {
    Entry(Arc<Entry>, CacheStatus),
    Growing(Arc<Growing>, CacheStatus),
}

impl Found {
    /// The stored entry, from a lookup that did not ask for a growing fill.
    fn stored(self) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)> {
        match self {
            Found::Entry(entry, status) => Ok((entry, status)),
            Found::Growing(_, status) => {
                Err((ProxyError::internal("a growing fill where none was asked for"), status))
            }
        }
    }
}

/// Shared state of a running proxy.
pub struct Proxy {
    pub config: Config,
    pub fetcher: Fetcher,
    pub audit: AuditLog,
    /// Recent origin failures by key, so a dead origin is asked once per `cache.negative_ttl`
    /// rather than once per viewer.
    negative: moka::future::Cache<Key, ProxyError>,
    types: TypePolicy,
    pub limits: FillLimits,
    /// Every decode, render and strip runs here, in sandboxed worker processes.
    pub media: MediaPool,
    /// Bans, hash lists and the scanner: the proxy asks it at each checkpoint (request, fill,
    /// hit).
    pub moderation: Arc<crate::moderation::Moderation>,
    /// `[[policy.normalize]]`: which URLs share a cache entry.
    pub normalizer: crate::policy::Normalizer,
    /// For entries whose URLs carry an expiry: the URL seen that expires last, and when.
    /// A fill uses it, so an expired URL asked for after eviction does not fail (and its
    /// failure is not remembered for the entry) while a newer one is known. Bounded.
    newest: moka::sync::Cache<Key, (url::Url, u64)>,
    /// Memory, disk, index, disk budget and shared bucket ([`crate::cache::store`]), which
    /// runs its own upkeep.
    pub store: Arc<Store>,
    /// Fills in progress: one per key ([`crate::cache::coalesce`]).
    fills: Arc<Coalescer>,
    pub metrics: Metrics,
    /// `[[upstream]]`: path prefixes served from one fixed origin.
    pub upstreams: crate::api::upstream::Upstreams,
    /// Dropped with the proxy, when the last task holding it (a fill finishing after its
    /// viewers were answered) lets go: shutdown waits on its receiver (mini-redis's
    /// `shutdown_complete`), then knows the stores are closed.
    closed: Option<tokio::sync::mpsc::Sender<()>>,
}

impl Proxy {
    pub fn new(
        config: Config,
        fetcher: Fetcher,
        audit: AuditLog,
        store: Arc<Store>,
        moderation: Arc<crate::moderation::Moderation>,
        metrics: Metrics,
        media: MediaPool,
    ) -> Self {
        let negative: moka::future::Cache<Key, ProxyError> = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.cache.negative_ttl.0.max(std::time::Duration::from_millis(1)))
            .build();
        // A lifted ban applies at once: the refusals remembered here go (all of them: lifts
        // are rare, and the rest is refetched at most once each).
        let forget = negative.clone();
        moderation.on_lift(move || forget.invalidate_all());
        Self {
            store,
            normalizer: crate::policy::Normalizer::new(&config.policy.normalize),
            newest: moka::sync::Cache::new(100_000),
            types: TypePolicy::new(&config.media.allowed_types)
                .rasterizing_svg(config.media.svg == crate::config::SvgPolicy::Rasterize),
            media,
            moderation,
            limits: FillLimits::new(
                config.fetch.max_fills as usize,
                config.fetch.max_per_origin as usize,
            ),
            negative,
            fetcher,
            audit,
            fills: Default::default(),
            metrics,
            config,
            upstreams: Default::default(),
            closed: None,
        }
    }

    /// `closed` is dropped with the proxy: its receiver's `recv` ends once the last holder
    /// of the proxy is gone.
    pub fn with_closed(mut self, closed: tokio::sync::mpsc::Sender<()>) -> Self {
        self.closed = Some(closed);
        self
    }

    pub fn with_upstreams(mut self, upstreams: crate::api::upstream::Upstreams) -> Self {
        self.upstreams = upstreams;
        self
    }

    /// Finds or fills the entry for `req`. Viewer-facing: errors come back with the cache
    /// status that produced them, for the log line and metrics.
    pub async fn get(
        self: &Arc<Self>,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)> {
        self.find(req, trigger, false).await?.stored()
    }

    /// As [`Self::get`], but a large original that passes through unchanged may be found
    /// still arriving: its viewers read it as it does instead of waiting for the last byte.
    pub async fn get_streaming(
        self: &Arc<Self>,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<Found, (ProxyError, CacheStatus)> {
        self.find(req, trigger, true).await
    }

    async fn find(
        self: &Arc<Self>,
        req: &ProxyRequest,
        trigger: Trigger,
        stream: bool,
    ) -> Result<Found, (ProxyError, CacheStatus)> {
        // Refused destinations and blocked domains are refused even when cached: a domain
        // blocked a second ago is not served from memory.
        self.fetcher.check_destination(&req.source).map_err(|e| (e, CacheStatus::Blocked))?;
        let cache_url = req.cache_url(&self.normalizer);
        let checked = self.moderation.check_url(&req.source, cache_url).await;
        checked.map_err(|e| (e, CacheStatus::Blocked))?;
        let key = req.key(&self.normalizer);
        let request = self.newest_request(key, req);
        let fill = move |this: Arc<Self>| async move {
            // A fill that finished between this request's lookups and its leadership has
            // already published: use it rather than fetch a second time.
            if let Some(entry) = this.store.cached(&key).await {
                return Ok((entry, CacheStatus::HitMemory));
            }
            if let Some(err) = this.negative.get(&key).await {
                return Err(err);
            }
            this.fill(key, &request, trigger).await
        };
        let found = match self.lookup_or_fill_state(key, fill, stream).await? {
            Found::Entry(entry, status) => (entry, status),
            growing => return Ok(growing),
        };
        // Bytes a redirect brought from a domain blocked since: refused like the domain.
        if let Some(host) = found.0.final_host.as_deref() {
            self.fetcher.policy().check(host).map_err(|e| (e, CacheStatus::Blocked))?;
        }
        // Banned since it was cached (the ban purged it; this covers the moment between the
        // two, and entries a slow fill published after it).
        let host = found.0.final_host.as_deref().or(req.source.host_str());
        let checked = self.moderation.check_hit(&found.0, host).await;
        checked.map_err(|e| (e, CacheStatus::Blocked))?;
        Ok(Found::Entry(found.0, found.1))
    }

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
        let policy = crate::policy::Policy::new(config);
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

    /// Lets this fill's waiters read it as it arrives (when they asked for that).
    fn publish_growing(&self, key: Key, growing: Arc<Growing>) {
        self.fills.publish_growing(key, growing);
    }

    /// `req`, or the same entry under the URL seen that expires last (for URLs with an
    /// expiry, `[[policy.normalize]]`), remembering `req`'s URL if it is that one.
    fn newest_request(&self, key: Key, req: &ProxyRequest) -> ProxyRequest {
        let Some(expiry) = self.normalizer.expiry(&req.source) else { return req.clone() };
        match self.newest.get(&key) {
            Some((url, known)) if known > expiry => req.respelled(url),
            _ => {
                self.newest.insert(key, (req.source.clone(), expiry));
                req.clone()
            }
        }
    }

    /// Whether renditions of a file of `content_type` are pictures of it: the formats the
    /// media workers decode, and AVIF while there is ffmpeg.
    pub fn can_render(&self, content_type: &str) -> bool {
        crate::media::DECODED.contains(&content_type)
            || (content_type.starts_with("image/") && self.media.frame_tool(content_type).is_some())
    }

    /// Whether `req` is held in memory or on disk (no fill needed).
    pub async fn is_cached(&self, req: &ProxyRequest) -> bool {
        let key = req.key(&self.normalizer);
        self.store.contains(key).await
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
        self.lookup_or_fill_state(key, fill, false).await?.stored()
    }

    /// [`Self::lookup_or_fill`]; with `stream`, a fill whose body may be read as it arrives
    /// is answered as soon as it may.
    async fn lookup_or_fill_state<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        fill: F,
        stream: bool,
    ) -> Result<Found, (ProxyError, CacheStatus)>
    where
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = FillResult> + Send + 'static,
    {
        if let Some(entry) = self.store.cached(&key).await {
            entry.hit();
            return Ok(Found::Entry(entry, CacheStatus::HitMemory));
        }
        if let Some(err) = self.negative.get(&key).await {
            return Err((err, CacheStatus::Negative));
        }
        let this = self.clone();
        let fill = async move {
            let result = fill(this.clone()).await;
            // Remembered before it is published: a newcomer finds it, or the fill.
            if let Err(e) = &result {
                if e.is_negative_cacheable() && !this.negative.contains_key(&key) {
                    this.negative.insert(key, e.clone()).await;
                }
            }
            result
        };
        let (joined, leader) = self.fills.join(key, fill, stream).await;
        let status = if leader { CacheStatus::Miss } else { CacheStatus::Coalesced };
        let outcome = match joined {
            Joined::Growing(growing) => return Ok(Found::Growing(growing, status)),
            Joined::Done(result) => result,
        };
        match outcome {
            Ok((entry, status)) if leader => Ok(Found::Entry(entry, status)),
            Ok((entry, _)) => Ok(Found::Entry(entry, CacheStatus::Coalesced)),
            // A redirect into a refused destination is still a refusal, not an origin miss.
            Err(
                e @ (ProxyError::BlockedDomain
                | ProxyError::BlockedDestination(_)
                | ProxyError::RefusedUrl(_)
                | ProxyError::RedirectRefused),
            ) => Err((e, CacheStatus::Blocked)),
            Err(e) => Err((e, status)),
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
        self.get_rendition(req, name, spec, trigger).await
    }

    /// Finds or renders `req`'s source as `spec`, cached under `name` (a configured preset's
    /// name, or a rendition the pict-rs API asked for).
    pub async fn get_rendition(
        self: &Arc<Self>,
        req: &ProxyRequest,
        name: &str,
        spec: crate::config::VariantConfig,
        trigger: Trigger,
    ) -> Result<(Arc<Entry>, CacheStatus), (ProxyError, CacheStatus)> {
        let original_req = req.original();
        let (original, status) = self.get(&original_req, trigger).await?;
        let content_type = original.content_type.to_str().unwrap_or_default();
        let small = original.len < spec.originals_below.0;
        if small || (!content_type.starts_with("image/") && !prepare::needs_frame(content_type)) {
            // Audio has no renditions, and a preset may serve small originals as they are.
            return Ok((original, status));
        }
        let key = Key::new(&format!("blake3:{}", original.hash.to_hex()), Some(name));
        let url = req.source.to_string();
        let found = self
            .lookup_or_fill(key, move |this| async move {
                if let Some(entry) = this.store.load(key).await? {
                    this.store.remember(key, entry.clone()).await;
                    return Ok((entry, CacheStatus::HitDisk));
                }
                let entry = match this.render_and_store(key, &url, &original, &spec).await? {
                    Some(rendered) => rendered,
                    // The preset keeps this original (kept in memory under the rendition's
                    // key, so the worker is asked once while it stays there).
                    None => original.clone(),
                };
                this.store.remember(key, entry.clone()).await;
                Ok((entry, CacheStatus::Miss))
            })
            .await?;
        // A ban may name a rendition by the ETag it was served with.
        let checked = self.moderation.check_hit(&found.0, req.source.host_str()).await;
        checked.map_err(|e| (e, CacheStatus::Blocked))?;
        Ok(found)
    }

    /// The leader's work: the disk index first, then the origin.
    async fn fill(self: &Arc<Self>, key: Key, req: &ProxyRequest, trigger: Trigger) -> FillResult {
        if let Some(entry) = self.store.load(key).await? {
            self.store.remember(key, entry.clone()).await;
            return Ok((entry, CacheStatus::HitDisk));
        }
        if let Some(entry) = self.load_from_shared(key).await {
            self.store.remember(key, entry.clone()).await;
            return Ok((entry, CacheStatus::HitShared));
        }
        let entry = self.fetch_and_store(key, req, trigger).await?;
        self.store.remember(key, entry.clone()).await;
        self.publish(key, req.source.as_str(), &entry);
        Ok((entry, CacheStatus::Miss))
    }

    /// Asks the shared bucket for `key` and stores what it has on this node. Any failure of
    /// the bucket is a miss here (counted and logged): the origin is asked instead.
    async fn load_from_shared(self: &Arc<Self>, key: Key) -> Option<Arc<Entry>> {
        let shared = self.store.shared()?;
        let outcome = match self.receive_shared(shared, key).await {
            Ok(Some((url, received))) => match self.vet_shared(received, &url).await {
                Ok(received) => match self.store.insert(key, &url, received).await {
                    Ok(entry) => {
                        self.metrics.shared_result("lookup", "hit");
                        return Some(entry);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot store a blob from the shared tier");
                        "error"
                    }
                },
                Err((hash, why, true)) => {
                    // Not what a node would have published: gone, so the origin's answer
                    // (fetched now) replaces it.
                    tracing::warn!(%hash, why, "shared tier blob refused and deleted");
                    shared.discard(&key, &hash).await;
                    "refused"
                }
                // This node could not vet it now (workers busy, the scanner away): a miss
                // here, the bucket keeps it.
                Err((hash, why, false)) => {
                    tracing::debug!(%hash, why, "shared tier blob not vetted now");
                    "error"
                }
            },
            Ok(None) => "miss",
            Err(e) => {
                shared.warn("lookup", &e);
                "error"
            }
        };
        self.metrics.shared_result("lookup", outcome);
        None
    }

    /// A body from the bucket passes the preparation an origin's body gets (SVG drawn to PNG,
    /// metadata stripped, in a media worker). A node publishes only prepared bodies, so one
    /// that preparing would change, or that preparing refuses, did not come from a node.
    /// The error says whether the blob is to be deleted from the bucket: when it is not what
    /// a node publishes (or is banned), not when this node merely could not vet it now.
    async fn vet_shared(
        self: &Arc<Self>,
        r: Received,
        url: &str,
    ) -> Result<Received, (blake3::Hash, String, bool)> {
        let hash = r.hash;
        let doomed = |e: &ProxyError| {
            matches!(
                e,
                ProxyError::Banned(_)
                    | ProxyError::BadImage(_)
                    | ProxyError::MediaTooCostly(_)
                    | ProxyError::UnsupportedType
            )
        };
        if let Err(e) = self.moderation.check_received(&r, "shared bucket").await {
            return Err((hash, e.to_string(), doomed(&e)));
        }
        match self.prepare(r, &prepare::host_of_url(url)).await {
            Ok(mut prepared) if prepared.hash == hash => {
                // Moderation holds for the bucket too: a banned file, or one the scanner has
                // not seen on this node.
                match self.moderation.check_prepared(&mut prepared, "shared bucket").await {
                    Ok(()) => Ok(prepared),
                    Err(e) => Err((hash, e.to_string(), doomed(&e))),
                }
            }
            Ok(_) => Err((hash, "not prepared (an SVG, or metadata left in)".into(), true)),
            Err(e) => Err((hash, e.to_string(), doomed(&e))),
        }
    }

    /// The record and body of `key` from the bucket (verified by the tier), sniffed as an
    /// origin's answer is. Small bodies come into memory, larger ones stream into a temp blob.
    async fn receive_shared(
        &self,
        shared: &crate::cache::shared::SharedTier,
        key: Key,
    ) -> Result<Option<(String, Received)>, crate::cache::shared::SharedError> {
        let max = self.config.cache.max_object_bytes.0;
        let digests = self.moderation.wants_digests();
        let mut sink = self.store.sink().with_digests(digests);
        let Some(record) = shared.download(&key, max, &mut sink).await? else { return Ok(None) };
        // The bucket's word on the type is not taken either: sniffed again, as from an origin.
        let not_allowed =
            |_| crate::cache::shared::SharedError::Record("not an allowed type".into());
        let content_type = self.types.sniff(sink.head()).map_err(not_allowed)?;
        let mut received = sink.finish(content_type);
        received.final_host = record.final_host.clone();
        received.origin = record.origin.clone();
        if received.hash != record.blake3().expect("download checked the hash") {
            return Err(crate::cache::shared::SharedError::Record("hash mismatch".into()));
        }
        Ok(Some((record.url, received)))
    }

    /// Uploads a fill to the shared bucket in the background, so other nodes need not ask the
    /// origin. Bounded: when too many uploads wait, this one is skipped (and counted).
    fn publish(&self, key: Key, url: &str, entry: &Arc<Entry>) {
        let Some(shared) = self.store.shared().cloned() else { return };
        let Some(ticket) = shared.upload_ticket() else {
            self.metrics.shared_result("publish", "skipped");
            return;
        };
        let content_type = entry.content_type.to_str().unwrap_or_default();
        let record = crate::cache::index::Record::new(&entry.hash, entry.len, content_type, url)
            .with_final_host(entry.final_host.as_deref())
            .with_origin(entry.origin.as_deref().cloned());
        let (body, hash) = (entry.body.clone(), entry.hash);
        let path = self.store.blob_path(&hash);
        let ok = self.metrics.shared_counter("publish", "ok");
        let failed = self.metrics.shared_counter("publish", "error");
        tokio::spawn(async move {
            let _ticket = ticket;
            let Some(_slot) = shared.upload_slot().await else { return };
            let published = match body {
                Some(bytes) => shared.publish(&key, &record, bytes).await,
                // Large: uploaded in parts from the file (evicted meanwhile: an error, counted).
                None => shared.publish_file(&key, &record, path).await,
            };
            match published {
                Ok(()) => {
                    ok.inc();
                }
                Err(e) => {
                    failed.inc();
                    shared.warn("publish", &e);
                }
            }
        });
    }
}
