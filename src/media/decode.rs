//! Decoding a still picture (or an animation's first frame) from the bytes of a cached
//! original, whatever its format: JPEG, PNG/APNG, GIF, WebP, BMP, ICO and TIFF by the `image`
//! crate's own pure-Rust decoders, JPEG XL by `jxl-oxide` (pure Rust, built without its
//! thread pool: a worker may start no thread). Runs only inside a media worker.
//!
//! Every decoder is opened the same way: the header is read first and the picture refused
//! above `media.max_pixels` (or `MAX_DIMENSION` on a side) before any pixel is decoded, then
//! the decoder runs with `image::Limits` as a second line, and EXIF orientation is applied.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::error::ProxyError;

/// Largest single dimension ever decoded, whatever `max_pixels` allows.
pub(crate) const MAX_DIMENSION: u32 = 16_384;

/// Formats decoded here beyond what `image` guesses from the magic bytes.
fn is_jxl(bytes: &[u8]) -> bool {
    // A bare codestream, or the ISO BMFF container with its `JXL ` signature box.
    bytes.starts_with(&[0xff, 0x0a])
        || bytes.starts_with(&[0, 0, 0, 0x0c, b'J', b'X', b'L', b' ', 0x0d, 0x0a, 0x87, 0x0a])
}

/// Refuses a picture whose header declares more than the limits allow.
pub fn check_size(w: u32, h: u32, max_pixels: u64) -> Result<(), ProxyError> {
    if w == 0
        || h == 0
        || w > MAX_DIMENSION
        || h > MAX_DIMENSION
        || u64::from(w) * u64::from(h) > max_pixels
    {
        return Err(ProxyError::bad_image("image dimensions over the limit"));
    }
    Ok(())
}

/// The picture in `source` (its first frame), oriented as its EXIF says.
pub fn still(source: &[u8], max_pixels: u64) -> Result<DynamicImage, ProxyError> {
    if !looks_complete(source) {
        return Err(ProxyError::bad_image("truncated image"));
    }
    let mut decoder = open(source)?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, max_pixels)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA at 4 bytes a pixel (8 for 16-bit formats), plus headroom for the decoder's own
    // buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder.set_limits(limits).map_err(|_| ProxyError::bad_image("image over the limits"))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|_| ProxyError::bad_image("corrupt or truncated image"))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// A decoder for `source`, its header read.
fn open(source: &[u8]) -> Result<Box<dyn ImageDecoder + '_>, ProxyError> {
    let unreadable = |_| ProxyError::bad_image("unreadable header");
    if is_jxl(source) {
        let decoder = jxl_oxide::integration::JxlDecoder::new(Cursor::new(source));
        return Ok(Box::new(decoder.map_err(unreadable)?));
    }
    let reader = ImageReader::new(Cursor::new(source))
        .with_guessed_format()
        .map_err(|_| ProxyError::bad_image("unreadable"))?;
    let format = reader.format().ok_or(ProxyError::bad_image("unsupported image format"))?;
    // image's ICO decoder takes only RGBA PNG pictures: a favicon whose largest picture is a
    // PNG is decoded as the PNG it is, whatever its colours (grey, RGB, palette).
    if format == image::ImageFormat::Ico {
        if let Some(png) = ico_largest_png(source) {
            let decoder = image::codecs::png::PngDecoder::new(Cursor::new(png));
            return Ok(Box::new(decoder.map_err(unreadable)?));
        }
    }
    let decoder = reader.into_decoder().map_err(|_| ProxyError::bad_image("unsupported image"))?;
    Ok(Box::new(decoder))
}

/// The largest picture of an ICO file when it is PNG-encoded, found through the directory
/// (16-byte entries after a 6-byte header: width and height, 0 meaning 256, then the size and
/// offset of the picture).
fn ico_largest_png(ico: &[u8]) -> Option<&[u8]> {
    let count = usize::from(u16::from_le_bytes([*ico.get(4)?, *ico.get(5)?]));
    let entry = |i: usize| {
        let e = ico.get(6 + 16 * i..6 + 16 * (i + 1))?;
        let side = |b: u8| if b == 0 { 256 } else { u32::from(b) };
        let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as usize;
        let at = u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as usize;
        Some((side(e[0]) * side(e[1]), ico.get(at..at.checked_add(len)?)?))
    };
    let (_, largest) = (0..count).filter_map(entry).max_by_key(|(area, _)| *area)?;
    largest.starts_with(b"\x89PNG\r\n\x1a\n").then_some(largest)
}

/// Whether the file ends the way its format ends. Decoders happily render the top half of a cut
/// JPEG in grey; a rendition of a truncated file would be cached as if it were the picture.
fn looks_complete(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(1024)..];
    match image::guess_format(bytes) {
        Ok(image::ImageFormat::Jpeg) => tail.windows(2).any(|w| w == [0xff, 0xd9]),
        Ok(image::ImageFormat::Png) => tail.windows(4).any(|w| w == b"IEND"),
        Ok(image::ImageFormat::Gif) => tail.contains(&0x3b),
        Ok(image::ImageFormat::WebP) => bytes.get(4..8).is_some_and(|n| {
            let riff = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
            bytes.len() >= riff.saturating_add(8)
        }),
        Ok(image::ImageFormat::Bmp) => bytes.get(2..6).is_some_and(|n| {
            let size = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
            // Some writers leave the size 0; others must be believed.
            size == 0 || bytes.len() >= size
        }),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_over_the_limits_are_refused_before_decoding() {
        assert!(check_size(100, 100, 10_000).is_ok());
        assert!(check_size(100, 101, 10_000).is_err());
        assert!(check_size(0, 10, 10_000).is_err());
        assert!(check_size(MAX_DIMENSION + 1, 1, u64::MAX).is_err());
    }

    /// A favicon whose largest picture is a grey or RGB PNG (image's ICO decoder takes only
    /// RGBA ones) decodes as that PNG.
    #[test]
    fn ico_with_a_grey_or_rgb_png_inside_decodes() {
        let png = |img: image::DynamicImage| {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        };
        let small = png(image::DynamicImage::ImageLuma8(image::GrayImage::new(16, 16)));
        let grey = png(image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
            48,
            48,
            image::Luma([200]),
        )));
        let rgb = png(image::DynamicImage::ImageRgb8(image::RgbImage::new(32, 32)));
        for (big, side) in [(grey, 48u8), (rgb, 32)] {
            // Directory: the small entry first, the big one second.
            let mut ico = vec![0, 0, 1, 0, 2, 0];
            let first = 6 + 32;
            for (data, s, at) in [(&small, 16u8, first), (&big, side, first + small.len())] {
                ico.extend_from_slice(&[s, s, 0, 0, 1, 0, 32, 0]);
                ico.extend_from_slice(&(data.len() as u32).to_le_bytes());
                ico.extend_from_slice(&(at as u32).to_le_bytes());
            }
            ico.extend_from_slice(&small);
            ico.extend_from_slice(&big);
            assert!(image::load_from_memory(&ico).is_err(), "image alone refuses it");
            let img = still(&ico, 1 << 20).expect("decoded through its PNG");
            assert_eq!((img.width(), img.height()), (u32::from(side), u32::from(side)));
        }
        assert_eq!(ico_largest_png(b"\0\0\x01\0\xff\xff"), None, "a directory past the end");
    }

    #[test]
    fn jxl_is_recognised_in_both_forms() {
        assert!(is_jxl(&[0xff, 0x0a, 0xfa]));
        assert!(is_jxl(b"\0\0\0\x0cJXL \r\n\x87\n\0\0\0\x14ftypjxl "));
        assert!(!is_jxl(b"\xff\xd8\xff"));
    }
}
