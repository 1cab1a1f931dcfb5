//! The one owner of what is stored: the memory tier, the disk blobs, the redb index, the disk
//! budget (S3-FIFO), and the rules that keep them consistent:
//! - a blob is on disk iff the budget counts it, and the budget counts it iff an index record
//!   names it (start-up reconciliation repairs what a crash left between the two);
//! - a record's blob is checked before it is served (small ones re-hashed on load, large ones
//!   sized here and re-hashed by the scrub); a blob that fails is dropped with every record
//!   and memory entry naming it, never served;
//! - identical bytes at two URLs are one blob, deleted only with the last record naming it;
//! - eviction removes a blob's records before its file, and never a file a reader holds.
//!
//! The proxy asks it for entries, hands it verified bodies to insert, and tells it what to
//! purge; a response asks it for an entry's blob file; nothing else reaches the tiers. The
//! bucket other nodes share ([`super::shared`]) is not one of its tiers: the proxy reads and
//! fills it as a source, moderation keeps bans in step through it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;

use super::budget::{DiskBudget, Victim};
use super::disk::BlobStore;
use super::index::{Index, Record};
use super::inflight::InflightBudget;
use super::memory::MemoryTier;
use super::received::{Held, Received, Sink};
use super::{Entry, Key};
use crate::error::ProxyError;

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    /// Index entries (URL × variant) removed.
    pub entries: u64,
    /// Blobs deleted from disk (shared blobs stay while another entry names them).
    pub blobs: u64,
    /// Bytes those blobs held.
    pub bytes: u64,
}

/// How the store is sized and how careful its writes are; from `[cache]` and `[media]`.
#[derive(Debug, Clone, Copy)]
pub struct StoreConfig {
    /// Budget of the memory tier (`cache.memory_bytes`).
    pub memory_bytes: u64,
    /// Largest body kept in memory (and re-hashed on every load from disk).
    pub memory_max_object_bytes: u64,
    /// Budget of the disk (`cache.disk_bytes`).
    pub disk_bytes: u64,
    /// fsync large blobs before their record is committed.
    pub fsync: bool,
    /// Bytes fills and media results may hold in memory at once.
    pub inflight_bytes: u64,
    /// Share of the disk budget pinned blobs may hold (`cache.pinned_share`).
    pub pinned_share: f64,
    /// Blobs up to this size held in memory when stored go into the segment files rather than
    /// a file each (`cache.segment_max_object_bytes`, at most `memory_max_object_bytes`, so
    /// every one is re-hashed on load); 0: none.
    pub segment_max_object_bytes: u64,
}

/// The store's counters (registered with the rest of the metrics in `telemetry`).
#[derive(Clone, Default)]
pub struct StoreMetrics {
    /// `parasol_evictions_total`.
    pub evictions: Counter,
    /// `parasol_blobs_dropped_total`.
    pub blobs_dropped: Counter,
}

/// The one owner of what is stored (see the module).
pub struct Store {
    memory: MemoryTier,
    disk: BlobStore,
    index: Index,
    budget: DiskBudget,
    /// Bodies held in memory by fills and media results.
    inflight: InflightBudget,
    config: StoreConfig,
    metrics: StoreMetrics,
    /// The upkeep task this store owns ([`super::upkeep`]), aborted when it is dropped.
    upkeep: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(task) = self.upkeep.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

impl Store {
    /// A store over `disk` and `index`, sized by `config`.
    pub fn new(config: StoreConfig, disk: BlobStore, index: Index, metrics: StoreMetrics) -> Self {
        Self {
            memory: MemoryTier::new(config.memory_bytes),
            budget: DiskBudget::with_pinned_share(config.disk_bytes, config.pinned_share),
            inflight: InflightBudget::new(config.inflight_bytes),
            disk,
            index,
            config,
            metrics,
            upkeep: Default::default(),
        }
    }

    /// Owns the upkeep task `task` (one: a second replaces and ends the first).
    pub(super) fn own_upkeep(&self, task: tokio::task::AbortHandle) {
        let old = self.upkeep.lock().unwrap_or_else(|p| p.into_inner()).replace(task);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Where a new body goes as it arrives.
    pub fn sink(&self) -> Sink {
        Sink::new(&self.disk, &self.inflight)
    }

    /// The file of a stored blob (the upkeep's scrub).
    pub(super) fn blob_path(&self, hash: &blake3::Hash) -> PathBuf {
        self.disk.path(hash)
    }

    /// A stored entry's bytes as a media job's (or the scanner's) input: from memory when it
    /// is held there, else its blob's file.
    pub fn input(&self, entry: &Entry) -> super::Input {
        match &entry.body {
            Some(bytes) => super::Input::Memory(bytes.clone()),
            None => self.file_input(entry),
        }
    }

    /// A stored entry's blob file as an input (an outside program reads a file).
    pub fn file_input(&self, entry: &Entry) -> super::Input {
        match entry.unkept_path() {
            Some(path) => super::Input::File { path: path.to_path_buf(), len: entry.len },
            None => self.blob_input(&entry.hash, entry.len),
        }
    }

    /// A stored entry's bytes as a file an outside program can read: its blob's file, or for
    /// a blob kept in a segment a temp file of its bytes, removed when the returned temp goes.
    pub async fn tool_file(
        &self,
        entry: &Entry,
    ) -> Result<(PathBuf, Option<super::disk::TempBlob>), ProxyError> {
        let in_segment =
            entry.unkept_path().is_none() && self.disk.segments().place(&entry.hash).is_some();
        match (&entry.body, self.file_input(entry)) {
            (Some(bytes), _) if in_segment => {
                use tokio::io::AsyncWriteExt;
                let mut temp = self.disk.create_temp().await.map_err(ProxyError::storage)?;
                temp.file.write_all(bytes).await.map_err(ProxyError::storage)?;
                let path = temp.flushed_path().await.map_err(ProxyError::storage)?.to_path_buf();
                Ok((path, Some(temp)))
            }
            (_, super::Input::File { path, .. }) => Ok((path, None)),
            (_, super::Input::Memory(_)) => Err(ProxyError::internal("no file of a stored blob")),
        }
    }

    /// The bytes `record` names as an input (a scan of what is stored): read from its segment,
    /// or its blob's file. `None`: its segment no longer holds them.
    pub async fn record_input(&self, record: &Record) -> Option<super::Input> {
        let hash = record.blake3()?;
        match record.at {
            Some(place) => {
                let bytes = self.disk.segments().read(&hash, place).await.ok()??;
                Some(super::Input::Memory(bytes))
            }
            None => Some(self.blob_input(&hash, record.len)),
        }
    }

    /// The blob `hash` of `len` bytes as an input (a scan of what is stored, an upload).
    pub fn blob_input(&self, hash: &blake3::Hash, len: u64) -> super::Input {
        super::Input::File { path: self.disk.path(hash), len }
    }

    /// The entry in memory, if it is there.
    pub async fn cached(&self, key: &Key) -> Option<Arc<Entry>> {
        self.memory.get(key).await
    }

    /// Keeps `entry` in memory (the tier decides by its size and weight).
    pub async fn remember(&self, key: Key, entry: Arc<Entry>) {
        self.memory.insert(key, entry).await;
    }

    /// Whether `key` is held in memory or indexed on disk.
    pub async fn contains(&self, key: Key) -> bool {
        self.memory.get(&key).await.is_some() || self.budget.names(&key)
    }

    /// Bytes and entries in memory; bytes and blobs on disk; bytes fills hold in memory.
    pub async fn usage(&self) -> Usage {
        let (memory_bytes, memory_entries) = self.memory.usage().await;
        let (disk_bytes, disk_blobs) = self.budget.usage();
        let inflight_bytes = self.config.inflight_bytes.saturating_sub(self.inflight.available());
        Usage { memory_bytes, memory_entries, disk_bytes, disk_blobs, inflight_bytes }
    }

    /// How many blobs are kept in segment files (the others have a file each).
    pub fn segment_blobs(&self) -> usize {
        self.disk.segments().live_blobs()
    }

    /// An entry's blob opened for reading, to be sent a chunk at a time
    /// ([`super::disk::read_chunk`]).
    pub async fn open_blob(&self, entry: &Entry) -> std::io::Result<Arc<std::fs::File>> {
        match entry.unkept_path() {
            Some(path) => std::fs::File::open(path).map(Arc::new),
            None => self.disk.open_blob(&entry.hash).await,
        }
    }

    /// Where an entry's bytes can be sent from with `sendfile`, only when that needs no wait
    /// for the disk: the blob's file when it is the one its body was verified against
    /// ([`Entry`] holds it), or the blob's place in its segment, leased so that its blocks
    /// stay while the returned place is held.
    pub fn file_now(&self, entry: &Entry) -> Option<crate::server::sendfile::FileAt> {
        use crate::server::sendfile::FileAt;
        if !entry.is_kept() {
            return None;
        }
        if let Some(file) = entry.file(&self.disk) {
            return Some(FileAt { file, offset: 0, keep: None });
        }
        let lent = self.disk.segments().lend(&entry.hash).filter(|l| l.place.len == entry.len)?;
        let (file, offset) = (lent.file.clone(), lent.place.offset);
        Some(FileAt { file, offset, keep: Some(Arc::new(lent)) })
    }

    /// An entry for a received body the store does not keep: its bytes in memory, or its temp
    /// file held by the entry until the last viewer is done with it. Nothing is indexed,
    /// counted or left on disk.
    pub async fn unkept(&self, r: Received) -> Result<Arc<Entry>, ProxyError> {
        let Received { body, hash, len, content_type, final_host, origin, .. } = r;
        let (bytes, temp) = match body {
            Held::Memory(bytes, _hold) => (Some(bytes), None),
            Held::Disk(mut temp) => {
                temp.flushed_path().await.map_err(ProxyError::storage)?;
                (None, Some(temp))
            }
        };
        let entry = Entry::new(hash, len, content_type, bytes)
            .with_final_host(final_host.as_deref())
            .with_origin(origin.as_ref())
            .unkept(temp);
        Ok(Arc::new(entry))
    }

    /// After serving `hash` of `len` bytes failed: a blob found gone meanwhile (deleted by
    /// hand, evicted) or of another size (cut short) is forgotten so the next request refills
    /// it. Any other failure (out of file descriptors, say) leaves the good bytes alone.
    pub async fn forget_if_broken(&self, hash: &blake3::Hash, len: u64) {
        // A blob in a segment was served from memory, its bytes checked when loaded.
        if self.disk.segments().place(hash).is_some() {
            return;
        }
        if self.disk.len(hash).await != Some(len) {
            self.drop_blob(hash, "blob vanished or resized while serving").await;
        }
    }

    /// Looks `key` up in the index and checks its blob. A record whose blob is missing or the
    /// wrong size is dropped, and a small blob whose bytes no longer hash to its name is
    /// deleted: both then count as a miss and are refetched, never served.
    pub async fn load(&self, key: Key) -> Result<Option<Arc<Entry>>, ProxyError> {
        if !self.budget.names(&key) {
            // No blob on disk is named by it, so neither is any index record: a miss, known
            // without a trip to the index.
            return Ok(None);
        }
        let Some(record) = self.index.get(key).await.map_err(ProxyError::internal)? else {
            return Ok(None);
        };
        let (Some(hash), 1..) = (record.blake3(), record.len) else {
            self.index.remove(key);
            return Ok(None);
        };
        let (body, identity) =
            if record.at.is_some() || record.len <= self.config.memory_max_object_bytes {
                // Small blobs: read whole from their segment or their file, length and hash checked.
                let read = match record.at {
                    Some(place) => {
                        let read = self.disk.segments().read(&hash, place).await;
                        read.map(|bytes| bytes.map(|bytes| (bytes, None)))
                    }
                    None => {
                        let read = self.disk.read_verified(&hash, record.len).await;
                        read.map(|found| found.map(|(bytes, identity)| (bytes, Some(identity))))
                    }
                };
                match read {
                    Ok(Some((bytes, identity))) => (Some(bytes), identity),
                    Ok(None) => {
                        self.drop_blob(&hash, "blob does not match its hash").await;
                        return Ok(None);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.drop_blob(&hash, "blob missing").await;
                        return Ok(None);
                    }
                    Err(e) => return Err(ProxyError::internal(e)),
                }
            } else {
                if self.disk.len(&hash).await != Some(record.len) {
                    self.drop_blob(&hash, "blob missing or of the wrong size").await;
                    return Ok(None);
                }
                (None, None)
            };
        let (touch, victims) = match self.budget.touch(hash.as_bytes()) {
            Some(touch) => (touch, Vec::new()),
            None => self.budget.admit_pinned(*hash.as_bytes(), charge(&record), key, record.pin()),
        };
        self.drop_victims(victims).await;
        Ok(Some(loaded(&record, hash, body, identity, touch)))
    }

    /// [`Self::load`] of a small blob when nothing in it waits: its record known in memory,
    /// its file's name and bytes in the kernel's caches. `None` when something would wait, or
    /// is wrong: the caller then loads it the usual way, which deals with what is wrong.
    pub fn load_now(&self, key: Key) -> Option<Arc<Entry>> {
        if !self.budget.names(&key) {
            return None;
        }
        let record = self.index.get_now(key)??;
        let hash = record.blake3()?;
        if record.len == 0 || record.len > self.config.memory_max_object_bytes {
            return None;
        }
        let (bytes, identity) = match record.at {
            Some(place) => (self.disk.segments().read_now(&hash, place)?.ok()??, None),
            None => {
                let (bytes, identity) = self.disk.read_verified_now(&hash, record.len)?.ok()??;
                (bytes, Some(identity))
            }
        };
        let touch = self.budget.touch(hash.as_bytes())?;
        Some(loaded(&record, hash, Some(bytes), identity, touch))
    }

    /// Stores a received body under `key`: admitted to the budget first (which may evict to
    /// make room for it), then the rename into place, then the index record.
    pub async fn insert(&self, key: Key, url: &str, r: Received) -> Result<Arc<Entry>, ProxyError> {
        self.insert_as(key, url, None, r).await
    }

    /// [`Self::insert`] of the rendition `variant` of `url`'s file (the record names it, so a
    /// lookup can say which rendition a blob is).
    pub async fn insert_as(
        &self,
        key: Key,
        url: &str,
        variant: Option<&str>,
        r: Received,
    ) -> Result<Arc<Entry>, ProxyError> {
        let Received { body, hash, len, content_type, final_host, origin, keep_until, .. } = r;
        // A blob the budget does not count has no file (reconciliation at start sees to it).
        let counted = self.budget.counts(hash.as_bytes());
        let pin = keep_until.unwrap_or(0);
        // Bodies held in memory up to the threshold go into a segment, charged whole blocks.
        let segmented = len > 0
            && len <= self.config.segment_max_object_bytes
            && matches!(body, Held::Memory(..));
        let charged = if segmented { super::segments::taken(len) } else { len };
        let (touch, victims) = self.budget.admit_pinned(*hash.as_bytes(), charged, key, pin);
        let record =
            Record::new(&hash, len, content_type, url).with_final_host(final_host.as_deref());
        let mut record = Record {
            pinned_until: keep_until,
            variant: variant.map(str::to_string),
            ..record.with_origin(origin.clone())
        };
        // Blobs up to memory_max_object_bytes are re-hashed on every load from disk, so a torn
        // one after a power cut is refetched, never served: only larger ones need the fsync.
        let checked = len <= self.config.memory_max_object_bytes;
        let durable = self.config.fsync && !checked;
        let segments = self.disk.segments();
        let (written, in_memory) = match body {
            // The in-flight hold ends here: from now on the bytes count against the memory
            // tier (or are dropped).
            Held::Memory(bytes, _hold) if segmented => {
                let placed = segments.append(&hash, bytes.clone()).await;
                record.at = placed.as_ref().ok().copied();
                (placed.map(|_| None), Some(bytes))
            }
            Held::Memory(bytes, _hold) => {
                let written =
                    self.disk.write(&hash, bytes.clone(), durable, counted, checked).await;
                (written.map(|(_, id)| Some(id)), Some(bytes))
            }
            Held::Disk(temp) => (self.disk.commit(temp, &hash, durable).await.map(|_| None), None),
        };
        let mut identity = None;
        let stored = match written {
            Ok(id) => {
                identity = id;
                self.index.put(key, &record).map_err(ProxyError::internal)
            }
            Err(e) => Err(ProxyError::storage(e)),
        };
        if let Err(e) = stored {
            if self.budget.forget(hash.as_bytes(), &key) {
                self.remove_if_unheld(&hash);
            }
            self.drop_victims(victims).await;
            return Err(e);
        }
        self.drop_victims(victims).await;
        // Another fill may have evicted this blob while it was being written: its record's
        // removal then came before this put, and its file may be gone or, renamed after the
        // eviction looked, left uncounted. It is admitted again (its file rewritten when gone,
        // its record put again) until the budget holds it; an eviction after that removes
        // record and file together as usual.
        let mut touch = touch;
        let mut tries = 0;
        while !self.budget.holds(hash.as_bytes(), &key) {
            tries += 1;
            let (again, late) = self.budget.admit_pinned(*hash.as_bytes(), charged, key, pin);
            touch = again;
            self.drop_victims(late).await;
            let present = match record.at {
                Some(_) => segments.place(&hash).is_some(),
                None => self.disk.len(&hash).await == Some(len),
            };
            // A few tries at most, whatever keeps evicting it.
            let rewritten = tries <= 4
                && match (&in_memory, present) {
                    (_, true) => true,
                    // Just seen absent: no look for a stored copy.
                    (Some(bytes), false) if segmented => {
                        match segments.append(&hash, bytes.clone()).await {
                            Ok(place) => {
                                record.at = Some(place);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    (Some(bytes), false) => {
                        match self.disk.write(&hash, bytes.clone(), durable, false, checked).await {
                            Ok((_, id)) => {
                                identity = Some(id);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    (None, false) => false,
                };
            if !rewritten {
                self.drop_blob(&hash, "evicted while it was stored").await;
                break;
            }
            if let Err(e) = self.index.put(key, &record) {
                tracing::warn!(error = %e, "cannot index a blob evicted while it was stored");
            }
        }
        // Bodies small enough for the memory tier go there: kept from the fill, or read back
        // from the page cache when they streamed to disk.
        let body = match in_memory {
            _ if len > self.config.memory_max_object_bytes => None,
            Some(bytes) => Some(bytes),
            None => match self.disk.read(&hash).await {
                Ok((bytes, id)) if bytes.len() as u64 == len => {
                    identity = Some(id);
                    Some(bytes)
                }
                _ => None,
            },
        };
        let entry = Entry::new(hash, len, content_type, body)
            .with_touch(touch)
            .with_identity(identity.filter(|id| id.len == len));
        Ok(Arc::new(entry.with_final_host(final_host.as_deref()).with_origin(origin.as_ref())))
    }

    /// The disk filled before the budget did (other files share it, or `disk_bytes` is set
    /// too high): evicts room for a few objects of `object_bytes`, so the next try fits.
    pub async fn make_room(&self, object_bytes: u64) {
        let (used, _) = self.budget.usage();
        let room = object_bytes.clamp(1 << 20, 64 << 20);
        let victims = self.budget.evict_to(used.saturating_sub(room));
        let freed: u64 = victims.iter().map(|v| v.len).sum();
        tracing::warn!(freed, "disk full: evicted to make room");
        self.drop_victims(victims).await;
    }

    /// Deletes a blob that cannot be served (corrupt, truncated, vanished) with every index
    /// record and memory entry naming it, so the next request refetches it.
    pub(super) async fn drop_blob(&self, hash: &blake3::Hash, why: &str) {
        tracing::warn!(blob = %hash.to_hex(), why, "dropping blob");
        self.metrics.blobs_dropped.inc();
        let keys = self.budget.drop_blob(hash.as_bytes());
        self.remove_keys(keys).await;
        if !self.disk.segments().forget(hash).await {
            self.disk.remove(hash).await;
        }
    }

    /// Evicts blobs chosen by the disk budget, with every key naming them.
    async fn drop_victims(&self, victims: Vec<Victim>) {
        for victim in victims {
            self.metrics.evictions.inc();
            self.remove_keys(victim.keys).await;
            self.remove_if_unheld(&blake3::Hash::from_bytes(victim.hash));
        }
    }

    /// Deletes the blob `hash` unless a key names it again (under the budget's lock, so never
    /// one a fill has just admitted): its place in a segment freed, or its file deleted.
    /// Whether it was deleted.
    fn remove_if_unheld(&self, hash: &blake3::Hash) -> bool {
        let segments = self.disk.segments();
        let mut freed = None;
        let removed = self.budget.remove_if_unheld(hash.as_bytes(), || {
            freed = segments.release(hash);
            freed.is_some() || std::fs::remove_file(self.disk.path(hash)).is_ok()
        });
        if let Some(freed) = freed {
            freed.punch_later(segments);
        }
        removed
    }

    async fn remove_keys(&self, keys: Vec<Key>) {
        for key in &keys {
            self.memory.remove(key).await;
        }
        self.index.remove_many(keys);
    }

    /// Drops every entry whose record matches `doomed` from the index, the memory tier and,
    /// when no other entry shares the bytes, the disk.
    pub async fn purge(
        &self,
        doomed: impl Fn(&Record) -> bool + Send + 'static,
    ) -> Result<PurgeReport, ProxyError> {
        let purged = self.index.purge(doomed).await.map_err(ProxyError::internal)?;
        let mut report = PurgeReport { entries: purged.removed.len() as u64, ..Default::default() };
        for (key, record) in &purged.removed {
            self.memory.remove(key).await;
            let Some(hash) = record.blake3() else { continue };
            // The blob goes only with the last key naming it: identical bytes are shared.
            let last = self.budget.forget(hash.as_bytes(), key);
            if self.remove_if_unheld(&hash) || last {
                report.blobs += 1;
                report.bytes += record.len;
            }
        }
        Ok(report)
    }

    /// Removes everything fetched from `domain` (normalised) or its subdomains: by the
    /// source's host, or the host a redirect took the fill to.
    pub async fn purge_domain(&self, domain: String) -> Result<PurgeReport, ProxyError> {
        self.purge(move |r| {
            let (source, landed) = r.hosts();
            source.is_some_and(|h| crate::policy::covers(&domain, &h))
                || landed.is_some_and(|h| crate::policy::covers(&domain, h))
        })
        .await
    }

    /// Drops what nobody asked for since `cutoff` (Unix seconds; `cache.retention`).
    pub(super) async fn drop_idle(&self, cutoff: u64) {
        let idle = self.budget.idle_since(cutoff);
        if !idle.is_empty() {
            tracing::info!(blobs = idle.len(), "retention: dropping blobs nobody asked for");
            self.drop_victims(idle).await;
        }
    }

    /// Rebuilds the disk budget from the index (records only, no blob is read), oldest first,
    /// evicting at once if `cache.disk_bytes` shrank since the last run.
    pub async fn load_budget(&self) -> Result<usize, ProxyError> {
        let mut records = self.index.all().await.map_err(ProxyError::internal)?;
        // The places records name become live in the segments, and the rest is freed, before
        // anything is evicted; a record naming a place beyond its segment goes.
        let named = records.iter().filter_map(|(_, r)| Some((r.blake3()?, r.at?)));
        let named: Vec<_> = named.collect();
        let bad = self.disk.segments().restore(named).await.map_err(ProxyError::internal)?;
        if !bad.is_empty() {
            tracing::warn!(records = bad.len(), "records naming a place beyond their segment");
            let bad: std::collections::HashSet<_> = bad.into_iter().collect();
            let doomed =
                |r: &Record| r.blake3().is_some_and(|h| bad.contains(&h)) && r.at.is_some();
            let keys: Vec<Key> =
                records.iter().filter(|(_, r)| doomed(r)).map(|(key, _)| *key).collect();
            records.retain(|(_, r)| !doomed(r));
            self.index.remove_many(keys);
        }
        records.sort_by_key(|(_, r)| r.stored_at);
        let count = records.len();
        let mut victims = Vec::new();
        for (key, record) in records {
            if let Some(hash) = record.blake3() {
                let pin = record.pin();
                let charged = charge(&record);
                victims.extend(self.budget.admit_pinned(*hash.as_bytes(), charged, key, pin).1);
            }
        }
        self.drop_victims(victims).await;
        Ok(count)
    }

    /// Deletes blob files the budget does not know (left by a crash between rename and index
    /// commit), and drops blobs whose file is missing or of another size than recorded. Files
    /// written since `started` are left alone: their fill may not have committed yet.
    pub(super) async fn reconcile(&self, started: SystemTime) {
        let files = match self.disk.list().await {
            Ok(files) => files,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the blob store");
                return;
            }
        };
        let mut orphans = 0;
        for file in files {
            if file.modified >= started {
                continue;
            }
            let path = self.disk.path(&file.hash);
            let remove = || std::fs::remove_file(&path).is_ok();
            if self.budget.remove_if_unheld(file.hash.as_bytes(), remove) {
                orphans += 1;
            }
        }
        if orphans > 0 {
            tracing::warn!(orphans, "removed blob files no index record named");
        }
    }

    /// Every index record (for scans: the scrub, the hash-list check).
    pub async fn records(&self) -> Result<Vec<(Key, Record)>, ProxyError> {
        self.index.all().await.map_err(ProxyError::internal)
    }

    /// Largest body kept in memory; larger ones are served from their file.
    pub(super) fn memory_max_object_bytes(&self) -> u64 {
        self.config.memory_max_object_bytes
    }

    /// Stores a ban (or replaces it), durably.
    pub async fn put_ban(&self, id: String, value: Vec<u8>) -> Result<(), ProxyError> {
        self.index.put_ban(id, value).await.map_err(ProxyError::internal)
    }

    /// Removes the ban `id`; whether there was one.
    pub async fn remove_ban(&self, id: String) -> Result<bool, ProxyError> {
        self.index.remove_ban(id).await.map_err(ProxyError::internal)
    }

    /// Keeps another room's state under `name` across restarts (the origins' ledger).
    pub async fn put_state(&self, name: &'static str, value: Vec<u8>) -> Result<(), ProxyError> {
        self.index.put_state(name, value).await.map_err(ProxyError::internal)
    }

    /// The state kept under `name`, if any.
    pub async fn state(&self, name: &'static str) -> Result<Option<Vec<u8>>, ProxyError> {
        self.index.state(name).await.map_err(ProxyError::internal)
    }

    /// Every ban kept, as moderation wrote them.
    pub async fn bans(&self) -> Result<Vec<Vec<u8>>, ProxyError> {
        self.index.bans().await.map_err(ProxyError::internal)
    }
}

/// What the disk budget charges `record`'s blob: whole blocks in a segment, its length as a
/// file of its own.
fn charge(record: &Record) -> u64 {
    match record.at {
        Some(_) => super::segments::taken(record.len),
        None => record.len,
    }
}

/// The entry of a blob loaded from disk, its access counted.
fn loaded(
    record: &Record,
    hash: blake3::Hash,
    body: Option<bytes::Bytes>,
    identity: Option<super::FileId>,
    touch: Arc<super::evict::Touch>,
) -> Arc<Entry> {
    touch.hit();
    let entry = Entry::new(hash, record.len, &record.content_type, body)
        .with_touch(touch)
        .with_final_host(record.final_host.as_deref())
        .with_origin(record.origin.as_ref())
        .with_identity(identity);
    Arc::new(entry)
}

/// What the store holds now (for `/metrics` and the start-up log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of bodies in the memory tier.
    pub memory_bytes: u64,
    /// Entries in the memory tier.
    pub memory_entries: u64,
    /// Bytes of blobs on disk.
    pub disk_bytes: u64,
    /// Blobs on disk.
    pub disk_blobs: usize,
    /// Bytes fills and media results hold in memory now.
    pub inflight_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(n: u32) -> Received {
        let bytes = bytes::Bytes::from(format!("{n:0>1000}").into_bytes());
        Received {
            hash: blake3::hash(&bytes),
            len: bytes.len() as u64,
            body: Held::Memory(bytes, None),
            content_type: "image/png",
            final_host: None,
            digests: None,
            origin: None,
            keep_until: None,
            oversize: false,
        }
    }

    /// A store in `dir` whose disk holds `disk_bytes`, and everything else 1 MiB.
    fn store(dir: &std::path::Path, disk_bytes: u64) -> Store {
        let disk = BlobStore::open(dir, false).unwrap();
        let index = Index::open(&dir.join("index.redb")).unwrap();
        let config = StoreConfig {
            memory_bytes: 1 << 20,
            memory_max_object_bytes: 1 << 20,
            disk_bytes,
            fsync: false,
            inflight_bytes: 1 << 20,
            pinned_share: 0.5,
            segment_max_object_bytes: 0,
        };
        Store::new(config, disk, index, StoreMetrics::default())
    }

    /// A small blob whose record and bytes are cached is loaded on the caller's thread, its
    /// bytes checked all the same: one altered on disk is not loaded there, and the usual
    /// load then drops it.
    #[tokio::test]
    async fn a_cached_small_blob_is_loaded_without_waiting_and_still_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let (key, other) = (Key::new("http://o.test/a", None), Key::new("http://o.test/b", None));
        let stored = store.insert(key, "http://o.test/a", received(1)).await.unwrap();
        let loaded = store.load_now(key).expect("record and bytes are cached");
        assert_eq!((loaded.hash, &loaded.body), (stored.hash, &stored.body));
        assert!(store.load_now(other).is_none(), "nothing stored under it");
        let path = store.blob_path(&stored.hash);
        std::fs::write(&path, vec![b'x'; stored.len as usize]).unwrap();
        assert!(store.load_now(key).is_none(), "altered bytes are not loaded");
        assert!(store.load(key).await.unwrap().is_none(), "and the usual load drops them");
        assert_eq!(store.metrics.blobs_dropped.get(), 1);
        assert!(!path.exists());
    }

    /// Fills evict each other's blobs while those are still being written (a budget of three
    /// blobs, a hundred fills at once): afterwards the budget still names the key of every
    /// record the index holds (so no stored entry is mistaken for a miss), each of those is
    /// served, and every blob file on disk is counted (none outlives the budget).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_indexed_key_stays_named_when_fills_evict_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store(dir.path(), 3000));
        let fills = (0..100u32).map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = Key::new(&format!("http://o.test/{n}"), None);
                store.insert(key, "http://o.test/", received(n)).await.map(|_| ())
            })
        });
        for fill in futures_util::future::join_all(fills).await {
            fill.unwrap().unwrap();
        }
        let records = store.records().await.unwrap();
        // (Under this churn all three may have been evicted again, or dropped after a few
        // tries: none left is consistent too.)
        assert!(records.len() <= 3, "{} records", records.len());
        let files = store.disk.list().await.unwrap().len();
        assert_eq!(files, store.usage().await.disk_blobs, "every blob file is counted");
        for (key, record) in records {
            assert!(store.budget.names(&key), "the record of {} is not named", record.hash);
            let entry = store.load(key).await.unwrap();
            assert_eq!(entry.map(|e| e.hash.to_hex().to_string()), Some(record.hash));
        }
    }
}
