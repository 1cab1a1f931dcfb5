//! Hash lists (`moderation.hash_lists`): files of SHA-256 or MD5 hex digests of known files, one
//! per line, in the forms shared lists come in: a digest alone, or first on its line before a
//! space, tab or comma (a file name, a label); `#` starts a comment; blank lines are skipped.
//!
//! Held as two sorted arrays and searched by bisection: a million SHA-256 digests cost 32 MB
//! and no per-entry allocation, and a lookup is some twenty comparisons.

use std::io::BufRead;
use std::path::PathBuf;

use super::Digests;

/// The digests of the configured hash lists, sorted for binary search.
#[derive(Debug, Default)]
pub struct HashLists {
    sha256: Vec<[u8; 32]>,
    md5: Vec<[u8; 16]>,
    /// Lines that held neither digest (counted, logged once per load).
    pub skipped: usize,
}

impl HashLists {
    /// Reads every file in `paths`. A file that cannot be read is an error naming it; a line
    /// that is not a digest is skipped and counted.
    pub fn load(paths: &[PathBuf]) -> Result<HashLists, String> {
        let mut lists = HashLists::default();
        for path in paths {
            let bad = |e: std::io::Error| format!("moderation.hash_lists {}: {e}", path.display());
            let file = std::fs::File::open(path).map_err(bad)?;
            for line in std::io::BufReader::with_capacity(1 << 16, file).lines() {
                let line = line.map_err(bad)?;
                let token = line.split('#').next().unwrap_or("").trim();
                let token = token.split([' ', '\t', ',']).next().unwrap_or("");
                if token.is_empty() {
                    continue;
                }
                match hex::decode(token).ok().map(|b| (b.len(), b)) {
                    Some((32, b)) => lists.sha256.push(b.try_into().expect("32 bytes")),
                    Some((16, b)) => lists.md5.push(b.try_into().expect("16 bytes")),
                    _ => lists.skipped += 1,
                }
            }
        }
        lists.sha256.sort_unstable();
        lists.sha256.dedup();
        lists.md5.sort_unstable();
        lists.md5.dedup();
        Ok(lists)
    }

    /// Whether no digest is held.
    pub fn is_empty(&self) -> bool {
        self.sha256.is_empty() && self.md5.is_empty()
    }

    /// Digests held (SHA-256, MD5).
    pub fn len(&self) -> (usize, usize) {
        (self.sha256.len(), self.md5.len())
    }

    /// Whether a list names these digests (by SHA-256 or MD5).
    pub fn contains(&self, digests: &Digests) -> bool {
        self.sha256.binary_search(&digests.sha256).is_ok()
            || self.md5.binary_search(&digests.md5).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moderation::Digester;

    fn digests(bytes: &[u8]) -> Digests {
        let mut d = Digester::default();
        d.update(bytes);
        d.finish()
    }

    #[test]
    fn reads_the_forms_lists_come_in_and_finds_by_either_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (known, other) = (digests(b"a known file"), digests(b"another known file"));
        let text = format!(
            "# shared list, v3\n\n{}\n{}  known.jpg\n{},label\nnot-a-digest\n",
            hex::encode(known.sha256),
            hex::encode(other.md5).to_uppercase(),
            hex::encode([7u8; 32]),
        );
        std::fs::write(dir.path().join("list.txt"), text).unwrap();
        let lists = HashLists::load(&[dir.path().join("list.txt")]).unwrap();
        assert_eq!(lists.len(), (2, 1));
        assert_eq!(lists.skipped, 1);
        assert!(lists.contains(&known), "by SHA-256");
        assert!(lists.contains(&other), "by MD5");
        assert!(!lists.contains(&digests(b"a file nobody listed")));
        assert!(HashLists::load(&[dir.path().join("missing.txt")]).is_err());
    }

    /// A million SHA-256 digests load in bounded time and memory: 32 MB of digests, one
    /// sort. (Figures for the note: `cargo test --release -- --ignored million --nocapture`.)
    #[test]
    fn a_million_entries_load_in_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.txt");
        let mut text = String::with_capacity(65 * 1_000_000);
        let mut x = 0x9e3779b97f4a7c15u64;
        for _ in 0..1_000_000 {
            let mut d = [0u8; 32];
            for chunk in d.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            text.push_str(&hex::encode(d));
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        let started = tokio::time::Instant::now();
        let lists = HashLists::load(&[path]).unwrap();
        let took = started.elapsed();
        eprintln!("1,000,000 SHA-256 digests loaded in {took:?}");
        assert_eq!(lists.len().0, 1_000_000);
        assert!(took < std::time::Duration::from_secs(60), "{took:?}");
    }
}
