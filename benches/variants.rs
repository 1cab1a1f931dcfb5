//! Time per preset to render a 4000×3000 JPEG (decode, orient, resize, encode), and, in the
//! same run, `vipsthumbnail` (Debian `libvips-tools`) doing the same resize of the same file
//! when it is installed. vipsthumbnail's time includes starting its process (a few ms).
//!
//! Run: `cargo bench --bench variants`

use std::hint::black_box;
use std::io::Cursor;
use std::process::Command;

use criterion::{Criterion, criterion_group, criterion_main};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

fn photo() -> Vec<u8> {
    // Smooth gradients with some texture: closer to a photo than a flat colour.
    let img = RgbImage::from_fn(4000, 3000, |x, y| {
        Rgb([(x / 16) as u8, (y / 12) as u8, ((x ^ y) % 251) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn presets(c: &mut Criterion) {
    let jpeg = photo();
    let config = parasol::Config::from_sources("bench", "", std::iter::empty()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("photo.jpg");
    std::fs::write(&fixture, &jpeg).unwrap();
    let vips = Command::new("vipsthumbnail").arg("--help").output().is_ok();
    let mut group = c.benchmark_group("render 4000x3000 JPEG");
    group.sample_size(10);
    for (name, spec) in &config.variants {
        group.bench_function(format!("parasol/{name}"), |b| {
            b.iter(|| parasol::media::variants::render(black_box(&jpeg), spec, 40_000_000).unwrap())
        });
        if vips {
            let size =
                format!("{}x{}", spec.width.unwrap_or(100_000), spec.height.unwrap_or(100_000));
            let out =
                dir.path().join(format!("{name}.{}[Q={}]", spec.format.as_str(), spec.quality));
            group.bench_function(format!("vipsthumbnail/{name}"), |b| {
                b.iter(|| {
                    let status = Command::new("vipsthumbnail")
                        .arg(&fixture)
                        .args(["-s", &size, "-o"])
                        .arg(&out)
                        .status()
                        .unwrap();
                    assert!(status.success());
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, presets);
criterion_main!(benches);
