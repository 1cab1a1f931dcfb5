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

fn gradient_jpeg(w: u32, h: u32) -> Vec<u8> {
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
    let alpha = RgbaImage::from_fn(500, 400, |x, _| Rgba([255, 0, 0, (x % 256) as u8]));
    origin
        .route("/logo.png", Route::ok(encode(&DynamicImage::ImageRgba8(alpha), ImageFormat::Png)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.17/32"])).await;
    let photo = origin.url("/photo.jpg");
    for (variant, format, w, h) in [
        ("avatar", ImageFormat::WebP, 320, 240),
        ("preview", ImageFormat::WebP, 200, 150),
        ("static", ImageFormat::WebP, 498, 374),
        ("emoji", ImageFormat::WebP, 171, 128),
        ("badge", ImageFormat::Png, 96, 72),
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
    let r = get(&variant_url(&p, &origin.url("/logo.png"), "badge")).await;
    let (format, img) = decoded(&body(r).await);
    assert_eq!(format, ImageFormat::Png);
    assert_eq!((img.width(), img.height()), (96, 77));
    assert!(img.color().has_alpha(), "the badge keeps its alpha");
    assert_eq!(get(&variant_url(&p, &photo, "nope")).await.status(), 404);
    assert_eq!(origin.hits("/photo.jpg"), 1, "every variant came from the one cached original");
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
    let metrics = get(&p.admin_url("/metrics")).await.text().await.unwrap();
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
    let metrics = get(&p.admin_url("/metrics")).await.text().await.unwrap();
    assert!(metrics.contains("parasol_renders_total 1"), "{metrics}");
    p.stop().await;
}
