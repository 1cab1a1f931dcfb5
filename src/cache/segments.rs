//! Small blobs in a few large files: each is appended to the open segment at a 4 KiB-aligned
//! offset, and leaves it by a punched hole, so storing one costs a write into an open file and
//! evicting one frees its blocks without an `unlink` (`benches/blob_layout.rs`: 22.7 µs per
//! 64 KiB blob stored and evicted, against 74.5 µs for a file each on a fresh ext4 and 251 µs
//! on an old one). A segment whose blobs are all gone is deleted whole.
//!
//! Where a blob lies (its [`Place`]) is kept by whoever names it (the index records); this
//! module keeps only which places are live, rebuilt at start from those names
//! ([`Segments::restore`]), which also frees whatever a crash left unnamed. Bytes are trusted
//! nowhere: a read returns them only when they hash to the blob's name, so a write a crash
//! tore, or a hole punched since, is never taken for the blob.
//!
//! Offsets are never reused: a segment is appended to until full, and the next has a higher
//! number, so a place once freed never holds other bytes.
//!
//! The store ([`super::store::Store`]) keeps blobs up to `cache.segment_max_object_bytes` here,
//! the others in a file each ([`super::disk`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes a segment holds before the next one is opened.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Blobs start on a block boundary, so a punched hole frees exactly their blocks.
const ALIGN: u64 = 4096;

/// How long the punching thread gathers holes before it punches them: it wakes at most this
/// often, whatever the rate of evictions.
pub const PUNCH_TICK: Duration = Duration::from_millis(10);

/// An append that took longer than this on the caller's thread means the disk is not keeping
/// up (the kernel makes writers of dirty pages wait): appends then go to the blocking pool for
/// [`BLOCKING_FOR`], where a wait holds up no viewer.
const SLOW_WRITE: Duration = Duration::from_millis(5);
const BLOCKING_FOR: Duration = Duration::from_secs(1);

/// Where a blob's bytes lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Place {
    /// The segment's number (its file is `<number as 16 hex digits>.seg`).
    pub segment: u64,
    /// Where in it the bytes start.
    pub offset: u64,
    /// How many there are.
    pub len: u64,
}

/// The segment files under one directory, and the blobs live in them.
pub struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Mutex<Inner>,
    /// Holes for the punching thread.
    punches: mpsc::Sender<(Arc<std::fs::File>, Place)>,
    /// Until when (ms after `started`) appends go to the blocking pool: one was slow.
    blocking_until: AtomicU64,
    started: Instant,
}

#[derive(Default)]
struct Inner {
    /// Every segment file, open for reading and writing.
    files: BTreeMap<u64, Arc<std::fs::File>>,
    /// The segment appended to, and where its next blob starts.
    active: Option<(u64, u64)>,
    /// The number the next segment gets.
    next: u64,
    live: HashMap<[u8; 32], Place>,
    /// Live blobs per segment.
    counts: HashMap<u64, usize>,
    /// The lease of each live blob lent out ([`Segments::lend`]) and perhaps still held; only
    /// live blobs are here.
    leases: HashMap<[u8; 32], Weak<Lease>>,
}

/// A live blob's bytes lent out to be sent from its segment file (`sendfile`) after this
/// returns: freeing the blob while any holder of the lease is alive leaves its blocks in
/// place, punched when the last holder is done, so a send under way never reads a hole.
pub struct Lent {
    /// The segment file.
    pub file: Arc<std::fs::File>,
    /// Where the blob lies in it.
    pub place: Place,
    _lease: Arc<Lease>,
}

/// What the holders of a [`Lent`] blob share: the hole to punch once they are all done, when
/// the blob was freed meanwhile.
struct Lease {
    deferred: Mutex<Option<(Arc<std::fs::File>, Place)>>,
    punches: mpsc::Sender<(Arc<std::fs::File>, Place)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let deferred = self.deferred.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(hole) = deferred {
            let _ = self.punches.send(hole);
        }
    }
}

/// The punching thread: punches the holes it is sent, those of a tick together; ends when the
/// segments are dropped. A hole that cannot be punched (a file system without holes) costs
/// space until its segment goes, never bytes: its place is not live.
fn punch_loop(holes: mpsc::Receiver<(Arc<std::fs::File>, Place)>) {
    while let Ok(first) = holes.recv() {
        std::thread::sleep(PUNCH_TICK);
        for (file, place) in std::iter::once(first).chain(holes.try_iter()) {
            let _ = punch_hole(&file, place.offset, taken(place.len));
        }
    }
}

fn name(segment: u64) -> String {
    format!("{segment:016x}.seg")
}

/// The disk a blob of `len` bytes takes in a segment (whole blocks, so the next starts on a
/// block boundary): what the disk budget charges it.
pub fn taken(len: u64) -> u64 {
    len.div_ceil(ALIGN) * ALIGN
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

impl std::fmt::Debug for Segments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segments").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Segments {
    /// The segments under `dir` (made if missing), each of [`SEGMENT_BYTES`]. None is live
    /// until [`Self::restore`] names them; the next blob goes into a new segment.
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_sized(dir, SEGMENT_BYTES)
    }

    /// [`Self::open`] with segments of `segment_bytes` (tests use small ones).
    pub fn open_sized(dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut inner = Inner::default();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(hex) = file_name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
                continue;
            };
            let Ok(segment) = u64::from_str_radix(hex, 16) else { continue };
            let file = std::fs::OpenOptions::new().read(true).write(true).open(entry.path())?;
            inner.files.insert(segment, Arc::new(file));
            inner.next = inner.next.max(segment + 1);
        }
        let (punches, holes) = mpsc::channel();
        std::thread::Builder::new()
            .name("parasol-punch".into())
            .spawn(move || punch_loop(holes))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: Mutex::new(inner),
            punches,
            blocking_until: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many blobs are live here.
    pub fn live_blobs(&self) -> usize {
        self.lock().live.len()
    }

    /// Where the blob `hash` lies, if it is live here.
    pub fn place(&self, hash: &blake3::Hash) -> Option<Place> {
        self.lock().live.get(hash.as_bytes()).copied()
    }

    /// The live blob `hash` lent out to be sent from its segment file: its blocks stay until
    /// the returned lease (and every other of it) is dropped, even should the blob be freed
    /// meanwhile. `None` when it is not live here.
    pub fn lend(&self, hash: &blake3::Hash) -> Option<Lent> {
        let mut inner = self.lock();
        let place = *inner.live.get(hash.as_bytes())?;
        let file = inner.files.get(&place.segment)?.clone();
        let lease = match inner.leases.get(hash.as_bytes()).and_then(Weak::upgrade) {
            Some(lease) => lease,
            None => {
                let deferred = Mutex::new(None);
                let lease = Arc::new(Lease { deferred, punches: self.punches.clone() });
                inner.leases.insert(*hash.as_bytes(), Arc::downgrade(&lease));
                lease
            }
        };
        Some(Lent { file, place, _lease: lease })
    }

    /// Stores `bytes` (which hash to `hash`) and returns where; bytes already live are not
    /// written twice. A failed write leaves the place free, never named.
    pub async fn append(&self, hash: &blake3::Hash, bytes: bytes::Bytes) -> io::Result<Place> {
        let len = bytes.len() as u64;
        let (place, file) = {
            let mut inner = self.lock();
            if let Some(place) = inner.live.get(hash.as_bytes()) {
                return Ok(*place);
            }
            let full = inner.active.is_none_or(|(_, end)| end + len > self.segment_bytes);
            if full {
                let segment = inner.next;
                let path = self.dir.join(name(segment));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)?;
                inner.files.insert(segment, Arc::new(file));
                inner.next += 1;
                let old = inner.active.replace((segment, 0));
                // The old segment takes no more blobs: gone with its last one.
                if let Some((old, _)) = old {
                    if inner.counts.get(&old).copied().unwrap_or(0) == 0 {
                        self.delete(&mut inner, old);
                    }
                }
            }
            let (segment, end) = inner.active.expect("a segment is open");
            let place = Place { segment, offset: end, len };
            inner.active = Some((segment, end + taken(len)));
            inner.live.insert(*hash.as_bytes(), place);
            *inner.counts.entry(segment).or_default() += 1;
            (place, inner.files[&segment].clone())
        };
        let written = self.write(file, bytes, place.offset).await;
        if let Err(e) = written {
            self.forget(hash).await;
            return Err(e);
        }
        Ok(place)
    }

    /// Writes `bytes` at `offset` of `file`: on this thread (into the page cache, as a cache
    /// server's event loop writes its files), unless a write lately waited for the disk.
    async fn write(
        &self,
        file: Arc<std::fs::File>,
        bytes: bytes::Bytes,
        offset: u64,
    ) -> io::Result<()> {
        let now = self.started.elapsed().as_millis() as u64;
        if now < self.blocking_until.load(Ordering::Relaxed) {
            return blocking(move || file.write_all_at(&bytes, offset)).await;
        }
        let started = Instant::now();
        let written = file.write_all_at(&bytes, offset);
        if started.elapsed() > SLOW_WRITE {
            let until = self.started.elapsed() + BLOCKING_FOR;
            self.blocking_until.store(until.as_millis() as u64, Ordering::Relaxed);
            tracing::debug!(
                "a segment write waited for the disk: writes go to the blocking pool for a while"
            );
        }
        written
    }

    /// The bytes at `place` if they hash to `hash`: `Ok(None)` when they do not (torn,
    /// punched, overwritten), `NotFound` when the segment is gone.
    pub async fn read(
        &self,
        hash: &blake3::Hash,
        place: Place,
    ) -> io::Result<Option<bytes::Bytes>> {
        if place.len > self.segment_bytes {
            return Ok(None);
        }
        let file = self.file(place.segment)?;
        let hash = *hash;
        blocking(move || {
            let mut buf = vec![0u8; place.len as usize];
            match file.read_exact_at(&mut buf, place.offset) {
                Ok(()) => Ok(checked(buf, &hash)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// [`Self::read`] on this thread when the page cache holds the bytes; `None` when reading
    /// them would wait for the disk.
    pub fn read_now(
        &self,
        hash: &blake3::Hash,
        place: Place,
    ) -> Option<io::Result<Option<bytes::Bytes>>> {
        if place.len > self.segment_bytes {
            return Some(Ok(None));
        }
        let file = match self.file(place.segment) {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        let buf = super::disk::read_cached(&file, place.offset, place.len as usize)?;
        // Fewer bytes than asked: the rest is not cached, or the file ends short.
        (buf.len() as u64 == place.len).then(|| Ok(checked(buf, hash)))
    }

    fn file(&self, segment: u64) -> io::Result<Arc<std::fs::File>> {
        let inner = self.lock();
        inner.files.get(&segment).cloned().ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    /// Frees the blob `hash`: its blocks punched out, or its segment deleted when it was the
    /// last there and the segment takes no more. Whether it was live here.
    pub async fn forget(&self, hash: &blake3::Hash) -> bool {
        match self.release(hash) {
            Some(freed) => {
                freed.punch().await;
                true
            }
            None => false,
        }
    }

    /// [`Self::forget`] without the wait: the blob is no longer live when this returns (and
    /// an emptied segment deleted); its hole is punched by [`Freed::punch`] or [`Freed::punch_later`]. `None`: it was
    /// not live here.
    pub fn release(&self, hash: &blake3::Hash) -> Option<Freed> {
        let mut inner = self.lock();
        let place = inner.live.remove(hash.as_bytes())?;
        let lease = inner.leases.remove(hash.as_bytes()).and_then(|lease| lease.upgrade());
        let count = inner.counts.entry(place.segment).or_default();
        *count = count.saturating_sub(1);
        let left = *count;
        let active = inner.active.is_some_and(|(segment, _)| segment == place.segment);
        if left == 0 && !active {
            // Lent bytes stay readable through the open file after the unlink.
            self.delete(&mut inner, place.segment);
            Some(Freed(None))
        } else {
            let freed = inner.files.get(&place.segment).cloned().map(|file| (file, place));
            match lease {
                // Punched when the last holder is done with the bytes.
                Some(lease) => {
                    *lease.deferred.lock().unwrap_or_else(|p| p.into_inner()) = freed;
                    Some(Freed(None))
                }
                None => Some(Freed(freed)),
            }
        }
    }

    /// Deletes `segment` and forgets it (under the lock: no append can pick it meanwhile).
    fn delete(&self, inner: &mut Inner, segment: u64) {
        inner.files.remove(&segment);
        inner.counts.remove(&segment);
        let _ = std::fs::remove_file(self.dir.join(name(segment)));
    }

    /// At start: the blobs named elsewhere (`named`: each blob's hash and place) become live,
    /// except those whose place lies outside its segment, which are returned (their names
    /// are to be dropped). Every byte no live blob covers is punched out, and every segment
    /// no live blob is in is deleted: what a crash left between a write and its record.
    pub async fn restore(
        &self,
        named: impl IntoIterator<Item = (blake3::Hash, Place)>,
    ) -> io::Result<Vec<blake3::Hash>> {
        let mut bad = Vec::new();
        let mut by_segment: BTreeMap<u64, Vec<Place>> = BTreeMap::new();
        {
            let mut inner = self.lock();
            for (hash, place) in named {
                let fits = inner.files.get(&place.segment).and_then(|f| f.metadata().ok());
                let fits = fits.is_some_and(|m| place.offset + place.len <= m.len());
                if !fits {
                    bad.push(hash);
                    continue;
                }
                if inner.live.insert(*hash.as_bytes(), place).is_none() {
                    *inner.counts.entry(place.segment).or_default() += 1;
                    by_segment.entry(place.segment).or_default().push(place);
                }
            }
            // The segment appended to since the start (should anything come first) is this
            // run's own.
            let active = inner.active.map(|(segment, _)| segment);
            let unnamed = inner.files.keys().filter(|s| !by_segment.contains_key(s));
            let unnamed: Vec<u64> = unnamed.filter(|s| Some(**s) != active).copied().collect();
            for segment in unnamed {
                self.delete(&mut inner, segment);
            }
        }
        for (segment, mut places) in by_segment {
            let file = self.file(segment)?;
            places.sort_by_key(|p| p.offset);
            blocking(move || {
                let mut free_from = 0;
                for place in places {
                    if place.offset > free_from {
                        punch_hole(&file, free_from, place.offset - free_from)?;
                    }
                    free_from = free_from.max(place.offset + taken(place.len));
                }
                let end = file.metadata()?.len();
                if end > free_from {
                    punch_hole(&file, free_from, end - free_from)?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(bad)
    }
}

/// A blob no longer live whose blocks are still to be freed.
pub struct Freed(Option<(Arc<std::fs::File>, Place)>);

impl Freed {
    /// Punches out the blob's blocks. One that cannot be punched (a file system without
    /// holes) costs space until its segment goes, never bytes: the place is not live.
    pub async fn punch(self) {
        if let Some((file, place)) = self.0 {
            let _ = blocking(move || punch_hole(&file, place.offset, taken(place.len))).await;
        }
    }

    /// Hands the blob's blocks to the punching thread of `segments`, which frees them within
    /// about [`PUNCH_TICK`], together with the other holes of that tick: no wait, and no
    /// hand-off of its own, on the caller's path.
    pub fn punch_later(self, segments: &Segments) {
        if let Some(hole) = self.0 {
            let _ = segments.punches.send(hole);
        }
    }
}

fn checked(buf: Vec<u8>, hash: &blake3::Hash) -> Option<bytes::Bytes> {
    (blake3::hash(&buf) == *hash).then(|| buf.into())
}

fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::FallocateFlags;
    let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(file, mode, offset, len).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn blob(n: u8, len: usize) -> (blake3::Hash, bytes::Bytes) {
        let bytes: bytes::Bytes = (0..len).map(|i| (i as u8).wrapping_mul(n) ^ n).collect();
        (blake3::hash(&bytes), bytes)
    }

    /// Bytes allocated on disk under `dir`.
    fn allocated(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().blocks() * 512).sum()
    }

    /// A blob comes back only as it was written, on this thread or the blocking pool; the
    /// same bytes twice are one place; altered bytes are not returned.
    #[tokio::test]
    async fn a_blob_is_read_back_only_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open(dir.path()).unwrap();
        let (a, a_bytes) = blob(1, 10_000);
        let (b, b_bytes) = blob(2, 5_000);
        let pa = segments.append(&a, a_bytes.clone()).await.unwrap();
        let pb = segments.append(&b, b_bytes.clone()).await.unwrap();
        assert_eq!((pa.segment, pa.offset, pb.offset), (pb.segment, 0, 12_288), "aligned");
        assert_eq!(segments.append(&a, a_bytes.clone()).await.unwrap(), pa, "stored once");
        assert_eq!(segments.read(&a, pa).await.unwrap(), Some(a_bytes.clone()));
        assert_eq!(segments.read_now(&b, pb).unwrap().unwrap(), Some(b_bytes));
        assert_eq!(segments.read(&b, pa).await.unwrap(), None, "another blob's place");
        let file = dir.path().join(name(pa.segment));
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.write_all_at(b"rot", 100).unwrap();
        assert_eq!(segments.read(&a, pa).await.unwrap(), None, "altered");
    }

    /// Forgetting a blob frees its blocks without deleting its segment; a full segment goes
    /// with its last blob; a place freed is never handed out again.
    #[tokio::test]
    async fn forgotten_blobs_free_their_blocks_and_empty_segments_go() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two 64 KiB blobs per segment.
        let segments = Segments::open_sized(dir.path(), 128 << 10).unwrap();
        let blobs: Vec<_> = (1..=3).map(|n| blob(n, 64 << 10)).collect();
        let mut places = Vec::new();
        for (hash, bytes) in &blobs {
            places.push(segments.append(hash, bytes.clone()).await.unwrap());
        }
        assert_eq!(places.iter().map(|p| p.segment).collect::<Vec<_>>(), [0, 0, 1]);
        let before = allocated(dir.path());
        assert!(segments.forget(&blobs[0].0).await);
        assert!(!segments.forget(&blobs[0].0).await, "forgotten once");
        assert!(allocated(dir.path()) <= before - (64 << 10), "its blocks are freed");
        assert_eq!(segments.read(&blobs[0].0, places[0]).await.unwrap(), None, "a hole now");
        assert!(dir.path().join(name(0)).exists(), "its segment holds another");
        assert!(segments.forget(&blobs[1].0).await);
        assert!(!dir.path().join(name(0)).exists(), "a full segment goes with its last blob");
        let again = segments.append(&blobs[0].0, blobs[0].1.clone()).await.unwrap();
        assert!(!places.contains(&again), "a new place: {again:?}");
        assert_eq!(segments.read(&blobs[0].0, again).await.unwrap(), Some(blobs[0].1.clone()));
    }

    /// Bytes lent out stay while the lease is held, even with the blob freed meanwhile (its
    /// hole punched when the lease goes), and even with its segment deleted; a freed blob is
    /// not lent again.
    #[tokio::test]
    async fn lent_bytes_stay_until_the_lease_goes() {
        let dir = tempfile::tempdir().unwrap();
        let segments = Segments::open_sized(dir.path(), 128 << 10).unwrap();
        let blobs: Vec<_> = (1..=3).map(|n| blob(n, 64 << 10)).collect();
        for (hash, bytes) in &blobs {
            segments.append(hash, bytes.clone()).await.unwrap();
        }
        let read = |lent: &Lent| {
            let mut buf = vec![0u8; lent.place.len as usize];
            lent.file.read_exact_at(&mut buf, lent.place.offset).unwrap();
            buf
        };
        let lent = segments.lend(&blobs[0].0).unwrap();
        let again = segments.lend(&blobs[0].0).unwrap();
        let before = allocated(dir.path());
        assert!(segments.forget(&blobs[0].0).await);
        assert!(segments.lend(&blobs[0].0).is_none(), "no longer live");
        assert_eq!(read(&lent), blobs[0].1, "lent bytes outlive the blob");
        assert_eq!(allocated(dir.path()), before, "its blocks stay while lent");
        drop(lent);
        assert_eq!(read(&again), blobs[0].1, "until every holder is done");
        let place = again.place;
        drop(again);
        // By the punching thread, within a tick or so.
        let punched = (0..200).any(|_| {
            std::thread::sleep(PUNCH_TICK / 2);
            allocated(dir.path()) <= before - (64 << 10)
        });
        assert!(punched, "then punched");
        assert_eq!(segments.read(&blobs[0].0, place).await.unwrap(), None);
        // The last blob of a full segment: the segment is deleted, the lent bytes stay.
        let lent = segments.lend(&blobs[1].0).unwrap();
        assert!(segments.forget(&blobs[1].0).await);
        assert!(!dir.path().join(name(0)).exists(), "the segment is gone");
        assert_eq!(read(&lent), blobs[1].1);
        // A lease of a blob still live costs nothing when dropped.
        let lent = segments.lend(&blobs[2].0).unwrap();
        drop(lent);
        assert_eq!(
            segments.read(&blobs[2].0, segments.place(&blobs[2].0).unwrap()).await.unwrap(),
            Some(blobs[2].1.clone())
        );
    }

    /// After a restart only named blobs are live: a blob a crash left unnamed loses its blocks,
    /// a segment naming nothing is deleted, a place outside its segment is reported, and new
    /// blobs go into a new segment.
    #[tokio::test]
    async fn a_restart_keeps_the_named_blobs_and_frees_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, orphan, lonely) = (blob(1, 64 << 10), blob(2, 64 << 10), blob(3, 64 << 10));
        let (pk, po) = {
            let segments = Segments::open_sized(dir.path(), 128 << 10).unwrap();
            let pk = segments.append(&kept.0, kept.1.clone()).await.unwrap();
            let po = segments.append(&orphan.0, orphan.1.clone()).await.unwrap();
            segments.append(&lonely.0, lonely.1.clone()).await.unwrap();
            (pk, po)
        };
        let segments = Segments::open_sized(dir.path(), 128 << 10).unwrap();
        let before = allocated(dir.path());
        let beyond = Place { segment: 0, offset: 1 << 20, len: 10 };
        let (missing, _) = blob(4, 10);
        let bad = segments.restore([(kept.0, pk), (missing, beyond)]).await.unwrap();
        assert_eq!(bad, [missing]);
        assert_eq!(segments.place(&kept.0), Some(pk));
        assert_eq!(segments.read(&kept.0, pk).await.unwrap(), Some(kept.1.clone()));
        assert_eq!(segments.read(&orphan.0, po).await.unwrap(), None, "unnamed: punched");
        assert!(!dir.path().join(name(1)).exists(), "the segment naming nothing is gone");
        assert!(allocated(dir.path()) <= before - (128 << 10));
        let next = segments.append(&orphan.0, orphan.1.clone()).await.unwrap();
        assert_eq!(next.segment, 2, "never appended to a segment from before");
    }
}
