//! Media work of a fill and of a rendition, each a job for the media worker pool: an SVG is
//! drawn to a PNG, an original loses its metadata, a variant is rendered. The server only
//! moves bytes: it hands a worker the file (from memory, or streamed from its blob) and
//! receives the result like an origin body, sniffed again, since a worker that a hostile file
//! took over is trusted no more than the file.

use std::sync::Arc;

use super::{AsInput, Proxy, Received};
use crate::cache::{Entry, Key};
use crate::config::AnimationPolicy;
use crate::error::ProxyError;
use crate::media::worker::protocol::Task;
use crate::media::worker::{Input, Outcome};

/// Types whose renditions start from a picture an outside program makes: videos (ffmpeg),
/// AVIF and HEIC (heif-convert, or ffmpeg for AVIF), which no decoder of the worker's own
/// reads.
pub(crate) fn needs_frame(content_type: &str) -> bool {
    content_type.starts_with("video/") || matches!(content_type, "image/avif" | "image/heif")
}

impl Proxy {
    /// What is stored is what may be served: an SVG becomes a PNG, metadata is stripped.
    pub(super) async fn prepare(&self, received: Received) -> Result<Received, ProxyError> {
        let received = self.rasterize_svg(received).await?;
        self.strip_metadata(received).await
    }

    /// Replaces a received SVG (admitted only with `media.svg = "rasterize"`) by its PNG
    /// rendering; the SVG itself is never stored or served.
    async fn rasterize_svg(&self, mut r: Received) -> Result<Received, ProxyError> {
        if r.content_type != crate::media::SVG {
            return Ok(r);
        }
        if r.len > crate::media::svg::MAX_SVG_BYTES {
            return Err(ProxyError::bad_image("SVG too large to render"));
        }
        let task = Task::Rasterize { max_pixels: self.config.media.max_pixels };
        self.metrics.renders.inc();
        let input = r.input().await.map_err(ProxyError::storage)?;
        let png = self.run_job(&task, input, &r.hash, &["image/png"]).await?;
        let mut png = png.ok_or_else(|| ProxyError::internal("rasterising answered unchanged"))?;
        png.final_host = r.final_host.take();
        Ok(png)
    }

    /// Replaces a received JPEG, PNG or WebP by a copy without metadata (`media.strip_metadata`),
    /// so the bytes stored, hashed and served (and their ETag) carry no GPS position.
    async fn strip_metadata(&self, mut r: Received) -> Result<Received, ProxyError> {
        const LARGEST: u64 = 64 << 20;
        let strippable = matches!(r.content_type, "image/jpeg" | "image/png" | "image/webp");
        if !self.config.media.strip_metadata || !strippable || r.len > LARGEST {
            return Ok(r);
        }
        // In memory, a file none of whose bytes mark metadata needs no worker.
        if let crate::cache::received::Held::Memory(bytes, _) = &r.body {
            if !crate::media::strip::may_carry_metadata(bytes, r.content_type) {
                let skipped = crate::telemetry::OutcomeLabels { outcome: "skipped" };
                self.metrics.media_jobs.get_or_create(&skipped).inc();
                return Ok(r);
            }
        }
        let task = Task::Strip { content_type: r.content_type.into() };
        let input = r.input().await.map_err(ProxyError::storage)?;
        match self.run_job(&task, input, &r.hash, &[r.content_type]).await? {
            Some(mut stripped) => {
                stripped.final_host = r.final_host.take();
                Ok(stripped)
            }
            None => Ok(r),
        }
    }

    /// Renders the cached `original` as `spec` in a worker and stores the result under `key`;
    /// `None` when the preset serves the original as it is.
    pub(super) async fn render_and_store(
        &self,
        key: Key,
        url: &str,
        original: &Entry,
        spec: &crate::config::VariantConfig,
    ) -> Result<Option<Arc<Entry>>, ProxyError> {
        // A video (its first frame) or an AVIF (ffmpeg's decoder) is first made a PNG, kept
        // (perhaps as a temp file) until the render has read it.
        let mut frame = match needs_frame(original.content_type.to_str().unwrap_or_default()) {
            true => Some(self.take_frame(original).await?),
            false => None,
        };
        let (input, content) = match (frame.as_mut(), &original.body) {
            (Some(frame), _) => (frame.input().await.map_err(ProxyError::storage)?, frame.hash),
            (None, Some(bytes)) => (Input::Memory(bytes.clone()), original.hash),
            (None, None) => {
                let path = self.store.blob_path(&original.hash);
                (Input::File { path, len: original.len }, original.hash)
            }
        };
        let media = &self.config.media;
        let animation = crate::media::animation::AnimationLimits {
            max_frames: media.max_frames,
            max_pixels: media.max_animation_pixels,
        };
        let task = Task::Render {
            spec: spec.clone(),
            max_pixels: media.max_pixels,
            animation: (spec.animation == AnimationPolicy::Keep).then_some(animation),
        };
        self.metrics.renders.inc();
        // JPEG has no transparency: a picture with some comes back as PNG.
        let expect: &[&'static str] = match spec.format {
            crate::config::VariantFormat::Jpeg => &["image/jpeg", "image/png"],
            format => &[format.mime_type()],
        };
        let rendered = self.run_job(&task, input, &content, expect).await?;
        drop(frame);
        // Unchanged: the preset serves this original as it is (an animation, for Akkoma).
        let Some(mut rendered) = rendered else { return Ok(None) };
        rendered.final_host = original.final_host.as_deref().map(str::to_string);
        self.store.insert(key, url, rendered).await.map(Some)
    }

    /// The size, frames and blurhash of the cached `original` (of its first frame, for a
    /// video, AVIF or HEIC), measured in a worker.
    pub async fn measure(
        &self,
        original: &Entry,
    ) -> Result<crate::media::details::Details, ProxyError> {
        let content_type = original.content_type.to_str().unwrap_or_default();
        let mut frame = match needs_frame(content_type) {
            true => Some(self.take_frame(original).await?),
            false => None,
        };
        let input = match (frame.as_mut(), &original.body) {
            (Some(frame), _) => frame.input().await.map_err(ProxyError::storage)?,
            (None, Some(bytes)) => Input::Memory(bytes.clone()),
            (None, None) => {
                Input::File { path: self.store.blob_path(&original.hash), len: original.len }
            }
        };
        let content = frame.as_ref().map_or(original.hash, |f| f.hash);
        let media = &self.config.media;
        let task = Task::Details {
            max_pixels: media.max_pixels,
            animation: crate::media::animation::AnimationLimits {
                max_frames: media.max_frames,
                max_pixels: media.max_animation_pixels,
            },
        };
        // A few dozen bytes of JSON; anything longer is not an answer to this job.
        let mut answer = Bounded(Vec::new());
        match self.media.run(&task, input, Some(&content), &mut answer).await? {
            Outcome::Done { .. } => serde_json::from_slice(&answer.0)
                .map_err(|_| ProxyError::internal("media worker answered unreadable details")),
            Outcome::Unchanged => Err(ProxyError::internal("media worker answered unchanged")),
        }
    }

    /// The first picture of `original` (a video's first frame, an AVIF or HEIC decoded) as a
    /// PNG, by ffmpeg or heif-convert in the media sandbox. 415 where neither is there.
    async fn take_frame(&self, original: &Entry) -> Result<Received, ProxyError> {
        let content_type = original.content_type.to_str().unwrap_or_default();
        let job = self.media.frame_tool(content_type).ok_or(ProxyError::UnsupportedType)?;
        let mut sink = self.store.sink();
        let path = self.store.blob_path(&original.hash);
        self.media.run_tool(&job, &path, &original.hash, &mut sink).await?;
        if infer::get(sink.head()).map(|t| t.mime_type()) != Some("image/png") {
            return Err(ProxyError::bad_image("no picture came of it"));
        }
        Ok(sink.finish("image/png"))
    }

    /// Runs `task` on `input` (the file hashing to `content`) and receives the result, which
    /// must sniff as `expect`. `None`: the worker found nothing to change.
    async fn run_job(
        &self,
        task: &Task,
        input: Input,
        content: &blake3::Hash,
        expect: &[&'static str],
    ) -> Result<Option<Received>, ProxyError> {
        let mut sink = self.store.sink();
        match self.media.run(task, input, Some(content), &mut sink).await? {
            Outcome::Unchanged => Ok(None),
            Outcome::Done { .. } => {
                let sniffed = infer::get(sink.head()).map(|t| t.mime_type());
                let Some(sniffed) = sniffed.filter(|t| expect.contains(t)) else {
                    tracing::warn!(
                        task = task.name(),
                        ?sniffed,
                        ?expect,
                        "media worker result refused"
                    );
                    return Err(ProxyError::bad_image("the result is not of the type asked for"));
                };
                Ok(Some(sink.finish(sniffed)))
            }
        }
    }
}

/// A sink for a small answer: more than 4 KiB is refused.
struct Bounded(Vec<u8>);

impl crate::cache::ChunkSink for Bounded {
    async fn begin(&mut self, len: u64) -> std::io::Result<()> {
        match len <= 4096 {
            true => Ok(()),
            false => Err(std::io::Error::other("answer too long")),
        }
    }

    async fn push(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        if self.0.len() + chunk.len() > 4096 {
            return Err(std::io::Error::other("answer too long"));
        }
        self.0.extend_from_slice(chunk);
        Ok(())
    }
}
