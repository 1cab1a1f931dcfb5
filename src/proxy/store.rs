//! The fill's storing half: receive an origin body into a temp blob, prepare it (SVG to PNG,
//! metadata stripped), and store it (budget, rename, index); and the same for renditions.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{Held, IN_MEMORY_FILL, Proxy, Received};
use crate::api::ProxyRequest;
use crate::audit::Trigger;
use crate::cache::index::Record;
use crate::cache::{Entry, Key};
use crate::error::ProxyError;
use crate::media::SNIFF_LEN;
use crate::telemetry::OutcomeLabels;

impl Proxy {
    /// Renders on a blocking thread under the CPU semaphore; beyond the queue bound, 503.
    pub(super) async fn render_and_store(
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

    /// Fetches `req.source` and stores it. `fetch.timeout` bounds the origin's part (waiting
    /// for a per-origin slot, headers, body); storing what arrived in time always runs to the
    /// end, so a deadline can never leave a blob on disk that the budget does not count.
    pub(super) async fn fetch_and_store(
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
    pub(super) async fn prepare(&self, received: Received) -> Result<Received, ProxyError> {
        let received = self.rasterize_svg(received).await?;
        self.strip_metadata(received).await
    }

    /// Replaces a received SVG (admitted only with `media.svg = "rasterize"`) by its PNG
    /// rendering; the SVG itself is never stored or served.
    pub(super) async fn rasterize_svg(&self, mut r: Received) -> Result<Received, ProxyError> {
        if r.content_type != crate::media::SVG {
            return Ok(r);
        }
        if r.len > crate::media::svg::MAX_SVG_BYTES {
            return Err(ProxyError::BadImage("SVG too large to render"));
        }
        let svg = r.bytes().await.map_err(storage_error)?;
        let max_pixels = self.config.media.max_pixels;
        let _cpu = self.render_cpu.acquire().await.map_err(|_| ProxyError::Overloaded)?;
        self.metrics.renders.inc();
        let png =
            tokio::task::spawn_blocking(move || crate::media::svg::rasterize(&svg, max_pixels))
                .await
                .map_err(|_| ProxyError::internal("render task failed"))??;
        self.received_from(png, "image/png").await
    }

    /// `bytes`, hashed and ready to store.
    pub(super) async fn received_from(
        &self,
        bytes: Vec<u8>,
        content_type: &'static str,
    ) -> Result<Received, ProxyError> {
        let (hash, len) = (blake3::hash(&bytes), bytes.len() as u64);
        Ok(Received { body: Held::Memory(Bytes::from(bytes)), hash, len, content_type })
    }

    /// Replaces a received JPEG, PNG or WebP by a copy without metadata (`media.strip_metadata`),
    /// so the bytes stored, hashed and served (and their ETag) carry no GPS position.
    pub(super) async fn strip_metadata(&self, mut r: Received) -> Result<Received, ProxyError> {
        const LARGEST: u64 = 64 << 20;
        let strippable = matches!(r.content_type, "image/jpeg" | "image/png" | "image/webp");
        if !self.config.media.strip_metadata || !strippable || r.len > LARGEST {
            return Ok(r);
        }
        let content_type = r.content_type;
        let stripped = match &r.body {
            // Small and in memory: parsing the segments costs less than a thread hop.
            Held::Memory(bytes) => crate::media::strip::strip(bytes, content_type),
            Held::Disk(_) => {
                let bytes = r.bytes().await.map_err(storage_error)?;
                tokio::task::spawn_blocking(move || {
                    crate::media::strip::strip(&bytes, content_type)
                })
                .await
                .map_err(|_| ProxyError::internal("strip task failed"))?
            }
        };
        let Some(stripped) = stripped else { return Ok(r) };
        self.received_from(stripped.to_vec(), content_type).await
    }

    /// Streams the origin's body into a temp blob while hashing, sniffing and counting; anything
    /// refused leaves no file behind (the temp blob removes itself when dropped).
    pub(super) async fn receive(
        &self,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<Received, ProxyError> {
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

    pub(super) async fn read_body(
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
        // Small bodies (by their declared length, or so far) are held in memory; a body that
        // grows past the bound spills into a temp blob and streams on from there.
        let mut sink = Sink::new(&self.disk, declared).await.map_err(storage_error)?;
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
            sink.push(&self.disk, &chunk).await.map_err(storage_error)?;
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
        Ok(Received { body: sink.finish(), hash: hasher.finalize(), len: *received, content_type })
    }

    /// Makes a received blob durable and findable: budget first (so a concurrent eviction of
    /// the same bytes, which deletes only blobs the budget no longer holds, cannot delete
    /// it), then the rename into place, then the index record.
    pub(super) async fn store(
        &self,
        key: Key,
        url: &str,
        r: Received,
    ) -> Result<Arc<Entry>, ProxyError> {
        let Received { body, hash, len, content_type } = r;
        let (touch, victims) = self.budget.admit(*hash.as_bytes(), len, key);
        let record = Record::new(&hash, len, content_type, url);
        // Blobs up to memory_max_object_bytes are re-hashed on every load from disk, so a torn
        // one after a power cut is refetched, never served: only larger ones need the fsync.
        let durable = self.config.cache.fsync && len > self.config.cache.memory_max_object_bytes.0;
        let (written, in_memory) = match body {
            Held::Memory(bytes) => {
                (self.disk.write(&hash, bytes.clone(), durable).await, Some(bytes))
            }
            Held::Disk(temp) => (self.disk.commit(temp, &hash, durable).await, None),
        };
        let stored = match written {
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
        // Bodies small enough for the memory tier go there: kept from the fill, or read back
        // from the page cache when they streamed to disk.
        let body = match in_memory {
            _ if len > self.config.cache.memory_max_object_bytes.0 => None,
            Some(bytes) => Some(bytes),
            None => match self.disk.read(&hash).await {
                Ok(bytes) if bytes.len() as u64 == len => Some(bytes),
                _ => None,
            },
        };
        Ok(Arc::new(Entry::new(hash, len, content_type, body).with_touch(touch)))
    }
}

/// Where a body goes while it arrives: memory, while it is small (by its declared length, or so
/// far); a temp blob once it is larger, spilling what memory held.
pub(super) struct Sink {
    memory: Option<Vec<u8>>,
    temp: Option<crate::cache::disk::TempBlob>,
}

impl Sink {
    pub(super) async fn new(
        disk: &crate::cache::disk::BlobStore,
        declared: Option<u64>,
    ) -> std::io::Result<Self> {
        Ok(match declared {
            None => Sink { memory: Some(Vec::new()), temp: None },
            Some(n) if n <= IN_MEMORY_FILL => {
                Sink { memory: Some(Vec::with_capacity(n as usize)), temp: None }
            }
            Some(_) => Sink { memory: None, temp: Some(disk.create_temp().await?) },
        })
    }

    pub(super) async fn push(
        &mut self,
        disk: &crate::cache::disk::BlobStore,
        chunk: &[u8],
    ) -> std::io::Result<()> {
        if let Some(held) = &mut self.memory {
            if (held.len() + chunk.len()) as u64 <= IN_MEMORY_FILL {
                held.extend_from_slice(chunk);
                return Ok(());
            }
            let mut spill = disk.create_temp().await?;
            spill.file.write_all(held).await?;
            (self.memory, self.temp) = (None, Some(spill));
        }
        match &mut self.temp {
            Some(t) => t.file.write_all(chunk).await,
            None => unreachable!("a body is held in memory or in a temp blob"),
        }
    }

    pub(super) fn finish(self) -> Held {
        match (self.memory, self.temp) {
            (Some(held), _) => Held::Memory(Bytes::from(held)),
            (None, Some(t)) => Held::Disk(t),
            (None, None) => unreachable!("a body is held in memory or in a temp blob"),
        }
    }
}

impl Received {
    /// The whole body, from memory or read back from its temp blob.
    async fn bytes(&mut self) -> std::io::Result<Bytes> {
        match &mut self.body {
            Held::Memory(bytes) => Ok(bytes.clone()),
            Held::Disk(temp) => temp.read_back().await.map(Bytes::from),
        }
    }
}

/// A write that failed for lack of space is [`ProxyError::StorageFull`] (503, and eviction);
/// any other local I/O failure is internal.
pub(super) fn storage_error(e: std::io::Error) -> ProxyError {
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
