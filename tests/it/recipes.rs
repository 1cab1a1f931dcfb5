//! The TLS nginx recipe (`config/recipes/nginx-tls.conf`) run for real in front of parasol:
//! Debian's nginx (installed by `.ci/run`), a throwaway self-signed certificate, loopback only.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::util::*;

pub(crate) struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The recipe with its listen address, certificate and upstream pointed at this test.
fn adapted_recipe(name: &str, dir: &Path, port: u16, upstream: std::net::SocketAddr) -> String {
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/recipes").join(name),
    )
    .unwrap();
    recipe
        .replace("listen 443 ssl", &format!("listen 127.0.0.1:{port} ssl"))
        .replace(
            "/etc/letsencrypt/live/media.example.social/fullchain.pem",
            &dir.join("cert.pem").display().to_string(),
        )
        .replace(
            "/etc/letsencrypt/live/media.example.social/privkey.pem",
            &dir.join("key.pem").display().to_string(),
        )
        .replace("127.0.0.1:8080", &upstream.to_string())
}

#[tokio::test]
#[cfg_attr(not(has_nginx), ignore = "needs nginx and openssl: apt-get install nginx-light openssl")]
async fn the_tls_nginx_recipe_fronts_parasol() {
    nginx_recipe_fronts_parasol("nginx-tls.conf", "127.0.0.19").await;
}

/// Mastodon's `S3_ALIAS_HOST` (and GoToSocial's `storage-s3-redirect-url`) pointed at the
/// recipe: the bucket's paths on media.example.social, each fetched from the bucket once.
#[tokio::test]
#[cfg_attr(not(has_nginx), ignore = "needs nginx and openssl: apt-get install nginx-light openssl")]
async fn the_mastodon_nginx_recipe_fronts_the_bucket_through_parasol() {
    let bucket = Origin::start("127.0.0.21").await;
    let img = png_bytes(30_000, 701);
    let key = "/media_attachments/files/109/348/original/8f2b.png";
    bucket.route(&format!("/mastodon-media{key}"), Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[upstream]]\nprefix = \"/\"\nhost = \"media.example.social\"\norigin = \"{}\"\n",
        bucket.url("/mastodon-media/")
    );
    let toml = config_toml(&dir.path().join("cache"), &["127.0.0.21/32"], &extra);
    let p =
        Parasol::start(parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap())
            .await;
    let work = dir.path();
    let port = free_port();
    let _running = start_nginx(work, &adapted_recipe("nginx-mastodon.conf", work, port, p.public));
    let front = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let viewer = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .resolve("media.example.social", front)
        .build()
        .unwrap();
    let url = format!("https://media.example.social:{port}{key}");
    let served = eventually_async(|| async {
        viewer.get(&url).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "the bucket's file is served through nginx and parasol");
    let r = viewer.get(&url).header("x-forwarded-for", "203.0.113.9").send().await.unwrap();
    assert_eq!(r.headers()["content-security-policy"], "default-src 'none'; sandbox");
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&img));
    assert_eq!(r.bytes().await.unwrap(), img);
    assert_eq!(viewer.delete(&url).send().await.unwrap().status(), 403, "only GET and HEAD");
    assert_eq!(bucket.hits(&format!("/mastodon-media{key}")), 1);
    for seen in bucket.seen() {
        assert!(!seen.headers.contains_key("x-forwarded-for"), "nothing of the viewer");
    }
    p.stop().await;
}

async fn nginx_recipe_fronts_parasol(recipe: &str, origin_ip: &str) {
    let origin = Origin::start(origin_ip).await;
    let img = png_bytes(30_000, 700);
    origin.route("/pic.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let allow = format!("{origin_ip}/32");
    let p = Parasol::start(config(&dir.path().join("cache"), &[allow.as_str()])).await;

    let work = dir.path();
    let port = free_port();
    let _running = start_nginx(work, &adapted_recipe(recipe, work, port, p.public));

    let viewer =
        reqwest::Client::builder().no_proxy().danger_accept_invalid_certs(true).build().unwrap();
    let path = url::Url::parse(&p.url(&origin.url("/pic.png"))).unwrap().path().to_string();
    let front = format!("https://127.0.0.1:{port}");
    let served = eventually_async(|| async {
        viewer.get(format!("{front}{path}")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(served, "the media route is served through nginx");
    let r = viewer
        .get(format!("{front}{path}"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-security-policy"], "default-src 'none'; sandbox");
    assert_eq!(r.bytes().await.unwrap(), img);
    assert_eq!(
        viewer.get(format!("{front}/metrics")).send().await.unwrap().status(),
        404,
        "admin never exposed"
    );
    assert_eq!(origin.hits("/pic.png"), 1);
    for seen in origin.seen() {
        assert!(
            !seen.headers.contains_key("x-forwarded-for"),
            "nothing of the viewer reaches the origin"
        );
    }
    p.stop().await;
}

/// Writes a throwaway certificate and an nginx.conf holding `server_block` into `work`, checks
/// it with `nginx -t` and starts nginx as one process (killed when the guard drops).
fn start_nginx(work: &Path, server_block: &str) -> Nginx {
    let cert = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", "/CN=media.example.social", "-keyout"])
        .arg(work.join("key.pem"))
        .arg("-out")
        .arg(work.join("cert.pem"))
        .output()
        .expect("openssl is installed");
    assert!(cert.status.success(), "{}", String::from_utf8_lossy(&cert.stderr));
    launch_nginx(work, server_block)
}

/// Writes an nginx.conf holding `http_block` (server blocks, and `log_format`s they use) into
/// `work`, checks it with `nginx -t` and starts nginx as one process (killed when the guard
/// drops).
pub(crate) fn launch_nginx(work: &Path, server_block: &str) -> Nginx {
    let temp = |name: &str| work.join(name).display().to_string();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {};\nerror_log {} warn;\nevents {{}}\nhttp {{\n access_log off;\n \
         client_body_temp_path {};\n proxy_temp_path {};\n fastcgi_temp_path {};\n \
         uwsgi_temp_path {};\n scgi_temp_path {};\n{}\n}}\n",
        temp("nginx.pid"),
        temp("error.log"),
        temp("t1"),
        temp("t2"),
        temp("t3"),
        temp("t4"),
        temp("t5"),
        server_block
    );
    std::fs::write(work.join("nginx.conf"), conf).unwrap();
    let nginx = |args: &[&str]| {
        let mut cmd = Command::new("nginx");
        cmd.args(args).arg("-p").arg(work).arg("-c").arg(work.join("nginx.conf"));
        cmd
    };
    let check = nginx(&["-t"]).output().expect("nginx is installed (.ci/run installs nginx-light)");
    assert!(check.status.success(), "nginx -t: {}", String::from_utf8_lossy(&check.stderr));
    // One process (master_process off), so killing it leaves no worker behind.
    Nginx(nginx(&[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
}

/// The cluster recipe in front of two nodes: every source URL (and its variants) is fetched
/// from the origin by one node only (a rendition on its original's node), both nodes take a
/// share, and when one node stops its URLs move to the other, each fetched at most once more
/// (with `[shared]`, not even that: see the shared tier's tests).
#[tokio::test]
#[cfg_attr(not(has_nginx), ignore = "needs nginx and openssl: apt-get install nginx-light openssl")]
async fn the_cluster_nginx_recipe_routes_each_source_to_one_node() {
    let origin = Origin::start("127.0.0.25").await;
    const N: usize = 40;
    for i in 1..N {
        origin.route(&format!("/p{i}.png"), Route::ok(png_bytes(3_000 + i, 800 + i as u64)));
    }
    // A decodable picture, for its rendition.
    origin.route("/p0.png", Route::ok(crate::variants::gradient_jpeg(64, 48)));
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        Parasol::start(config(&dir.path().join("a"), &["127.0.0.25/32"])).await,
        Parasol::start(config(&dir.path().join("b"), &["127.0.0.25/32"])).await,
    );
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/recipes/nginx-cluster.conf"),
    )
    .unwrap();
    let port = free_port();
    let work = dir.path();
    let block = recipe
        .replace("listen 443 ssl", &format!("listen 127.0.0.1:{port} ssl"))
        .replace(
            "/etc/letsencrypt/live/media.example.social/fullchain.pem",
            &work.join("cert.pem").display().to_string(),
        )
        .replace(
            "/etc/letsencrypt/live/media.example.social/privkey.pem",
            &work.join("key.pem").display().to_string(),
        )
        .replace("127.0.0.1:8081", &a.public.to_string())
        .replace("127.0.0.1:8082", &b.public.to_string());
    let _running = start_nginx(work, &block);
    let viewer =
        reqwest::Client::builder().no_proxy().danger_accept_invalid_certs(true).build().unwrap();
    let front = format!("https://127.0.0.1:{port}");
    let up = eventually(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    assert!(up, "nginx listens");
    let path_of = |i: usize, variant: Option<&str>| {
        let base = url::Url::parse("http://media.example.social/").unwrap();
        let signer = parasol::signing::Signer::new([KEY]);
        let source = origin.url(&format!("/p{i}.png"));
        let signed = parasol::api::native::sign_url(&base, &signer, &source, variant);
        url::Url::parse(&signed).unwrap().path().to_string()
    };
    for round in 0..2 {
        for i in 0..N {
            let r = viewer.get(format!("{front}{}", path_of(i, None))).send().await.unwrap();
            assert_eq!(r.status(), 200, "p{i} round {round}");
        }
    }
    let r = viewer.get(format!("{front}{}", path_of(0, Some("avatar")))).send().await.unwrap();
    assert_eq!(r.status(), 200, "a variant");
    for i in 0..N {
        assert_eq!(origin.hits(&format!("/p{i}.png")), 1, "p{i}: one node fetched it, once");
    }
    let miss = "parasol_cache_results_total{result=\"miss\"}";
    let (ma, mb) = (a.metric(miss).await as usize, b.metric(miss).await as usize);
    // 40 originals and one rendition: the variant's node had the original already.
    assert_eq!(ma + mb, N + 1, "every fill happened once, on one node ({ma} + {mb})");
    assert!(ma > 0 && mb > 0, "both nodes take a share ({ma} / {mb})");

    // Node B leaves: its URLs move to A, which fetches each once; A's own stay cached.
    b.stop().await;
    for i in 0..N {
        let r = viewer.get(format!("{front}{}", path_of(i, None))).send().await.unwrap();
        assert_eq!(r.status(), 200, "p{i} after a node left");
    }
    for i in 0..N {
        assert!(origin.hits(&format!("/p{i}.png")) <= 2, "p{i}: at most one more fetch");
    }
    a.stop().await;
}

/// Lemmy's pict-rs address behind the Lemmy recipe: requests with `proxy=` reach parasol's
/// pict-rs API, the rest (uploads, local images) the real pict-rs, here a stand-in origin.
#[tokio::test]
#[cfg_attr(not(has_nginx), ignore = "needs nginx and openssl: apt-get install nginx-light openssl")]
async fn the_lemmy_recipe_sends_proxied_images_to_parasol_and_the_rest_to_pictrs() {
    let remote = Origin::start("127.0.0.81").await;
    let photo = crate::variants::gradient_jpeg(800, 600);
    remote.route("/remote/cat.jpg", Route::ok(photo.clone()));
    let pictrs = Origin::start("127.0.0.82").await;
    let local = png_bytes(5_000, 810);
    pictrs.route("/image/original/local.png", Route::ok(local.clone()));
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        &dir.path().join("cache"),
        &["127.0.0.81/32"],
        "[compat]\npictrs_listen = \"127.0.0.1:0\"\n",
    );
    let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let p = Parasol::start(cfg).await;
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/recipes/nginx-lemmy-pictrs.conf"),
    )
    .unwrap();
    let port = free_port();
    let block = recipe
        .replace("127.0.0.1:8090", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:8080", &pictrs.addr.to_string())
        // parasol by name, as in a compose network: the upstream group resolves it at start.
        .replace("127.0.0.1:8091", &format!("localhost:{}", p.pictrs.unwrap().port()));
    let _running = launch_nginx(dir.path(), &block);
    let up = eventually(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
    assert!(up, "nginx listens");
    // Lemmy's `pictrs.url` is this nginx.
    let lemmy_pictrs_url = format!("http://127.0.0.1:{port}/");
    let encoded: String =
        form_urlencoded::byte_serialize(remote.url("/remote/cat.jpg").as_bytes()).collect();
    let http = client();
    let r = http
        .get(format!("{lemmy_pictrs_url}image/process.jpg?proxy={encoded}&thumbnail=256"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let thumb = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (256, 192), "parasol's rendition");
    let r = http
        .get(format!("{lemmy_pictrs_url}image/details/original?proxy={encoded}"))
        .send()
        .await
        .unwrap();
    let details: serde_json::Value = serde_json::from_slice(&body(r).await).unwrap();
    assert_eq!((details["width"].as_u64(), details["height"].as_u64()), (Some(800), Some(600)));
    // A local image is pict-rs's.
    let r = http.get(format!("{lemmy_pictrs_url}image/original/local.png")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(body(r).await == local);
    assert_eq!(remote.hits("/remote/cat.jpg"), 1);
    assert_eq!(pictrs.hits("/image/original/local.png"), 1);
    assert!(pictrs.seen().iter().all(|s| s.query.as_deref().is_none_or(|q| !q.contains("proxy="))));
    for seen in remote.seen() {
        assert!(!seen.headers.contains_key("x-forwarded-for"));
    }
    // A viewer's original through Lemmy (its jwt cookie, its Authorization, the
    // X-Forwarded-For Lemmy adds) is a view in the audit log, as the thumbnail above was;
    // Lemmy's own request at ingest (no X-Forwarded-For) an arrival. Nothing of the viewer
    // reaches the origin.
    let other = remote.url("/remote/cat.jpg?v=2");
    let encoded_other: String = form_urlencoded::byte_serialize(other.as_bytes()).collect();
    let r = http
        .get(format!("{lemmy_pictrs_url}image/original?proxy={encoded_other}"))
        .header("cookie", "jwt=viewer-session")
        .header("authorization", "Bearer viewer-token")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ingest = remote.url("/remote/cat.jpg?v=3");
    let encoded_ingest: String = form_urlencoded::byte_serialize(ingest.as_bytes()).collect();
    let r = http.get(format!("{lemmy_pictrs_url}image/original?proxy={encoded_ingest}"));
    assert_eq!(r.send().await.unwrap().status(), 200);
    let log_path = dir.path().join("cache/outbound.jsonl");
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(eventually(|| logged().lines().count() == 3).await, "{}", logged());
    let triggers: Vec<String> = logged()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["trigger"].to_string())
        .collect();
    assert_eq!(triggers, ["\"view\"", "\"view\"", "\"arrival\""], "{}", logged());
    for seen in remote.seen() {
        for header in ["cookie", "authorization", "x-forwarded-for", "x-parasol-viewer"] {
            assert!(!seen.headers.contains_key(header), "{header}");
        }
    }
    p.stop().await;
}
