//! Origin-pull (`[[upstream]]`): parasol in front of an instance's own bucket, a plain origin
//! or an S3 bucket read with credentials (a real s3s-fs), under a path prefix of the public
//! listener.

use crate::admin::audit_lines;
use crate::shared::{ACCESS, BUCKET, S3, SECRET};
use crate::util::*;

fn upstream_config(dir: &std::path::Path, allow: &[&str], upstream: &str) -> parasol::Config {
    let toml = config_toml(dir, allow, upstream);
    parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap()
}

#[tokio::test]
async fn a_prefix_serves_one_origin_cached_and_nothing_outside_it() {
    let origin = Origin::start("127.0.0.83").await;
    let img = png_bytes(40_000, 830);
    origin.route("/bucket/media_attachments/files/1/original/a.png", Route::ok(img.clone()));
    origin.route("/secret.png", Route::ok(png_bytes(1_000, 831)));
    let dir = tempfile::tempdir().unwrap();
    let extra =
        format!("[[upstream]]\nprefix = \"/system/\"\norigin = \"{}\"\n", origin.url("/bucket/"));
    let p = Parasol::start(upstream_config(dir.path(), &["127.0.0.83/32"], &extra)).await;
    let base = format!("http://{}", p.public);
    let file = format!("{base}/system/media_attachments/files/1/original/a.png");

    let r = get(&file).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&img));
    assert_eq!(r.headers()["cache-control"], "public, max-age=31536000, immutable");
    assert!(body(r).await == img);
    // Cached: again, with a query (never passed on, never a new entry), and a range.
    assert!(body(get(&format!("{file}?v=2")).await).await == img);
    let r = client().get(&file).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert!(body(r).await == img[10..20]);
    assert_eq!(origin.hits("/bucket/media_attachments/files/1/original/a.png"), 1);
    assert!(origin.seen().iter().all(|s| s.query.is_none()));

    // Nothing outside the origin's path is reachable.
    for (path, status) in [
        ("/system/../secret.png", 400),
        ("/system/%2e%2e/secret.png", 400),
        ("/system/a/..%2f..%2fsecret.png", 400),
        ("/system/a/%2e./secret.png", 400),
        ("/system/", 400),
        ("/elsewhere/a.png", 404),
    ] {
        // Sent as written: an HTTP client would resolve the dot segments itself.
        assert_eq!(raw_status(p.public, path).await, status, "{path}");
    }
    assert_eq!(origin.hits("/secret.png"), 0);
    // Only the origin's own files: a missing one is the origin's 404.
    assert_eq!(get(&format!("{base}/system/nope.png")).await.status(), 404);

    // Purged by its origin URL, like any source; the next view fetches it again.
    let purge = serde_json::json!({ "url": origin.url("/bucket/media_attachments/files/1/original/a.png") });
    let r = client()
        .post(p.admin_url("/admin/purge"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(purge.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(body(get(&file).await).await == img);
    assert_eq!(origin.hits("/bucket/media_attachments/files/1/original/a.png"), 2);
    p.stop().await;
}

#[tokio::test]
async fn a_host_takes_its_requests_first_and_the_guard_still_applies() {
    let origin = Origin::start("127.0.0.84").await;
    let img = png_bytes(6_000, 840);
    origin.route("/m/x.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    // The whole path space of media.example.test is the bucket, /m/ included; other hosts
    // keep the built-in routes. The second entry's origin is not in allow_networks.
    let extra = format!(
        "[[upstream]]\nprefix = \"/\"\nhost = \"media.example.test\"\norigin = \"{}\"\n\
         [[upstream]]\nprefix = \"/lan/\"\norigin = \"http://127.0.0.85:9/\"\n",
        origin.url("/")
    );
    let p = Parasol::start(upstream_config(dir.path(), &["127.0.0.84/32"], &extra)).await;
    let named = reqwest::Client::builder()
        .no_proxy()
        .resolve("media.example.test", p.public)
        .build()
        .unwrap();
    let port = p.public.port();
    let r = named.get(format!("http://media.example.test:{port}/m/x.png")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(body(r).await == img);
    // Another host: /m/ is parasol's signed route, which this path does not satisfy.
    let r = get(&format!("http://{}/m/x.png", p.public)).await;
    assert!(matches!(r.status().as_u16(), 400 | 403), "a bad native URL, not the bucket's file");
    // A signed URL still works beside the upstreams.
    assert!(body(get(&p.url(&origin.url("/m/x.png"))).await).await == img);
    assert_eq!(origin.hits("/m/x.png"), 1);
    // An upstream on a network not allowed is refused like any destination.
    let r = get(&format!("http://{}/lan/a.png", p.public)).await;
    assert_eq!(r.status(), 502);
    let refused = audit_lines(dir.path());
    assert!(refused.iter().all(|l| !l["url"].as_str().unwrap().contains("127.0.0.85")));
    p.stop().await;
}

#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn a_private_bucket_is_read_with_signed_requests_that_the_log_does_not_keep() {
    let s3 = S3::start_on("127.0.0.86").await;
    let img = png_bytes(50_000, 860);
    let key = "media_attachments/files/109/original/b c.png";
    let object = s3.object(&format!("mastodon/{key}"));
    std::fs::create_dir_all(object.parent().unwrap()).unwrap();
    std::fs::write(&object, &img).unwrap();
    let endpoint = format!("http://{}:{}", s3.host, s3.port);
    // The bucket refuses unsigned reads.
    let unsigned =
        format!("{endpoint}/{BUCKET}/mastodon/media_attachments/files/109/original/b%20c.png");
    assert_eq!(get(&unsigned).await.status(), 403);

    let upstream = |secret: &str| {
        format!(
            "[[upstream]]\nprefix = \"/\"\n[upstream.s3]\nendpoint = \"{endpoint}\"\n\
             bucket = \"{BUCKET}\"\naccess_key_id = \"{ACCESS}\"\nsecret_access_key = \"{secret}\"\n\
             key_prefix = \"mastodon/\"\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let p =
        Parasol::start(upstream_config(dir.path(), &["127.0.0.86/32"], &upstream(SECRET))).await;
    let file = format!("http://{}/media_attachments/files/109/original/b%20c.png", p.public);
    for _ in 0..3 {
        let r = get(&file).await;
        assert_eq!(r.status(), 200);
        assert!(body(r).await == img);
    }
    let lines = audit_lines(dir.path());
    assert_eq!(lines.len(), 1, "one request to the bucket: {lines:?}");
    let url = lines[0]["url"].as_str().unwrap();
    assert!(
        url.contains("X-Amz-Signature=redacted") && url.contains("X-Amz-Credential=redacted"),
        "{url}"
    );
    let log = std::fs::read_to_string(dir.path().join("outbound.jsonl")).unwrap();
    assert!(!log.contains(ACCESS) && !log.contains(SECRET), "no credential in the audit log");
    let config_dump = format!(
        "{:?}",
        serde_json::to_string(&upstream_config(dir.path(), &[], &upstream(SECRET))).unwrap()
    );
    assert!(!config_dump.contains(SECRET), "the secret is redacted when the config is shown");
    p.stop().await;

    // A wrong secret: the bucket refuses the signature, and nothing is served.
    let dir = tempfile::tempdir().unwrap();
    let wrong = upstream("not-the-secret-of-this-bucket");
    let p = Parasol::start(upstream_config(dir.path(), &["127.0.0.86/32"], &wrong)).await;
    let r =
        get(&format!("http://{}/media_attachments/files/109/original/b%20c.png", p.public)).await;
    assert_eq!(r.status(), 502);
    p.stop().await;
}

/// The status parasol answers to `GET <path>` sent byte for byte.
async fn raw_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: media.test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Issue 25: every spelling of one object is one source, one cache key and one fetch: on an
/// `[[upstream]]` prefix (anonymous, so a spelling per request would be a fetch per request),
/// and for bans on the Misskey route.
#[tokio::test]
async fn six_spellings_of_one_object_are_one_fetch_and_one_ban() {
    let origin = Origin::start("127.0.0.84").await;
    let img = png_bytes(20_000, 840);
    origin.route("/bucket/a.png", Route::ok(img.clone()));
    origin.route("/photo.jpg", Route::ok(png_bytes(5_000, 841)));
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[compat]\nmisskey = true\n[[upstream]]\nprefix = \"/system/\"\norigin = \"{}\"\n",
        origin.url("/bucket/")
    );
    let p = Parasol::start(upstream_config(dir.path(), &["127.0.0.84/32"], &extra)).await;
    for path in [
        "/system/a.png",
        "/system/%61.png",
        "/system/a%2Epng",
        "/system/a%2epng",
        "/system/%61%2E%70%6E%67",
        "/system/a.%70ng",
    ] {
        let (status, got) = raw_get(p.public, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(got == img, "{path}: the object's bytes");
    }
    assert_eq!(origin.hits("/bucket/a.png"), 1, "one fetch for six spellings");
    assert_eq!(p.blob_count(), 1);

    // A URL banned in one spelling is refused in every other, on the unsigned route too.
    let banned = origin.url("/photo.jpg");
    let (status, _) = crate::moderation::admin(
        &p,
        http::Method::POST,
        "/admin/ban",
        serde_json::json!({"url": banned}),
    )
    .await;
    assert_eq!(status, 200);
    let misskey = |source: &str| {
        let src: String = url::form_urlencoded::byte_serialize(source.as_bytes()).collect();
        format!("http://{}/proxy/x.webp?url={src}", p.public)
    };
    for spelling in [
        banned.clone(),
        banned.replace("/photo.jpg", "/%70hoto.jpg"),
        format!("{banned}?"),
        banned.replace("/photo.jpg", "/x/../photo%2Ejpg"),
    ] {
        let r = get(&misskey(&spelling)).await;
        assert_eq!(r.status(), 451, "{spelling}");
    }
    assert_eq!(origin.hits("/photo.jpg"), 0, "never fetched");
    p.stop().await;
}

/// GET `path` exactly as written (an HTTP client would resolve dot segments and escapes):
/// the status and body.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: media.test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let at = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |a| a + 4);
    let head = String::from_utf8_lossy(&answer[..at]).to_string();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer[at..].to_vec())
}

/// Issue 25: a bucket that cannot be reached is logged (at debug level, for an operator), but
/// never with the signed URL that was asked: a log line is not the place for a credential's
/// signature, or its access key id.
#[tokio::test]
async fn a_failed_signed_request_is_logged_without_its_url() {
    // A port nothing listens on, on a loopback address of its own.
    let closed = std::net::TcpListener::bind("127.0.0.87:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("parasol.toml");
    let upstream = format!(
        "[[upstream]]\nprefix = \"/\"\n[upstream.s3]\nendpoint = \"http://127.0.0.87:{port}\"\n\
         bucket = \"{BUCKET}\"\naccess_key_id = \"{ACCESS}\"\nsecret_access_key = \"{SECRET}\"\n"
    );
    std::fs::write(&config, config_toml(&dir.path().join("cache"), &["127.0.0.87/32"], &upstream))
        .unwrap();
    let (child, public, _admin, _, kept) =
        crate::cli::spawn_serving_kept(dir.path(), &[], Some(&config));
    let r = get(&format!("http://{public}/media/a.png")).await;
    assert_eq!(r.status(), 502);
    let logged = || kept.lock().unwrap().join("\n");
    assert!(eventually(|| logged().contains("origin request failed")).await, "{}", logged());
    let log = logged();
    assert!(!log.contains("X-Amz-"), "no signed query in the log: {log}");
    assert!(!log.contains(ACCESS) && !log.contains(SECRET), "no credential: {log}");
    child.sigterm();
    assert!(child.wait().await.success());
}
