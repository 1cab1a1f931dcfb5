//! parasol's own scheme: `/m/<sig>/<src64>` and `/m/<sig>/<src64>/<variant>`, where `src64` is
//! base64url (no padding) of the source URL and `sig` is base64url (no padding)
//! HMAC-SHA256(key, `src64`). The variant is a server-side preset, so it needs no signature.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use url::Url;

use super::{ProxyRequest, parse_source};
use crate::error::ProxyError;
use crate::signing::Signer;

/// Route prefix, with its trailing slash.
pub const PREFIX: &str = "/m/";

/// Paths recently verified and parsed, so that the hits of a hot file (most requests) skip the
/// HMAC, the base64 and the URL parser: about a tenth of a small hit's CPU. Only paths that
/// passed are kept, per listener (its keys never change while it runs); a shard that fills up
/// is emptied, so memory stays bounded (`SHARDS` x `PER_SHARD` paths of at most
/// `MEMO_PATH_LEN` bytes) whatever is asked.
pub struct Memo {
    shards: Vec<std::sync::Mutex<std::collections::HashMap<Box<str>, ProxyRequest>>>,
    hasher: std::collections::hash_map::RandomState,
}

const SHARDS: usize = 8;
const PER_SHARD: usize = 2048;
/// Longer paths are parsed every time: the memo holds at most about 16,384 x 1.5 KiB.
const MEMO_PATH_LEN: usize = 512;

impl Default for Memo {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
        }
    }
}

impl Memo {
    /// [`parse`], remembered: the same path gives the same answer while `signer` is the one
    /// it was verified with.
    pub fn parse(&self, path: &str, signer: &Signer) -> Result<ProxyRequest, ProxyError> {
        use std::hash::BuildHasher;
        let shard = &self.shards[self.hasher.hash_one(path) as usize % SHARDS];
        let lock = || shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(request) = lock().get(path) {
            return Ok(request.clone());
        }
        let request = parse(path, signer)?;
        if path.len() > MEMO_PATH_LEN {
            return Ok(request);
        }
        let mut map = lock();
        if map.len() >= PER_SHARD {
            map.clear();
        }
        map.insert(path.into(), request.clone());
        Ok(request)
    }
}

/// Parses `path` (which starts with [`PREFIX`]). The signature is checked before the source is
/// decoded, so unsigned input is never parsed as a URL.
pub fn parse(path: &str, signer: &Signer) -> Result<ProxyRequest, ProxyError> {
    let rest = path.strip_prefix(PREFIX).ok_or(ProxyError::BadUrl("not a native URL"))?;
    let mut parts = rest.split('/');
    let (Some(sig), Some(src64)) = (parts.next(), parts.next()) else {
        return Err(ProxyError::BadUrl("expected /m/<signature>/<source>"));
    };
    if src64.is_empty() {
        return Err(ProxyError::BadUrl("expected /m/<signature>/<source>"));
    }
    // The signature first: a mangled one (a `/` from the standard base64 alphabet shifts the
    // segments) is a bad signature, whatever the rest of the path looks like.
    if !signer.verify(sig, src64.as_bytes()) {
        return Err(ProxyError::BadSignature);
    }
    let variant = match (parts.next(), parts.next()) {
        (None, _) => None,
        (Some(v), None) if is_variant_name(v) => Some(v.to_string()),
        _ => {
            return Err(ProxyError::BadUrl("expected /m/<signature>/<source>/<variant>"));
        }
    };
    let raw = URL_SAFE_NO_PAD
        .decode(src64)
        .map_err(|_| ProxyError::BadUrl("source is not base64url without padding"))?;
    let text = String::from_utf8(raw).map_err(|_| ProxyError::BadUrl("source is not UTF-8"))?;
    Ok(ProxyRequest::new(parse_source(&text)?, variant))
}

fn is_variant_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The native URL for `source` under `base` (`server.public_base_url`).
pub fn sign_url(base: &Url, signer: &Signer, source: &str, variant: Option<&str>) -> String {
    let src64 = URL_SAFE_NO_PAD.encode(source.as_bytes());
    let sig = signer.sign(src64.as_bytes());
    let base = base.as_str().trim_end_matches('/');
    match variant {
        Some(v) => format!("{base}{PREFIX}{sig}/{src64}/{v}"),
        None => format!("{base}{PREFIX}{sig}/{src64}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(["0123456789abcdef0123456789abcdef"])
    }

    fn path_of(url: &str) -> String {
        Url::parse(url).unwrap().path().to_string()
    }

    #[test]
    fn round_trip_with_and_without_variant() {
        let base = Url::parse("https://media.example.test/").unwrap();
        let url = sign_url(&base, &signer(), "https://remote.test/cat.jpg", None);
        let req = parse(&path_of(&url), &signer()).unwrap();
        assert_eq!(req.source.as_str(), "https://remote.test/cat.jpg");
        assert_eq!(req.variant, None);
        let url = sign_url(&base, &signer(), "https://remote.test/cat.jpg", Some("avatar"));
        assert_eq!(parse(&path_of(&url), &signer()).unwrap().variant.as_deref(), Some("avatar"));
    }

    /// The memo answers as `parse` does, never keeps what failed, and stays within its bound
    /// however many paths pass through it.
    #[test]
    fn the_memo_answers_as_parse_does_and_stays_bounded() {
        let (base, memo) = (Url::parse("http://p.test").unwrap(), Memo::default());
        let good =
            path_of(&sign_url(&base, &signer(), "https://remote.test/a.png", Some("avatar")));
        for _ in 0..2 {
            assert_eq!(memo.parse(&good, &signer()).unwrap(), parse(&good, &signer()).unwrap());
        }
        let forged = good.replacen("/m/", "/m/A", 1);
        for _ in 0..2 {
            assert!(matches!(memo.parse(&forged, &signer()), Err(ProxyError::BadSignature)));
        }
        let other = Signer::new(["another key, another listener, 32 b"]);
        assert!(matches!(Memo::default().parse(&good, &other), Err(ProxyError::BadSignature)));
        for n in 0..3 * SHARDS * PER_SHARD {
            let source = format!("https://remote.test/{n}.png");
            let path = path_of(&sign_url(&base, &signer(), &source, None));
            assert_eq!(memo.parse(&path, &signer()).unwrap().source.as_str(), source);
        }
        let long = format!("https://remote.test/{}.png", "a".repeat(MEMO_PATH_LEN));
        let path = path_of(&sign_url(&base, &signer(), &long, None));
        assert_eq!(memo.parse(&path, &signer()).unwrap().source.as_str(), long);
        let kept = |p: &str| memo.shards.iter().any(|s| s.lock().unwrap().contains_key(p));
        assert!(!kept(&path), "a long path is answered but not kept");
        let held: usize = memo.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS * PER_SHARD, "{held} paths held");
        assert!(!memo.shards.iter().any(|s| s.lock().unwrap().keys().any(|k| **k == *forged)));
    }

    #[test]
    fn signature_is_over_src64_and_checked_first() {
        let base = Url::parse("http://p.test").unwrap();
        let good = path_of(&sign_url(&base, &signer(), "https://remote.test/a.png", None));
        let other = path_of(&sign_url(&base, &signer(), "https://remote.test/b.png", None));
        let (g, o): (Vec<_>, Vec<_>) = (good.split('/').collect(), other.split('/').collect());
        let swapped = format!("/m/{}/{}", g[2], o[3]);
        assert!(matches!(parse(&swapped, &signer()), Err(ProxyError::BadSignature)));
        // Garbage source with a garbage signature: refused as a bad signature, not parsed.
        assert!(matches!(parse("/m/AAAA/!!!", &signer()), Err(ProxyError::BadSignature)));
        assert!(matches!(parse("/m/", &signer()), Err(ProxyError::BadUrl(_))));
        assert!(matches!(parse(&format!("{good}/a/b"), &signer()), Err(ProxyError::BadUrl(_))));
    }
}
