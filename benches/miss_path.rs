//! CPU per stored miss, in process: a running parasol (`Bound`, its store, fetcher, audit log,
//! ledger and eviction) asked for URLs it has never seen, each with bytes of its own, its
//! response read whole; the viewer side without sockets (`handle_public`), the origin a copy of
//! this bench in a process of its own, so this process's CPU (getrusage: user + system) is
//! parasol's miss path alone. The body is a real baseline JPEG of about 64 KiB (as the
//! Fediverse serves photos, no metadata) made distinct per URL inside its entropy-coded data.
//!
//! Each layout gets its own parasol whose disk budget (`DISK_MIB`, default 64) is filled
//! before measuring, so every miss also evicts, as in W4; the layouts are measured in
//! alternating rounds so a machine's drift touches them alike. Median of `ROUNDS`:
//!
//!   cargo bench --bench miss_path     # ROUNDS=5 MISSES=4000 CONCURRENCY=8 DISK_MIB=64
//!   LAYOUTS=segments cargo bench --bench miss_path   # one layout only (files, segments), to profile
//!   CHUNKED=1 ...                     # the origin sends no length (chunked), as W6's does,
//!   CHUNK_KIB=16 ...                  # in frames of this many KiB

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::io::{BufRead, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const KEY: &str = "miss-path-bench-key-0123456789abcdef";
/// Where the origin puts each URL's own bytes: 24 bytes of the scan.
const TAG: usize = 24;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A baseline JPEG of a noisy 480×360 picture (a photo's entropy) and the offset inside its
/// entropy-coded data where `TAG` bytes free of 0xFF may be replaced without touching a marker.
fn photo() -> (Vec<u8>, usize) {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let image = image::RgbImage::from_fn(480, 360, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let noise = (seed & 0x3f) as u32;
        let c = |v: u32| (v.min(255)) as u8;
        image::Rgb([c(x / 2 + noise), c(y / 2 + noise), c((x + y) / 4 + noise)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode_image(&image).unwrap();
    let sos = out.windows(2).position(|w| w == [0xff, 0xda]).expect("a scan");
    let mut at = sos + 1000;
    while out[at - 1..at + TAG + 1].contains(&0xff) {
        at += 1;
    }
    (out, at)
}

/// The origin process: serves `photo()` at every path with the path's hash in its scan; prints
/// its address on stdout, then serves until its stdin closes.
fn origin_main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        std::io::stdout().flush().unwrap();
        let (body, at) = photo();
        let body = Arc::new(body);
        let chunked = std::env::var("CHUNKED").is_ok_and(|v| v == "1");
        // Bytes per chunk frame (CHUNK_KIB, default 16).
        let piece =
            std::env::var("CHUNK_KIB").ok().and_then(|v| v.parse().ok()).unwrap_or(16) << 10;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let mut bytes = body.to_vec();
                        let hex = blake3::hash(req.uri().path().as_bytes()).to_hex();
                        bytes[at..at + TAG].copy_from_slice(&hex.as_bytes()[..TAG]);
                        let bytes = Bytes::from(bytes);
                        // Without a length: chunked, as nginx's sub_filter sends W6's photos.
                        let body = if chunked {
                            let pieces: Vec<_> = (0..bytes.len())
                                .step_by(piece)
                                .map(|at| {
                                    Ok(Frame::data(bytes.slice(at..(at + piece).min(bytes.len()))))
                                })
                                .collect();
                            StreamBody::new(futures_util::stream::iter(pieces)).boxed()
                        } else {
                            Full::new(bytes).map_err(|never| match never {}).boxed()
                        };
                        let response = Response::builder()
                            .header("content-type", "image/jpeg")
                            .body(body)
                            .unwrap();
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        // Ends with the bench: its stdin is a pipe the bench holds.
        let _ = tokio::io::AsyncReadExt::read(&mut tokio::io::stdin(), &mut [0u8; 1]).await;
    });
}

/// The origin child, killed when dropped.
struct Origin(Child);

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_origin() -> (Origin, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("MISS_PATH_ORIGIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (Origin(child), line.trim().to_string())
}

/// User + system CPU of this process so far (not the origin's: it is another process).
fn cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

struct Layout {
    name: &'static str,
    state: Arc<parasol::server::Public>,
    base: url::Url,
    _bound: parasol::Bound,
    _dir: tempfile::TempDir,
}

async fn layout(name: &'static str, disk: usize) -> Layout {
    let dir =
        tempfile::tempdir_in(std::env::var("MISS_PATH_DIR").unwrap_or("/tmp".into())).unwrap();
    let segments = if name == "segments" { "segment_max_object_bytes = \"256 KiB\"" } else { "" };
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [signing]\nkeys = [\"{KEY}\"]\n\
         [cache]\ndir = \"{}\"\ndisk_bytes = {disk}\nmemory_bytes = \"16 MiB\"\n{segments}\n\
         [fetch]\nallow_networks = [\"127.0.0.2/32\"]\nmax_per_origin = 64\n",
        dir.path().display()
    );
    let config = parasol::Config::from_sources("bench", &toml, std::iter::empty()).unwrap();
    let options =
        parasol::Options { worker_exe: env!("CARGO_BIN_EXE_parasol").into(), ..Default::default() };
    let bound = parasol::Bound::bind(config, options).await.unwrap();
    let state = bound.public_state();
    let base = state.proxy.config().server.public_base_url.clone();
    Layout { name, state, base, _bound: bound, _dir: dir }
}

/// `n` misses, `concurrency` at a time, each a URL never asked before (`round` names them).
async fn misses(layout: &Layout, origin: &str, round: &str, n: usize, concurrency: usize) {
    let signer = Arc::new(parasol::signing::Signer::new([KEY]));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (state, base, signer) = (layout.state.clone(), layout.base.clone(), signer.clone());
        let (origin, round) = (origin.to_string(), round.to_string());
        tasks.spawn(async move {
            for i in (worker..n).step_by(concurrency) {
                let source = format!("http://{origin}/u/{round}-{i}.jpg");
                let url = parasol::api::native::sign_url(&base, &signer, &source, None);
                let path = url::Url::parse(&url).unwrap().path().to_string();
                let request = Request::get(path)
                    .header("accept-encoding", "identity")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = parasol::server::handle_public(state.clone(), request).await;
                assert_eq!(response.status(), 200, "miss {source}");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert!(body.len() > 30_000, "a whole photo: {} bytes", body.len());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn main() {
    if std::env::var_os("MISS_PATH_ORIGIN").is_some() {
        return origin_main();
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (rounds, n, concurrency) = (env("ROUNDS", 5), env("MISSES", 4000), env("CONCURRENCY", 8));
    let disk = env("DISK_MIB", 64) << 20;
    let names = std::env::var("LAYOUTS").unwrap_or("files segments".into());
    let (_origin, origin) = start_origin();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let layouts: Vec<Layout> = rt.block_on(async {
        let mut layouts = Vec::new();
        for name in names.split_whitespace() {
            let name = match name {
                "files" => "files",
                "segments" => "segments",
                other => panic!("LAYOUTS: files or segments, not {other}"),
            };
            let layout = layout(name, disk).await;
            // Fill the budget twice over: from here on every miss evicts.
            misses(&layout, &origin, "warm", 2 * disk / (64 << 10) + 500, concurrency).await;
            layouts.push(layout);
        }
        layouts
    });
    let size = photo().0.len();
    eprintln!(
        "{n} misses of {size} bytes per round, {concurrency} at a time, disk budget {disk} bytes"
    );
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); layouts.len()];
    for round in 1..=rounds {
        for (i, layout) in layouts.iter().enumerate() {
            let (cpu0, wall0) = (cpu(), Instant::now());
            rt.block_on(misses(layout, &origin, &format!("r{round}"), n, concurrency));
            let per = (cpu() - cpu0).as_secs_f64() * 1e6 / n as f64;
            let rate = n as f64 / wall0.elapsed().as_secs_f64();
            eprintln!(
                "round {round}, {}: {per:.1} µs CPU per miss, {rate:.0} misses/s",
                layout.name
            );
            results[i].push(per);
        }
    }
    println!("CPU µs per stored 64 KiB miss (median of {rounds} rounds of {n}):");
    for (layout, runs) in layouts.iter().zip(&mut results) {
        runs.sort_by(f64::total_cmp);
        println!("  {:<10} {:7.1}   (rounds {:?})", layout.name, runs[runs.len() / 2], runs);
    }
}
