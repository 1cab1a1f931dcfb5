//! Whole-store integrity: `parasol verify` (offline) and the background scrub of large blobs.
//!
//! Small blobs are re-hashed on every load from disk; large ones are streamed to viewers
//! straight from the file, so they are checked here instead: every byte is hashed and compared
//! with the blob's name. Whatever does not match is deleted with every index record naming
//! it, and is refetched on the next request.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::Key;
use super::disk::BlobStore;
use super::index::Index;

/// blake3 and length of a file, read in large blocks (blocking: run it off the runtime).
pub fn hash_file(path: &Path) -> std::io::Result<(blake3::Hash, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finalize(), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// What a verification found and fixed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    /// Index records read.
    pub records: u64,
    /// Blobs whose bytes were hashed.
    pub blobs_checked: u64,
    /// Bytes hashed.
    pub bytes_hashed: u64,
    /// Records removed because their blob was missing, short, long or corrupt.
    pub records_removed: u64,
    /// Blob files deleted because their bytes did not match their name.
    pub corrupt_blobs_removed: u64,
    /// Blob files no record named.
    pub orphans_removed: u64,
}

impl Report {
    /// Whether the check removed or repaired anything.
    pub fn fixed_anything(&self) -> bool {
        self.records_removed + self.corrupt_blobs_removed + self.orphans_removed > 0
    }
}

/// Checks every record and blob of the store in `dir` and repairs what is wrong. Takes the
/// index's lock, so it refuses to run beside a live parasol on the same directory.
pub async fn verify(dir: &Path) -> Result<Report, String> {
    let index = Index::open(&dir.join("index.redb"))
        .map_err(|e| format!("{e} (is parasol running on this cache directory?)"))?;
    let store = BlobStore::open(dir, false).map_err(|e| e.to_string())?;
    let records = index.all().await.map_err(|e| e.to_string())?;
    let mut report = Report { records: records.len() as u64, ..Report::default() };
    let mut by_blob: HashMap<String, (u64, Vec<Key>)> = HashMap::new();
    // Blobs kept in segments, and where (one place per blob: a record naming another lies).
    let mut placed: HashMap<String, super::segments::Place> = HashMap::new();
    let mut doomed: Vec<Key> = Vec::new();
    for (key, record) in records {
        match record.blake3() {
            Some(_) if record.len > 0 => {
                let slot = by_blob.entry(record.hash.clone()).or_insert((record.len, Vec::new()));
                let place = record.at.map(|at| *placed.entry(record.hash.clone()).or_insert(at));
                if slot.0 == record.len && place == record.at {
                    slot.1.push(key);
                } else {
                    doomed.push(key); // two sizes for one content name: this record lies
                }
            }
            _ => doomed.push(key),
        }
    }
    for (hex, (len, keys)) in &by_blob {
        let Ok(hash) = blake3::Hash::from_hex(hex) else { continue };
        let path = store.path(&hash);
        let checked = match placed.get(hex) {
            Some(place) => match store.segments().read(&hash, *place).await {
                Ok(Some(bytes)) => Ok((hash, bytes.len() as u64)),
                Ok(None) => Ok((blake3::hash(b""), 0)),
                Err(e) => Err(e),
            },
            None => tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|e| e.to_string())?,
        };
        // A segment that holds the place but other bytes: corrupt, as a file would be.
        let in_segment = placed.contains_key(hex);
        let segment_held = in_segment && checked.is_ok();
        let good = match checked {
            Ok((actual, actual_len)) => {
                report.blobs_checked += 1;
                report.bytes_hashed += actual_len;
                actual == hash && actual_len == *len
            }
            Err(_) => false, // missing or unreadable
        };
        if !good {
            if segment_held || (!in_segment && store.len(&hash).await.is_some()) {
                report.corrupt_blobs_removed += 1;
            }
            if in_segment {
                placed.remove(hex);
            } else {
                store.remove(&hash).await;
            }
            doomed.extend(keys.iter().copied());
        }
    }
    report.records_removed = doomed.len() as u64;
    index.remove_many(doomed);
    // What the good records name stays in the segments; the rest is freed.
    let named =
        placed.iter().filter_map(|(hex, place)| Some((blake3::Hash::from_hex(hex).ok()?, *place)));
    store.segments().restore(named.collect::<Vec<_>>()).await.map_err(|e| e.to_string())?;
    let named: HashSet<&String> = by_blob.keys().collect();
    for file in store.list().await.map_err(|e| e.to_string())? {
        if !named.contains(&file.hash.to_hex().to_string()) {
            store.remove(&file.hash).await;
            report.orphans_removed += 1;
        }
    }
    Ok(report)
}
