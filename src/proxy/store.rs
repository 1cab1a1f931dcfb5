//! The fill's receiving half: an origin body into memory (within the in-flight budget) or a
//! temp blob, sniffed, moderated and prepared, then handed to the store.

use std::sync::Arc;
use std::time::Instant;

use super::{Proxy, Received};
use crate::api::ProxyRequest;
use crate::audit::Trigger;
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
            self.receive(key, req, trigger, &mut permit).await.map(|received| (permit, received))
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
            self.store.make_room(self.config.cache.max_object_bytes.0).await;
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
        self.moderation.check_received(&received, host).await?;
        let origin_hash = received.hash;
        let source_host = req.source.host_str().unwrap_or_default();
        let mut prepared = self.prepare(received, source_host).await?;
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
        self.store.insert(key, req.source.as_str(), prepared).await
    }

    /// Streams the origin's body into a temp blob while hashing, sniffing and counting; anything
    /// refused leaves no file behind (the temp blob removes itself when dropped).
    pub(super) async fn receive(
        &self,
        key: Key,
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
        // Viewers may read the body as it arrives unless something must see all of it first
        // (the scanner, content rules) or the bytes it came from are refused.
        let readable = req.variant.is_none()
            && !self.moderation.inspects_content()
            && landed.is_none_or(|h| self.moderation.check_host(h).is_ok());
        let mut count = 0u64;
        let growing = readable.then_some(key);
        let result =
            self.read_body(&mut response, &mut count, growing).await.map(|mut received| {
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
    pub(super) async fn read_body(
        &self,
        response: &mut reqwest::Response,
        received: &mut u64,
        growing: Option<Key>,
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
        let mut sink = self.store.sink().with_digests(digests);
        sink.start(declared).await.map_err(ProxyError::storage)?;
        let mut content_type = None;
        // The growing fill's publisher (dropped before `complete`, its readers end broken),
        // and when its file was last made readable.
        let mut publisher: Option<crate::cache::growing::Publisher> = None;
        let mut flushed = (0u64, Instant::now());
        while let Some(chunk) = response.chunk().await.map_err(body_error)? {
            *received += chunk.len() as u64;
            if *received > max {
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
                    self.publish_growing(key, g.clone());
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
        Ok(sink.finish(content_type))
    }
}

impl Proxy {
    /// Whether a fill of `content_type` is stored as it came (nothing rasterises it or strips
    /// its metadata), so its bytes may be read before it is stored.
    fn passes_through(&self, content_type: &str) -> bool {
        let stripped = self.config.media.strip_metadata
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
