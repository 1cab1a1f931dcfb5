//! What parasol is willing to serve: the type is sniffed from the bytes (never taken from the
//! origin's Content-Type, which a hostile origin controls) and must be on
//! `media.allowed_types`. Types that can run script in a browser are refused whatever the
//! configuration says.
//!
//! Sniffing reads a few magic bytes and is all the server itself does with a file's contents;
//! everything that parses one (decoding, rendering, rasterising, stripping metadata) runs in
//! a sandboxed worker process ([`worker`]).

pub mod animation;
pub mod decode;
pub mod details;
pub mod strip;
pub mod svg;
pub mod variants;
pub mod worker;

use crate::error::ProxyError;

pub use crate::cache::received::SNIFF_LEN;

/// Types never served as-is, even if an operator's pattern would admit them: they execute or
/// embed script (SVG, HTML, XML) or are not media at all.
const NEVER: &[&str] = &["image/svg+xml", "text/html", "application/xhtml+xml", "text/xml"];

/// The compiled `media.allowed_types` patterns.
#[derive(Debug, Clone)]
pub struct TypePolicy {
    /// `image/*` style patterns or exact types, lowercase.
    patterns: Vec<String>,
    /// `media.svg = "rasterize"`: SVG is admitted, to be drawn to PNG before storing.
    rasterize_svg: bool,
}

/// Types the media workers' own decoders read ([`decode`]); AVIF and video go through ffmpeg.
pub const DECODED: &[&str] = &[
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/vnd.microsoft.icon",
    "image/tiff",
    "image/jxl",
];

/// The sniffed type of an SVG document awaiting rasterisation.
pub const SVG: &str = "image/svg+xml";

impl TypePolicy {
    /// A policy allowing the MIME `patterns` (`image/*` or exact).
    pub fn new(patterns: &[String]) -> Self {
        Self {
            patterns: patterns.iter().map(|p| p.trim().to_ascii_lowercase()).collect(),
            rasterize_svg: false,
        }
    }

    /// Whether SVG is admitted (to be rasterised, never served as-is).
    pub fn rasterizing_svg(mut self, on: bool) -> Self {
        self.rasterize_svg = on;
        self
    }

    /// Sniffs `head` (the first bytes of the body) and returns the type to serve.
    pub fn sniff(&self, head: &[u8]) -> Result<&'static str, ProxyError> {
        // SVG is text (infer calls it XML); it is only ever admitted to be rasterised, never
        // served as-is.
        if self.rasterize_svg && svg::looks_like_svg(head) {
            return Ok(SVG);
        }
        let mime = infer::get(head).map(|t| t.mime_type()).ok_or(ProxyError::UnsupportedType)?;
        if NEVER.contains(&mime) || !self.allows(mime) {
            return Err(ProxyError::UnsupportedType);
        }
        Ok(mime)
    }

    fn allows(&self, mime: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix("/*") {
            Some(major) => mime.split('/').next() == Some(major),
            None => p == mime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TypePolicy {
        TypePolicy::new(&["image/*".into(), "video/*".into(), "audio/*".into()])
    }

    #[test]
    fn sniffs_from_bytes_not_claims() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(policy().sniff(png).unwrap(), "image/png");
        let gif = b"GIF89a\x01\0\x01\0";
        assert_eq!(policy().sniff(gif).unwrap(), "image/gif");
    }

    #[test]
    fn refuses_markup_and_unknown() {
        for body in [
            &b"<!doctype html><script>alert(1)</script>"[..],
            b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script/></svg>",
            b"{\"@context\":\"https://www.w3.org/ns/activitystreams\"}",
            b"%PDF-1.7\n",
            b"",
        ] {
            assert!(policy().sniff(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn exact_patterns() {
        let only_png = TypePolicy::new(&["image/png".into()]);
        assert!(only_png.sniff(b"GIF89a\x01\0\x01\0").is_err());
        assert!(only_png.sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").is_ok());
    }
}
