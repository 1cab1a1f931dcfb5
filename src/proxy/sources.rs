//! Where a fill's bytes come from besides the disk: the origin ([`Origin`]: a guarded fetch
//! within the fill slots and `fetch.timeout`, its body into memory or a temp blob while it is
//! hashed, sniffed and counted, readable by viewers as it arrives when nothing must see it
//! first), and the bucket other nodes share ([`Bucket`]: a stored body vetted as an origin's
//! is, and fills published for the others).

use std::sync::Arc;
use tokio::time::Instant;

use super::Received;
use super::prepare::Prepare;
use crate::api::ProxyRequest;
use crate::audit::Trigger;
use crate::cache::coalesce::Coalescer;
use crate::cache::store::Store;
use crate::cache::{Entry, Key};
use crate::error::ProxyError;
use crate::fetch::Fetcher;
use crate::fetch::limit::FillLimits;
use crate::media::{SNIFF_LEN, TypePolicy};
use crate::moderation::Moderation;
use crate::policy::OriginRule;
use crate::telemetry::{Metrics, OutcomeLabels, traces};
use tracing::Instrument;

/// The origin as a source of fills.
pub struct Origin {
    /// Every request to an origin: guarded, audited.
    pub(super) fetcher: Fetcher,
    /// Fill slots, in all and per origin.
    limits: FillLimits,
    /// `[[upstream]]`: path prefixes served from one fixed origin (signed fetches of a
    /// private bucket).
    pub(super) upstreams: crate::api::upstream::Upstreams,
    /// What may be served, by the bytes' own type.
    types: TypePolicy,
    /// Where bodies arrive (memory within the in-flight budget, or a temp blob).
    store: Arc<Store>,
    /// Whether something must see a whole body first, and which digests to compute.
    moderation: Arc<Moderation>,
    /// Whose waiters may read a body as it arrives.
    fills: Arc<Coalescer>,
    metrics: Metrics,
    /// `fetch.timeout`: the origin's part of a fill, slot, headers and body.
    timeout: std::time::Duration,
    /// `cache.max_object_bytes`.
    max_object_bytes: u64,
    /// With `cache.oversize = "stream"`: the largest body streamed (not kept) over the size
    /// limit, a quarter of `cache.disk_bytes` (its temp file holds disk beside the budget).
    oversize_cap: Option<u64>,
    /// `moderation.keep_digests`: SHA-256 and MD5 of every fill, rule or not.
    keep_digests: bool,
    /// `media.strip_metadata`: JPEG, PNG and WebP are prepared, never read as they arrive.
    strip_metadata: bool,
}

impl Origin {
    /// The origin source of a proxy configured by `config`.
    pub fn new(
        config: &crate::config::Config,
        fetcher: Fetcher,
        store: Arc<Store>,
        moderation: Arc<Moderation>,
        fills: Arc<Coalescer>,
        metrics: Metrics,
    ) -> Self {
        Self {
            fetcher,
            limits: FillLimits::new(
                config.fetch.max_fills as usize,
                config.fetch.max_per_origin as usize,
            ),
            upstreams: Default::default(),
            types: types(config),
            store,
            moderation,
            fills,
            metrics,
            timeout: config.fetch.timeout.0,
            max_object_bytes: config.cache.max_object_bytes.0,
            oversize_cap: (config.cache.oversize == crate::config::Oversize::Stream)
                .then_some(config.cache.disk_bytes.0 / 4),
            keep_digests: config.moderation.keep_digests,
            strip_metadata: config.media.strip_metadata,
        }
    }

    /// Fetches `req.source` into a received body, within a fill slot and `fetch.timeout`
    /// (waiting for a per-origin slot, headers, body), as its origin's `rule` says. The slot
    /// goes back when the body is in, before a media worker sees it: slow or stuck media jobs
    /// never hold fills from others.
    pub async fn fetch(
        &self,
        key: Key,
        req: &ProxyRequest,
        trigger: Trigger,
        rule: Option<&OriginRule>,
    ) -> Result<Received, ProxyError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let host = req.source.host_str().unwrap_or_default();
        let triggered = crate::telemetry::TriggerLabels { trigger: trigger.as_str() };
        self.metrics.fetch_triggers.get_or_create(&triggered).inc();
        // A host being left alone is answered at once: no slot, no turn is waited for.
        self.fetcher.check_backoff(host).inspect_err(|e| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: e.code() }).inc();
        })?;
        let span = traces::origin_fetch(host, trigger.as_str());
        let fetched = tokio::time::timeout_at(deadline, async {
            let mut permit = self.limits.acquire(host, rule, deadline).await?;
            let max = rule.and_then(|r| r.max_object_bytes).unwrap_or(self.max_object_bytes);
            self.receive(key, req, trigger, &mut permit, max).await
        })
        .instrument(span.clone())
        .await
        .unwrap_or_else(|_| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: "origin_timeout" }).inc();
            Err(ProxyError::OriginTimeout)
        });
        traces::outcome(&span, &fetched);
        fetched
    }

    /// Streams the origin's body into a temp blob while hashing, sniffing and counting; anything
    /// refused leaves no file behind (the temp blob removes itself when dropped).
    async fn receive(
        &self,
        key: Key,
        req: &ProxyRequest,
        trigger: Trigger,
        permit: &mut crate::fetch::limit::FillPermit,
        max: u64,
    ) -> Result<Received, ProxyError> {
        let started = Instant::now();
        // An object of a bucket read with credentials is fetched by a freshly signed URL.
        let signed = self.upstreams.fetch_url(&req.source).await?;
        let url = signed.as_ref().unwrap_or(&req.source);
        let origin = self.fetcher.get(url, trigger, permit).await.inspect_err(|e| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: e.code() }).inc();
        })?;
        let status = origin.response.status().as_u16();
        let mut response = origin.response;
        let landed = response.url().host_str().filter(|h| Some(*h) != req.source.host_str());
        let final_host = landed.map(str::to_string);
        // Viewers may read the body as it arrives unless something must see all of it first
        // (the scanner, content rules) or the bytes it came from are refused.
        let readable = req.variant.is_none()
            && !self.moderation.inspects_content()
            && landed.is_none_or(|h| self.moderation.check_host(h).is_ok());
        let mut count = 0u64;
        let growing = readable.then_some(key);
        let result =
            self.read_body(&mut response, &mut count, growing, max).await.map(|mut received| {
                received.final_host = final_host;
                received
            });
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

    /// Receives an origin's body. With `growing`, a large body that passes through unchanged
    /// is published to that fill's waiters as it arrives ([`crate::cache::growing`]).
    async fn read_body(
        &self,
        response: &mut reqwest::Response,
        received: &mut u64,
        growing: Option<Key>,
        max: u64,
    ) -> Result<Received, ProxyError> {
        let declared = response.content_length();
        // Over `max`, up to the oversize cap: read, served, not kept.
        let cap = self.oversize_cap.map_or(max, |cap| cap.max(max));
        if declared.is_some_and(|n| n > cap) {
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
        // Small bodies (by their declared length, or so far) are held in memory while the
        // in-flight budget has room; others stream into a temp blob.
        let digests = self.keep_digests || self.moderation.wants_digests();
        let mut sink = self.store.sink().with_digests(digests);
        sink.start(declared).await.map_err(ProxyError::storage)?;
        let mut content_type = None;
        // The growing fill's publisher (dropped before `complete`, its readers end broken),
        // and when its file was last made readable.
        let mut publisher: Option<crate::cache::growing::Publisher> = None;
        let mut flushed = (0u64, Instant::now());
        while let Some(chunk) = response.chunk().await.map_err(body_error)? {
            *received += chunk.len() as u64;
            if *received > cap {
                return Err(ProxyError::TooLarge);
            }
            if declared.is_some_and(|n| *received > n) {
                return Err(ProxyError::OriginInvalid("body longer than Content-Length"));
            }
            sink.push_chunk(&chunk).await.map_err(ProxyError::storage)?;
            if content_type.is_none() && sink.head().len() == SNIFF_LEN {
                content_type = Some(self.types.sniff(sink.head())?);
            }
            match (&publisher, growing, content_type) {
                // Readable in pieces of 64 KiB, or every 20 ms for a slow origin.
                (Some(p), _, _)
                    if *received - flushed.0 >= 64 << 10
                        || flushed.1.elapsed().as_millis() >= 20 =>
                {
                    sink.flush().await.map_err(ProxyError::storage)?;
                    p.0.arrived(*received);
                    flushed = (*received, Instant::now());
                }
                // Readers may join once the body goes to a file: from its first bytes when
                // its declared length is large, once it outgrows memory when it declared none.
                (None, Some(key), Some(sniffed))
                    if sink.on_disk() && self.passes_through(sniffed) =>
                {
                    let file = sink.reader().await.map_err(ProxyError::storage)?;
                    let g = crate::cache::growing::Growing::new(sniffed, declared, file);
                    g.arrived(*received);
                    flushed = (*received, Instant::now());
                    self.fills.publish_growing(key, g.clone());
                    publisher = Some(crate::cache::growing::Publisher(g));
                }
                _ => {}
            }
        }
        if *received == 0 {
            return Err(ProxyError::OriginInvalid("empty body"));
        }
        if declared.is_some_and(|n| n != *received) {
            return Err(ProxyError::OriginInvalid("body shorter than Content-Length"));
        }
        if let Some(p) = publisher {
            // Whole, and as long as it said: its readers may have the last byte.
            sink.flush().await.map_err(ProxyError::storage)?;
            p.0.arrived(*received);
            p.complete(*received);
        }
        let content_type = match content_type {
            Some(t) => t,
            None => self.types.sniff(sink.head())?,
        };
        let mut received_body = sink.finish(content_type);
        received_body.oversize = *received > max;
        Ok(received_body)
    }

    /// Whether a fill of `content_type` is stored as it came (nothing rasterises it or strips
    /// its metadata), so its bytes may be read before it is stored.
    fn passes_through(&self, content_type: &str) -> bool {
        let stripped = self.strip_metadata
            && matches!(content_type, "image/jpeg" | "image/png" | "image/webp");
        content_type != crate::media::SVG && !stripped
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

/// The bucket several nodes share, as a source of fills (what another node fetched) and where
/// this node's fills go for the others.
pub struct Bucket {
    /// The bucket.
    shared: crate::cache::shared::SharedTier,
    store: Arc<Store>,
    /// A body from the bucket passes the moderation an origin's does.
    moderation: Arc<Moderation>,
    /// The bucket's word on a type is not taken: sniffed again.
    types: TypePolicy,
    metrics: Metrics,
    /// `cache.max_object_bytes`.
    max_object_bytes: u64,
}

impl Bucket {
    pub fn new(
        shared: crate::cache::shared::SharedTier,
        config: &crate::config::Config,
        store: Arc<Store>,
        moderation: Arc<Moderation>,
        metrics: Metrics,
    ) -> Self {
        let max_object_bytes = config.cache.max_object_bytes.0;
        Self { shared, store, moderation, types: types(config), metrics, max_object_bytes }
    }

    /// Asks the shared bucket for `key` and stores what it has on this node. Any failure of
    /// the bucket is a miss here (counted and logged): the origin is asked instead.
    pub async fn load(&self, key: Key, prep: &Prepare) -> Option<Arc<Entry>> {
        let span = traces::shared("lookup");
        let (entry, outcome) = self.lookup(key, prep).instrument(span.clone()).await;
        span.record("parasol.outcome", outcome);
        self.metrics.shared_result("lookup", outcome);
        entry
    }

    /// [`Self::load`]'s work: the entry, and the outcome counted (hit, miss, refused, error).
    async fn lookup(&self, key: Key, prep: &Prepare) -> (Option<Arc<Entry>>, &'static str) {
        let shared = &self.shared;
        let outcome = match self.receive(shared, key).await {
            Ok(Some((url, received))) => match self.vet(received, &url, prep).await {
                Ok(received) => match self.store.insert(key, &url, received).await {
                    Ok(entry) => return (Some(entry), "hit"),
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
        (None, outcome)
    }

    /// A body from the bucket passes the preparation an origin's body gets (SVG drawn to PNG,
    /// metadata stripped, in a media worker). A node publishes only prepared bodies, so one
    /// that preparing would change, or that preparing refuses, did not come from a node.
    /// The error says whether the blob is to be deleted from the bucket: when it is not what
    /// a node publishes (or is banned), not when this node merely could not vet it now.
    async fn vet(
        &self,
        r: Received,
        url: &str,
        prep: &Prepare,
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
        match prep.prepare(r, &super::prepare::host_of_url(url)).await {
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
    async fn receive(
        &self,
        shared: &crate::cache::shared::SharedTier,
        key: Key,
    ) -> Result<Option<(String, Received)>, crate::cache::shared::SharedError> {
        let max = self.max_object_bytes;
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
    pub fn publish(&self, key: Key, url: &str, entry: &Arc<Entry>) {
        let shared = self.shared.clone();
        let Some(ticket) = shared.upload_ticket() else {
            self.metrics.shared_result("publish", "skipped");
            return;
        };
        let content_type = entry.content_type.to_str().unwrap_or_default();
        let record = crate::cache::index::Record::new(&entry.hash, entry.len, content_type, url)
            .with_final_host(entry.final_host.as_deref())
            .with_origin(entry.origin.as_deref().cloned());
        let (body, hash) = (entry.body.clone(), entry.hash);
        let input = self.store.blob_input(&hash, entry.len);
        let ok = self.metrics.shared_counter("publish", "ok");
        let failed = self.metrics.shared_counter("publish", "error");
        // A child of the fill, which it outlives.
        let span = traces::shared("publish");
        let traced = span.clone();
        let upload = async move {
            let _ticket = ticket;
            let Some(_slot) = shared.upload_slot().await else { return };
            let published = match body {
                Some(bytes) => shared.publish(&key, &record, bytes).await,
                // Large: uploaded in parts from the file (evicted meanwhile: an error, counted).
                None => match input {
                    crate::cache::Input::File { path, .. } => {
                        shared.publish_file(&key, &record, path).await
                    }
                    crate::cache::Input::Memory(bytes) => {
                        shared.publish(&key, &record, bytes).await
                    }
                },
            };
            match published {
                Ok(()) => {
                    ok.inc();
                    span.record("parasol.outcome", "ok");
                }
                Err(e) => {
                    failed.inc();
                    shared.warn("publish", &e);
                    span.record("parasol.outcome", "error");
                }
            }
        };
        tokio::spawn(upload.instrument(traced));
    }
}

/// The types `config` allows to be served (SVG only when rasterised).
fn types(config: &crate::config::Config) -> TypePolicy {
    TypePolicy::new(&config.media.allowed_types)
        .rasterizing_svg(config.media.svg == crate::config::SvgPolicy::Rasterize)
}
