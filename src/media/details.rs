//! What a picture is, for the pict-rs API's `details`: its size, how many frames it has, and
//! a blurhash (the few bytes a client paints while the picture loads). Runs only inside a
//! media worker, like every decode.

use fast_image_resize::images::Image;
use fast_image_resize::{PixelType, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

use super::animation::AnimationLimits;
use crate::error::ProxyError;

/// Longest side of the copy the blurhash is computed from: a blurhash keeps only a few
/// cosine components, so more pixels change nothing but the time.
const HASH_SIDE: u32 = 64;

/// Components of the blurhash across and down (4×3, as most Fediverse software makes them).
const COMPONENTS: (u32, u32) = (4, 3);

/// What Lemmy's `details` asks of a picture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Frames of an animation; `None` for a still picture.
    pub frames: Option<u32>,
    /// A 4×3 blurhash of it.
    pub blurhash: String,
}

/// Measures the picture in `source` (a decoded video frame or HEIC arrives here as a PNG).
pub fn measure(
    source: &[u8],
    max_pixels: u64,
    animation: &AnimationLimits,
) -> Result<Details, ProxyError> {
    let picture = super::decode::still(source, max_pixels)?;
    let (width, height) = (picture.width(), picture.height());
    let scale = f64::from(HASH_SIDE) / f64::from(width.max(height));
    let (tw, th) = if scale < 1.0 {
        let side = |d: u32| ((f64::from(d) * scale).round() as u32).max(1);
        (side(width), side(height))
    } else {
        (width, height)
    };
    let rgba = picture.into_rgba8().into_raw();
    let src = Image::from_vec_u8(width, height, rgba, PixelType::U8x4)
        .map_err(|_| ProxyError::internal("picture buffer"))?;
    let mut small = Image::new(tw, th, PixelType::U8x4);
    Resizer::new()
        .resize(&src, &mut small, &ResizeOptions::new())
        .map_err(|_| ProxyError::internal("resize failed"))?;
    let blurhash = blurhash::encode(COMPONENTS.0, COMPONENTS.1, tw, th, small.buffer())
        .map_err(|e| ProxyError::internal(format!("blurhash: {e}")))?;
    let frames = super::animation::frame_count(source, max_pixels, animation);
    Ok(Details { width, height, frames, blurhash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, pixel: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
        let img = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(pixel(x, y)));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    const LIMITS: AnimationLimits = AnimationLimits { max_frames: 100, max_pixels: 1 << 30 };

    #[test]
    fn size_and_a_blurhash_that_follows_the_picture() {
        let left_red =
            png(300, 200, |x, _| if x < 150 { [255, 0, 0, 255] } else { [0, 0, 255, 255] });
        let d = measure(&left_red, 1 << 24, &LIMITS).unwrap();
        assert_eq!((d.width, d.height, d.frames), (300, 200, None));
        // 4x3 components: one size byte, one max byte, 4 bytes DC, 2 bytes per AC component.
        assert_eq!(d.blurhash.len(), 4 + 2 + 2 * (4 * 3 - 1));
        let top_red =
            png(300, 200, |_, y| if y < 100 { [255, 0, 0, 255] } else { [0, 0, 255, 255] });
        let other = measure(&top_red, 1 << 24, &LIMITS).unwrap();
        assert_ne!(d.blurhash, other.blurhash, "another picture, another hash");
        assert_eq!(
            d,
            measure(&left_red, 1 << 24, &LIMITS).unwrap(),
            "the same picture, the same hash"
        );
    }

    #[test]
    fn over_the_pixel_limit_is_refused() {
        let big = png(500, 500, |_, _| [0, 0, 0, 255]);
        assert!(matches!(measure(&big, 1000, &LIMITS), Err(ProxyError::BadImage(_))));
    }
}
