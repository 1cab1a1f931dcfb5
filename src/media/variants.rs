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
    /// The encoded rendition.
    pub bytes: Vec<u8>,
    /// Its type.
    pub content_type: &'static str,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
}

/// Renders `source` (the cached original's bytes) as `spec`.
pub fn render(
    source: &[u8],
    spec: &VariantConfig,
    max_pixels: u64,
) -> Result<Rendered, ProxyError> {
    let img = super::decode::still(source, max_pixels)?;
    if spec.mask {
        return badge(&img, spec);
    }
    let (tw, th) = target_size(img.width(), img.height(), spec);
    let transparent = img.color().has_alpha() && img.to_rgba8().pixels().any(|p| p.0[3] < 255);
    // JPEG has no alpha: a transparent picture asked for as JPEG is PNG instead.
    let format = match spec.format {
        VariantFormat::Jpeg if transparent => VariantFormat::Png,
        format => format,
    };
    let keep_alpha = transparent;
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
    let encoded = match format {
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
    Ok(Rendered { bytes, content_type: format.mime_type(), width: tw, height: th })
}

/// Misskey's badge (misskey-dev/media-proxy `src/index.ts`, done there with sharp): the
/// picture contained in the box on opaque black, its luminance stretched to the full range
/// (1st to 99th percentile), raised in contrast (`1.75 v − 96`) and multiplied by its alpha;
/// the result is every channel of a PNG, alpha included, so bright parts are opaque white and
/// the rest transparent. A mask with almost no information (entropy under 0.1 bit) is no
/// badge at all.
fn badge(img: &DynamicImage, spec: &VariantConfig) -> Result<Rendered, ProxyError> {
    let (bw, bh) = (spec.width.unwrap_or(96).max(1), spec.height.unwrap_or(96).max(1));
    let (w, h) = (img.width(), img.height());
    // `contain`: fitted inside the box, enlarged if need be, centred.
    let scale = (f64::from(bw) / f64::from(w)).min(f64::from(bh) / f64::from(h));
    let tw = ((f64::from(w) * scale).round() as u32).clamp(1, bw);
    let th = ((f64::from(h) * scale).round() as u32).clamp(1, bh);
    let src = DynamicImage::ImageRgba8(img.to_rgba8());
    let mut fitted = Image::new(tw, th, PixelType::U8x4);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&src, &mut fitted, &options)
        .map_err(|_| ProxyError::internal("resize failed"))?;
    let (left, top) = ((bw - tw) / 2, (bh - th) / 2);
    let mut luma = vec![0f32; (bw * bh) as usize];
    let mut alpha = vec![255u8; (bw * bh) as usize];
    for (i, px) in fitted.buffer().chunks_exact(4).enumerate() {
        let (x, y) = (i as u32 % tw + left, i as u32 / tw + top);
        let at = (y * bw + x) as usize;
        let [r, g, b] = [px[0], px[1], px[2]].map(f32::from);
        luma[at] = 0.2126 * r + 0.7152 * g + 0.0722 * b;
        alpha[at] = px[3];
    }
    let (low, high) = percentiles(&luma);
    let mut histogram = [0u32; 256];
    let mask: Vec<u8> = luma
        .iter()
        .zip(&alpha)
        .map(|(&v, &a)| {
            let v = if high > low { (v - low) * 255.0 / (high - low) } else { v };
            let v = (1.75 * v.clamp(0.0, 255.0) - 96.0).clamp(0.0, 255.0);
            let m = (v * f32::from(a) / 255.0).round() as u8;
            histogram[usize::from(m)] += 1;
            m
        })
        .collect();
    let n = mask.len() as f64;
    let entropy: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if entropy < 0.1 {
        return Err(ProxyError::NoRendition("the badge's mask is empty".into()));
    }
    // Grey and alpha, both the mask: what a browser draws as R = G = B = A = mask.
    let pixels: Vec<u8> = mask.iter().flat_map(|&m| [m, m]).collect();
    let mut bytes = Vec::new();
    use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Best, PngFilter::Adaptive)
        .write_image(&pixels, bw, bh, image::ExtendedColorType::La8)
        .map_err(|_| ProxyError::internal("encode failed"))?;
    Ok(Rendered { bytes, content_type: "image/png", width: bw, height: bh })
}

/// The 1st and 99th percentiles of `values` (0–255).
fn percentiles(values: &[f32]) -> (f32, f32) {
    let mut histogram = [0usize; 256];
    for &v in values {
        histogram[v.round().clamp(0.0, 255.0) as usize] += 1;
    }
    let at = |share: f64| {
        let wanted = (values.len() as f64 * share).ceil() as usize;
        let mut seen = 0;
        histogram
            .iter()
            .position(|&c| {
                seen += c;
                seen >= wanted.max(1)
            })
            .unwrap_or(255) as f32
    };
    (at(0.01), at(0.99))
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
        VariantConfig { width: w, height: h, format, ..VariantConfig::default() }
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
