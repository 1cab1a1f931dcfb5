//! SVG is never served as-is: it is a document that can carry script. With `media.svg =
//! "rasterize"` it is drawn to a PNG by resvg (a static renderer: no script, no network); with
//! `"refuse"` it gets 415.
//!
//! The renderer is built without text, system fonts or raster-image support, and every
//! `<image href>` is refused here, so a hostile SVG cannot make parasol read a local file.

use std::sync::Arc;

use crate::error::ProxyError;

/// Largest SVG document rendered; larger ones are refused before parsing.
pub const MAX_SVG_BYTES: u64 = 2 << 20;

/// Longest side of a rasterised SVG, in pixels.
const MAX_SIDE: f32 = 1024.0;

/// Whether `head` (the start of a body no binary signature matched) is an SVG document:
/// optional BOM, whitespace, XML declaration, comments or doctype, then `<svg`.
pub fn looks_like_svg(head: &[u8]) -> bool {
    // Bytes, not text: this runs on every fill, and a binary head fails at its first byte.
    let mut rest = head.strip_prefix("\u{feff}".as_bytes()).unwrap_or(head).trim_ascii_start();
    loop {
        if rest.starts_with(b"<svg") {
            return true;
        }
        let close: &[u8] = if rest.starts_with(b"<!--") {
            b"-->"
        } else if rest.starts_with(b"<?") || rest.starts_with(b"<!") {
            b">"
        } else {
            return false;
        };
        let Some(end) = rest.windows(close.len()).position(|w| w == close) else { return false };
        rest = rest[end + close.len()..].trim_ascii_start();
    }
}

/// Draws `svg` to a PNG fitting within 1024 × 1024 (never above `max_pixels`).
pub fn rasterize(svg: &[u8], max_pixels: u64) -> Result<Vec<u8>, ProxyError> {
    if svg.len() as u64 > MAX_SVG_BYTES {
        return Err(ProxyError::bad_image("SVG too large to render"));
    }
    let options = resvg::usvg::Options {
        image_href_resolver: resvg::usvg::ImageHrefResolver {
            resolve_data: Box::new(|_, _: Arc<Vec<u8>>, _| None),
            resolve_string: Box::new(|_, _| None),
        },
        ..resvg::usvg::Options::default()
    };
    let tree = resvg::usvg::Tree::from_data(svg, &options)
        .map_err(|_| ProxyError::bad_image("unreadable SVG"))?;
    let size = tree.size();
    let scale = (MAX_SIDE / size.width().max(size.height())).min(1.0);
    let (w, h) = ((size.width() * scale).ceil() as u32, (size.height() * scale).ceil() as u32);
    if w == 0 || h == 0 || u64::from(w) * u64::from(h) > max_pixels {
        return Err(ProxyError::bad_image("SVG dimensions out of range"));
    }
    let mut pixmap = resvg::tiny_skia::Pixmap::new(w, h)
        .ok_or_else(|| ProxyError::bad_image("SVG dimensions out of range"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|_| ProxyError::internal("PNG encoding failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_svg_documents_only() {
        assert!(looks_like_svg(b"<svg xmlns='http://www.w3.org/2000/svg'/>"));
        assert!(looks_like_svg(
            b"\xef\xbb\xbf <?xml version='1.0'?>\n<!-- hi --><!DOCTYPE svg><svg>"
        ));
        assert!(!looks_like_svg(b"<html><svg></svg></html>"));
        assert!(!looks_like_svg(b"<?xml version='1.0'?><feed/>"));
        assert!(!looks_like_svg(b"<!-- never closed <svg>"));
        assert!(!looks_like_svg(b"\xff\xd8\xff\xe0<svg>"), "a binary head");
        assert!(!looks_like_svg(b""));
    }

    #[test]
    fn rasterizes_and_ignores_script_and_local_files() {
        let svg = br#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="200" height="100">
            <script>alert(document.cookie)</script>
            <image xlink:href="/etc/passwd" width="10" height="10"/>
            <rect width="200" height="100" fill="red"/></svg>"#;
        let png = rasterize(svg, 40_000_000).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        assert!(!png.windows(6).any(|w| w == b"script"));
        assert!(rasterize(b"<svg width='0' height='0'/>", 40_000_000).is_err());
        assert!(rasterize(b"not svg", 40_000_000).is_err());
    }
}
