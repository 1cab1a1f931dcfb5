//! Renditions of cached images: decode under limits, apply EXIF orientation, resize with
//! `fast_image_resize` (Lanczos3), encode as the preset says. Output carries no metadata: it
//! is re-encoded from pixels.
//!
//! Decoding hostile files is the dangerous part, so the size is read from the header first and
//! refused above `media.max_pixels` before any pixel is decoded, and the decoder runs with
//! `image::Limits` (dimensions and an allocation cap) as a second line. Here animations give
//! their first frame; presets that keep animation go through [`super::animation`] first.
//! Runs only inside a media worker (`media::worker`), under its limits.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader};

use crate::config::{VariantConfig, VariantFormat};
use crate::error::ProxyError;

/// Largest single dimension ever decoded, whatever `max_pixels` allows.
pub(crate) const MAX_DIMENSION: u32 = 16_384;

/// A rendered variant.
#[derive(Debug)]
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Renders `source` (the cached original's bytes) as `spec`.
pub fn render(
    source: &[u8],
    spec: &VariantConfig,
    max_pixels: u64,
) -> Result<Rendered, ProxyError> {
    if !looks_complete(source) {
        return Err(ProxyError::bad_image("truncated image"));
    }
    let probe = ImageReader::new(Cursor::new(source))
        .with_guessed_format()
        .map_err(|_| ProxyError::bad_image("unreadable"))?;
    let (w, h) = probe.into_dimensions().map_err(|_| ProxyError::bad_image("unreadable header"))?;
    if w == 0
        || h == 0
        || w > MAX_DIMENSION
        || h > MAX_DIMENSION
        || u64::from(w) * u64::from(h) > max_pixels
    {
        return Err(ProxyError::bad_image("image dimensions over the limit"));
    }
    let mut reader = ImageReader::new(Cursor::new(source))
        .with_guessed_format()
        .map_err(|_| ProxyError::bad_image("unreadable"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // RGBA at 4 bytes a pixel, plus headroom for the decoder's own buffers.
    limits.max_alloc = Some(max_pixels.saturating_mul(4).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder =
        reader.into_decoder().map_err(|_| ProxyError::bad_image("unsupported image"))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|_| ProxyError::bad_image("corrupt or truncated image"))?;
    img.apply_orientation(orientation);

    let (tw, th) = target_size(img.width(), img.height(), spec);
    let keep_alpha = img.color().has_alpha() && spec.format != VariantFormat::Jpeg;
    let src = if keep_alpha {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };
    let pixel = if keep_alpha { PixelType::U8x4 } else { PixelType::U8x3 };
    let mut dst = Image::new(tw, th, pixel);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|_| ProxyError::internal("resize failed"))?;

    let color =
        if keep_alpha { image::ExtendedColorType::Rgba8 } else { image::ExtendedColorType::Rgb8 };
    let mut bytes = Vec::new();
    let encoded = match spec.format {
        VariantFormat::Png => {
            image::codecs::png::PngEncoder::new(&mut bytes).write_image(dst.buffer(), tw, th, color)
        }
        VariantFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, spec.quality)
                .write_image(dst.buffer(), tw, th, color)
        }
        VariantFormat::Webp if spec.lossless => image::codecs::webp::WebPEncoder::new_lossless(
            &mut bytes,
        )
        .write_image(dst.buffer(), tw, th, color),
        // Lossy, at the preset's quality, by libwebp (the encoder the field uses; built from
        // source by libwebp-sys, and run only here, inside a media worker).
        VariantFormat::Webp => {
            let encoder = if keep_alpha {
                webp::Encoder::from_rgba(dst.buffer(), tw, th)
            } else {
                webp::Encoder::from_rgb(dst.buffer(), tw, th)
            };
            bytes = encoder.encode(f32::from(spec.quality)).to_vec();
            Ok(())
        }
    };
    encoded.map_err(|_| ProxyError::internal("encode failed"))?;
    let content_type = spec.format.mime_type();
    Ok(Rendered { bytes, content_type, width: tw, height: th })
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
        _ => true,
    }
}

/// Fits `w` × `h` within the preset's box, keeping the aspect ratio and never enlarging.
pub fn target_size(w: u32, h: u32, spec: &VariantConfig) -> (u32, u32) {
    let sx = spec.width.map_or(f64::INFINITY, |bw| f64::from(bw) / f64::from(w));
    let sy = spec.height.map_or(f64::INFINITY, |bh| f64::from(bh) / f64::from(h));
    let scale = sx.min(sy).min(1.0);
    let dim = |d: u32| ((f64::from(d) * scale).round() as u32).max(1);
    (dim(w), dim(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(w: Option<u32>, h: Option<u32>, format: &str) -> VariantConfig {
        let format = serde_json::from_value(serde_json::json!(format)).unwrap();
        VariantConfig { width: w, height: h, format, quality: 80, lossless: false, animated: false }
    }

    #[test]
    fn fitting_keeps_aspect_and_never_enlarges() {
        assert_eq!(target_size(4000, 3000, &spec(Some(320), Some(320), "webp")), (320, 240));
        assert_eq!(target_size(3000, 4000, &spec(Some(320), Some(320), "webp")), (240, 320));
        assert_eq!(target_size(1000, 500, &spec(None, Some(128), "webp")), (256, 128));
        assert_eq!(target_size(50, 40, &spec(Some(320), Some(320), "webp")), (50, 40));
        assert_eq!(target_size(10_000, 1, &spec(Some(96), Some(96), "png")), (96, 1));
    }
}
