//! Misskey `mediaProxy` URLs, as misskey-dev/media-proxy answers them (`src/index.ts`):
//! `<base>/<name>.webp?url=<src>[&emoji|&avatar|&static|&preview|&badge][&fallback]`, where
//! `<base>` is `/proxy` (Misskey's own route) or the root (a standalone media proxy), the
//! `videoThumbnailGenerator` form `/thumbnail.webp?thumbnail=1&url=<src>`, and the path form
//! of misskey.io's fork, `/proxy/image/<host/path, percent-encoded>?avatar=1`.
//!
//! Unsigned by Misskey's design, so parasol exposes them only when `compat.misskey = true`;
//! they stay subject to `[policy]`, and fills through them are rate-limited per source domain
//! (`compat.misskey_fills_per_minute`, [`super::rate`]).

use super::{ProxyRequest, parse_source};
use crate::error::ProxyError;

/// The path form's prefix.
const PATH_FORM: &str = "/proxy/image/";

/// A Misskey media-proxy request: what to serve, and how to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MisskeyRequest {
    /// The source and the preset its flags name.
    pub request: ProxyRequest,
    /// `fallback`: answer a placeholder image instead of an error.
    pub fallback: bool,
    /// The name for `Content-Disposition`: the source URL's last path segment.
    pub filename: String,
}

/// Whether `path` and `query` are a Misskey media proxy request: one path segment under
/// `/proxy/` or at the root with a `url` parameter (an Akkoma URL under the same prefix has
/// three), or the path form.
pub fn matches(path: &str, query: Option<&str>) -> bool {
    if path.len() > PATH_FORM.len() && path.starts_with(PATH_FORM) {
        return true;
    }
    let rest = path.strip_prefix("/proxy/").or_else(|| path.strip_prefix('/'));
    let one_segment = rest.is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
    one_segment
        && query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "url"))
}

/// The preset a set of Misskey flags asks for. As Misskey: a flag counts when present,
/// whatever its value, and `emoji` or `avatar` win over `static`, which wins over `preview`,
/// then `badge`; `static` beside `emoji` or `avatar` asks for their first frame.
fn preset(has: impl Fn(&str) -> bool) -> Option<&'static str> {
    let still = has("static");
    Some(match () {
        _ if has("emoji") && still => "emoji_static",
        _ if has("emoji") => "emoji",
        _ if has("avatar") && still => "avatar_static",
        _ if has("avatar") => "avatar",
        _ if still => "static",
        _ if has("preview") => "preview",
        _ if has("badge") => "badge",
        _ if has("thumbnail") => "thumbnail",
        _ => return None,
    })
}

/// Parses a Misskey media-proxy path and query (unsigned: anyone may ask).
pub fn parse(path: &str, query: Option<&str>) -> Result<MisskeyRequest, ProxyError> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let has = |flag: &str| pairs.iter().any(|(k, _)| k == flag);
    let urls: Vec<&str> =
        pairs.iter().filter(|(k, _)| k == "url").map(|(_, v)| v.as_str()).collect();
    let source = match (path.strip_prefix(PATH_FORM), urls.as_slice()) {
        (_, [url]) => parse_source(url)?,
        (_, [_, _, ..]) => return Err(ProxyError::BadUrl("more than one url parameter")),
        (Some(encoded), []) => {
            let text = percent_decode(encoded)?;
            match text.starts_with("http://") || text.starts_with("https://") {
                true => parse_source(&text)?,
                false => parse_source(&format!("https://{text}"))?,
            }
        }
        (None, []) => return Err(ProxyError::BadUrl("expected ?url=")),
    };
    let filename = match super::akkoma::basename(&source) {
        name if name.is_empty() => "file".to_string(),
        name => name,
    };
    let variant = preset(has).map(str::to_string);
    Ok(MisskeyRequest {
        request: ProxyRequest::new(source, variant),
        fallback: has("fallback"),
        filename,
    })
}

fn percent_decode(text: &str) -> Result<String, ProxyError> {
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8();
    decoded.map(|t| t.into_owned()).map_err(|_| ProxyError::BadUrl("source is not UTF-8"))
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
    fn flags_map_to_presets_in_misskeys_order() {
        let q = "url=https%3A%2F%2Fmedia.test%2Fa.png&emoji=1&fallback=1";
        assert!(matches("/proxy/emoji.webp", Some(q)));
        assert!(matches("/emoji.webp", Some(q)));
        assert!(!matches("/proxy/a/b/c", Some(q)));
        assert!(!matches("/proxy/emoji.webp", None));
        let m = parse("/proxy/emoji.webp", Some(q)).unwrap();
        assert_eq!(m.request.source.as_str(), "https://media.test/a.png");
        assert_eq!(m.request.variant.as_deref(), Some("emoji"));
        assert_eq!(m.filename, "a.png");
        assert!(m.fallback);
        let variant = |flags: &str| {
            let q = format!("url=https://media.test/a.png{flags}");
            parse("/proxy/x.webp", Some(&q)).unwrap().request.variant
        };
        for (flags, want) in [
            ("", None),
            ("&static=0", Some("static")),
            ("&avatar&static", Some("avatar_static")),
            ("&emoji=1&avatar=1", Some("emoji")),
            ("&badge=1&preview=1", Some("preview")),
            ("&static=1&preview=1", Some("static")),
            ("&badge=1", Some("badge")),
            ("&thumbnail=1", Some("thumbnail")),
        ] {
            assert_eq!(variant(flags).as_deref(), want, "{flags}");
        }
        assert!(parse("/proxy/x.webp", Some("emoji=1")).is_err());
        assert!(parse("/proxy/x.webp", Some("url=https://a.test/1&url=https://a.test/2")).is_err());
    }

    #[test]
    fn the_path_form_carries_the_url() {
        assert!(matches("/proxy/image/media.test%2Fa%20b.png", Some("avatar=1")));
        let m = parse("/proxy/image/media.test%2Fdir%2Fa.png", Some("avatar=1")).unwrap();
        assert_eq!(m.request.source.as_str(), "https://media.test/dir/a.png");
        assert_eq!(m.request.variant.as_deref(), Some("avatar"));
        let m = parse("/proxy/image/http%3A%2F%2Fmedia.test%2Fa.png", None).unwrap();
        assert_eq!(m.request.source.as_str(), "http://media.test/a.png");
        // A raw `&` or `+` in the path is part of the URL, not a separator or a space.
        let m = parse("/proxy/image/media.test/a&b+c.png", None).unwrap();
        assert_eq!(m.request.source.as_str(), "https://media.test/a&b+c.png");
    }

    #[test]
    fn placeholder_is_a_valid_png() {
        let img = image::load_from_memory(&placeholder_png()).unwrap();
        assert_eq!((img.width(), img.height()), (1, 1));
    }
}
