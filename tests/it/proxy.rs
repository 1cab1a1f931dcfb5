//! The core proxy end to end: signed URL in, cached media out.

use std::time::Duration;

use crate::util::*;

#[tokio::test]
async fn first_request_fetches_once_then_memory_serves() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(20_000, 1);
    origin.route("/cat.png", Route::ok(img.clone()).header("content-type", "image/png"));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/cat.png"));
    for _ in 0..5 {
        let r = get(&url).await;
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, img);
    }
    assert_eq!(origin.hits("/cat.png"), 1, "later requests never reach the origin");
    let metrics = p.metrics().await;
    assert!(metrics.contains("parasol_cache_results_total{result=\"hit_memory\"} 4"), "{metrics}");
    assert!(metrics.contains("parasol_cache_results_total{result=\"miss\"} 1"), "{metrics}");
    p.stop().await;
}

#[tokio::test]
async fn response_headers_etag_is_blake3_and_type_is_sniffed() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(5_000, 2);
    // The origin lies about the type and tries to set a cookie and leak its own headers.
    origin.route(
        "/lie.png",
        Route::ok(img.clone())
            .header("content-type", "text/html")
            .header("set-cookie", "tracker=1")
            .header("x-origin-secret", "s3cret")
            .header("access-control-allow-origin", "*"),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let r = get(&p.url(&origin.url("/lie.png"))).await;
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["etag"].to_str().unwrap(), etag_of(&img));
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(h["content-length"], "5000");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-security-policy"], "default-src 'none'; sandbox");
    assert_eq!(h["x-content-type-options"], "nosniff");
    for leaked in ["set-cookie", "x-origin-secret", "access-control-allow-origin"] {
        assert!(!h.contains_key(leaked), "{leaked} must not pass through");
    }
    assert_eq!(body(r).await, img);
    p.stop().await;
}

#[tokio::test]
async fn not_modified_and_ranges_come_from_cache() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(100_000, 3);
    origin.route("/v.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/v.png"));
    let etag = etag_of(&img);

    let r = client().get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304, "a cold conditional request is filled, then answered 304");
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    let r = client()
        .get(&url)
        .header("if-none-match", format!("W/{etag}, \"x\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = client().get(&url).header("if-none-match", "\"other\"").send().await.unwrap();
    assert_eq!(r.status(), 200);

    let r = client().get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(body(r).await, img.slice(10..20));
    let r = client().get(&url).header("range", "bytes=-5").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, img.slice(99_995..));
    let r = client().get(&url).header("range", "bytes=200000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");
    let r = client().get(&url).header("range", "bytes=0-1,5-6").send().await.unwrap();
    assert_eq!(r.status(), 200, "several ranges: the whole body");
    let r = client()
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "If-Range mismatch: the whole body");
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");

    assert_eq!(origin.hits("/v.png"), 1);
    for seen in origin.seen() {
        for h in ["range", "if-none-match", "if-range", "if-modified-since"] {
            assert!(!seen.headers.contains_key(h), "{h} reached the origin");
        }
    }
    p.stop().await;
}

#[tokio::test]
async fn a_cold_range_request_is_filled_whole_and_answered_206() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(50_000, 12);
    origin.route("/cold.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/cold.png"));
    let r = client().get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/50000");
    assert_eq!(body(r).await, img.slice(10..20));
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("range"), "the viewer's Range reached the origin");
    assert_eq!(body(get(&url).await).await, img, "the whole object was stored");
    assert_eq!(origin.hits("/cold.png"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cold_viewers_cause_one_origin_request() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(64 * 1024, 4);
    origin.route("/hot.png", Route::ok(img.clone()).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/hot.png"));
    let viewers: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { body(get(&url).await).await })
        })
        .collect();
    for v in viewers {
        assert_eq!(v.await.unwrap(), img);
    }
    assert_eq!(origin.hits("/hot.png"), 1);
    let metrics = p.metrics().await;
    assert!(metrics.contains("result=\"coalesced\""), "{metrics}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_who_disconnects_mid_fill_cancels_nothing() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(30_000, 5);
    origin.route("/slow.png", Route::ok(img.clone()).delay(Duration::from_millis(400)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/slow.png"));
    let impatient =
        reqwest::Client::builder().no_proxy().timeout(Duration::from_millis(50)).build().unwrap();
    assert!(impatient.get(&url).send().await.is_err(), "the impatient viewer gives up");
    // A second viewer arrives while the fill is still running, and gets the bytes.
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, img);
    assert_eq!(origin.hits("/slow.png"), 1, "the abandoned fill was not restarted");
    p.stop().await;
}

#[tokio::test]
async fn restart_serves_from_disk_without_the_origin() {
    let origin = Origin::start("127.0.0.2").await;
    let small = png_bytes(2_000, 6);
    let large = png_bytes(300_000, 7);
    origin.route("/small.png", Route::ok(small.clone()));
    origin.route("/large.png", Route::ok(large.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    // Objects above 64 KiB stay on disk: the large one is streamed from its blob file.
    cfg.cache.memory_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg.clone()).await;
    let (small_url, large_url) = (origin.url("/small.png"), origin.url("/large.png"));
    assert_eq!(body(get(&p.url(&small_url)).await).await, small);
    assert_eq!(body(get(&p.url(&large_url)).await).await, large);
    p.stop().await;
    drop(origin); // the origin is gone for good

    let p = Parasol::start(cfg).await;
    let r = get(&p.url(&small_url)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&small));
    assert_eq!(body(r).await, small);
    let r = client()
        .get(p.url(&large_url))
        .header("range", "bytes=100000-100099")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, large.slice(100_000..100_100));
    assert_eq!(body(get(&p.url(&large_url)).await).await, large);
    let metrics = p.metrics().await;
    assert!(metrics.contains("result=\"hit_disk\""), "{metrics}");
    let fetches: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("parasol_origin_fetches_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(fetches, 0.0, "no origin contact: {metrics}");
    p.stop().await;
}

#[tokio::test]
async fn identical_bytes_from_two_urls_are_stored_once() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(10_000, 8);
    origin.route("/a.png", Route::ok(img.clone()));
    origin.route("/copy-of-a.png", Route::ok(img.clone()));
    origin.route("/b.png", Route::ok(png_bytes(10_000, 9)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    for path in ["/a.png", "/copy-of-a.png", "/b.png"] {
        assert_eq!(get(&p.url(&origin.url(path))).await.status(), 200);
    }
    assert_eq!(p.blob_count(), 2);
    assert_eq!(files_under(&dir.path().join("tmp")), 0, "no temp files left");
    p.stop().await;
}

#[tokio::test]
async fn bad_signatures_and_rotation() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/r.png", Route::ok(png_bytes(1_000, 10)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    let p = Parasol::start(cfg.clone()).await;
    let good = p.url(&origin.url("/r.png"));
    assert_eq!(get(&good).await.status(), 200);
    let tampered = good.replacen("/m/", "/m/A", 1);
    let r = get(&tampered).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    // A URL signed for another source does not open this one.
    let other = p.url(&origin.url("/other.png"));
    let (g, o): (Vec<&str>, Vec<&str>) = (good.split('/').collect(), other.split('/').collect());
    let mixed = format!("http://{}/m/{}/{}", p.public, o[4], g[5]);
    assert_eq!(get(&mixed).await.status(), 403);
    p.stop().await;

    // Rotate: a new key signs, the old one still verifies URLs already handed out.
    cfg.signing.keys = vec!["a-brand-new-key-a-brand-new-key-0000".into(), KEY.into()];
    let p = Parasol::start(cfg).await;
    let path = url::Url::parse(&good).unwrap().path().to_string();
    let good = format!("http://{}{path}", p.public);
    assert_eq!(get(&good).await.status(), 200, "old URL still works after rotation");
    assert_eq!(origin.hits("/r.png"), 1);
    p.stop().await;
}

#[tokio::test]
async fn malformed_urls_and_methods() {
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &[])).await;
    let base = format!("http://{}", p.public);
    assert_eq!(get(&format!("{base}/")).await.status(), 404);
    assert_eq!(get(&format!("{base}/m/")).await.status(), 400);
    assert_eq!(get(&p.url("ftp://files.test/a.png")).await.status(), 403);
    assert_eq!(get(&p.url("https://user:pw@files.test/a.png")).await.status(), 403);
    assert_eq!(get(&p.url("not a url")).await.status(), 400);
    assert_eq!(get(&format!("{base}/m/{}", "a".repeat(9000))).await.status(), 414);
    let r = client().post(p.url("https://media.test/a.png")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    p.stop().await;
}

#[tokio::test]
async fn origin_failures_map_to_statuses_and_are_not_cached() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/gone.png", Route::status(404));
    origin.route("/broken.png", Route::status(500));
    origin.route("/page.html", Route::ok("<!doctype html><script>alert(1)</script>"));
    origin.route("/empty.png", Route::ok(""));
    origin.route("/big.png", Route::ok(png_bytes(50_000, 11)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    cfg.cache.max_object_bytes = parasol::config::Size(40_000);
    let p = Parasol::start(cfg).await;
    for (path, status) in [
        ("/gone.png", 404),
        ("/broken.png", 502),
        ("/page.html", 415),
        ("/empty.png", 502),
        ("/big.png", 413),
    ] {
        let r = get(&p.url(&origin.url(path))).await;
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        let text = r.text().await.unwrap();
        assert!(!text.contains("127.0.0.2"), "error page reveals the origin: {text}");
        // Asked again at once: the negative cache answers, the origin is not hammered.
        assert_eq!(get(&p.url(&origin.url(path))).await.status(), status, "{path}");
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    assert_eq!(p.blob_count(), 0, "nothing stored from a failed fetch");
    assert_eq!(files_under(&dir.path().join("tmp")), 0, "no temp files left");
    p.stop().await;
}

/// Reads one HTTP/1.1 response from `conn`: its head (lowercased) and as much of its body as
/// arrives before the connection ends (at most its Content-Length).
async fn read_response(conn: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(conn.read_u8().await.unwrap());
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < len {
        match conn.read(&mut buf[..(len - got.len()).min(64 * 1024)]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (head, got)
}

/// The responses to GETs of `urls` sent in one write on one connection, in order.
async fn pipelined(public: std::net::SocketAddr, urls: &[&str]) -> Vec<(String, Vec<u8>)> {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(public).await.unwrap();
    let requests: String = urls
        .iter()
        .map(|u| {
            format!("GET {} HTTP/1.1\r\nHost: p.test\r\n\r\n", url::Url::parse(u).unwrap().path())
        })
        .collect();
    conn.write_all(requests.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    for _ in urls {
        out.push(read_response(&mut conn).await);
    }
    out
}

const FROM_FILE: &str = "parasol_served_from_file_bytes_total";

/// A hit held in memory and at least 32 KiB long is sent from its blob's file (sendfile)
/// when the page cache holds it. What arrives is byte-exact either way: whole bodies, ranges,
/// two responses pipelined on one connection. A small body, a short range, HEAD and 304 are
/// copied from memory, and a blob file cut short or gone falls back to the memory's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_held_in_memory_are_sent_from_their_file_byte_exact() {
    let origin = Origin::start("127.0.0.2").await;
    let (big, other, small) =
        (png_bytes(400 * 1024, 41), png_bytes(300_000, 42), png_bytes(20_000, 43));
    origin.route("/big.png", Route::ok(big.clone()));
    origin.route("/other.png", Route::ok(other.clone()));
    origin.route("/small.png", Route::ok(small.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(file_each(config(dir.path(), &["127.0.0.2/32"]))).await;
    let url = |path: &str| p.url(&origin.url(path));
    let (big_url, other_url, small_url) = (url("/big.png"), url("/other.png"), url("/small.png"));
    for u in [&big_url, &other_url, &small_url] {
        assert_eq!(get(u).await.status(), 200, "filled");
    }

    let mut expected = p.metric(FROM_FILE).await;
    assert_eq!(body(get(&big_url).await).await, big);
    expected += big.len() as u64;
    assert_eq!(p.metric(FROM_FILE).await, expected, "a whole body from the file");
    let r = client().get(&big_url).header("range", "bytes=1000-300000").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, big.slice(1000..300_001));
    expected += 299_001;
    assert_eq!(p.metric(FROM_FILE).await, expected, "a range from the file");

    assert_eq!(body(get(&small_url).await).await, small);
    let r = client().get(&big_url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(body(r).await, big.slice(100..200));
    assert_eq!(client().head(&big_url).send().await.unwrap().status(), 200);
    let etag = etag_of(&big);
    let r = client().get(&big_url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(p.metric(FROM_FILE).await, expected, "small bodies, HEAD and 304 are not");

    // Two requests in one write: each response carries its own bytes.
    let responses = pipelined(p.public, &[&big_url, &other_url]).await;
    for ((head, got), want) in responses.iter().zip([&big, &other]) {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(got[..], want[..], "pipelined response of {} bytes", want.len());
    }
    expected += (big.len() + other.len()) as u64;
    assert_eq!(p.metric(FROM_FILE).await, expected, "both pipelined bodies from their files");

    // The file written over in place with other bytes of the same length (as the entry's open
    // handle sees it): not the bytes its ETag names, so the memory's copy is sent.
    let hex = blake3::hash(&big).to_hex();
    let blob = dir.path().join("blobs").join(&hex[..2]).join(hex.as_str());
    let mut forged = big.to_vec();
    forged[big.len() / 2] ^= 0xff;
    std::fs::write(&blob, &forged).unwrap();
    assert_eq!(body(get(&big_url).await).await, big, "file written over in place");
    assert_eq!(p.metric(FROM_FILE).await, expected, "not from the file");
    // The file cut short in place (as the entry's open handle sees it), then gone: the
    // memory's copy is sent, whole and exact.
    let file = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    file.set_len(big.len() as u64 / 2).unwrap();
    assert_eq!(body(get(&big_url).await).await, big, "file cut short");
    std::fs::remove_file(&blob).unwrap();
    assert_eq!(body(get(&big_url).await).await, big, "file gone");
    assert_eq!(p.metric(FROM_FILE).await, expected, "neither from the file");
    assert_eq!(origin.hits("/big.png"), 1);
    p.stop().await;
}

/// A hit kept in a segment file (files up to 1 MiB by default) is sent from there with
/// sendfile like one with a file of its own, byte-exact, whole or in ranges. Purged while a
/// viewer who reads slowly is still being sent it, the viewer still gets every byte right:
/// the blob's blocks stay until its response is done (without that, the rest would be sent
/// from a hole, as zeros), and are freed then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_kept_in_segments_are_sent_from_there_even_when_purged_meanwhile() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start("127.0.0.2").await;
    let photo = png_bytes(900 * 1024, 46);
    origin.route("/seg.png", Route::ok(photo.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let url = p.url(&origin.url("/seg.png"));
    assert_eq!(body(get(&url).await).await, photo, "filled");
    assert_eq!(files_under(&dir.path().join("blobs")), 0, "kept in a segment");
    assert_eq!(p.blob_count(), 1);

    let mut expected = p.metric(FROM_FILE).await;
    assert_eq!(body(get(&url).await).await, photo);
    expected += photo.len() as u64;
    assert_eq!(p.metric(FROM_FILE).await, expected, "the whole body from the segment");
    let r = client().get(&url).header("range", "bytes=5000-800000").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, photo.slice(5000..800_001));
    expected += 795_001;
    assert_eq!(p.metric(FROM_FILE).await, expected, "a range from the segment");

    // A viewer that asks for it 6 times in one write and reads nothing: the socket's buffers
    // (about 3 MB on loopback) fill up in the middle of one response, and the file is purged.
    const ASKED: usize = 6;
    let slow = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    slow.set_recv_buffer_size(4096).unwrap();
    slow.connect(&p.public.into()).unwrap();
    slow.set_nonblocking(true).unwrap();
    let mut conn = tokio::net::TcpStream::from_std(std::net::TcpStream::from(slow)).unwrap();
    let path = url::Url::parse(&url).unwrap().path().to_string();
    let one = format!("GET {path} HTTP/1.1\r\nHost: p.test\r\n\r\n");
    conn.write_all(one.repeat(ASKED).as_bytes()).await.unwrap();
    // Until the sends stop moving.
    let mut sent = p.metric(FROM_FILE).await;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = p.metric(FROM_FILE).await;
        if now == sent && now > expected {
            break;
        }
        sent = now;
    }
    let whole = photo.len() as u64;
    let mid = (sent - expected) % whole;
    assert!(sent > expected && mid != 0, "stalled in the middle of a body: {mid} of {whole}");
    let purge = serde_json::json!({ "url": origin.url("/seg.png") });
    let (status, answer) =
        crate::admin::admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), purge).await;
    assert_eq!((status, &answer["purged"]["blobs"]), (200, &serde_json::json!(1)), "{answer}");
    for i in 0..ASKED {
        let (head, got) = read_response(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(got[..] == photo[..], "response {i} has every byte right after the purge");
    }
    // Once the responses are done, the purged blob's blocks are freed.
    assert_eq!(origin.hits("/seg.png"), 2, "the requests after the purge refilled it");
    assert_eq!(p.blob_count(), 1);
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        let segments = std::fs::read_dir(dir.path().join("segments")).unwrap();
        segments.flatten().map(|e| e.metadata().unwrap().blocks() * 512).sum::<u64>()
    };
    let one_copy = 910 * 1024;
    assert!(eventually(|| allocated() <= one_copy).await, "{} bytes allocated", allocated());
    p.stop().await;
}

/// A body too large for memory goes from its file with sendfile, a range at a time as the
/// connection takes it: whole, in ranges across several sends, and pipelined behind another
/// response, byte-exact. A file cut short under a viewer ends the response broken: what
/// arrived is the right bytes, and it is short, never completed with other bytes; the next
/// viewer's request finds the file the wrong size, and the blob is dropped and refetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_from_disk_are_sent_from_their_file_and_never_padded() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start("127.0.0.2").await;
    let video = png_bytes(3 << 20, 44);
    let small = png_bytes(20_000, 45);
    origin.route("/clip.png", Route::ok(video.clone()));
    origin.route("/small.png", Route::ok(small.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    cfg.cache.memory_max_object_bytes = parasol::config::Size(1 << 20);
    let p = Parasol::start(cfg).await;
    let (url, small_url) = (p.url(&origin.url("/clip.png")), p.url(&origin.url("/small.png")));
    assert_eq!(body(get(&url).await).await, video, "filled");
    assert_eq!(body(get(&small_url).await).await, small, "filled");

    let mut expected = p.metric(FROM_FILE).await;
    assert_eq!(body(get(&url).await).await, video);
    expected += video.len() as u64;
    assert_eq!(p.metric(FROM_FILE).await, expected, "the whole body from the file");
    let r = client().get(&url).header("range", "bytes=100000-1500000").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(body(r).await, video.slice(100_000..1_500_001));
    let r = client().get(&url).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(body(r).await, video.slice(video.len() - 10..));
    expected += 1_400_001 + 10;
    assert_eq!(p.metric(FROM_FILE).await, expected, "ranges from the file");

    // A copied body, then one from the file, asked for in one write.
    let responses = pipelined(p.public, &[&small_url, &url]).await;
    for ((head, got), want) in responses.iter().zip([&small, &video]) {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(got[..], want[..], "pipelined response of {} bytes", want.len());
    }
    let path = |u: &str| url::Url::parse(u).unwrap().path().to_string();

    // Cut short while a viewer reads slowly: its response ends early with the right bytes.
    let slow = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    slow.set_recv_buffer_size(4096).unwrap();
    slow.connect(&p.public.into()).unwrap();
    slow.set_nonblocking(true).unwrap();
    let mut conn = tokio::net::TcpStream::from_std(std::net::TcpStream::from(slow)).unwrap();
    let one = format!("GET {} HTTP/1.1\r\nHost: p.test\r\n\r\n", path(&url));
    conn.write_all(one.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut conn, &mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let hex = blake3::hash(&video).to_hex();
    let blob = dir.path().join("blobs").join(&hex[..2]).join(hex.as_str());
    let cut = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    cut.set_len(1 << 20).unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut rest).await;
    let at = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let got = &rest[at..];
    assert!(got.len() < video.len(), "a body longer than its file arrived whole");
    assert_eq!(got, &video[..got.len()], "what arrived is the file's bytes");

    // The next viewer finds it the wrong size: an error, the blob dropped, then refetched.
    assert_eq!(get(&url).await.status(), 500);
    assert_eq!(body(get(&url).await).await, video, "refetched whole");
    assert_eq!(origin.hits("/clip.png"), 2);
    assert_eq!(body(get(&small_url).await).await, small, "still serving");
    p.stop().await;
}
