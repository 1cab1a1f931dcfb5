//! Lemmy through the pict-rs API (`compat.pictrs_listen`), driven with the request shapes
//! Lemmy sends (LemmyNet/lemmy `crates/routes/src/images/download.rs` for viewers,
//! `crates/api/api_utils/src/request.rs` at ingest), headers it relays included.

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::util::*;

fn pictrs_config(dir: &std::path::Path, allow: &str) -> parasol::Config {
    let toml = config_toml(dir, &[allow], "[compat]\npictrs_listen = \"127.0.0.1:0\"\n");
    parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap()
}

/// Lemmy's viewer path encodes the source with `utf8_percent_encode(_, NON_ALPHANUMERIC)`.
fn viewer_encoded(url: &str) -> String {
    utf8_percent_encode(url, NON_ALPHANUMERIC).to_string()
}

/// Lemmy's ingest path encodes it with `urlencoding::encode`, which leaves `-_.~` alone.
fn ingest_encoded(url: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    utf8_percent_encode(url, KEEP).to_string()
}

/// The headers Lemmy relays from a viewer (all but Accept-Encoding and Host), and the
/// X-Forwarded-For it adds.
fn relayed(request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    request
        .header("cookie", "jwt=viewer-session-token")
        .header("authorization", "Bearer viewer-login-token")
        .header("x-forwarded-for", "203.0.113.9, 10.0.0.2:51234")
        .header("accept-language", "nl-NL")
        .header("user-agent", "Mozilla/5.0 (viewer's browser)")
        .header("referer", "https://lemmy.example.test/post/1")
}

#[tokio::test]
async fn lemmy_ingest_and_viewers_through_the_pictrs_api() {
    let origin = Origin::start("127.0.0.80").await;
    let photo = crate::variants::gradient_jpeg(1600, 1200);
    origin.route("/pics/photo-1.jpg", Route::ok(photo.clone()));
    origin.route("/pics/anim.gif", Route::ok(crate::variants::animated_gif(3)));
    origin.route("/gone.png", Route::status(404));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(pictrs_config(dir.path(), "127.0.0.80/32")).await;
    let pictrs = format!("http://{}/", p.pictrs.expect("the pict-rs listener is bound"));
    let source = origin.url("/pics/photo-1.jpg");
    let http = client();

    // Ingest: the original first, then its details.
    let r = http
        .get(format!("{pictrs}image/original?proxy={}", ingest_encoded(&source)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert!(body(r).await.len() > 1000);
    let r = http
        .get(format!("{pictrs}image/details/original?proxy={}", ingest_encoded(&source)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let details: Value = serde_json::from_slice(&body(r).await).unwrap();
    assert_eq!(details["width"], 1600);
    assert_eq!(details["height"], 1200);
    assert_eq!(details["content_type"], "image/jpeg");
    assert_eq!(details["format"], "Image");
    assert!(details["frames"].is_null());
    // Lemmy reads created_at as a chrono DateTime<Utc>: RFC 3339.
    let created = details["created_at"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    let blurhash = details["blurhash"].as_str().unwrap();
    assert_eq!(blurhash.len(), 28, "a 4x3 blurhash: {blurhash}");
    // Lemmy's own requests at ingest are arrivals in the audit log, not views.
    let log_path = dir.path().join("outbound.jsonl");
    let logged = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(eventually(|| logged().lines().count() == 1).await, "{}", logged());
    assert!(logged().contains("\"trigger\":\"arrival\""), "{}", logged());

    // A viewer: Lemmy's stored thumbnail link asks process.<ext of the URL>?thumbnail=512
    // (image_max_thumbnail_size), relaying the viewer's headers.
    let thumb =
        format!("{pictrs}image/process.jpg?proxy={}&thumbnail=512", viewer_encoded(&source));
    let r = relayed(http.get(&thumb)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let img = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((img.width(), img.height()), (512, 384), "fits inside 512x512");
    // A browser's revalidation and a Safari-style range, relayed by Lemmy, are answered.
    let r = relayed(http.get(&thumb)).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(r.status(), 304);
    let original = format!("{pictrs}image/original?proxy={}", viewer_encoded(&source));
    let r = relayed(http.get(&original)).header("range", "bytes=0-99").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert!(body(r).await == photo[..100]);
    // A range past the end is pict-rs's JSON error, as every other error here.
    let r = relayed(http.get(&original)).header("range", "bytes=99999999-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes */{}", photo.len()));
    let error: Value = serde_json::from_slice(&body(r).await).unwrap();
    assert_eq!(error["code"], "range_not_satisfiable");
    let r = http.head(&original).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"].to_str().unwrap(), photo.len().to_string());

    // Another size and another format are renditions of their own; never enlarged.
    let webp =
        format!("{pictrs}image/process.webp?proxy={}&thumbnail=4000", viewer_encoded(&source));
    let r = http.get(&webp).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/webp");
    let img = image::load_from_memory(&body(r).await).unwrap();
    assert_eq!((img.width(), img.height()), (1600, 1200), "never enlarged");
    // An animated GIF asked for as GIF stays animated (as WebP, which the type says).
    let gif = origin.url("/pics/anim.gif");
    let r = http
        .get(format!("{pictrs}image/process.gif?proxy={}&thumbnail=256", viewer_encoded(&gif)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/webp");
    let frames = crate::variants::webp_frames(&body(r).await);
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].dimensions(), (256, 128));
    let r = http
        .get(format!("{pictrs}image/details/original?proxy={}", ingest_encoded(&gif)))
        .send()
        .await
        .unwrap();
    let details: Value = serde_json::from_slice(&body(r).await).unwrap();
    assert_eq!(
        (details["format"].as_str(), details["frames"].as_u64()),
        (Some("Animation"), Some(3))
    );

    // One origin request per file, whatever the encodings and renditions; nothing of the
    // viewers reached it, nor the audit log.
    assert_eq!(origin.hits("/pics/photo-1.jpg"), 1);
    assert_eq!(origin.hits("/pics/anim.gif"), 1);
    for seen in origin.seen() {
        for name in ["cookie", "authorization", "x-forwarded-for", "accept-language", "referer"] {
            assert!(!seen.headers.contains_key(name), "{name} reached the origin");
        }
        assert!(seen.headers["user-agent"].to_str().unwrap().starts_with("parasol"));
    }
    let audit = std::fs::read_to_string(dir.path().join("outbound.jsonl")).unwrap();
    for secret in ["viewer-session-token", "viewer-login-token", "203.0.113.9", "nl-NL", "Mozilla"]
    {
        assert!(!audit.contains(secret), "{secret} is in the audit log");
    }

    // Errors as pict-rs gives them: JSON with msg and code. Lemmy passes a 404 on as 404.
    let r = http
        .get(format!("{pictrs}image/original?proxy={}", viewer_encoded(&origin.url("/gone.png"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let error: Value = serde_json::from_slice(&body(r).await).unwrap();
    assert!(error["msg"].is_string() && error["code"].is_string(), "{error}");
    for bad in [
        format!("image/process.exe?proxy={}", viewer_encoded(&source)),
        format!("image/process.png?proxy={}&thumbnail=big", viewer_encoded(&source)),
        "image/original".to_string(),
    ] {
        let r = http.get(format!("{pictrs}{bad}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(r.headers()["content-type"], "application/json");
    }
    // Only http(s) sources, through the same guard as every fetch (a refused destination
    // looks like an unreachable one, as on every route).
    for (refused, status) in
        [("file%3A%2F%2F%2Fetc%2Fpasswd", 403), ("http%3A%2F%2F127.0.0.1%3A1%2Fx.png", 502)]
    {
        let r = http.get(format!("{pictrs}image/original?proxy={refused}")).send().await.unwrap();
        assert_eq!(r.status(), status, "{refused}");
        assert_eq!(r.headers()["content-type"], "application/json");
    }
    let r = http.post(&original).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(http.get(format!("{pictrs}healthz")).send().await.unwrap().status(), 200);

    // Unsigned, so never on the public port.
    let public = format!("http://{}/image/original?proxy={}", p.public, viewer_encoded(&source));
    assert_eq!(get(&public).await.status(), 404);
    p.stop().await;
}

#[tokio::test]
async fn without_pictrs_listen_there_is_no_pictrs_api() {
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.80/32"])).await;
    assert!(p.pictrs.is_none());
    p.stop().await;
}

/// Issue 25: the unsigned routes have limits of their own. On the pict-rs listener a secret,
/// once configured, is asked of every request, and thirty `thumbnail` sizes of one picture
/// are a few renders; fills count per origin and, with the Misskey route's, in one budget for
/// all origins together. A host name longer than DNS allows is refused.
#[tokio::test]
async fn the_unsigned_routes_have_limits_of_their_own() {
    let origin = Origin::start("127.0.0.81").await;
    origin.route("/photo.jpg", Route::ok(crate::variants::gradient_jpeg(900, 600)));
    for n in 0..9 {
        origin.route(&format!("/p{n}.png"), Route::ok(png_bytes(3_000, 810 + n)));
    }
    let mut lookup = parasol::fetch::guard::StaticLookup::default();
    for n in 0..6 {
        lookup = lookup.with(&format!("site-{n}.test"), &[ip("127.0.0.81")]);
    }
    let secret = "only-the-nginx-in-front-knows-this-0123";
    let start = |dir: &std::path::Path| {
        let extra = format!(
            "[compat]\npictrs_listen = \"127.0.0.1:0\"\npictrs_secret = \"{secret}\"\n\
             pictrs_fills_per_minute = 3\nunsigned_fills_per_minute = 6\nmisskey = true\n"
        );
        let toml = config_toml(dir, &["127.0.0.81/32"], &extra);
        let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
        Parasol::start_with(cfg, lookup.clone())
    };
    let get_pictrs = |p: &Parasol, path: &str| {
        let url = format!("http://{}/{path}", p.pictrs.unwrap());
        client().get(url).header("x-parasol-secret", secret).send()
    };
    let original =
        |path: &str| format!("image/original?proxy={}", viewer_encoded(&origin.url(path)));

    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path()).await;
    let pictrs = format!("http://{}/", p.pictrs.unwrap());
    let photo = original("/photo.jpg");
    let r = client().get(format!("{pictrs}{photo}")).send().await.unwrap();
    assert_eq!(r.status(), 403, "no secret, no fill");
    let r = client().get(format!("{pictrs}{photo}")).header("x-parasol-secret", "guess");
    assert_eq!(r.send().await.unwrap().status(), 403);
    assert_eq!(origin.hits("/photo.jpg"), 0);
    assert_eq!(get_pictrs(&p, &photo).await.unwrap().status(), 200);
    // Thirty sizes of one (cached) picture: a few renders.
    let renders = p.metric("parasol_renders_total").await;
    let source = viewer_encoded(&origin.url("/photo.jpg"));
    for n in (20..=900).step_by(30) {
        let path = format!("image/process.webp?proxy={source}&thumbnail={n}");
        assert_eq!(get_pictrs(&p, &path).await.unwrap().status(), 200, "thumbnail={n}");
    }
    let made = p.metric("parasol_renders_total").await - renders;
    assert!((1..=5).contains(&made), "{made} renders for thirty sizes up to 900 (64 to 1024)");
    // No DNS name is longer than 253 bytes: refused before anything is kept.
    let long = format!("{}.test", "a".repeat(60)).repeat(5);
    let src: String =
        url::form_urlencoded::byte_serialize(format!("http://{long}/p0.png").as_bytes()).collect();
    assert_eq!(get(&format!("http://{}/proxy/x.webp?url={src}", p.public)).await.status(), 400);
    p.stop().await;

    // Allowances are per clock minute: each try on a fresh parasol, until one fits in one.
    let (pictrs_fills, misskey_fills) = within_one_minute(|| async {
        let dir = tempfile::tempdir().unwrap();
        let p = start(dir.path()).await;
        let mut pictrs_fills = Vec::new();
        for path in ["/p0.png", "/p1.png", "/p2.png", "/p3.png", "/p0.png"] {
            pictrs_fills.push(get_pictrs(&p, &original(path)).await.unwrap().status().as_u16());
        }
        let mut misskey_fills = Vec::new();
        for n in 0..5 {
            let source = format!("http://site-{n}.test:{}/p{}.png", origin.addr.port(), 4 + n);
            let src: String = url::form_urlencoded::byte_serialize(source.as_bytes()).collect();
            let r = get(&format!("http://{}/proxy/x.webp?url={src}", p.public)).await;
            misskey_fills.push(r.status().as_u16());
        }
        p.stop().await;
        (pictrs_fills, misskey_fills)
    })
    .await;
    // Three fills of the origin, the fourth refused, what is cached served.
    assert_eq!(pictrs_fills, [200, 200, 200, 503, 200], "the origin's allowance");
    // All origins together: six a minute, three used above, whatever the origins.
    assert_eq!(misskey_fills, [200, 200, 200, 503, 503], "the unsigned routes' budget");
}

/// On the Misskey route, IPv4 addresses of one /24 are one origin: twelve of them get one
/// allowance, not twelve.
#[tokio::test]
async fn addresses_of_one_network_share_one_allowance() {
    let mut origins = Vec::new();
    for n in 0..12u8 {
        let o = Origin::start(&format!("127.0.0.{}", 140 + n)).await;
        o.route("/a.png", Route::ok(png_bytes(2_000, 900 + u64::from(n))));
        origins.push(o);
    }
    let served = within_one_minute(|| async {
        let dir = tempfile::tempdir().unwrap();
        let extra = "[compat]\nmisskey = true\nmisskey_fills_per_minute = 10\n";
        let toml = config_toml(dir.path(), &["127.0.0.128/26"], extra);
        let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
        let p = Parasol::start(cfg).await;
        let mut served = 0;
        for o in &origins {
            let src: String =
                url::form_urlencoded::byte_serialize(o.url("/a.png").as_bytes()).collect();
            let r = get(&format!("http://{}/proxy/x.webp?url={src}", p.public)).await;
            served += usize::from(r.status() == 200);
        }
        p.stop().await;
        served
    })
    .await;
    assert_eq!(served, 10, "one allowance for 127.0.0.0/24");
}
