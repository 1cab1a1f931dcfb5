//! The index from [`Key`] to blob: a redb database at `<cache.dir>/index.redb`.
//!
//! redb is an embedded, pure-Rust, crash-safe B-tree with ACID transactions: an index record is
//! committed only after its blob has been renamed into place, so after a crash every record
//! names a blob that was complete. It takes a file lock, so two parasol processes cannot share
//! one cache directory by accident. Its calls block, so reads run on tokio's blocking pool.
//!
//! Writes are queued for one writer thread, which commits what has queued up over
//! [`BATCH_WINDOW`] in a single transaction (group commit); nobody waits for it, since this
//! process's readers see a queued change at once. Commits become durable (fsync) at most
//! [`DURABLE_EVERY`] apart, and at shutdown: a crash may forget the records of about the last
//! 0.55 s, which costs one refetch each, never a wrong byte, since a record is only queued
//! once its blob is in place (and a removal forgotten names a blob start-up finds gone).

use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Key;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");

/// Moderation bans by id (`kind:value`), as JSON: kept with the index so they survive restarts.
const BANS: TableDefinition<&str, &[u8]> = TableDefinition::new("bans");

/// State other rooms keep across restarts by name (the origins' ledger), as they wrote it.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// What the index remembers of one cached rendition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// blake3 hex of the blob.
    pub hash: String,
    /// The blob's length in bytes.
    pub len: u64,
    /// The type sniffed from its bytes.
    pub content_type: String,
    /// The canonical source URL, so entries can be purged by URL or domain.
    pub url: String,
    /// Unix seconds when the blob was stored.
    pub stored_at: u64,
    /// The host the bytes came from, when redirects led away from the source's host: the
    /// domain policy and purges apply to it as to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_host: Option<String>,
    /// Digests of the origin's bytes, when they are not the stored bytes (metadata stripped,
    /// an SVG drawn) or were computed for a moderation rule: rules about the origin's bytes
    /// (SHA-256 and MD5 lists, a ban of the origin's blake3) find the entry by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<OriginDigests>,
    /// Not evicted before this (Unix seconds): the `keep_at_least` of its origin's rule when
    /// it was stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_until: Option<u64>,
    /// The rendition it is of its URL's file, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Where in the segment files the blob lies, when it is kept there rather than in a file
    /// of its own (`cache.segment_max_object_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<super::segments::Place>,
}

/// Digests of the bytes an origin sent (lowercase hex).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginDigests {
    /// blake3 of the origin's bytes.
    pub blake3: String,
    /// Their SHA-256, when it was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Their MD5, when it was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
}

impl Record {
    /// The record of a blob stored now for `url`.
    pub fn new(hash: &blake3::Hash, len: u64, content_type: &str, url: &str) -> Self {
        Record {
            hash: hash.to_hex().to_string(),
            len,
            content_type: content_type.to_string(),
            url: url.to_string(),
            stored_at: super::evict::now_secs(),
            final_host: None,
            origin: None,
            pinned_until: None,
            variant: None,
            at: None,
        }
    }

    /// Its pin for the disk budget (Unix seconds; 0: none).
    pub fn pin(&self) -> u64 {
        self.pinned_until.unwrap_or(0)
    }

    /// With what is known of the origin's bytes.
    pub fn with_origin(mut self, origin: Option<OriginDigests>) -> Self {
        self.origin = origin;
        self
    }

    /// With the host the bytes came from after redirects.
    pub fn with_final_host(mut self, host: Option<&str>) -> Self {
        self.final_host = host.map(str::to_string);
        self
    }

    /// The source URL's host (`None` when the URL does not parse) and the host the bytes
    /// came from, when that was another.
    pub fn hosts(&self) -> (Option<String>, Option<&str>) {
        let source = url::Url::parse(&self.url).ok().and_then(|u| u.host_str().map(String::from));
        (source, self.final_host.as_deref())
    }

    /// The blob's blake3, parsed (`None`: a damaged record).
    pub fn blake3(&self) -> Option<blake3::Hash> {
        blake3::Hash::from_hex(&self.hash).ok()
    }
}

/// The redb index: a record per key, and the bans; writes are queued and group-committed.
#[derive(Clone)]
pub struct Index {
    db: Arc<redb::Database>,
    writer: Arc<Writer>,
    recent: Arc<Recent>,
}

/// Records read or written lately, so that a disk hit finds its record on the serving thread,
/// without a trip to the blocking pool; redb is read only for the others.
struct Recent {
    records: moka::sync::Cache<Key, Arc<Record>>,
    /// Moved by every change of the table: a record read from redb is kept only if no change
    /// came between the start of the read and the moment it was kept.
    epoch: std::sync::atomic::AtomicU64,
    /// Records read from redb (on the blocking pool) so far.
    reads: std::sync::atomic::AtomicU64,
}

/// Bytes of records kept in [`Recent`] at most (some 50,000 records).
const RECENT_BYTES: u64 = 16 << 20;

impl Recent {
    fn new() -> Self {
        let records = moka::sync::Cache::builder()
            .max_capacity(RECENT_BYTES)
            .weigher(|_: &Key, r: &Arc<Record>| (r.url.len() + r.content_type.len() + 256) as u32)
            .build();
        Self { records, epoch: Default::default(), reads: Default::default() }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets `keys` after a change to them (the epoch first, so a read in flight keeps
    /// nothing it read before the change).
    /// Returns the epoch the change moved it to.
    fn changed(&self, keys: impl IntoIterator<Item = Key>) -> u64 {
        let epoch = self.epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        for key in keys {
            self.records.invalidate(&key);
        }
        epoch
    }

    /// Keeps `record`, read from redb since `epoch`, unless the table changed meanwhile.
    fn keep(&self, key: Key, record: &Record, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        self.records.insert(key, Arc::new(record.clone()));
        // A change between the check and the insert has run `changed` already: undo.
        if self.epoch() != epoch {
            self.records.invalidate(&key);
        }
    }
}

/// The writer thread and the changes it has yet to commit. When the last [`Index`] goes, the
/// thread commits what is queued and is joined (it may hold the database for a commit at that
/// moment), then everything committed is made durable, so the database and its lock are
/// released when the last handle is dropped.
struct Writer {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: Arc<redb::Database>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Ok(txn) = self.db.begin_write() {
            if let Err(e) = txn.commit() {
                tracing::error!(error = %e, "cannot make the cache index durable");
            }
        }
    }
}

/// Longest time a committed record waits to become durable.
pub const DURABLE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Longest time a change waits for others to share its commit. Nobody waits for it: readers
/// of this process see queued changes at once (see `Queue`).
pub const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// Changes per key, the latest only: `Some` a record to put, `None` a removal.
type Changes = std::collections::HashMap<Key, Option<Vec<u8>>>;

/// What the writer thread has yet to commit. A change is visible to [`Index::get`] from the
/// moment it is queued: first in `queued`, then in `committing` until its transaction is in.
struct Queue {
    state: std::sync::Mutex<QueueState>,
    /// The writer waits here for its first change, a flush, the durable deadline or closing.
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState {
    queued: Changes,
    /// When the oldest change in `queued` came.
    // The writer thread's condition-variable timing: real time, which a test's paused tokio
    // clock must not stop.
    #[allow(clippy::disallowed_types)]
    since: Option<std::time::Instant>,
    committing: Arc<Changes>,
    /// Callers waiting until everything queued before them is committed.
    flushes: Vec<tokio::sync::oneshot::Sender<Result<(), IndexError>>>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queued or committing change of `key`, if there is one.
    fn pending(&self, key: &Key) -> Option<Option<Vec<u8>>> {
        let state = self.lock();
        state.queued.get(key).or_else(|| state.committing.get(key)).cloned()
    }
}

/// The writer thread: commits what has queued up once the oldest change has waited
/// `BATCH_WINDOW` (at once for a flush or at closing), all in one transaction (group commit),
/// and makes commits durable at most `every` apart. It holds the database only while
/// committing; it ends once closed and everything queued is committed.
// A std thread's timing (see `since`): real time.
#[allow(clippy::disallowed_types)]
fn write_loop(db: std::sync::Weak<redb::Database>, queue: Arc<Queue>, every: std::time::Duration) {
    use std::time::Instant;
    let mut last_durable = Instant::now();
    let mut pending = false; // commits made since the last durable one
    loop {
        let mut state = queue.lock();
        loop {
            let now = Instant::now();
            let commit_at = state.since.map(|t| t + BATCH_WINDOW);
            let durable_at = pending.then(|| last_durable + every);
            let due = [commit_at, durable_at].into_iter().flatten().min();
            if state.closed || !state.flushes.is_empty() || due.is_some_and(|t| t <= now) {
                break;
            }
            state = match due {
                Some(t) => match queue.wake.wait_timeout(state, t - now) {
                    Ok((state, _)) => state,
                    Err(p) => p.into_inner().0,
                },
                None => queue.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
        let batch = Arc::new(std::mem::take(&mut state.queued));
        state.since = None;
        state.committing = batch.clone();
        let flushes = std::mem::take(&mut state.flushes);
        let closed = state.closed;
        drop(state);
        let durable = last_durable.elapsed() >= every;
        let result = match (batch.is_empty() && !durable, db.upgrade()) {
            (true, _) => Ok(()),
            (false, Some(db)) => commit(&db, &batch, durable),
            (false, None) => Err(IndexError("closed".into())),
        };
        if let Err(e) = &result {
            // Lost like a crash loses them: a record's blob is then refetched or swept.
            tracing::error!(error = %e, changes = batch.len(), "cannot commit the cache index");
        }
        if durable {
            // A failed durable commit is retried an interval later, not in a tight loop.
            (last_durable, pending) = (Instant::now(), result.is_err());
        } else if !batch.is_empty() {
            pending = true;
        }
        let mut state = queue.lock();
        state.committing = Arc::default();
        let done = closed && state.queued.is_empty();
        drop(state);
        for flush in flushes {
            let _ = flush.send(result.clone());
        }
        if done {
            return;
        }
    }
}

/// Applies `batch` in one transaction; `durable` makes it, and every commit before it,
/// survive a power cut.
fn commit(db: &redb::Database, batch: &Changes, durable: bool) -> Result<(), IndexError> {
    let mut txn = db.begin_write().map_err(err)?;
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(err)?;
    }
    {
        let mut table = txn.open_table(ENTRIES).map_err(err)?;
        for (key, change) in batch {
            match change {
                Some(value) => {
                    table.insert(key.0.as_slice(), value.as_slice()).map_err(err)?;
                }
                None => {
                    table.remove(key.0.as_slice()).map_err(err)?;
                }
            }
        }
    }
    txn.commit().map_err(err)
}

/// A failure of the index (redb's error, in words).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cache index: {0}")]
pub struct IndexError(String);

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

impl Index {
    /// Opens (or creates) the index at `path`, starting its writer.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        Self::open_syncing(path, DURABLE_EVERY)
    }

    /// Opens with commits made durable every `every`.
    fn open_syncing(path: &Path, every: std::time::Duration) -> Result<Self, IndexError> {
        let db = redb::Database::create(path).map_err(err)?;
        // Every URL parasol fetched is in it: parasol's user only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(ENTRIES).map_err(err)?;
        txn.open_table(BANS).map_err(err)?;
        txn.open_table(STATE).map_err(err)?;
        txn.commit().map_err(err)?;
        let db = Arc::new(db);
        let queue = Arc::new(Queue { state: Default::default(), wake: Default::default() });
        let (weak, writes) = (Arc::downgrade(&db), queue.clone());
        let thread = std::thread::Builder::new()
            .name("parasol-index".into())
            .spawn(move || write_loop(weak, writes, every))
            .map_err(err)?;
        let writer = Writer { queue, thread: Some(thread), db: db.clone() };
        Ok(Self { writer: Arc::new(writer), db, recent: Arc::new(Recent::new()) })
    }

    /// Queues changes for the writer thread; they are visible to [`Index::get`] at once and
    /// committed within [`BATCH_WINDOW`].
    /// Returns the epoch of [`Recent`] that these changes moved it to.
    fn queue(&self, changes: impl IntoIterator<Item = (Key, Option<Vec<u8>>)>) -> u64 {
        let changes: Vec<_> = changes.into_iter().collect();
        let epoch = self.recent.changed(changes.iter().map(|(key, _)| *key));
        let queue = &self.writer.queue;
        let mut state = queue.lock();
        let first = state.queued.is_empty();
        state.queued.extend(changes);
        if first && !state.queued.is_empty() {
            #[allow(clippy::disallowed_types)]
            let now = std::time::Instant::now();
            state.since = Some(now);
            drop(state);
            queue.wake.notify_one();
        }
        epoch
    }

    /// Waits until every change queued so far is committed (not necessarily durable): before
    /// reading the whole table, and in tests.
    pub async fn flush(&self) -> Result<(), IndexError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.writer.queue.lock().flushes.push(done);
        self.writer.queue.wake.notify_one();
        committed.await.map_err(|_| IndexError("writer stopped".into()))?
    }

    /// Stores (or replaces) a ban, durably before it returns: bans are rare and must not be
    /// lost to a crash.
    pub async fn put_ban(&self, id: String, value: Vec<u8>) -> Result<(), IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(BANS)
                .map_err(err)?
                .insert(id.as_str(), value.as_slice())
                .map_err(err)?;
            txn.commit().map_err(err)
        })
        .await
        .map_err(err)?
    }

    /// Keeps `value` under `name` in the state table, durably.
    pub async fn put_state(&self, name: &'static str, value: Vec<u8>) -> Result<(), IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(STATE).map_err(err)?.insert(name, value.as_slice()).map_err(err)?;
            txn.commit().map_err(err)
        })
        .await
        .map_err(err)?
    }

    /// What is kept under `name` in the state table.
    pub async fn state(&self, name: &'static str) -> Result<Option<Vec<u8>>, IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(STATE).map_err(err)?;
            Ok(table.get(name).map_err(err)?.map(|v| v.value().to_vec()))
        })
        .await
        .map_err(err)?
    }

    /// Removes a ban; whether there was one.
    pub async fn remove_ban(&self, id: String) -> Result<bool, IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            let removed =
                txn.open_table(BANS).map_err(err)?.remove(id.as_str()).map_err(err)?.is_some();
            txn.commit().map_err(err)?;
            Ok(removed)
        })
        .await
        .map_err(err)?
    }

    /// Every ban, as stored.
    pub async fn bans(&self) -> Result<Vec<Vec<u8>>, IndexError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(BANS).map_err(err)?;
            let mut out = Vec::new();
            for row in table.iter().map_err(err)? {
                let (_, v) = row.map_err(err)?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
        .await
        .map_err(err)?
    }

    /// The record of `key`, if any.
    pub async fn get(&self, key: Key) -> Result<Option<Record>, IndexError> {
        // Read before the queue: a change queued after this moment moves it.
        let epoch = self.recent.epoch();
        if let Some(known) = self.get_now(key) {
            return Ok(known);
        }
        let db = self.db.clone();
        self.recent.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let found: Option<Record> = blocking(move || {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(ENTRIES).map_err(err)?;
            let Some(value) = table.get(key.0.as_slice()).map_err(err)? else {
                return Ok(None);
            };
            // A record we cannot read is treated as absent: the object is refetched.
            Ok(serde_json::from_slice(value.value()).ok())
        })
        .await?;
        if let Some(record) = &found {
            self.recent.keep(key, record, epoch);
        }
        Ok(found)
    }

    /// The record of `key` when it is known without reading redb (queued, or read or written
    /// lately): `Some(None)` when a queued removal says it is gone, `None` when only redb
    /// can tell.
    pub fn get_now(&self, key: Key) -> Option<Option<Record>> {
        if let Some(change) = self.writer.queue.pending(&key) {
            return Some(change.and_then(|value| serde_json::from_slice(&value).ok()));
        }
        self.recent.records.get(&key).map(|record| Some(Record::clone(&record)))
    }

    /// Stores (or replaces) the record of `key`: seen by [`Index::get`] at once, committed
    /// within [`BATCH_WINDOW`] and durable within [`DURABLE_EVERY`] after that.
    pub fn put(&self, key: Key, record: &Record) -> Result<(), IndexError> {
        let value = serde_json::to_vec(record).map_err(err)?;
        let epoch = self.queue([(key, Some(value))]);
        // The newest record of `key`, kept for the hits that follow (unless another change
        // came right after this one).
        self.recent.keep(key, record, epoch);
        Ok(())
    }

    /// Removes the record of `key`, as [`Index::put`] stores one: seen at once, committed soon.
    pub fn remove(&self, key: Key) {
        self.queue([(key, None)]);
    }
}

/// What [`Index::purge`] removed.
#[derive(Debug, Default)]
pub struct Purged {
    /// The records removed, with their keys.
    pub removed: Vec<(Key, Record)>,
}

impl Index {
    /// Removes, in one transaction, every record for which `doomed` is true.
    pub async fn purge(
        &self,
        doomed: impl Fn(&Record) -> bool + Send + 'static,
    ) -> Result<Purged, IndexError> {
        self.flush().await?;
        let db = self.db.clone();
        let purged = blocking(move || {
            let mut purged = Purged::default();
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(err)?;
                table
                    .retain(|k, v| {
                        let Ok(record) = serde_json::from_slice::<Record>(v) else {
                            return false; // unreadable: drop it, the object will be refetched
                        };
                        if doomed(&record) {
                            let key = Key(k.try_into().unwrap_or([0; 32]));
                            purged.removed.push((key, record));
                            false
                        } else {
                            true
                        }
                    })
                    .map_err(err)?;
            }
            txn.commit().map_err(err)?;
            Ok(purged)
        })
        .await;
        if let Ok(purged) = &purged {
            self.recent.changed(purged.removed.iter().map(|(key, _)| *key));
        }
        purged
    }

    /// Every record, for rebuilding the disk budget at start (records only: no blob is read).
    pub async fn all(&self) -> Result<Vec<(Key, Record)>, IndexError> {
        self.flush().await?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(ENTRIES).map_err(err)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(err)? {
                let (k, v) = item.map_err(err)?;
                let (Ok(key), Ok(record)) =
                    (<[u8; 32]>::try_from(k.value()), serde_json::from_slice::<Record>(v.value()))
                else {
                    continue; // unreadable records are dropped by the next purge or refetch
                };
                out.push((Key(key), record));
            }
            Ok(out)
        })
        .await
    }

    /// Writes several records in one transaction (bulk import, and building large test stores).
    pub async fn put_many(&self, records: Vec<(Key, Record)>) -> Result<(), IndexError> {
        self.flush().await?;
        let db = self.db.clone();
        let written = blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(err)?;
                for (key, record) in &records {
                    let value = serde_json::to_vec(record).map_err(err)?;
                    table.insert(key.0.as_slice(), value.as_slice()).map_err(err)?;
                }
            }
            txn.commit().map_err(err)?;
            Ok(records)
        })
        .await?;
        self.recent.changed(written.into_iter().map(|(key, _)| key));
        Ok(())
    }

    /// Removes several records in one transaction (the keys of an evicted blob).
    pub fn remove_many(&self, keys: Vec<Key>) {
        self.queue(keys.into_iter().map(|key| (key, None)));
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, IndexError> {
    tokio::task::spawn_blocking(f).await.map_err(err)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use std::time::Duration;

    fn reads(index: &Index) -> u64 {
        index.recent.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A disk hit's record comes from redb once; the hits after it find it in memory.
    #[tokio::test]
    async fn a_record_is_read_from_redb_once_then_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let record = Record::new(&blake3::hash(b"x"), 1, "image/png", "http://a.test/x.png");
        let index = Index::open(&path).unwrap();
        index.put(Key([1; 32]), &record).unwrap();
        assert_eq!(index.get(Key([1; 32])).await.unwrap(), Some(record.clone()));
        assert_eq!(reads(&index), 0, "what was just written is known");
        drop(index);
        let index = Index::open(&path).unwrap();
        for _ in 0..3 {
            assert_eq!(index.get(Key([1; 32])).await.unwrap(), Some(record.clone()));
        }
        assert_eq!(index.get(Key([2; 32])).await.unwrap(), None);
        assert_eq!(reads(&index), 2, "one read of the record, one of the absent key");
    }

    /// Whatever changes a record (a purge, a bulk write, a removal) changes what memory
    /// answers: a record gone or replaced is never served from it.
    #[tokio::test]
    async fn a_purged_or_replaced_record_is_never_served_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let key = Key([3; 32]);
        let a = Record::new(&blake3::hash(b"a"), 1, "image/png", "http://a.test/a.png");
        let b = Record::new(&blake3::hash(b"b"), 1, "image/png", "http://b.test/b.png");
        index.put(key, &a).unwrap();
        index.flush().await.unwrap();
        assert_eq!(index.get(key).await.unwrap(), Some(a.clone()));
        let purged = index.purge(|r| r.url.contains("a.test")).await.unwrap();
        assert_eq!(purged.removed.len(), 1);
        assert_eq!(index.get(key).await.unwrap(), None, "purged");
        index.put_many(vec![(key, b.clone())]).await.unwrap();
        assert_eq!(index.get(key).await.unwrap(), Some(b.clone()), "written in bulk");
        assert_eq!(index.get(key).await.unwrap(), Some(b.clone()));
        index.remove(key);
        index.flush().await.unwrap();
        assert_eq!(index.get(key).await.unwrap(), None, "removed");
    }

    /// A change is seen by `get` the moment it is queued, before its commit; whole-table
    /// reads wait for it; closing commits whatever is still queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_changes_are_seen_at_once_and_survive_closing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let hash = blake3::hash(b"x");
        let record = Record::new(&hash, 1, "image/png", "http://a.test/x.png");
        let index = Index::open(&path).unwrap();
        // A write transaction of our own keeps the writer thread from committing anything.
        let blocker = index.db.begin_write().unwrap();
        for n in 0..100u8 {
            index.put(Key([n; 32]), &record).unwrap();
        }
        let committed = |index: &Index| {
            let txn = index.db.begin_read().unwrap();
            let table = txn.open_table(ENTRIES).unwrap();
            table.len().unwrap()
        };
        assert_eq!(index.get(Key([7; 32])).await.unwrap(), Some(record.clone()));
        index.remove_many(vec![Key([7; 32]), Key([8; 32])]);
        assert_eq!(index.get(Key([7; 32])).await.unwrap(), None, "a queued removal hides it");
        assert_eq!(index.get(Key([9; 32])).await.unwrap(), Some(record.clone()));
        assert_eq!(committed(&index), 0, "nothing committed yet");
        drop(blocker);
        assert_eq!(index.all().await.unwrap().len(), 98, "a full read waits for the commit");
        assert_eq!(committed(&index), 98);
        index.put(Key([200; 32]), &record).unwrap();
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(index.all().await.unwrap().len(), 99, "closing committed the last one");
        assert_eq!(index.get(Key([200; 32])).await.unwrap(), Some(record));
    }

    /// The last handle going releases the database at once, even while the writer thread is
    /// in the middle of a timed durable commit: the same file opens again straight away.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_last_handle_releases_the_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let hash = blake3::hash(b"x");
        let record = Record::new(&hash, 1, "image/png", "http://a.test/x.png");
        // Durable every millisecond: drops land before, during and after the writer's
        // durable commit that follows each put.
        for step in 0..60u8 {
            let index = Index::open_syncing(&path, Duration::from_millis(1)).expect("reopens");
            index.put(Key([step; 32]), &record).unwrap();
            std::thread::sleep(Duration::from_micros(50 * u64::from(step % 30)));
            drop(index);
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.all().await.unwrap().len(), 60, "every record survived every close");
    }
}
