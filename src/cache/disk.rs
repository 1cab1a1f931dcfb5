//! The disk tier's blobs: content-addressed files under `<cache.dir>/blobs/ab/<blake3 hex>`.
//!
//! A blob served without re-hashing is written to `<cache.dir>/tmp/`, optionally fsynced, then
//! renamed into place, so a crash leaves either no blob or a whole one under its content name.
//! A blob re-hashed on every load is written under its name at once (a rename and a temp file's
//! directory entries cost a sixth of a miss): a crash may tear it, and the hash on its next load
//! drops it, never serves it. Two fills of the same bytes race harmlessly: the second goes
//! through a temp file, and the rename of identical content is idempotent.
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
    /// Its name.
    pub hash: blake3::Hash,
    /// Its size in bytes.
    pub len: u64,
    /// When it was last written.
    pub modified: std::time::SystemTime,
}

/// The blob files under `<cache.dir>/blobs`, named by their blake3 (fanned out by its first
/// byte), and their temp files under `<cache.dir>/tmp`.
#[derive(Debug, Clone)]
pub struct BlobStore {
    blobs: PathBuf,
    tmp: PathBuf,
    fsync: bool,
    /// The small blobs kept in segment files instead (`<cache.dir>/segments`).
    segments: std::sync::Arc<super::segments::Segments>,
}

/// A blob being written. Dropping it without [`BlobStore::commit`] removes the temp file, so
/// a failed, refused or timed-out fill leaves nothing behind.
pub struct TempBlob {
    /// The temp file, written as the body arrives.
    pub file: tokio::io::BufWriter<tokio::fs::File>,
    path: PathBuf,
    committed: bool,
}

impl std::fmt::Debug for TempBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempBlob").field("path", &self.path).finish()
    }
}

impl TempBlob {
    /// Where it is written (readers need it flushed: [`Self::flushed_path`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

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
        let segments = super::segments::Segments::open(&dir.join("segments"))?;
        let store = Self {
            blobs: dir.join("blobs"),
            tmp: dir.join("tmp"),
            fsync,
            segments: std::sync::Arc::new(segments),
        };
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

    /// The segment files, where small blobs may be kept instead of a file each.
    pub fn segments(&self) -> &super::segments::Segments {
        &self.segments
    }

    fn temp_path(&self) -> io::Result<PathBuf> {
        let mut name = [0u8; 16];
        getrandom::fill(&mut name).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(self.tmp.join(hex::encode(name)))
    }

    /// A new temp file, removed when dropped unless committed under a blob's name.
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
    /// `sync` and `cache.fsync`), rename; or, when `checked` (the blob is re-hashed on every
    /// load), written under its name at once. A failure leaves no file behind. `sync` is asked
    /// for blobs served without re-hashing; the others are not rewritten when already present,
    /// which is looked for only when `maybe_stored` (the disk budget counts the blob: one that
    /// it does not count has no file, and a `statx` per fill is saved).
    /// Returns the blob's path and the identity of the file now holding those bytes.
    pub async fn write(
        &self,
        hash: &blake3::Hash,
        bytes: bytes::Bytes,
        sync: bool,
        maybe_stored: bool,
        checked: bool,
    ) -> io::Result<(PathBuf, super::FileId)> {
        let (temp, dest) = (self.temp_path()?, self.path(hash));
        let look = !sync && maybe_stored;
        let sync = sync && self.fsync;
        tokio::task::spawn_blocking(move || {
            // The same bytes under another URL (an emoji on many servers): already stored when
            // the file there holds exactly them. Compared, not trusted by its size: a copy a
            // crash tore is replaced, as a body held in memory may be sent from its file.
            // One that differs goes first, so a failed write below cannot leave it in place.
            if look {
                let held = std::fs::File::open(&dest).ok().and_then(|mut file| {
                    use std::io::Read;
                    let id = super::FileId::of(&file.metadata().ok()?);
                    let mut on_disk = Vec::with_capacity(bytes.len());
                    let same = id.len == bytes.len() as u64
                        && file.read_to_end(&mut on_disk).is_ok()
                        && on_disk == bytes[..];
                    Some(same.then_some(id))
                });
                match held {
                    Some(Some(id)) => return Ok((dest, id)),
                    Some(None) => {
                        let _ = std::fs::remove_file(&dest);
                    }
                    None => {}
                }
            }
            if checked && !sync {
                match write_new(&dest, &bytes) {
                    Ok(id) => return Ok((dest, id)),
                    // Another fill is writing the same bytes there, or the fan-out directory
                    // went: this copy goes the careful way, and replaces that one whole.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            let written = (|| {
                use std::io::Write;
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
                file.write_all(&bytes)?;
                if sync {
                    file.sync_all()?;
                }
                // The rename keeps device, inode, size and time: the identity of what was
                // written is the placed blob's.
                let id = super::FileId::of(&file.metadata()?);
                rename_into_place(&temp, &dest).map(|()| id)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written.map(|id| (dest, id))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The whole blob, read on a blocking thread in one call, and the identity of the file
    /// it was read from.
    pub async fn read(&self, hash: &blake3::Hash) -> io::Result<(bytes::Bytes, super::FileId)> {
        let path = self.path(hash);
        tokio::task::spawn_blocking(move || read_identified(&path))
            .await
            .map_err(io::Error::other)?
    }

    /// A small blob of `len` bytes whose content is checked against its name: `Ok(None)` when
    /// it is not `len` bytes or does not hash to `hash`. When the file's name and pages are all
    /// cached (the usual hit) it is opened, read and hashed on this thread without waiting for
    /// the disk; otherwise the whole check runs on the blocking pool.
    /// With the bytes, the identity of the file they were read from (and verified against).
    pub async fn read_verified(
        &self,
        hash: &blake3::Hash,
        len: u64,
    ) -> io::Result<Option<(bytes::Bytes, super::FileId)>> {
        if let Some(done) = self.read_verified_now(hash, len) {
            return done;
        }
        let path = self.path(hash);
        let hash = *hash;
        tokio::task::spawn_blocking(move || {
            let (bytes, id) = read_identified(&path)?;
            Ok(verified(bytes.into(), len, &hash).map(|b| (b, id)))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// [`Self::read_verified`] on this thread, when that needs no wait for the disk (the file's
    /// name and bytes are cached, and it is small); `None` when it would wait.
    pub fn read_verified_now(
        &self,
        hash: &blake3::Hash,
        len: u64,
    ) -> Option<io::Result<Option<(bytes::Bytes, super::FileId)>>> {
        if len > INLINE_READ {
            return None;
        }
        let file = match open_cached(&self.path(hash))? {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        let id = match file.metadata() {
            Ok(meta) => super::FileId::of(&meta),
            Err(e) => return Some(Err(e)),
        };
        // One byte more than expected tells a longer file from the right one; fewer than `len`
        // may be the end of a short file or of what is cached, so the blocking read decides.
        match read_cached(&file, 0, len as usize + 1) {
            Some(bytes) if bytes.len() as u64 == len => {
                Some(Ok(verified(bytes, len, hash).map(|b| (b, id))))
            }
            Some(bytes) if bytes.len() as u64 > len => Some(Ok(None)),
            _ => None,
        }
    }

    /// The blob opened for reading, to be read in chunks with [`read_chunk`]: on this thread
    /// when its name is cached, else on the blocking pool.
    pub async fn open_blob(
        &self,
        hash: &blake3::Hash,
    ) -> io::Result<std::sync::Arc<std::fs::File>> {
        let path = self.path(hash);
        if let Some(file) = open_cached(&path) {
            return file.map(std::sync::Arc::new);
        }
        tokio::task::spawn_blocking(move || std::fs::File::open(path).map(std::sync::Arc::new))
            .await
            .map_err(io::Error::other)?
    }

    /// The blob opened on this thread, only when that cannot wait for the disk (its name is
    /// cached); `None` otherwise, or when it is missing.
    pub fn open_now(&self, hash: &blake3::Hash) -> Option<std::sync::Arc<std::fs::File>> {
        open_cached(&self.path(hash))?.ok().map(std::sync::Arc::new)
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

    /// Deletes the blob `hash` (gone already: nothing to do).
    pub async fn remove(&self, hash: &blake3::Hash) {
        let _ = tokio::fs::remove_file(self.path(hash)).await;
    }
}

/// Creates `dest` (which must not exist) holding `bytes`; a failed write removes it again.
fn write_new(dest: &Path, bytes: &[u8]) -> io::Result<super::FileId> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(dest)?;
    let written = file.write_all(bytes).and_then(|()| file.metadata());
    match written {
        Ok(meta) => Ok(super::FileId::of(&meta)),
        Err(e) => {
            let _ = std::fs::remove_file(dest);
            Err(e)
        }
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

/// Up to `len` bytes of `file` from `offset` as one chunk of a streamed body: read on this
/// thread when the page cache holds them (a short chunk when it holds only the first part),
/// else exactly `len` on the blocking pool. Each viewer holds one chunk at a time, whatever
/// the size of the range it asked for. The file ending early is an error (a blob that shrank).
pub async fn read_chunk(
    file: &std::sync::Arc<std::fs::File>,
    offset: u64,
    len: usize,
) -> io::Result<bytes::Bytes> {
    if let Some(bytes) = read_cached(file, offset, len) {
        return Ok(bytes::Bytes::from(bytes));
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map(|()| bytes::Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Whether every page of `len` bytes of `file` from `offset` is in the page cache:
/// `cachestat(2)` (Linux 6.5); before it, whether the range's first and last bytes are.
pub fn resident(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static NO_CACHESTAT: AtomicBool = AtomicBool::new(false);
    if len == 0 {
        return true;
    }
    if !NO_CACHESTAT.load(Ordering::Relaxed) {
        match cached_pages(file, offset, len) {
            Ok((cached, pages)) => return cached >= pages,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_CACHESTAT.store(true, Ordering::Relaxed)
            }
            Err(_) => return false,
        }
    }
    [offset, offset + len - 1].into_iter().all(|at| read_cached(file, at, 1).is_some())
}

/// Pages of the range in the page cache, and pages in the range (of 4 KiB: on a system with
/// larger pages the count falls short and the range is taken as not cached).
fn cached_pages(file: &std::fs::File, offset: u64, len: u64) -> io::Result<(u64, u64)> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    /// The same number on every architecture (added after the tables were unified).
    const SYS_CACHESTAT: libc::c_long = 451;
    const PAGE: u64 = 4096;
    use std::os::fd::AsRawFd;
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    #[allow(unsafe_code)]
    // SAFETY: cachestat reads one `Range` and writes one `Stat`, both `repr(C)` with the
    // kernel's layout (two and five u64) and alive for the call; the descriptor is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((stat.cache, (offset + len).div_ceil(PAGE) - offset / PAGE))
}

/// The whole file at `path` and the identity of the file read (one open: the bytes are that
/// file's, whatever the name points to later).
fn read_identified(path: &Path) -> io::Result<(bytes::Bytes, super::FileId)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let id = super::FileId::of(&file.metadata()?);
    let mut bytes = Vec::with_capacity(id.len as usize);
    file.read_to_end(&mut bytes)?;
    Ok((bytes.into(), id))
}

/// `bytes` if they are `len` long and hash to `hash`.
fn verified(bytes: Vec<u8>, len: u64, hash: &blake3::Hash) -> Option<bytes::Bytes> {
    (bytes.len() as u64 == len && blake3::hash(&bytes) == *hash).then(|| bytes.into())
}

/// Blobs up to this size are opened, read and hashed on the serving thread when cached.
const INLINE_READ: u64 = 256 * 1024;

/// `path` opened only if every component of it is in the kernel's name cache (`openat2` with
/// `RESOLVE_CACHED`, which fails rather than read a directory from disk). `None`: not cached,
/// or a kernel without it (before 5.12); the caller opens it on the blocking pool.
fn open_cached(path: &Path) -> Option<io::Result<std::fs::File>> {
    use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
    // Nor an access-time update, which could wait on the file system's journal (a file not
    // parasol's own refuses NOATIME: it is then opened on the blocking pool).
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOATIME;
    match rustix::fs::openat2(CWD, path, flags, Mode::empty(), ResolveFlags::CACHED) {
        Ok(fd) => Some(Ok(std::fs::File::from(fd))),
        Err(rustix::io::Errno::NOENT) => Some(Err(io::ErrorKind::NotFound.into())),
        Err(_) => None,
    }
}

/// Up to `len` bytes of `file` from `offset`, only if the page cache already holds at least
/// the first of them (`preadv2` with `RWF_NOWAIT`, which returns rather than wait for the
/// disk). `None`: nothing cached, at the end of the file, or a kernel without it.
pub(super) fn read_cached(file: &std::fs::File, offset: u64, len: usize) -> Option<Vec<u8>> {
    use rustix::io::{IoSliceMut, ReadWriteFlags};
    let mut buf = vec![0u8; len];
    match rustix::io::preadv2(
        file,
        &mut [IoSliceMut::new(&mut buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    ) {
        Ok(n) if n > 0 => {
            buf.truncate(n);
            Some(buf)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob re-hashed on load is written under its name at once; a file a crash left there
    /// (torn, not counted so not looked at) is replaced whole by the careful way, never
    /// appended to or kept.
    #[tokio::test]
    async fn a_checked_blob_is_written_in_place_and_replaces_a_torn_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), false).unwrap();
        let bytes = bytes::Bytes::from(vec![5u8; 10_000]);
        let hash = blake3::hash(&bytes);
        let (path, id) = store.write(&hash, bytes.clone(), false, false, true).await.unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), id.len), (bytes.to_vec(), 10_000));
        std::fs::write(&path, &bytes[..300]).unwrap();
        let (_, id) = store.write(&hash, bytes.clone(), false, false, true).await.unwrap();
        assert_eq!((std::fs::read(&path).unwrap(), id.len), (bytes.to_vec(), 10_000));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp left");
    }

    /// Whether the blob is read on the serving thread (cached) or on the blocking pool, only a
    /// file of the right length and hash comes back; a longer, shorter or altered one is
    /// refused and a missing one is `NotFound`.
    #[tokio::test]
    async fn a_blob_is_returned_only_when_it_matches_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), false).unwrap();
        for len in [1usize, 4096, 65_536, 300_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let hash = blake3::hash(&bytes);
            let (_, written) =
                store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
            let len = len as u64;
            let (read, id) = store.read_verified(&hash, len).await.unwrap().unwrap();
            assert_eq!(&read[..], &bytes[..], "{len} bytes");
            assert_eq!(id, written, "read from the file written");
            assert_eq!(id.len, len);
            let path = store.path(&hash);
            let mut longer = bytes.clone();
            longer.push(0);
            std::fs::write(&path, &longer).unwrap();
            assert_eq!(store.read_verified(&hash, len).await.unwrap(), None, "longer, {len}");
            std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
            assert_eq!(store.read_verified(&hash, len).await.unwrap(), None, "shorter, {len}");
            let mut altered = bytes.clone();
            altered[bytes.len() / 2] ^= 1;
            std::fs::write(&path, &altered).unwrap();
            assert_eq!(store.read_verified(&hash, len).await.unwrap(), None, "altered, {len}");
            std::fs::remove_file(&path).unwrap();
            let gone = store.read_verified(&hash, len).await.unwrap_err();
            assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        }
    }

    /// A small blob already under its name is kept only when the file holds exactly its bytes;
    /// a copy of the same length but other bytes (torn by a crash) is replaced.
    #[tokio::test]
    async fn a_stored_copy_is_kept_only_when_it_holds_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), false).unwrap();
        let bytes: Vec<u8> = (0..50_000usize).map(|i| (i * 31 % 241) as u8).collect();
        let hash = blake3::hash(&bytes);
        let (path, first_id) =
            store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let first = inode(&path);
        let (_, again) =
            store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
        assert_eq!(inode(&path), first, "the same bytes are not written again");
        assert_eq!(again, first_id, "and the file kept is the one written");
        std::fs::write(&path, vec![0u8; bytes.len()]).unwrap();
        store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "a torn copy is replaced");
    }

    /// A range counts as resident only when the page cache holds it; a range past the end of
    /// the file never does.
    #[tokio::test]
    async fn a_range_is_resident_only_when_the_page_cache_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), false).unwrap();
        let bytes: Vec<u8> = (0..300_000usize).map(|i| (i * 17 % 239) as u8).collect();
        let hash = blake3::hash(&bytes);
        store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
        // Just written: every page is cached.
        let file = store.open_now(&hash).expect("its name is cached");
        assert!(resident(&file, 0, bytes.len() as u64));
        assert!(resident(&file, 70_000, 100_000));
        assert!(!resident(&file, 0, bytes.len() as u64 + 100_000));
        assert!(store.open_now(&blake3::hash(b"absent")).is_none());
    }

    /// A chunk is at most what was asked for, the chunks of a blob add up to its bytes, and a
    /// blob that ends before the chunk asked for is an error, not a short body.
    #[tokio::test]
    async fn chunks_add_up_to_the_blob_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), false).unwrap();
        let bytes: Vec<u8> = (0..1_000_000usize).map(|i| (i * 13 % 253) as u8).collect();
        let hash = blake3::hash(&bytes);
        store.write(&hash, bytes.clone().into(), false, true, false).await.unwrap();
        let file = store.open_blob(&hash).await.unwrap();
        let (mut offset, mut out) = (10u64, Vec::new());
        while offset < bytes.len() as u64 {
            let want = (bytes.len() as u64 - offset).min(65_536) as usize;
            let chunk = read_chunk(&file, offset, want).await.unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= want);
            offset += chunk.len() as u64;
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, bytes[10..]);
        // Across the end: the 5 bytes there are when cached (the next read then finds the end),
        // or at once the error when read on the blocking pool.
        match read_chunk(&file, bytes.len() as u64 - 5, 10).await {
            Ok(chunk) => assert_eq!(chunk[..], bytes[bytes.len() - 5..]),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
        }
        let end = read_chunk(&file, bytes.len() as u64, 10).await.unwrap_err();
        assert_eq!(end.kind(), io::ErrorKind::UnexpectedEof);
    }
}
