//! The shared tier: an object store (S3-compatible through the `object_store` crate) that several
//! parasol nodes read and write, below each node's own disk and above the origin.
//!
//! Names are content addresses, so any node can serve what another fetched and two nodes that
//! fetch the same file write one object (a conditional create; a second writer finds it there):
//! - `<prefix>blobs/<blake3 hex>`: the bytes, exactly as served;
//! - `<prefix>keys/<key hex>`: the index record of one URL, naming its blob.
//!
//! Nothing read from the bucket is trusted: a blob must hash to its name and sniff as an
//! allowed type before it is stored locally. Every call has a deadline; a bucket that fails or
//! stalls costs a metric and a log line, and parasol goes on from its disk or the origin.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::Key;
use super::index::Record;
use crate::config::SharedConfig;

/// Uploads waiting or running at once; beyond it a fill is not published (and counted).
/// Waiting uploads of small objects hold the same bytes as the memory tier.
const MAX_PENDING_UPLOADS: usize = 4096;

/// Uploads running at once.
const MAX_RUNNING_UPLOADS: usize = 16;

/// The bucket several nodes share (`[shared]`): blobs by blake3, records by key, bans.
#[derive(Clone)]
pub struct SharedTier {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    timeout: Duration,
    pending: Arc<std::sync::atomic::AtomicUsize>,
    running: Arc<tokio::sync::Semaphore>,
    last_warning: Arc<AtomicU64>,
}

/// One upload waiting or running; leaves the queue when dropped.
pub struct UploadTicket {
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for UploadTicket {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a call to the bucket did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The bucket did not answer within `shared.timeout`.
    #[error("shared tier timed out after {0:?}")]
    Timeout(Duration),
    /// The bucket answered an error.
    #[error("shared tier: {0}")]
    Store(#[from] object_store::Error),
    /// An object of the bucket is not what a node writes.
    #[error("shared tier: unreadable record: {0}")]
    Record(String),
    /// A local file could not be read or written.
    #[error("shared tier: local file: {0}")]
    Io(#[from] std::io::Error),
}

/// The chunks of one blob as the bucket sends them.
pub use super::ChunkSink;

use std::collections::HashSet;

/// A ban's object in the bucket: the tombstone of a lifted one, or the ban (as moderation
/// writes it: the bucket keeps it, moderation reads it).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum BanObject {
    Lifted { lifted: String, at: u64 },
    Ban(serde_json::Value),
}

/// A blob's bytes as the bucket streams them.
pub type BlobStream = futures_util::stream::BoxStream<'static, Result<Bytes, object_store::Error>>;

/// Part size of a multipart upload (S3's minimum is 5 MiB).
const PART: usize = 8 << 20;

impl SharedTier {
    /// The tier `config` describes, or `None` when `shared.endpoint` is empty.
    pub fn from_config(config: &SharedConfig) -> Result<Option<Self>, SharedError> {
        if config.endpoint.is_empty() {
            return Ok(None);
        }
        let store = object_store::aws::AmazonS3Builder::new()
            // Client options first: setting them replaces allow_http as well.
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(config.timeout.0)
                    .with_connect_timeout(config.timeout.0),
            )
            .with_endpoint(&config.endpoint)
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(config.virtual_hosted_style)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            // One try: a slow bucket must not hold a viewer; the origin is the fallback.
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                retry_timeout: config.timeout.0,
                ..Default::default()
            })
            .build()?;
        Ok(Some(Self::new(Arc::new(store), &config.prefix, config.timeout.0)))
    }

    /// A tier over any object store (tests use a local directory or memory).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, timeout: Duration) -> Self {
        Self {
            store,
            prefix: prefix.to_string(),
            timeout,
            pending: Arc::default(),
            running: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING_UPLOADS)),
            last_warning: Arc::new(AtomicU64::new(0)),
        }
    }

    fn blob_path(&self, hash: &blake3::Hash) -> Path {
        Path::from(format!("{}blobs/{}", self.prefix, hash.to_hex()))
    }

    fn key_path(&self, key: &Key) -> Path {
        Path::from(format!("{}keys/{}", self.prefix, key.to_hex()))
    }

    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, object_store::Error>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(SharedError::Timeout(self.timeout)),
        }
    }

    /// The bytes of `path`, or `None` when there is no such object.
    async fn get(&self, path: &Path) -> Result<Option<Bytes>, SharedError> {
        let result = self
            .timed(async {
                match self.store.get(path).await {
                    Ok(got) => got.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(result)
    }

    /// The record of `key`, or `None` when the bucket has none.
    pub async fn record(&self, key: &Key) -> Result<Option<Record>, SharedError> {
        let Some(raw) = self.get(&self.key_path(key)).await? else { return Ok(None) };
        let record: Record =
            serde_json::from_slice(&raw).map_err(|e| SharedError::Record(e.to_string()))?;
        Ok(Some(record))
    }

    /// The blob `hash` as a stream of chunks, or `None` when the bucket does not have it.
    async fn blob(&self, hash: &blake3::Hash) -> Result<Option<BlobStream>, SharedError> {
        let path = self.blob_path(hash);
        let got = self
            .timed(async {
                match self.store.get(&path).await {
                    Ok(got) => Ok(Some(got.into_stream())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(got)
    }

    /// The next chunk of `stream`; a bucket that stalls for `shared.timeout` is an error.
    async fn next_chunk(&self, stream: &mut BlobStream) -> Result<Option<Bytes>, SharedError> {
        use futures_util::StreamExt;
        match tokio::time::timeout(self.timeout, stream.next()).await {
            Ok(Some(chunk)) => Ok(Some(chunk?)),
            Ok(None) => Ok(None),
            Err(_) => Err(SharedError::Timeout(self.timeout)),
        }
    }

    /// Streams the blob of `key` into `sink` and returns its record, or `None` when the bucket
    /// does not have it. Nothing is trusted: a record longer than `max_len` is refused before
    /// any byte is read, and bytes that are longer than their record or do not hash to their
    /// name are an error; such a blob is deleted, so the next upload writes it again (a
    /// conditional create would otherwise keep the rotten copy forever).
    pub async fn download<S: ChunkSink>(
        &self,
        key: &Key,
        max_len: u64,
        sink: &mut S,
    ) -> Result<Option<Record>, SharedError> {
        let bad = |what: String| SharedError::Record(what);
        let Some(record) = self.record(key).await? else { return Ok(None) };
        let hash = record.blake3().ok_or_else(|| bad("bad hash".into()))?;
        if record.len == 0 || record.len > max_len {
            return Err(bad(format!("blob {hash}: size {} out of bounds", record.len)));
        }
        let Some(mut stream) = self.blob(&hash).await? else { return Ok(None) };
        sink.begin(record.len).await?;
        let (mut hasher, mut len) = (blake3::Hasher::new(), 0u64);
        while let Some(chunk) = self.next_chunk(&mut stream).await? {
            len += chunk.len() as u64;
            if len > record.len {
                break;
            }
            hasher.update(&chunk);
            sink.push(&chunk).await?;
        }
        if len != record.len || hasher.finalize() != hash {
            let _ = self.timed(self.store.delete(&self.blob_path(&hash))).await;
            return Err(bad(format!("blob {hash} does not match its name")));
        }
        Ok(Some(record))
    }

    fn ban_path(&self, id: &str) -> Path {
        Path::from(format!("{}bans/{}", self.prefix, hex::encode(id)))
    }

    /// Publishes the ban `id` (`ban`, as moderation writes it) so that every node learns it.
    pub async fn put_ban(&self, id: &str, ban: &serde_json::Value) -> Result<(), SharedError> {
        let value = serde_json::to_vec(ban).map_err(|e| SharedError::Record(e.to_string()))?;
        self.timed(self.store.put(&self.ban_path(id), PutPayload::from(value))).await?;
        Ok(())
    }

    /// Lifts a ban for every node: its object becomes a tombstone (every node lifts it at its
    /// next sync). A tombstone, not a deletion: a ban missing from the bucket (a new bucket, an
    /// unreadable object) is never taken for a lift.
    pub async fn lift_ban(&self, id: &str) -> Result<(), SharedError> {
        let tombstone = BanObject::Lifted { lifted: id.to_string(), at: super::evict::now_secs() };
        let value =
            serde_json::to_vec(&tombstone).map_err(|e| SharedError::Record(e.to_string()))?;
        self.timed(self.store.put(&self.ban_path(id), PutPayload::from(value))).await?;
        Ok(())
    }

    /// Every ban in the bucket (as moderation wrote it), and the ids of those lifted. An
    /// object that cannot be read is skipped (and logged).
    pub async fn bans(&self) -> Result<(Vec<serde_json::Value>, HashSet<String>), SharedError> {
        use futures_util::TryStreamExt;
        let prefix = Path::from(format!("{}bans", self.prefix));
        let listed: Vec<_> = self.timed(self.store.list(Some(&prefix)).try_collect()).await?;
        let (mut bans, mut lifted) = (Vec::with_capacity(listed.len()), HashSet::new());
        for meta in listed {
            let Some(raw) = self.get(&meta.location).await? else { continue };
            match serde_json::from_slice::<BanObject>(&raw) {
                Ok(BanObject::Ban(ban)) => bans.push(ban),
                Ok(BanObject::Lifted { lifted: id, .. }) => {
                    lifted.insert(id);
                }
                Err(e) => {
                    tracing::warn!(object = %meta.location, error = %e, "unreadable ban in the shared bucket")
                }
            }
        }
        Ok((bans, lifted))
    }

    /// Deletes the blob `hash` (a banned file). Best effort, logged like any other failure.
    pub async fn discard_blob(&self, hash: &blake3::Hash) {
        match self.timed(self.store.delete(&self.blob_path(hash))).await {
            Ok(()) | Err(SharedError::Store(object_store::Error::NotFound { .. })) => {}
            Err(e) => self.warn("discard", &e),
        }
    }

    /// Deletes the record of `key` and the blob `hash` (a blob this node refused). Best
    /// effort: a failure is logged like any other.
    pub async fn discard(&self, key: &Key, hash: &blake3::Hash) {
        for path in [self.key_path(key), self.blob_path(hash)] {
            if let Err(e) = self.timed(self.store.delete(&path)).await {
                self.warn("discard", &e);
            }
        }
    }

    /// The record and verified bytes of `key`, in memory (see [`SharedTier::download`]).
    pub async fn lookup(&self, key: &Key) -> Result<Option<(Record, Bytes)>, SharedError> {
        let mut bytes = Vec::new();
        let record = self.download(key, u64::MAX, &mut bytes).await?;
        Ok(record.map(|r| (r, Bytes::from(bytes))))
    }

    /// Writes the blob (once: a conditional create, so a second node's copy is not rewritten)
    /// and then the record that names it.
    pub async fn publish(
        &self,
        key: &Key,
        record: &Record,
        bytes: Bytes,
    ) -> Result<(), SharedError> {
        let hash = record.blake3().ok_or_else(|| SharedError::Record("bad hash".into()))?;
        let create = PutOptions::from(PutMode::Create);
        let blob = self.blob_path(&hash);
        let put = self.store.put_opts(&blob, PutPayload::from(bytes), create);
        match self.timed(put).await {
            Ok(_) | Err(SharedError::Store(object_store::Error::AlreadyExists { .. })) => {}
            Err(e) => return Err(e),
        }
        self.put_record(key, record).await
    }

    /// Like [`SharedTier::publish`] for a blob read from `file` in parts (a multipart upload,
    /// so a large video is never held in memory whole). Skipped when the blob is there already.
    pub async fn publish_file(
        &self,
        key: &Key,
        record: &Record,
        file: std::path::PathBuf,
    ) -> Result<(), SharedError> {
        use tokio::io::AsyncReadExt;
        let hash = record.blake3().ok_or_else(|| SharedError::Record("bad hash".into()))?;
        let blob = self.blob_path(&hash);
        let present = match self.timed(self.store.head(&blob)).await {
            Ok(meta) => meta.size == record.len,
            Err(SharedError::Store(object_store::Error::NotFound { .. })) => false,
            Err(e) => return Err(e),
        };
        if !present {
            let mut file = tokio::fs::File::open(&file).await?;
            let upload = self.timed(self.store.put_multipart(&blob)).await?;
            let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
            let written: Result<(), SharedError> = async {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    parts.write(&buf[..n]);
                    self.timed(parts.wait_for_capacity(2)).await?;
                }
                Ok(())
            }
            .await;
            match written {
                Ok(()) => {
                    self.timed(parts.finish()).await?;
                }
                Err(e) => {
                    let _ = self.timed(parts.abort()).await;
                    return Err(e);
                }
            }
        }
        self.put_record(key, record).await
    }

    async fn put_record(&self, key: &Key, record: &Record) -> Result<(), SharedError> {
        let value = serde_json::to_vec(record).map_err(|e| SharedError::Record(e.to_string()))?;
        let path = self.key_path(key);
        self.timed(self.store.put(&path, PutPayload::from(value))).await?;
        Ok(())
    }

    /// A place in the upload queue, or `None` when too many uploads wait already.
    pub fn upload_ticket(&self) -> Option<UploadTicket> {
        if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_UPLOADS {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(UploadTicket { pending: self.pending.clone() })
    }

    /// Waits for one of the running-upload slots.
    pub async fn upload_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.running.clone().acquire_owned().await.ok()
    }

    /// Logs a failure of the tier, at most once every ten seconds (a bucket that is down
    /// would otherwise log once per fill).
    pub fn warn(&self, what: &str, error: &SharedError) {
        let now = crate::cache::evict::now_secs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%error, what, "shared tier unavailable: serving from this node and the origin");
        }
    }
}
