//! The media pool as a remote poster meets it: a flood of costly files from one server takes
//! only that server's share of the workers, and a worker is trusted no more than one file
//! (a scripted worker that answers every job with one fixed PNG, out of turn, or with bytes
//! after its reply, never gets a byte into another file or another host's job).

use std::path::Path;
use std::time::Duration;

use img_parts::ImageEXIF;
use parasol::fetch::guard::StaticLookup;

use crate::util::*;

/// Passes the SVG screen (no DOCTYPE, sixty filter primitives, nothing to clamp) and still
/// costs minutes of CPU: two hundred full-size rectangles, each through sixty blurs. `seed`
/// makes each one distinct bytes.
pub(crate) fn blurs(seed: u32) -> Vec<u8> {
    let filter: String = (0..60)
        .map(|n| format!("<feGaussianBlur stdDeviation=\"{}\"/>", 20 + (n + seed) % 7))
        .collect();
    let rects =
        "<rect width=\"1024\" height=\"1024\" fill=\"#a35\" filter=\"url(#f)\"/>".repeat(200);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1024\" height=\"1024\">\
         <!-- {seed} --><filter id=\"f\">{filter}</filter>{rects}</svg>"
    )
    .into_bytes()
}

/// A photo with a GPS position in its EXIF (a strip job when fetched).
fn photo_with_gps(seed: u32) -> Vec<u8> {
    let plain = crate::variants::gradient_jpeg(320 + seed, 240);
    let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(plain.into()).unwrap();
    jpeg.set_exif(Some(crate::variants::exif_with_gps(1).into()));
    let mut out = Vec::new();
    jpeg.encoder().write_to(&mut out).unwrap();
    out
}

/// Two origins under names of their own: `a.bombs.test` and `b.bombs.test` (one origin,
/// bombs.test) on 127.0.0.60, `photos.test` on 127.0.0.61.
async fn two_servers() -> (Origin, Origin, StaticLookup) {
    let (bombs, photos) = (Origin::start("127.0.0.60").await, Origin::start("127.0.0.61").await);
    let lookup = StaticLookup::default()
        .with("a.bombs.test", &[ip("127.0.0.60")])
        .with("b.bombs.test", &[ip("127.0.0.60")])
        .with("photos.test", &[ip("127.0.0.61")]);
    (bombs, photos, lookup)
}

fn named(origin: &Origin, host: &str, path: &str) -> String {
    format!("http://{host}:{}{path}", origin.addr.port())
}

fn media_config(dir: &Path, media: &str) -> parasol::config::Config {
    let extra = format!("[media]\n{media}");
    let toml = config_toml(dir, &["127.0.0.60/32", "127.0.0.61/32"], &extra);
    parasol::config::Config::from_sources("test", &toml, std::iter::empty()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_origin_s_costly_files_leave_the_other_workers_to_everyone_else() {
    let (bombs, photos, lookup) = two_servers().await;
    for n in 0..8 {
        bombs.route(&format!("/bomb-{n}.svg"), Route::ok(blurs(n)));
    }
    photos.route("/photo.jpg", Route::ok(photo_with_gps(1)));
    photos.route("/face.jpg", Route::ok(photo_with_gps(2)));
    let dir = tempfile::tempdir().unwrap();
    // The bombs may run long: what is measured is who else gets a worker meanwhile.
    let cfg = media_config(dir.path(), "workers = 2\njob_timeout = \"60s\"\nsvg_timeout = \"60s\"");
    let p = Parasol::start_with(cfg, lookup).await;
    let flood: Vec<_> = (0..8)
        .map(|n| {
            // Two hosts, one origin: inventing subdomains buys no more workers.
            let host = if n % 2 == 0 { "a.bombs.test" } else { "b.bombs.test" };
            let url = p.url(&named(&bombs, host, &format!("/bomb-{n}.svg")));
            tokio::spawn(async move { get(&url).await.status() })
        })
        .collect();
    let mut running = false;
    for _ in 0..400 {
        running = p.metric("parasol_media_jobs_running").await == 1;
        if running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running, "a bomb is on a worker");
    // The other server's new photo (a strip) and an avatar (a strip, then a render) are
    // served while every bomb still runs or waits: they got the other worker.
    let photo = p.url(&named(&photos, "photos.test", "/photo.jpg"));
    let avatar = format!("{}/avatar", p.url(&named(&photos, "photos.test", "/face.jpg")));
    // Long enough for a machine busy beside the tests; what is asserted is the order.
    let quick = Duration::from_secs(120);
    let (photo, avatar) = tokio::join!(
        tokio::time::timeout(quick, get(&photo)),
        tokio::time::timeout(quick, get(&avatar))
    );
    let (photo, avatar) = (photo.expect("the photo answered"), avatar.expect("the avatar too"));
    assert_eq!((photo.status().as_u16(), avatar.status().as_u16()), (200, 200));
    let photo = body(photo).await;
    assert!(!photo.windows(2).any(|w| w == [0x88, 0x25]), "its GPS was stripped");
    assert!(flood.iter().all(|b| !b.is_finished()), "all eight bombs were still pending");
    assert_eq!(p.metric("parasol_media_jobs_running").await, 1, "the bombs' origin holds one");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_whose_files_keep_costing_too_much_gets_no_new_jobs_for_a_while() {
    let (bombs, photos, lookup) = two_servers().await;
    for n in 0..4 {
        bombs.route(&format!("/bomb-{n}.svg"), Route::ok(blurs(100 + n)));
    }
    bombs.route("/same-as-3.svg", Route::ok(blurs(103)));
    photos.route("/photo.jpg", Route::ok(photo_with_gps(3)));
    let dir = tempfile::tempdir().unwrap();
    let cfg = media_config(dir.path(), "workers = 2\nsvg_timeout = \"1s\"");
    let p = Parasol::start_with(cfg, lookup).await;
    for n in 0..3 {
        let url = p.url(&named(&bombs, "a.bombs.test", &format!("/bomb-{n}.svg")));
        let r = tokio::time::timeout(crate::media::CPU_BOUND, get(&url)).await.unwrap();
        assert_eq!(r.status(), 422, "bomb {n}: stopped at its CPU time");
        assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");
    }
    assert_eq!(p.metric("parasol_media_jobs_total{outcome=\"too_costly\"}").await, 3);
    // The fourth, new bytes from another host of the same origin: refused without a worker.
    let url = p.url(&named(&bombs, "b.bombs.test", "/bomb-3.svg"));
    let r = tokio::time::timeout(Duration::from_secs(5), get(&url)).await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["x-parasol-error"], "media_origin_refused");
    assert_eq!(p.metric("parasol_media_jobs_total{outcome=\"origin_refused\"}").await, 1);
    assert_eq!(p.metric("parasol_media_origins_refused").await, 1);
    assert_eq!(p.metric("parasol_media_jobs_total{outcome=\"too_costly\"}").await, 3);
    // The refusal is the site's, not the file's: the same bytes elsewhere are refused for the
    // site again, never as a verdict remembered for them.
    let url = p.url(&named(&bombs, "a.bombs.test", "/same-as-3.svg"));
    assert_eq!(get(&url).await.headers()["x-parasol-error"], "media_origin_refused");
    assert_eq!(p.metric("parasol_media_jobs_total{outcome=\"remembered\"}").await, 0);
    // Another origin is not affected.
    let photo = p.url(&named(&photos, "photos.test", "/photo.jpg"));
    assert_eq!(get(&photo).await.status(), 200);
    p.stop().await;
}

/// What a fake worker does with every job.
#[derive(Clone, Copy)]
enum Fake {
    /// Answers "done" with one fixed PNG, whatever was asked.
    FixedPng,
    /// Answers a strip as "nothing to change", but names another job.
    WrongId,
    /// Answers a strip as "nothing to change", then writes more.
    Trailing,
}

/// A media worker of our own making, in Python: it speaks the protocol (greeting, frames),
/// logs `<pid> <task>` for each job to `log`, and answers as `mode` says.
fn fake_worker(dir: &Path, mode: Fake, log: &Path) -> std::path::PathBuf {
    let python = "/usr/bin/python3";
    let png = png_bytes(200, 5);
    let mode = match mode {
        Fake::FixedPng => "png",
        Fake::WrongId => "wrong-id",
        Fake::Trailing => "trailing",
    };
    let script = format!(
        r#"#!{python}
import json, os, struct, sys
out, inp = sys.stdout.buffer, sys.stdin.buffer
PNG = bytes.fromhex("{png}")
def frame(header, body=b""):
    h = json.dumps(header).encode()
    return struct.pack("<I", len(h)) + h + struct.pack("<Q", len(body)) + body
out.write(frame({{"reply": "ready", "version": "fake", "landlock": "fully enforced", "cpu_ms": 0}}))
out.flush()
while True:
    raw = inp.read(4)
    if len(raw) < 4:
        break
    job = json.loads(inp.read(struct.unpack("<I", raw)[0]))
    inp.read(struct.unpack("<Q", inp.read(8))[0])
    with open("{log}", "a") as f:
        f.write("%d %s\n" % (os.getpid(), job["task"]))
    if "{mode}" == "png":
        reply = frame({{"job": job["id"], "reply": "done", "width": 1, "height": 1, "cpu_ms": 0}}, PNG)
    elif "{mode}" == "wrong-id":
        reply = frame({{"job": job["id"] + 1, "reply": "unchanged", "cpu_ms": 0}})
    else:
        reply = frame({{"job": job["id"], "reply": "unchanged", "cpu_ms": 0}}) + b"more"
    out.write(reply)
    out.flush()
"#,
        png = hex::encode(&png),
        log = log.display()
    );
    let path = dir.join(format!("fake-worker-{mode}"));
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `(pid, task)` of each job the fake worker logged.
fn jobs_logged(log: &Path) -> Vec<(u32, String)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pid, task) = l.split_once(' ')?;
            Some((pid.parse().ok()?, task.to_string()))
        })
        .collect()
}

async fn with_fake_worker(
    mode: Fake,
    dir: &Path,
    lookup: StaticLookup,
) -> (Parasol, std::path::PathBuf) {
    let log = dir.join("jobs.log");
    let exe = fake_worker(dir, mode, &log);
    let cfg = media_config(&dir.join("cache"), "workers = 2");
    let options = parasol::Options {
        lookup: Some(std::sync::Arc::new(lookup)),
        config_path: None,
        worker_exe: exe,
    };
    (Parasol::start_opts(cfg, options).await, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(has_python), ignore = "needs Debian's python3: apt-get install python3")]
async fn a_worker_that_answers_every_job_with_one_png_gets_no_byte_into_an_original() {
    let (bombs, photos, lookup) = two_servers().await;
    let gps = photo_with_gps(4);
    bombs.route("/gps.jpg", Route::ok(gps.clone()));
    // PNGs without text chunks are stored without a strip; renders are asked of workers.
    for n in 0..2 {
        bombs.route(&format!("/a-{n}.png"), Route::ok(png_bytes(30_000, 40 + n)));
    }
    photos.route("/b.png", Route::ok(png_bytes(30_000, 50)));
    let dir = tempfile::tempdir().unwrap();
    let (p, log) = with_fake_worker(Fake::FixedPng, dir.path(), lookup).await;

    // A strip answered with a picture instead of cuts: a broken protocol, the file refused,
    // the PNG stored nowhere.
    let r = get(&p.url(&named(&bombs, "a.bombs.test", "/gps.jpg"))).await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");
    assert_eq!(p.blob_count(), 0, "nothing stored");

    // Renders: the fake's PNG is not a WebP avatar (refused), and a worker only ever runs the
    // jobs of one host.
    for path in ["/a-0.png", "/a-1.png"] {
        let avatar = format!("{}/avatar", p.url(&named(&bombs, "a.bombs.test", path)));
        assert_eq!(get(&avatar).await.status(), 415, "{path}: not what was asked for");
    }
    let avatar = format!("{}/avatar", p.url(&named(&photos, "photos.test", "/b.png")));
    assert_eq!(get(&avatar).await.status(), 415);
    let jobs = jobs_logged(&log);
    let renders: Vec<u32> =
        jobs.iter().filter(|(_, task)| task == "render").map(|(pid, _)| *pid).collect();
    assert_eq!(renders.len(), 3, "{jobs:?}");
    assert_eq!(renders[0], renders[1], "one host's jobs share its worker: {jobs:?}");
    assert_ne!(renders[2], renders[0], "another host's job never runs on it: {jobs:?}");
    let strip_pid = jobs.iter().find(|(_, t)| t == "strip").map(|(pid, _)| *pid);
    assert!(!renders.contains(&strip_pid.unwrap()), "the worker that broke the protocol is gone");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(has_python), ignore = "needs Debian's python3: apt-get install python3")]
async fn a_worker_that_answers_another_job_or_writes_more_is_ended() {
    for mode in [Fake::WrongId, Fake::Trailing] {
        let (_bombs, photos, lookup) = two_servers().await;
        for n in 0..2 {
            photos.route(&format!("/gps-{n}.jpg"), Route::ok(photo_with_gps(10 + n)));
        }
        let dir = tempfile::tempdir().unwrap();
        let (p, log) = with_fake_worker(mode, dir.path(), lookup).await;
        for n in 0..2 {
            let r = get(&p.url(&named(&photos, "photos.test", &format!("/gps-{n}.jpg")))).await;
            assert_eq!(r.status(), 422, "job {n}: its answer is not taken");
            assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");
        }
        let jobs = jobs_logged(&log);
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        assert_ne!(jobs[0].0, jobs[1].0, "the first worker was ended, not given a second job");
        assert_eq!(p.blob_count(), 0);
        p.stop().await;
    }
}
