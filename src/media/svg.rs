//! SVG is never served as-is: it is a document that can carry script. With `media.svg =
//! "rasterize"` it is drawn to a PNG by resvg (a static renderer: no script, no network); with
//! `"refuse"` it gets 415.
//!
//! The renderer is built without text, system fonts or raster-image support, and every
//! `<image href>` is refused here, so a hostile SVG cannot make parasol read a local file.
//!
//! A few hundred bytes of SVG can ask for hours of work, so every document is screened before
//! the renderer sees it ([`screen`]): a DOCTYPE (and so any entity) is refused, filter
//! primitives are counted, and the parameters whose cost grows without a visible difference
//! are clamped. What is left is bounded by the rasterising job's own short CPU budget
//! (`media.svg_timeout`) and the worker's memory.

use std::borrow::Cow;
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

/// Filter primitives a document may hold; each one is a pass over its region for every
/// element it is applied to.
pub const MAX_FILTER_PRIMITIVES: usize = 64;

/// Octaves of noise `feTurbulence` computes at most. Each octave halves the last one's
/// amplitude: past ten, what they add is below one step of an 8-bit channel, while each
/// costs as much as the first (resvg loops over every octave for every pixel).
pub const MAX_OCTAVES: f64 = 10.0;

/// Largest `feMorphology` radius: its cost grows with the square of the radius at every
/// pixel (resvg visits the whole window).
pub const MAX_MORPHOLOGY_RADIUS: f64 = 10.0;

/// Largest `feConvolveMatrix` order (each side): its cost is order² at every pixel.
pub const MAX_CONVOLVE_ORDER: f64 = 8.0;

/// XML nodes a document may have.
const MAX_NODES: u32 = 200_000;

const SVG_NAMESPACE: &str = "http://www.w3.org/2000/svg";

/// Checks `svg` before rendering and returns it with costly parameters clamped (borrowed when
/// nothing needed changing). Refused: a document that is not UTF-8 XML, that has a DOCTYPE
/// (entities, the "billion laughs"), more than [`MAX_FILTER_PRIMITIVES`] filter primitives
/// or a convolution over [`MAX_CONVOLVE_ORDER`]. Clamped: `numOctaves` to [`MAX_OCTAVES`],
/// a morphology radius to [`MAX_MORPHOLOGY_RADIUS`].
pub fn screen(svg: &[u8]) -> Result<Cow<'_, [u8]>, ProxyError> {
    use resvg::usvg::roxmltree;
    let text = std::str::from_utf8(svg).map_err(|_| ProxyError::bad_image("SVG not UTF-8"))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::DtdDetected => ProxyError::bad_image("SVG with a DOCTYPE"),
        _ => ProxyError::bad_image("unreadable SVG"),
    })?;
    let (mut primitives, mut edits) = (0usize, Vec::new());
    for node in doc.descendants().filter(|n| n.is_element()) {
        let name = node.tag_name().name();
        if !name.starts_with("fe") || name.len() < 3 || !name.as_bytes()[2].is_ascii_uppercase() {
            continue;
        }
        primitives += 1;
        if primitives > MAX_FILTER_PRIMITIVES {
            return Err(ProxyError::bad_image("SVG with too many filter primitives"));
        }
        let (attribute, most) = match name {
            "feTurbulence" => ("numOctaves", MAX_OCTAVES),
            "feMorphology" => ("radius", MAX_MORPHOLOGY_RADIUS),
            "feConvolveMatrix" => ("order", MAX_CONVOLVE_ORDER),
            _ => continue,
        };
        // Every attribute of that name the renderer reads: in no namespace or SVG's (one in
        // another namespace, placed first, must not shield the real one).
        let read = |a: &roxmltree::Attribute| {
            a.name() == attribute && matches!(a.namespace(), None | Some(SVG_NAMESPACE))
        };
        for attr in node.attributes().filter(read) {
            let numbers = numbers(attr.value());
            if !numbers.iter().any(|n| *n > most) {
                continue;
            }
            if name == "feConvolveMatrix" {
                return Err(ProxyError::bad_image("SVG convolution too large"));
            }
            let clamped: Vec<String> = numbers.iter().map(|n| n.min(most).to_string()).collect();
            edits.push((attr.range_value(), clamped.join(" ")));
        }
    }
    edits.sort_by_key(|(range, _)| range.start);
    if edits.is_empty() {
        return Ok(Cow::Borrowed(svg));
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (range, value) in edits {
        out.push_str(&text[at..range.start]);
        out.push_str(&value);
        at = range.end;
    }
    out.push_str(&text[at..]);
    Ok(Cow::Owned(out.into_bytes()))
}

/// The numbers of an SVG number list (`"3"`, `"2 4"`, `"2,4"`); what does not parse is
/// taken as infinite, so it is clamped rather than passed on.
fn numbers(value: &str) -> Vec<f64> {
    value
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<f64>().ok().filter(|n| n.is_finite()).unwrap_or(f64::INFINITY))
        .collect()
}

/// Draws `svg` to a PNG fitting within 1024 × 1024 (never above `max_pixels`), once
/// [`screen`] has passed it.
pub fn rasterize(svg: &[u8], max_pixels: u64) -> Result<Vec<u8>, ProxyError> {
    if svg.len() as u64 > MAX_SVG_BYTES {
        return Err(ProxyError::bad_image("SVG too large to render"));
    }
    let svg = screen(svg)?;
    let options = resvg::usvg::Options {
        image_href_resolver: resvg::usvg::ImageHrefResolver {
            resolve_data: Box::new(|_, _: Arc<Vec<u8>>, _| None),
            resolve_string: Box::new(|_, _| None),
        },
        ..resvg::usvg::Options::default()
    };
    let tree = resvg::usvg::Tree::from_data(&svg, &options)
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

    #[test]
    fn the_screen_refuses_entities_and_clamps_costly_filters() {
        let entities = b"<?xml version='1.0'?><!DOCTYPE svg [<!ENTITY a 'aaaa'>]><svg>&a;</svg>";
        let refused = screen(entities).unwrap_err();
        assert!(refused.to_string().contains("DOCTYPE"), "{refused}");
        let noise = br#"<svg xmlns="http://www.w3.org/2000/svg"><filter id="f"><feTurbulence numOctaves="4000000000" baseFrequency="0.05"/><feMorphology radius="5 900"/></filter><rect filter="url(#f)" width="9" height="9"/></svg>"#;
        let screened = screen(noise).unwrap();
        let text = std::str::from_utf8(&screened).unwrap();
        assert!(text.contains(r#"numOctaves="10""#), "{text}");
        assert!(text.contains(r#"radius="5 10""#), "{text}");
        assert!(text.contains(r#"baseFrequency="0.05""#), "the rest as it was: {text}");
        // An attribute of another namespace first does not shield the one the renderer reads.
        let shielded = br#"<svg xmlns="http://www.w3.org/2000/svg" xmlns:x="urn:x"><filter id="f"><feTurbulence x:numOctaves="1" numOctaves="4000000000"/></filter></svg>"#;
        let screened = screen(shielded).unwrap();
        let text = std::str::from_utf8(&screened).unwrap();
        assert!(text.contains(r#"x:numOctaves="1" numOctaves="10""#), "{text}");
        let plain = br#"<svg xmlns="http://www.w3.org/2000/svg"><filter id="f"><feTurbulence numOctaves="3"/></filter></svg>"#;
        assert!(matches!(screen(plain).unwrap(), Cow::Borrowed(_)), "nothing to change");
        let many = format!(
            "<svg xmlns='http://www.w3.org/2000/svg'><filter id='f'>{}</filter></svg>",
            "<feOffset dx='1'/>".repeat(MAX_FILTER_PRIMITIVES + 1)
        );
        assert!(screen(many.as_bytes()).is_err(), "too many primitives");
        let convolve = br#"<svg xmlns="http://www.w3.org/2000/svg"><filter id="f"><feConvolveMatrix order="30"/></filter></svg>"#;
        assert!(screen(convolve).is_err());
        assert!(screen(b"\xff<svg/>").is_err(), "not UTF-8");
        // A clamped bomb renders, and quickly (it asked for four billion octaves).
        let bomb = br#"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><filter id="f"><feTurbulence baseFrequency="0.05" numOctaves="4000000000"/></filter><rect width="64" height="64" filter="url(#f)"/></svg>"#;
        let started = tokio::time::Instant::now();
        assert!(rasterize(bomb, 40_000_000).unwrap().starts_with(b"\x89PNG"));
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
}
