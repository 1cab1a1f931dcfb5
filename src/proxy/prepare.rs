//! Media work of a fill and of a rendition, each a job for the media worker pool: an SVG is
//! drawn to a PNG, an original loses its metadata, a variant is rendered. The server only
//! moves bytes: it hands a worker the file (from memory, or streamed from its blob) and
//! receives the result like an origin body, sniffed again, since a worker that a hostile file
//! took over is trusted no more than the file.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::Received;
use crate::cache::ChunkSink;
use crate::cache::Entry;
use crate::cache::store::Store;
use crate::config::AnimationPolicy;
use crate::error::ProxyError;
use crate::media::worker::MediaPool;
use crate::media::worker::protocol::Task;
use crate::media::worker::{Input, Outcome};

/// Types whose renditions start from a picture an outside program makes: videos (ffmpeg),
/// AVIF and HEIC (heif-convert, or ffmpeg for AVIF), which no decoder of the worker's own
/// reads.
pub(crate) fn needs_frame(content_type: &str) -> bool {
    content_type.starts_with("video/") || matches!(content_type, "image/avif" | "image/heif")
}

/// SHA-256 and MD5 of a body about to be replaced by its prepared form: rules about the
/// origin's bytes (SHA-256 bans, hash lists) must still find the entry by them.
async fn origin_digests(input: &Input) -> std::io::Result<crate::moderation::Digests> {
    let mut digester = crate::moderation::Digester::default();
    match input {
        // Tens of milliseconds for a large photo: not on a thread that serves viewers.
        Input::Memory(bytes) => {
            let bytes = bytes.clone();
            return tokio::task::spawn_blocking(move || {
                digester.update(&bytes);
                digester.finish()
            })
            .await
            .map_err(std::io::Error::other);
        }
        Input::File { path, len } => {
            let mut file = tokio::fs::File::open(path).await?.take(*len);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                digester.update(&buf[..n]);
            }
        }
    }
    Ok(digester.finish())
}

/// The media work of fills and renditions, over the worker pool and the store's files.
pub struct Prepare {
    /// Every decode, render and strip runs here, in sandboxed worker processes.
    pub(super) media: MediaPool,
    /// Where results arrive (sinks) and whose files are inputs.
    store: Arc<Store>,
    /// `[media]`: limits, whether to strip, the animation budgets.
    config: crate::config::MediaConfig,
    /// `parasol_renders_total`.
    renders: prometheus_client::metrics::counter::Counter,
    /// `parasol_media_jobs_total{outcome="skipped"}`: strips no worker was asked for.
    skipped: prometheus_client::metrics::counter::Counter,
}

impl Prepare {
    pub fn new(
        media: MediaPool,
        store: Arc<Store>,
        config: crate::config::MediaConfig,
        metrics: &crate::telemetry::Metrics,
    ) -> Self {
        let skipped = crate::telemetry::OutcomeLabels { outcome: "skipped" };
        let skipped = metrics.media_jobs.get_or_create(&skipped).clone();
        Self { media, store, config, renders: metrics.renders.clone(), skipped }
    }

    /// The worker pool (its gauges, for the metrics page).
    pub fn pool(&self) -> &MediaPool {
        &self.media
    }

    /// Whether renditions of a file of `content_type` are pictures of it: the formats the
    /// media workers decode, and AVIF while there is ffmpeg.
    pub fn can_render(&self, content_type: &str) -> bool {
        crate::media::DECODED.contains(&content_type)
            || (content_type.starts_with("image/") && self.media.frame_tool(content_type).is_some())
    }

    /// What is stored is what may be served: an SVG becomes a PNG, metadata is stripped.
    /// When that changes the bytes, the result carries the origin's digests (`digests`).
    /// `host`: the source's, whose workers and share of the pool the jobs take.
    pub async fn prepare(&self, received: Received, host: &str) -> Result<Received, ProxyError> {
        let received = self.rasterize_svg(received, host).await?;
        self.strip_metadata(received, host).await
    }

    /// Replaces a received SVG (admitted only with `media.svg = "rasterize"`) by its PNG
    /// rendering; the SVG itself is never stored or served.
    async fn rasterize_svg(&self, mut r: Received, host: &str) -> Result<Received, ProxyError> {
        if r.content_type != crate::media::SVG {
            return Ok(r);
        }
        if r.len > crate::media::svg::MAX_SVG_BYTES {
            return Err(ProxyError::bad_image("SVG too large to render"));
        }
        let task = Task::Rasterize { max_pixels: self.config.max_pixels };
        self.renders.inc();
        let input = r.input().await.map_err(ProxyError::storage)?;
        let digests = match r.digests {
            Some(d) => d,
            None => origin_digests(&input).await.map_err(ProxyError::storage)?,
        };
        let png = self.run_job(&task, input, &r.hash, host, &["image/png"]).await?;
        let mut png = png.ok_or_else(|| ProxyError::internal("rasterising answered unchanged"))?;
        png.final_host = r.final_host.take();
        png.digests = Some(digests);
        Ok(png)
    }

    /// Replaces a received JPEG, PNG or WebP by a copy without metadata (`media.strip_metadata`),
    /// so the bytes stored, hashed and served (and their ETag) carry no GPS position. A worker
    /// finds where to cut; the cuts are made here, in this copy of the file.
    async fn strip_metadata(&self, mut r: Received, host: &str) -> Result<Received, ProxyError> {
        const LARGEST: u64 = 64 << 20;
        let strippable = matches!(r.content_type, "image/jpeg" | "image/png" | "image/webp");
        if !self.config.strip_metadata || !strippable || r.len > LARGEST {
            return Ok(r);
        }
        // In memory, a file none of whose bytes mark metadata needs no worker.
        if let crate::cache::received::Held::Memory(bytes, _) = &r.body {
            if !crate::media::strip::may_carry_metadata(bytes, r.content_type) {
                self.skipped.inc();
                return Ok(r);
            }
        }
        let input = r.input().await.map_err(ProxyError::storage)?;
        let plan = self.media.strip_plan(input.clone(), r.content_type, &r.hash, host).await?;
        let Some(cuts) = plan else { return Ok(r) };
        let mut stripped = self.cut(&input, &cuts, r.content_type, r.digests).await?;
        stripped.final_host = r.final_host.take();
        stripped.origin = r.origin.take();
        Ok(stripped)
    }

    /// A copy of `input` (of `content_type`) with `cuts` made, received like a worker's result
    /// (sniffed again), carrying the digests of `input` (`known`, or computed as it is read).
    async fn cut(
        &self,
        input: &Input,
        cuts: &crate::media::strip::Cuts,
        content_type: &'static str,
        known: Option<crate::moderation::Digests>,
    ) -> Result<Received, ProxyError> {
        let refused = |why: &str| {
            tracing::warn!(why, "media worker's cuts refused");
            ProxyError::bad_image("the worker's cuts do not fit the file")
        };
        let mut sink = self.store.sink();
        let digests = match input {
            Input::Memory(bytes) => {
                let stripped = cuts.apply(bytes, content_type).map_err(refused)?;
                sink.begin(stripped.len() as u64).await.map_err(ProxyError::storage)?;
                sink.push(&stripped).await.map_err(ProxyError::storage)?;
                match known {
                    Some(d) => d,
                    None => origin_digests(input).await.map_err(ProxyError::storage)?,
                }
            }
            Input::File { path, len } => {
                let digests = cut_file(path, *len, cuts, content_type, &mut sink).await?;
                known.unwrap_or(digests)
            }
        };
        if infer::get(sink.head()).map(|t| t.mime_type()) != Some(content_type) {
            return Err(ProxyError::bad_image("the stripped file is not of its type"));
        }
        let mut stripped = sink.finish(content_type);
        stripped.digests = Some(digests);
        Ok(stripped)
    }

    /// Renders the cached `original` (of the source `url`) as `spec` in a worker; `None` when
    /// the preset serves the original as it is.
    pub async fn render(
        &self,
        url: &str,
        original: &Entry,
        spec: &crate::config::VariantConfig,
    ) -> Result<Option<Received>, ProxyError> {
        // A video (its first frame) or an AVIF (ffmpeg's decoder) is first made a PNG, kept
        // (perhaps as a temp file) until the render has read it.
        let mut frame = match needs_frame(original.content_type.to_str().unwrap_or_default()) {
            true => Some(self.take_frame(original, &host_of_url(url)).await?),
            false => None,
        };
        let (input, content) = match frame.as_mut() {
            Some(frame) => (frame.input().await.map_err(ProxyError::storage)?, frame.hash),
            None => (self.store.input(original), original.hash),
        };
        let media = &self.config;
        let animation = crate::media::animation::AnimationLimits {
            max_frames: media.max_frames,
            max_pixels: media.max_animation_pixels,
        };
        let task = Task::Render {
            spec: spec.clone(),
            max_pixels: media.max_pixels,
            animation: (spec.animation == AnimationPolicy::Keep).then_some(animation),
        };
        self.renders.inc();
        // JPEG has no transparency: a picture with some comes back as PNG.
        let expect: &[&'static str] = match spec.format {
            crate::config::VariantFormat::Jpeg => &["image/jpeg", "image/png"],
            format => &[format.mime_type()],
        };
        let rendered = self.run_job(&task, input, &content, &host_of_url(url), expect).await?;
        drop(frame);
        // Unchanged: the preset serves this original as it is (an animation, for Akkoma).
        let Some(mut rendered) = rendered else { return Ok(None) };
        rendered.final_host = original.final_host.as_deref().map(str::to_string);
        Ok(Some(rendered))
    }

    /// The size, frames and blurhash of the cached `original` (of its first frame, for a
    /// video, AVIF or HEIC), measured in a worker.
    pub async fn measure(
        &self,
        original: &Entry,
        host: &str,
    ) -> Result<crate::media::details::Details, ProxyError> {
        let content_type = original.content_type.to_str().unwrap_or_default();
        let mut frame = match needs_frame(content_type) {
            true => Some(self.take_frame(original, host).await?),
            false => None,
        };
        let input = match frame.as_mut() {
            Some(frame) => frame.input().await.map_err(ProxyError::storage)?,
            None => self.store.input(original),
        };
        let content = frame.as_ref().map_or(original.hash, |f| f.hash);
        let media = &self.config;
        let task = Task::Details {
            max_pixels: media.max_pixels,
            animation: crate::media::animation::AnimationLimits {
                max_frames: media.max_frames,
                max_pixels: media.max_animation_pixels,
            },
        };
        // A few dozen bytes of JSON; anything longer is not an answer to this job.
        let mut answer = Bounded(Vec::new());
        match self.media.run(&task, input, Some(&content), host, &mut answer).await? {
            Outcome::Done { .. } => serde_json::from_slice(&answer.0)
                .map_err(|_| ProxyError::internal("media worker answered unreadable details")),
            Outcome::Unchanged => Err(ProxyError::internal("media worker answered unchanged")),
        }
    }

    /// The first picture of `original` (a video's first frame, an AVIF or HEIC decoded) as a
    /// PNG, by ffmpeg or heif-convert in the media sandbox. 415 where neither is there.
    async fn take_frame(&self, original: &Entry, host: &str) -> Result<Received, ProxyError> {
        let content_type = original.content_type.to_str().unwrap_or_default();
        let job = self.media.frame_tool(content_type).ok_or(ProxyError::UnsupportedType)?;
        let mut sink = self.store.sink();
        let (path, _temp) = self.store.tool_file(original).await?;
        self.media.run_tool(&job, &path, &original.hash, host, &mut sink).await?;
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
        host: &str,
        expect: &[&'static str],
    ) -> Result<Option<Received>, ProxyError> {
        let mut sink = self.store.sink();
        match self.media.run(task, input, Some(content), host, &mut sink).await? {
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

/// The host of a source URL (empty when it has none).
pub(crate) fn host_of_url(url: &str) -> String {
    let url = url::Url::parse(url).ok();
    url.as_ref().and_then(url::Url::host_str).unwrap_or_default().to_string()
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

/// The stripped copy of the file at `path` (`len` bytes of `content_type`) into `sink`, once
/// `cuts` are checked against it (a read at each segment); read once, start to end: the pieces
/// kept go to the sink, every byte to the digests, which are returned.
async fn cut_file(
    path: &std::path::Path,
    len: u64,
    cuts: &crate::media::strip::Cuts,
    content_type: &'static str,
    sink: &mut crate::cache::received::Sink,
) -> Result<crate::moderation::Digests, ProxyError> {
    use crate::media::strip::Piece;
    let refused = |why: &str| {
        tracing::warn!(why, "media worker's cuts refused");
        ProxyError::bad_image("the worker's cuts do not fit the file")
    };
    // The cuts are checked against the file first (a read at each segment).
    let (at, cuts_, len_) = (path.to_path_buf(), cuts.clone(), len);
    let verified = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(at)?;
        let mut read_at = |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at).is_ok();
        Ok::<_, std::io::Error>(cuts_.verify(content_type, len_, &mut read_at))
    });
    verified.await.map_err(ProxyError::internal)?.map_err(ProxyError::storage)?.map_err(refused)?;
    // Read once, start to end: the pieces kept go to the sink, every byte to the
    // digests.
    let mut file = tokio::fs::File::open(path).await.map_err(ProxyError::storage)?;
    let mut head = vec![0u8; 64.min(len as usize)];
    file.read_exact(&mut head).await.map_err(ProxyError::storage)?;
    let pieces = cuts.pieces(content_type, len, &head).map_err(refused)?;
    file.seek(std::io::SeekFrom::Start(0)).await.map_err(ProxyError::storage)?;
    let mut file = file.take(len);
    let out: u64 = pieces
        .iter()
        .map(|p| match p {
            Piece::Keep(s, e) => e - s,
            Piece::Put(b) => b.len() as u64,
        })
        .sum();
    sink.begin(out).await.map_err(ProxyError::storage)?;
    let mut digester = crate::moderation::Digester::default();
    let (mut buf, mut at) = (vec![0u8; 1 << 16], 0u64);
    for piece in &pieces {
        let (start, end) = match piece {
            Piece::Put(bytes) => {
                sink.push(bytes).await.map_err(ProxyError::storage)?;
                continue;
            }
            Piece::Keep(start, end) => (*start, *end),
        };
        // What lies before the piece (a cut) is read for the digests only.
        while at < end {
            let want = (end - at).min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want]).await.map_err(ProxyError::storage)?;
            if n == 0 {
                return Err(ProxyError::internal("a temp file shrank"));
            }
            digester.update(&buf[..n]);
            let (from, to) = (at, at + n as u64);
            if to > start {
                let skip = start.saturating_sub(from) as usize;
                sink.push(&buf[skip..n]).await.map_err(ProxyError::storage)?;
            }
            at = to;
        }
    }
    // The rest, read for the digests.
    loop {
        let n = file.read(&mut buf).await.map_err(ProxyError::storage)?;
        if n == 0 {
            break;
        }
        digester.update(&buf[..n]);
    }
    Ok(digester.finish())
}
