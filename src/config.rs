//! Configuration: a TOML file, then `PARASOL__SECTION__KEY` environment overrides, then
//! validation, giving one [`Config`] the rest of the crate trusts.
//!
//! Every key is optional and every default works on a fresh machine. Unknown keys are an error
//! (a typo such as `disk_byte` must not silently fall back to a default), and every error names
//! the key it is about, as `cache.disk_bytes`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// The file read when `--config` is not given, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/parasol.toml";

/// Prefix of environment overrides: `PARASOL__CACHE__DISK_BYTES=20GiB` sets `cache.disk_bytes`.
const ENV_PREFIX: &str = "PARASOL__";

/// The whole configuration, one struct per TOML section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub signing: SigningConfig,
    pub cache: CacheConfig,
    pub fetch: FetchConfig,
    pub policy: PolicyConfig,
    pub media: MediaConfig,
    /// Server-defined renditions by name; the five Misskey-compatible presets are always
    /// there unless redefined.
    pub variants: std::collections::BTreeMap<String, VariantConfig>,
    pub compat: CompatConfig,
    pub audit: AuditConfig,
    pub shared: SharedConfig,
    pub moderation: ModerationConfig,
    /// `[[upstream]]`: path prefixes served from one fixed origin (an instance's own bucket).
    pub upstream: Vec<UpstreamConfig>,
}

/// One `[[upstream]]`: requests on `server.listen` whose path starts with `prefix` (and, when
/// `host` is set, whose `Host` is `host`) are files of one fixed origin: `origin`, a plain
/// http(s) base URL, or the S3 bucket in `s3` (private buckets: requests are signed). What
/// follows the prefix is the object's path below the origin; the query is not passed on.
/// Fetched through the same guard as any source (a bucket on a private network needs
/// `fetch.allow_networks`), cached and served like everything else.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Starts and ends with `/`; `/` takes every path the built-in routes do not.
    pub prefix: String,
    /// Only requests for this host name (the `Host` header, port ignored). Empty: any host;
    /// then the built-in routes (`/m/`, `/proxy/`, ...) are matched first.
    pub host: String,
    /// Base URL the rest of the path is appended to, e.g. `https://files.example.social/`.
    pub origin: String,
    /// Or an S3-compatible bucket, read with credentials.
    pub s3: Option<UpstreamS3>,
}

impl UpstreamConfig {
    /// Checks the entry's settings (at load).
    pub fn check(&self) -> Result<(), String> {
        let u = self;
        if !u.prefix.starts_with('/') || !u.prefix.ends_with('/') {
            return Err(format!("prefix {:?} must start and end with '/'", u.prefix));
        }
        if u.prefix.contains("//") || u.prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(format!("prefix {:?} has an empty, '.' or '..' segment", u.prefix));
        }
        if !u.host.is_empty() && normalize_domain(&u.host).is_none() {
            return Err(format!("host {:?} is not a host name", u.host));
        }
        match (&u.s3, u.origin.is_empty()) {
            (Some(_), false) => Err("set origin or s3, not both".into()),
            (None, true) => Err("needs origin (a URL) or s3 (a bucket)".into()),
            (None, false) => {
                let url = Url::parse(&u.origin)
                    .map_err(|_| format!("origin {:?} is not a URL", u.origin))?;
                let ok = matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.username().is_empty()
                    && url.password().is_none()
                    && url.query().is_none();
                match ok {
                    true => Ok(()),
                    false => Err(format!(
                        "origin {:?} must be an http(s) URL without credentials or query",
                        u.origin
                    )),
                }
            }
            (Some(s3), true) => {
                let ok = Url::parse(&s3.endpoint)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
                if !ok {
                    return Err(format!("s3.endpoint {:?} is not an http(s) URL", s3.endpoint));
                }
                if s3.bucket.is_empty()
                    || s3.access_key_id.is_empty()
                    || s3.secret_access_key.is_empty()
                {
                    return Err("s3 needs bucket, access_key_id and secret_access_key".into());
                }
                Ok(())
            }
        }
    }
}

/// An S3-compatible bucket an `[[upstream]]` reads with signed requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamS3 {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    #[serde(serialize_with = "redact_str")]
    pub secret_access_key: String,
    /// Prepended to the path to name the object, e.g. `mastodon/` when the files sit there.
    pub key_prefix: String,
    /// `bucket.host` addressing instead of `host/bucket`.
    pub virtual_hosted_style: bool,
}

/// `[moderation]`: bans are made through the admin API; these are the automatic rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    /// Files of SHA-256 or MD5 hex digests, one per line (`#` comments): a file whose bytes
    /// match is refused (451 `banned`) and purged. Re-read on SIGHUP and `/admin/reload`.
    pub hash_lists: Vec<PathBuf>,
    /// Each new original image or video is POSTed here before it is first served; a non-2xx
    /// answer refuses it and bans its content. Empty: off.
    pub scanner_url: String,
    /// When the scanner cannot be asked (down, timed out): `open` serves the file unscanned
    /// (and asks again next time), `closed` refuses it for now (503).
    pub scanner_fail: ScannerFail,
    pub scanner_timeout: Dur,
    /// Scans in flight at once; more wait their turn (within `scanner_timeout`).
    pub scanner_concurrency: u32,
    /// How often bans are synchronised through the shared bucket (`[shared]`), when set.
    pub sync_interval: Dur,
    /// JSON lines of every moderation decision; default `<cache.dir>/moderation.jsonl`.
    pub log: Option<PathBuf>,
    /// Compute SHA-256 and MD5 of every fill's origin bytes and keep them in the index, not
    /// only while a list or a SHA-256 ban exists, so that a list loaded later also finds
    /// cached files whose metadata was stripped. Costs both digests on every miss.
    pub keep_digests: bool,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        Self {
            hash_lists: Vec::new(),
            scanner_url: String::new(),
            scanner_fail: ScannerFail::Closed,
            scanner_timeout: Dur(Duration::from_secs(10)),
            scanner_concurrency: 4,
            sync_interval: Dur(Duration::from_secs(30)),
            log: None,
            keep_digests: false,
        }
    }
}

/// What a file gets while the scanner cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScannerFail {
    Open,
    Closed,
}

/// `[server]`: where parasol listens and how it names itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Viewer-facing listener. Loopback by default: a TLS-terminating nginx sits in front.
    pub listen: SocketAddr,
    /// Health, readiness and metrics, plus the bearer-protected `/admin/*` API. Kept on its own
    /// port so that it is never exposed by accident together with the media routes.
    pub admin_listen: SocketAddr,
    /// The URL prefix viewers reach parasol at; `parasol sign` builds URLs under it.
    pub public_base_url: Url,
    /// Bearer token for `/admin/*` writes; empty means admin writes are refused.
    #[serde(serialize_with = "redact_str")]
    pub admin_token: String,
    /// Longest time a viewer may take to send its request headers (slowloris guard).
    pub header_timeout: Dur,
    /// How long SIGTERM waits for in-flight responses before closing them.
    pub shutdown_grace: Dur,
    /// Longest time a response may make no progress because the viewer stopped reading; the
    /// connection is then closed. A slow reader that keeps reading is never cut.
    pub send_timeout: Dur,
    /// Open viewer connections at most; a connection beyond this gets a 503 and is closed.
    pub max_connections: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            public_base_url: Url::parse("http://127.0.0.1:8080/").expect("static URL parses"),
            admin_token: String::new(),
            header_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(20)),
            send_timeout: Dur(Duration::from_secs(60)),
            max_connections: 4096,
        }
    }
}

/// `[signing]`: HMAC keys for native `/m/` URLs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigningConfig {
    /// The first key signs, every key verifies, so a key can be rotated without breaking URLs
    /// already handed out. Empty: a key is generated once and kept in `<cache.dir>/signing.key`.
    #[serde(serialize_with = "redact_list")]
    pub keys: Vec<String>,
}

/// `[cache]`: the memory and disk tiers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Holds the blob store, the index, the generated signing key and (by default) the audit log.
    pub dir: PathBuf,
    /// Budget of the in-memory tier, weighed in body bytes.
    pub memory_bytes: Size,
    /// Objects larger than this are served from disk and never enter memory, so one video cannot
    /// push out thousands of avatars.
    pub memory_max_object_bytes: Size,
    /// Budget of the disk tier.
    pub disk_bytes: Size,
    /// Larger origin bodies are refused with 413 (checked on Content-Length and while streaming).
    pub max_object_bytes: Size,
    /// Entries nobody asked for in this long may be dropped.
    pub retention: Dur,
    /// How long a failed fetch is remembered, so a dead origin is not hammered by every viewer.
    pub negative_ttl: Dur,
    /// fsync each blob above `memory_max_object_bytes` before it is renamed into place (smaller
    /// ones are re-hashed on every load, so a torn one is refetched, never served). Off trades
    /// crash safety for fill speed: after a power cut a large blob may hold wrong bytes.
    pub fsync: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("cache"),
            memory_bytes: Size(256 << 20),
            memory_max_object_bytes: Size(8 << 20),
            disk_bytes: Size(10 << 30),
            max_object_bytes: Size(100 << 20),
            retention: Dur(Duration::from_secs(30 * 86_400)),
            negative_ttl: Dur(Duration::from_secs(30)),
            fsync: true,
        }
    }
}

/// `[fetch]`: how parasol talks to origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// The one User-Agent every origin sees; never the viewer's.
    pub user_agent: String,
    pub connect_timeout: Dur,
    /// Total deadline of one origin fetch, headers and body: the only guard against an origin
    /// that drips a byte at a time.
    pub timeout: Dur,
    /// Deadline for an origin's response headers, per request (redirect hops included).
    pub header_timeout: Dur,
    pub max_redirects: u32,
    /// CIDRs exempt from the private-address block (exact networks, e.g. `127.0.0.2/32`).
    pub allow_networks: Vec<IpNet>,
    /// Fills from one origin host at once; more wait their turn (within `fetch.timeout`), so a
    /// burst of viewers cannot turn parasol into a flood against one origin.
    pub max_per_origin: u32,
    /// Fills in progress across all origins; beyond this a new fill is refused with 503.
    pub max_fills: u32,
    /// Follow an `https` source's redirect to plain `http`. Off: such a downgrade is refused
    /// (502 `insecure_redirect`).
    pub allow_insecure_redirects: bool,
    /// PEM file of further certificate authorities trusted for origins, besides the usual
    /// web roots (a private CA's origin, or a test's).
    pub ca_file: Option<PathBuf>,
    /// The only ports dialled, except on `allow_networks` addresses (any port there).
    pub ports: Vec<u16>,
    /// Longest wait for a name lookup, answer or not.
    pub dns_timeout: Dur,
    /// Nameservers to ask (`ip:port`); empty: those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            user_agent: concat!("parasol/", env!("CARGO_PKG_VERSION"), " (media proxy)").into(),
            connect_timeout: Dur(Duration::from_secs(5)),
            timeout: Dur(Duration::from_secs(30)),
            header_timeout: Dur(Duration::from_secs(10)),
            max_redirects: 5,
            allow_networks: Vec::new(),
            max_per_origin: 8,
            max_fills: 256,
            allow_insecure_redirects: false,
            ca_file: None,
            ports: vec![80, 443],
            dns_timeout: Dur(Duration::from_secs(5)),
            nameservers: Vec::new(),
        }
    }
}

/// `[policy]`: which origin domains may be fetched at all, and how URLs become cache keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Suffix match on label boundaries: `threads.net` blocks `www.threads.net`.
    pub blocked_domains: Vec<String>,
    /// When non-empty, only these domains (and their subdomains) are fetched.
    pub allowed_domains: Vec<String>,
    /// `[[policy.normalize]]`: URLs that differ only in what a rule ignores share one cache
    /// entry (and one fetch). The default holds Meta's CDNs; a configured list replaces it.
    pub normalize: Vec<NormalizeConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { blocked_domains: Vec::new(), allowed_domains: Vec::new(), normalize: meta_cdns() }
    }
}

/// One cache-key rule: for hosts under `host_suffix`, the query parameters named in
/// `ignore_params` (exact names, or prefixes ending in `*`) are not part of the key, and with
/// `merge_hosts` neither is which host under the suffix served it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    pub host_suffix: String,
    #[serde(default)]
    pub ignore_params: Vec<String>,
    #[serde(default)]
    pub merge_hosts: bool,
    /// A query parameter holding the URL's expiry (Unix time, hex): of the URLs seen for one
    /// entry, a fill uses the one that expires last, so a viewer holding an expired URL
    /// still gets the file once a newer URL has been seen.
    #[serde(default)]
    pub expiry_param: Option<String>,
}

/// Meta's CDNs (Threads, Instagram, Facebook media): every re-federation of a post brings the
/// same file under a new signature (`oh`), expiry (`oe`), routing and session hints (`_nc_*`,
/// `ccb`, `edm`, `ig_cache_key`) and often another edge host (`scontent-…`). `stp`, which
/// picks the rendition, stays part of the key.
pub fn meta_cdns() -> Vec<NormalizeConfig> {
    let ignore: Vec<String> = ["oh", "oe", "_nc_*", "ccb", "edm", "ig_cache_key"]
        .into_iter()
        .map(str::to_string)
        .collect();
    ["cdninstagram.com", "fbcdn.net"]
        .into_iter()
        .map(|suffix| NormalizeConfig {
            host_suffix: suffix.into(),
            ignore_params: ignore.clone(),
            merge_hosts: true,
            expiry_param: Some("oe".into()),
        })
        .collect()
}

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
    pub width: Option<u32>,
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
    Webp,
    Png,
    Jpeg,
}

impl VariantFormat {
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

/// `[compat]`: the URL schemes of other media proxies, each off until configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompatConfig {
    /// GitHub camo / go-camo key: enables `/camo/…`.
    #[serde(serialize_with = "redact_str")]
    pub camo_key: String,
    /// Akkoma/Pleroma `media_proxy` secret (the instance's `secret_key_base`): enables
    /// `/proxy/<sig>/<url>/<filename>`.
    #[serde(serialize_with = "redact_str")]
    pub akkoma_secret: String,
    /// The variant `/proxy/preview/…` serves.
    pub akkoma_preview_variant: String,
    /// Token for Akkoma's cache invalidation: `PURGE` of an Akkoma URL on the public port,
    /// with `Authorization: Bearer <token>`, drops the file and its renditions. Empty: off
    /// (405).
    #[serde(serialize_with = "redact_str")]
    pub purge_token: String,
    /// Misskey's unsigned `/proxy/<name>.webp?url=…`.
    pub misskey: bool,
    /// Origin fills per source origin (a registrable domain, an IPv4 /24, an IPv6 /56) per
    /// minute through the unsigned Misskey route; beyond it, 503 (cached objects are still
    /// served).
    pub misskey_fills_per_minute: u32,
    /// Address of the pict-rs API for Lemmy (`/image/original?proxy=`, `/image/process.<ext>`,
    /// `/image/details/original`): unsigned, so an internal address only Lemmy (or the nginx
    /// in front of pict-rs) reaches, never the public one. Unset: off. An address that is not
    /// loopback or private (`0.0.0.0` included) is refused unless `pictrs_secret` is set.
    pub pictrs_listen: Option<SocketAddr>,
    /// Largest `thumbnail=N` the pict-rs API renders; larger asks are fitted to it.
    pub pictrs_max_thumbnail: u32,
    /// When set, every request on the pict-rs listener must carry it as
    /// `X-Parasol-Secret` (the nginx in front of pict-rs adds it); others get 403. At least
    /// 32 bytes.
    #[serde(serialize_with = "redact_str")]
    pub pictrs_secret: String,
    /// Origin fills per source origin per minute through the pict-rs API (Lemmy fetches every
    /// image of a post as it arrives); beyond it, 503.
    pub pictrs_fills_per_minute: u32,
    /// Origin fills per minute through the unsigned routes (Misskey, pict-rs) all together,
    /// whatever their origins: many origins cannot add up to more.
    pub unsigned_fills_per_minute: u32,
}

impl Default for CompatConfig {
    fn default() -> Self {
        Self {
            camo_key: String::new(),
            akkoma_secret: String::new(),
            akkoma_preview_variant: "akkoma".into(),
            purge_token: String::new(),
            misskey: false,
            misskey_fills_per_minute: 120,
            pictrs_listen: None,
            pictrs_max_thumbnail: 2048,
            pictrs_secret: String::new(),
            pictrs_fills_per_minute: 600,
            unsigned_fills_per_minute: 1200,
        }
    }
}

/// `[shared]`: an S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW, R2) that several
/// parasol nodes share. Off until `endpoint` is set. Blobs keep their blake3 names there, so any
/// node can serve what another fetched: a node that lost its disk refills from the bucket, not
/// from the origin. The bucket is the operator's own storage, so it is not subject to
/// `fetch.allow_networks` and its requests are not in the outbound audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedConfig {
    /// `http(s)://host:port` of the S3 API; empty turns the shared tier off.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    #[serde(serialize_with = "redact_str")]
    pub secret_access_key: String,
    /// Prefix of every object name, so one bucket can hold other things too.
    pub prefix: String,
    /// Longest wait for one request to the bucket; beyond it parasol goes on without it.
    pub timeout: Dur,
    /// `bucket.host` addressing instead of `host/bucket` (AWS needs it for new buckets).
    pub virtual_hosted_style: bool,
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            prefix: "parasol/".into(),
            timeout: Dur(Duration::from_secs(5)),
            virtual_hosted_style: false,
        }
    }
}

/// `[audit]`: the outbound request log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON lines file; default `<cache.dir>/outbound.jsonl`.
    pub path: Option<PathBuf>,
    /// The log is rotated (`.1`, `.2`, …) when it grows past this, so it cannot fill the disk.
    pub max_bytes: Size,
    /// Rotated files kept besides the current one; older ones are deleted.
    pub keep: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { path: None, max_bytes: Size(100 << 20), keep: 5 }
    }
}

/// A configuration problem, always naming the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl Config {
    /// Loads `path`, or `config/parasol.toml` when present, or the built-in defaults; then
    /// applies `PARASOL__*` overrides from the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => (p.display().to_string(), read(p)?),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                (DEFAULT_CONFIG_PATH.to_string(), read(Path::new(DEFAULT_CONFIG_PATH))?)
            }
            None => ("(built-in defaults)".to_string(), String::new()),
        };
        Self::from_sources(&name, &text, std::env::vars())
    }

    /// Parses TOML `text` (named `name` in errors), overlays `env` pairs whose names start with
    /// `PARASOL__`, and validates. Tests call this directly with their own environment.
    pub fn from_sources(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| syntax_error(name, text, &e))?;
        // Overrides whose text was read as a TOML number, boolean or array: if the key turns
        // out to want a string (`PARASOL__SERVER__ADMIN_TOKEN=123456`), the raw text is used.
        let mut typed = Vec::new();
        for (var, value) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                if let Some(key) = overlay(&mut table, &var, rest, &value)? {
                    typed.push((key, value));
                }
            }
        }
        loop {
            let error = match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
                Ok(config) => {
                    let mut config: Config = config;
                    for (name, spec) in default_variants() {
                        config.variants.entry(name).or_insert(spec);
                    }
                    config.validate()?;
                    return Ok(config);
                }
                Err(e) => e,
            };
            let key = error.path().to_string();
            match typed.iter().position(|((section, k), _)| key == format!("{section}.{k}")) {
                Some(i) => {
                    let ((section, k), value) = typed.swap_remove(i);
                    if let Some(toml::Value::Table(t)) = table.get_mut(&section) {
                        t.insert(k, toml::Value::String(value));
                    }
                }
                None => {
                    // A secret's value is never echoed, not even the wrong one.
                    let message = match is_secret(&key) {
                        true if key.starts_with("signing.keys") => {
                            "must be a list of strings (value not shown)"
                        }
                        true => "must be a string (value not shown)",
                        false => {
                            return Err(ConfigError::Key {
                                key,
                                message: error.into_inner().to_string(),
                            });
                        }
                    };
                    return Err(ConfigError::Key { key, message: message.into() });
                }
            }
        }
    }

    /// Cross-field and value checks the types alone cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| Err(ConfigError::Key { key: key.into(), message });
        for (i, key) in self.signing.keys.iter().enumerate() {
            if key.len() < 32 {
                return bad(&format!("signing.keys[{i}]"), "a key needs at least 32 bytes".into());
            }
        }
        // A short secret can be guessed: an admin token or a camo key lets anyone purge or
        // make parasol fetch what they like. Empty means off.
        for (key, secret) in [
            ("server.admin_token", &self.server.admin_token),
            ("compat.camo_key", &self.compat.camo_key),
            ("compat.akkoma_secret", &self.compat.akkoma_secret),
            ("compat.purge_token", &self.compat.purge_token),
            ("compat.pictrs_secret", &self.compat.pictrs_secret),
        ] {
            if !secret.is_empty() && secret.len() < 32 {
                return bad(key, "needs at least 32 bytes (or empty, for off)".into());
            }
        }
        if !matches!(self.server.public_base_url.scheme(), "http" | "https") {
            return bad("server.public_base_url", "must be an http or https URL".into());
        }
        if self.server.send_timeout.0.is_zero() || self.server.header_timeout.0.is_zero() {
            return bad("server", "header_timeout and send_timeout must be above zero".into());
        }
        if self.cache.memory_bytes.0 == 0 || self.cache.max_object_bytes.0 == 0 {
            return bad("cache", "memory_bytes and max_object_bytes must be above zero".into());
        }
        if self.fetch.user_agent.is_empty()
            || http::HeaderValue::from_str(&self.fetch.user_agent).is_err()
        {
            return bad("fetch.user_agent", "must be a non-empty header value".into());
        }
        for (key, list) in [
            ("policy.blocked_domains", &self.policy.blocked_domains),
            ("policy.allowed_domains", &self.policy.allowed_domains),
        ] {
            if let Some(d) = list.iter().find(|d| normalize_domain(d).is_none()) {
                return bad(key, format!("{d:?} is not a domain name"));
            }
        }
        for (name, v) in &self.variants {
            let key = format!("variants.{name}");
            let name_ok = !name.is_empty()
                && name.len() <= 32
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return bad(&key, "names are 1-32 letters, digits, '-' or '_'".into());
            }
            let dim_ok = |d: Option<u32>| d.is_none_or(|d| (1..=8192).contains(&d));
            if (v.width.is_none() && v.height.is_none()) || !dim_ok(v.width) || !dim_ok(v.height) {
                return bad(&key, "needs width and/or height, each 1-8192".into());
            }
            if !(1..=100).contains(&v.quality) {
                return bad(&format!("{key}.quality"), "must be 1-100".into());
            }
        }
        if !self.compat.akkoma_secret.is_empty()
            && !self.variants.contains_key(&self.compat.akkoma_preview_variant)
        {
            let v = &self.compat.akkoma_preview_variant;
            return bad(
                "compat.akkoma_preview_variant",
                format!("{v:?} is not a configured variant"),
            );
        }
        if !self.shared.endpoint.is_empty() {
            let ok = Url::parse(&self.shared.endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return bad(
                    "shared.endpoint",
                    format!("{:?} is not an http(s) URL", self.shared.endpoint),
                );
            }
            if self.shared.bucket.is_empty() {
                return bad("shared.bucket", "must be set when shared.endpoint is".into());
            }
            if self.shared.timeout.0.is_zero() {
                return bad("shared.timeout", "must be above zero".into());
            }
        }
        if self.compat.pictrs_listen.is_some()
            && !(16..=8192).contains(&self.compat.pictrs_max_thumbnail)
        {
            return bad("compat.pictrs_max_thumbnail", "must be 16-8192".into());
        }
        // Unsigned: anyone who reaches it makes parasol fetch. Never on a public address
        // without a secret only the nginx in front knows.
        if let Some(addr) = self.compat.pictrs_listen {
            if !internal_address(addr.ip()) && self.compat.pictrs_secret.is_empty() {
                return bad(
                    "compat.pictrs_listen",
                    format!(
                        "{addr} is not a loopback or private address: the pict-rs API is \
                         unsigned; listen on an internal address or set compat.pictrs_secret"
                    ),
                );
            }
        }
        let compat = &self.compat;
        if compat.misskey_fills_per_minute == 0
            || compat.pictrs_fills_per_minute == 0
            || compat.unsigned_fills_per_minute == 0
        {
            return bad(
                "compat",
                "misskey_fills_per_minute, pictrs_fills_per_minute and \
                 unsigned_fills_per_minute must be above zero"
                    .into(),
            );
        }
        for (i, u) in self.upstream.iter().enumerate() {
            let key = format!("upstream[{i}]");
            if let Err(message) = u.check() {
                return bad(&key, message);
            }
        }
        if self.fetch.dns_timeout.0 < Duration::from_millis(10) {
            return bad("fetch.dns_timeout", "must be at least 10 ms".into());
        }
        if self.fetch.nameservers.iter().any(|a| a.port() != self.fetch.nameservers[0].port()) {
            return bad("fetch.nameservers", "all on one port".into());
        }
        if self.fetch.ports.is_empty() || self.fetch.ports.contains(&0) {
            return bad("fetch.ports", "needs at least one port, each 1-65535".into());
        }
        let m = &self.moderation;
        if !m.scanner_url.is_empty()
            && !Url::parse(&m.scanner_url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            return bad(
                "moderation.scanner_url",
                format!("{:?} is not an http(s) URL", m.scanner_url),
            );
        }
        if m.scanner_concurrency == 0
            || m.scanner_timeout.0.is_zero()
            || m.sync_interval.0.is_zero()
        {
            return bad(
                "moderation",
                "scanner_concurrency, scanner_timeout and sync_interval must be above zero".into(),
            );
        }
        let media = &self.media;
        if !(1..=256).contains(&media.workers) {
            return bad("media.workers", "must be 1-256".into());
        }
        if media.worker_memory.0 < 64 << 20 {
            return bad("media.worker_memory", "must be at least 64 MiB".into());
        }
        if !(media.origin_share > 0.0 && media.origin_share <= 1.0) {
            return bad("media.origin_share", "must be above 0 and at most 1".into());
        }
        if media.queue_wait.0 < Duration::from_millis(10) {
            return bad("media.queue_wait", "must be at least 10 ms".into());
        }
        if media.svg_timeout.0 < Duration::from_millis(100) {
            return bad("media.svg_timeout", "must be at least 100 ms".into());
        }
        if media.job_timeout.0 < Duration::from_millis(100) || media.worker_jobs == 0 {
            return bad("media", "job_timeout must be at least 100 ms, worker_jobs above 0".into());
        }
        if media.inflight_bytes.0 < 1 << 20 {
            return bad("media.inflight_bytes", "must be at least 1 MiB".into());
        }
        for pattern in &self.media.allowed_types {
            if !pattern.contains('/') {
                return bad("media.allowed_types", format!("{pattern:?} is not a MIME pattern"));
            }
        }
        Ok(())
    }

    /// Where the moderation log is written.
    pub fn moderation_log_path(&self) -> PathBuf {
        self.moderation.log.clone().unwrap_or_else(|| self.cache.dir.join("moderation.jsonl"))
    }

    /// Where the outbound audit log is written.
    pub fn audit_path(&self) -> PathBuf {
        self.audit.path.clone().unwrap_or_else(|| self.cache.dir.join("outbound.jsonl"))
    }

    /// The effective configuration as TOML, with every secret replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

/// Keys whose values are secrets: redacted in `check-config`, never quoted in an error.
/// `[[upstream]]` keys are numbered: [`is_secret`] matches them by their end.
const SECRETS: &[&str] = &[
    "server.admin_token",
    "signing.keys",
    "compat.camo_key",
    "compat.akkoma_secret",
    "compat.purge_token",
    "compat.pictrs_secret",
    "shared.secret_access_key",
    "upstream[*].s3.secret_access_key",
];

/// Whether the value at `key` (as serde names it: `upstream[0].s3.secret_access_key`) is a
/// secret.
fn is_secret(key: &str) -> bool {
    SECRETS.iter().any(|s| match s.split_once("[*]") {
        Some((list, rest)) => key
            .strip_prefix(list)
            .and_then(|k| k.strip_prefix('['))
            .and_then(|k| k.split_once(']'))
            .is_some_and(|(n, k)| n.bytes().all(|b| b.is_ascii_digit()) && k.starts_with(rest)),
        None => key.starts_with(s),
    })
}

/// Loopback, private (RFC 1918, unique local), link-local or CGNAT: reachable only from
/// inside. `0.0.0.0` and `::` (every interface) are not.
fn internal_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10)
                    .is_ok_and(|cgnat| cgnat.contains(&v4))
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some_and(|v4| internal_address(v4.into()))
        }
    }
}

/// A TOML syntax error by line and column and what was expected, without the line itself:
/// the line may hold a secret.
fn syntax_error(name: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    let what = e.message().lines().next().unwrap_or("syntax error").trim();
    ConfigError::Syntax {
        path: name.to_string(),
        message: format!("line {line}, column {column}: {what}"),
    }
}

/// Sets `section.key` in `table` from one environment variable. The value is read as a TOML
/// value when it is one (`true`, `5`, `["127.0.0.2/32"]`) and as a string otherwise (`20GiB`).
/// Returns the `(section, key)` when the value was read as a non-string TOML value.
fn overlay(
    table: &mut toml::Table,
    var: &str,
    rest: &str,
    value: &str,
) -> Result<Option<(String, String)>, ConfigError> {
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let [section, key] = path.as_slice() else {
        return Err(ConfigError::Key {
            key: var.into(),
            message: "environment overrides take the form PARASOL__SECTION__KEY".into(),
        });
    };
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let section_table =
        table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let was_typed = !parsed.is_str();
    match section_table {
        toml::Value::Table(t) => {
            t.insert(key.clone(), parsed);
            Ok(was_typed.then(|| (section.clone(), key.clone())))
        }
        _ => Err(ConfigError::Key { key: section.clone(), message: "is not a section".into() }),
    }
}

/// A byte count: an integer, or a string such as `256MiB`, `20 GiB`, `1.5GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A duration: a string such as `500ms`, `30s`, `5m`, `2h`, `30d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(Size(n)),
            NumOrText::Text(s) => s
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Size(b.as_u64()))
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a size ({e})"))),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match units.iter().find(|(n, _)| self.0 >= *n && self.0 % n == 0) {
            Some((n, unit)) => write!(f, "{}{unit}", self.0 / n),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

fn redact_str<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { "<redacted>" })
}

fn redact_list<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    let redacted: Vec<&str> = v.iter().map(|_| "<redacted>").collect();
    redacted.serialize(s)
}

/// Lowercases and checks a configured domain; `None` when it is not a plausible domain name.
pub fn normalize_domain(d: &str) -> Option<String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!d.is_empty() && d.len() <= 253 && d.split('.').all(label_ok)).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::from_sources("none", "", env(&[])).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.cache.memory_bytes, Size(256 << 20));
        assert!(c.signing.keys.is_empty());
    }

    #[test]
    fn sizes_durations_and_env_overrides() {
        let text =
            "[cache]\nmemory_bytes = \"64 MiB\"\nretention = \"2d\"\nmax_object_bytes = 1000\n";
        let c = Config::from_sources(
            "t",
            text,
            env(&[
                ("PARASOL__CACHE__DISK_BYTES", "20GiB"),
                ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.2/32\"]"),
                ("PARASOL__FETCH__MAX_REDIRECTS", "2"),
                ("PARASOL__SERVER__ADMIN_TOKEN", "12345678901234567890123456789012"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.cache.memory_bytes, Size(64 << 20));
        assert_eq!(c.cache.retention, Dur(Duration::from_secs(2 * 86_400)));
        assert_eq!(c.cache.max_object_bytes, Size(1000));
        assert_eq!(c.cache.disk_bytes, Size(20 << 30));
        assert_eq!(c.fetch.allow_networks, vec!["127.0.0.2/32".parse::<IpNet>().unwrap()]);
        assert_eq!(c.fetch.max_redirects, 2);
        let token = "12345678901234567890123456789012";
        assert_eq!(c.server.admin_token, token, "a numeric-looking string stays a string");
    }

    #[test]
    fn errors_name_the_key() {
        let key_of = |text: &str, e: &[(&str, &str)]| match Config::from_sources("t", text, env(e))
        {
            Err(ConfigError::Key { key, .. }) => key,
            other => panic!("expected a key error, got {other:?}"),
        };
        assert_eq!(key_of("[cache]\ndisk_byte = 1\n", &[]), "cache.disk_byte");
        assert_eq!(key_of("[cache]\ndisk_bytes = \"lots\"\n", &[]), "cache.disk_bytes");
        assert_eq!(key_of("", &[("PARASOL__FETCH__TIMEOUT", "soon")]), "fetch.timeout");
        assert_eq!(key_of("[signing]\nkeys = [\"short\"]\n", &[]), "signing.keys[0]");
        assert_eq!(key_of("", &[("PARASOL__NOPE", "1")]), "PARASOL__NOPE");
        assert!(matches!(
            Config::from_sources("t", "[cache", env(&[])),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn shared_tier_settings_are_checked_and_its_secret_hidden() {
        let key_of = |text: &str| match Config::from_sources("t", text, env(&[])) {
            Err(ConfigError::Key { key, .. }) => key,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(
            key_of("[shared]\nendpoint = \"ftp://s3.test\"\nbucket = \"b\"\n"),
            "shared.endpoint"
        );
        assert_eq!(key_of("[shared]\nendpoint = \"http://s3.test:3900\"\n"), "shared.bucket");
        let text = "[shared]\nendpoint = \"http://s3.test:3900\"\nbucket = \"b\"\n\
                    secret_access_key = \"s3cr3t-value\"\n";
        let config = Config::from_sources("t", text, env(&[])).unwrap();
        assert!(!config.to_redacted_toml().contains("s3cr3t-value"));
        let off = Config::from_sources("t", "", env(&[])).unwrap();
        assert!(off.shared.endpoint.is_empty(), "off by default");
    }

    #[test]
    fn errors_never_quote_a_secret() {
        let secret = "hunter2-hunter2-hunter2-hunter2-hunter2";
        let cases = [
            // A syntax error on the secret's own line.
            (format!("[server]\nadmin_token = \"{secret}\" x\n"), vec![]),
            (format!("[compat]\ncamo_key = \"{secret}\n"), vec![]),
            // The wrong type, from the file or from the environment.
            ("[server]\nadmin_token = 31337\n".to_string(), vec![]),
            (String::new(), vec![("PARASOL__SIGNING__KEYS", format!("[\"{secret}\""))]),
            // A secret of a numbered [[upstream]], of the wrong type.
            (
                "[[upstream]]\nprefix = \"/s/\"\n[upstream.s3]\nsecret_access_key = 31337\n"
                    .to_string(),
                vec![],
            ),
            ("[compat]\npictrs_secret = 31337\n".to_string(), vec![]),
        ];
        for (text, vars) in cases {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let message = Config::from_sources("t", &text, env(&vars)).unwrap_err().to_string();
            assert!(!message.contains("hunter2") && !message.contains("31337"), "{message}");
        }
        let short = Config::from_sources("t", "[compat]\nakkoma_secret = \"short\"\n", env(&[]));
        let message = short.unwrap_err().to_string();
        assert!(
            message.contains("compat.akkoma_secret") && message.contains("32 bytes"),
            "{message}"
        );
        assert!(!message.contains("short\""), "{message}");
    }

    #[test]
    fn secrets_are_known_by_their_keys() {
        for key in [
            "server.admin_token",
            "signing.keys[1]",
            "compat.pictrs_secret",
            "upstream[0].s3.secret_access_key",
            "upstream[12].s3.secret_access_key",
        ] {
            assert!(is_secret(key), "{key}");
        }
        for key in ["upstream[0].s3.bucket", "upstream[x].s3.secret_access_key", "server.listen"] {
            assert!(!is_secret(key), "{key}");
        }
    }

    #[test]
    fn an_unsigned_pictrs_listener_stays_internal_unless_a_secret_guards_it() {
        let with = |extra: &str| Config::from_sources("t", extra, env(&[]));
        for internal in ["127.0.0.1:8091", "10.1.2.3:8091", "192.168.1.2:8091", "[fd00::1]:8091"] {
            assert!(with(&format!("[compat]\npictrs_listen = \"{internal}\"\n")).is_ok());
        }
        for public in ["0.0.0.0:8091", "203.0.113.7:8091", "[::]:8091", "[2001:db8::1]:8091"] {
            let refused = with(&format!("[compat]\npictrs_listen = \"{public}\"\n")).unwrap_err();
            assert!(refused.to_string().contains("pictrs_secret"), "{public}: {refused}");
            let secret = "a-secret-only-nginx-knows-0123456789";
            let guarded =
                format!("[compat]\npictrs_listen = \"{public}\"\npictrs_secret = \"{secret}\"\n");
            assert!(with(&guarded).is_ok(), "{public}");
        }
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let text = "[signing]\nkeys = [\"0123456789abcdef0123456789abcdef\"]\n[server]\nadmin_token = \"token-token-token-token-token-tok\"\n";
        let shown = Config::from_sources("t", text, env(&[])).unwrap().to_redacted_toml();
        assert!(!shown.contains("0123456789abcdef") && !shown.contains("token-"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
