//! The disk tier's byte budget: which blobs are on disk, which index keys name each one, and
//! which to evict when `cache.disk_bytes` is exceeded, by [`S3Fifo`].
//!
//! Blobs are shared by content, so the policy works on blob hashes and a victim carries every
//! key that names it; evicting a blob drops all those index records and memory entries. The
//! budget is rebuilt from the index at start and corrected against what is actually on disk by
//! a background walk of the blob directory, so it cannot drift from the files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Key;
use super::evict::{S3Fifo, Touch};

/// A blob to delete, with every key that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    /// The blob's name.
    pub hash: [u8; 32],
    /// Its size in bytes.
    pub len: u64,
    /// The keys (URL and variant) that named it, whose records go with it.
    pub keys: Vec<Key>,
}

struct Inner {
    policy: S3Fifo<[u8; 32]>,
    keys: HashMap<[u8; 32], Vec<Key>>,
    /// Every key in `keys`, with the number of blobs naming it: a key absent here has no
    /// index record, so a miss is known without reading the index.
    named: HashMap<Key, u32>,
}

impl Inner {
    fn name(&mut self, key: Key) {
        *self.named.entry(key).or_default() += 1;
    }

    fn unname(&mut self, keys: &[Key]) {
        for key in keys {
            if let Some(n) = self.named.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    self.named.remove(key);
                }
            }
        }
    }
}

/// The disk's byte budget: which blobs are held, by which keys, and which go first (S3-FIFO).
pub struct DiskBudget {
    capacity: u64,
    inner: Mutex<Inner>,
}

impl DiskBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self::with_pinned_share(capacity, 0.5)
    }

    /// A budget of `capacity` bytes, of which pinned blobs may hold `share`.
    pub fn with_pinned_share(capacity: u64, share: f64) -> Self {
        let policy = S3Fifo::new(capacity).with_pinned_share(share);
        let inner = Inner { policy, keys: HashMap::new(), named: HashMap::new() };
        Self { capacity, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of distinct blobs held, and their number.
    pub fn usage(&self) -> (u64, usize) {
        let inner = self.lock();
        (inner.policy.used(), inner.policy.len())
    }

    /// Records that `key` names blob `hash` of `len` bytes. Returns the blob's access record and
    /// the blobs to evict to stay within the budget.
    pub fn admit(&self, hash: [u8; 32], len: u64, key: Key) -> (Arc<Touch>, Vec<Victim>) {
        self.admit_pinned(hash, len, key, 0)
    }

    /// [`Self::admit`], the blob not to be evicted before `pinned_until` (Unix seconds; 0:
    /// no pin) while pinned blobs hold at most their share.
    pub fn admit_pinned(
        &self,
        hash: [u8; 32],
        len: u64,
        key: Key,
        pinned_until: u64,
    ) -> (Arc<Touch>, Vec<Victim>) {
        let mut inner = self.lock();
        let keys = inner.keys.entry(hash).or_default();
        if !keys.contains(&key) {
            keys.push(key);
            inner.name(key);
        }
        let (touch, evicted) = inner.policy.insert_pinned(hash, len, pinned_until);
        let victims = collect(&mut inner, evicted);
        (touch, victims)
    }

    /// Whether blob `hash` is held (its file on disk).
    pub fn counts(&self, hash: &[u8; 32]) -> bool {
        self.lock().keys.contains_key(hash)
    }

    /// Whether blob `hash` is held and named by `key`.
    pub fn holds(&self, hash: &[u8; 32], key: &Key) -> bool {
        self.lock().keys.get(hash).is_some_and(|keys| keys.contains(key))
    }

    /// Whether some blob on disk is named by `key` (else the index has no record of it).
    pub fn names(&self, key: &Key) -> bool {
        self.lock().named.contains_key(key)
    }

    /// The access record of a blob on disk, if it is known.
    pub fn touch(&self, hash: &[u8; 32]) -> Option<Arc<Touch>> {
        self.lock().policy.touch(hash)
    }

    /// Forgets that `key` names `hash` (purged, or its record was dropped). When no key is left
    /// the blob leaves the budget; returns whether it did, so the caller deletes the file.
    pub fn forget(&self, hash: &[u8; 32], key: &Key) -> bool {
        let mut inner = self.lock();
        let Some(keys) = inner.keys.get_mut(hash) else { return false };
        let before = keys.len();
        keys.retain(|k| k != key);
        let (removed, empty) = (keys.len() < before, keys.is_empty());
        if removed {
            inner.unname(std::slice::from_ref(key));
        }
        if empty {
            inner.keys.remove(hash);
            inner.policy.remove(hash);
            return true;
        }
        false
    }

    /// Drops a blob outright (corrupt, or its file vanished), with every key naming it.
    pub fn drop_blob(&self, hash: &[u8; 32]) -> Vec<Key> {
        let mut inner = self.lock();
        inner.policy.remove(hash);
        let keys = inner.keys.remove(hash).unwrap_or_default();
        inner.unname(&keys);
        keys
    }

    /// Evicts until at most `target` bytes are held: after the disk ran out of space.
    pub fn evict_to(&self, target: u64) -> Vec<Victim> {
        let mut inner = self.lock();
        let evicted = inner.policy.evict_to(target, None);
        collect(&mut inner, evicted)
    }

    /// Blobs nobody asked for since `cutoff` (Unix seconds): `cache.retention`.
    pub fn idle_since(&self, cutoff: u64) -> Vec<Victim> {
        let mut inner = self.lock();
        let idle = inner.policy.idle_since(cutoff);
        let evicted: Vec<([u8; 32], u64)> =
            idle.into_iter().filter_map(|h| inner.policy.remove(&h).map(|len| (h, len))).collect();
        collect(&mut inner, evicted)
    }

    /// Runs `remove` (which deletes the blob and says whether there was one) unless the
    /// budget holds `hash`; returns whether a blob was deleted. Runs under the budget's lock,
    /// and fills admit a blob before writing it, so this can never delete a blob a concurrent
    /// fill has just stored.
    pub fn remove_if_unheld(&self, hash: &[u8; 32], remove: impl FnOnce() -> bool) -> bool {
        let inner = self.lock();
        !inner.keys.contains_key(hash) && remove()
    }
}

fn collect(inner: &mut Inner, evicted: Vec<([u8; 32], u64)>) -> Vec<Victim> {
    evicted
        .into_iter()
        .map(|(hash, len)| {
            let keys = inner.keys.remove(&hash).unwrap_or_default();
            inner.unname(&keys);
            Victim { hash, len, keys }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_blobs_leave_with_their_last_key() {
        let b = DiskBudget::new(1000);
        let (k1, k2) = (Key::new("http://a.test/1", None), Key::new("http://b.test/1", None));
        b.admit([1; 32], 400, k1);
        b.admit([1; 32], 400, k2);
        assert_eq!(b.usage(), (400, 1), "one blob for two keys");
        assert!(!b.forget(&[1; 32], &k1));
        assert!(b.forget(&[1; 32], &k2));
        assert_eq!(b.usage(), (0, 0));
    }

    /// A key is named while any blob it names is held, and no longer once the last is gone
    /// (forgotten, dropped or evicted).
    #[test]
    fn a_key_is_named_exactly_while_a_blob_it_names_is_held() {
        let b = DiskBudget::new(1000);
        let (k1, k2, k3) = (Key([1; 32]), Key([2; 32]), Key([3; 32]));
        b.admit([1; 32], 400, k1);
        b.admit([2; 32], 400, k1);
        b.admit([2; 32], 400, k2);
        assert!(b.names(&k1) && b.names(&k2) && !b.names(&k3));
        assert!(!b.forget(&[1; 32], &k2), "k2 never named blob 1");
        assert!(b.names(&k2));
        assert!(b.forget(&[1; 32], &k1));
        assert!(b.names(&k1), "k1 still names blob 2");
        assert_eq!(b.drop_blob(&[2; 32]), vec![k1, k2]);
        assert!(!b.names(&k1) && !b.names(&k2));
        b.admit([3; 32], 600, k3);
        let (_, victims) = b.admit([4; 32], 600, k1);
        assert_eq!(victims[0].keys, vec![k3]);
        assert!(!b.names(&k3) && b.names(&k1), "evicted with its blob");
    }

    #[test]
    fn victims_carry_all_their_keys() {
        let b = DiskBudget::new(1000);
        let (k1, k2) = (Key::new("http://a.test/1", None), Key::new("http://b.test/1", None));
        b.admit([1; 32], 600, k1);
        b.admit([1; 32], 600, k2);
        let (_, victims) = b.admit([2; 32], 600, Key::new("http://c.test/2", None));
        assert_eq!(victims, vec![Victim { hash: [1; 32], len: 600, keys: vec![k1, k2] }]);
        assert!(b.usage().0 <= 1000);
    }
}
