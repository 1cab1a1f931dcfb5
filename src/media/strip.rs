//! Metadata stripping of originals served as-is, without re-encoding a pixel: a photo's EXIF
//! can carry the GPS position of its author's home, the camera's serial number, the time.
//!
//! - JPEG: APP1 (EXIF, XMP), APP13 (IPTC) and comments are removed. The one EXIF field a
//!   browser needs, the orientation, is kept in a minimal EXIF block written here, so a
//!   portrait photo is not shown sideways.
//! - PNG: text chunks (`tEXt`, `zTXt`, `iTXt`), `eXIf` and `tIME` are removed.
//! - WebP: `EXIF` and `XMP ` chunks are removed (and the header's size and flags follow).
//!
//! Colour profiles (ICC) stay: they are not personal and dropping them changes colours.
//!
//! The file is parsed in a media worker ([`plan`]), which answers only where to cut
//! ([`Cuts`]); the server makes the cuts in its own copy ([`Cuts::pieces`]). A worker that a
//! file took over can therefore only remove bytes of that file, never add any: the few bytes
//! the server writes (a WebP header, the orientation block) are its own.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// JPEG markers a strip removes, and the ones it walks by.
mod markers {
    pub const SOI: u8 = 0xD8;
    pub const EOI: u8 = 0xD9;
    pub const SOS: u8 = 0xDA;
    pub const APP0: u8 = 0xE0;
    pub const APP1: u8 = 0xE1;
    pub const APP13: u8 = 0xED;
    pub const COM: u8 = 0xFE;
}

/// Most cuts a plan may ask for (adjacent ones are one): a real file has a handful, and the
/// answer stays well inside a reply header's bound.
pub const MAX_CUTS: usize = 1024;

/// Where to cut an original: what a worker answers for a strip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cuts {
    /// Byte ranges `[start, end)` of the input to remove, in order, not overlapping.
    pub remove: Vec<(u64, u64)>,
    /// What the format needs written besides.
    pub fix: Fix,
}

/// Bytes the server writes into a stripped file, each its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fix", rename_all = "snake_case")]
pub enum Fix {
    /// Nothing besides the cuts.
    None,
    /// JPEG: a minimal EXIF block (APP1) holding only this orientation, inserted at `at`
    /// (an offset of the input, at a segment boundary).
    Orientation {
        /// Where it goes.
        at: u64,
        /// The orientation it holds (2-8).
        orientation: u16,
    },
    /// WebP: the RIFF size written anew, and the extended header's EXIF and XMP flags cleared.
    WebpHeader,
}

/// A part of the stripped file: a range of the input, or bytes the server wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// The input's bytes `[start, end)`.
    Keep(u64, u64),
    /// Bytes the server wrote.
    Put(Vec<u8>),
}

impl Cuts {
    /// Checks every cut against the file itself (`len` bytes of `content_type`, read with
    /// `read_at(offset, buf)`, false when it cannot fill `buf`): each must be nothing but
    /// whole metadata segments, walked here by their own markers and lengths, and an
    /// orientation block goes after SOI or after the JFIF header. A worker taken over by the
    /// file can then remove only metadata, never pick the bytes that remain.
    pub fn verify(
        &self,
        content_type: &str,
        len: u64,
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> bool,
    ) -> Result<(), &'static str> {
        let not_metadata = "a cut that is not whole metadata segments";
        for &(start, end) in &self.remove {
            let mut at = start;
            while at < end {
                let mut head = [0u8; 8];
                let want = if content_type == "image/jpeg" { 4 } else { 8 };
                if at + want as u64 > len || !read_at(at, &mut head[..want]) {
                    return Err(not_metadata);
                }
                let next = match content_type {
                    "image/jpeg" => {
                        let marker = [markers::APP1, markers::APP13, markers::COM];
                        let seg = u64::from(u16::from_be_bytes([head[2], head[3]]));
                        if head[0] != 0xFF || !marker.contains(&head[1]) || seg < 2 {
                            return Err(not_metadata);
                        }
                        at + 2 + seg
                    }
                    "image/png" => {
                        const PRIVATE: [&[u8; 4]; 5] =
                            [b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"];
                        if !PRIVATE.iter().any(|p| p[..] == head[4..8]) {
                            return Err(not_metadata);
                        }
                        at + 12
                            + u64::from(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
                    }
                    "image/webp" => {
                        if !matches!(&head[..4], b"EXIF" | b"XMP ") {
                            return Err(not_metadata);
                        }
                        let size =
                            u64::from(u32::from_le_bytes([head[4], head[5], head[6], head[7]]));
                        (at + 8 + size + size % 2).min(len)
                    }
                    _ => return Err("not a format that is stripped"),
                };
                if next > end {
                    return Err(not_metadata);
                }
                at = next;
            }
        }
        if let Fix::Orientation { at, .. } = self.fix {
            let mut app0 = [0u8; 4];
            let after_jfif = read_at(2, &mut app0)
                && app0[..2] == [0xFF, markers::APP0]
                && at == 4 + u64::from(u16::from_be_bytes([app0[2], app0[3]]));
            if at != 2 && !after_jfif {
                return Err("an orientation block out of place");
            }
        }
        Ok(())
    }

    /// The stripped file, in order, as ranges of the input (`len` bytes of `content_type`,
    /// whose first bytes are `head`: at least 32 of them, or all) and bytes written here.
    /// Refused when the cuts do not fit the file: out of order, out of bounds, into the
    /// format's header, or a fix of another format.
    pub fn pieces(
        &self,
        content_type: &str,
        len: u64,
        head: &[u8],
    ) -> Result<Vec<Piece>, &'static str> {
        let webp_vp8x = content_type == "image/webp" && head.get(12..16) == Some(b"VP8X");
        // The bytes no cut may touch: the signature, and the WebP header the fix rewrites.
        let protected = match content_type {
            "image/jpeg" => 2,
            "image/png" => 8,
            "image/webp" if webp_vp8x => 30,
            "image/webp" => 12,
            _ => return Err("not a format that is stripped"),
        };
        if self.remove.is_empty() || self.remove.len() > MAX_CUTS {
            return Err("no cuts, or too many");
        }
        let mut edits: Vec<(u64, u64, Vec<u8>)> = Vec::with_capacity(self.remove.len() + 2);
        let mut last = protected;
        for &(start, end) in &self.remove {
            if start < last || end <= start || end > len {
                return Err("cuts out of order or out of bounds");
            }
            edits.push((start, end, Vec::new()));
            last = end;
        }
        let removed: u64 = self.remove.iter().map(|(s, e)| e - s).sum();
        match (self.fix, content_type) {
            (Fix::None, "image/png") => {}
            (Fix::None, "image/jpeg") => {}
            (Fix::Orientation { at, orientation }, "image/jpeg") => {
                if !(2..=8).contains(&orientation) || at < 2 || at > len {
                    return Err("an orientation out of range");
                }
                if self.remove.iter().any(|&(s, e)| s < at && at < e) {
                    return Err("an orientation inside a cut");
                }
                edits.push((at, at, orientation_segment(orientation)));
            }
            (Fix::WebpHeader, "image/webp") => {
                let out_len = len - removed;
                let riff = u32::try_from(out_len - 8).map_err(|_| "a WebP too large")?;
                edits.push((4, 8, riff.to_le_bytes().to_vec()));
                if webp_vp8x {
                    const EXIF_AND_XMP: u8 = 0x08 | 0x04;
                    let flags = *head.get(20).ok_or("a WebP header cut short")?;
                    edits.push((20, 21, vec![flags & !EXIF_AND_XMP]));
                }
            }
            _ => return Err("a fix of another format"),
        }
        // Stable: an insertion stays before a cut that starts where it is.
        edits.sort_by_key(|(start, end, _)| (*start, *end));
        let mut pieces = Vec::with_capacity(edits.len() * 2 + 1);
        let mut at = 0;
        for (start, end, put) in edits {
            if start > at {
                pieces.push(Piece::Keep(at, start));
            }
            if !put.is_empty() {
                pieces.push(Piece::Put(put));
            }
            at = at.max(end);
        }
        if at < len {
            pieces.push(Piece::Keep(at, len));
        }
        Ok(pieces)
    }

    /// The stripped copy of `bytes`, made in memory, once [`Self::verify`] passed.
    pub fn apply(&self, bytes: &[u8], content_type: &str) -> Result<Bytes, &'static str> {
        let mut read_at = |at: u64, buf: &mut [u8]| {
            let at = at as usize;
            match bytes.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        };
        self.verify(content_type, bytes.len() as u64, &mut read_at)?;
        let head = &bytes[..bytes.len().min(64)];
        let mut out = Vec::with_capacity(bytes.len());
        for piece in self.pieces(content_type, bytes.len() as u64, head)? {
            match piece {
                Piece::Keep(start, end) => {
                    out.extend_from_slice(&bytes[start as usize..end as usize])
                }
                Piece::Put(put) => out.extend_from_slice(&put),
            }
        }
        Ok(Bytes::from(out))
    }
}

/// Where to cut `bytes` (a JPEG, PNG or WebP) to remove its metadata; `None` when there is
/// nothing to remove (or the format is not one this strips, or it cannot be parsed, in which
/// case the original is served unchanged: the sniffer already vouched for its type). Runs
/// in a media worker. Refused: metadata in more places than [`MAX_CUTS`] (never served
/// with it left in).
pub fn plan(bytes: &[u8], content_type: &str) -> Result<Option<Cuts>, &'static str> {
    let parsed = match content_type {
        "image/jpeg" => plan_jpeg(bytes),
        "image/png" => plan_png(bytes),
        "image/webp" => plan_webp(bytes),
        _ => None,
    };
    let Some(mut cuts) = parsed else { return Ok(None) };
    // Adjacent cuts are one (a file of a thousand text chunks is a few cuts).
    cuts.remove.dedup_by(|next, prev| {
        let adjacent = prev.1 == next.0;
        if adjacent {
            prev.1 = next.1;
        }
        adjacent
    });
    match cuts.remove.len() {
        0 => Ok(None),
        n if n > MAX_CUTS => Err("metadata in too many places"),
        _ => Ok(Some(cuts)),
    }
}

/// [`plan`] and [`Cuts::apply`] in one: the stripped copy, or `None`.
pub fn strip(bytes: &Bytes, content_type: &str) -> Option<Bytes> {
    plan(bytes, content_type).ok()??.apply(bytes, content_type).ok()
}

fn u16_be(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?)))
}

fn plan_jpeg(b: &[u8]) -> Option<Cuts> {
    if b.get(..2)? != [0xFF, markers::SOI] {
        return None;
    }
    let (mut remove, mut orientation) = (Vec::new(), None);
    // The orientation block goes after the JFIF header when there is one, else after SOI.
    let mut insert_at = 2u64;
    let mut at = 2;
    let mut first = true;
    while at + 1 < b.len() {
        if b[at] != 0xFF {
            return None;
        }
        let marker = b[at + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => {
                at += 1;
                continue;
            }
            markers::EOI => break,
            // Markers without a length (restart markers, TEM).
            0x01 | 0xD0..=0xD7 => {
                at += 2;
                continue;
            }
            _ => {}
        }
        let len = u16_be(b, at + 2)?;
        let end = at + 2 + len;
        if len < 2 || end > b.len() {
            return None;
        }
        match marker {
            markers::APP1 | markers::APP13 | markers::COM => {
                if marker == markers::APP1 && orientation.is_none() {
                    let payload = &b[at + 4..end];
                    if let Some(tiff) = payload.strip_prefix(b"Exif\0\0") {
                        orientation = orientation_of(tiff);
                    }
                }
                remove.push((at as u64, end as u64));
            }
            markers::APP0 if first => insert_at = end as u64,
            _ => {}
        }
        first = false;
        at = end;
        if marker == markers::SOS {
            // Entropy-coded data up to the next marker that is not a stuffed 0xFF00 or a
            // restart (a progressive file has more segments, comments among them, after it).
            loop {
                let next = at + memchr::memchr(0xFF, b.get(at..)?)?;
                match b.get(next + 1)? {
                    0x00 | 0xD0..=0xD7 | 0xFF => at = next + 1,
                    _ => {
                        at = next;
                        break;
                    }
                }
            }
        }
    }
    let fix = match orientation.filter(|o| (2..=8).contains(o)) {
        Some(o) if !remove.is_empty() => Fix::Orientation { at: insert_at, orientation: o },
        _ => Fix::None,
    };
    Some(Cuts { remove, fix })
}

fn plan_png(b: &[u8]) -> Option<Cuts> {
    if b.get(..8)? != b"\x89PNG\r\n\x1a\n" {
        return None;
    }
    const PRIVATE: [&[u8; 4]; 5] = [b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"];
    let mut remove = Vec::new();
    let mut at = 8;
    while at + 8 <= b.len() {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().ok()?) as usize;
        let kind = &b[at + 4..at + 8];
        let end = at.checked_add(12)?.checked_add(len)?;
        if end > b.len() {
            return None;
        }
        if PRIVATE.iter().any(|p| p.as_slice() == kind) {
            remove.push((at as u64, end as u64));
        }
        at = end;
        if kind == b"IEND" {
            break;
        }
    }
    Some(Cuts { remove, fix: Fix::None })
}

fn plan_webp(b: &[u8]) -> Option<Cuts> {
    if b.get(..4)? != b"RIFF" || b.get(8..12)? != b"WEBP" {
        return None;
    }
    let mut remove = Vec::new();
    let mut at = 12;
    while at + 8 <= b.len() {
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().ok()?) as usize;
        let end = at.checked_add(8)?.checked_add(len)?.checked_add(len % 2)?.min(b.len());
        if at + 8 + len > b.len() {
            return None;
        }
        if matches!(&b[at..at + 4], b"EXIF" | b"XMP ") {
            remove.push((at as u64, end as u64));
        }
        at = end;
    }
    Some(Cuts { remove, fix: Fix::WebpHeader })
}

/// The APP1 segment of [`minimal_exif`]: marker, length, `Exif\0\0`, the block.
fn orientation_segment(orientation: u16) -> Vec<u8> {
    let tiff = minimal_exif(orientation);
    let mut segment = vec![0xFF, markers::APP1];
    segment.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
    segment.extend_from_slice(b"Exif\0\0");
    segment.extend_from_slice(&tiff);
    segment
}

/// Whether `bytes` may hold something [`strip`] removes. `false` only when no marker of what
/// it removes occurs anywhere in the file, so the server skips a worker's round trip for the
/// many files with nothing to strip (most JPEGs the Fediverse serves were re-encoded without
/// metadata on upload). A byte search, not a parse: it reads no length and follows no offset,
/// so a hostile file cannot steer it, and it errs only towards asking the worker.
pub fn may_carry_metadata(bytes: &[u8], content_type: &str) -> bool {
    let any = |needles: &[&[u8]]| needles.iter().any(|n| memchr::memmem::find(bytes, n).is_some());
    match content_type {
        // Every segment starts with its marker's two bytes, fill bytes (0xFF) before them or
        // not; in entropy-coded data 0xFF is only ever followed by 0x00 or a restart marker.
        "image/jpeg" => memchr::memchr_iter(0xFF, bytes).any(|at| {
            matches!(bytes.get(at + 1), Some(&m) if [markers::APP1, markers::APP13, markers::COM].contains(&m))
        }),
        "image/png" => any(&[b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"]),
        "image/webp" => any(&[b"EXIF", b"XMP "]),
        _ => true,
    }
}

/// The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block. Parsed by hand: it is
/// one fixed-layout lookup, and an EXIF crate would parse far more hostile input than needed.
fn orientation_of(exif: &[u8]) -> Option<u16> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let big = match tiff.get(0..2)? {
        b"MM" => true,
        b"II" => false,
        _ => return None,
    };
    let u16_at = |i: usize| {
        let b = tiff.get(i..i + 2)?;
        Some(if big { u16::from_be_bytes([b[0], b[1]]) } else { u16::from_le_bytes([b[0], b[1]]) })
    };
    let u32_at = |i: usize| {
        let b = tiff.get(i..i + 4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Some(if big { u32::from_be_bytes(a) } else { u32::from_le_bytes(a) })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    (0..count.min(512)).find_map(|n| {
        let entry = ifd + 2 + n * 12;
        (u16_at(entry)? == 0x0112).then(|| u16_at(entry + 8)).flatten()
    })
}

/// An EXIF block holding only an Orientation tag (big-endian TIFF, one IFD0 entry), without
/// the `Exif\0\0` prefix (img-parts adds it in the APP1 segment).
pub fn minimal_exif(orientation: u16) -> Bytes {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(b"MM\0\x2a\0\0\0\x08"); // TIFF header, IFD0 at offset 8
    b.extend_from_slice(&1u16.to_be_bytes()); // one entry
    b.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    b.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    b.extend_from_slice(&1u32.to_be_bytes()); // count 1
    b.extend_from_slice(&orientation.to_be_bytes());
    b.extend_from_slice(&[0, 0]); // value padding
    b.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use img_parts::ImageEXIF;
    use img_parts::jpeg::Jpeg;
    use img_parts::png::Png;
    use img_parts::webp::WebP;

    #[test]
    fn webp_exif_is_removed() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8));
        let mut plain = std::io::Cursor::new(Vec::new());
        img.write_to(&mut plain, image::ImageFormat::WebP).unwrap();
        let mut webp = WebP::from_bytes(plain.into_inner().into()).unwrap();
        webp.set_exif(Some(Bytes::from_static(b"MM\0\x2aGPS-secret-home")));
        let mut tagged = Vec::new();
        webp.encoder().write_to(&mut tagged).unwrap();
        let tagged = Bytes::from(tagged);
        assert!(tagged.windows(6).any(|w| w == b"secret"));
        let stripped = strip(&tagged, "image/webp").expect("something removed");
        assert!(!stripped.windows(6).any(|w| w == b"secret"));
        assert!(image::load_from_memory(&stripped).is_ok(), "still a valid WebP");
        assert_eq!(strip(&stripped, "image/webp"), None, "nothing left to remove");
    }

    /// Whatever `strip` would change, the byte search sends to the worker: files made with
    /// and without each kind of metadata, and the same files with markers planted at random
    /// places (in pixel data too), where it may only err towards the worker.
    #[test]
    fn the_byte_search_never_skips_what_strip_removes() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
        }));
        let encoded = |format| {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, format).unwrap();
            Bytes::from(out.into_inner())
        };
        let mut files = Vec::new();
        let jpeg = encoded(image::ImageFormat::Jpeg);
        files.push((jpeg.clone(), "image/jpeg"));
        for marker in [markers::APP1, markers::APP13, markers::COM] {
            let mut j = Jpeg::from_bytes(jpeg.clone()).unwrap();
            let segment = img_parts::jpeg::JpegSegment::new_with_contents(
                marker,
                Bytes::from_static(b"Exif\0\0MM\0\x2asecret"),
            );
            j.segments_mut().insert(1, segment);
            let mut out = Vec::new();
            j.encoder().write_to(&mut out).unwrap();
            files.push((Bytes::from(out), "image/jpeg"));
        }
        let png = encoded(image::ImageFormat::Png);
        files.push((png.clone(), "image/png"));
        for kind in [b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"] {
            let mut p = Png::from_bytes(png.clone()).unwrap();
            let chunk = img_parts::png::PngChunk::new(*kind, Bytes::from_static(b"k\0secret"));
            p.chunks_mut().insert(1, chunk);
            let mut out = Vec::new();
            p.encoder().write_to(&mut out).unwrap();
            files.push((Bytes::from(out), "image/png"));
        }
        let webp = encoded(image::ImageFormat::WebP);
        files.push((webp.clone(), "image/webp"));
        let mut w = WebP::from_bytes(webp.clone()).unwrap();
        w.set_exif(Some(Bytes::from_static(b"MM\0\x2asecret")));
        let mut out = Vec::new();
        w.encoder().write_to(&mut out).unwrap();
        files.push((Bytes::from(out), "image/webp"));
        // The same files with each marker planted at every 97th byte in turn.
        let planted: Vec<(Bytes, &str)> = files
            .iter()
            .flat_map(|(bytes, ct)| {
                let needles: &[&[u8]] = match *ct {
                    "image/jpeg" => &[b"\xff\xe1", b"\xff\xed", b"\xff\xfe"],
                    "image/png" => &[b"tEXt", b"eXIf", b"tIME"],
                    _ => &[b"EXIF", b"XMP "],
                };
                let bytes = bytes.clone();
                needles.iter().flat_map(move |n| {
                    let bytes = bytes.clone();
                    (8..bytes.len().saturating_sub(n.len())).step_by(97).map(move |at| {
                        let mut b = bytes.to_vec();
                        b[at..at + n.len()].copy_from_slice(n);
                        (Bytes::from(b), *ct)
                    })
                })
            })
            .collect();
        let (mut skipped, mut with_metadata) = (0, 0);
        for (bytes, ct) in files.iter().chain(&planted) {
            let changed = strip(bytes, ct).is_some();
            with_metadata += usize::from(changed);
            if !may_carry_metadata(bytes, ct) {
                skipped += 1;
                assert!(!changed, "{ct}: skipped a file strip changes");
            }
        }
        assert_eq!(skipped, 3, "the three clean files skip the worker");
        assert!(with_metadata >= 9, "the tagged files were stripped: {with_metadata}");
    }

    /// A WebP whose header flags its XMP: stripped, it still decodes (the flag goes with the
    /// chunk) and keeps no byte of the XMP.
    #[test]
    fn webp_xmp_is_removed_with_its_flag() {
        use img_parts::riff::{RiffChunk, RiffContent};
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8));
        let mut plain = std::io::Cursor::new(Vec::new());
        img.write_to(&mut plain, image::ImageFormat::WebP).unwrap();
        let mut webp = WebP::from_bytes(plain.into_inner().into()).unwrap();
        let xmp = RiffContent::Data(Bytes::from_static(b"<x:xmpmeta>home-address</x:xmpmeta>"));
        webp.chunks_mut().push(RiffChunk::new(img_parts::webp::CHUNK_XMP, xmp));
        webp.set_exif(None); // makes img-parts write the VP8X header, flags from the chunks
        let mut tagged = Vec::new();
        webp.encoder().write_to(&mut tagged).unwrap();
        let tagged = Bytes::from(tagged);
        assert_eq!(&tagged[12..16], b"VP8X");
        assert_eq!(tagged[20] & 0x04, 0x04, "the header flags the XMP");
        assert!(image::load_from_memory(&tagged).is_ok());
        let stripped = strip(&tagged, "image/webp").expect("something removed");
        assert!(!stripped.windows(12).any(|w| w == b"home-address"));
        assert!(image::load_from_memory(&stripped).is_ok(), "still decodes after the strip");
    }

    /// A worker taken over by a file could answer any cuts: only whole metadata segments of
    /// the file itself are taken, so it can never choose which of the file's bytes remain.
    #[test]
    fn cuts_must_be_whole_metadata_segments_of_the_file() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        }));
        let mut plain = std::io::Cursor::new(Vec::new());
        img.write_to(&mut plain, image::ImageFormat::Jpeg).unwrap();
        let mut jpeg = Jpeg::from_bytes(plain.into_inner().into()).unwrap();
        jpeg.set_exif(Some(Bytes::from(minimal_exif(6).to_vec())));
        let mut tagged = Vec::new();
        jpeg.encoder().write_to(&mut tagged).unwrap();
        let honest = plan(&tagged, "image/jpeg").unwrap().expect("an EXIF segment to cut");
        assert!(honest.apply(&tagged, "image/jpeg").is_ok());
        let len = tagged.len() as u64;
        let forged = [
            // Pixel data, anywhere past the header.
            Cuts { remove: vec![(len / 2, len / 2 + 10)], fix: Fix::None },
            // The honest cut and a few more bytes after it.
            Cuts { remove: vec![(honest.remove[0].0, honest.remove[0].1 + 3)], fix: Fix::None },
            // The orientation block in the middle of the pixels.
            Cuts { fix: Fix::Orientation { at: len / 2, orientation: 6 }, ..honest.clone() },
        ];
        for cuts in forged {
            assert!(cuts.apply(&tagged, "image/jpeg").is_err(), "{cuts:?}");
        }
        // A PNG of many text chunks in a row: one cut, accepted.
        let mut png = Png::from_bytes(Bytes::from(crate::media::strip::tests::png())).unwrap();
        for n in 0..2000 {
            let text = Bytes::from(format!("k\0{n}"));
            png.chunks_mut().insert(1, img_parts::png::PngChunk::new(*b"tEXt", text));
        }
        let mut out = Vec::new();
        png.encoder().write_to(&mut out).unwrap();
        let cuts = plan(&out, "image/png").unwrap().unwrap();
        assert_eq!(cuts.remove.len(), 1, "adjacent chunks are one cut");
        assert!(cuts.apply(&out, "image/png").is_ok());
    }

    fn png() -> Vec<u8> {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(8, 8));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn orientation_round_trips_through_the_minimal_block() {
        for o in 1..=8 {
            assert_eq!(orientation_of(&minimal_exif(o)), Some(o));
        }
        assert_eq!(orientation_of(b"Exif\0\0garbage"), None);
        assert_eq!(orientation_of(b""), None);
    }
}
