//! Hostile media against the real binary: every file here is made by the test, small, and
//! built to cost a decoder too much memory or time. parasol runs as a child process, so the
//! server's own memory (and its media workers, its children) can be read from `/proc`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cli::{Running, spawn_serving};
use crate::util::*;

/// One 1 MiB entity referenced 255 times by a second, that one four times in the document:
/// a gigabyte of text from a 1 MiB file. A comment inside the DOCTYPE hides it from a naive
/// sniffer, as an attacker would.
fn entity_bomb() -> Vec<u8> {
    let a = "A".repeat(1 << 20);
    let b = "&a;".repeat(255);
    format!(
        "<?xml version=\"1.0\"?>\n<!DOCTYPE svg [<!-- ><svg -->\n<!ENTITY a \"{a}\">\n\
         <!ENTITY b \"{b}\">\n]>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" \
         height=\"64\"><text>&b;&b;&b;&b;</text></svg>"
    )
    .into_bytes()
}

/// Three hundred bytes that ask the renderer for four billion octaves of noise (the screen
/// clamps them to ten: then a 256 px square takes about 0.5 s of the tests' unoptimised
/// worker's CPU).
fn turbulence(seed: u32) -> Vec<u8> {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"256\" height=\"256\"><filter id=\"f\">\
         <feTurbulence baseFrequency=\"0.05\" seed=\"{seed}\" numOctaves=\"4000000000\"/>\
         </filter><rect width=\"256\" height=\"256\" filter=\"url(#f)\"/></svg>"
    )
    .into_bytes()
}

/// A valid PNG header declaring `w` × `h` RGBA over a small zlib stream of zeros.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]); // 8-bit RGBA
    chunk(&mut png, b"IHDR", &ihdr);
    let zeros = vec![0u8; 4 << 20];
    chunk(&mut png, b"IDAT", &miniz_oxide::deflate::compress_to_vec_zlib(&zeros, 9));
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A GIF of `frames` frames of `side` × `side` pixels each. One frame's LZW data is encoded
/// once and repeated, so the file is small and quick to make.
fn gif_of_frames(frames: usize, side: u16) -> Vec<u8> {
    let pixels = vec![1u8; usize::from(side) * usize::from(side)];
    let lzw = weezl::encode::Encoder::new(weezl::BitOrder::Lsb, 2).encode(&pixels).unwrap();
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&side.to_le_bytes());
    gif.extend_from_slice(&side.to_le_bytes());
    gif.extend_from_slice(&[0xf1, 0, 0]); // global colour table of 4 entries
    gif.extend_from_slice(&[0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
    gif.extend_from_slice(&[0x21, 0xff, 11]);
    gif.extend_from_slice(b"NETSCAPE2.0");
    gif.extend_from_slice(&[3, 1, 0, 0, 0]); // loop forever
    for _ in 0..frames {
        gif.extend_from_slice(&[0x21, 0xf9, 4, 0, 2, 0, 0, 0]); // 20 ms a frame
        gif.push(0x2c);
        gif.extend_from_slice(&[0, 0, 0, 0]);
        gif.extend_from_slice(&side.to_le_bytes());
        gif.extend_from_slice(&side.to_le_bytes());
        gif.extend_from_slice(&[0, 2]); // no local table; LZW minimum code size 2
        for block in lzw.chunks(255) {
            gif.push(block.len() as u8);
            gif.extend_from_slice(block);
        }
        gif.push(0);
    }
    gif.push(0x3b);
    gif
}

/// `VmRSS` of `pid` in KiB, or 0 once it is gone.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The processes whose parent is `pid` (its media workers).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return vec![] };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<_>>())
        .collect()
}

/// Whether `pid` runs (a zombie nobody reaped does not).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

/// CPU time (user + system, in clock ticks) `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Samples the peak RSS of a server and of its workers every 20 ms until dropped.
struct Peaks {
    stop: Arc<AtomicBool>,
    server: Arc<AtomicU64>,
    worker: Arc<AtomicU64>,
}

impl Peaks {
    fn watch(pid: u32) -> Peaks {
        let stop = Arc::new(AtomicBool::new(false));
        let (server, worker) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, w, halt) = (server.clone(), worker.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                s.fetch_max(rss_kib(pid), Ordering::Relaxed);
                for child in children(pid) {
                    w.fetch_max(rss_kib(child), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Peaks { stop, server, worker }
    }

    fn server_mib(&self) -> u64 {
        self.server.load(Ordering::Relaxed) / 1024
    }

    fn worker_mib(&self) -> u64 {
        self.worker.load(Ordering::Relaxed) / 1024
    }
}

impl Drop for Peaks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A child parasol reaching origins on `allow`, with `[media]` settings from `media`.
fn serve(dir: &Path, allow: &str, media: &[(&str, &str)]) -> (Running, SocketAddr, SocketAddr) {
    let keys = format!("[\"{KEY}\"]");
    let allow = format!("[\"{allow}\"]");
    let mut envs: Vec<(String, String)> = vec![
        ("PARASOL__FETCH__ALLOW_NETWORKS".into(), allow),
        ("PARASOL__SIGNING__KEYS".into(), keys),
        ("PARASOL__SERVER__SHUTDOWN_GRACE".into(), "2s".into()),
        ("PARASOL__CACHE__FSYNC".into(), "false".into()),
        ("PARASOL__MEDIA__QUEUE_WAIT".into(), format!("{}s", QUEUE_WAIT.as_secs())),
    ];
    for (k, v) in media {
        envs.push((format!("PARASOL__MEDIA__{}", k.to_ascii_uppercase()), v.to_string()));
    }
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    spawn_serving(dir, &envs, None)
}

/// The longest wait for an answer that takes a media job's CPU time: the deadlines that count
/// are CPU time, and a machine busy beside the tests (a build) stretches a job's wall time,
/// up to twenty times its budget.
pub(crate) const CPU_BOUND: Duration = Duration::from_secs(300);

/// GET with a deadline: a test never waits on a hung server for longer than `within`.
async fn get_within(url: &str, within: Duration) -> reqwest::Response {
    tokio::time::timeout(within, get(url)).await.expect("answered within the deadline")
}

async fn metric(admin: SocketAddr, prefix: &str) -> u64 {
    let text = get(&format!("http://{admin}/metrics")).await.text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(prefix));
    line.and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn jobs(outcome: &str) -> String {
    format!("parasol_media_jobs_total{{outcome=\"{outcome}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svg_bombs_cost_a_worker_not_the_server() {
    let origin = Origin::start("127.0.0.40").await;
    origin.route("/entities.svg", Route::ok(entity_bomb()));
    origin.route("/noise.svg", Route::ok(turbulence(1)));
    let blurs = crate::pool::blurs(1);
    origin.route("/blurs.svg", Route::ok(blurs.clone()));
    origin.route("/same-blurs.svg", Route::ok(blurs));
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(640, 480)));
    let dir = tempfile::tempdir().unwrap();
    let media = [("job_timeout", "3s"), ("svg_timeout", "2s")];
    let (child, public, admin) = serve(dir.path(), "127.0.0.40/32", &media);
    let pid = child.0.id();
    let before = rss_kib(pid) / 1024;
    let peaks = Peaks::watch(pid);
    let deadline = CPU_BOUND;

    // Screened before the renderer sees it: a DOCTYPE is refused, whatever it declares.
    let r = get_within(&signed_url(public, &origin.url("/entities.svg")), deadline).await;
    assert_eq!(r.status(), 415, "the entity bomb");
    assert_eq!(r.headers()["x-parasol-error"], "bad_image");
    // Four billion octaves are clamped to ten: a picture, not a stuck worker.
    let r = get_within(&signed_url(public, &origin.url("/noise.svg")), deadline).await;
    assert_eq!(r.status(), 200, "the endless filter, clamped");
    assert!(body(r).await.starts_with(b"\x89PNG"));
    // What passes the screen and still costs too much is stopped at media.svg_timeout of
    // CPU time.
    let r = get_within(&signed_url(public, &origin.url("/blurs.svg")), deadline).await;
    assert_eq!(r.status(), 422, "twelve thousand blurs");
    assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");

    // The same bytes at another URL: the verdict is remembered, no worker is tried again.
    let too_costly = metric(admin, &jobs("too_costly")).await;
    assert_eq!(too_costly, 1);
    let r = get_within(&signed_url(public, &origin.url("/same-blurs.svg")), deadline).await;
    assert_eq!(r.status(), 422);
    assert_eq!(metric(admin, &jobs("remembered")).await, 1);
    assert_eq!(metric(admin, &jobs("too_costly")).await, too_costly);

    // Workers replaced: a real photo renders right after.
    let avatar = format!("{}/avatar", signed_url(public, &origin.url("/photo.jpg")));
    assert_eq!(get_within(&avatar, deadline).await.status(), 200);
    let (server, worker) = (peaks.server_mib(), peaks.worker_mib());
    drop(peaks);
    eprintln!("server RSS {before} MiB, peak {server} MiB; worker peak {worker} MiB");
    assert!(server < before + 64, "the server's memory stayed flat: {before} -> {server} MiB");
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_bombs_are_refused_or_cost_only_their_worker() {
    let origin = Origin::start("127.0.0.41").await;
    origin.route("/huge.png", Route::ok(png_declaring(30_000, 30_000)));
    origin.route("/big.png", Route::ok(png_declaring(16_000, 16_000)));
    origin.route("/frames.gif", Route::ok(gif_of_frames(250, 800)));
    let dir = tempfile::tempdir().unwrap();
    // max_pixels raised so that 16000 x 16000 RGBA (1 GiB) passes the header check and only
    // the worker's memory limit stands in its way.
    // job_timeout is CPU time: a busy machine stretches a job's wall time up to three times.
    let media = [("max_pixels", "300000000"), ("job_timeout", "4s")];
    let (child, public, admin) = serve(dir.path(), "127.0.0.41/32", &media);
    let pid = child.0.id();
    let before = rss_kib(pid) / 1024;
    let peaks = Peaks::watch(pid);
    let deadline = CPU_BOUND;
    let variant =
        |path: &str, name: &str| format!("{}/{name}", signed_url(public, &origin.url(path)));

    let started = Instant::now();
    let r = get_within(&variant("/huge.png", "avatar"), deadline).await;
    assert_eq!(r.status(), 415, "refused from its header, before any pixel is decoded");
    assert_eq!(r.headers()["x-parasol-error"], "bad_image");
    assert!(started.elapsed() < CPU_BOUND);
    assert_eq!(metric(admin, &jobs("refused")).await, 1);

    let r = get_within(&variant("/big.png", "avatar"), deadline).await;
    assert_eq!(r.status(), 422, "a gigabyte of pixels is more than a worker may hold");
    assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");

    let started = Instant::now();
    let r = get_within(&variant("/frames.gif", "static"), deadline).await;
    assert_eq!(r.status(), 200, "the first of 250 frames");
    let img = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((img.width(), img.height()), (422, 422));
    assert!(started.elapsed() < CPU_BOUND);
    // Kept animated (avatar): 250 frames of 640,000 pixels are within the animation budgets,
    // so every frame is decoded and fitted, within the deadline and the worker's memory. A
    // release build does it in about 2 s; the tests' unoptimised worker needs minutes, so
    // here its CPU time may end it: then the file is blamed (422), not the server.
    let started = Instant::now();
    let r = get_within(&variant("/frames.gif", "avatar"), deadline).await;
    match r.status().as_u16() {
        200 => {
            let avatar = body(r).await;
            assert_eq!(crate::variants::webp_frames(&avatar).len(), 250, "every frame kept");
        }
        422 => assert_eq!(r.headers()["x-parasol-error"], "media_too_costly"),
        other => panic!("avatar of 250 frames: {other}"),
    }
    assert!(started.elapsed() < CPU_BOUND);
    let (server, worker) = (peaks.server_mib(), peaks.worker_mib());
    drop(peaks);
    eprintln!("server RSS {before} MiB, peak {server} MiB; worker peak {worker} MiB");
    assert!(server < before + 64, "the server's memory stayed flat: {before} -> {server} MiB");
    child.sigterm();
    assert!(child.wait().await.success());
}

/// Waits (bounded) for a worker of `pid` to be burning CPU, and returns it.
async fn busy_worker(pid: u32) -> u32 {
    for _ in 0..200 {
        for worker in children(pid) {
            let before = cpu_ticks(worker);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if cpu_ticks(worker) > before {
                return worker;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no worker got busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_fails_that_job_cleanly_and_the_next_gets_a_fresh_one() {
    let origin = Origin::start("127.0.0.42").await;
    origin.route("/noise.svg", Route::ok(crate::pool::blurs(2)));
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(640, 480)));
    let dir = tempfile::tempdir().unwrap();
    let media = [("workers", "1"), ("job_timeout", "60s"), ("svg_timeout", "60s")];
    let (child, public, admin) = serve(dir.path(), "127.0.0.42/32", &media);
    let pid = child.0.id();
    let url = signed_url(public, &origin.url("/noise.svg"));
    let stuck = tokio::spawn(async move { get_within(&url, Duration::from_secs(30)).await });
    let worker = busy_worker(pid).await;
    let killed = Instant::now();
    assert!(Command::new("kill").args(["-KILL", &worker.to_string()]).status().unwrap().success());
    let r = stuck.await.unwrap();
    assert!(killed.elapsed() < Duration::from_secs(10), "answered once its worker died");
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["x-parasol-error"], "media_too_costly");
    let avatar = format!("{}/avatar", signed_url(public, &origin.url("/photo.jpg")));
    assert_eq!(get_within(&avatar, CPU_BOUND).await.status(), 200);
    assert!(!alive(worker), "the killed worker is gone");
    assert_eq!(metric(admin, &jobs("too_costly")).await, 1);
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stuck_job_exits_within_the_grace_period() {
    let origin = Origin::start("127.0.0.43").await;
    origin.route("/noise.svg", Route::ok(crate::pool::blurs(3)));
    let dir = tempfile::tempdir().unwrap();
    let media = [("job_timeout", "120s"), ("svg_timeout", "120s")];
    let (child, public, _admin) = serve(dir.path(), "127.0.0.43/32", &media);
    let pid = child.0.id();
    let url = signed_url(public, &origin.url("/noise.svg"));
    let _stuck = tokio::spawn(async move { get(&url).await });
    let worker = busy_worker(pid).await;
    let signalled = Instant::now();
    child.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let took = signalled.elapsed();
    assert!(status.is_ok(), "parasol exited");
    // Grace is 2 s; the rest is slack for a loaded machine, far below the job's 120 s.
    assert!(took < Duration::from_secs(8), "exited {took:?} after SIGTERM");
    assert!(eventually(|| !alive(worker)).await, "its worker did not outlive it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_jobs_hold_no_fill_slot_and_other_traffic_is_served_meanwhile() {
    let origin = Origin::start("127.0.0.44").await;
    origin.route("/noise-1.svg", Route::ok(crate::pool::blurs(4)));
    origin.route("/noise-2.svg", Route::ok(crate::pool::blurs(5)));
    origin.route("/cached.png", Route::ok(png_bytes(20_000, 80)));
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(800, 600)));
    for n in 0..5 {
        origin.route(&format!("/new-{n}.png"), Route::ok(png_bytes(30_000, 81 + n)));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.44/32"]);
    cfg.fetch.max_fills = 1;
    cfg.media.workers = 3;
    cfg.media.job_timeout = parasol::config::Dur(Duration::from_secs(12));
    cfg.media.svg_timeout = cfg.media.job_timeout;
    // The render is of another origin's photo: the bombs' own origin has its share running.
    let lookup =
        parasol::fetch::guard::StaticLookup::default().with("photos.test", &[ip("127.0.0.44")]);
    let p = Parasol::start_with(cfg, lookup).await;
    let quick = Duration::from_secs(60);
    assert_eq!(get_within(&p.url(&origin.url("/cached.png")), quick).await.status(), 200);
    // One after the other: with one fill slot, a second fill while the first is fetching
    // would get 503. Each is on a worker (the gauge says so) once its fill is over.
    let mut stuck = Vec::new();
    for (n, path) in ["/noise-1.svg", "/noise-2.svg"].iter().enumerate() {
        let url = p.url(&origin.url(path));
        stuck.push(tokio::spawn(async move { get_within(&url, CPU_BOUND).await }));
        let on_worker = || async { p.metric("parasol_media_jobs_running").await == n as u64 + 1 };
        assert!(eventually_async(on_worker).await, "bomb {n} is on a worker");
    }
    // Two workers are stuck and their fills are over: a hit, misses (one fill slot in all)
    // and a render are served as if nothing were wrong.
    let started = Instant::now();
    let hit = get_within(&p.url(&origin.url("/cached.png")), quick).await;
    assert_eq!(hit.status(), 200);
    for n in 0..5 {
        let r = get_within(&p.url(&origin.url(&format!("/new-{n}.png"))), quick).await;
        assert_eq!(r.status(), 200, "miss {n} while two jobs are stuck");
    }
    let photo = format!("http://photos.test:{}/photo.jpg", origin.addr.port());
    let avatar = format!("{}/avatar", p.url(&photo));
    assert_eq!(get_within(&avatar, quick).await.status(), 200);
    assert!(started.elapsed() < quick, "served meanwhile, not after");
    assert!(stuck.iter().all(|s| !s.is_finished()), "the bombs were still running");
    for s in stuck {
        assert_eq!(s.await.unwrap().status(), 422);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_media_busy_at_once() {
    let origin = Origin::start("127.0.0.45").await;
    origin.route("/noise.svg", Route::ok(crate::pool::blurs(6)));
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(320, 240)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.45/32"]);
    cfg.media.workers = 1;
    cfg.media.queue = 0;
    cfg.media.job_timeout = parasol::config::Dur(Duration::from_secs(4));
    cfg.media.svg_timeout = cfg.media.job_timeout;
    let p = Parasol::start(cfg).await;
    // The original is cached before the one worker gets stuck.
    assert_eq!(get(&p.url(&origin.url("/photo.jpg"))).await.status(), 200);
    let url = p.url(&origin.url("/noise.svg"));
    let stuck = tokio::spawn(async move { get_within(&url, CPU_BOUND).await });
    let running = eventually_async(|| async { p.metric("parasol_media_jobs_running").await == 1 });
    assert!(running.await, "the filter holds the one worker");
    let avatar = format!("{}/avatar", p.url(&origin.url("/photo.jpg")));
    let r = get_within(&avatar, Duration::from_secs(10)).await;
    assert_eq!(r.status(), 503, "a render beyond the queue is refused, not queued");
    assert_eq!(r.headers()["x-parasol-error"], "media_busy");
    assert_eq!(stuck.await.unwrap().status(), 422);
    assert_eq!(get_within(&avatar, CPU_BOUND).await.status(), 200, "not remembered");
    assert!(p.metric(&jobs("busy")).await >= 1);
    p.stop().await;
}

#[tokio::test]
async fn the_self_check_proves_the_sandbox_from_inside_a_real_worker() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "a file a worker must never read").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_parasol"))
        .current_dir(dir.path())
        .env("PARASOL_SECRET_IN_THE_SERVER_ENV", "must not reach the worker")
        .args(["media-worker", "--self-check", "--open"])
        .arg(&secret)
        .args(["--connect", &listener.local_addr().unwrap().to_string()])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    eprintln!("{report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the self-check passed");
    let probes = [
        "open",
        "connect",
        "exec",
        "thread",
        "allocate",
        "signal_parent",
        "raise_limit",
        "read_stdout",
    ];
    for probe in probes {
        let verdict = report[probe].as_str().unwrap();
        assert!(verdict.starts_with("refused"), "{probe}: {verdict}");
    }
    assert_eq!(report["descriptors"], serde_json::json!([0, 1, 2]));
    assert_eq!(report["environment"], 0, "an empty environment");
    assert_eq!(report["address_space"][0], 512u64 << 20);
    assert_ne!(report["uid"], 0, "never root");
    assert!(listener.accept().is_err(), "nothing connected to the listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starved_of_the_cpu_is_not_blamed_on_its_file() {
    let origin = Origin::start("127.0.0.46").await;
    origin.route("/noise.svg", Route::ok(crate::pool::blurs(7)));
    let dir = tempfile::tempdir().unwrap();
    let media = [("workers", "1"), ("job_timeout", "3s"), ("svg_timeout", "2s")];
    let (child, public, admin) = serve(dir.path(), "127.0.0.46/32", &media);
    let url = signed_url(public, &origin.url("/noise.svg"));
    let first = {
        let url = url.clone();
        tokio::spawn(async move { get_within(&url, CPU_BOUND).await })
    };
    // Stopped at once, its worker uses no CPU until the deadline: the machine, not the file.
    let worker = busy_worker(child.0.id()).await;
    assert!(Command::new("kill").args(["-STOP", &worker.to_string()]).status().unwrap().success());
    let r = first.await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-parasol-error"], "media_busy");
    assert_eq!(metric(admin, &jobs("starved")).await, 1);
    // Not remembered, not negative-cached: the next viewer gets a real try, and the verdict.
    let r = get_within(&url, CPU_BOUND).await;
    assert_eq!(r.status(), 422);
    assert_eq!(metric(admin, &jobs("too_costly")).await, 1);
    child.sigterm();
    assert!(child.wait().await.success());
}

/// ffmpeg run as parasol runs it (`parasol media-worker --tool`), on `input` as its stdin,
/// with `args`: its exit status, stdout and stderr.
fn sandboxed_ffmpeg(input: &Path, args: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_parasol"))
        .args(["media-worker", "--memory", "536870912", "--cpu-seconds", "10", "--tool"])
        .arg(parasol::media::worker::tool::locate("ffmpeg").unwrap())
        .arg("--")
        .args(args.split_whitespace())
        .stdin(std::fs::File::open(input).unwrap())
        .output()
        .unwrap()
}

/// The sandbox ffmpeg runs in, proved from inside: it reads its input and nothing else, and
/// connects nowhere, even when the file itself asks it to (an HLS playlist naming a URL and a
/// local file, the classic way a video makes ffmpeg fetch or leak).
#[tokio::test]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn ffmpeg_reads_only_its_input_and_connects_nowhere() {
    let listener = std::net::TcpListener::bind("127.0.0.44:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "not for ffmpeg").unwrap();
    let playlist = dir.path().join("playlist.m3u8");
    let at = listener.local_addr().unwrap();
    std::fs::write(
        &playlist,
        format!(
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://{at}/leak.ts\n#EXTINF:1,\n\
             file:{}\n#EXT-X-ENDLIST\n",
            secret.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = sandboxed_ffmpeg(
        &playlist,
        "-hide_banner -nostdin -f hls -allowed_extensions ALL -protocol_whitelist file,http,tcp \
         -i /dev/stdin -c copy -f null -",
    );
    assert!(!out.status.success(), "nothing to read, nothing to fetch");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(listener.accept().is_err(), "no connection reached the listener");
    let opened =
        sandboxed_ffmpeg(&playlist, &format!("-hide_banner -nostdin -i {}", secret.display()));
    let stderr = String::from_utf8_lossy(&opened.stderr);
    assert!(stderr.contains("Permission denied"), "another file is refused: {stderr}");

    // The same sandbox does its job on a real video.
    let video = dir.path().join("v.mp4");
    let clip = "-f lavfi -i color=c=red:s=64x48:d=1 -c:v libx264 -preset ultrafast";
    std::fs::write(&video, crate::variants::ffmpeg_make(clip, "mp4")).unwrap();
    let args = parasol::media::worker::tool::frame_args().join(" ");
    let out = sandboxed_ffmpeg(&video, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frame = image::load_from_memory(&out.stdout).unwrap();
    assert_eq!((frame.width(), frame.height()), (64, 48));
    // And it writes nowhere: a frame asked for as a file is not written.
    let elsewhere = dir.path().join("written.png");
    let args =
        format!("-hide_banner -nostdin -i /dev/stdin -frames:v 1 -y {}", elsewhere.display());
    let out = sandboxed_ffmpeg(&video, &args);
    assert!(!out.status.success());
    assert!(std::fs::metadata(&elsewhere).map_or(true, |m| m.len() == 0), "nothing written");
}

/// A video whose one frame is 16000 × 16000 (three quarters of a gigabyte decoded, from a
/// file of a few hundred KiB): refused within the deadline, at the sandbox's cost, with the
/// server's memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(has_ffmpeg), ignore = "needs ffmpeg: apt-get install ffmpeg")]
async fn video_bombs_cost_the_sandbox_not_the_server() {
    let bomb = "-f lavfi -i color=c=black:s=16000x16000 -frames:v 1 -c:v png";
    let bytes = crate::variants::ffmpeg_make(bomb, "mov");
    assert!(bytes.len() < 1 << 20, "small on disk: {} bytes", bytes.len());
    let origin = Origin::start("127.0.0.45").await;
    origin.route("/bomb.mov", Route::ok(bytes));
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(640, 480)));
    let cache = tempfile::tempdir().unwrap();
    let (child, public, _admin) = serve(cache.path(), "127.0.0.45/32", &[("job_timeout", "5s")]);
    let pid = child.0.id();
    let before = rss_kib(pid) / 1024;
    let peaks = Peaks::watch(pid);
    let started = Instant::now();
    let url = format!("{}/static", signed_url(public, &origin.url("/bomb.mov")));
    let r = get_within(&url, CPU_BOUND).await;
    assert!([415, 422].contains(&r.status().as_u16()), "refused: {}", r.status());
    assert!(started.elapsed() < CPU_BOUND);
    let avatar = format!("{}/avatar", signed_url(public, &origin.url("/photo.jpg")));
    assert_eq!(get_within(&avatar, CPU_BOUND).await.status(), 200);
    let (server, worker) = (peaks.server_mib(), peaks.worker_mib());
    drop(peaks);
    eprintln!("server RSS {before} MiB, peak {server} MiB; worker/tool peak {worker} MiB");
    assert!(server < before + 64, "the server's memory stayed flat: {before} -> {server} MiB");
    assert!(worker <= 512, "the tool stayed within media.worker_memory: {worker} MiB");
    child.sigterm();
    assert!(child.wait().await.success());
}
