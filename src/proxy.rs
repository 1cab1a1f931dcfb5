//! The request lifecycle behind every URL scheme: memory, then negative cache, then one
//! coalesced fill per key that checks the disk index and otherwise fetches from the origin.
//!
//! A fill runs on its own task, so a viewer who disconnects cancels nothing for the others;
//! every viewer asking for the same key meanwhile waits on that one fill.

mod prepare;
mod sources;

pub use crate::cache::store::PurgeReport;
pub use crate::moderation::BanReport;

use std::sync::Arc;

use crate::api::ProxyRequest;
use crate::audit::Trigger;
use crate::cache::growing::Growing;
use crate::cache::received::Received;
use crate::cache::store::Store;
use crate::cache::{Entry, Key};
use crate::config::Config;
use crate::error::ProxyError;
use crate::fetch::Fetcher;
use crate::media::worker::MediaPool;
use crate::telemetry::{CacheStatus, Metrics};

use crate::cache::coalesce::{Coalescer, FillResult, Joined};

/// How far ahead of parasol's clock an origin's may run: a 403 for a URL expiring within
/// this is taken for the expiry, not a refusal.
const EXPIRY_SKEW_SECS: u64 = 300;

/// The name the ledger is kept under in the index's state table.
const LEDGER_STATE: &str = "ledger";

/// What a lookup found: a stored entry, or a fill to read as it arrives.
pub enum Found {
    /// Stored: the entry, and where it was found.
    Entry(Arc<Entry>, CacheStatus),
    /// Still arriving: its body as it does, and how it was found.
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
    config: Config,
    /// Recent origin failures by key, so a dead origin is asked once per `cache.negative_ttl`
    /// rather than once per viewer.
    negative: moka::future::Cache<Key, ProxyError>,
    /// The origin as a source of fills ([`sources::Origin`]).
    origin: sources::Origin,
    /// The bucket other nodes share, a source of fills and where they go ([`sources::Bucket`]).
    bucket: Option<sources::Bucket>,
    /// The media work of fills and renditions: every decode, render and strip runs in
    /// sandboxed worker processes ([`prepare::Prepare`]).
    prep: prepare::Prepare,
    /// Bans, hash lists and the scanner: the proxy asks it at each checkpoint (request, fill,
    /// hit).
    moderation: Arc<crate::moderation::Moderation>,
    /// `[[policy.normalize]]`: which URLs share a cache entry.
    normalizer: crate::policy::Normalizer,
    /// For entries whose URLs carry an expiry: the URL seen that expires last, and when.
    /// A fill uses it, so an expired URL asked for after eviction does not fail (and its
    /// failure is not remembered for the entry) while a newer one is known. Bounded.
    newest: moka::sync::Cache<Key, (url::Url, u64)>,
    /// Memory, disk, index, disk budget and shared bucket ([`crate::cache::store`]), which
    /// runs its own upkeep.
    store: Arc<Store>,
    /// Fills in progress: one per key ([`crate::cache::coalesce`]).
    fills: Arc<Coalescer>,
    metrics: Metrics,
    /// What each origin costs ([`crate::ledger`]); the fetcher counts its requests there.
    ledger: Arc<crate::ledger::Ledger>,
    /// Dropped with the proxy, when the last task holding it (a fill finishing after its
    /// viewers were answered) lets go: shutdown waits on its receiver (mini-redis's
    /// `shutdown_complete`), then knows the stores are closed.
    closed: Option<tokio::sync::mpsc::Sender<()>>,
}

impl Proxy {
    /// A proxy over `store`, fetching with `fetcher`, moderated by `moderation`, its media work
    /// on `media`, as `config` says.
    pub fn new(
        config: Config,
        fetcher: Fetcher,
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
        let fills: Arc<Coalescer> = Default::default();
        let origin = sources::Origin::new(
            &config,
            fetcher,
            store.clone(),
            moderation.clone(),
            fills.clone(),
            metrics.clone(),
        );
        Self {
            normalizer: crate::policy::Normalizer::new(&config.policy.normalize),
            newest: moka::sync::Cache::new(100_000),
            prep: prepare::Prepare::new(media, store.clone(), config.media.clone(), &metrics),
            moderation,
            negative,
            origin,
            bucket: None,
            fills,
            metrics,
            config,
            ledger: Arc::default(),
            closed: None,
            store,
        }
    }

    /// `closed` is dropped with the proxy: its receiver's `recv` ends once the last holder
    /// of the proxy is gone.
    pub fn with_closed(mut self, closed: tokio::sync::mpsc::Sender<()>) -> Self {
        self.closed = Some(closed);
        self
    }

    /// With the bucket other nodes share (`[shared]`) as a source of fills and where this
    /// node's fills go.
    pub fn with_bucket(mut self, shared: Option<crate::cache::shared::SharedTier>) -> Self {
        self.bucket = shared.map(|shared| {
            let (store, moderation) = (self.store.clone(), self.moderation.clone());
            sources::Bucket::new(shared, &self.config, store, moderation, self.metrics.clone())
        });
        self
    }

    /// Counting viewers' requests into `ledger` (the one its fetcher counts into).
    pub fn with_ledger(mut self, ledger: Arc<crate::ledger::Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// What each origin costs.
    pub fn ledger(&self) -> &Arc<crate::ledger::Ledger> {
        &self.ledger
    }

    /// The ledger's rows with what is stored of each origin now (read from the index), ordered
    /// by `by`, at most `limit`.
    pub async fn origins(
        &self,
        by: crate::ledger::SortBy,
        limit: usize,
    ) -> Result<Vec<crate::ledger::Row>, ProxyError> {
        let mut rows: std::collections::HashMap<String, crate::ledger::Row> =
            self.ledger.rows().into_iter().map(|r| (r.domain.clone(), r)).collect();
        for (_, record) in self.store.records().await? {
            let Some(host) = record.hosts().0 else { continue };
            let domain = crate::policy::origin_of(&host);
            let row = rows
                .entry(domain.clone())
                .or_insert_with(|| crate::ledger::Row { domain, ..Default::default() });
            row.stored_objects += 1;
            row.stored_bytes += record.len;
        }
        Ok(crate::ledger::sorted(rows.into_values().collect(), by, limit))
    }

    /// Every index record (an admin's lookup).
    pub async fn records(&self) -> Result<Vec<(Key, crate::cache::index::Record)>, ProxyError> {
        self.store.records().await
    }

    /// The form of `url` its cache key is made of (`[[policy.normalize]]`).
    pub fn cache_url(&self, url: &url::Url) -> String {
        self.normalizer.cache_url(url).into_owned()
    }

    /// Keeps the ledger's counters in the index, so they survive a restart.
    pub async fn save_ledger(&self) -> Result<(), ProxyError> {
        self.store.put_state(LEDGER_STATE, self.ledger.to_json()).await
    }

    /// Adds the counters an earlier run kept; ones that cannot be read are reported and left.
    pub async fn load_ledger(&self) {
        match self.store.state(LEDGER_STATE).await {
            Ok(Some(bytes)) => match self.ledger.load_json(&bytes) {
                Ok(origins) => tracing::info!(origins, "origin ledger loaded"),
                Err(e) => tracing::warn!(error = %e, "origin ledger unreadable, starting afresh"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the origin ledger"),
        }
    }

    /// Brings the per-origin metrics up to the ledger: a series per domain a
    /// `[[policy.origin]]` rule names, `other` for the rest (bounded cardinality).
    pub fn export_origin_metrics(&self) {
        let policy = self.origin.fetcher.policy();
        let named: Vec<&str> = policy.rule_domains().collect();
        let mut totals: std::collections::HashMap<&str, (u64, u64, u64)> = Default::default();
        let rows = self.ledger.rows();
        for row in &rows {
            let label = named
                .iter()
                .find(|d| {
                    crate::policy::covers(d, &row.domain) || crate::policy::covers(&row.domain, d)
                })
                .copied()
                .unwrap_or("other");
            let t = totals.entry(label).or_default();
            t.0 += row.requests;
            t.1 += row.fetched_bytes;
            t.2 += row.served_bytes;
        }
        let m = &self.metrics;
        for (domain, (requests, fetched, served)) in totals {
            let labels = crate::telemetry::DomainLabels { domain: domain.to_string() };
            for (family, total) in [
                (&m.origin_requests, requests),
                (&m.origin_fetched_bytes, fetched),
                (&m.origin_served_bytes, served),
            ] {
                let counter = family.get_or_create(&labels);
                counter.inc_by(total.saturating_sub(counter.get()));
            }
        }
        m.origins_backing_off.set(self.origin.fetcher.backing_off() as i64);
    }

    /// With `[[upstream]]` prefixes served from fixed origins.
    pub fn with_upstreams(mut self, upstreams: crate::api::upstream::Upstreams) -> Self {
        self.origin.upstreams = upstreams;
        self
    }

    /// `[[upstream]]`: path prefixes served from one fixed origin.
    pub fn upstreams(&self) -> &crate::api::upstream::Upstreams {
        &self.origin.upstreams
    }

    /// The media work of fills and renditions (measures, what can be rendered, the pool).
    pub fn media(&self) -> &prepare::Prepare {
        &self.prep
    }

    /// The configuration it runs on.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Its metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Bans, hash lists and the scanner.
    pub fn moderation(&self) -> &Arc<crate::moderation::Moderation> {
        &self.moderation
    }

    /// How many stored files are kept in segment files rather than a file each.
    pub fn segment_blobs(&self) -> usize {
        self.store.segment_blobs()
    }

    /// What the tiers hold now.
    pub async fn usage(&self) -> crate::cache::store::Usage {
        self.store.usage().await
    }

    /// The response for a found `entry` (a viewer's `method` and `headers`, on `conn` when
    /// its body may go from a file); a blob found gone or resized meanwhile is forgotten, so
    /// the next request refills it.
    pub async fn respond(
        &self,
        entry: &Entry,
        method: &http::Method,
        headers: &http::HeaderMap,
        conn: Option<&Arc<crate::server::sendfile::Offers>>,
    ) -> Result<(http::Response<crate::response::Body>, u64), ProxyError> {
        let served = crate::response::serve(entry, &self.store, method, headers, conn).await;
        if served.is_err() && entry.is_kept() {
            self.store.forget_if_broken(&entry.hash, entry.len).await;
        }
        served
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
        self.check_request(req).await.map_err(|e| (e, CacheStatus::Blocked))?;
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
            self.origin.fetcher.policy().check(host).map_err(|e| (e, CacheStatus::Blocked))?;
        }
        // Banned since it was cached (the ban purged it; this covers the moment between the
        // two, and entries a slow fill published after it).
        let host = found.0.final_host.as_deref().or(req.source.host_str());
        let checked = self.moderation.check_hit(&found.0, host).await;
        checked.map_err(|e| (e, CacheStatus::Blocked))?;
        Ok(Found::Entry(found.0, found.1))
    }

    /// Whether `req` may be asked for at all: its destination, the domain policy, and
    /// moderation's rules on its URL and host.
    pub async fn check_request(&self, req: &ProxyRequest) -> Result<(), ProxyError> {
        self.origin.fetcher.check_destination(&req.source)?;
        let cache_url = req.cache_url(&self.normalizer);
        self.moderation.check_url(&req.source, cache_url).await
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

    /// Drops everything cached from `domain` (normalised) or its subdomains.
    pub async fn purge_domain(&self, domain: String) -> Result<PurgeReport, ProxyError> {
        self.store.purge_domain(domain).await
    }

    /// Applies a new `[policy]` and purges everything cached from domains it now refuses.
    pub async fn apply_policy(
        &self,
        config: &crate::config::PolicyConfig,
    ) -> Result<PurgeReport, ProxyError> {
        let policy = crate::policy::Policy::new(config);
        self.origin.fetcher.set_policy(policy.clone());
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

    /// The cache key of `req`.
    pub fn key_of(&self, req: &ProxyRequest) -> Key {
        req.key(&self.normalizer)
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
        // A disk hit that needs no wait is loaded here, without a task of its own (the memory
        // tier's insert boxed: the memory hit above does not carry its state).
        if let Some(entry) = self.store.load_now(key) {
            Box::pin(self.store.remember(key, entry.clone())).await;
            return Ok(Found::Entry(entry, CacheStatus::HitDisk));
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
        let name = name.to_string();
        let found = self
            .lookup_or_fill(key, move |this| async move {
                if let Some(entry) = this.store.load(key).await? {
                    this.store.remember(key, entry.clone()).await;
                    return Ok((entry, CacheStatus::HitDisk));
                }
                let rendered = this.prep.render(&url, &original, &spec).await?;
                let entry = match rendered {
                    // A rendition of what is not kept is not kept either.
                    Some(rendered) if !original.is_kept() => {
                        return Ok((this.store.unkept(rendered).await?, CacheStatus::Miss));
                    }
                    Some(rendered) => {
                        this.store.insert_as(key, &url, Some(&name), rendered).await?
                    }
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
        if let Some(bucket) = &self.bucket {
            if let Some(entry) = bucket.load(key, &self.prep).await {
                self.store.remember(key, entry.clone()).await;
                return Ok((entry, CacheStatus::HitShared));
            }
        }
        let entry = self.fetch_and_store(key, req, trigger).await?;
        if !entry.is_kept() {
            return Ok((entry, CacheStatus::Miss));
        }
        self.store.remember(key, entry.clone()).await;
        if let Some(bucket) = &self.bucket {
            bucket.publish(key, req.source.as_str(), &entry);
        }
        Ok((entry, CacheStatus::Miss))
    }

    /// Fetches `req.source` and stores it. `fetch.timeout` bounds the origin's part
    /// ([`sources::Origin::fetch`]); storing what arrived in time always runs to the end, so a
    /// deadline can never leave a blob on disk that the budget does not count.
    async fn fetch_and_store(
        &self,
        key: Key,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<Arc<Entry>, ProxyError> {
        // An expired URL is not fetched (it cannot succeed, and would tell the origin someone
        // still looks); its origin is not counted as failing for it.
        let expiry = self.normalizer.expiry(&req.source);
        let now = crate::cache::evict::now_secs();
        if expiry.is_some_and(|at| at < now) {
            return Err(ProxyError::SourceExpired);
        }
        // The source's origin rule, read once for the whole fill (a reload meanwhile applies
        // to the next).
        let policy = self.origin.fetcher.policy();
        let rule = policy.rule(req.source.host_str().unwrap_or_default()).map(|r| &**r);
        let result = match self.origin.fetch(key, req, trigger, rule).await {
            Ok(received) => self.moderate_and_store(key, req, received, rule).await,
            // A 403 for a URL that expires about now (the origin's clock may run ahead).
            Err(ProxyError::OriginStatus(403))
                if expiry.is_some_and(|at| at <= now + EXPIRY_SKEW_SECS) =>
            {
                Err(ProxyError::SourceExpired)
            }
            Err(e) => Err(e),
        };
        if let Err(ProxyError::StorageFull) = result {
            // The disk filled before the budget did (other files share it, or disk_bytes is
            // set too high): make room for a few objects like this one, so the next try fits.
            self.store.make_room(self.config.cache.max_object_bytes.0).await;
        }
        result
    }

    /// Moderation of the origin's bytes, preparation, moderation of the bytes to serve (the
    /// scanner among it), then the store: nothing refused is stored or served.
    async fn moderate_and_store(
        &self,
        key: Key,
        req: &ProxyRequest,
        received: Received,
        rule: Option<&crate::policy::OriginRule>,
    ) -> Result<Arc<Entry>, ProxyError> {
        let host = received.final_host.clone();
        let host = host.as_deref().or(req.source.host_str()).unwrap_or_default();
        self.moderation.check_received(&received, host).await?;
        let origin_hash = received.hash;
        let source_host = req.source.host_str().unwrap_or_default();
        // Its origin's rule: how long it is kept at least, or that it is not kept at all.
        let streamed =
            received.oversize || rule.is_some_and(|r| r.store == crate::config::StoreMode::Stream);
        let mut prepared = self.prep.prepare(received, source_host).await?;
        // Kept with the entry when the origin's bytes are not the stored ones (preparing then
        // computed their digests), or their digests were computed: rules about the origin's
        // bytes find it by them later, also on a hit.
        let digests = prepared.digests;
        if prepared.hash != origin_hash || digests.is_some() {
            prepared.origin = Some(crate::cache::index::OriginDigests {
                blake3: origin_hash.to_hex().to_string(),
                sha256: digests.map(|d| hex::encode(d.sha256)),
                md5: digests.map(|d| hex::encode(d.md5)),
            });
        }
        self.moderation.check_prepared(&mut prepared, host).await?;
        if streamed {
            return self.store.unkept(prepared).await;
        }
        let keep = rule.and_then(|r| r.keep_at_least).map(|d| d.as_secs());
        prepared.keep_until = keep.map(|secs| crate::cache::evict::now_secs() + secs);
        self.store.insert(key, req.source.as_str(), prepared).await
    }
}
