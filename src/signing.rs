//! HMAC signatures of native `/m/` URLs, with key rotation and a generated default key.
//!
//! The signed message is the `src64` path segment exactly as it appears in the URL (not the
//! decoded source URL), so verification needs no decoding of attacker-chosen input first and a
//! second spelling of the same URL cannot share a signature.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length in bytes of an HMAC-SHA256 tag; anything else is refused before any MAC is computed.
const TAG_LEN: usize = 32;

/// Signs with the first key, verifies with any of them.
#[derive(Clone)]
pub struct Signer {
    /// Secrets in rotation order: index 0 signs new URLs, the rest keep old URLs working.
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({} keys, redacted)", self.keys.len())
    }
}

impl Signer {
    /// `keys` must be non-empty; the configuration validated their length.
    pub fn new(keys: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Self {
        Self { keys: keys.into_iter().map(|k| k.as_ref().to_vec()).collect() }
    }

    /// Base64url (no padding) HMAC-SHA256 of `message` under the signing key.
    pub fn sign(&self, message: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.keys[0], message).finalize().into_bytes())
    }

    /// Whether `sig` is a canonical base64url tag of `message` under any key. Each comparison is
    /// constant-time; all keys are tried, so timing does not reveal which key matched.
    pub fn verify(&self, sig: &str, message: &[u8]) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        if tag.len() != TAG_LEN {
            return false;
        }
        self.keys.iter().fold(false, |ok, key| mac(key, message).verify_slice(&tag).is_ok() | ok)
    }
}

/// Whether `headers` carry `Authorization: Bearer <token>` (an empty token matches nothing).
/// Compared as blake3 digests, whose equality is constant-time, so response timing does not
/// reveal how much of a guess was right.
pub fn bearer_matches(headers: &http::HeaderMap, token: &str) -> bool {
    let offered = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    !token.is_empty() && blake3::hash(offered.as_bytes()) == blake3::hash(token.as_bytes())
}

/// Whether `offered` is `secret` (never empty), compared in constant time (as blake3 hashes,
/// whose equality is constant time, so neither length nor content leaks by timing).
pub fn secret_matches(offered: &[u8], secret: &str) -> bool {
    !secret.is_empty() && blake3::hash(offered) == blake3::hash(secret.as_bytes())
}

fn mac(key: &[u8], message: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac
}

/// Where the generated key lives when `signing.keys` is empty.
pub fn generated_key_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("signing.key")
}

/// Reads the generated key, or creates it (32 random bytes as 64 hex characters, mode 0600).
/// Returns the key and whether it was created just now.
pub fn load_or_generate_key(cache_dir: &Path) -> std::io::Result<(String, bool)> {
    let path = generated_key_path(cache_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok((text.trim().to_string(), false)),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} holds a key shorter than 32 bytes; delete it to generate a new one",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    crate::cache::private_dir(cache_dir)?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
    let key = hex::encode(raw);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            file.write_all(key.as_bytes())?;
            file.sync_all()?;
            Ok((key, true))
        }
        // Another process created it between our read and our create: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((std::fs::read_to_string(&path)?.trim().to_string(), false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_old_key_verifies_new_key_signs() {
        let old = Signer::new(["old-key-old-key-old-key-old-key-0"]);
        let rotated =
            Signer::new(["new-key-new-key-new-key-new-key-1", "old-key-old-key-old-key-old-key-0"]);
        let sig = old.sign(b"aHR0cHM6Ly94LnRlc3Qv");
        assert!(rotated.verify(&sig, b"aHR0cHM6Ly94LnRlc3Qv"));
        assert_ne!(rotated.sign(b"aHR0cHM6Ly94LnRlc3Qv"), sig);
        assert!(!rotated.verify(&sig, b"aHR0cHM6Ly95LnRlc3Qv"));
    }

    #[test]
    fn non_canonical_or_short_tags_are_refused() {
        let s = Signer::new(["k".repeat(32)]);
        // A message whose tag holds '-' or '_', where the standard alphabet differs.
        let (m, sig) = (0u32..)
            .map(|n| n.to_string())
            .map(|m| (m.clone(), s.sign(m.as_bytes())))
            .find(|(_, sig)| sig.contains(['-', '_']))
            .unwrap();
        let m = m.as_bytes();
        assert!(s.verify(&sig, m));
        assert!(!s.verify(&format!("{sig}="), m), "padding is not canonical");
        assert!(!s.verify(&sig[..20], m), "truncated tag");
        let std_alphabet = sig.replace('-', "+").replace('_', "/");
        assert_ne!(std_alphabet, sig);
        assert!(!s.verify(&std_alphabet, m), "standard alphabet is refused");
    }
}
