//! The disk tier's blobs: content-addressed files under `<cache.dir>/blobs/ab/<blake3 hex>`.
//!
//! A blob is written to `<cache.dir>/tmp/`, optionally fsynced, then renamed into place, so a
//! crash leaves either no blob or a whole one, never a partial file under a content name. Two
//! fills of the same bytes race harmlessly: the rename of identical content is idempotent.
//! The temp area is emptied at start, removing what a crash left behind.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

/// Written beside `blobs/` once the store has the one-level layout.
const LAYOUT_MARKER: &str = "blobs.layout-1";

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

    /// The file's path once everything written so far has reached it, for a reader (a media
    /// job streamed from it).
    pub async fn flushed_path(&mut self) -> io::Result<&Path> {
        self.file.flush().await?;
        Ok(&self.path)
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
        let marker = dir.join(LAYOUT_MARKER);
        if !marker.exists() {
            store.move_two_level_blobs()?;
        }
        for prefix in 0..=255u8 {
            std::fs::create_dir_all(store.blobs.join(hex::encode([prefix])))?;
        }
        std::fs::write(&marker, b"1\n")?;
        let _ = std::fs::remove_dir_all(&store.tmp);
        std::fs::create_dir_all(&store.tmp)?;
        Ok(store)
    }

    /// Stores written before the one-level layout kept blobs in `blobs/ab/cd/`: moves them up
    /// once (the layout marker then skips this at every later start).
    fn move_two_level_blobs(&self) -> io::Result<()> {
        let dirs = |p: &Path| std::fs::read_dir(p).into_iter().flatten().flatten();
        let mut moved = 0u64;
        for a in dirs(&self.blobs) {
            for b in dirs(&a.path()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                for f in dirs(&b.path()) {
                    std::fs::rename(f.path(), a.path().join(f.file_name()))?;
                    moved += 1;
                }
                std::fs::remove_dir(b.path())?;
            }
        }
        if moved > 0 {
            tracing::info!(moved, "moved blobs to the one-level layout");
        }
        Ok(())
    }

    /// `blobs/ab/abcd…`: one level of 256 directories, made at open. Ten million blobs are
    /// 40,000 per directory, which ext4 and XFS index; a second level would cost a `mkdir` on
    /// most fills of a young cache (measured: a tenth of the miss path's CPU) and 65,536
    /// directories to walk at start.
    pub fn path(&self, hash: &blake3::Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.blobs.join(&hex[0..2]).join(hex.as_str())
    }

    fn temp_path(&self) -> io::Result<PathBuf> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(self.tmp.join(hex::encode(name)))
    }

    pub async fn create_temp(&self) -> io::Result<TempBlob> {
        let path = self.temp_path()?;
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).open(&path).await?;
        Ok(TempBlob {
            file: tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file),
            path,
            committed: false,
        })
    }

    /// Makes the temp blob durable (when `sync` and `cache.fsync`) and renames it to its
    /// content name.
    pub async fn commit(
        &self,
        mut temp: TempBlob,
        hash: &blake3::Hash,
        sync: bool,
    ) -> io::Result<PathBuf> {
        temp.file.flush().await?;
        if sync && self.fsync {
            temp.file.get_ref().sync_all().await?;
        }
        let (from, dest) = (temp.path.clone(), self.path(hash));
        let placed = dest.clone();
        tokio::task::spawn_blocking(move || rename_into_place(&from, &dest))
            .await
            .map_err(io::Error::other)??;
        temp.committed = true;
        Ok(placed)
    }

    /// Stores `bytes` as the blob `hash` in one blocking call: temp file, write, fsync (when
    /// `sync` and `cache.fsync`), rename. A failure leaves no file behind. `sync` is asked for
    /// blobs served without re-hashing; the others are not rewritten when already present.
    pub async fn write(
        &self,
        hash: &blake3::Hash,
        bytes: bytes::Bytes,
        sync: bool,
    ) -> io::Result<PathBuf> {
        let (temp, dest) = (self.temp_path()?, self.path(hash));
        let verified_on_load = !sync;
        let sync = sync && self.fsync;
        tokio::task::spawn_blocking(move || {
            // The same bytes under another URL (an emoji on many servers): already stored.
            // Skipped only for blobs re-hashed on every load, so a rotten copy is not trusted.
            let present = std::fs::metadata(&dest).is_ok_and(|m| m.len() == bytes.len() as u64);
            if verified_on_load && present {
                return Ok(dest);
            }
            let written = (|| {
                use std::io::Write;
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
                file.write_all(&bytes)?;
                if sync {
                    file.sync_all()?;
                }
                rename_into_place(&temp, &dest)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written.map(|()| dest)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The whole blob, read on a blocking thread in one call.
    pub async fn read(&self, hash: &blake3::Hash) -> io::Result<bytes::Bytes> {
        let path = self.path(hash);
        tokio::task::spawn_blocking(move || std::fs::read(path).map(bytes::Bytes::from))
            .await
            .map_err(io::Error::other)?
    }

    /// The blob opened for reading, to be read in chunks with [`read_exact_at`] (one reader
    /// at a time: it seeks).
    pub async fn open_blob(
        &self,
        hash: &blake3::Hash,
    ) -> io::Result<std::sync::Arc<std::fs::File>> {
        let path = self.path(hash);
        tokio::task::spawn_blocking(move || std::fs::File::open(path).map(std::sync::Arc::new))
            .await
            .map_err(io::Error::other)?
    }

    /// `len` bytes of the blob from `offset`, read on a blocking thread in one call.
    pub async fn read_range(
        &self,
        hash: &blake3::Hash,
        offset: u64,
        len: usize,
    ) -> io::Result<bytes::Bytes> {
        let path = self.path(hash);
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(path)?;
            read_exact_at(&file, offset, len).map(bytes::Bytes::from)
        })
        .await
        .map_err(io::Error::other)?
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
                for f in dirs(&a.path()) {
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
            Ok(out)
        })
        .await
        .map_err(io::Error::other)?
    }

    pub async fn remove(&self, hash: &blake3::Hash) {
        let _ = tokio::fs::remove_file(self.path(hash)).await;
    }
}

/// Renames `from` to `dest`, creating the fan-out directory should it have gone missing
/// (deleted by hand while running).
fn rename_into_place(from: &Path, dest: &Path) -> io::Result<()> {
    match std::fs::rename(from, dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(from, dest)
        }
        other => other,
    }
}

/// `len` bytes of `file` from `offset` into a new buffer that is not zeroed first (reads go
/// straight into the spare capacity): for a 1 MiB Range, zeroing and its page faults were
/// measured at a quarter of the CPU.
pub fn read_exact_at(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}
