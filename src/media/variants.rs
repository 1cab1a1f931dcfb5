//! Renditions of cached images: decode under limits, apply EXIF orientation, resize with
//! `fast_image_resize` (Lanczos3), encode as the preset says. Output carries no metadata: it
//! is re-encoded from pixels.
//!
//! Decoding hostile files is the dangerous part, so the size is read from the header first and
//! refused above `media.max_pixels` before any pixel is decoded, and the decoder runs with
//! `image::Limits` (dimensions and an allocation cap) as a second line. Here animations give
//! their first frame; presets that keep animation go through [`super::animation`] first.
//! Runs only inside a media worker (`media::worker`), under its limits.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageEncoder};

use crate::config::{VariantConfig, VariantFormat};
use crate::error::ProxyError;

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
    let img = super::decode::still(source, max_pixels)?;
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
