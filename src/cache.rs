//! The two storage tiers and what they hold.
//!
//! A cached object is an [`Entry`]: content hash, length, sniffed type and the response headers,
//! built once at fill time so a hit only copies them. Small entries carry their body in memory;
//! large ones name a blob on disk. Entries are found by [`Key`] (the canonical source URL plus
//! variant) through the memory tier, then the on-disk [`index`], whose records point at
//! content-addressed blobs in the [`disk`] store: two URLs with the same bytes share one blob.

pub mod budget;
pub mod coalesce;
pub mod digests;
pub mod disk;
pub mod evict;
pub mod growing;
pub mod index;
pub mod inflight;
pub mod memory;
pub mod received;
pub mod segments;
pub mod shared;
pub mod store;
pub mod upkeep;
pub mod verify;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

/// Makes `dir` (and its parents) readable by parasol's user only: it holds the generated
/// signing key, the index of every URL fetched and the outbound audit log. A directory that
/// exists with wider permissions is narrowed, with a warning.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "cache directory was readable by others: now 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Where a body goes chunk by chunk as it arrives: from the shared bucket
/// ([`shared::SharedTier::download`]) or from a media worker's reply.
pub trait ChunkSink {
    /// Called once with the record's length, before the first chunk.
    fn begin(&mut self, len: u64) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Takes the next chunk of the body.
    fn push(&mut self, chunk: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ChunkSink for Vec<u8> {
    async fn begin(&mut self, len: u64) -> std::io::Result<()> {
        self.reserve(len as usize);
        Ok(())
    }

    async fn push(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(chunk);
        Ok(())
    }
}

/// Names one cached rendition: blake3 of the canonical source URL and the variant name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The key of `canonical_url` as `variant` (`None`: the original).
    pub fn new(canonical_url: &str, variant: Option<&str>) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(canonical_url.as_bytes());
        // A NUL cannot occur in a serialised URL, so the pair is encoded unambiguously.
        h.update(b"\0");
        h.update(variant.unwrap_or("").as_bytes());
        Key(*h.finalize().as_bytes())
    }

    /// The key in hex (its name in the index and the bucket).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// A body to read, whole: in memory, or the first `len` bytes of a file (a media job's
/// input, a scanner's upload).
#[derive(Debug, Clone)]
pub enum Input {
    /// The bytes themselves.
    Memory(Bytes),
    /// The first `len` bytes of the file at `path`.
    File {
        /// The file.
        path: std::path::PathBuf,
        /// How many of its bytes are the input.
        len: u64,
    },
}

impl Input {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Input::Memory(b) => b.len() as u64,
            Input::File { len, .. } => *len,
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One cached object, ready to serve.
#[derive(Debug)]
pub struct Entry {
    /// blake3 of exactly the bytes served; also the blob's name and the ETag.
    pub hash: blake3::Hash,
    /// Length of the body in bytes.
    pub len: u64,
    /// Type sniffed from the bytes, never the origin's claim.
    pub content_type: HeaderValue,
    /// Every header of a 200 response except Content-Length (which depends on the range).
    pub headers: HeaderMap,
    /// The body, when small enough for the memory tier; `None` means read the blob from disk.
    pub body: Option<Bytes>,
    /// The blob's access record in the disk budget: a memory hit keeps the disk copy warm too.
    pub touch: Option<std::sync::Arc<evict::Touch>>,
    /// The host the bytes came from when a redirect led away from the source's host; a hit
    /// is refused once the domain policy blocks it.
    pub final_host: Option<std::sync::Arc<str>>,
    /// The blake3 of the origin's bytes when they are not the bytes served (a ban of either
    /// refuses the entry).
    pub origin_blake3: Option<blake3::Hash>,
    /// What is known of the origin's bytes (for the record the shared bucket gets).
    pub origin: Option<std::sync::Arc<index::OriginDigests>>,
    /// The blob's file, opened the first time the body is sent with `sendfile` and held while
    /// the entry is (or until [`Entry::release_file`]), so a hot entry costs no open and close
    /// per response.
    file: std::sync::Mutex<Option<std::sync::Arc<std::fs::File>>>,
    /// The file the body was verified against (read and hashed, or written from it by this
    /// process): only that file, unchanged, is sent with `sendfile` for the body.
    identity: Option<FileId>,
    /// A body that is not kept (its origin's rule says `store = "stream"`, or it is over the
    /// size limit with `cache.oversize = "stream"`) and too large for memory: the temp file it
    /// arrived in, removed when the last holder of the entry lets go.
    unkept: Option<std::sync::Arc<disk::TempBlob>>,
    /// Whether the store keeps it (false: served to the viewers of its fill, then gone).
    kept: bool,
}

/// What tells one file from another, or from itself changed: device, inode, size and
/// modification time (to the nanosecond). A file replaced under the blob's name has another
/// inode; one written in place, another size or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// The device the file is on.
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// Its size in bytes.
    pub len: u64,
    /// Its modification time (seconds and nanoseconds since the epoch).
    pub mtime: (i64, i64),
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// Whether `file` is still this one, unchanged (one `fstat`).
    pub fn matches(&self, file: &std::fs::File) -> bool {
        file.metadata().is_ok_and(|meta| FileId::of(&meta) == *self)
    }
}

/// Most blob files entries hold open at once (beyond it, a response opens its own); the
/// open-file limit is raised for them.
pub const HELD_FILES: usize = 4096;

/// Blob files entries hold now.
static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Entry {
    fn drop(&mut self) {
        self.release_file();
    }
}

/// Cache-Control of every successful response: the bytes behind a URL never change, because a
/// different body gets a different content hash and the URL names the source, not the bytes.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Even a hostile file sent with a wrong type cannot run script on the instance's domain.
pub const CSP: &str = "default-src 'none'; sandbox";

impl Entry {
    /// An entry for the bytes hashing to `hash` (`len` of them, sniffed as `content_type`),
    /// in memory (`body`) or on disk, with the headers every response of it carries.
    pub fn new(hash: blake3::Hash, len: u64, content_type: &str, body: Option<Bytes>) -> Self {
        let content_type = HeaderValue::from_str(content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
        let mut headers = HeaderMap::with_capacity(8);
        headers.insert(header::CONTENT_TYPE, content_type.clone());
        let etag = format!("\"{}\"", hash.to_hex());
        headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        Self {
            hash,
            len,
            content_type,
            headers,
            body,
            touch: None,
            final_host: None,
            origin_blake3: None,
            origin: None,
            file: std::sync::Mutex::new(None),
            identity: None,
            unkept: None,
            kept: true,
        }
    }

    /// Not kept by the store: served from memory or from `temp` (the file it arrived in) to
    /// those who hold it, then gone.
    pub fn unkept(mut self, temp: Option<disk::TempBlob>) -> Self {
        self.unkept = temp.map(std::sync::Arc::new);
        self.kept = false;
        self
    }

    /// Whether the store keeps it.
    pub fn is_kept(&self) -> bool {
        self.kept
    }

    /// The file an unkept body is read from.
    pub(crate) fn unkept_path(&self) -> Option<&std::path::Path> {
        self.unkept.as_deref().map(disk::TempBlob::path)
    }

    /// The file the body was verified against; without one, the body is never sent from a
    /// file.
    pub fn with_identity(mut self, identity: Option<FileId>) -> Self {
        self.identity = identity;
        self
    }

    /// The blob's file for `sendfile`: the one this entry holds, else opened now when that
    /// cannot wait for the disk, and then held while fewer than [`HELD_FILES`] are. Only the
    /// file the body was verified against, unchanged since (checked each time: one `fstat`):
    /// a file replaced or written over on disk is not sent under the body's ETag. `None`
    /// when there is no such file to be had without waiting.
    fn file(&self, disk: &disk::BlobStore) -> Option<std::sync::Arc<std::fs::File>> {
        use std::sync::atomic::Ordering;
        let identity = self.identity?;
        let mut held = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = &*held {
            if identity.matches(file) {
                return Some(file.clone());
            }
            *held = None;
            HELD.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let file = disk.open_now(&self.hash).filter(|f| identity.matches(f))?;
        if HELD.fetch_add(1, Ordering::Relaxed) < HELD_FILES {
            *held = Some(file.clone());
        } else {
            HELD.fetch_sub(1, Ordering::Relaxed);
        }
        Some(file)
    }

    /// Closes the file the entry holds: its blob is leaving the disk, whose space an open file
    /// would keep taken (responses under way keep their own handle to the end).
    pub fn release_file(&self) {
        let mut held = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if held.take().is_some() {
            HELD.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// What is known of the origin's bytes it was prepared from (bans of those refuse it).
    pub fn with_origin(mut self, origin: Option<&index::OriginDigests>) -> Self {
        let hex = origin.map(|o| o.blake3.as_str());
        self.origin_blake3 =
            hex.and_then(|h| blake3::Hash::from_hex(h).ok()).filter(|h| *h != self.hash);
        self.origin = origin.cloned().map(std::sync::Arc::new);
        self
    }

    /// The host the bytes came from after redirects.
    pub fn with_final_host(mut self, host: Option<&str>) -> Self {
        self.final_host = host.map(std::sync::Arc::from);
        self
    }

    /// Its access record in the disk budget.
    pub fn with_touch(mut self, touch: std::sync::Arc<evict::Touch>) -> Self {
        self.touch = Some(touch);
        self
    }

    /// Records a hit for eviction and retention.
    pub fn hit(&self) {
        if let Some(touch) = &self.touch {
            touch.hit();
        }
    }

    /// The quoted ETag value, as sent.
    pub fn etag(&self) -> &HeaderValue {
        &self.headers[header::ETAG]
    }
}
