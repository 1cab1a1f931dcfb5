//! The index from [`Key`] to blob: a redb database at `<cache.dir>/index.redb`.
//!
//! redb is an embedded, pure-Rust, crash-safe B-tree with ACID transactions: an index record is
//! committed only after its blob has been renamed into place, so after a crash every record
//! names a blob that was complete. It takes a file lock, so two parasol processes cannot share
//! one cache directory by accident. Its calls block, so reads run on tokio's blocking pool.
//!
//! Writes go through one writer thread that commits whatever has queued up in a single
//! transaction (group commit), and each caller is answered once its record is committed.
//! Commits become durable (fsync) at most [`DURABLE_EVERY`] apart, and at shutdown: a crash
//! may forget the records of the last half second, which costs one refetch each, never a
//! wrong byte, since a record is only written once its blob is in place.

use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Key;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");

/// Moderation bans by id (`kind:value`), as JSON: kept with the index so they survive restarts.
const BANS: TableDefinition<&str, &[u8]> = TableDefinition::new("bans");

/// What the index remembers of one cached rendition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// blake3 hex of the blob.
    pub hash: String,
    pub len: u64,
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
}

/// Digests of the bytes an origin sent (lowercase hex).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OriginDigests {
    pub blake3: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
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
        }
    }

    pub fn with_origin(mut self, origin: Option<OriginDigests>) -> Self {
        self.origin = origin;
        self
    }

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

    pub fn blake3(&self) -> Option<blake3::Hash> {
        blake3::Hash::from_hex(&self.hash).ok()
    }
}

#[derive(Clone)]
pub struct Index {
    db: Arc<redb::Database>,
    writer: Arc<Writer>,
}

/// The writer thread's queue. When the last [`Index`] goes, the thread is stopped and joined
/// (it may hold the database for a commit at that moment), then everything committed is made
/// durable, so the database and its lock are released when the last handle is dropped.
struct Writer {
    queue: Option<std::sync::mpsc::Sender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
    db: Arc<redb::Database>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
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

/// One queued change and whoever waits for its commit.
struct Write {
    change: Change,
    done: tokio::sync::oneshot::Sender<Result<(), IndexError>>,
}

enum Change {
    Put(Key, Vec<u8>),
    Remove(Vec<Key>),
}

/// Most changes in one transaction; a larger queue is committed in several.
const MAX_BATCH: usize = 1024;

/// The writer thread: waits for a change, takes everything else queued, commits it all at once.
/// It holds the database only while committing, so dropping the last [`Index`] closes the
/// file (and its lock) at once; the thread ends when the channel closes.
fn write_loop(
    db: std::sync::Weak<redb::Database>,
    queue: std::sync::mpsc::Receiver<Write>,
    every: std::time::Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::Instant;
    let mut last_durable = Instant::now();
    let mut pending = false; // commits made since the last durable one
    loop {
        let first = if pending {
            let left = every.saturating_sub(last_durable.elapsed());
            match queue.recv_timeout(left) {
                Ok(write) => Some(write),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match queue.recv() {
                Ok(write) => Some(write),
                Err(_) => return,
            }
        };
        let mut batch: Vec<Write> = first.into_iter().collect();
        while (1..MAX_BATCH).contains(&batch.len()) {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let durable = last_durable.elapsed() >= every;
        let result = match db.upgrade() {
            Some(db) => commit(&db, &batch, durable),
            None => Err(IndexError("closed".into())),
        };
        if durable {
            // A failed durable commit is retried an interval later, not in a tight loop.
            if let Err(e) = &result {
                tracing::error!(error = %e, "cannot commit the cache index");
            }
            (last_durable, pending) = (Instant::now(), result.is_err());
        } else if !batch.is_empty() {
            pending = true;
        }
        for write in batch {
            let _ = write.done.send(result.clone());
        }
    }
}

/// Applies `batch` in one transaction; `durable` makes it, and every commit before it,
/// survive a power cut.
fn commit(db: &redb::Database, batch: &[Write], durable: bool) -> Result<(), IndexError> {
    let mut txn = db.begin_write().map_err(err)?;
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(err)?;
    }
    {
        let mut table = txn.open_table(ENTRIES).map_err(err)?;
        for write in batch {
            match &write.change {
                Change::Put(key, value) => {
                    table.insert(key.0.as_slice(), value.as_slice()).map_err(err)?;
                }
                Change::Remove(keys) => {
                    for key in keys {
                        table.remove(key.0.as_slice()).map_err(err)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(err)
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("cache index: {0}")]
pub struct IndexError(String);

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

impl Index {
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
        txn.commit().map_err(err)?;
        let db = Arc::new(db);
        let (queue, writes) = std::sync::mpsc::channel();
        let weak = Arc::downgrade(&db);
        let thread = std::thread::Builder::new()
            .name("parasol-index".into())
            .spawn(move || write_loop(weak, writes, every))
            .map_err(err)?;
        let writer = Writer { queue: Some(queue), thread: Some(thread), db: db.clone() };
        Ok(Self { writer: Arc::new(writer), db })
    }

    /// Queues `change` for the writer thread and waits until it is committed.
    async fn write(&self, change: Change) -> Result<(), IndexError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        let queue = self.writer.queue.as_ref().ok_or_else(|| IndexError("closed".into()))?;
        queue.send(Write { change, done }).map_err(|_| IndexError("closed".into()))?;
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

    pub async fn get(&self, key: Key) -> Result<Option<Record>, IndexError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(ENTRIES).map_err(err)?;
            let Some(value) = table.get(key.0.as_slice()).map_err(err)? else {
                return Ok(None);
            };
            // A record we cannot read is treated as absent: the object is refetched.
            Ok(serde_json::from_slice(value.value()).ok())
        })
        .await
    }

    pub async fn put(&self, key: Key, record: &Record) -> Result<(), IndexError> {
        let value = serde_json::to_vec(record).map_err(err)?;
        self.write(Change::Put(key, value)).await
    }

    pub async fn remove(&self, key: Key) -> Result<(), IndexError> {
        self.write(Change::Remove(vec![key])).await
    }
}

/// What [`Index::purge`] removed.
#[derive(Debug, Default)]
pub struct Purged {
    pub removed: Vec<(Key, Record)>,
}

impl Index {
    /// Removes, in one transaction, every record for which `doomed` is true.
    pub async fn purge(
        &self,
        doomed: impl Fn(&Record) -> bool + Send + 'static,
    ) -> Result<Purged, IndexError> {
        let db = self.db.clone();
        blocking(move || {
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
        .await
    }

    /// Every record, for rebuilding the disk budget at start (records only: no blob is read).
    pub async fn all(&self) -> Result<Vec<(Key, Record)>, IndexError> {
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
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(err)?;
                for (key, record) in &records {
                    let value = serde_json::to_vec(record).map_err(err)?;
                    table.insert(key.0.as_slice(), value.as_slice()).map_err(err)?;
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }

    /// Removes several records in one transaction (the keys of an evicted blob).
    pub async fn remove_many(&self, keys: Vec<Key>) -> Result<(), IndexError> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write(Change::Remove(keys)).await
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
    use std::time::Duration;

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
            index.put(Key([step; 32]), &record).await.unwrap();
            std::thread::sleep(Duration::from_micros(50 * u64::from(step % 30)));
            drop(index);
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.all().await.unwrap().len(), 60, "every record survived every close");
    }
}
