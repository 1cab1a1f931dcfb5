//! The pict-rs API as Lemmy uses it for remote images (`image_mode = ProxyAllImages`), on its
//! own listener (`compat.pictrs_listen`):
//! - `GET /image/original?proxy=<url>`: the file;
//! - `GET /image/process.<ext>?proxy=<url>[&thumbnail=N]`: a rendition fitting inside N×N
//!   (never enlarged), in the format the extension names;
//! - `GET /image/details/original?proxy=<url>`: width, height, frames, content type, date
//!   and blurhash as JSON (what Lemmy stores in its `image_details` table);
//! - `GET /healthz`.
//!
//! Request shapes as LemmyNet/lemmy sends them (`crates/routes/src/images/download.rs`,
//! `crates/api/api_utils/src/request.rs`); answers as pict-rs 0.5 gives them, errors as its
//! `{"msg", "code"}` JSON. Unsigned, because Lemmy checked the URL before asking: the listener
//! must be reachable only by Lemmy (or the nginx in front of pict-rs). Lemmy relays the
//! viewer's headers (cookies, `Authorization`, `X-Forwarded-For`); only `Range` and
//! `If-None-Match` are read, nothing of them is logged or sent on.

use super::parse_source;
use crate::config::{AnimationPolicy, VariantConfig, VariantFormat};
use crate::error::ProxyError;

/// What a pict-rs request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PictrsRequest {
    /// `/image/original?proxy=`: the file.
    Original(url::Url),
    /// `/image/process.<ext>?proxy=`: a rendition.
    Process(url::Url, Rendition),
    /// `/image/details/original?proxy=`: size, frames, type and blurhash.
    Details(url::Url),
    /// `/healthz`.
    Healthz,
}

/// One rendition: its fit and format. Each distinct one is its own cache entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendition {
    /// Fits inside `size` × `size`.
    pub size: u32,
    /// The encoding the extension asked for.
    pub format: VariantFormat,
    /// Animations stay animated (asked for as GIF, APNG or WebP, as pict-rs keeps them).
    pub animated: bool,
}

impl Rendition {
    /// The rendition's name in cache keys; not a name a configured preset can have.
    pub fn name(&self) -> String {
        let motion = if self.animated { "animated" } else { "still" };
        format!("pictrs:{}:{}:{motion}", self.size, self.format.as_str())
    }

    /// The preset this rendition is made with.
    pub fn spec(&self) -> VariantConfig {
        VariantConfig {
            width: Some(self.size),
            height: Some(self.size),
            format: self.format,
            quality: match self.format {
                VariantFormat::Jpeg => 85,
                _ => 80,
            },
            animation: match self.animated {
                true => AnimationPolicy::Keep,
                false => AnimationPolicy::Still,
            },
            ..VariantConfig::default()
        }
    }
}

/// Parses a request on the pict-rs listener. `max_size` bounds `thumbnail` (and is the fit
/// of a conversion that names none).
pub fn parse(path: &str, query: Option<&str>, max_size: u32) -> Result<PictrsRequest, ProxyError> {
    if path == "/healthz" {
        return Ok(PictrsRequest::Healthz);
    }
    let mut proxy = None;
    let mut size = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "proxy" if proxy.is_none() => proxy = Some(value.into_owned()),
            "proxy" => return Err(ProxyError::BadUrl("proxy given twice")),
            // pict-rs's `resize` differs in its filter only; both fit inside N×N.
            "thumbnail" | "resize" => {
                let n: u32 = value
                    .trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '.')
                    .parse()
                    .map_err(|_| ProxyError::BadUrl("thumbnail must be a number"))?;
                if n == 0 {
                    return Err(ProxyError::BadUrl("thumbnail must be above zero"));
                }
                size = Some(rounded(n, max_size));
            }
            // Other pict-rs operations (blur, crop, identity) are not filters here; pict-rs
            // drops the ones it is not configured for, and so does this.
            _ => {}
        }
    }
    // Lemmy 0.19 before 0.19.21 put the URL in unencoded (LemmyNet/lemmy#5749): a URL with a
    // query of its own then arrives split, its parameters beside pict-rs's. Those pict-rs
    // does not know belong to the URL.
    if let Some(joined) = query.and_then(unencoded_proxy) {
        proxy = Some(joined);
    }
    let source = || {
        let url = proxy.as_deref().ok_or(ProxyError::BadUrl("no proxy parameter"))?;
        parse_source(url)
    };
    match path {
        "/image/original" => Ok(PictrsRequest::Original(source()?)),
        "/image/details/original" => Ok(PictrsRequest::Details(source()?)),
        _ => {
            let ext = path.strip_prefix("/image/process.").ok_or(ProxyError::NoRoute)?;
            let (format, animated) = match ext.to_ascii_lowercase().as_str() {
                "webp" => (VariantFormat::Webp, true),
                "jpg" | "jpeg" => (VariantFormat::Jpeg, false),
                "png" => (VariantFormat::Png, false),
                // Formats there is no encoder for here are answered as WebP (the
                // Content-Type says so; browsers go by it): an animation stays one.
                "gif" | "apng" => (VariantFormat::Webp, true),
                "avif" | "jxl" => (VariantFormat::Webp, false),
                _ => return Err(ProxyError::BadUrl("unknown process extension")),
            };
            let size = size.unwrap_or(max_size);
            Ok(PictrsRequest::Process(source()?, Rendition { size, format, animated }))
        }
    }
}

/// The size a `thumbnail=N` is rendered at: `N` rounded up to a power of two from 64, at most
/// `max` (the listener is unsigned: thirty values of N would otherwise be thirty renders and
/// thirty cache entries of one picture; this way a format has at most eight sizes).
fn rounded(n: u32, max: u32) -> u32 {
    let mut size = 64u32;
    while size < n && size < max {
        size = size.saturating_mul(2);
    }
    size.min(max)
}

/// Query parameters pict-rs reads: the rest of a split, unencoded `proxy` URL is the URL's.
const PICTRS_PARAMS: &[&str] = &["proxy", "thumbnail", "resize", "blur", "crop", "identity"];

/// The `proxy` URL of a query where it was not encoded (its raw value holds `://`), with the
/// parameters that followed it and that pict-rs does not read put back on it, as written.
fn unencoded_proxy(query: &str) -> Option<String> {
    let mut pairs = query.split('&');
    let mut url = pairs.by_ref().find_map(|p| p.strip_prefix("proxy="))?.to_string();
    if !url.contains("://") {
        return None;
    }
    for pair in pairs {
        let name = pair.split('=').next().unwrap_or_default();
        if !PICTRS_PARAMS.contains(&name) {
            url.push('&');
            url.push_str(pair);
        }
    }
    Some(url)
}

/// pict-rs's error body: `{"msg": "...", "code": "..."}`.
pub fn error_body(e: &ProxyError) -> String {
    let e = e.to_viewer();
    serde_json::json!({ "msg": e.public_message(), "code": e.code() }).to_string() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEMMY_ENCODED: &str = "https%3A%2F%2Fmedia.example.test%2Fa%20b.png%3Fx%3D1";

    #[test]
    fn an_unencoded_proxy_url_keeps_its_own_query() {
        // Lemmy 0.19.x: image/process.jpg?proxy=https://…/a.jpg?w=1&h=2&thumbnail=256
        let q = "proxy=https://media.example.test/a.jpg?w=1&h=2&thumbnail=256";
        let source = url::Url::parse("https://media.example.test/a.jpg?w=1&h=2").unwrap();
        let rendition = Rendition { size: 256, format: VariantFormat::Jpeg, animated: false };
        assert_eq!(
            parse("/image/process.jpg", Some(q), 2048).unwrap(),
            PictrsRequest::Process(source.clone(), rendition)
        );
        let q = "proxy=https://media.example.test/a.jpg?w=1&h=2";
        assert_eq!(
            parse("/image/original", Some(q), 2048).unwrap(),
            PictrsRequest::Original(source)
        );
        // Encoded (Lemmy 1.0, later 0.19): other parameters are not the URL's.
        let q = "proxy=https%3A%2F%2Fmedia.example.test%2Fa.jpg&h=2";
        let plain = url::Url::parse("https://media.example.test/a.jpg").unwrap();
        assert_eq!(
            parse("/image/original", Some(q), 2048).unwrap(),
            PictrsRequest::Original(plain)
        );
    }

    #[test]
    fn lemmy_request_shapes() {
        let source = url::Url::parse("https://media.example.test/a%20b.png?x=1").unwrap();
        let q = format!("proxy={LEMMY_ENCODED}");
        assert_eq!(
            parse("/image/original", Some(&q), 2048).unwrap(),
            PictrsRequest::Original(source.clone())
        );
        // urlencoding::encode leaves -_.~ alone: the same URL, the same request.
        let q2 = "proxy=https%3A%2F%2Fmedia.example.test%2Fa%20b.png%3Fx%3D1";
        assert_eq!(
            parse("/image/details/original", Some(q2), 2048).unwrap(),
            PictrsRequest::Details(source.clone())
        );
        let q = format!("proxy={LEMMY_ENCODED}&thumbnail=512");
        let want = Rendition { size: 512, format: VariantFormat::Webp, animated: true };
        assert_eq!(
            parse("/image/process.webp", Some(&q), 2048).unwrap(),
            PictrsRequest::Process(source.clone(), want)
        );
        let got = parse("/image/process.jpg", Some(&q), 256).unwrap();
        let want = Rendition { size: 256, format: VariantFormat::Jpeg, animated: false };
        assert_eq!(got, PictrsRequest::Process(source, want), "thumbnail bounded by the maximum");
    }

    #[test]
    fn bad_requests_are_refused() {
        let q = format!("proxy={LEMMY_ENCODED}");
        assert!(parse("/image/process.exe", Some(&q), 512).is_err());
        assert!(parse("/image/process.png", Some(&format!("{q}&thumbnail=x")), 512).is_err());
        assert!(parse("/image/process.png", Some(&format!("{q}&thumbnail=0")), 512).is_err());
        assert!(parse("/image/original", None, 512).is_err());
        assert!(parse("/image/original", Some("proxy=file%3A%2F%2F%2Fetc%2Fpasswd"), 512).is_err());
        assert!(parse("/image/original", Some(&format!("{q}&{q}")), 512).is_err());
        assert!(matches!(parse("/image/upload", Some(&q), 512), Err(ProxyError::NoRoute)));
    }

    #[test]
    fn thumbnail_sizes_round_up_to_a_few() {
        let q = |n: u32| format!("proxy={LEMMY_ENCODED}&thumbnail={n}");
        let size = |n: u32, max: u32| match parse("/image/process.webp", Some(&q(n)), max) {
            Ok(PictrsRequest::Process(_, r)) => r.size,
            other => panic!("{other:?}"),
        };
        assert_eq!((size(1, 2048), size(64, 2048), size(65, 2048)), (64, 64, 128));
        assert_eq!((size(256, 2048), size(300, 2048), size(2000, 2048)), (256, 512, 2048));
        assert_eq!((size(9000, 2048), size(300, 400), size(20, 16)), (2048, 400, 16));
        let sizes: std::collections::HashSet<u32> = (1..=10_000).map(|n| size(n, 8192)).collect();
        assert!(sizes.len() <= 8, "{sizes:?}");
    }

    #[test]
    fn each_rendition_has_its_own_name() {
        let a = Rendition { size: 512, format: VariantFormat::Webp, animated: true };
        let b = Rendition { size: 256, ..a };
        let c = Rendition { format: VariantFormat::Png, animated: false, ..a };
        assert_ne!(a.name(), b.name());
        assert_ne!(a.name(), c.name());
        assert!(a.name().contains(':'), "never a configured preset's name");
    }
}
