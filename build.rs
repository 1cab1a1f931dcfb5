//! Finds the real peers some integration tests run beside parasol (Debian's nginx and camo,
//! s3s-fs, ffmpeg, libheif, python3, root for a tmpfs mount) and tells the tests which are here, so that a plain
//! `cargo test` on a machine without them reports those tests as ignored, with the reason,
//! instead of passing them untested. `.ci/run` installs every peer and fails if any test was
//! ignored.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let path: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let mut dirs = path.clone();
    dirs.extend(["/usr/sbin", "/usr/bin"].map(PathBuf::from));
    let on_path = |name: &str| dirs.iter().any(|d| d.join(name).is_file());
    let peers = [
        ("has_nginx", on_path("nginx") && on_path("openssl")),
        ("has_camo", Path::new("/usr/share/camo/server.js").is_file()),
        ("has_s3s", on_path("s3s-fs")),
        ("has_root", is_root()),
        ("has_ffmpeg", on_path("ffmpeg")),
        ("has_heif", on_path("heif-convert") && on_path("heif-enc")),
        // Debian's python3, which runs the scripted media workers of the pool's tests.
        ("has_python", Path::new("/usr/bin/python3").is_file()),
        // Debian's prometheus (and its promtool), for the alerts and the dashboard.
        ("has_prometheus", on_path("prometheus") && on_path("promtool")),
    ];
    for (cfg, present) in peers {
        println!("cargo:rustc-check-cfg=cfg({cfg})");
        if present {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
    // Installing a peer changes these directories: look again then. Only directories that
    // exist are named (a missing one would make Cargo rerun this on every build).
    println!("cargo:rerun-if-env-changed=PATH");
    for dir in dirs.iter().map(PathBuf::as_path).chain([Path::new("/usr/share/camo")]) {
        if dir.is_dir() {
            println!("cargo:rerun-if-changed={}", dir.display());
        }
    }
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"));
    uid.and_then(|l| l.split_whitespace().next()) == Some("0")
}
