//! What isolation costs: each preset rendered in process (`media::variants::render`, the path
//! parasol took before media workers) and through the worker pool (the same render in a
//! sandboxed `parasol media-worker`, the file and the result over pipes), same files, same run.
//!
//! Two sources: a 4000×3000 JPEG photo and a 128×128 PNG emoji with alpha. For each preset it
//! prints the median latency of sequential renders, and renders per second with two at a time
//! (two blocking threads in process, two workers in the pool), interleaving the two paths so
//! that machine noise hits both alike. "In process" is the path parasol took before: the
//! render on a blocking thread, awaited from a task.
//!
//! Run: `cargo bench --bench media_worker` (`ROUNDS=n` for more samples, `SOURCE=emoji` or
//! `SOURCE=JPEG` for one source).

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::io::Cursor;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use parasol::config::VariantConfig;
use parasol::media::worker::protocol::Task;
use parasol::media::worker::{Input, MediaPool};

const MAX_PIXELS: u64 = 40_000_000;

fn photo() -> Vec<u8> {
    let img = RgbImage::from_fn(4000, 3000, |x, y| {
        Rgb([(x / 16) as u8, (y / 12) as u8, ((x ^ y) % 251) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn emoji() -> Vec<u8> {
    let img = RgbaImage::from_fn(128, 128, |x, y| {
        let (dx, dy) = (x as i32 - 64, y as i32 - 64);
        let inside = dx * dx + dy * dy < 60 * 60;
        Rgba([255, (x * 2) as u8, (y * 2) as u8, if inside { 255 } else { 0 }])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgba8(img).write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

async fn pooled(pool: &MediaPool, source: &Bytes, spec: &VariantConfig) -> usize {
    let task = Task::Render { spec: spec.clone(), max_pixels: MAX_PIXELS, animation: None };
    let mut out = Vec::new();
    pool.run(&task, Input::Memory(source.clone()), None, "bench.test", &mut out).await.unwrap();
    out.len()
}

/// Today's path before media workers: the render on a blocking thread, awaited.
async fn in_process(source: &Bytes, spec: &VariantConfig) -> usize {
    let (source, spec) = (source.clone(), spec.clone());
    tokio::task::spawn_blocking(move || {
        parasol::media::variants::render(&source, &spec, MAX_PIXELS).unwrap().bytes.len()
    })
    .await
    .unwrap()
}

/// Median latency of `n` calls of `a` and of `b`, alternated call by call so that noise on
/// the machine hits both alike; then renders per second of each, `n` calls two at a time, in
/// alternating blocks.
async fn measure<A, B, FA, FB>(n: usize, a: A, b: B) -> [(Duration, f64); 2]
where
    A: Fn() -> FA,
    B: Fn() -> FB,
    FA: std::future::Future<Output = usize>,
    FB: std::future::Future<Output = usize>,
{
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(a().await);
        ta.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(b().await);
        tb.push(t.elapsed());
    }
    let (mut da, mut db) = (Duration::ZERO, Duration::ZERO);
    let block = (n / 4).max(1);
    for _ in 0..4 {
        let t = Instant::now();
        let half = || async {
            for _ in 0..block / 2 + 1 {
                std::hint::black_box(a().await);
            }
        };
        tokio::join!(half(), half());
        da += t.elapsed();
        let t = Instant::now();
        let half = || async {
            for _ in 0..block / 2 + 1 {
                std::hint::black_box(b().await);
            }
        };
        tokio::join!(half(), half());
        db += t.elapsed();
    }
    let done = (4 * 2 * (block / 2 + 1)) as f64;
    [(median(ta), done / da.as_secs_f64()), (median(tb), done / db.as_secs_f64())]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Everything runs in a task on the runtime's workers, as a fill does in the server.
    runtime.block_on(async move { tokio::spawn(bench(rounds)).await.unwrap() });
}

async fn bench(rounds: usize) {
    let config =
        parasol::Config::from_sources("bench", "[media]\nworkers = 2", std::iter::empty()).unwrap();
    let metrics = parasol::telemetry::Metrics::new();
    let exe = env!("CARGO_BIN_EXE_parasol").into();
    let pool = parasol::media_pool(&config, exe, &metrics);
    pool.warm().await.unwrap();
    println!(
        "| source | preset | in process | worker pool | cost | in process, 2 at once | pool, 2 at once |"
    );
    println!("|---|---|---|---|---|---|---|");
    let sources = [("4000x3000 JPEG", photo(), rounds), ("128 px emoji", emoji(), rounds * 20)];
    let only = std::env::var("SOURCE").unwrap_or_default();
    if "strip".contains(only.as_str()) {
        strips(&pool, rounds * 40).await;
    }
    for (name, source, n) in sources {
        if !name.contains(only.as_str()) {
            continue;
        }
        let source = Bytes::from(source);
        for (preset, spec) in &config.variants {
            // Warm both paths (a worker per slot, the allocator, the page cache).
            in_process(&source, spec).await;
            tokio::join!(pooled(&pool, &source, spec), pooled(&pool, &source, spec));
            let [(local, local_rate), (remote, remote_rate)] =
                measure(n, || in_process(&source, spec), || pooled(&pool, &source, spec)).await;
            let cost = remote.as_secs_f64() / local.as_secs_f64() - 1.0;
            println!(
                "| {name} | {preset} | {:.3} ms | {:.3} ms | {:+.1}% | {local_rate:.1}/s | {remote_rate:.1}/s |",
                local.as_secs_f64() * 1e3,
                remote.as_secs_f64() * 1e3,
                cost * 100.0,
            );
        }
    }
}

/// The miss path's media job: stripping a fill's metadata. Before media workers it ran in
/// process without a thread hop for bodies in memory. A 64 KiB PNG-looking body with nothing
/// to strip (the side-by-side bench's miss) and a 60 KiB JPEG with EXIF.
async fn strips(pool: &MediaPool, n: usize) {
    let mut noise = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let mut x = 0x2545f4914f6cdd1du64;
    while noise.len() < 64 << 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let img = RgbImage::from_fn(300, 200, |x, y| Rgb([x as u8, y as u8, 90]));
    let mut jpeg = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut jpeg, ImageFormat::Jpeg).unwrap();
    let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(jpeg.into_inner().into()).unwrap();
    img_parts::ImageEXIF::set_exif(&mut jpeg, Some(Bytes::from(vec![b'M'; 2000])));
    let mut tagged = Vec::new();
    jpeg.encoder().write_to(&mut tagged).unwrap();
    for (name, body, ct) in [
        ("64 KiB PNG, nothing to strip", noise, "image/png"),
        ("JPEG with EXIF", tagged, "image/jpeg"),
    ] {
        let body = Bytes::from(body);
        let local = || {
            let body = body.clone();
            async move { parasol::media::strip::strip(&body, ct).map_or(0, |b| b.len()) }
        };
        let remote = || {
            let body = body.clone();
            async move {
                let hash = blake3::hash(&body);
                let input = Input::Memory(body.clone());
                let cuts = pool.strip_plan(input, ct, &hash, "bench.test").await.unwrap();
                cuts.map_or(0, |c| c.apply(&body, ct).unwrap().len())
            }
        };
        let [(l, lr), (r, rr)] = measure(n, local, remote).await;
        println!(
            "| strip | {name} | {:.3} ms | {:.3} ms | {:+.3} ms | {lr:.0}/s | {rr:.0}/s |",
            l.as_secs_f64() * 1e3,
            r.as_secs_f64() * 1e3,
            (r.as_secs_f64() - l.as_secs_f64()) * 1e3,
        );
    }
}
