//! The camo, Akkoma and Misskey front doors, checked against an independent implementation
//! of each signature (Python's hmac/base64, run from the test).

use std::process::Command;

use crate::util::*;

const CAMO_KEY: &str = "camo-test-key-0123456789-abcdefgh";
const AKKOMA_SECRET: &str = "akkoma-secret-key-base-for-tests";

/// Runs a Python snippet with `URL` and `KEY` in its environment and returns its stdout.
fn python(script: &str, url: &str, key: &str) -> String {
    let out = Command::new("python3").args(["-c", script]).env("URL", url).env("KEY", key).output();
    let out = out.expect("python3 is on the machine");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// camo: hex HMAC-SHA1(key, url) and hex(url), as GitHub camo's README describes.
fn camo_path(url: &str) -> String {
    python(
        "import hmac,hashlib,os;u=os.environ['URL'].encode();k=os.environ['KEY'].encode();\
         print('/camo/'+hmac.new(k,u,hashlib.sha1).hexdigest()+'/'+u.hex())",
        url,
        CAMO_KEY,
    )
}

/// Akkoma: url64 = base64url(url) without padding; sig = base64url(HMAC-SHA1(secret, url64))
/// without padding (Pleroma.Web.MediaProxy.encode_url/1).
fn akkoma_path(url: &str, filename: &str) -> String {
    let path = python(
        "import hmac,hashlib,base64,os;u=os.environ['URL'].encode();k=os.environ['KEY'].encode();\
         b=base64.urlsafe_b64encode(u).rstrip(b'=');\
         s=base64.urlsafe_b64encode(hmac.new(k,b,hashlib.sha1).digest()).rstrip(b'=');\
         print('/proxy/'+s.decode()+'/'+b.decode()+'/')",
        url,
        AKKOMA_SECRET,
    );
    format!("{path}{filename}")
}

fn compat_config(dir: &std::path::Path, allow: &[&str]) -> parasol::Config {
    let mut cfg = config(dir, allow);
    cfg.compat.camo_key = CAMO_KEY.into();
    cfg.compat.akkoma_secret = AKKOMA_SECRET.into();
    cfg.compat.misskey = true;
    cfg
}

#[tokio::test]
async fn every_scheme_serves_the_same_cache_entry() {
    let origin = Origin::start("127.0.0.18").await;
    let img = png_bytes(6_000, 600);
    origin.route("/media/cat.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.18/32"])).await;
    let src = origin.url("/media/cat.png");
    let base = format!("http://{}", p.public);
    let camo = camo_path(&src);
    let (digest, hexurl) = camo.trim_start_matches("/camo/").split_once('/').unwrap();
    let query_form = format!("/camo/{digest}?url={}", form_encode(&src));
    let paths = [
        camo.clone(),
        query_form,
        akkoma_path(&src, "cat.png"),
        p.url(&src).trim_start_matches(&base).to_string(),
        format!("/proxy/cat.webp?url={}", form_encode(&src)),
    ];
    for path in &paths {
        let r = get(&format!("{base}{path}")).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(body(r).await, img, "{path}");
    }
    assert_eq!(origin.hits("/media/cat.png"), 1, "one origin request for all five URLs");

    // Bad signatures, per scheme.
    let flipped = format!(
        "/camo/{}{}/{hexurl}",
        &digest[..39],
        if digest.ends_with('0') { "1" } else { "0" }
    );
    assert_eq!(get(&format!("{base}{flipped}")).await.status(), 403);
    let other = camo_path(&origin.url("/media/other.png"));
    let other_digest = other.trim_start_matches("/camo/").split_once('/').unwrap().0;
    assert_eq!(get(&format!("{base}/camo/{other_digest}/{hexurl}")).await.status(), 403);
    let akkoma = akkoma_path(&src, "cat.png");
    let forged = akkoma.replacen("/proxy/", "/proxy/A", 1);
    assert_eq!(get(&format!("{base}{forged}")).await.status(), 403);
    p.stop().await;
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn akkoma_filenames_redirect_and_preview_is_a_variant() {
    let origin = Origin::start("127.0.0.18").await;
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(800, 400));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    origin.route("/a/photo.png", Route::ok(png.into_inner()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.18/32"])).await;
    let src = origin.url("/a/photo.png");
    let base = format!("http://{}", p.public);
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let wrong = akkoma_path(&src, "wrong.jpg");
    let r = no_redirects.get(format!("{base}{wrong}")).send().await.unwrap();
    assert_eq!(r.status(), 301);
    assert_eq!(r.headers()["location"].to_str().unwrap(), akkoma_path(&src, "photo.png"));
    let preview_of = |src: &str| {
        let name = src.rsplit('/').next().unwrap().to_string();
        format!("{base}{}", akkoma_path(src, &name).replacen("/proxy/", "/proxy/preview/", 1))
    };
    // Akkoma's preview defaults: originals under 100 KiB as they are...
    let r = get(&preview_of(&src)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, origin_body(&origin, "/a/photo.png").await, "small: the original");
    // ...larger pictures fitted to 600 x 600 as JPEG (PNG where there is transparency)...
    let noise = |alpha: bool| {
        let mut seed = 7u32;
        image::DynamicImage::ImageRgba8(image::RgbaImage::from_fn(800, 400, |x, _| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let [r, g, b, _] = seed.to_le_bytes();
            image::Rgba([r, g, b, if alpha && x < 100 { 0 } else { 255 }])
        }))
    };
    let encoded = |img: image::DynamicImage, format| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    origin.route("/a/noise.png", Route::ok(encoded(noise(false), image::ImageFormat::Png)));
    origin.route("/a/clear.png", Route::ok(encoded(noise(true), image::ImageFormat::Png)));
    for (path, format) in [("/a/noise.png", "image/jpeg"), ("/a/clear.png", "image/png")] {
        let r = get(&preview_of(&origin.url(path))).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], format, "{path}");
        let name = if format == "image/png" { "preview.png" } else { "preview.jpg" };
        let disposition = format!("inline; filename=\"{name}\"");
        assert_eq!(r.headers()["content-disposition"], disposition.as_str(), "{path}");
        let thumb = image::load_from_memory(&body(r).await).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (600, 300), "{path}");
    }
    // ...and an animated GIF is served as it is.
    let frames =
        (0..2).map(|_| image::Frame::new(noise(false).crop_imm(0, 0, 400, 400).to_rgba8()));
    let mut gif = Vec::new();
    image::codecs::gif::GifEncoder::new(&mut gif).encode_frames(frames).unwrap();
    assert!(gif.len() > 100 << 10);
    origin.route("/a/anim.gif", Route::ok(gif.clone()));
    let r = get(&preview_of(&origin.url("/a/anim.gif"))).await;
    assert_eq!(body(r).await, gif, "the animation itself");
    p.stop().await;
}

/// Akkoma's preview of a video, with its defaults: over `min_content_length` (100 KiB) the
/// first frame fitted to 600 x 600 as JPEG; under it, the video as it is.
#[tokio::test]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn akkoma_preview_of_a_video_is_its_poster() {
    let make = crate::variants::ffmpeg_make;
    let big = make("-f lavfi -i testsrc=s=1280x720:d=2:r=10 -c:v mjpeg -q:v 2", "mov");
    let small = make("-f lavfi -i color=c=red:s=320x240:d=1 -c:v libx264 -preset ultrafast", "mp4");
    assert!(big.len() > 100 << 10 && small.len() < 100 << 10, "{} {}", big.len(), small.len());
    let origin = Origin::start("127.0.0.18").await;
    origin.route("/v/big.mov", Route::ok(big));
    origin.route("/v/small.mp4", Route::ok(small.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.18/32"])).await;
    let preview_of = |path: &str| {
        let src = origin.url(path);
        let name = src.rsplit('/').next().unwrap().to_string();
        let path = akkoma_path(&src, &name).replacen("/proxy/", "/proxy/preview/", 1);
        format!("http://{}{path}", p.public)
    };
    let r = get(&preview_of("/v/big.mov")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert_eq!(r.headers()["content-disposition"], "inline; filename=\"preview.jpg\"");
    let poster = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!(poster.width(), 600);
    assert!((337..=338).contains(&poster.height()), "{}", poster.height());
    let r = get(&preview_of("/v/small.mp4")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, small, "under 100 KiB: the video itself");
    p.stop().await;
}

async fn origin_body(origin: &Origin, path: &str) -> bytes::Bytes {
    body(get(&origin.url(path)).await).await
}

#[tokio::test]
async fn misskey_presets_fallback_and_rate_limit() {
    let origin = Origin::start("127.0.0.18").await;
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::new(640, 640));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let png = png.into_inner();
    for i in 0..4 {
        origin.route(&format!("/u/{i}.png"), Route::ok(png.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = compat_config(dir.path(), &["127.0.0.18/32"]);
    cfg.compat.misskey_fills_per_minute = 2;
    let p = Parasol::start(cfg).await;
    let base = format!("http://{}", p.public);
    let misskey = |path: &str, flags: &str| {
        format!("{base}/proxy/x.webp?url={}{flags}", form_encode(&origin.url(path)))
    };

    let r = get(&misskey("/u/0.png", "&avatar=1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/webp");
    let avatar = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((avatar.width(), avatar.height()), (320, 320));

    // A missing image: 404, or with fallback=1 a placeholder cached for five minutes.
    assert_eq!(get(&misskey("/missing.png", "&emoji=1")).await.status(), 404);
    let r = get(&misskey("/gone.png", "&emoji=1&fallback=1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "max-age=300");
    assert_eq!(r.headers()["content-type"], "image/png");

    // Two fills this minute for this host are spent (0.png and missing.png); gone.png's came
    // back as a fallback. A fourth cold URL is refused, cached ones are still served.
    assert_eq!(get(&misskey("/u/1.png", "")).await.status(), 503);
    assert_eq!(origin.hits("/u/1.png"), 0);
    assert_eq!(get(&misskey("/u/0.png", "&static=1")).await.status(), 200, "cached: served");
    // The signed native scheme is not rate-limited.
    assert_eq!(get(&p.url(&origin.url("/u/2.png"))).await.status(), 200);
    p.stop().await;

    // Off by default: the unsigned route does not exist.
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.18/32"])).await;
    let r = get(&format!(
        "http://{}/proxy/x.webp?url={}",
        p.public,
        form_encode(&origin.url("/u/3.png"))
    ))
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(origin.hits("/u/3.png"), 0);
    p.stop().await;
}

#[test]
fn sign_prints_each_scheme_like_the_independent_implementation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!("[compat]\ncamo_key = \"{CAMO_KEY}\"\nakkoma_secret = \"{AKKOMA_SECRET}\"\n"),
    )
    .unwrap();
    let sign = |scheme: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_parasol"))
            .args(["sign", "https://remote.test/media/cat.jpg", "--scheme", scheme, "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let src = "https://remote.test/media/cat.jpg";
    assert_eq!(sign("camo"), format!("http://127.0.0.1:8080{}", camo_path(src)));
    assert_eq!(sign("akkoma"), format!("http://127.0.0.1:8080{}", akkoma_path(src, "cat.jpg")));
    assert!(sign("native").starts_with("http://127.0.0.1:8080/m/"));
}

/// Debian's camo (installed by `.ci/run`) and parasol given the same camo URLs: the same bytes
/// for a good signature, and both refuse a bad one (camo 404, parasol 403, by design).
#[tokio::test]
#[cfg_attr(not(has_camo), ignore = "needs Debian's camo: apt-get install camo")]
async fn debian_camo_and_parasol_agree_on_the_same_signed_urls() {
    let origin = Origin::start("127.0.0.20").await;
    let img = png_bytes(12_000, 800);
    origin.route("/c.png", Route::ok(img.clone()).header("content-type", "image/png"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // camo listens on every address; this wrapper binds it to loopback only.
    let wrapper = "const http=require('http');const l=http.Server.prototype.listen;\
        http.Server.prototype.listen=function(p){return l.call(this,p,'127.0.0.1')};\
        require('/usr/share/camo/server.js');";
    let camo = Command::new("node")
        .args(["-e", wrapper])
        .env("CAMO_KEY", CAMO_KEY)
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("node runs");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _camo = Kill(camo);
    assert!(
        eventually(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await,
        "camo starts"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.20/32"])).await;
    let src = origin.url("/c.png");
    let signed = parasol::api::camo::sign_url("", CAMO_KEY.as_bytes(), &src);
    let tail = signed.trim_start_matches("/camo"); // "/<digest>/<hexurl>"
    let digest = tail.split('/').nth(1).unwrap().to_string();
    let query_tail = format!("/{digest}?url={}", form_encode(&src));
    // camo 2.3 under Node 20 needs an Accept-Encoding header.
    let fetch = |url: String| async move {
        let r = client().get(url).header("accept-encoding", "identity").send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap())
    };
    for t in [tail.to_string(), query_tail] {
        let (camo_status, camo_body) = fetch(format!("http://127.0.0.1:{port}{t}")).await;
        let (our_status, our_body) = fetch(format!("http://{}/camo{t}", p.public)).await;
        assert_eq!((camo_status, our_status), (200, 200), "{t}");
        assert_eq!(camo_body, img, "camo serves the image");
        assert_eq!(our_body, camo_body, "the same bytes from both");
    }
    let bad = tail.replacen(&digest[..4], if &digest[..4] == "0000" { "1111" } else { "0000" }, 1);
    let (camo_status, _) = fetch(format!("http://127.0.0.1:{port}{bad}")).await;
    let (our_status, _) = fetch(format!("http://{}/camo{bad}", p.public)).await;
    assert_eq!((camo_status, our_status), (404, 403), "both refuse a bad digest");
    p.stop().await;
}

/// The unsigned Misskey route's allowance is per registrable domain: inventing subdomains of
/// one domain buys no more fills.
#[tokio::test]
async fn misskey_subdomains_share_one_allowance() {
    let origin = Origin::start("127.0.0.18").await;
    for n in 0..4 {
        origin.route(&format!("/s/{n}.png"), Route::ok(png_bytes(3_000, 850 + n)));
    }
    let mut lookup = parasol::fetch::guard::StaticLookup::default();
    for sub in ["a", "b", "c", "d"] {
        lookup = lookup.with(&format!("{sub}.cdn.media.test"), &[ip("127.0.0.18")]);
    }
    lookup = lookup.with("other.test", &[ip("127.0.0.18")]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = compat_config(dir.path(), &["127.0.0.18/32"]);
    cfg.compat.misskey_fills_per_minute = 2;
    let p = Parasol::start_with(cfg, lookup).await;
    let port = origin.addr.port();
    let misskey = |host: &str, n: u32| {
        let source = format!("http://{host}:{port}/s/{n}.png");
        format!("http://{}/proxy/x.webp?url={}", p.public, form_encode(&source))
    };
    // Like the test above, this counts on the three requests falling in one minute.
    assert_eq!(get(&misskey("a.cdn.media.test", 0)).await.status(), 200);
    assert_eq!(get(&misskey("b.cdn.media.test", 1)).await.status(), 200);
    let r = get(&misskey("c.cdn.media.test", 2)).await;
    assert_eq!(r.status(), 503, "media.test's allowance is spent, whatever the subdomain");
    assert_eq!(origin.hits("/s/2.png"), 0);
    assert_eq!(get(&misskey("other.test", 3)).await.status(), 200, "another domain's own");
    p.stop().await;
}

/// Frames in a WebP (1 for a still one).
fn webp_frame_count(bytes: &[u8]) -> usize {
    use image::AnimationDecoder;
    let decoder = image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(bytes)).unwrap();
    if !decoder.has_animation() {
        return 1;
    }
    decoder.into_frames().count()
}

/// Misskey's flags, alone and together, answered as misskey-dev/media-proxy answers them:
/// which preset wins, its size, its type, whether it moves, and 404 for a flag on something
/// that is not a picture.
#[tokio::test]
async fn misskey_flag_combinations_as_misskey_answers_them() {
    let origin = Origin::start("127.0.0.19").await;
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(1600, 1200)));
    origin.route("/anim.gif", Route::ok(crate::variants::animated_gif(3)));
    let mp4 = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom\0\0\0\x08mdat".to_vec();
    origin.route("/clip.mp4", Route::ok(mp4));
    origin.route("/song.mp3", Route::ok(b"ID3\x04\0\0\0\0\0\0\xff\xfb\x90\x44".repeat(20)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.19/32"])).await;
    let base = format!("http://{}", p.public);
    type Case = (&'static str, &'static str, u16, &'static str, (u32, u32), usize);
    let cases: [Case; 16] = [
        ("/photo.jpg", "", 200, "image/jpeg", (1600, 1200), 1),
        ("/photo.jpg", "&avatar=1", 200, "image/webp", (427, 320), 1),
        ("/photo.jpg", "&avatar=0", 200, "image/webp", (427, 320), 1),
        ("/photo.jpg", "&avatar=1&static=1", 200, "image/webp", (427, 320), 1),
        ("/photo.jpg", "&emoji=1", 200, "image/webp", (171, 128), 1),
        ("/photo.jpg", "&emoji=1&avatar=1", 200, "image/webp", (171, 128), 1),
        ("/photo.jpg", "&static=1", 200, "image/webp", (498, 374), 1),
        ("/photo.jpg", "&preview=1", 200, "image/webp", (200, 150), 1),
        ("/photo.jpg", "&static=1&preview=1", 200, "image/webp", (498, 374), 1),
        ("/photo.jpg", "&badge=1", 200, "image/png", (96, 96), 1),
        ("/anim.gif", "&avatar=1", 200, "image/webp", (640, 320), 3),
        ("/anim.gif", "&emoji=1&static=1", 200, "image/webp", (256, 128), 1),
        ("/anim.gif", "&static=1", 200, "image/webp", (498, 249), 1),
        ("/clip.mp4", "", 200, "video/mp4", (0, 0), 0),
        ("/clip.mp4", "&static=1", 404, "", (0, 0), 0),
        ("/song.mp3", "&avatar=1", 404, "", (0, 0), 0),
    ];
    for (path, flags, status, content_type, (w, h), frames) in cases {
        let url = format!("{base}/proxy/x.webp?url={}{flags}", form_encode(&origin.url(path)));
        let r = get(&url).await;
        assert_eq!(r.status(), status, "{path}{flags}");
        if status != 200 {
            assert_eq!(r.headers()["x-parasol-error"], "no_rendition", "{path}{flags}");
            continue;
        }
        assert_eq!(r.headers()["content-type"], content_type, "{path}{flags}");
        let bytes = body(r).await;
        if content_type.starts_with("image/") {
            let img = image::load_from_memory(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), (w, h), "{path}{flags}");
        }
        if content_type == "image/webp" {
            assert_eq!(webp_frame_count(&bytes), frames, "{path}{flags}");
        }
    }
    // The name of what is served, its extension corrected as Misskey does.
    let avatar =
        format!("{base}/proxy/x.webp?url={}&avatar=1", form_encode(&origin.url("/photo.jpg")));
    let r = get(&avatar).await;
    assert_eq!(r.headers()["content-disposition"], "inline; filename=\"photo.jpg.webp\"");
    // A standalone media proxy's root form, and misskey.io's path form.
    let root = format!("{base}/emoji.webp?url={}&emoji=1", form_encode(&origin.url("/photo.jpg")));
    let r = get(&root).await;
    assert_eq!(r.status(), 200);
    assert_eq!(image::load_from_memory(&body(r).await).unwrap().height(), 128);
    let host_path = origin.url("/photo.jpg").replacen("http://", "", 1);
    let path_form = format!("{base}/proxy/image/{}?preview=1", form_encode(&host_path));
    let r = get(&path_form.replacen("/proxy/image/", "/proxy/image/http%3A%2F%2F", 1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(image::load_from_memory(&body(r).await).unwrap().width(), 200);
    assert_eq!(origin.hits("/photo.jpg"), 1, "every form and flag from one cached original");
    p.stop().await;
}

/// Misskey's `videoThumbnailGenerator` URLs: a video's poster within 498 x 280.
#[tokio::test]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn misskey_video_thumbnails_are_posters() {
    let dir = tempfile::tempdir().unwrap();
    let clip = "-f lavfi -i color=c=red:s=1280x720:d=1 -c:v libx264 -preset ultrafast";
    let origin = Origin::start("127.0.0.19").await;
    origin.route("/clip.mp4", Route::ok(crate::variants::ffmpeg_make(clip, "mp4")));
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.19/32"])).await;
    let url = format!(
        "http://{}/thumbnail.webp?thumbnail=1&url={}",
        p.public,
        form_encode(&origin.url("/clip.mp4"))
    );
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/webp");
    let poster = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((poster.width(), poster.height()), (498, 280));
    let px = poster.to_rgb8().get_pixel(249, 140).0;
    assert!(px[0] > 200 && px[1] < 60, "the red frame: {px:?}");
    p.stop().await;
}

/// Akkoma's cache invalidation: `PURGE` of a proxied URL (plain or preview) with the
/// configured token drops the file and its renditions, so the next view asks the origin;
/// without the token it is refused and nothing moves; unconfigured, PURGE is 405.
#[tokio::test]
async fn akkoma_purge_with_the_token_drops_the_file_and_its_previews() {
    const TOKEN: &str = "purge-token-of-at-least-32-bytes!!";
    let origin = Origin::start("127.0.0.18").await;
    // A real picture, over Akkoma's 100 KiB, so the preview is a rendition of its own.
    let mut seed = 11u32;
    let noise = image::RgbImage::from_fn(400, 300, |_, _| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let [r, g, b, _] = seed.to_le_bytes();
        image::Rgb([r, g, b])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(noise).write_to(&mut png, image::ImageFormat::Png).unwrap();
    origin.route("/b/cat.png", Route::ok(png.into_inner()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = compat_config(dir.path(), &["127.0.0.18/32"]);
    cfg.compat.purge_token = TOKEN.into();
    let p = Parasol::start(cfg).await;
    let base = format!("http://{}", p.public);
    let src = origin.url("/b/cat.png");
    let plain = format!("{base}{}", akkoma_path(&src, "cat.png"));
    let preview = plain.replacen("/proxy/", "/proxy/preview/", 1);
    assert_eq!(get(&plain).await.status(), 200);
    assert_eq!(get(&preview).await.status(), 200);
    assert_eq!(origin.hits("/b/cat.png"), 1);
    let purge = |url: String, token: Option<&str>| {
        let mut req = client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let r = purge(preview.clone(), Some("wrong-token-wrong-token-wrong-token")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(purge(preview.clone(), None).await.unwrap().status(), 403);
    assert_eq!(get(&plain).await.status(), 200);
    assert_eq!(origin.hits("/b/cat.png"), 1, "a refused purge dropped nothing");
    // Akkoma purges its own URLs; the filename segment does not matter.
    let r = purge(preview.replacen("cat.png", "other.png", 1), Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
    assert!(report["purged"]["entries"].as_u64().unwrap() >= 2, "the file and its preview");
    assert_eq!(get(&preview).await.status(), 200);
    assert_eq!(origin.hits("/b/cat.png"), 2, "fetched again after the purge");
    p.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(compat_config(dir.path(), &["127.0.0.18/32"])).await;
    let plain = format!("http://{}{}", p.public, akkoma_path(&src, "cat.png"));
    assert_eq!(purge(plain, Some(TOKEN)).await.unwrap().status(), 405, "off until configured");
    p.stop().await;
}
