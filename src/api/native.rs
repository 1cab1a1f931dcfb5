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
    Ok(ProxyRequest { source: parse_source(&text)?, variant })
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
