//! The disk tier's blobs: content-addressed files under `<cache.dir>/blobs/ab/cd/<blake3 hex>`.
//!
//! A blob is written to `<cache.dir>/tmp/`, optionally fsynced, then renamed into place, so a
//! crash leaves either no blob or a whole one, never a partial file under a content name. Two
//! fills of the same bytes race harmlessly: the rename of identical content is idempotent.
//! The temp area is emptied at start, removing what a crash left behind.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Write buffer of a fill: large writes keep the number of blocking file calls low.
const WRITE_BUFFER: usize = 256 * 1024;

/// One blob file found on disk.
#[derive(Debug, Clone)]
pub struct BlobFile {
    pub hash: blake3::Hash,
    pub len: u64,
    pub modified: std::time::SystemTime,
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    fsync: bool,
}

/// A blob being written. Dropping it without [`BlobStore::commit`] removes the temp file, so
/// a failed, refused or timed-out fill leaves nothing behind.
pub struct TempBlob {
    pub file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    committed: bool,
}

impl TempBlob {
    /// Everything written so far.
    pub async fn read_back(&mut self) -> io::Result<Vec<u8>> {
        self.file.flush().await?;
        tokio::fs::read(&self.path).await
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl BlobStore {
    /// Opens the store under `dir`, creating it, and sweeps leftovers from the temp area.
    pub fn open(dir: &Path, fsync: bool) -> io::Result<Self> {
        let store = Self { blobs: dir.join("blobs"), tmp: dir.join("tmp"), fsync };
        std::fs::create_dir_all(&store.blobs)?;
        let _ = std::fs::remove_dir_all(&store.tmp);
        std::fs::create_dir_all(&store.tmp)?;
        Ok(store)
    }

    /// `blobs/ab/cd/abcd…`: two levels of fan-out keep directories small at millions of blobs.
    pub fn path(&self, hash: &blake3::Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.blobs.join(&hex[0..2]).join(&hex[2..4]).join(hex.as_str())
    }

    pub async fn create_temp(&self) -> io::Result<TempBlob> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| io::Error::other(e.to_string()))?;
        let path = self.tmp.join(hex::encode(name));
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        Ok(TempBlob {
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            committed: false,
        })
    }

    /// Makes the temp blob durable (when `cache.fsync`) and renames it to its content name.
    pub async fn commit(&self, mut temp: TempBlob, hash: &blake3::Hash) -> io::Result<PathBuf> {
        temp.file.flush().await?;
        if self.fsync {
            temp.file.get_ref().sync_all().await?;
        }
        let dest = self.path(hash);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        tokio::fs::rename(&temp.path, &dest).await?;
        temp.committed = true;
        Ok(dest)
    }

    /// Size of the blob on disk, or `None` when it is missing.
    pub async fn len(&self, hash: &blake3::Hash) -> Option<u64> {
        tokio::fs::metadata(self.path(hash)).await.ok().map(|m| m.len())
    }

    /// Every blob file, with its modification time; skips anything not named like a blob.
    pub async fn list(&self) -> io::Result<Vec<BlobFile>> {
        let root = self.blobs.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Anything that is not a directory where one is expected is skipped, not fatal.
            let dirs = |p: &std::path::Path| std::fs::read_dir(p).into_iter().flatten().flatten();
            for a in dirs(&root) {
                for b in dirs(&a.path()) {
                    for f in dirs(&b.path()) {
                        let name = f.file_name();
                        let Some(hash) = name.to_str().and_then(|n| blake3::Hash::from_hex(n).ok())
                        else {
                            continue;
                        };
                        let Ok(meta) = f.metadata() else { continue };
                        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                        out.push(BlobFile { hash, len: meta.len(), modified });
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }

    pub async fn remove(&self, hash: &blake3::Hash) {
        let _ = tokio::fs::remove_file(self.path(hash)).await;
    }
}
