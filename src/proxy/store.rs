//! The fill's storing half: receive an origin body (into memory within the in-flight budget,
//! else a temp blob) and store it (budget, rename, index); the same for renditions.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{Held, IN_MEMORY_FILL, Proxy, Received};
use crate::api::ProxyRequest;
use crate::audit::Trigger;
use crate::cache::disk::{BlobStore, TempBlob};
use crate::cache::index::Record;
use crate::cache::inflight::{Hold, InflightBudget};
use crate::cache::{Entry, Key};
use crate::error::ProxyError;
use crate::media::SNIFF_LEN;
use crate::telemetry::OutcomeLabels;

impl Proxy {
    /// Fetches `req.source` and stores it. `fetch.timeout` bounds the origin's part (waiting
    /// for a per-origin slot, headers, body); storing what arrived in time always runs to the
    /// end, so a deadline can never leave a blob on disk that the budget does not count.
    pub(super) async fn fetch_and_store(
        self: &Arc<Self>,
        key: Key,
        req: &ProxyRequest,
        trigger: Trigger,
    ) -> Result<Arc<Entry>, ProxyError> {
        let deadline = tokio::time::Instant::now() + self.config.fetch.timeout.0;
        let host = req.source.host_str().unwrap_or_default();
        let result = tokio::time::timeout_at(deadline, async {
            let mut permit = self.limits.acquire(host).await?;
            self.receive(req, trigger, &mut permit).await.map(|received| (permit, received))
        })
        .await
        .unwrap_or_else(|_| {
            self.metrics.origin.get_or_create(&OutcomeLabels { outcome: "origin_timeout" }).inc();
            Err(ProxyError::OriginTimeout)
        });
        let result = match result {
            // The origin's part is over: its fill slot goes back before a media worker sees
            // the body, so slow or stuck media jobs never hold fills from other viewers.
            Ok((permit, received)) => {
                drop(permit);
                self.moderate_and_store(key, req, received).await
            }
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

    /// Moderation of the origin's bytes, preparation, moderation of the bytes to serve (the
    /// scanner among it), then the store: nothing refused is stored or served.
    async fn moderate_and_store(
        self: &Arc<Self>,
        key: Key,
        req: &ProxyRequest,
        received: Received,
    ) -> Result<Arc<Entry>, ProxyError> {
        let host = received.final_host.clone();
        let host = host.as_deref().or(req.source.host_str()).unwrap_or_default();
        self.moderate_received(&received, host).await?;
        let origin_hash = received.hash;
        let digests = received.digests;
        let mut prepared = self.prepare(received).await?;
        // Kept with the entry when the origin's bytes are not the stored ones, or their
        // digests were computed: rules about the origin's bytes find it by them later.
        if prepared.hash != origin_hash || digests.is_some() {
            prepared.origin = Some(crate::cache::index::OriginDigests {
                blake3: origin_hash.to_hex().to_string(),
                sha256: digests.map(|d| hex::encode(d.sha256)),
                md5: digests.map(|d| hex::encode(d.md5)),
            });
        }
        self.moderate_prepared(&mut prepared, host).await?;
        self.store(key, req.source.as_str(), prepared).await
    }

    /// Streams the origin's body into a temp blob while hashing, sniffing and counting; anything
    /// refused leaves no file behind (the temp blob removes itself when dropped).
    pub(super) async fn receive(
        &self,
        req: &ProxyRequest,
        trigger: Trigger,
        permit: &mut crate::fetch::limit::FillPermit,
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
        let mut count = 0u64;
        let result = self.read_body(&mut response, &mut count).await.map(|mut received| {
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
        // Small bodies (by their declared length, or so far) are held in memory while the
        // in-flight budget has room; others stream into a temp blob.
        let digests = self.config.moderation.keep_digests || self.moderation.wants_digests();
        let mut sink = Sink::new(&self.disk, &self.body_budget).with_digests(digests);
        sink.start(declared).await.map_err(ProxyError::storage)?;
        let mut content_type = None;
        while let Some(chunk) = response.chunk().await.map_err(body_error)? {
            *received += chunk.len() as u64;
            if *received > max {
                return Err(ProxyError::TooLarge);
            }
            sink.push_chunk(&chunk).await.map_err(ProxyError::storage)?;
            if content_type.is_none() && sink.head().len() == SNIFF_LEN {
                content_type = Some(self.types.sniff(sink.head())?);
            }
        }
        if *received == 0 {
            return Err(ProxyError::OriginInvalid("empty body"));
        }
        if declared.is_some_and(|n| n != *received) {
            return Err(ProxyError::OriginInvalid("body shorter than Content-Length"));
        }
        let content_type = match content_type {
            Some(t) => t,
            None => self.types.sniff(sink.head())?,
        };
        Ok(sink.finish(content_type))
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
        let Received { body, hash, len, content_type, final_host, origin, .. } = r;
        let (touch, victims) = self.budget.admit(*hash.as_bytes(), len, key);
        let record =
            Record::new(&hash, len, content_type, url).with_final_host(final_host.as_deref());
        let record = record.with_origin(origin.clone());
        // Blobs up to memory_max_object_bytes are re-hashed on every load from disk, so a torn
        // one after a power cut is refetched, never served: only larger ones need the fsync.
        let durable = self.config.cache.fsync && len > self.config.cache.memory_max_object_bytes.0;
        let (written, in_memory) = match body {
            // The in-flight hold ends here: from now on the bytes count against the memory
            // tier (or are dropped).
            Held::Memory(bytes, _hold) => {
                (self.disk.write(&hash, bytes.clone(), durable).await, Some(bytes))
            }
            Held::Disk(temp) => (self.disk.commit(temp, &hash, durable).await, None),
        };
        let stored = match written {
            Ok(_) => self.index.put(key, &record).await.map_err(ProxyError::internal),
            Err(e) => Err(ProxyError::storage(e)),
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
        let entry = Entry::new(hash, len, content_type, body).with_touch(touch);
        Ok(Arc::new(entry.with_final_host(final_host.as_deref()).with_origin(origin.as_ref())))
    }
}

/// Where a body goes while it arrives, hashed and with its first bytes kept for the sniffer:
/// memory while it is small (by its declared length, or so far) and the in-flight budget has
/// room; a temp blob otherwise, spilling what memory held.
pub(crate) struct Sink {
    disk: BlobStore,
    budget: InflightBudget,
    /// The body so far, the budget's hold on it, and the most that hold covers.
    memory: Option<(Vec<u8>, Hold, usize)>,
    temp: Option<TempBlob>,
    hasher: blake3::Hasher,
    /// SHA-256 and MD5 too, while a moderation rule needs them.
    digester: Option<crate::moderation::Digester>,
    head: Vec<u8>,
    len: u64,
}

impl Sink {
    pub(crate) fn new(disk: &BlobStore, budget: &InflightBudget) -> Self {
        Sink {
            disk: disk.clone(),
            budget: budget.clone(),
            memory: None,
            temp: None,
            hasher: blake3::Hasher::new(),
            digester: None,
            head: Vec::with_capacity(SNIFF_LEN),
            len: 0,
        }
    }

    /// Also computes the digests moderation rules look for.
    pub(crate) fn with_digests(mut self, on: bool) -> Self {
        self.digester = on.then(crate::moderation::Digester::default);
        self
    }

    /// Chooses memory or disk for a body of `declared` length (when known).
    pub(crate) async fn start(&mut self, declared: Option<u64>) -> std::io::Result<()> {
        let want = declared.unwrap_or(IN_MEMORY_FILL);
        let hold = (want <= IN_MEMORY_FILL).then(|| self.budget.try_hold(want)).flatten();
        match hold {
            // A body of unknown length grows as it arrives: memory reserved for the worst case
            // would stay with the bytes into the memory tier, which weighs only their length.
            Some(hold) => {
                let room = declared.map_or(0, |n| n as usize);
                self.memory = Some((Vec::with_capacity(room), hold, want as usize))
            }
            None => self.temp = Some(self.disk.create_temp().await?),
        }
        Ok(())
    }

    pub(crate) async fn push_chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        let take = SNIFF_LEN.saturating_sub(self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        self.hasher.update(chunk);
        if let Some(d) = &mut self.digester {
            d.update(chunk);
        }
        self.len += chunk.len() as u64;
        if let Some((held, _, most)) = &mut self.memory {
            if held.len() + chunk.len() <= *most {
                held.extend_from_slice(chunk);
                return Ok(());
            }
            // Larger than it said, or than memory takes: spill, and give the room back.
            let mut spill = self.disk.create_temp().await?;
            spill.file.write_all(held).await?;
            (self.memory, self.temp) = (None, Some(spill));
        }
        match &mut self.temp {
            Some(t) => t.file.write_all(chunk).await,
            None => Err(std::io::Error::other("a body sink used before start")),
        }
    }

    /// The first bytes received (up to [`SNIFF_LEN`]).
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    pub(crate) fn finish(self, content_type: &'static str) -> Received {
        let body = match (self.memory, self.temp) {
            (Some((mut held, hold, _)), _) => {
                // What the memory tier keeps is exactly what it weighs.
                held.shrink_to_fit();
                Held::Memory(Bytes::from(held), Some(hold))
            }
            (None, Some(t)) => Held::Disk(t),
            (None, None) => Held::Memory(Bytes::new(), None),
        };
        Received {
            body,
            hash: self.hasher.finalize(),
            len: self.len,
            content_type,
            final_host: None,
            digests: self.digester.map(crate::moderation::Digester::finish),
            origin: None,
        }
    }
}

impl crate::cache::ChunkSink for Sink {
    async fn begin(&mut self, len: u64) -> std::io::Result<()> {
        self.start(Some(len)).await
    }

    async fn push(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.push_chunk(chunk).await
    }
}

impl Received {
    /// The body as a media job's input: the bytes in memory, or the temp blob's file.
    pub(super) async fn input(&mut self) -> std::io::Result<crate::media::worker::Input> {
        use crate::media::worker::Input;
        Ok(match &mut self.body {
            Held::Memory(bytes, _) => Input::Memory(bytes.clone()),
            Held::Disk(temp) => {
                Input::File { path: temp.flushed_path().await?.to_path_buf(), len: self.len }
            }
        })
    }
}

/// A write that failed for lack of space is [`ProxyError::StorageFull`] (503, and eviction);
/// any other local I/O failure is internal.
/// A body that ends early (reset, bad chunking) is invalid; one that stalls is a timeout.
fn body_error(e: reqwest::Error) -> ProxyError {
    if e.is_timeout() {
        ProxyError::OriginTimeout
    } else {
        ProxyError::OriginInvalid("body cut short")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a small body of unknown length keeps allocated is its size, not the 1 MiB the
    /// budget holds for it: the memory tier weighs entries by length.
    #[tokio::test]
    async fn a_body_of_unknown_length_keeps_only_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let disk = BlobStore::open(dir.path(), false).unwrap();
        let budget = InflightBudget::new(4 << 20);
        let mut sink = Sink::new(&disk, &budget);
        sink.start(None).await.unwrap();
        sink.push_chunk(&[7u8; 150]).await.unwrap();
        sink.push_chunk(&[8u8; 50]).await.unwrap();
        assert_eq!(budget.available(), 3 << 20, "1 MiB held while it arrives");
        let received = sink.finish("image/gif");
        let Held::Memory(bytes, hold) = received.body else { panic!("small: held in memory") };
        assert_eq!((received.len, bytes.len()), (200, 200));
        drop(hold);
        assert_eq!(budget.available(), 4 << 20, "the hold ends with the body");
        let back: Vec<u8> = bytes.into();
        assert!(back.capacity() < 4096, "allocation of {} bytes", back.capacity());
    }
}
