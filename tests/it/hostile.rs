//! Origins that lie, stall or misbehave at the byte level, and viewers that do the same.
//! Each origin is a raw TCP server on loopback writing exactly the bytes a case needs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::util::*;

/// What a raw origin does after reading a request for one path.
#[derive(Clone)]
enum Act {
    /// Write these bytes, then close.
    Bytes(Vec<u8>),
    /// Write nothing and hold the connection open.
    Silent,
    /// Write the head, then one body byte every `interval`, forever.
    Drip(Vec<u8>, Duration),
    /// Write the head, then chunks of a chunked body forever.
    Endless(Vec<u8>),
    /// Write the head and part of the body, then reset the connection.
    Reset(Vec<u8>),
}

struct RawOrigin {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawOrigin {
    async fn start(ip: &str, acts: HashMap<String, Act>) -> RawOrigin {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let (acts, counter) = (Arc::new(acts), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(act(stream, acts.clone()));
            }
        });
        RawOrigin { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn act(mut stream: TcpStream, acts: Arc<HashMap<String, Act>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let Some(act) = acts.get(&path).cloned() else { return };
    match act {
        Act::Bytes(bytes) => {
            let _ = stream.write_all(&bytes).await;
        }
        Act::Silent => tokio::time::sleep(Duration::from_secs(60)).await,
        Act::Drip(head, interval) => {
            let _ = stream.write_all(&head).await;
            for _ in 0..10_000 {
                if stream.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        }
        Act::Endless(head) => {
            let _ = stream.write_all(&head).await;
            let chunk = [b"4000\r\n".as_slice(), &png_bytes(0x4000, 9), b"\r\n"].concat();
            // Bounded: 16 KiB × 4096 = 64 MiB at most, far past the test's limit.
            for _ in 0..4096 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }
        Act::Reset(bytes) => {
            let _ = stream.write_all(&bytes).await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    }
}

fn head(extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-type: image/png\r\n{extra}\r\n").into_bytes()
}

fn with_body(head: Vec<u8>, body: &[u8]) -> Vec<u8> {
    [head, body.to_vec()].concat()
}

#[tokio::test]
async fn lying_and_stalling_origins_are_refused_and_nothing_is_cached() {
    let png = png_bytes(20_000, 50);
    let gzip_magic = [&[0x1f, 0x8b, 0x08, 0x00][..], &[0u8; 64]].concat();
    let mut acts = HashMap::new();
    let mut case = |path: &str, act: Act, status: u16| {
        acts.insert(path.to_string(), act);
        (path.to_string(), status)
    };
    let cases = vec![
        case("/silent", Act::Silent, 504),
        case("/drip", Act::Drip(head("content-length: 100000\r\n"), Duration::from_millis(50)), 504),
        case("/short", Act::Bytes(with_body(head("content-length: 30000\r\n"), &png)), 502),
        case(
            "/bad-chunks",
            Act::Bytes(with_body(head("transfer-encoding: chunked\r\n"), b"4e20\r\n\x89PNG")),
            502,
        ),
        case("/close-delimited", Act::Bytes(with_body(head("connection: close\r\n"), &png)), 502),
        case("/endless", Act::Endless(head("transfer-encoding: chunked\r\n")), 413),
        case("/huge-length", Act::Bytes(head("content-length: 99999999999\r\n")), 413),
        case("/reset", Act::Reset(with_body(head("content-length: 20000\r\n"), &png[..5000])), 502),
        case(
            "/gzip",
            Act::Bytes(with_body(
                head(&format!("content-encoding: gzip\r\ncontent-length: {}\r\n", gzip_magic.len())),
                &gzip_magic,
            )),
            415,
        ),
        case(
            "/partial",
            Act::Bytes(with_body(
                b"HTTP/1.1 206 Partial Content\r\ncontent-range: bytes 0-99/20000\r\ncontent-length: 100\r\n\r\n".to_vec(),
                &png[..100],
            )),
            502,
        ),
        case(
            "/huge-headers",
            Act::Bytes(with_body(
                head(&format!("x-junk: {}\r\ncontent-length: 4\r\n", "a".repeat(512 * 1024))),
                b"\x89PNG",
            )),
            502,
        ),
        case("/empty", Act::Bytes(head("content-length: 0\r\n")), 502),
        case(
            "/html-as-png",
            Act::Bytes(with_body(head("content-length: 30\r\n"), b"<html><script>x</script></html")),
            415,
        ),
        case(
            "/smuggled-type",
            Act::Bytes(with_body(
                b"HTTP/1.1 200 OK\r\ncontent-type: image/png, text/html\r\ncontent-length: 31\r\n\r\n"
                    .to_vec(),
                b"<html><script>x</script></html>",
            )),
            415,
        ),
        case("/garbage", Act::Bytes(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec()), 502),
    ];
    let origin = RawOrigin::start("127.0.0.7", acts).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.7/32"]);
    cfg.fetch.header_timeout = parasol::config::Dur(Duration::from_millis(500));
    cfg.fetch.timeout = parasol::config::Dur(Duration::from_millis(1500));
    cfg.cache.max_object_bytes = parasol::config::Size(1 << 20);
    let p = Parasol::start(cfg).await;
    let viewers: Vec<_> = cases
        .iter()
        .map(|(path, _)| {
            let url = p.url(&origin.url(path));
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for ((path, status), viewer) in cases.iter().zip(viewers) {
        let r = viewer.await.unwrap();
        assert_eq!(r.status().as_u16(), *status, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("127.0.0.7"), "{path}: the error names the origin: {text}");
    }
    assert_eq!(p.blob_count(), 0, "nothing from a lying origin is stored");
    assert_eq!(files_under(&dir.path().join("tmp")), 0, "every temp file was removed");
    // Asked again at once: answered from the negative cache, no new connection.
    let before = origin.hits.load(Ordering::SeqCst);
    for (path, status) in &cases {
        assert_eq!(get(&p.url(&origin.url(path))).await.status().as_u16(), *status, "{path}");
    }
    assert_eq!(origin.hits.load(Ordering::SeqCst), before, "no retry storm");
    p.stop().await;
}

#[tokio::test]
async fn slowloris_viewers_are_cut_at_the_header_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[]);
    cfg.server.header_timeout = parasol::config::Dur(Duration::from_millis(300));
    let p = Parasol::start(cfg).await;
    // A viewer that sends its headers slowly but in full within the deadline is served:
    // the cut below is the deadline, not a byte-rate rule.
    let mut steady = TcpStream::connect(p.public).await.unwrap();
    for part in [&b"GET / HTTP/1.1\r\n"[..], b"Host: p.test\r\n", b"Connection: close\r\n\r\n"] {
        steady.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answer = Vec::new();
    steady.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 404"), "{}", String::from_utf8_lossy(&answer));
    let started = tokio::time::Instant::now();
    let mut slow = TcpStream::connect(p.public).await.unwrap();
    slow.write_all(b"GET /m/a/b HTTP/1.1\r\nHost: p.test\r\nX-Slow: ").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was closed by parasol");
    // Generous against the 300 ms deadline, and far below every other timer that could close
    // it (hyper's own 30 s default, send_timeout's 60 s): so it was the header deadline.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"), "no answer to half a request");
    // Meanwhile and afterwards, a normal viewer is served.
    assert_eq!(get(&format!("http://{}/", p.public)).await.status(), 404);
    p.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_get_503() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[]);
    cfg.server.max_connections = 2;
    let p = Parasol::start(cfg).await;
    // Two idle keep-alive connections hold both slots.
    let _a = TcpStream::connect(p.public).await.unwrap();
    let _b = TcpStream::connect(p.public).await.unwrap();
    let mut c = TcpStream::connect(p.public).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop((_a, _b));
    // Slots free up again once connections close.
    let served = eventually_async(|| async {
        client().get(format!("http://{}/", p.public)).send().await.is_ok_and(|r| r.status() == 404)
    })
    .await;
    assert!(served);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_per_origin_are_capped_and_the_rest_wait() {
    let origin = Origin::start("127.0.0.8").await;
    for i in 0..6 {
        origin.route(
            &format!("/{i}.png"),
            Route::ok(png_bytes(1_000, i)).delay(Duration::from_millis(150)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.8/32"]);
    cfg.fetch.max_per_origin = 2;
    let p = Parasol::start(cfg).await;
    let viewers: Vec<_> = (0..6)
        .map(|i| {
            let url = p.url(&origin.url(&format!("/{i}.png")));
            tokio::spawn(async move { get(&url).await.status() })
        })
        .collect();
    for v in viewers {
        assert_eq!(v.await.unwrap(), 200, "waiting fills are served, not refused");
    }
    assert_eq!(origin.max_concurrent(), 2, "never more than fetch.max_per_origin at once");
    p.stop().await;
}

#[tokio::test]
async fn fills_over_the_global_cap_get_503() {
    let origin = Origin::start("127.0.0.9").await;
    origin.route("/slow.png", Route::ok(png_bytes(1_000, 60)).delay(Duration::from_millis(500)));
    origin.route("/next.png", Route::ok(png_bytes(1_000, 61)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.9/32"]);
    cfg.fetch.max_fills = 1;
    let p = Parasol::start(cfg).await;
    let slow_url = p.url(&origin.url("/slow.png"));
    let slow = tokio::spawn(async move { get(&slow_url).await.status() });
    assert!(eventually(|| origin.hits("/slow.png") == 1).await);
    let r = get(&p.url(&origin.url("/next.png"))).await;
    assert_eq!(r.status(), 503);
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(get(&p.url(&origin.url("/next.png"))).await.status(), 200, "not negative-cached");
    p.stop().await;
}

fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// A thousand viewers that request a cached 5 MiB file and then stop reading: parasol shares
/// one copy of the bytes between them instead of buffering per reader, and once they leave
/// its file descriptors return to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_readers_share_one_copy() {
    const READERS: usize = 1000;
    let _ = rlimit::increase_nofile_limit(4 * READERS as u64);
    let origin = Origin::start("127.0.0.11").await;
    let big = png_bytes(5 << 20, 70);
    origin.route("/big.png", Route::ok(big.clone()));
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("[\"{KEY}\"]");
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.11/32\"]"),
        ("PARASOL__SIGNING__KEYS", &keys),
    ];
    let (child, public, _admin) = crate::cli::spawn_serving(dir.path(), &envs, None);
    let pid = child.0.id();
    let url = signed_url(public, &origin.url("/big.png"));
    assert_eq!(body(get(&url).await).await, big, "warm the cache");
    let (rss_before, fds_before) = (proc_status(pid, "VmRSS:"), open_fds(pid));

    let path = url::Url::parse(&url).unwrap().path().to_string();
    let request = format!("GET {path} HTTP/1.1\r\nHost: p.test\r\n\r\n");
    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let mut s = TcpStream::connect(public).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        readers.push(s); // and never read again
    }
    // (The warm-up request's keep-alive connection may have closed meanwhile.)
    assert!(open_fds(pid) + 2 >= fds_before + READERS, "all readers are connected");
    let rss_during = proc_status(pid, "VmRSS:");
    let grown_mib = rss_during.saturating_sub(rss_before) / 1024;
    eprintln!("RSS {rss_before} KiB before, {rss_during} KiB with {READERS} slow readers");
    // One copy per reader would be ~5,000 MiB; sharing costs socket and task state only.
    assert!(grown_mib < 512, "RSS grew {grown_mib} MiB for {READERS} slow readers");

    drop(readers);
    let settled = eventually_async(|| async { open_fds(pid) <= fds_before + 4 }).await;
    assert!(settled, "fds back to baseline: {} vs {fds_before}", open_fds(pid));
    assert_eq!(body(get(&url).await).await, big, "still serving after the storm");
    assert_eq!(origin.hits("/big.png"), 1);
    child.sigterm();
    assert!(child.wait().await.success());
}

/// Viewers of 1 MiB Ranges of a video on disk who stop reading: each response reads the blob a
/// chunk at a time as its connection drains, so a slow viewer holds about two chunks, not the
/// whole range (a 1 MiB buffer each would grow the server by 200 MiB here). The viewers
/// announce a small MSS and window, as a phone on a slow link does, so the kernel takes little
/// of each response and the rest waits in parasol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_viewers_of_ranges_from_disk_hold_a_chunk_each() {
    const VIEWERS: usize = 200;
    let _ = rlimit::increase_nofile_limit(4 * VIEWERS as u64);
    let origin = Origin::start("127.0.0.11").await;
    let video = png_bytes(3 << 20, 71);
    origin.route("/clip.png", Route::ok(video.clone()));
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("[\"{KEY}\"]");
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.11/32\"]"),
        ("PARASOL__SIGNING__KEYS", &keys),
        ("PARASOL__CACHE__MEMORY_MAX_OBJECT_BYTES", "1 MiB"),
        ("PARASOL__SERVER__SEND_TIMEOUT", "60s"),
    ];
    let (child, public, _admin) = crate::cli::spawn_serving(dir.path(), &envs, None);
    let pid = child.0.id();
    let url = signed_url(public, &origin.url("/clip.png"));
    assert_eq!(body(get(&url).await).await, video, "warm the cache");
    let ranged = reqwest::Client::new().get(&url).header("range", "bytes=1048576-2097151");
    let r = ranged.send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, video[1 << 20..2 << 20], "a range from disk is byte-exact");
    let rss_before = proc_status(pid, "VmRSS:");

    let path = url::Url::parse(&url).unwrap().path().to_string();
    let request = format!("GET {path} HTTP/1.1\r\nHost: p.test\r\nRange: bytes=0-1048575\r\n\r\n");
    let mut viewers = Vec::with_capacity(VIEWERS);
    for _ in 0..VIEWERS {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_tcp_mss(1000).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&public.into()).unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut s = TcpStream::from_std(std::net::TcpStream::from(socket)).unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 206");
        viewers.push(s); // and never read again
    }
    // Let every response run into its viewer's full window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_during = proc_status(pid, "VmRSS:");
    let grown_mib = rss_during.saturating_sub(rss_before) / 1024;
    eprintln!("RSS {rss_before} KiB before, {rss_during} KiB with {VIEWERS} slow viewers");
    assert!(grown_mib < 64, "RSS grew {grown_mib} MiB for {VIEWERS} slow viewers of 1 MiB");

    drop(viewers);
    let r = reqwest::Client::new().get(&url).header("range", "bytes=0-1048575").send().await;
    assert_eq!(body(r.unwrap()).await, video[..1 << 20], "still serving after them");
    assert_eq!(origin.hits("/clip.png"), 1);
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_queued_behind_a_slow_origin_do_not_starve_other_origins() {
    let slow = Origin::start("127.0.0.15").await;
    for i in 0..4 {
        slow.route(
            &format!("/{i}.png"),
            Route::ok(png_bytes(500, i)).delay(Duration::from_millis(600)),
        );
    }
    let fast = Origin::start("127.0.0.16").await;
    fast.route("/ok.png", Route::ok(png_bytes(500, 80)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.15/32", "127.0.0.16/32"]);
    cfg.fetch.max_fills = 2;
    cfg.fetch.max_per_origin = 1;
    let p = Parasol::start(cfg).await;
    let queued: Vec<_> = (0..4)
        .map(|i| {
            let url = p.url(&slow.url(&format!("/{i}.png")));
            tokio::spawn(async move { get(&url).await.status() })
        })
        .collect();
    assert!(eventually(|| slow.seen().len() == 1).await, "one slow fill runs, three queue");
    assert_eq!(get(&p.url(&fast.url("/ok.png"))).await.status(), 200, "the other origin is served");
    for q in queued {
        assert_eq!(q.await.unwrap(), 200);
    }
    assert_eq!(slow.max_concurrent(), 1);
    p.stop().await;
}

/// A body in chunked framing: `body` cut into chunks of `size`.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = head("transfer-encoding: chunked\r\n");
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Every way a body can travel through a fill (held in memory; streamed to a temp blob; held,
/// then spilled to disk when a chunked body outgrows memory) and every way a disk hit is read
/// (one read of a range; chunked reads of a large one) serve exactly the origin's bytes, also
/// after a restart, with no second origin request.
#[tokio::test]
async fn bodies_of_every_size_and_framing_are_stored_and_served_byte_exact() {
    let small = png_bytes(100_000, 61);
    let large = png_bytes(3 << 20, 62);
    let acts = HashMap::from([
        ("/small-chunked".to_string(), Act::Bytes(chunked(&small, 7_000))),
        ("/small-length".to_string(), {
            Act::Bytes(with_body(head(&format!("content-length: {}\r\n", small.len())), &small))
        }),
        ("/large-chunked".to_string(), Act::Bytes(chunked(&large, 65_536))),
        ("/large-length".to_string(), {
            Act::Bytes(with_body(head(&format!("content-length: {}\r\n", large.len())), &large))
        }),
    ]);
    let origin = RawOrigin::start("127.0.0.22", acts).await;
    let dir = tempfile::tempdir().unwrap();
    // A small memory tier bound: everything above 64 KiB is served from disk.
    let toml = config_toml(dir.path(), &["127.0.0.22/32"], "")
        .replace("fsync = false", "fsync = true\nmemory_max_object_bytes = \"64 KiB\"");
    let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let cases = [
        ("/small-chunked", &small),
        ("/small-length", &small),
        ("/large-chunked", &large),
        ("/large-length", &large),
    ];
    for round in 0..2 {
        let p = Parasol::start(cfg.clone()).await;
        for (path, want) in cases {
            let url = p.url(&origin.url(path));
            let r = get(&url).await;
            assert_eq!(r.status(), 200, "{path} round {round}");
            assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(want));
            assert!(body(r).await == want[..], "{path} round {round}: whole body");
            // A range read in one call, and one large enough to be read in chunks.
            for (start, end) in [(70_000u64, 99_999u64), (1 << 20, (3 << 20) - 1)] {
                if end as usize >= want.len() {
                    continue;
                }
                let r = client()
                    .get(&url)
                    .header("range", format!("bytes={start}-{end}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 206, "{path} {start}-{end}");
                let got = body(r).await;
                assert!(got == want[start as usize..=end as usize], "{path} {start}-{end}");
            }
        }
        p.stop().await;
    }
    assert_eq!(origin.hits.load(Ordering::SeqCst), cases.len(), "one origin request per URL");
    assert_eq!(files_under(&dir.path().join("tmp")), 0, "no temp file left");
}

/// A viewer who stops reading mid-response is disconnected after `server.send_timeout` without
/// progress, rather than holding the connection and its response forever.
#[tokio::test]
async fn a_viewer_who_stops_reading_is_cut_at_the_send_deadline() {
    let origin = Origin::start("127.0.0.22").await;
    let big = png_bytes(16 << 20, 98);
    origin.route("/big.png", Route::ok(big.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.22/32"]);
    cfg.server.send_timeout = parasol::config::Dur(Duration::from_millis(500));
    let p = Parasol::start(cfg).await;
    let url = p.url(&origin.url("/big.png"));
    assert!(body(get(&url).await).await == big, "cached, and a reader that reads gets it all");

    let path = url::Url::parse(&url).unwrap().path().to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(p.public).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: p.test\r\nConnection: close\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    // Stop reading well past the deadline, then see what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection ends");
    assert!(got.len() < big.len(), "cut short: {} of {} bytes", got.len(), big.len());
    // Others are served meanwhile and afterwards.
    assert!(body(get(&url).await).await == big);
    p.stop().await;
}

/// Reads a request's head from `stream` and returns the number its path starts with
/// (`GET /17.png` is 17), or `None` when the request never arrives whole.
async fn requested_number(stream: &mut TcpStream) -> Option<u64> {
    let (mut head, mut buf) = (Vec::new(), [0u8; 4096]);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head).to_string();
    Some(line.split(['/', '.']).nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}

/// Twenty fills of 900 KB at once, each stalled halfway until the test lets the origin finish:
/// with `media.inflight_bytes` at 2 MiB only two bodies wait in memory and the rest stream to
/// temp blobs on disk; with the default budget all twenty are held in memory. Either way every
/// body arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_in_memory_stay_within_the_inflight_budget() {
    const FILLS: usize = 20;
    const LEN: usize = 900_000;
    for (budget, spilled) in [(Some(2u64 << 20), FILLS - 2), (None, 0)] {
        let listener = TcpListener::bind(("127.0.0.12", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let origin = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut released = released.clone();
                tokio::spawn(async move {
                    let Some(seed) = requested_number(&mut stream).await else { return };
                    let body = png_bytes(LEN, seed);
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\nconnection: close\r\n\r\n"
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&body[..LEN / 2]).await;
                    let _ = released.wait_for(|r| *r).await;
                    let _ = stream.write_all(&body[LEN / 2..]).await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), &["127.0.0.12/32"]);
        cfg.fetch.max_per_origin = FILLS as u32;
        // The origin stalls on purpose until the test has counted: room for a loaded machine.
        cfg.fetch.timeout = parasol::config::Dur(Duration::from_secs(60));
        if let Some(budget) = budget {
            cfg.media.inflight_bytes = parasol::config::Size(budget);
        }
        let p = Parasol::start(cfg).await;
        let viewers: Vec<_> = (0..FILLS)
            .map(|n| {
                let url = p.url(&format!("http://{addr}/{n}.png"));
                tokio::spawn(async move { body(get(&url).await).await })
            })
            .collect();
        let tmp = dir.path().join("tmp");
        let all_spilled = eventually(|| files_under(&tmp) >= spilled).await;
        // Give the fills that stay in memory time to show up as files if they were going to.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(all_spilled, "{budget:?}: {} temp blobs", files_under(&tmp));
        assert_eq!(files_under(&tmp), spilled, "{budget:?}: bodies beyond the budget spill");
        release.send(true).unwrap();
        for (n, v) in viewers.into_iter().enumerate() {
            assert_eq!(v.await.unwrap(), png_bytes(LEN, n as u64), "{budget:?}: body {n}");
        }
        p.stop().await;
        origin.abort();
    }
}

/// Bodies of unknown length (chunked) are received into memory that grows as they arrive
/// (the unit test `proxy::store::tests` checks the allocation itself): a hundred of them
/// leave the server's memory where it was, all stay in the memory tier, and once they are
/// stored the in-flight budget is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_chunked_bodies_cost_their_size_in_memory() {
    const FILES: u64 = 100;
    let listener = TcpListener::bind(("127.0.0.13", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(seed) = requested_number(&mut stream).await else { return };
                let mut body = b"GIF89a".to_vec();
                body.extend_from_slice(&png_bytes(194, seed)[..]);
                // `chunked` makes the head (transfer-encoding: chunked) and the chunks; one
                // response per connection, said so, so that no client reuses it.
                let mut response = chunked(&body, 64);
                let at = response.windows(9).position(|w| w == b"chunked\r\n").unwrap() + 9;
                response.splice(at..at, b"connection: close\r\n".iter().copied());
                let _ = stream.write_all(&response).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.13/32\"]"),
        ("PARASOL__SIGNING__KEYS", &format!("[\"{KEY}\"]")),
        ("PARASOL__CACHE__FSYNC", "false"),
    ];
    let (child, public, admin) = crate::cli::spawn_serving(dir.path(), &envs, None);
    let pid = child.0.id();
    let first = signed_url(public, &format!("http://{addr}/{FILES}.gif"));
    assert_eq!(get(&first).await.status(), 200);
    let before = proc_status(pid, "VmRSS:");
    for n in 0..FILES {
        let r = get(&signed_url(public, &format!("http://{addr}/{n}.gif"))).await;
        assert_eq!(r.status(), 200, "file {n}");
        assert_eq!(body(r).await.len(), 200);
    }
    let after = proc_status(pid, "VmRSS:");
    let grown = after.saturating_sub(before) / 1024;
    eprintln!("RSS {} -> {} MiB", before / 1024, after / 1024);
    assert!(grown < 64, "{FILES} small files grew the server by {grown} MiB");
    let text = get(&format!("http://{admin}/metrics")).await.text().await.unwrap();
    assert!(text.contains("\nparasol_inflight_bytes 0\n"), "the budget is whole again");
    assert!(text.contains("parasol_cache_entries{tier=\"memory\"} 101"), "all in memory");
    child.sigterm();
    assert!(child.wait().await.success());
    origin.abort();
}

/// Ten source hosts that all redirect to one victim: the victim's fill cap counts every
/// hop's host, so it sees `fetch.max_per_origin` requests at a time, not ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_cannot_funnel_every_fill_at_one_origin() {
    let sources = Origin::start("127.0.0.14").await;
    let victim = Origin::start("127.0.0.15").await;
    let mut lookup =
        parasol::fetch::guard::StaticLookup::default().with("victim.test", &[ip("127.0.0.15")]);
    for n in 0..10 {
        let target = format!("http://victim.test:{}/v{n}.png", victim.addr.port());
        sources.route(&format!("/s{n}.png"), Route::status(302).header("location", &target));
        victim.route(
            &format!("/v{n}.png"),
            Route::ok(png_bytes(2_000, 100 + n)).delay(Duration::from_millis(300)),
        );
        lookup = lookup.with(&format!("s{n}.test"), &[ip("127.0.0.14")]);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.14/32", "127.0.0.15/32"]);
    cfg.fetch.max_per_origin = 2;
    let p = Parasol::start_with(cfg, lookup).await;
    let viewers: Vec<_> = (0..10)
        .map(|n| {
            let url = p.url(&format!("http://s{n}.test:{}/s{n}.png", sources.addr.port()));
            tokio::spawn(async move { get(&url).await.status() })
        })
        .collect();
    for v in viewers {
        assert_eq!(v.await.unwrap(), 200);
    }
    assert_eq!(victim.seen().len(), 10, "every redirect followed");
    assert!(victim.max_concurrent() <= 2, "the victim saw {} at once", victim.max_concurrent());
    p.stop().await;
}

/// A source that is parasol itself is a loop, however it is spelt: an IPv4-mapped IPv6
/// literal of its listener, its public host with a trailing dot, or another name that
/// resolves to its listener, even where `allow_networks` admits its address.
#[tokio::test]
async fn every_spelling_of_parasol_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(dir.path(), &["127.0.0.1/32"], "")
        .replace("[server]", "[server]\npublic_base_url = \"http://media.parasol.test/\"");
    let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("media.parasol.test", &[ip("127.0.0.1")])
        .with("another-name.test", &[ip("127.0.0.1")]);
    let p = Parasol::start_with(cfg, lookup).await;
    let port = p.public.port();
    for source in [
        format!("http://[::ffff:127.0.0.1]:{port}/x.png"),
        format!("http://[::ffff:7f00:1]:{port}/x.png"),
        "http://media.parasol.test./x.png".to_string(),
        "http://MEDIA.parasol.test/x.png".to_string(),
        format!("http://another-name.test:{port}/x.png"),
    ] {
        let r = get(&p.url(&source)).await;
        assert_eq!(r.status(), 502, "{source}");
        assert_eq!(r.headers()["x-parasol-error"], "origin_unreachable", "{source}");
    }
    // Refused, not dialled: no request of parasol's reached parasol.
    let own = "parasol_requests_total{route=\"native\",status=\"502\"}";
    assert_eq!(p.metric(own).await, 5, "five viewer requests, no looped ones");
    assert_eq!(p.metric("parasol_cache_results_total{result=\"blocked\"}").await, 5);
    p.stop().await;
}

/// Viewers who ask for 1 MiB ranges of a large file on disk and then stop reading hold little
/// of parasol's memory: what they have not taken waits in the kernel's socket buffers (which
/// `server.send_timeout` bounds in time), not in a buffer of parasol's per viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_range_readers_pin_little_memory() {
    let origin = Origin::start("127.0.0.90").await;
    let mut big = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom".to_vec();
    big.resize(12 << 20, 0x5a); // above the 1 MiB kept in memory here: served from its file
    origin.route("/big.mp4", Route::ok(big));
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.90/32\"]"),
        ("PARASOL__SIGNING__KEYS", &*format!("[\"{KEY}\"]")),
        ("PARASOL__CACHE__FSYNC", "false"),
        ("PARASOL__CACHE__MEMORY_MAX_OBJECT_BYTES", "1 MiB"),
    ];
    let (running, public, _admin) = crate::cli::spawn_serving(dir.path(), &envs, None);
    let pid = running.0.id();
    let url = signed_url(public, &origin.url("/big.mp4"));
    assert_eq!(body(get(&url).await).await.len(), 12 << 20, "stored");
    let path = url::Url::parse(&url).unwrap().path().to_string();
    let before = crate::media::rss_kib(pid);
    const READERS: usize = 200;
    let mut stalled = Vec::new();
    for i in 0..READERS {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(public).await.unwrap();
        let start = (i % 10) << 20;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: media.test\r\nRange: bytes={start}-{}\r\n\r\n",
            start + (1 << 20) - 1
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stalled.push(stream); // never read
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_mib = crate::media::rss_kib(pid).saturating_sub(before) / 1024;
    // 200 readers of 1 MiB each: whole-range buffers would be 200 MiB.
    assert!(grown_mib < 80, "{READERS} stalled 1 MiB ranges grew the server by {grown_mib} MiB");
    drop(stalled);
    // Still serving.
    assert_eq!(get(&url).await.status(), 200);
}
