//! Akkoma/Pleroma `media_proxy` URLs: `/proxy/<sig64>/<url64>/<filename>` and
//! `/proxy/preview/<sig64>/<url64>/<filename>`; sig64 = base64url (no padding)
//! HMAC-SHA1(`compat.akkoma_secret`, url64). The MAC is over the base64 text, as Akkoma's
//! `Pleroma.Web.MediaProxy` computes it, so the signature is checked before anything is decoded.
//! Off until `compat.akkoma_secret` is set.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use super::{ProxyRequest, parse_source};
use crate::error::ProxyError;

/// The path prefix of Akkoma's media proxy URLs.
pub const PREFIX: &str = "/proxy/";

/// A parsed Akkoma URL: the request, or the canonical path to redirect to when the filename
/// segment is not the source URL's file name (Akkoma's own proxy redirects the same way).
pub enum Parsed {
    /// A verified request.
    Request(ProxyRequest),
    /// A URL whose filename segment is not the source's: the canonical URL to redirect to.
    Redirect(String),
}

fn mac(key: &[u8], message: &[u8]) -> Hmac<Sha1> {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac
}

/// Parses `path`; `preview` is the variant that `/proxy/preview/` maps to.
pub fn parse(path: &str, key: &[u8], preview: &str) -> Result<Parsed, ProxyError> {
    let rest = path.strip_prefix(PREFIX).ok_or(ProxyError::BadUrl("not an Akkoma URL"))?;
    let (is_preview, rest) = match rest.strip_prefix("preview/") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (sig, url64, filename) = match parts.as_slice() {
        [sig, url64] => (*sig, *url64, None),
        [sig, url64, filename] => (*sig, *url64, Some(*filename)),
        _ => return Err(ProxyError::BadUrl("expected /proxy/<sig>/<url>/<filename>")),
    };
    let tag = URL_SAFE_NO_PAD.decode(sig).map_err(|_| ProxyError::BadSignature)?;
    if tag.len() != 20 || mac(key, url64.as_bytes()).verify_slice(&tag).is_err() {
        return Err(ProxyError::BadSignature);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(url64.trim_end_matches('='))
        .map_err(|_| ProxyError::BadUrl("URL is not base64url"))?;
    let text = String::from_utf8(raw).map_err(|_| ProxyError::BadUrl("URL is not UTF-8"))?;
    let source = parse_source(&text)?;
    let expected = basename(&source);
    if filename.is_some_and(|f| f != expected) {
        let prefix = if is_preview { "/proxy/preview/" } else { PREFIX };
        return Ok(Parsed::Redirect(format!("{prefix}{sig}/{url64}/{expected}")));
    }
    let variant = is_preview.then(|| preview.to_string());
    Ok(Parsed::Request(ProxyRequest::new(source, variant)))
}

/// The last segment of the source URL's path, as it appears (percent-encoded) in the URL.
pub(crate) fn basename(source: &url::Url) -> String {
    source.path_segments().and_then(|mut s| s.next_back()).unwrap_or_default().to_string()
}

/// The Akkoma URL of `source` under `base`.
pub fn sign_url(base: &str, key: &[u8], source: &url::Url, preview: bool) -> String {
    let url64 = URL_SAFE_NO_PAD.encode(source.as_str());
    let sig = URL_SAFE_NO_PAD.encode(mac(key, url64.as_bytes()).finalize().into_bytes());
    let middle = if preview { "preview/" } else { "" };
    format!("{}{PREFIX}{middle}{sig}/{url64}/{}", base.trim_end_matches('/'), basename(source))
}
