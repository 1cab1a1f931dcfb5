//! The disk store: bounded size, integrity, retention, full disks and crashes.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// Bytes of blob files actually on disk.
fn blob_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(&dir.join("blobs"))
}

fn blob_path(dir: &Path, body: &[u8]) -> std::path::PathBuf {
    let hex = blake3::hash(body).to_hex().to_string();
    dir.join("blobs").join(&hex[0..2]).join(&hex)
}

#[tokio::test]
async fn the_disk_store_stays_within_its_budget_after_three_times_over() {
    const OBJECT: usize = 20 * 1024;
    const BUDGET: u64 = 200 * 1024;
    let origin = Origin::start("127.0.0.12").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = file_each(config(dir.path(), &["127.0.0.12/32"]));
    cfg.cache.disk_bytes = parasol::config::Size(BUDGET);
    let p = Parasol::start(cfg).await;
    let mut bodies = Vec::new();
    for i in 0..30u64 {
        let path = format!("/{i}.png");
        let body = png_bytes(OBJECT, 100 + i);
        origin.route(&path, Route::ok(body.clone()));
        assert_eq!(get(&p.url(&origin.url(&path))).await.status(), 200);
        let on_disk = blob_bytes(dir.path());
        assert!(on_disk <= BUDGET + OBJECT as u64, "{on_disk} bytes on disk after {i}");
        bodies.push((path, body));
    }
    assert!(p.metric("parasol_evictions_total").await >= 19);
    let bytes = p.metric("parasol_cache_bytes{tier=\"disk\"}").await;
    assert_eq!(bytes, blob_bytes(dir.path()), "the metric is what is on disk");
    p.stop().await;
    // After a restart the survivors are served without the origin, and evicted ones refetched.
    let p = Parasol::start(file_each(config_with_budget(dir.path(), BUDGET))).await;
    for (path, body) in bodies.iter().rev().take(5) {
        assert_eq!(&body_of(&p, &origin, path).await, body);
        assert_eq!(origin.hits(path), 1, "{path} survived on disk");
    }
    p.stop().await;
}

fn config_with_budget(dir: &Path, budget: u64) -> parasol::Config {
    let mut cfg = config(dir, &["127.0.0.12/32", "127.0.0.13/32"]);
    cfg.cache.disk_bytes = parasol::config::Size(budget);
    cfg
}

async fn body_of(p: &Parasol, origin: &Origin, path: &str) -> bytes::Bytes {
    let r = get(&p.url(&origin.url(path))).await;
    assert_eq!(r.status(), 200, "{path}");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let body = body(r).await;
    assert_eq!(etag, etag_of(&body), "the ETag names the bytes served");
    body
}

#[tokio::test]
async fn corrupt_or_truncated_blobs_are_never_served_and_are_refetched() {
    let origin = Origin::start("127.0.0.13").await;
    let small = png_bytes(10_000, 200);
    let large = png_bytes(300_000, 201);
    origin.route("/small.png", Route::ok(small.clone()));
    origin.route("/large.png", Route::ok(large.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = file_each(config_with_budget(dir.path(), 10 << 20));
    cfg.cache.memory_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg.clone()).await;
    assert_eq!(body_of(&p, &origin, "/small.png").await, small);
    assert_eq!(body_of(&p, &origin, "/large.png").await, large);
    p.stop().await;

    // Bit rot in the small blob (same length), and the large one cut short.
    let small_blob = blob_path(dir.path(), &small);
    let mut rotten = std::fs::read(&small_blob).unwrap();
    rotten[5000] ^= 0xff;
    std::fs::write(&small_blob, rotten).unwrap();
    let large_blob = blob_path(dir.path(), &large);
    std::fs::OpenOptions::new().write(true).open(&large_blob).unwrap().set_len(100_000).unwrap();

    let p = Parasol::start(cfg).await;
    assert_eq!(body_of(&p, &origin, "/small.png").await, small, "refetched, not served rotten");
    assert_eq!(body_of(&p, &origin, "/large.png").await, large, "refetched, not served short");
    assert_eq!(origin.hits("/small.png"), 2);
    assert_eq!(origin.hits("/large.png"), 2);
    // Each bad blob dropped once; the truncated large one perhaps twice, since the start-up
    // scrub (which re-hashes large blobs) may find it at the same moment as the request.
    let dropped = p.metric("parasol_blobs_dropped_total").await;
    assert!((2..=3).contains(&dropped), "dropped {dropped}");
    assert_eq!(std::fs::read(&small_blob).unwrap(), small.to_vec(), "the blob was rewritten");
    p.stop().await;
}

#[tokio::test]
async fn retention_drops_what_nobody_asked_for() {
    let origin = Origin::start("127.0.0.12").await;
    let img = png_bytes(5_000, 202);
    origin.route("/old.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with_budget(dir.path(), 10 << 20);
    cfg.cache.retention = parasol::config::Dur(Duration::from_secs(1));
    let p = Parasol::start(cfg).await;
    assert_eq!(body_of(&p, &origin, "/old.png").await, img);
    let mut gone = false;
    for _ in 0..100 {
        if p.blob_count() == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the idle blob was dropped");
    assert_eq!(body_of(&p, &origin, "/old.png").await, img);
    assert_eq!(origin.hits("/old.png"), 2, "and refetched when asked for again");
    p.stop().await;
}

#[tokio::test]
async fn orphan_blob_files_are_removed_at_start() {
    let origin = Origin::start("127.0.0.12").await;
    let img = png_bytes(4_000, 203);
    origin.route("/kept.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(file_each(config_with_budget(dir.path(), 10 << 20))).await;
    assert_eq!(body_of(&p, &origin, "/kept.png").await, img);
    p.stop().await;
    // A blob no index record names, as a crash between rename and index commit leaves.
    let orphan = png_bytes(4_000, 204);
    let orphan_path = blob_path(dir.path(), &orphan);
    std::fs::create_dir_all(orphan_path.parent().unwrap()).unwrap();
    std::fs::write(&orphan_path, &orphan).unwrap();
    // Its mtime must predate the next start for the sweep to judge it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let p = Parasol::start(file_each(config_with_budget(dir.path(), 10 << 20))).await;
    assert!(eventually(|| !orphan_path.exists()).await, "the orphan was removed");
    assert!(blob_path(dir.path(), &img).exists(), "the indexed blob stays");
    assert_eq!(body_of(&p, &origin, "/kept.png").await, img);
    assert_eq!(origin.hits("/kept.png"), 1);
    p.stop().await;
}

/// Mounts a small tmpfs at `at`; false where this process may not mount (not root).
fn mount_tmpfs(at: &Path, size: &str) -> bool {
    std::fs::create_dir_all(at).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
#[cfg_attr(not(has_root), ignore = "needs root, to mount a small tmpfs")]
async fn a_full_disk_fails_one_fill_cleanly_evicts_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    assert!(mount_tmpfs(&cache, "6m"), "a 6 MiB tmpfs is mounted (root may mount one)");
    let _unmount = Unmount(cache.clone());
    let origin = Origin::start("127.0.0.13").await;
    // The configured budget is far above the 6 MiB the file system really has.
    let p = Parasol::start(config_with_budget(&cache, 1 << 30)).await;
    let (mut full, mut served) = (0, 0);
    for i in 0..12u64 {
        let path = format!("/big{i}.png");
        let expected = png_bytes(1 << 20, 300 + i);
        origin.route(&path, Route::ok(expected.clone()));
        // Each object is served at the first or second try; a try that hits ENOSPC is a clean
        // 503 that leaves no temp file and makes room.
        for _ in 0..2 {
            let r = get(&p.url(&origin.url(&path))).await;
            if r.status() == 200 {
                assert_eq!(body(r).await, expected);
                served += 1;
                break;
            }
            assert_eq!(r.status(), 503, "{path}");
            assert_eq!(r.headers()["x-parasol-error"], "storage_full");
            full += 1;
        }
        assert_eq!(files_under(&cache.join("tmp")), 0, "no partial file left");
    }
    assert_eq!(served, 12, "every object was served once there was room");
    assert!(full >= 1, "the disk did fill up");
    assert!(p.metric("parasol_evictions_total").await >= 1);
    p.stop().await;
}

/// SIGKILL in the middle of 200 concurrent fills, then a restart: every entry served matches
/// its ETag (hashed here), entries the index kept cost no origin request, and only what was
/// lost is fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_two_hundred_fills_loses_entries_but_never_serves_wrong_bytes() {
    sigkill_during_fills(false).await;
}

/// The same with every file in segments (`cache.segment_max_object_bytes`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_fills_into_segments_loses_entries_but_never_serves_wrong_bytes() {
    sigkill_during_fills(true).await;
}

async fn sigkill_during_fills(segments: bool) {
    const FILLS: u64 = 200;
    let origin = Origin::start("127.0.0.14").await;
    let mut expected = Vec::new();
    for i in 0..FILLS {
        let path = format!("/k{i}.png");
        let body = png_bytes(20_000 + i as usize * 97, 400 + i);
        // Staggered delays: at the kill some fills are done, some mid-body, some not started.
        origin.route(&path, Route::ok(body.clone()).delay(Duration::from_millis(i * 12)));
        expected.push((path, body));
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("[\"{KEY}\"]");
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.14/32\"]"),
        ("PARASOL__SIGNING__KEYS", keys.as_str()),
        ("PARASOL__FETCH__MAX_PER_ORIGIN", "200"),
        ("PARASOL__CACHE__SEGMENT_MAX_OBJECT_BYTES", if segments { "64KiB" } else { "0B" }),
    ];
    let (child, public, _) = crate::cli::spawn_serving(dir.path(), &envs, None);
    let signed = |public, path: &str| signed_url(public, &origin.url(path));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let viewers: Vec<_> = expected
        .iter()
        .map(|(path, _)| {
            let url = signed(public, path);
            let done = done.clone();
            tokio::spawn(async move {
                let ok = client().get(&url).send().await.is_ok_and(|r| r.status() == 200);
                if ok {
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Kill once some fills are complete, and durable (the index syncs every DURABLE_EVERY),
    // while most are still running.
    let started = eventually(|| done.load(std::sync::atomic::Ordering::SeqCst) >= 10).await;
    assert!(started, "fills under way");
    tokio::time::sleep(parasol::cache::index::DURABLE_EVERY * 3 / 2).await;
    let mut child = child;
    child.0.kill().unwrap(); // SIGKILL
    let _ = child.0.wait();
    for v in viewers {
        let _ = v.await; // completed, failed or cut: all fine
    }

    // What survived, by the index the killed process left behind.
    let survived: Vec<bool> = {
        let index =
            parasol::cache::index::Index::open(&dir.path().join("cache/index.redb")).unwrap();
        let mut out = Vec::new();
        for (path, _) in &expected {
            let source = parasol::api::parse_source(&origin.url(path)).unwrap();
            let key = parasol::cache::Key::new(source.as_str(), None);
            out.push(index.get(key).await.unwrap().is_some());
        }
        out
    };
    let kept = survived.iter().filter(|s| **s).count();
    assert!(kept > 0 && kept < FILLS as usize, "the kill landed mid-run ({kept} kept)");
    let hits_before: Vec<usize> = expected.iter().map(|(p, _)| origin.hits(p)).collect();
    for (path, body) in &expected {
        origin.route(path, Route::ok(body.clone())); // no more delays
    }

    let (child, public, _) = crate::cli::spawn_serving(dir.path(), &envs, None);
    for (i, (path, body)) in expected.iter().enumerate() {
        let r = get(&signed(public, path)).await;
        assert_eq!(r.status(), 200, "{path}");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        let served = r.bytes().await.unwrap();
        assert_eq!(etag, etag_of(&served), "{path}: ETag matches the bytes");
        assert_eq!(&served, body, "{path}: the right bytes");
        let asked = origin.hits(path) - hits_before[i];
        assert_eq!(asked, usize::from(!survived[i]), "{path}: origin asked only if lost");
    }
    assert_eq!(files_under(&dir.path().join("cache/tmp")), 0, "the temp area was swept");
    let files = files_under(&dir.path().join("cache/blobs"));
    assert_eq!(files == 0, segments, "{files} blob files");
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test]
async fn the_background_scrub_catches_rot_in_large_blobs_before_anyone_asks() {
    let origin = Origin::start("127.0.0.13").await;
    let large = png_bytes(200_000, 500);
    origin.route("/video.png", Route::ok(large.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with_budget(dir.path(), 10 << 20);
    cfg.cache.memory_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg.clone()).await;
    assert_eq!(body_of(&p, &origin, "/video.png").await, large);
    p.stop().await;
    let blob = blob_path(dir.path(), &large);
    let mut rotten = std::fs::read(&blob).unwrap();
    rotten[150_000] ^= 0x01; // same length: only hashing can tell
    std::fs::write(&blob, rotten).unwrap();
    let p = Parasol::start(cfg).await;
    assert!(eventually(|| !blob.exists()).await, "the scrub dropped the rotten blob");
    assert_eq!(body_of(&p, &origin, "/video.png").await, large);
    assert_eq!(origin.hits("/video.png"), 2);
    p.stop().await;
}

#[tokio::test]
async fn parasol_verify_repairs_the_store_offline() {
    let origin = Origin::start("127.0.0.13").await;
    let (a, b, c) = (png_bytes(8_000, 510), png_bytes(150_000, 511), png_bytes(9_000, 512));
    origin.route("/a.png", Route::ok(a.clone()));
    origin.route("/b.png", Route::ok(b.clone()));
    origin.route("/c.png", Route::ok(c.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = file_each(config_with_budget(&cache, 10 << 20));
    let p = Parasol::start(cfg.clone()).await;
    for path in ["/a.png", "/b.png", "/c.png"] {
        assert_eq!(get(&p.url(&origin.url(path))).await.status(), 200);
    }
    let run_verify = || {
        Command::new(env!("CARGO_BIN_EXE_parasol"))
            .arg("verify")
            .env("PARASOL__CACHE__DIR", &cache)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let busy = run_verify();
    assert!(!busy.status.success(), "refuses to run beside a live parasol");
    assert!(String::from_utf8_lossy(&busy.stderr).contains("is parasol running"));
    p.stop().await;

    let mut rotten = std::fs::read(blob_path(&cache, &a)).unwrap();
    rotten[100] ^= 0x80;
    std::fs::write(blob_path(&cache, &a), rotten).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(blob_path(&cache, &b))
        .unwrap()
        .set_len(10)
        .unwrap();
    let orphan = png_bytes(1_000, 513);
    std::fs::create_dir_all(blob_path(&cache, &orphan).parent().unwrap()).unwrap();
    std::fs::write(blob_path(&cache, &orphan), &orphan).unwrap();

    let out = run_verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], 3);
    assert_eq!(report["corrupt_blobs_removed"], 2);
    assert_eq!(report["records_removed"], 2);
    assert_eq!(report["orphans_removed"], 1);
    let again: serde_json::Value = serde_json::from_slice(&run_verify().stdout).unwrap();
    assert_eq!(again["records_removed"], 0, "a second run finds nothing: {again}");
    assert_eq!(again["blobs_checked"], 1);

    let p = Parasol::start(cfg).await;
    assert_eq!(body_of(&p, &origin, "/a.png").await, a);
    assert_eq!(body_of(&p, &origin, "/b.png").await, b);
    assert_eq!(body_of(&p, &origin, "/c.png").await, c);
    assert_eq!((origin.hits("/a.png"), origin.hits("/b.png"), origin.hits("/c.png")), (2, 2, 1));
    p.stop().await;
}

/// A store written with the earlier two-level layout (`blobs/ab/cd/<hash>`) is moved to the
/// one-level layout at start, once, and its entries are served without the origin.
#[tokio::test]
async fn a_store_in_the_two_level_layout_is_moved_and_kept() {
    let origin = Origin::start("127.0.0.13").await;
    let png = png_bytes(9_000, 97);
    origin.route("/old.png", Route::ok(png.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_each(config(dir.path(), &["127.0.0.13/32"]));
    let p = Parasol::start(cfg.clone()).await;
    assert_eq!(get(&p.url(&origin.url("/old.png"))).await.status(), 200);
    p.stop().await;
    // Put the blob where the old layout had it, and forget the layout.
    let one = blob_path(dir.path(), &png);
    let hex = blake3::hash(&png).to_hex().to_string();
    let two = dir.path().join("blobs").join(&hex[0..2]).join(&hex[2..4]).join(&hex);
    std::fs::create_dir_all(two.parent().unwrap()).unwrap();
    std::fs::rename(&one, &two).unwrap();
    std::fs::remove_file(dir.path().join("blobs.layout-1")).unwrap();

    let p = Parasol::start(cfg).await;
    assert!(one.exists() && !two.parent().unwrap().exists(), "moved up, old directory gone");
    let r = get(&p.url(&origin.url("/old.png"))).await;
    assert!(body(r).await == png);
    assert_eq!(origin.hits("/old.png"), 1, "served from the moved blob");
    p.stop().await;
}

/// Bytes allocated (not merely sized: holes do not count) to the segment files.
fn segment_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir.join("segments")) else { return 0 };
    entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

/// Flips `mask` into byte `offset` of `body` where it lies in a segment file under `cache`;
/// whether it was found there.
fn rot_in_segment(cache: &Path, body: &[u8], offset: usize, mask: u8) -> bool {
    for entry in std::fs::read_dir(cache.join("segments")).unwrap().flatten() {
        let mut bytes = std::fs::read(entry.path()).unwrap();
        if let Some(at) = bytes.windows(body.len()).position(|w| w == body) {
            bytes[at + offset] ^= mask;
            std::fs::write(entry.path(), bytes).unwrap();
            return true;
        }
    }
    false
}

/// With `cache.segment_max_object_bytes`, small files go into segment files, not a file each:
/// the budget holds by punched holes, the survivors are served after a restart without the
/// origin, and bytes rotten in a segment are refetched, never served.
#[tokio::test]
async fn small_files_in_segments_keep_the_budget_survive_a_restart_and_are_checked() {
    const OBJECT: usize = 20 * 1024;
    const BUDGET: u64 = 200 * 1024;
    let origin = Origin::start("127.0.0.13").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with_budget(dir.path(), BUDGET);
    cfg.cache.segment_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg.clone()).await;
    let mut bodies = Vec::new();
    for i in 0..30u64 {
        let path = format!("/s{i}.png");
        let body = png_bytes(OBJECT, 300 + i);
        origin.route(&path, Route::ok(body.clone()));
        assert_eq!(body_of(&p, &origin, &path).await, body);
        // Evicted blobs' holes are punched by a thread of their own within a tick or so.
        let within = || segment_blocks(dir.path()) <= BUDGET + 2 * OBJECT as u64;
        let held = segment_blocks(dir.path());
        assert!(eventually(within).await, "{held} bytes in segments after {i}");
        bodies.push((path, body));
    }
    assert_eq!(blob_bytes(dir.path()), 0, "no file per blob");
    assert!(segment_blocks(dir.path()) > 0);
    assert!(p.metric("parasol_evictions_total").await >= 19);
    p.stop().await;

    // Bit rot in the newest survivor's bytes, found where they lie in a segment.
    let (rotten_path, rotten_body) = bodies.last().unwrap().clone();
    let rotted = rot_in_segment(dir.path(), &rotten_body, 5000, 0xff);
    assert!(rotted, "the newest file's bytes are in a segment");
    let p = Parasol::start(cfg).await;
    for (path, body) in bodies.iter().rev().take(5) {
        assert_eq!(&body_of(&p, &origin, path).await, body);
        let fetched = if *path == rotten_path { 2 } else { 1 };
        assert_eq!(origin.hits(path), fetched, "{path}");
    }
    assert_eq!(p.metric("parasol_blobs_dropped_total").await, 1);
    assert_eq!(blob_bytes(dir.path()), 0);
    p.stop().await;
}

/// A store written with a file per blob (before segments were the default, or with
/// `segment_max_object_bytes = "0B"`) keeps serving its files after a restart with segments
/// on, without the origin; new files go into segments beside them; the budget counts both.
#[tokio::test]
async fn files_stored_one_each_are_kept_when_segments_come_on() {
    let origin = Origin::start("127.0.0.13").await;
    let (old, new) = (png_bytes(30_000, 610), png_bytes(30_000, 611));
    origin.route("/old.png", Route::ok(old.clone()));
    origin.route("/new.png", Route::ok(new.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(file_each(config_with_budget(dir.path(), 10 << 20))).await;
    assert_eq!(body_of(&p, &origin, "/old.png").await, old);
    p.stop().await;
    assert!(blob_path(dir.path(), &old).exists(), "a file of its own");

    let p = Parasol::start(config_with_budget(dir.path(), 10 << 20)).await;
    assert_eq!(body_of(&p, &origin, "/old.png").await, old);
    assert_eq!(origin.hits("/old.png"), 1, "served from its file after the restart");
    assert_eq!(body_of(&p, &origin, "/new.png").await, new);
    assert!(!blob_path(dir.path(), &new).exists(), "the new one is in a segment");
    assert_eq!(p.blob_count(), 2);
    let charged = p.metric("parasol_cache_bytes{tier=\"disk\"}").await;
    assert_eq!(charged, 30_000 + 32_768, "the file by its length, the segment blob by its blocks");
    p.stop().await;
}

/// Files far smaller than a block (emoji, avatars) are charged the whole blocks they take in
/// their segment, so the disk the segments hold stays within the budget (counted by length,
/// 30 files of 1,000 bytes would take 120 KiB of disk under a 40 KiB budget).
#[tokio::test]
async fn tiny_files_in_segments_are_charged_the_blocks_they_take() {
    const BUDGET: u64 = 40 * 1024;
    let origin = Origin::start("127.0.0.13").await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config_with_budget(dir.path(), BUDGET)).await;
    for i in 0..30u64 {
        let path = format!("/t{i}.png");
        let body = png_bytes(1_000, 600 + i);
        origin.route(&path, Route::ok(body.clone()));
        assert_eq!(body_of(&p, &origin, &path).await, body);
    }
    let within = || segment_blocks(dir.path()) <= BUDGET + 4096;
    let held = segment_blocks(dir.path());
    assert!(eventually(within).await, "{held} bytes of disk in segments");
    assert_eq!(blob_bytes(dir.path()), 0, "all in segments");
    let charged = p.metric("parasol_cache_bytes{tier=\"disk\"}").await;
    assert_eq!(charged % 4096, 0, "whole blocks: {charged}");
    assert!(p.metric("parasol_evictions_total").await >= 20);
    p.stop().await;
}

/// `parasol verify` checks files kept in segments by their place: rot there removes the
/// record, the good one stays and is served without the origin.
#[tokio::test]
async fn parasol_verify_checks_files_kept_in_segments() {
    let origin = Origin::start("127.0.0.13").await;
    let (a, c) = (png_bytes(8_000, 520), png_bytes(9_000, 521));
    origin.route("/sa.png", Route::ok(a.clone()));
    origin.route("/sc.png", Route::ok(c.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut cfg = config_with_budget(&cache, 10 << 20);
    cfg.cache.segment_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg.clone()).await;
    for path in ["/sa.png", "/sc.png"] {
        assert_eq!(get(&p.url(&origin.url(path))).await.status(), 200);
    }
    p.stop().await;
    assert!(rot_in_segment(&cache, &a, 100, 0x80), "a's bytes are in a segment");
    let run_verify = || {
        let out = Command::new(env!("CARGO_BIN_EXE_parasol"))
            .arg("verify")
            .env("PARASOL__CACHE__DIR", &cache)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let report = run_verify();
    assert_eq!((report["records"].as_u64(), report["blobs_checked"].as_u64()), (Some(2), Some(2)));
    assert_eq!(report["corrupt_blobs_removed"], 1, "{report}");
    assert_eq!(report["records_removed"], 1, "{report}");
    let again = run_verify();
    assert_eq!(
        (again["records_removed"].as_u64(), again["blobs_checked"].as_u64()),
        (Some(0), Some(1))
    );
    let p = Parasol::start(cfg).await;
    assert_eq!(body_of(&p, &origin, "/sc.png").await, c);
    assert_eq!(body_of(&p, &origin, "/sa.png").await, a);
    assert_eq!((origin.hits("/sc.png"), origin.hits("/sa.png")), (1, 2));
    p.stop().await;
}
