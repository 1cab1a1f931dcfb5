//! Metadata stripping of originals served as-is, without re-encoding a pixel: a photo's EXIF
//! can carry the GPS position of its author's home, the camera's serial number, the time.
//!
//! - JPEG: APP1 (EXIF, XMP), APP13 (IPTC) and comments are removed. The one EXIF field a
//!   browser needs, the orientation, is kept in a minimal EXIF block written here, so a
//!   portrait photo is not shown sideways.
//! - PNG: text chunks (`tEXt`, `zTXt`, `iTXt`), `eXIf` and `tIME` are removed.
//! - WebP: `EXIF` and `XMP ` chunks are removed.
//!
//! Colour profiles (ICC) stay: they are not personal and dropping them changes colours.

use bytes::Bytes;
use img_parts::ImageEXIF;
use img_parts::jpeg::{Jpeg, markers};
use img_parts::png::Png;
use img_parts::webp::WebP;

/// Returns `bytes` without metadata, or `None` when nothing was removed (or the format is not
/// one this strips, or it cannot be parsed, in which case the original is served unchanged:
/// the sniffer already vouched for its type).
pub fn strip(bytes: &Bytes, content_type: &str) -> Option<Bytes> {
    let out = match content_type {
        "image/jpeg" => strip_jpeg(bytes.clone())?,
        "image/png" => strip_png(bytes.clone())?,
        "image/webp" => strip_webp(bytes.clone())?,
        _ => return None,
    };
    (out.len() != bytes.len() || out != *bytes).then_some(out)
}

fn strip_jpeg(bytes: Bytes) -> Option<Bytes> {
    let mut jpeg = Jpeg::from_bytes(bytes).ok()?;
    let orientation = jpeg.exif().and_then(|exif| orientation_of(&exif));
    jpeg.segments_mut()
        .retain(|s| !matches!(s.marker(), markers::APP1 | markers::APP13 | markers::COM));
    if let Some(o) = orientation.filter(|o| (2..=8).contains(o)) {
        jpeg.set_exif(Some(minimal_exif(o)));
    }
    let mut out = Vec::new();
    jpeg.encoder().write_to(&mut out).ok()?;
    Some(Bytes::from(out))
}

fn strip_png(bytes: Bytes) -> Option<Bytes> {
    let mut png = Png::from_bytes(bytes).ok()?;
    const PRIVATE: [&[u8; 4]; 5] = [b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"];
    png.chunks_mut().retain(|c| !PRIVATE.contains(&&c.kind()));
    let mut out = Vec::new();
    png.encoder().write_to(&mut out).ok()?;
    Some(Bytes::from(out))
}

fn strip_webp(bytes: Bytes) -> Option<Bytes> {
    let mut webp = WebP::from_bytes(bytes).ok()?;
    webp.set_exif(None);
    webp.remove_chunks_by_id(img_parts::webp::CHUNK_XMP);
    // img-parts keeps the header's XMP flag when the chunk goes, and a decoder that holds the
    // flags to the chunks (image-webp) then refuses the file: every rendition of it failed.
    const XMP_FLAG: u8 = 0x04;
    let vp8x = webp.chunks_mut().iter_mut().find(|c| c.id() == img_parts::webp::CHUNK_VP8X);
    if let Some(img_parts::riff::RiffContent::Data(data)) = vp8x.map(|c| c.content_mut()) {
        if data.first().is_some_and(|flags| flags & XMP_FLAG != 0) {
            let mut cleared = data.to_vec();
            cleared[0] &= !XMP_FLAG;
            *data = Bytes::from(cleared);
        }
    }
    let mut out = Vec::new();
    webp.encoder().write_to(&mut out).ok()?;
    Some(Bytes::from(out))
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

    #[test]
    fn orientation_round_trips_through_the_minimal_block() {
        for o in 1..=8 {
            assert_eq!(orientation_of(&minimal_exif(o)), Some(o));
        }
        assert_eq!(orientation_of(b"Exif\0\0garbage"), None);
        assert_eq!(orientation_of(b""), None);
    }
}
