//! Misskey `mediaProxy` URLs: `/proxy/<name>.webp?url=<src>[&emoji=1|&avatar=1|&preview=1|
//! &static=1|&badge=1][&fallback=1]`. Unsigned by Misskey's design, so parasol exposes them only
//! when `compat.misskey = true`; they stay subject to `[policy]`, and fills through them are
//! rate-limited per source domain (`compat.misskey_fills_per_minute`, [`super::rate`]).

use super::{ProxyRequest, parse_source};
use crate::error::ProxyError;

/// Misskey's query flags, in the order they take precedence, and the preset each maps to.
const FLAGS: [&str; 5] = ["badge", "emoji", "avatar", "static", "preview"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MisskeyRequest {
    pub request: ProxyRequest,
    /// `fallback=1`: answer a placeholder image instead of an error.
    pub fallback: bool,
}

/// Whether `path` and `query` are a Misskey media proxy request (one path segment and a
/// `url` parameter), as opposed to an Akkoma one under the same `/proxy/` prefix.
pub fn matches(path: &str, query: Option<&str>) -> bool {
    let one_segment = path.strip_prefix("/proxy/").is_some_and(|rest| !rest.contains('/'));
    one_segment
        && query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "url"))
}

pub fn parse(query: Option<&str>) -> Result<MisskeyRequest, ProxyError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let has = |flag: &str| pairs.iter().any(|(k, v)| k == flag && v != "0");
    let url = pairs.iter().find(|(k, _)| k == "url").map(|(_, v)| v.as_str());
    let url = url.ok_or(ProxyError::BadUrl("expected ?url="))?;
    let variant = FLAGS.iter().find(|f| has(f)).map(|f| f.to_string());
    Ok(MisskeyRequest {
        request: ProxyRequest { source: parse_source(url)?, variant },
        fallback: has("fallback"),
    })
}

/// A 1×1 transparent PNG, answered for `fallback=1` when the real image cannot be served.
/// Encoded once by the `image` crate rather than written out as bytes by hand.
pub fn placeholder_png() -> bytes::Bytes {
    static PNG: std::sync::LazyLock<bytes::Bytes> = std::sync::LazyLock::new(|| {
        let pixel = image::DynamicImage::ImageRgba8(image::RgbaImage::new(1, 1));
        let mut out = std::io::Cursor::new(Vec::new());
        let _ = pixel.write_to(&mut out, image::ImageFormat::Png);
        bytes::Bytes::from(out.into_inner())
    });
    PNG.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_map_to_presets() {
        let q = "url=https%3A%2F%2Fmedia.test%2Fa.png&emoji=1&fallback=1";
        assert!(matches("/proxy/emoji.webp", Some(q)));
        assert!(!matches("/proxy/a/b/c", Some(q)));
        let m = parse(Some(q)).unwrap();
        assert_eq!(m.request.source.as_str(), "https://media.test/a.png");
        assert_eq!(m.request.variant.as_deref(), Some("emoji"));
        assert!(m.fallback);
        let plain = parse(Some("url=https://media.test/a.png&static=0")).unwrap();
        assert_eq!(plain.request.variant, None);
        assert!(parse(Some("emoji=1")).is_err());
    }

    #[test]
    fn placeholder_is_a_valid_png() {
        let img = image::load_from_memory(&placeholder_png()).unwrap();
        assert_eq!((img.width(), img.height()), (1, 1));
    }
}
