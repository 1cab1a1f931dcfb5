//! parasol's Misskey route beside Misskey's own media proxy (misskey-dev/media-proxy, sharp
//! and libvips), same files, same flags, same machine, one run: bytes, size, frames and
//! milliseconds per preset.
//!
//! Two sources, made here: a 1600×1200 photo-like JPEG (smooth light, texture, edges) and a
//! 30-frame 256×256 animated GIF, each in `ROUNDS` versions that differ a little. Every
//! request names a new source URL and every round new bytes, so both proxies fetch and render
//! each time (Misskey's keeps no cache; parasol keys renditions by content and would
//! otherwise answer from its own): the time is the whole miss, fetch included. Requests alternate
//! between the two, and each figure is the median of `ROUNDS` (default 7).
//!
//! Needs Misskey's media proxy in `MISSKEY_MEDIA_PROXY` (default `/tmp/mmp`), node, python3
//! (the origin) and a release build of parasol. Misskey's proxy is never part of this
//! repository; to set it up, clone misskey-dev/media-proxy there, pin `sharp` to `^0.33.5`
//! and `@misskey-dev/sharp-read-bmp` to `1.1.1` in its package.json, add
//! `"overrides": {"sharp": "$sharp"}` (one sharp for everything), run `npm install
//! --omit=dev`, and write a `config.js` that exports `allowedPrivateNetworks:
//! ['127.0.0.2/32']` beside its other defaults. Then: `cargo build --release && cargo bench
//! --bench misskey`.

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::io::Cursor;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{AnimationDecoder, DynamicImage, ImageFormat, Rgb, RgbImage};

const ORIGIN_IP: &str = "127.0.0.2";

/// A photo-like picture; each `seed` gives other bytes (and so another render: parasol keys
/// renditions by content).
fn photo(seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(1600, 1200, |x, y| {
        let (fx, fy) = (f64::from(x) / 1600.0, f64::from(y) / 1200.0);
        let light = 0.5 + 0.5 * (fx * 6.0 + fy * 3.0).sin() * (fy * 5.0).cos();
        let texture = f64::from((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) % 31);
        let (dx, dy) = (f64::from(x) - 1000.0, f64::from(y) - 500.0);
        let r = 250.0 + f64::from(seed);
        let disc = if dx * dx + dy * dy < r * r { 60.0 } else { 0.0 };
        let v = |k: f64| (k * light * 200.0 + texture + disc).clamp(0.0, 255.0) as u8;
        Rgb([v(1.0), v(0.8), v(0.6)])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn animation(seed: u32) -> Vec<u8> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut gif = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut gif, 10);
        enc.set_repeat(Repeat::Infinite).unwrap();
        let frames = (0..30u32).map(|n| {
            let img = image::RgbaImage::from_fn(256, 256, |x, y| {
                let (dx, dy) = (x as i32 - (n * 8) as i32, y as i32 - 128);
                let r = 40 + seed as i32;
                let ball = dx * dx + dy * dy < r * r;
                let c = if ball { [240, 80, 40] } else { [(x / 2) as u8, (y / 2) as u8, 120] };
                image::Rgba([c[0], c[1], c[2], 255])
            });
            image::Frame::from_parts(img, 0, 0, image::Delay::from_numer_denom_ms(60, 1))
        });
        enc.encode_frames(frames).unwrap();
    }
    gif
}

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on `ip:port`.
fn wait_for(ip: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect((ip, port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {ip}:{port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one answer was: status, bytes, dimensions, frames, milliseconds.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: u16,
    bytes: usize,
    size: (u32, u32),
    frames: usize,
    ms: f64,
}

fn describe(bytes: &[u8]) -> ((u32, u32), usize) {
    let Ok(format) = image::guess_format(bytes) else { return ((0, 0), 0) };
    if format == ImageFormat::WebP {
        let decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).unwrap();
        if decoder.has_animation() {
            let frames: Vec<_> = decoder.into_frames().collect();
            let first = frames[0].as_ref().unwrap().buffer().dimensions();
            return (first, frames.len());
        }
    }
    let img = image::load_from_memory(bytes).map(|i| (i.width(), i.height()));
    (img.unwrap_or((0, 0)), 1)
}

async fn fetch(client: &reqwest::Client, url: &str) -> Answer {
    let started = Instant::now();
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let (size, frames) = describe(&body);
    Answer { status, bytes: body.len(), size, frames, ms }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let mmp = std::env::var("MISSKEY_MEDIA_PROXY").unwrap_or_else(|_| "/tmp/mmp".into());
    if !Path::new(&mmp).join("server.js").exists() {
        eprintln!("Misskey's media proxy is not installed in {mmp}: see BENCHMARKS.md");
        return;
    }
    let parasol_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/parasol");
    if !parasol_bin.exists() {
        eprintln!("build parasol first: cargo build --release");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7);
    let files = tempfile::tempdir().unwrap();
    for n in 0..rounds as u32 {
        std::fs::write(files.path().join(format!("photo{n}.jpg")), photo(n)).unwrap();
        std::fs::write(files.path().join(format!("anim{n}.gif")), animation(n)).unwrap();
    }
    let origin_port = free_port(ORIGIN_IP);
    let _origin = Killed(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", ORIGIN_IP, &origin_port.to_string()])
            .current_dir(files.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(ORIGIN_IP, origin_port);

    let mmp_port = free_port("127.0.0.1");
    let _misskey = Killed(
        Command::new("node")
            .args(["node_modules/fastify-cli/cli.js", "start", "-l", "warn"])
            .args(["-p", &mmp_port.to_string(), "-a", "127.0.0.1", "./server.js"])
            .env("NODE_ENV", "production")
            .current_dir(&mmp)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    let (public, admin) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let _parasol = Killed(
        Command::new(&parasol_bin)
            .env("PARASOL__SERVER__LISTEN", format!("127.0.0.1:{public}"))
            .env("PARASOL__SERVER__ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("PARASOL__CACHE__DIR", cache.path())
            .env("PARASOL__COMPAT__MISSKEY", "true")
            .env("PARASOL__COMPAT__MISSKEY_FILLS_PER_MINUTE", "100000")
            .env("PARASOL__FETCH__ALLOW_NETWORKS", format!("[\"{ORIGIN_IP}/32\"]"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("127.0.0.1", mmp_port);
    wait_for("127.0.0.1", public);

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    println!(
        "| source | flag | parasol bytes | Misskey bytes | bytes ratio | parasol size, frames | \
         Misskey size, frames | parasol ms | Misskey ms | ms ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut n = 0;
    for (stem, ext) in [("photo", "jpg"), ("anim", "gif")] {
        let source = format!("{stem}.{ext}");
        for flag in ["avatar", "emoji", "static", "preview", "badge"] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                n += 1;
                let src = format!("http://{ORIGIN_IP}:{origin_port}/{stem}{round}.{ext}?n={n}");
                let q = form_urlencoded::byte_serialize(src.as_bytes()).collect::<String>();
                let p = format!("http://127.0.0.1:{public}/proxy/image.webp?url={q}&{flag}=1");
                let m = format!("http://127.0.0.1:{mmp_port}/image.webp?url={q}&{flag}=1");
                // Alternating who goes first, so drift on the machine hits both alike.
                if n % 2 == 0 {
                    ours.push(fetch(&client, &p).await);
                    theirs.push(fetch(&client, &m).await);
                } else {
                    theirs.push(fetch(&client, &m).await);
                    ours.push(fetch(&client, &p).await);
                }
            }
            let (a, b) = (ours[0], theirs[0]);
            let ms = |v: &[Answer]| median(v.iter().map(|a| a.ms).collect());
            let (pm, mm) = (ms(&ours), ms(&theirs));
            let ratio = if b.bytes > 0 {
                format!("{:.2}", a.bytes as f64 / b.bytes as f64)
            } else {
                "-".into()
            };
            println!(
                "| {source} | {flag} | {} ({}) | {} ({}) | {ratio} | {}×{}, {} | {}×{}, {} | {pm:.1} | {mm:.1} | {:.2} |",
                a.bytes,
                a.status,
                b.bytes,
                b.status,
                a.size.0,
                a.size.1,
                a.frames,
                b.size.0,
                b.size.1,
                b.frames,
                pm / mm
            );
        }
    }
}
