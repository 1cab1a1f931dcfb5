//! `[media]` and `[variants]`: what may be served, the media workers, and the renditions.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// `[media]`: what may be served.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// MIME patterns (`image/*` or exact) of sniffed types that may be served. SVG, HTML and
    /// script types are refused whatever this says.
    pub allowed_types: Vec<String>,
    /// Largest image (width × height) that will ever be decoded.
    pub max_pixels: u64,
    /// Remove EXIF (GPS included), XMP, IPTC and text chunks from JPEG, PNG and WebP originals
    /// before they are stored, without re-encoding; the orientation is kept.
    pub strip_metadata: bool,
    /// SVG is never served as-is: `rasterize` draws it to PNG (no script, no network, no
    /// files), `refuse` answers 415.
    pub svg: SvgPolicy,
    /// Media worker processes (every decode, render and strip runs in one); default: one per
    /// core.
    pub workers: u32,
    /// Media jobs that may wait for a worker; beyond it a job is refused with 503 `media_busy`.
    pub queue: u32,
    /// The part of the workers (running) and of the workers and queue together (running and
    /// waiting) that the files of one origin (a registrable domain, an IPv4 /24, an IPv6 /56)
    /// may hold, so that one remote server's files cannot take the pool from everyone else.
    pub origin_share: f64,
    /// Longest time a media job waits for a worker; past it, 503 `media_busy`.
    pub queue_wait: Dur,
    /// Address-space limit of each worker, enforced by the kernel. A job that needs more
    /// kills its worker and answers 422 `media_too_costly`.
    pub worker_memory: Size,
    /// CPU time one job may use; past it the kernel stops the worker (422
    /// `media_too_costly`). On the wall clock a job may take as long as it makes progress: one
    /// that gets no CPU at all for a while, or takes twenty times this, was starved (503
    /// `media_busy`, not blamed on the file).
    pub job_timeout: Dur,
    /// CPU time of rasterising one SVG (at most `job_timeout`): a picture of a few hundred
    /// bytes needs far less than a 50-megapixel photo.
    pub svg_timeout: Dur,
    /// Jobs a worker runs before it is replaced by a fresh process.
    pub worker_jobs: u32,
    /// Bytes that fills and media results may hold in memory at once; past it, bodies go to
    /// temp files on disk as they arrive.
    pub inflight_bytes: Size,
    /// Most frames an animated rendition decodes; a longer animation gets its first frame.
    pub max_frames: u32,
    /// Canvas pixels an animated rendition may decode, summed over its frames.
    pub max_animation_pixels: u64,
    /// The ffmpeg program (a path, or a name looked up on `PATH`) that takes a frame of a
    /// video (posters) or decodes AVIF, run inside the media sandbox; `""`: never. Missing,
    /// those renditions answer 415 and the log says so once at start.
    pub ffmpeg: String,
    /// libheif's `heif-convert` (Debian: libheif-examples), which decodes HEIC/HEIF and AVIF
    /// (tiled and transparent ones too) in the same sandbox; `""`: never. Missing, HEIC
    /// renditions answer 415 and AVIF falls back to ffmpeg.
    pub heif_convert: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            allowed_types: vec!["image/*".into(), "video/*".into(), "audio/*".into()],
            max_pixels: 40_000_000,
            strip_metadata: true,
            svg: SvgPolicy::Rasterize,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            queue: 128,
            origin_share: 0.5,
            queue_wait: Dur(Duration::from_secs(10)),
            worker_memory: Size(512 << 20),
            job_timeout: Dur(Duration::from_secs(10)),
            svg_timeout: Dur(Duration::from_secs(2)),
            worker_jobs: 250,
            inflight_bytes: Size(256 << 20),
            max_frames: 300,
            max_animation_pixels: 250_000_000,
            ffmpeg: "ffmpeg".into(),
            heif_convert: "heif-convert".into(),
        }
    }
}

/// One `[variants.NAME]` preset: fit the image within `width` × `height` (either may be
/// omitted), never enlarging, and encode it as `format`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VariantConfig {
    /// Largest width of the rendition (never enlarged).
    pub width: Option<u32>,
    /// Largest height of the rendition (never enlarged).
    pub height: Option<u32>,
    /// The encoding. A picture with transparency asked for as JPEG (which has none) comes out
    /// as PNG instead, rather than with its transparent parts painted black.
    pub format: VariantFormat,
    /// WebP and JPEG quality, 1–100.
    pub quality: u8,
    /// WebP without loss (pixels exact, files several times larger); off: lossy at `quality`.
    pub lossless: bool,
    /// What becomes of an animated GIF, APNG or WebP.
    pub animation: AnimationPolicy,
    /// Misskey's badge: a `width` × `height` monochrome alpha mask of the picture (bright
    /// parts opaque white, dark and transparent parts transparent), as PNG; a picture whose
    /// mask would be (nearly) empty has none (404).
    pub mask: bool,
    /// Originals smaller than this are served as they are instead of a rendition (Akkoma's
    /// `min_content_length`); 0: always render.
    pub originals_below: Size,
}

impl Default for VariantConfig {
    fn default() -> Self {
        Self {
            width: None,
            height: None,
            format: VariantFormat::Webp,
            quality: 80,
            lossless: false,
            animation: AnimationPolicy::Still,
            mask: false,
            originals_below: Size(0),
        }
    }
}

/// What a preset makes of an animation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnimationPolicy {
    /// The first frame.
    Still,
    /// Animated WebP, every frame fitted, within `media.max_frames` and
    /// `media.max_animation_pixels` (past them: the first frame).
    Keep,
    /// The original file itself (Akkoma's preview of a GIF).
    Original,
}

/// What becomes of an SVG document (`media.svg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvgPolicy {
    /// Drawn to a PNG in a media worker; the PNG is stored and served.
    Rasterize,
    /// 415, like any type not allowed.
    Refuse,
}

/// The encoding of a rendition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VariantFormat {
    /// WebP (lossy, or lossless with `lossless`).
    Webp,
    /// PNG.
    Png,
    /// JPEG (a picture with transparency comes back as PNG).
    Jpeg,
}

impl VariantFormat {
    /// The MIME type it is served as.
    pub fn mime_type(self) -> &'static str {
        match self {
            VariantFormat::Webp => "image/webp",
            VariantFormat::Png => "image/png",
            VariantFormat::Jpeg => "image/jpeg",
        }
    }

    /// The file extension (and the name in the config).
    pub fn as_str(self) -> &'static str {
        match self {
            VariantFormat::Webp => "webp",
            VariantFormat::Png => "png",
            VariantFormat::Jpeg => "jpeg",
        }
    }
}

/// The presets Misskey's `mediaProxy` asks for (misskey-dev/media-proxy `src/index.ts`):
/// `avatar` and `emoji` are a height (320, 128), never enlarged, animated as the original is;
/// `avatar_static` and `emoji_static` their first frame (Misskey's `&static=1` beside them);
/// `static` fits 498 × 422 and `preview` 200 × 200, both still; `badge` is the 96 × 96 mask;
/// `thumbnail` a video's poster within 498 × 280 (`videoThumbnailGenerator`). WebP at
/// quality 77, Misskey's own. And `akkoma`, Akkoma's `/proxy/preview/` defaults: 600 × 600,
/// JPEG at 85, GIFs and originals under 100 KiB served as they are.
pub fn default_variants() -> std::collections::BTreeMap<String, VariantConfig> {
    use AnimationPolicy::{Keep, Original, Still};
    use VariantFormat::{Jpeg, Png, Webp};
    let v = |w: Option<u32>, h: Option<u32>, format, animation| VariantConfig {
        width: w,
        height: h,
        format,
        animation,
        quality: 77,
        ..VariantConfig::default()
    };
    [
        ("avatar", v(None, Some(320), Webp, Keep)),
        ("avatar_static", v(None, Some(320), Webp, Still)),
        ("emoji", v(None, Some(128), Webp, Keep)),
        ("emoji_static", v(None, Some(128), Webp, Still)),
        ("static", v(Some(498), Some(422), Webp, Still)),
        ("preview", v(Some(200), Some(200), Webp, Still)),
        ("badge", VariantConfig { mask: true, ..v(Some(96), Some(96), Png, Still) }),
        ("thumbnail", v(Some(498), Some(280), Webp, Still)),
        (
            "akkoma",
            VariantConfig {
                quality: 85,
                originals_below: Size(100 << 10),
                ..v(Some(600), Some(600), Jpeg, Original)
            },
        ),
    ]
    .into_iter()
    .map(|(name, spec)| (name.to_string(), spec))
    .collect()
}

impl MediaConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !(1..=256).contains(&self.workers) {
            return bad("media.workers", "must be 1-256");
        }
        if self.worker_memory.0 < 64 << 20 {
            return bad("media.worker_memory", "must be at least 64 MiB");
        }
        if !(self.origin_share > 0.0 && self.origin_share <= 1.0) {
            return bad("media.origin_share", "must be above 0 and at most 1");
        }
        if self.queue_wait.0 < Duration::from_millis(10) {
            return bad("media.queue_wait", "must be at least 10 ms");
        }
        if self.svg_timeout.0 < Duration::from_millis(100) {
            return bad("media.svg_timeout", "must be at least 100 ms");
        }
        if self.job_timeout.0 < Duration::from_millis(100) || self.worker_jobs == 0 {
            return bad("media", "job_timeout must be at least 100 ms, worker_jobs above 0");
        }
        if self.inflight_bytes.0 < 1 << 20 {
            return bad("media.inflight_bytes", "must be at least 1 MiB");
        }
        if let Some(pattern) = self.allowed_types.iter().find(|p| !p.contains('/')) {
            return bad("media.allowed_types", format!("{pattern:?} is not a MIME pattern"));
        }
        Ok(())
    }
}

/// Each `[variants.NAME]`: a name that fits in a URL, a size, a quality.
pub(super) fn check_variants(
    variants: &std::collections::BTreeMap<String, VariantConfig>,
) -> Result<(), ConfigError> {
    for (name, v) in variants {
        let key = format!("variants.{name}");
        let name_ok = !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return bad(&key, "names are 1-32 letters, digits, '-' or '_'");
        }
        let dim_ok = |d: Option<u32>| d.is_none_or(|d| (1..=8192).contains(&d));
        if (v.width.is_none() && v.height.is_none()) || !dim_ok(v.width) || !dim_ok(v.height) {
            return bad(&key, "needs width and/or height, each 1-8192");
        }
        if !(1..=100).contains(&v.quality) {
            return bad(&format!("{key}.quality"), "must be 1-100");
        }
    }
    Ok(())
}
