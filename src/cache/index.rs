//! The index from [`Key`] to blob: a redb database at `<cache.dir>/index.redb`.
//!
//! redb is an embedded, pure-Rust, crash-safe B-tree with ACID transactions: an index record is
//! committed only after its blob has been renamed into place, so after a crash every record
//! names a blob that was complete. It takes a file lock, so two parasol processes cannot share
//! one cache directory by accident. Its calls block, so they run on tokio's blocking pool.

use std::path::Path;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Key;

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");

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
}

impl Record {
    pub fn blake3(&self) -> Option<blake3::Hash> {
        blake3::Hash::from_hex(&self.hash).ok()
    }
}

#[derive(Clone)]
pub struct Index {
    db: Arc<redb::Database>,
}

#[derive(Debug, thiserror::Error)]
#[error("cache index: {0}")]
pub struct IndexError(String);

fn err(e: impl std::fmt::Display) -> IndexError {
    IndexError(e.to_string())
}

impl Index {
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = redb::Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(ENTRIES).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self { db: Arc::new(db) })
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
        let db = self.db.clone();
        let value = serde_json::to_vec(record).map_err(err)?;
        blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(ENTRIES)
                .map_err(err)?
                .insert(key.0.as_slice(), value.as_slice())
                .map_err(err)?;
            txn.commit().map_err(err)
        })
        .await
    }

    pub async fn remove(&self, key: Key) -> Result<(), IndexError> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(ENTRIES).map_err(err)?.remove(key.0.as_slice()).map_err(err)?;
            txn.commit().map_err(err)
        })
        .await
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
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(err)?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(err)?;
                for key in &keys {
                    table.remove(key.0.as_slice()).map_err(err)?;
                }
            }
            txn.commit().map_err(err)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IndexError> + Send + 'static,
) -> Result<T, IndexError> {
    tokio::task::spawn_blocking(f).await.map_err(err)?
}
