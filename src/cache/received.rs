//! Bodies on their way into the store: a [`Sink`] receives one chunk by chunk (an origin's,
//! the shared bucket's, a media worker's), hashing it and keeping its first bytes for the
//! sniffer, in memory while it is small and the in-flight budget has room, else in a temp
//! blob; what it gives back is a [`Received`] body for [`super::store::Store::insert`].

use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::disk::{BlobStore, TempBlob};
use super::inflight::{Hold, InflightBudget};

/// A body received in full, not yet stored.
pub struct Received {
    pub(crate) body: Held,
    pub(crate) hash: blake3::Hash,
    pub(crate) len: u64,
    pub(crate) content_type: &'static str,
    /// The host the bytes came from, when redirects led away from the source's host.
    pub(crate) final_host: Option<String>,
    /// SHA-256 and MD5 of the origin's bytes, computed while a rule needs them.
    pub(crate) digests: Option<super::digests::Digests>,
    /// What is known of the origin's bytes, when these bytes are not those (prepared ones),
    /// or came from the bucket with its record.
    pub(crate) origin: Option<crate::cache::index::OriginDigests>,
    /// Not evicted before this (Unix seconds): its origin rule's `keep_at_least`.
    pub(crate) keep_until: Option<u64>,
    /// Over its size limit, read only to be streamed (`cache.oversize = "stream"`): not kept.
    pub(crate) oversize: bool,
}

/// Where a received body waits to be stored: small ones in memory (written to disk in one
/// blocking call, and kept for the memory tier) under a hold on the in-flight budget, larger
/// ones (or any, while the budget is spent) streamed into a temp blob.
pub enum Held {
    /// In memory, with its hold on the in-flight budget.
    Memory(Bytes, Option<crate::cache::inflight::Hold>),
    /// In a temp blob.
    Disk(crate::cache::disk::TempBlob),
}

/// Bytes kept for the sniffer: every signature `infer` knows sits well inside this.
pub const SNIFF_LEN: usize = 4096;

/// What a body of unknown length held in memory starts with.
const UNDECLARED_ROOM: usize = 128 * 1024;

/// Bodies up to this size are received in memory; larger ones stream to disk as they arrive.
pub const IN_MEMORY_FILL: u64 = 1 << 20;

/// Where a body goes while it arrives, hashed and with its first bytes kept for the sniffer:
/// memory while it is small (by its declared length, or so far) and the in-flight budget has
/// room; a temp blob otherwise, spilling what memory held.
pub struct Sink {
    disk: BlobStore,
    budget: InflightBudget,
    /// The body so far, the budget's hold on it, and the most that hold covers.
    memory: Option<(Vec<u8>, Hold, usize)>,
    temp: Option<TempBlob>,
    hasher: blake3::Hasher,
    /// SHA-256 and MD5 too, while a moderation rule needs them.
    digester: Option<super::digests::Digester>,
    head: Vec<u8>,
    len: u64,
}

impl Sink {
    /// A sink writing into `disk`'s temp files, holding memory from `budget`.
    pub fn new(disk: &BlobStore, budget: &InflightBudget) -> Self {
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
    pub fn with_digests(mut self, on: bool) -> Self {
        self.digester = on.then(super::digests::Digester::default);
        self
    }

    /// Chooses memory or disk for a body of `declared` length (when known).
    pub async fn start(&mut self, declared: Option<u64>) -> std::io::Result<()> {
        let want = declared.unwrap_or(IN_MEMORY_FILL);
        let hold = (want <= IN_MEMORY_FILL).then(|| self.budget.try_hold(want)).flatten();
        match hold {
            // A body of unknown length starts with room for a typical picture, not the worst
            // case, and grows from there (from nothing it was copied several times over: 7.5%
            // of the miss path's CPU with a chunked origin); `finish` gives back what it did
            // not use, as the memory tier weighs only the length.
            Some(hold) => {
                let room = declared.map_or(UNDECLARED_ROOM, |n| n as usize);
                self.memory = Some((Vec::with_capacity(room), hold, want as usize))
            }
            None => self.temp = Some(self.disk.create_temp().await?),
        }
        Ok(())
    }

    /// Takes the next chunk: kept for the sniffer, hashed, held or written.
    pub async fn push_chunk(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        let take = SNIFF_LEN.saturating_sub(self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..take]);
        if let Some(d) = &mut self.digester {
            d.update(chunk);
        }
        self.len += chunk.len() as u64;
        if let Some((held, _, most)) = &mut self.memory {
            // Held bytes are hashed once, whole, at the end: in one piece blake3 hashes many
            // chunks at a time, where the network's uneven pieces cost it serial blocks.
            if held.len() + chunk.len() <= *most {
                held.extend_from_slice(chunk);
                return Ok(());
            }
            // Larger than it said, or than memory takes: spill, and give the room back.
            let mut spill = self.disk.create_temp().await?;
            spill.file.write_all(held).await?;
            self.hasher.update(held);
            (self.memory, self.temp) = (None, Some(spill));
        }
        self.hasher.update(chunk);
        match &mut self.temp {
            Some(t) => t.file.write_all(chunk).await,
            None => Err(std::io::Error::other("a body sink used before start")),
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.len
    }

    /// Whether the body is going to a temp file (not held in memory).
    pub fn on_disk(&self) -> bool {
        self.temp.is_some()
    }

    /// Makes everything received so far readable in the temp file.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.temp {
            Some(t) => t.flushed_path().await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// The temp file opened for reading (flushed first), for readers of a growing fill.
    pub async fn reader(&mut self) -> std::io::Result<std::sync::Arc<std::fs::File>> {
        let temp = self.temp.as_mut().ok_or_else(|| std::io::Error::other("not on disk"))?;
        let path = temp.flushed_path().await?.to_path_buf();
        tokio::task::spawn_blocking(move || std::fs::File::open(path).map(std::sync::Arc::new))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The first bytes received (up to [`SNIFF_LEN`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The body received, of `content_type` (sniffed by the caller).
    pub fn finish(mut self, content_type: &'static str) -> Received {
        let body = match (self.memory, self.temp) {
            (Some((mut held, hold, _)), _) => {
                self.hasher.update(&held);
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
            digests: self.digester.map(super::digests::Digester::finish),
            origin: None,
            keep_until: None,
            oversize: false,
        }
    }
}

impl Received {
    /// The body as a media job's or the scanner's input: the bytes in memory, or the temp
    /// blob's file (flushed first).
    pub async fn input(&mut self) -> std::io::Result<super::Input> {
        Ok(match &mut self.body {
            Held::Memory(bytes, _) => super::Input::Memory(bytes.clone()),
            Held::Disk(temp) => {
                super::Input::File { path: temp.flushed_path().await?.to_path_buf(), len: self.len }
            }
        })
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
