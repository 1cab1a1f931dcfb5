//! SHA-256 and MD5 of a file, the digests shared lists and SHA-256 bans name files by: computed
//! as a fill's bytes arrive while such a rule exists (or `moderation.keep_digests`), and
//! whenever preparing changes a file's bytes, then kept with its record.

use sha2::Digest;

/// Digests of the origin's bytes that lists and SHA-256 bans need; computed on a fill only
/// while such a rule exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// MD5 of the bytes.
    pub md5: [u8; 16],
}

impl Digests {
    /// The digests an index record kept of the origin's bytes, when it kept both.
    pub fn of_origin(origin: &crate::cache::index::OriginDigests) -> Option<Digests> {
        let sha256 = hex::decode(origin.sha256.as_deref()?).ok()?.try_into().ok()?;
        let md5 = hex::decode(origin.md5.as_deref()?).ok()?.try_into().ok()?;
        Some(Digests { sha256, md5 })
    }
}

/// Computes [`Digests`] as the bytes arrive.
#[derive(Clone, Default)]
pub struct Digester {
    sha256: sha2::Sha256,
    md5: md5::Md5,
}

impl Digester {
    /// Takes the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.md5.update(bytes);
    }

    /// The digests of everything taken.
    pub fn finish(self) -> Digests {
        Digests { sha256: self.sha256.finalize().into(), md5: self.md5.finalize().into() }
    }
}
