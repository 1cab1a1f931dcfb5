//! Animated renditions: an animated GIF, APNG or WebP rendered for a preset that keeps
//! animation (`animated = true`: `avatar` and `emoji` by default, as Misskey's own proxy does)
//! comes out as an animated WebP, each frame fitted to the preset. Runs only inside a media
//! worker.
//!
//! Bounded twice, before and while decoding: the canvas is checked against `media.max_pixels`
//! from the header, and frames are decoded one at a time (only the resized ones are kept) up
//! to `media.max_frames` and `media.max_animation_pixels` (canvas pixels summed over frames).
//! A file past either budget gets its first frame, like the `static` preset.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{AnimationDecoder, ImageDecoder};
use serde::{Deserialize, Serialize};

use super::decode::check_size;
use super::variants::{Rendered, target_size};
use crate::config::{AnimationPolicy, VariantConfig, VariantFormat};
use crate::error::ProxyError;

/// How much animation a render may decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnimationLimits {
    /// Frames decoded at most; a longer animation gets its first frame.
    pub max_frames: u32,
    /// Canvas pixels summed over the frames decoded.
    pub max_pixels: u64,
}

/// Browsers show frames asking for less than this for 100 ms; so do these renditions.
const SHORTEST_FRAME_MS: u32 = 20;

/// A frame shows for at most a minute: timestamps stay far inside libwebp's `i32`.
const LONGEST_FRAME_MS: u32 = 60_000;

/// The animated rendition of `source` as `spec`, or `None` when there is none to make (a
/// still file, a preset without animation, a file over the budgets): the caller renders
/// the first frame instead.
pub fn render_animated(
    source: &[u8],
    spec: &VariantConfig,
    max_pixels: u64,
    limits: &AnimationLimits,
) -> Result<Option<Rendered>, ProxyError> {
    if spec.animation != AnimationPolicy::Keep
        || spec.mask
        || spec.format != VariantFormat::Webp
        || limits.max_frames < 2
    {
        return Ok(None);
    }
    let Some((w, h, frames)) = frames_of(source)? else { return Ok(None) };
    check_size(w, h, max_pixels)?;
    let canvas = u64::from(w) * u64::from(h);
    let (tw, th) = target_size(w, h, spec);
    let mut resizer = Resizer::new();
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    let (mut out, mut at_ms, mut decoded) = (Vec::new(), 0u32, 0u64);
    for frame in frames {
        let frame = frame.map_err(|_| ProxyError::bad_image("corrupt animation frame"))?;
        decoded += canvas;
        // The frames kept (and libwebp's copy of each) are what a long animation costs in
        // memory: bounded by media.max_pixels of output, as one still picture is.
        let kept = u64::from(tw) * u64::from(th) * (out.len() as u64 + 1);
        if out.len() as u32 >= limits.max_frames || decoded > limits.max_pixels || kept > max_pixels
        {
            return Ok(None);
        }
        let (numer, denom) = frame.delay().numer_denom_ms();
        let delay = numer / denom.max(1);
        let delay = if delay < SHORTEST_FRAME_MS { 100 } else { delay.min(LONGEST_FRAME_MS) };
        let buffer = frame.into_buffer();
        if buffer.dimensions() != (w, h) {
            return Err(ProxyError::bad_image("animation frame of another size"));
        }
        let src = Image::from_vec_u8(w, h, buffer.into_raw(), PixelType::U8x4)
            .map_err(|_| ProxyError::internal("frame buffer"))?;
        let mut dst = Image::new(tw, th, PixelType::U8x4);
        resizer
            .resize(&src, &mut dst, &options)
            .map_err(|_| ProxyError::internal("resize failed"))?;
        out.push((dst.into_vec(), at_ms));
        at_ms = at_ms.saturating_add(delay);
    }
    if out.len() < 2 {
        return Ok(None);
    }
    let mut config = webp::WebPConfig::new().map_err(|_| ProxyError::internal("WebP config"))?;
    config.quality = f32::from(spec.quality);
    config.lossless = i32::from(spec.lossless);
    let mut encoder = webp::AnimEncoder::new(tw, th, &config);
    encoder.set_loop_count(0);
    for (pixels, ms) in &out {
        encoder.add_frame(webp::AnimFrame::from_rgba(pixels, tw, th, *ms as i32));
    }
    let bytes = encoder.try_encode().map_err(|_| ProxyError::internal("animated WebP encoding"))?;
    Ok(Some(Rendered { bytes: bytes.to_vec(), content_type: "image/webp", width: tw, height: th }))
}

/// Whether `source` is an animation (a GIF, APNG or WebP with a second frame), within
/// `max_pixels` a frame (a larger one is not decoded to find out).
pub fn is_animated(source: &[u8], max_pixels: u64) -> bool {
    match frames_of(source) {
        Ok(Some((w, h, mut frames))) if check_size(w, h, max_pixels).is_ok() => {
            frames.nth(1).is_some_and(|f| f.is_ok())
        }
        _ => false,
    }
}

/// The number of frames of an animated GIF, APNG or WebP, when it has more than one and is
/// within the limits (frames are decoded to be counted, one at a time); `None` otherwise.
pub fn frame_count(source: &[u8], max_pixels: u64, limits: &AnimationLimits) -> Option<u32> {
    let (w, h, frames) = frames_of(source).ok()??;
    check_size(w, h, max_pixels).ok()?;
    let canvas = u64::from(w) * u64::from(h);
    let mut count = 0u32;
    for frame in frames {
        frame.ok()?;
        count += 1;
        if count > limits.max_frames || u64::from(count) * canvas > limits.max_pixels {
            return None;
        }
    }
    (count > 1).then_some(count)
}

type Frames<'a> = image::Frames<'a>;

/// The canvas size and frames of an animated GIF, APNG or WebP; `None` for a still file.
fn frames_of(source: &[u8]) -> Result<Option<(u32, u32, Frames<'_>)>, ProxyError> {
    let unreadable = |_| ProxyError::bad_image("unreadable animation");
    match image::guess_format(source) {
        Ok(image::ImageFormat::Gif) => {
            let decoder =
                image::codecs::gif::GifDecoder::new(Cursor::new(source)).map_err(unreadable)?;
            let (w, h) = decoder.dimensions();
            Ok(Some((w, h, decoder.into_frames())))
        }
        Ok(image::ImageFormat::Png) => {
            let decoder =
                image::codecs::png::PngDecoder::new(Cursor::new(source)).map_err(unreadable)?;
            if !decoder.is_apng().map_err(unreadable)? {
                return Ok(None);
            }
            let (w, h) = decoder.dimensions();
            Ok(Some((w, h, decoder.apng().map_err(unreadable)?.into_frames())))
        }
        Ok(image::ImageFormat::WebP) => {
            let decoder =
                image::codecs::webp::WebPDecoder::new(Cursor::new(source)).map_err(unreadable)?;
            if !decoder.has_animation() {
                return Ok(None);
            }
            let (w, h) = decoder.dimensions();
            Ok(Some((w, h, decoder.into_frames())))
        }
        _ => Ok(None),
    }
}
