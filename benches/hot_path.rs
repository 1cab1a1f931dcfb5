//! Micro-benches of the serving hot path, in process and without sockets on the viewer side:
//! route + signature + key + memory hit -> response (200 and 304), a disk hit read in one
//! call, a small blob loaded from disk (its record, its bytes, their hash) by a parasol whose
//! memory tier cannot keep it, a refused signature, and blake3 over a fill. The origin is a real hyper server on
//! 127.0.0.2, asked once per object before measuring.
//!
//!   cargo bench --bench hot_path

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const KEY: &str = "hot-path-bench-key-0123456789abcdef";

/// `n` bytes that sniff as JPEG, the rest noise.
fn jpeg(n: usize, seed: u8) -> Bytes {
    let mut out = vec![0xff, 0xd8, 0xff, 0xe0];
    out.extend((0..n - 4).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    Bytes::from(out)
}

async fn origin(bodies: Vec<(&'static str, Bytes)>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0").await.expect("bind the bench origin");
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(bodies);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = bodies.iter().find(|(p, _)| *p == req.uri().path()).map(|(_, b)| b);
                    let body = body.cloned().unwrap_or_default();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn request(path: &str, etag: Option<&str>) -> Request<Empty<Bytes>> {
    let mut req = Request::get(path).header("accept-encoding", "identity");
    if let Some(tag) = etag {
        req = req.header("if-none-match", tag);
    }
    req.body(Empty::new()).unwrap()
}

fn hot_path(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir64 = tempfile::tempdir().unwrap();
    let (state, small, large, bad, state64, load64) = rt.block_on(async {
        let bodies = vec![
            ("/4k.jpg", jpeg(4096, 1)),
            ("/200k.jpg", jpeg(200 << 10, 2)),
            ("/64k.jpg", jpeg(64 << 10, 3)),
        ];
        let addr = origin(bodies).await;
        let bind = |dir: &std::path::Path, cache: &str| {
            let toml = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [signing]\nkeys = [\"{KEY}\"]\n\
                 [cache]\ndir = \"{}\"\n{cache}\n\
                 [fetch]\nallow_networks = [\"127.0.0.2/32\"]\n",
                dir.display()
            );
            let config = parasol::Config::from_sources("bench", &toml, std::iter::empty()).unwrap();
            let options = parasol::Options {
                worker_exe: env!("CARGO_BIN_EXE_parasol").into(),
                ..Default::default()
            };
            parasol::Bound::bind(config, options)
        };
        let bound = bind(dir.path(), "memory_max_object_bytes = \"64 KiB\"").await.unwrap();
        // Its memory tier keeps nothing of 64 KiB: every hit is loaded from disk.
        let bound64 = bind(dir64.path(), "memory_bytes = \"16 KiB\"").await.unwrap();
        let base = bound.public_state().proxy.config().server.public_base_url.clone();
        let state = bound.public_state();
        let state64 = bound64.public_state();
        let signer = parasol::signing::Signer::new([KEY]);
        let path = |file: &str| {
            let url = parasol::api::native::sign_url(
                &base,
                &signer,
                &format!("http://{addr}{file}"),
                None,
            );
            url::Url::parse(&url).unwrap().path().to_string()
        };
        let (small, large, load64) = (path("/4k.jpg"), path("/200k.jpg"), path("/64k.jpg"));
        for p in [&small, &large] {
            let r = parasol::server::handle_public(state.clone(), request(p, None)).await;
            assert_eq!(r.status(), 200, "the bench origin fills {p}");
        }
        let r = parasol::server::handle_public(state64.clone(), request(&load64, None)).await;
        assert_eq!(r.status(), 200, "the bench origin fills the 64 KiB file");
        let bad = small.replacen("/m/A", "/m/B", 1).replacen("/m/a", "/m/A", 1);
        // Keep the listeners bound (not served) for the bench's lifetime.
        std::mem::forget(bound);
        std::mem::forget(bound64);
        (state, small, large, bad, state64, load64)
    });
    let etag = rt.block_on(async {
        let r = parasol::server::handle_public(state.clone(), request(&small, None)).await;
        r.headers()["etag"].to_str().unwrap().to_string()
    });

    // Runs `n` requests inside one `block_on`, so the runtime's entry cost is not measured.
    let timed_on = |state: &Arc<parasol::server::Public>,
                    n: u64,
                    path: &str,
                    etag: Option<&str>,
                    read_body: bool|
     -> Duration {
        rt.block_on(async {
            let started = Instant::now();
            for _ in 0..n {
                let r = parasol::server::handle_public(state.clone(), request(path, etag)).await;
                if read_body {
                    let body = r.into_body().collect().await.unwrap().to_bytes();
                    std::hint::black_box(body);
                } else {
                    std::hint::black_box(r);
                }
            }
            started.elapsed()
        })
    };

    let timed = |n, path: &str, etag, read_body| timed_on(&state, n, path, etag, read_body);
    let mut g = c.benchmark_group("serve");
    g.bench_function("memory_hit_4k", |b| b.iter_custom(|n| timed(n, &small, None, false)));
    g.bench_function("memory_hit_304", |b| b.iter_custom(|n| timed(n, &small, Some(&etag), false)));
    g.throughput(Throughput::Bytes(200 << 10));
    g.bench_function("disk_hit_200k", |b| b.iter_custom(|n| timed(n, &large, None, true)));
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("disk_load_64k", |b| {
        b.iter_custom(|n| timed_on(&state64, n, &load64, None, true))
    });
    g.finish();
    let mut g = c.benchmark_group("refuse");
    g.bench_function("bad_signature", |b| b.iter_custom(|n| timed(n, &bad, None, false)));
    g.finish();

    let mut g = c.benchmark_group("fill");
    for (name, size) in [("blake3_64k", 64usize << 10), ("blake3_1m", 1 << 20)] {
        let body = jpeg(size, 3);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(name, |b| b.iter(|| blake3::hash(std::hint::black_box(&body))));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = hot_path
}
criterion_main!(benches);
