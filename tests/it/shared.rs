//! The shared tier against a real S3 server: s3s-fs (`cargo install s3s-fs --features binary`,
//! which `.ci/run` does), started here on loopback with a temp directory as its storage.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::util::*;

pub(crate) const ACCESS: &str = "parasol-test";
pub(crate) const SECRET: &str = "parasol-test-secret";
pub(crate) const BUCKET: &str = "media";

/// A running s3s-fs; killed when dropped.
pub(crate) struct S3 {
    child: Child,
    pub(crate) host: String,
    pub(crate) port: u16,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3 {
    /// Starts s3s-fs (the tests that call this are ignored where it is not installed).
    async fn start() -> S3 {
        Self::start_on("127.0.0.1").await
    }

    /// Starts s3s-fs listening on `host`.
    pub(crate) async fn start_on(host: &str) -> S3 {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join(BUCKET)).unwrap(); // a bucket is a directory of the root
        let port = std::net::TcpListener::bind((host, 0)).unwrap().local_addr().unwrap().port();
        let child = Command::new("s3s-fs")
            .args(["--host", host, "--port", &port.to_string()])
            .args(["--access-key", ACCESS, "--secret-key", SECRET])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let s3 = S3 { child, host: host.to_string(), port, root, _dir: dir };
        let up = eventually(|| std::net::TcpStream::connect((host, port)).is_ok()).await;
        assert!(up, "s3s-fs listens");
        s3
    }

    fn config(&self) -> String {
        format!(
            "[shared]\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"{BUCKET}\"\n\
             access_key_id = \"{ACCESS}\"\nsecret_access_key = \"{SECRET}\"\ntimeout = \"2s\"\n",
            self.port
        )
    }

    /// Where s3s-fs keeps the object `name` of the bucket.
    pub(crate) fn object(&self, name: &str) -> PathBuf {
        self.root.join(BUCKET).join(name)
    }
}

fn node_config(dir: &std::path::Path, s3: &S3) -> parasol::Config {
    // Objects above 1 MiB are served from disk and uploaded in parts.
    let toml = config_toml(dir, &["127.0.0.23/32", "127.0.0.24/32"], &s3.config())
        .replace("fsync = false", "fsync = false\nmemory_max_object_bytes = \"1 MiB\"");
    parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap()
}

const PUBLISHED: &str = "parasol_shared_tier_total{op=\"publish\",outcome=\"ok\"}";

#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn a_node_with_an_empty_disk_refills_from_the_bucket_without_the_origin() {
    let s3 = S3::start().await;
    let origin = Origin::start("127.0.0.23").await;
    let png = png_bytes(30_000, 91);
    origin.route("/a.png", Route::ok(png.clone()));
    let big = png_bytes(3 << 20, 95);
    origin.route("/big.png", Route::ok(big.clone()));
    let source = origin.url("/a.png");

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Parasol::start(node_config(dir_a.path(), &s3)).await;
    let r = get(&a.url(&source)).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == png);
    let a_ref = &a;
    let r = get(&a.url(&origin.url("/big.png"))).await;
    assert!(body(r).await == big);
    let published = eventually_async(|| async move { a_ref.metric(PUBLISHED).await == 2 }).await;
    assert!(published, "node A uploads its fills (the large one in parts)");
    // The blob is in the bucket under its content name, byte for byte.
    let hash = blake3::hash(&png).to_hex().to_string();
    let stored = std::fs::read(s3.object(&format!("parasol/blobs/{hash}"))).unwrap();
    assert!(stored == png[..], "the bucket holds the bytes under their blake3 name");

    // Node B has never seen the URL and has an empty disk: the bucket serves it, not the origin.
    let b = Parasol::start(node_config(dir_b.path(), &s3)).await;
    let r = get(&b.url(&source)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&png));
    assert!(body(r).await == png);
    assert_eq!(origin.hits("/a.png"), 1, "one origin request across both nodes");
    assert_eq!(b.metric("parasol_cache_results_total{result=\"hit_shared\"}").await, 1);
    // A large one streams from the bucket into B's disk store.
    let r = get(&b.url(&origin.url("/big.png"))).await;
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&big));
    assert!(body(r).await == big);
    assert_eq!(origin.hits("/big.png"), 1);
    assert_eq!(b.metric("parasol_cache_results_total{result=\"hit_shared\"}").await, 2);
    // B keeps its own copies: asked again, they are local hits.
    assert_eq!(get(&b.url(&source)).await.status(), 200);
    assert_eq!(get(&b.url(&origin.url("/big.png"))).await.status(), 200);
    assert_eq!(b.metric("parasol_cache_results_total{result=\"hit_shared\"}").await, 2);
    b.stop().await;

    // Node A loses its disk and restarts: it refills from the bucket.
    a.stop().await;
    std::fs::remove_dir_all(dir_a.path()).unwrap();
    let a = Parasol::start(node_config(dir_a.path(), &s3)).await;
    let r = get(&a.url(&source)).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == png);
    assert_eq!(origin.hits("/a.png"), 1, "a lost disk costs no origin request");
    a.stop().await;
}

#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn the_bucket_going_down_costs_a_metric_not_an_error() {
    let s3 = S3::start().await;
    let origin = Origin::start("127.0.0.24").await;
    let (x, y) = (png_bytes(12_000, 92), png_bytes(13_000, 93));
    origin.route("/x.png", Route::ok(x.clone()));
    origin.route("/y.png", Route::ok(y.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &s3);
    let p = Parasol::start(cfg.clone()).await;
    assert_eq!(get(&p.url(&origin.url("/x.png"))).await.status(), 200);
    let p_ref = &p;
    assert!(eventually_async(|| async move { p_ref.metric(PUBLISHED).await == 1 }).await);

    drop(s3); // the bucket is gone mid-run
    // What this node holds is served as before.
    let r = get(&p.url(&origin.url("/x.png"))).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == x);
    // A new URL is fetched from the origin and served; only its upload fails.
    let r = get(&p.url(&origin.url("/y.png"))).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == y);
    let failed = "parasol_shared_tier_total{op=\"publish\",outcome=\"error\"}";
    assert!(eventually_async(|| async move { p_ref.metric(failed).await == 1 }).await);
    p.stop().await;

    // A node with an empty disk and a dead bucket falls back to the origin.
    let empty = tempfile::tempdir().unwrap();
    let mut cfg = cfg;
    cfg.cache.dir = empty.path().to_path_buf();
    let q = Parasol::start(cfg).await;
    let r = get(&q.url(&origin.url("/x.png"))).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == x);
    assert_eq!(origin.hits("/x.png"), 2);
    let lookup_failed = "parasol_shared_tier_total{op=\"lookup\",outcome=\"error\"}";
    assert_eq!(q.metric(lookup_failed).await, 1);
    q.stop().await;
}

#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn the_tier_writes_once_reads_back_and_trusts_nothing_it_reads() {
    use parasol::cache::Key;
    use parasol::cache::index::Record;
    use parasol::cache::shared::SharedTier;
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_config(dir.path(), &s3);
    let tier = SharedTier::from_config(&cfg.shared).unwrap().expect("configured");
    let bytes = png_bytes(5_000, 94);
    let hash = blake3::hash(&bytes);
    let record = |url: &str| Record {
        hash: hash.to_hex().to_string(),
        len: bytes.len() as u64,
        content_type: "image/png".into(),
        url: url.into(),
        stored_at: 1,
        final_host: None,
        origin: None,
        pinned_until: None,
        variant: None,
        at: None,
    };
    let (k1, k2) = (Key::new("http://a.test/1.png", None), Key::new("http://b.test/2.png", None));
    assert!(tier.lookup(&k1).await.unwrap().is_none(), "nothing there yet");
    tier.publish(&k1, &record("http://a.test/1.png"), bytes.clone()).await.unwrap();
    // A second node publishing the same bytes under another URL: the blob exists, which is fine.
    tier.publish(&k2, &record("http://b.test/2.png"), bytes.clone()).await.unwrap();
    let (got, body) = tier.lookup(&k2).await.unwrap().expect("found");
    assert_eq!((got.url.as_str(), body), ("http://b.test/2.png", bytes.clone()));
    let blobs = std::fs::read_dir(s3.object("parasol/blobs")).unwrap().count();
    assert_eq!(blobs, 1, "one object for the same bytes");

    // Bytes in the bucket that no longer match their name are refused, not served.
    let path = s3.object(&format!("parasol/blobs/{}", hash.to_hex()));
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[100] ^= 1;
    std::fs::write(&path, rotten).unwrap();
    assert!(tier.lookup(&k1).await.is_err(), "a rotten blob is an error, never bytes");
}

/// Rotten bytes in the bucket are never served: the node asks the origin instead, and its
/// upload repairs the bucket.
#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn a_rotten_blob_in_the_bucket_sends_the_node_to_the_origin() {
    let s3 = S3::start().await;
    let origin = Origin::start("127.0.0.23").await;
    let png = png_bytes(20_000, 96);
    origin.route("/r.png", Route::ok(png.clone()));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Parasol::start(node_config(dir_a.path(), &s3)).await;
    assert_eq!(get(&a.url(&origin.url("/r.png"))).await.status(), 200);
    let a_ref = &a;
    assert!(eventually_async(|| async move { a_ref.metric(PUBLISHED).await == 1 }).await);
    let path = s3.object(&format!("parasol/blobs/{}", blake3::hash(&png).to_hex()));
    let mut rotten = std::fs::read(&path).unwrap();
    rotten[5_000] ^= 0x20;
    std::fs::write(&path, rotten).unwrap();

    let b = Parasol::start(node_config(dir_b.path(), &s3)).await;
    let r = get(&b.url(&origin.url("/r.png"))).await;
    assert_eq!(r.status(), 200);
    assert!(body(r).await == png, "the origin's bytes, not the bucket's");
    assert_eq!(origin.hits("/r.png"), 2);
    let failed = "parasol_shared_tier_total{op=\"lookup\",outcome=\"error\"}";
    assert_eq!(b.metric(failed).await, 1);
    // The rotten copy was deleted, and B's upload put the right bytes back.
    let b_ref = &b;
    assert!(eventually_async(|| async move { b_ref.metric(PUBLISHED).await == 1 }).await);
    assert!(std::fs::read(&path).unwrap() == png[..], "the bucket is repaired");
    a.stop().await;
    b.stop().await;
}

/// Whoever can write to the bucket could plant a blob no node would publish: here an SVG with
/// script, named by its own hash, under the key of a PNG. A node does not serve it (let alone
/// as `image/svg+xml`): the bucket's answer passes the preparation an origin's answer gets,
/// and a blob that preparing would change is deleted and the origin asked.
#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn a_planted_blob_in_the_bucket_is_prepared_refused_and_deleted() {
    let s3 = S3::start().await;
    let origin = Origin::start("127.0.0.24").await;
    let png = png_bytes(20_000, 97);
    origin.route("/p.png", Route::ok(png.clone()));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Parasol::start(node_config(dir_a.path(), &s3)).await;
    assert_eq!(get(&a.url(&origin.url("/p.png"))).await.status(), 200);
    let a_ref = &a;
    assert!(eventually_async(|| async move { a_ref.metric(PUBLISHED).await == 1 }).await);
    a.stop().await;

    let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"40\" height=\"40\">\
                <script>alert(document.domain)</script><rect width=\"40\" height=\"40\"/></svg>";
    let hash = blake3::hash(svg);
    let blob = s3.object(&format!("parasol/blobs/{}", hash.to_hex()));
    std::fs::write(&blob, svg).unwrap();
    let keys = s3.root.join(BUCKET).join("parasol/keys");
    let key_file = std::fs::read_dir(&keys).unwrap().next().unwrap().unwrap().path();
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    record["hash"] = hash.to_hex().to_string().into();
    record["len"] = svg.len().into();
    record["content_type"] = "image/svg+xml".into();
    std::fs::write(&key_file, serde_json::to_vec(&record).unwrap()).unwrap();

    let b = Parasol::start(node_config(dir_b.path(), &s3)).await;
    let r = get(&b.url(&origin.url("/p.png"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert!(body(r).await == png, "the origin's bytes, not the planted ones");
    assert_eq!(origin.hits("/p.png"), 2, "asked again");
    let refused = "parasol_shared_tier_total{op=\"lookup\",outcome=\"refused\"}";
    assert_eq!(b.metric(refused).await, 1);
    assert!(!blob.exists(), "the planted blob is deleted");
    let b_ref = &b;
    assert!(eventually_async(|| async move { b_ref.metric(PUBLISHED).await == 1 }).await);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&key_file).unwrap()).unwrap();
    assert_eq!(record["hash"], blake3::hash(&png).to_hex().to_string(), "repaired");
    b.stop().await;
}

/// A ban made on one node reaches every node through the bucket: the other node purges its
/// copy and refuses the file; a lift travels the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn bans_reach_every_node_through_the_bucket() {
    let s3 = S3::start().await;
    let origin = Origin::start("127.0.0.23").await;
    let png = png_bytes(8_000, 98);
    origin.route("/b.png", Route::ok(png.clone()));
    let config = |dir: &std::path::Path| {
        let extra = format!("{}[moderation]\nsync_interval = \"200ms\"\n", s3.config());
        let toml = config_toml(dir, &["127.0.0.23/32"], &extra);
        parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap()
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Parasol::start(config(dir_a.path())).await;
    let b = Parasol::start(config(dir_b.path())).await;
    let url = origin.url("/b.png");
    assert_eq!(get(&b.url(&url)).await.status(), 200, "B has it");
    let b_ref = &b;
    assert!(eventually_async(|| async move { b_ref.metric(PUBLISHED).await == 1 }).await);
    let hash = blake3::hash(&png).to_hex().to_string();
    let in_bucket = s3.object(&format!("parasol/blobs/{hash}"));
    assert!(in_bucket.exists());
    let ban = client()
        .post(a.admin_url("/admin/ban"))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{{\"hash\": \"{hash}\", \"reason\": \"reported on A\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ban.status(), 200);
    assert!(!in_bucket.exists(), "A deleted it from the bucket");
    assert!(eventually(|| b.blob_count() == 0).await, "B purged its copy");
    let r = get(&b.url(&url)).await;
    assert_eq!(r.status(), 451, "and refuses it");
    let bans = get(&b.admin_url("/admin/bans")).await;
    assert_eq!(bans.status(), 401, "the list needs the token");
    let lift = client()
        .delete(a.admin_url("/admin/ban"))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{{\"hash\": \"{hash}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lift.status(), 200);
    let url_ref = &url;
    let lifted =
        eventually_async(|| async move { get(&b_ref.url(url_ref)).await.status() == 200 }).await;
    assert!(lifted, "the lift reached B too");
    a.stop().await;
    b.stop().await;
}
