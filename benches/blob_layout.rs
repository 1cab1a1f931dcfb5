//! CPU per 64 KiB blob stored and later evicted, by on-disk layout, with a working set of
//! 4,000 blobs (256 MiB) held while 20,000 pass through:
//! - `files`: a temp file, its write, a rename into a fan-out directory; later an unlink
//!   (parasol's layout for blobs served without re-hashing);
//! - `files in place`: created under the content name at once; later an unlink (blobs
//!   re-hashed on every load);
//! - `segments`: appended to a 64 MiB file at a 4 KiB-aligned offset; later a hole punched
//!   (`fallocate`), the layout a segment store would use.
//!
//! User + system CPU of the process (getrusage), median of 3 rounds, each on a fresh
//! directory under `BLOB_LAYOUT_DIR` (default: a temp dir; a fresh ext4 is fairer):
//!
//!   cargo bench --bench blob_layout

use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOBS: usize = 20_000;
const HELD: usize = 4_000;
const BLOB: usize = 64 << 10;
const SEGMENT: u64 = 64 << 20;

fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let (user, system) = (usage.user_time(), usage.system_time());
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(user) + t(system)
}

fn name(i: usize) -> (String, String) {
    let hex = blake3::hash(&i.to_le_bytes()).to_hex().to_string();
    (hex[0..2].to_string(), hex)
}

/// µs of CPU per blob for `store` then `evict` of each blob, `HELD` kept at a time.
fn per_blob(mut store: impl FnMut(usize), mut evict: impl FnMut(usize)) -> f64 {
    let started = cpu_seconds();
    for i in 0..BLOBS {
        store(i);
        if i >= HELD {
            evict(i - HELD);
        }
    }
    (cpu_seconds() - started) / BLOBS as f64 * 1e6
}

fn files(dir: &Path, body: &[u8], in_place: bool) -> f64 {
    for i in 0..=255u8 {
        std::fs::create_dir_all(dir.join("blobs").join(format!("{i:02x}"))).unwrap();
    }
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let path = |i| {
        let (fan, hex) = name(i);
        dir.join("blobs").join(fan).join(hex)
    };
    let write = |path: &Path| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path).unwrap();
        std::io::Write::write_all(&mut file, body).unwrap();
    };
    per_blob(
        |i| {
            if in_place {
                write(&path(i));
            } else {
                let temp = dir.join("tmp").join(name(i).1);
                write(&temp);
                std::fs::rename(&temp, path(i)).unwrap();
            }
        },
        |i| std::fs::remove_file(path(i)).unwrap(),
    )
}

fn segments(dir: &Path, body: &[u8]) -> f64 {
    let aligned = (body.len() as u64).div_ceil(4096) * 4096;
    let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    let mut open: Vec<std::fs::File> = Vec::new();
    let mut places: Vec<(usize, u64)> = Vec::with_capacity(BLOBS);
    let mut end = SEGMENT;
    let started = cpu_seconds();
    for i in 0..BLOBS {
        if end + aligned > SEGMENT {
            let path = dir.join(format!("{:016x}.seg", open.len()));
            let opened =
                std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path);
            open.push(opened.unwrap());
            end = 0;
        }
        open[open.len() - 1].write_all_at(body, end).unwrap();
        places.push((open.len() - 1, end));
        end += aligned;
        if i >= HELD {
            let (segment, offset) = places[i - HELD];
            rustix::fs::fallocate(&open[segment], mode, offset, aligned).unwrap();
        }
    }
    (cpu_seconds() - started) / BLOBS as f64 * 1e6
}

fn main() {
    let base = std::env::var_os("BLOB_LAYOUT_DIR").map(std::path::PathBuf::from);
    let body: Vec<u8> = (0..BLOB).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut rounds: [Vec<f64>; 3] = Default::default();
    for _ in 0..3 {
        for (layout, results) in rounds.iter_mut().enumerate() {
            let dir = match &base {
                Some(base) => tempfile::tempdir_in(base),
                None => tempfile::tempdir(),
            }
            .unwrap();
            results.push(match layout {
                0 => files(dir.path(), &body, false),
                1 => files(dir.path(), &body, true),
                _ => segments(dir.path(), &body),
            });
        }
    }
    println!("CPU µs per 64 KiB blob stored and later evicted (median of 3; rounds):");
    for (layout, mut results) in ["files", "files in place", "segments"].into_iter().zip(rounds) {
        let shown: Vec<String> = results.iter().map(|r| format!("{r:.1}")).collect();
        results.sort_by(f64::total_cmp);
        println!("  {layout:<15} {:>6.1}   ({})", results[1], shown.join(", "));
    }
}
