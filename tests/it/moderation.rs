//! Moderation through the public contract: bans made with the admin API hold across URLs,
//! URL schemes, renditions and restarts; hash lists refuse new files and purge cached ones;
//! a real scanner (an HTTP server in the test) vetoes files, and its absence is handled as
//! configured; every decision is in the moderation log. Every file is generated.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parasol::fetch::guard::StaticLookup;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::util::*;

const CAMO_KEY: &str = "camo-moderation-key-0123456789-abcdefgh";

pub(crate) async fn admin(
    p: &Parasol,
    method: http::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let r = client()
        .request(method, p.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null))
}

fn hex_of(etag: &http::HeaderValue) -> String {
    etag.to_str().unwrap().trim_matches('"').to_string()
}

fn refused(r: &reqwest::Response) -> bool {
    r.status() == 451 && r.headers()["x-parasol-error"] == "banned"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_covers_every_url_scheme_and_rendition_and_survives_a_restart() {
    let origin = Origin::start("127.0.0.70").await;
    let bad = crate::variants::gradient_jpeg(300, 200);
    origin.route("/bad.jpg", Route::ok(bad.clone()));
    origin.route("/copy-of-bad.jpg", Route::ok(bad.clone()));
    origin.route("/other.png", Route::ok(png_bytes(3_000, 700)));
    origin.route("/fine.png", Route::ok(png_bytes(3_000, 701)));
    let port = origin.addr.port();
    let lookup = || StaticLookup::default().with("cdn.banned.test", &[ip("127.0.0.70")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = || {
        let mut cfg = config(dir.path(), &["127.0.0.70/32"]);
        cfg.compat.camo_key = CAMO_KEY.into();
        cfg.compat.misskey = true;
        cfg
    };
    let p = Parasol::start_with(cfg(), lookup()).await;
    let r = get(&p.url(&origin.url("/bad.jpg"))).await;
    assert_eq!(r.status(), 200);
    let hash = hex_of(&r.headers()["etag"]);
    assert_eq!(get(&format!("{}/avatar", p.url(&origin.url("/bad.jpg")))).await.status(), 200);
    let blobs_before = p.blob_count();

    let (status, answer) =
        admin(&p, http::Method::POST, "/admin/ban", json!({"hash": hash, "reason": "reported"}))
            .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["purged"]["entries"].as_u64().unwrap() >= 2,
        "the original and its avatar: {answer}"
    );
    assert!(p.blob_count() < blobs_before);
    let camo = |path: &str| {
        parasol::api::camo::sign_url(
            &format!("http://{}", p.public),
            CAMO_KEY.as_bytes(),
            &origin.url(path),
        )
    };
    let misskey = |path: &str| {
        let src: String =
            url::form_urlencoded::byte_serialize(origin.url(path).as_bytes()).collect();
        format!("http://{}/proxy/x.webp?url={src}&avatar=1", p.public)
    };
    let blobs_now = p.blob_count();
    for (what, url) in [
        ("the banned URL", p.url(&origin.url("/bad.jpg"))),
        ("its rendition", format!("{}/static", p.url(&origin.url("/bad.jpg")))),
        ("the same bytes at a URL never seen", p.url(&origin.url("/copy-of-bad.jpg"))),
        ("through camo", camo("/copy-of-bad.jpg")),
        ("through Misskey's route", misskey("/copy-of-bad.jpg")),
    ] {
        let r = get(&url).await;
        assert!(refused(&r), "{what}: {}", r.status());
    }
    assert_eq!(p.blob_count(), blobs_now, "nothing of the banned bytes was stored");

    // By URL and by domain: refused before the origin is asked.
    let other = origin.url("/other.png");
    let (status, _) = admin(&p, http::Method::POST, "/admin/ban", json!({"url": other})).await;
    assert_eq!(status, 200);
    assert!(refused(&get(&p.url(&other)).await));
    assert_eq!(origin.hits("/other.png"), 0);
    let (status, _) =
        admin(&p, http::Method::POST, "/admin/ban", json!({"domain": "banned.test"})).await;
    assert_eq!(status, 200);
    assert!(refused(&get(&p.url(&format!("http://cdn.banned.test:{port}/fine.png"))).await));
    assert_eq!(origin.hits("/fine.png"), 0);
    let (status, answer) =
        admin(&p, http::Method::POST, "/admin/ban", json!({"hash": "nope"})).await;
    assert_eq!(status, 400, "{answer}");
    p.stop().await;

    // Kept in the index: the same after a restart.
    let p = Parasol::start_with(cfg(), lookup()).await;
    let (status, answer) = admin(&p, http::Method::GET, "/admin/bans", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(answer["bans"].as_array().unwrap().len(), 3, "{answer}");
    assert!(refused(&get(&p.url(&origin.url("/copy-of-bad.jpg"))).await));
    assert!(refused(&get(&p.url(&other)).await));
    let (status, _) = admin(&p, http::Method::DELETE, "/admin/ban", json!({"hash": hash})).await;
    assert_eq!(status, 200);
    assert_eq!(get(&p.url(&origin.url("/bad.jpg"))).await.status(), 200, "lifted");
    let (status, _) = admin(&p, http::Method::DELETE, "/admin/ban", json!({"hash": hash})).await;
    assert_eq!(status, 404, "already lifted");
    let refusals = "parasol_moderation_total{rule=\"hash\",action=\"refused\"}";
    assert!(p.metric(refusals).await >= 1);
    p.stop().await;

    // Every decision is a line; `parasol audit --moderation` sums them up.
    let log = dir.path().join("moderation.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    // Nothing of a viewer: only these fields, and hosts are origins' (the viewers were on
    // 127.0.0.1).
    let allowed = ["ts", "rule", "action", "hash", "host", "reason"];
    for line in text.lines() {
        let decision: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
        assert!(decision.keys().all(|k| allowed.contains(&k.as_str())), "{line}");
        if let Some(host) = decision.get("host").and_then(Value::as_str) {
            assert!(["127.0.0.70", "cdn.banned.test"].contains(&host), "{line}");
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parasol"))
        .args(["audit", "--moderation", "--json"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["decisions"]["hash"]["banned"].as_u64() >= Some(1), "{summary}");
    assert!(summary["decisions"]["hash"]["lifted"].as_u64() >= Some(1), "{summary}");
    assert!(summary["decisions"]["url"]["refused"].as_u64() >= Some(1), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_list_refuses_new_files_and_purges_cached_ones() {
    let origin = Origin::start("127.0.0.71").await;
    let known = png_bytes(5_000, 720);
    let also_known = png_bytes(5_000, 721);
    origin.route("/known.png", Route::ok(known.clone()));
    origin.route("/again.png", Route::ok(known.clone()));
    origin.route("/md5.png", Route::ok(also_known.clone()));
    origin.route("/fine.png", Route::ok(png_bytes(5_000, 722)));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    std::fs::write(&file, config_toml(&cache, &["127.0.0.71/32"], "")).unwrap();
    let cfg = parasol::Config::load(Some(&file)).unwrap();
    let p =
        Parasol::start_opts(cfg, options(Arc::new(StaticLookup::default()), Some(file.clone())))
            .await;
    assert_eq!(get(&p.url(&origin.url("/known.png"))).await.status(), 200);
    assert_eq!(get(&p.url(&origin.url("/fine.png"))).await.status(), 200);
    assert_eq!(p.blob_count(), 2);

    // A list in the forms lists come in: a SHA-256, an MD5 with a label, a comment.
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&known));
    let md5 = hex::encode(md5::Md5::digest(&also_known));
    let list = dir.path().join("list.txt");
    std::fs::write(&list, format!("# a shared list\n{sha}\n{md5} label\n")).unwrap();
    let extra = format!("[moderation]\nhash_lists = [\"{}\"]\n", list.display());
    std::fs::write(&file, config_toml(&cache, &["127.0.0.71/32"], &extra)).unwrap();
    let r = client()
        .post(p.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(eventually(|| p.blob_count() == 1).await, "the listed cached file is purged");
    for path in ["/known.png", "/again.png", "/md5.png"] {
        assert!(refused(&get(&p.url(&origin.url(path))).await), "{path}");
    }
    assert_eq!(p.blob_count(), 1, "nothing listed was stored");
    assert_eq!(get(&p.url(&origin.url("/fine.png"))).await.status(), 200);
    let listed = "parasol_moderation_total{rule=\"hash_list\",action=\"refused\"}";
    assert_eq!(p.metric(listed).await, 3);

    // A SHA-256 ban through the admin API works the same way: the cached file is found by
    // reading it, purged, and refused from then on.
    let fine = png_bytes(5_000, 722);
    let fine_sha = hex::encode(sha2::Sha256::digest(&fine));
    let r = client()
        .post(p.admin_url("/admin/ban"))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{{\"sha256\": \"{fine_sha}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(eventually(|| p.blob_count() == 0).await, "found among cached files and purged");
    assert!(refused(&get(&p.url(&origin.url("/fine.png"))).await));
    p.stop().await;
}

/// A scanner: answers 403 for files whose blake3 is in `bad`, waits `slow` for those in
/// `slow_files`, 200 otherwise; remembers what it was sent.
struct Scanner {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<http::HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scanner {
    async fn start(ip: &str, bad: HashSet<String>, slow_files: HashSet<String>) -> Scanner {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (bad, slow_files) = (Arc::new(bad), Arc::new(slow_files));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (record, bad, slow_files) = (record.clone(), bad.clone(), slow_files.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (record, bad, slow_files) =
                            (record.clone(), bad.clone(), slow_files.clone());
                        async move {
                            let headers = req.headers().clone();
                            let hash = headers["x-parasol-blake3"].to_str().unwrap().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            assert_eq!(
                                blake3::hash(&body).to_hex().as_str(),
                                hash,
                                "the bytes it names"
                            );
                            record.lock().unwrap().push(headers);
                            if slow_files.contains(&hash) {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            let status = if bad.contains(&hash) { 403 } else { 200 };
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Scanner { addr, seen, task }
    }
}

fn with_scanner(dir: &std::path::Path, allow: &[&str], url: &str, fail: &str) -> parasol::Config {
    let extra = format!(
        "[moderation]\nscanner_url = \"{url}\"\nscanner_fail = \"{fail}\"\nscanner_timeout = \"500ms\"\n"
    );
    parasol::Config::from_sources("test", &config_toml(dir, allow, &extra), std::iter::empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_vetoes_files_once_each_and_its_absence_is_handled_as_configured() {
    let origin = Origin::start("127.0.0.72").await;
    let (good, bad, slow) = (png_bytes(4_000, 730), png_bytes(4_000, 731), png_bytes(4_000, 732));
    origin.route("/good.png", Route::ok(good.clone()));
    origin.route("/good-again.png", Route::ok(good.clone()));
    origin.route("/bad.png", Route::ok(bad.clone()));
    origin.route("/slow.png", Route::ok(slow.clone()));
    let hex = |b: &Bytes| blake3::hash(b).to_hex().to_string();
    let scanner = Scanner::start(
        "127.0.0.73",
        [hex(&bad)].into_iter().collect(),
        [hex(&slow)].into_iter().collect(),
    )
    .await;
    let url = format!("http://{}/scan", scanner.addr);
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(with_scanner(dir.path(), &["127.0.0.72/32"], &url, "closed")).await;
    let r = client()
        .get(p.url(&origin.url("/good.png")))
        .header("cookie", "viewer-secret=1")
        .header("user-agent", "ViewerBrowser/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&p.url(&origin.url("/good-again.png"))).await.status(), 200);
    {
        let seen = scanner.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "one file, one scan, however many URLs");
        assert_eq!(seen[0]["content-type"], "image/png");
        assert_eq!(seen[0]["x-parasol-source-host"], "127.0.0.72");
        assert!(seen[0].get("cookie").is_none(), "nothing of the viewer");
        assert!(!format!("{:?}", seen[0]).contains("ViewerBrowser"));
    }
    assert!(refused(&get(&p.url(&origin.url("/bad.png"))).await), "vetoed");
    let (_, bans) = admin(&p, http::Method::GET, "/admin/bans", Value::Null).await;
    assert_eq!(bans["bans"][0]["value"], hex(&bad), "and its content banned: {bans}");
    assert_eq!(bans["bans"][0]["reason"], "scanner answered 403");
    // Slow beyond scanner_timeout: closed refuses for now (503, not remembered).
    let r = get(&p.url(&origin.url("/slow.png"))).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-parasol-error"], "scanner_unavailable");
    assert_eq!(p.blob_count(), 1, "only the good file is stored");
    p.stop().await;

    // A scanner that is down: closed refuses, open serves and asks again next time.
    let down = format!("http://127.0.0.74:{}/scan", free_port());
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(with_scanner(dir.path(), &["127.0.0.72/32"], &down, "closed")).await;
    assert_eq!(get(&p.url(&origin.url("/good.png"))).await.status(), 503);
    p.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(with_scanner(dir.path(), &["127.0.0.72/32"], &down, "open")).await;
    assert_eq!(get(&p.url(&origin.url("/good.png"))).await.status(), 200, "served unscanned");
    assert_eq!(get(&p.url(&origin.url("/slow.png"))).await.status(), 200);
    let unscanned = "parasol_moderation_total{rule=\"scanner\",action=\"unscanned\"}";
    assert_eq!(p.metric(unscanned).await, 2);
    p.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Rules name the origin's bytes (a ban of the blake3 an admin computed of the file a
/// remote server posted, a shared list's SHA-256); parasol serves those bytes with their
/// metadata stripped. The index keeps the origin's digests, so the rules still find the
/// cached, stripped copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_about_the_origin_bytes_find_copies_whose_metadata_was_stripped() {
    use img_parts::ImageEXIF;
    let plain = crate::variants::gradient_jpeg(200, 150);
    let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(plain.into()).unwrap();
    jpeg.set_exif(Some(crate::variants::exif_with_gps(1).into()));
    let mut tagged = Vec::new();
    jpeg.encoder().write_to(&mut tagged).unwrap();
    let origin = Origin::start("127.0.0.75").await;
    origin.route("/holiday.jpg", Route::ok(tagged.clone()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    let write = |extra: &str| {
        let extra = format!("[moderation]\nkeep_digests = true\n{extra}");
        std::fs::write(&file, config_toml(&cache, &["127.0.0.75/32"], &extra)).unwrap();
    };
    write("");
    let cfg = parasol::Config::load(Some(&file)).unwrap();
    let p =
        Parasol::start_opts(cfg, options(Arc::new(StaticLookup::default()), Some(file.clone())))
            .await;
    let url = p.url(&origin.url("/holiday.jpg"));
    let served = body(get(&url).await).await;
    assert_ne!(served, tagged, "stripped");

    // A ban of the origin's blake3: the stripped copy is purged and refused.
    let origin_hash = blake3::hash(&tagged).to_hex().to_string();
    let (status, answer) =
        admin(&p, http::Method::POST, "/admin/ban", json!({"hash": origin_hash})).await;
    assert_eq!(status, 200);
    assert!(answer["purged"]["entries"].as_u64() >= Some(1), "{answer}");
    assert!(refused(&get(&url).await));
    let (status, _) =
        admin(&p, http::Method::DELETE, "/admin/ban", json!({"hash": origin_hash})).await;
    assert_eq!(status, 200);
    assert_eq!(get(&url).await.status(), 200, "lifted, cached again");
    assert_eq!(p.blob_count(), 1);

    // A list loaded later, naming the origin's SHA-256: found by the digests kept.
    use sha2::Digest;
    let list = dir.path().join("list.txt");
    std::fs::write(&list, hex::encode(sha2::Sha256::digest(&tagged))).unwrap();
    write(&format!("hash_lists = [\"{}\"]\n", list.display()));
    let r = client()
        .post(p.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(eventually(|| p.blob_count() == 0).await, "the stripped copy is purged");
    assert!(refused(&get(&url).await));
    p.stop().await;
}

/// Issue 25: a photo cached with its EXIF stripped, on the default settings (no digests kept
/// for their own sake). Preparing changed its bytes, so the origin's SHA-256 and MD5 were
/// kept with it: a SHA-256 ban purges it at once and says it matched everything, and a hash
/// list refuses it on the next hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_ban_reaches_a_photo_cached_with_its_metadata_stripped() {
    use img_parts::ImageEXIF;
    use sha2::Digest;
    let mut tagged = Vec::new();
    for seed in [1, 2] {
        let plain = crate::variants::gradient_jpeg(200 + seed, 150);
        let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(plain.into()).unwrap();
        jpeg.set_exif(Some(crate::variants::exif_with_gps(1).into()));
        let mut bytes = Vec::new();
        jpeg.encoder().write_to(&mut bytes).unwrap();
        tagged.push(bytes);
    }
    let origin = Origin::start("127.0.0.76").await;
    origin.route("/holiday.jpg", Route::ok(tagged[0].clone()));
    origin.route("/beach.jpg", Route::ok(tagged[1].clone()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    let write = |extra: &str| {
        std::fs::write(&file, config_toml(&cache, &["127.0.0.76/32"], extra)).unwrap();
    };
    write("");
    let cfg = parasol::Config::load(Some(&file)).unwrap();
    let p =
        Parasol::start_opts(cfg, options(Arc::new(StaticLookup::default()), Some(file.clone())))
            .await;
    let (holiday, beach) = (p.url(&origin.url("/holiday.jpg")), p.url(&origin.url("/beach.jpg")));
    for (url, original) in [(&holiday, &tagged[0]), (&beach, &tagged[1])] {
        let served = body(get(url).await).await;
        assert_ne!(&served[..], &original[..], "stripped");
    }
    let avatar = format!("{holiday}/avatar");
    assert_eq!(get(&avatar).await.status(), 200);

    let sha256 = hex::encode(sha2::Sha256::digest(&tagged[0]));
    let (status, answer) =
        admin(&p, http::Method::POST, "/admin/ban", json!({"sha256": sha256})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["purged"]["entries"].as_u64() >= Some(2), "the photo and its avatar: {answer}");
    assert_eq!(answer["unmatched"], 0, "{answer}");
    assert!(refused(&get(&holiday).await), "refused at once, not after a scan");
    assert!(refused(&get(&avatar).await));
    assert_eq!(get(&beach).await.status(), 200, "the other photo stays");

    // A list naming the other photo's MD5: refused on its next hit.
    let list = dir.path().join("list.txt");
    std::fs::write(&list, hex::encode(md5::Md5::digest(&tagged[1])) + "\n").unwrap();
    write(&format!("[moderation]\nhash_lists = [\"{}\"]\n", list.display()));
    let r = client()
        .post(p.admin_url("/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(refused(&get(&beach).await));
    assert!(eventually(|| p.blob_count() == 0).await, "and purged");
    p.stop().await;
}

/// A SHA-256 ban finds a cached file kept in a segment (read there, not from a file of its
/// own), purges it and frees its place; the other file stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_ban_finds_and_purges_a_file_kept_in_a_segment() {
    let origin = Origin::start("127.0.0.71").await;
    let (banned, kept) = (png_bytes(5_000, 730), png_bytes(5_000, 731));
    origin.route("/banned.png", Route::ok(banned.clone()));
    origin.route("/kept.png", Route::ok(kept.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.71/32"]);
    cfg.cache.segment_max_object_bytes = parasol::config::Size(64 * 1024);
    let p = Parasol::start(cfg).await;
    for path in ["/banned.png", "/kept.png"] {
        assert_eq!(get(&p.url(&origin.url(path))).await.status(), 200);
    }
    assert_eq!(files_under(&dir.path().join("blobs")), 0, "kept in a segment, not a file each");
    assert_eq!(p.blob_count(), 2);
    // Each charged the whole blocks it takes in its segment: 2 × 8 KiB.
    assert_eq!(p.metric("parasol_cache_bytes{tier=\"disk\"}").await, 2 * 8192);
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&banned));
    let (status, _) = admin(&p, http::Method::POST, "/admin/ban", json!({"sha256": sha})).await;
    assert_eq!(status, 200);
    let mut purged = false;
    for _ in 0..100 {
        if p.metric("parasol_cache_bytes{tier=\"disk\"}").await == 8192 {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(purged, "the banned file was found in its segment and purged");
    assert!(refused(&get(&p.url(&origin.url("/banned.png"))).await));
    assert_eq!(get(&p.url(&origin.url("/kept.png"))).await.status(), 200);
    assert_eq!(origin.hits("/kept.png"), 1);
    p.stop().await;
}
