//! GitHub camo / go-camo URLs: `/camo/<hexdigest>/<hexurl>` and `/camo/<hexdigest>?url=<url>`,
//! digest = hex HMAC-SHA1(`compat.camo_key`, source URL). Off until `compat.camo_key` is set.
//!
//! camo signs the decoded URL, so the URL text is decoded (hex or percent-encoding) before the
//! MAC is checked; it is parsed as a URL only after the check passes.

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use super::{ProxyRequest, parse_source};
use crate::error::ProxyError;

/// The path prefix of camo URLs.
pub const PREFIX: &str = "/camo/";

fn mac(key: &[u8], message: &[u8]) -> Hmac<Sha1> {
    let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac
}

/// Parses a camo path (and query) signed with `key`.
pub fn parse(path: &str, query: Option<&str>, key: &[u8]) -> Result<ProxyRequest, ProxyError> {
    let rest = path.strip_prefix(PREFIX).ok_or(ProxyError::BadUrl("not a camo URL"))?;
    let (digest, source) = match rest.split_once('/') {
        Some((digest, hexurl)) => {
            let raw = hex::decode(hexurl).map_err(|_| ProxyError::BadUrl("URL is not hex"))?;
            (digest, raw)
        }
        None => {
            let url = query
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "url"))
                .map(|(_, v)| v.into_owned())
                .ok_or(ProxyError::BadUrl("expected /camo/<digest>/<hexurl> or ?url="))?;
            (rest, url.into_bytes())
        }
    };
    let tag = hex::decode(digest).map_err(|_| ProxyError::BadSignature)?;
    if tag.len() != 20 || mac(key, &source).verify_slice(&tag).is_err() {
        return Err(ProxyError::BadSignature);
    }
    let text = String::from_utf8(source).map_err(|_| ProxyError::BadUrl("URL is not UTF-8"))?;
    Ok(ProxyRequest::new(parse_source(&text)?, None))
}

/// The camo URL of `source` under `base`.
pub fn sign_url(base: &str, key: &[u8], source: &str) -> String {
    let digest = hex::encode(mac(key, source.as_bytes()).finalize().into_bytes());
    format!("{}{PREFIX}{digest}/{}", base.trim_end_matches('/'), hex::encode(source))
}
