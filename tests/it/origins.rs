//! Every origin on its own terms: `[[policy.origin]]` rules, backing off when an origin asks,
//! expired URLs, and the ledger of what each origin costs (`GET /admin/origins`,
//! `parasol usage`).

use std::time::{Duration, Instant};

use crate::admin::admin_post;
use crate::util::*;

/// A config whose `[fetch] timeout` is `timeout` and with `extra` sections.
fn config_with(dir: &std::path::Path, allow: &[&str], timeout: &str, extra: &str) -> String {
    config_toml(dir, allow, extra).replace("timeout = \"5s\"", &format!("timeout = \"{timeout}\""))
}

fn parse(toml: &str) -> parasol::Config {
    parasol::Config::from_sources("test", toml, std::iter::empty()).expect("valid config")
}

/// `http://<name>:<port><path>` for a test origin reached by a `.test` name.
fn named(origin: &Origin, name: &str, path: &str) -> String {
    format!("http://{name}:{}{path}", origin.addr.port())
}

#[tokio::test]
async fn a_paced_origin_is_asked_at_its_rate_and_its_neighbours_are_not() {
    let origin = Origin::start("127.0.0.3").await;
    for i in 0..20 {
        let body = png_bytes(600, 100 + i);
        origin.route(&format!("/p{i}.png"), Route::ok(body).header("content-type", "image/png"));
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.origin]]
        domains = ["slow.test"]
        fetches_per_second = 2
    "#;
    let config = parse(&config_with(dir.path(), &["127.0.0.3/32"], "30s", extra));
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("cdn.slow.test", &[ip("127.0.0.3")])
        .with("cdn.quick.test", &[ip("127.0.0.3")]);
    let p = Parasol::start_with(config, lookup).await;
    let started = Instant::now();
    let requests = (0..20).map(|i| {
        let url = p.url(&named(&origin, "cdn.slow.test", &format!("/p{i}.png")));
        async move { get(&url).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let mut arrivals: Vec<Instant> = origin.seen().iter().map(|s| s.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 20);
    // Turns are 500 ms apart: 20 fetches span at least 9.5 s (a little less for timer slack),
    // and no second holds more than two turns (three with slack at its edges).
    let span = arrivals[19] - arrivals[0];
    assert!(span >= Duration::from_millis(9_000), "20 fetches within {span:?}");
    for (i, a) in arrivals.iter().enumerate() {
        let within = arrivals[i..].iter().take_while(|b| **b - *a < Duration::from_secs(1));
        assert!(within.count() <= 3, "more than 2 fetches a second at {i}");
    }
    // Another domain on the same address is not paced.
    let quick = Instant::now();
    let requests = (0..4).map(|i| {
        let url = p.url(&named(&origin, "cdn.quick.test", &format!("/p{i}.png")));
        async move { get(&url).await.status().as_u16() }
    });
    assert!(futures_util::future::join_all(requests).await.iter().all(|s| *s == 200));
    assert!(quick.elapsed() < started.elapsed(), "the unpaced domain waited for turns");
    p.stop().await;
}

#[tokio::test]
async fn a_rule_overrides_concurrency_and_size_for_its_domains_only() {
    let origin = Origin::start("127.0.0.3").await;
    for i in 0..4 {
        let route = Route::ok(png_bytes(5_000, 200 + i)).header("content-type", "image/png");
        origin.route(&format!("/c{i}.png"), route.delay(Duration::from_millis(300)));
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.origin]]
        domains = ["strict.test"]
        max_concurrent = 1
        max_object_bytes = "1000"
    "#;
    let config = parse(&config_with(dir.path(), &["127.0.0.3/32"], "30s", extra));
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("a.strict.test", &[ip("127.0.0.3")])
        .with("a.lenient.test", &[ip("127.0.0.3")]);
    let p = Parasol::start_with(config, lookup).await;
    let statuses = |host: &'static str| {
        let p = &p;
        let origin = &origin;
        async move {
            let requests = (0..4).map(|i| {
                let url = p.url(&named(origin, host, &format!("/c{i}.png")));
                async move { get(&url).await.status().as_u16() }
            });
            futures_util::future::join_all(requests).await
        }
    };
    assert_eq!(statuses("a.strict.test").await, [413; 4], "over the rule's size limit");
    assert_eq!(origin.max_concurrent(), 1, "one at a time toward the strict domain");
    assert_eq!(statuses("a.lenient.test").await, [200; 4], "the default limit elsewhere");
    assert!(origin.max_concurrent() > 1, "the default allows several at once");
    p.stop().await;
}

#[tokio::test]
async fn retry_after_stops_new_fills_from_that_host_while_its_cached_files_are_served() {
    let origin = Origin::start("127.0.0.4").await;
    let cached = png_bytes(3_000, 300);
    origin.route("/cached.png", Route::ok(cached.clone()).header("content-type", "image/png"));
    origin.route("/busy.png", Route::status(429).header("retry-after", "3"));
    origin
        .route("/later.png", Route::ok(png_bytes(3_000, 301)).header("content-type", "image/png"));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.4/32"])).await;
    assert_eq!(get(&p.url(&origin.url("/cached.png"))).await.status(), 200);
    let asked = Instant::now();
    assert_eq!(get(&p.url(&origin.url("/busy.png"))).await.status(), 502);
    let seen_before = origin.seen().len();
    // Within the 3 s asked: new files 503 at once, cached ones served, the origin untouched.
    let r = get(&p.url(&origin.url("/later.png"))).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-parasol-error"], "origin_backoff");
    let r = get(&p.url(&origin.url("/cached.png"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, cached);
    assert!(asked.elapsed() < Duration::from_secs(3), "the checks took too long to mean much");
    assert_eq!(origin.seen().len(), seen_before, "no request during the pause");
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("parasol_origin_backoffs_total{reason=\"retry_after\"} 1"),
        "{metrics}"
    );
    // Once it is over, the host is asked again.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(asked.elapsed())).await;
    let mut later = 0;
    for _ in 0..50 {
        later = get(&p.url(&origin.url("/later.png"))).await.status().as_u16();
        if later == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(later, 200);
    let first_after = origin.seen()[seen_before].at;
    assert!(
        first_after - asked >= Duration::from_secs(3),
        "asked again after {:?}",
        first_after - asked
    );
    p.stop().await;
}

#[tokio::test]
async fn an_expired_url_is_not_fetched_and_does_not_count_as_a_failing_origin() {
    let origin = Origin::start("127.0.0.5").await;
    let img = png_bytes(4_000, 400);
    origin.route("/f.png", Route::ok(img.clone()).header("content-type", "image/png"));
    origin.route("/gone.png", Route::status(403));
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.normalize]]
        host_suffix = "expiring.test"
        ignore_params = ["oe", "oh"]
        expiry_param = "oe"
        [compat]
        misskey = true
    "#;
    let config = parse(&config_toml(dir.path(), &["127.0.0.5/32"], extra));
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("cdn.expiring.test", &[ip("127.0.0.5")]);
    let p = Parasol::start_with(config, lookup).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let at = |path: &str, expiry: u64| {
        p.url(&named(&origin, "cdn.expiring.test", &format!("{path}?oe={expiry:x}&oh=sig")))
    };
    // Expired and never seen fresher: 404 source_expired, the origin never asked.
    for _ in 0..4 {
        let r = get(&at("/f.png", now - 100)).await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-parasol-error"], "source_expired");
    }
    assert_eq!(origin.hits("/f.png"), 0);
    // Expiring about now, and the origin says 403: expired too.
    for _ in 0..4 {
        let r = get(&at("/gone.png", now + 60)).await;
        assert_eq!(r.headers()["x-parasol-error"], "source_expired");
    }
    // None of it made the origin look as failing: a fresh URL is fetched at once.
    let r = get(&at("/f.png", now + 86_400)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, img);
    assert_eq!(p.metric("parasol_origin_backoffs_total").await, 0);
    // Once stored, an expired URL of the same file is served.
    let r = get(&at("/f.png", now - 100)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(origin.hits("/f.png"), 1);
    // Misskey's fallback=1 gets its placeholder for an expired URL.
    let source = named(&origin, "cdn.expiring.test", &format!("/x.png?oe={:x}", now - 5));
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("url", &source)
        .append_pair("fallback", "1")
        .finish();
    let r = get(&format!("http://{}/proxy/x.webp?{query}", p.public)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    p.stop().await;
}

/// The config file of the running parasol `p` (started from `toml`, whose admin listener
/// was bound to port 0), for the commands that ask its admin API.
fn running_config(dir: &std::path::Path, toml: &str, p: &Parasol) -> std::path::PathBuf {
    let file = dir.join("parasol.toml");
    let admin = format!("admin_listen = \"{}\"", p.admin);
    std::fs::write(&file, toml.replace("admin_listen = \"127.0.0.1:0\"", &admin)).unwrap();
    file
}

/// What `parasol <args> --config <file>` prints; it must succeed.
async fn cli(file: &std::path::Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parasol"))
        .args(args)
        .arg("--config")
        .arg(file)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Body bytes per host in the audit log, for hosts under `domain`.
fn audit_bytes(dir: &std::path::Path, domain: &str) -> (u64, u64) {
    let log = std::fs::read_to_string(dir.join("outbound.jsonl")).unwrap();
    let mut lines = 0;
    let mut bytes = 0;
    for line in log.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let host = record["host"].as_str().unwrap();
        if host == domain || host.ends_with(&format!(".{domain}")) {
            lines += 1;
            bytes += record["bytes"].as_u64().unwrap();
        }
    }
    (lines, bytes)
}

async fn origins(p: &Parasol, query: &str) -> serde_json::Value {
    let r = client()
        .get(p.admin_url(&format!("/admin/origins{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

fn row<'a>(answer: &'a serde_json::Value, domain: &str) -> &'a serde_json::Value {
    let rows = answer["origins"].as_array().unwrap();
    rows.iter().find(|r| r["domain"] == domain).unwrap_or_else(|| panic!("{domain}: {answer}"))
}

#[tokio::test]
async fn the_ledger_agrees_with_the_audit_log_survives_a_restart_and_usage_prints_it() {
    let alpha = Origin::start("127.0.0.6").await;
    let beta = Origin::start("127.0.0.7").await;
    for i in 0..3 {
        let route = Route::ok(png_bytes(2_000 + i * 500, 500 + i as u64));
        alpha.route(&format!("/a{i}.png"), route.header("content-type", "image/png"));
    }
    alpha.route("/moved.png", Route::status(302).header("location", "/a0.png"));
    beta.route("/b.png", Route::ok(png_bytes(9_000, 600)).header("content-type", "image/png"));
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.origin]]
        domains = ["alpha.test"]
    "#;
    let toml = config_toml(dir.path(), &["127.0.0.6/32", "127.0.0.7/32"], extra);
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("media.alpha.test", &[ip("127.0.0.6")])
        .with("files.beta.test", &[ip("127.0.0.7")]);
    let p = Parasol::start_with(parse(&toml), lookup.clone()).await;
    let a = |path: &str| p.url(&named(&alpha, "media.alpha.test", path));
    for i in 0..3 {
        for _ in 0..2 {
            assert_eq!(get(&a(&format!("/a{i}.png"))).await.status(), 200);
        }
    }
    assert_eq!(get(&a("/moved.png")).await.status(), 200);
    assert_eq!(get(&a("/missing.png")).await.status(), 404);
    assert_eq!(get(&p.url(&named(&beta, "files.beta.test", "/b.png"))).await.status(), 200);
    let answer = origins(&p, "?sort=fetched").await;
    let alpha_row = row(&answer, "alpha.test");
    // Two hops for the redirect, one for the 404: one line each in the audit log.
    let (lines, bytes) = audit_bytes(dir.path(), "alpha.test");
    assert_eq!(alpha_row["fetches"], lines, "{answer}");
    assert_eq!(alpha_row["fetched_bytes"], bytes, "{answer}");
    assert_eq!(lines, 6);
    assert_eq!(alpha_row["errors"], 1);
    assert_eq!(alpha_row["requests"], 8);
    assert_eq!(alpha_row["hits"], 3);
    assert_eq!(alpha_row["stored_objects"], 4, "three files and the redirect's source");
    assert_eq!(alpha_row["served_bytes"], 2 * (2_000 + 2_500 + 3_000) + 2_000);
    assert!(alpha_row["last_fetch"].as_u64().unwrap() > 1_700_000_000);
    let beta_row = row(&answer, "beta.test");
    assert_eq!(beta_row["fetched_bytes"], audit_bytes(dir.path(), "beta.test").1);
    assert_eq!(beta_row["stored_bytes"], 9_000);
    // Ordered by what was asked, and limited.
    let by_stored = origins(&p, "?sort=stored&limit=1").await;
    assert_eq!(by_stored["origins"].as_array().unwrap().len(), 1);
    assert_eq!(by_stored["origins"][0]["domain"], "alpha.test", "{by_stored}");
    for bad in ["?sort=size", "?limit=0", "?limit=x", "?color=red"] {
        let r = client()
            .get(p.admin_url(&format!("/admin/origins{bad}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let r = get(&p.admin_url("/admin/origins")).await;
    assert_eq!(r.status(), 401, "the admin token is needed");
    // Prometheus: a series for the rule's domain, everything else as other.
    let metrics = p.metrics().await;
    let line = format!("parasol_origin_fetched_bytes_total{{domain=\"alpha.test\"}} {bytes}");
    assert!(metrics.contains(&line), "{metrics}");
    assert!(metrics.contains("parasol_origin_requests_total{domain=\"other\"} 1"), "{metrics}");
    // `parasol usage` prints what the admin API says.
    let file = running_config(dir.path(), &toml, &p);
    let printed: serde_json::Value =
        serde_json::from_str(&cli(&file, &["usage", "--json", "--sort", "fetched"]).await).unwrap();
    assert_eq!(printed, origins(&p, "?sort=fetched&limit=50").await);
    let table = cli(&file, &["usage", "--sort", "served"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("domain"), "{table}");
    assert!(lines[1].starts_with("alpha.test") && lines[2].starts_with("beta.test"), "{table}");
    p.stop().await;
    // Counters are kept across a restart; what is stored is read again from the index.
    let p = Parasol::start_with(parse(&toml), lookup).await;
    let again = origins(&p, "?sort=fetched").await;
    assert_eq!(row(&again, "alpha.test"), alpha_row);
    p.stop().await;
}

#[tokio::test]
async fn usage_without_a_running_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    // An admin listener nobody listens on (a port just freed).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let toml = config_toml(dir.path(), &[], "")
        .replace("admin_listen = \"127.0.0.1:0\"", &format!("admin_listen = \"127.0.0.1:{port}\""));
    std::fs::write(&file, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parasol"))
        .args(["usage", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach parasol's admin listener"), "{stderr}");
}

#[tokio::test]
async fn a_file_kept_at_least_survives_a_flood_that_evicts_an_unpinned_one() {
    let origin = Origin::start("127.0.0.8").await;
    let png = |path: &str, seed| {
        origin.route(path, Route::ok(png_bytes(10_000, seed)).header("content-type", "image/png"));
    };
    png("/pin.png", 700);
    png("/early.png", 701);
    for i in 0..20 {
        png(&format!("/f{i}.png"), 710 + i);
    }
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.origin]]
        domains = ["keep.test"]
        keep_at_least = "1h"
    "#;
    let toml = config_toml(dir.path(), &["127.0.0.8/32"], extra)
        .replace("fsync = false", "fsync = false\ndisk_bytes = \"60KiB\"\npinned_share = 0.5");
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("media.keep.test", &[ip("127.0.0.8")])
        .with("media.flood.test", &[ip("127.0.0.8")]);
    let p = Parasol::start_with(parse(&toml), lookup).await;
    let pinned = p.url(&named(&origin, "media.keep.test", "/pin.png"));
    let early = p.url(&named(&origin, "media.flood.test", "/early.png"));
    assert_eq!(get(&pinned).await.status(), 200);
    assert_eq!(get(&early).await.status(), 200);
    for i in 0..20 {
        let url = p.url(&named(&origin, "media.flood.test", &format!("/f{i}.png")));
        assert_eq!(get(&url).await.status(), 200);
    }
    assert!(p.metric("parasol_cache_bytes{tier=\"disk\"}").await <= 60 << 10);
    assert!(p.metric("parasol_evictions_total").await >= 15);
    assert_eq!(get(&pinned).await.status(), 200);
    assert_eq!(origin.hits("/pin.png"), 1, "the pinned file was kept");
    assert_eq!(get(&early).await.status(), 200);
    assert_eq!(origin.hits("/early.png"), 2, "the unpinned one was evicted and fetched again");
    p.stop().await;
}

/// An MP4 of `n` bytes as far as sniffing goes (a video passes through unprepared).
fn mp4_bytes(n: usize, fill: u8) -> bytes::Bytes {
    let mut v = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2".to_vec();
    v.resize(n, fill);
    bytes::Bytes::from(v)
}

#[tokio::test]
async fn a_streamed_origin_and_an_oversize_file_are_served_exactly_and_never_kept() {
    let origin = Origin::start("127.0.0.9").await;
    let small = png_bytes(20_000, 800);
    let video = mp4_bytes(3_000_000, 0x5a);
    let kept = mp4_bytes(50_000, 0x11);
    let route = |path: &str, body: &bytes::Bytes| origin.route(path, Route::ok(body.clone()));
    route("/small.png", &small);
    route("/video.mp4", &video);
    route("/kept.mp4", &kept);
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [[policy.origin]]
        domains = ["ephemeral.test"]
        store = "stream"
    "#;
    let toml = config_toml(dir.path(), &["127.0.0.9/32"], extra).replace(
        "fsync = false",
        "fsync = false\nmemory_max_object_bytes = \"1MiB\"\nmax_object_bytes = \"1MiB\"\noversize = \"stream\"",
    );
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("media.ephemeral.test", &[ip("127.0.0.9")])
        .with("media.steady.test", &[ip("127.0.0.9")]);
    let p = Parasol::start_with(parse(&toml), lookup).await;
    let nothing_kept = |what: &str| {
        let (blobs, temps) =
            (files_under(&dir.path().join("blobs")), files_under(&dir.path().join("tmp")));
        assert_eq!((blobs, temps), (0, 0), "{what}: blob and temp files left");
    };
    // The streamed origin: small (in memory) and large (from its temp file), each twice.
    for (path, expected) in [("/small.png", &small), ("/video.mp4", &video)] {
        let url = p.url(&named(&origin, "media.ephemeral.test", path));
        for _ in 0..2 {
            let r = get(&url).await;
            assert_eq!(r.status(), 200, "{path}");
            assert_eq!(&body(r).await, expected, "{path}");
        }
        assert_eq!(origin.hits(path), 2, "{path}: fetched for each view, never kept");
    }
    assert!(eventually(|| files_under(&dir.path().join("tmp")) == 0).await);
    nothing_kept("stream");
    // Over max_object_bytes with oversize = "stream": served exactly, not kept; a file within
    // the limit from the same origin is kept.
    let big = p.url(&named(&origin, "media.steady.test", "/video.mp4"));
    for _ in 0..2 {
        let r = get(&big).await;
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, video);
    }
    assert_eq!(origin.hits("/video.mp4"), 4);
    assert!(eventually(|| files_under(&dir.path().join("tmp")) == 0).await);
    nothing_kept("oversize");
    let small_enough = p.url(&named(&origin, "media.steady.test", "/kept.mp4"));
    for _ in 0..2 {
        assert_eq!(body(get(&small_enough).await).await, kept);
    }
    assert_eq!(origin.hits("/kept.mp4"), 1);
    assert_eq!(p.blob_count(), 1);
    p.stop().await;
}

/// `v` without the entries' `age_seconds`, which two answers a second apart differ in.
fn without_ages(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => map
            .iter()
            .filter(|(k, _)| *k != "age_seconds")
            .map(|(k, v)| (k.clone(), without_ages(v)))
            .collect(),
        serde_json::Value::Array(list) => list.iter().map(without_ages).collect(),
        other => other.clone(),
    }
}

#[tokio::test]
async fn lookup_finds_every_url_and_rendition_of_a_file_by_url_blake3_or_sha256() {
    let origin = Origin::start("127.0.0.10").await;
    let jpeg = bytes::Bytes::from(crate::variants::gradient_jpeg(640, 480));
    origin.route("/a.jpg", Route::ok(jpeg.clone()));
    origin.route("/copy.jpg", Route::ok(jpeg.clone()));
    let dir = tempfile::tempdir().unwrap();
    let extra = r#"
        [moderation]
        keep_digests = true
        [compat]
        misskey = true
        [[policy.origin]]
        domains = ["found.test"]
        keep_at_least = "2d"
    "#;
    let toml = config_toml(dir.path(), &["127.0.0.10/32"], extra);
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("files.found.test", &[ip("127.0.0.10")]);
    let p = Parasol::start_with(parse(&toml), lookup).await;
    let source = named(&origin, "files.found.test", "/a.jpg");
    let copy = named(&origin, "files.found.test", "/copy.jpg");
    let original = body(get(&p.url(&source)).await).await;
    assert_eq!(body(get(&p.url(&copy)).await).await, original);
    let base = url::Url::parse(&format!("http://{}/", p.public)).unwrap();
    let signer = parasol::signing::Signer::new([KEY]);
    let preview = parasol::api::native::sign_url(&base, &signer, &source, Some("preview"));
    assert_eq!(get(&preview).await.status(), 200);
    let ask = |q: String| {
        let url = p.admin_url(&format!(
            "/admin/lookup?{}",
            form_urlencoded::Serializer::new(String::new()).append_pair("q", &q).finish()
        ));
        async move {
            let r = client().get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            (
                r.status().as_u16(),
                serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap()).unwrap(),
            )
        }
    };
    // By URL: the stored original (named by both URLs) and the rendition.
    let (status, by_url) = ask(source.clone()).await;
    assert_eq!(status, 200, "{by_url}");
    let blobs = by_url["blobs"].as_array().unwrap();
    assert_eq!(blobs.len(), 2, "{by_url}");
    let stored = blobs.iter().find(|b| b["entries"].as_array().unwrap().len() == 2).unwrap();
    let urls: Vec<&str> =
        stored["entries"].as_array().unwrap().iter().map(|e| e["url"].as_str().unwrap()).collect();
    assert_eq!(urls, [source.as_str(), copy.as_str()]);
    assert_eq!(stored["blake3"].as_str().unwrap(), blake3::hash(&original).to_hex().as_str());
    assert_eq!(stored["len"], original.len());
    assert_eq!(stored["domains"], serde_json::json!(["found.test"]));
    assert!(stored["banned"].is_null());
    let pinned = stored["pinned_until"].as_u64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(pinned > now + 86_400 && pinned <= now + 2 * 86_400 + 5, "{pinned}");
    let rendition = blobs.iter().find(|b| b["entries"][0]["variant"] == "preview").unwrap();
    assert_eq!(rendition["entries"][0]["url"], source.as_str());
    // By the blake3 of the bytes served, and by the SHA-256 of the origin's.
    let (_, by_blake3) = ask(stored["blake3"].as_str().unwrap().to_uppercase()).await;
    assert_eq!(by_blake3["blobs"].as_array().unwrap().len(), 1);
    assert_eq!(without_ages(&by_blake3["blobs"][0]), without_ages(stored));
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(&jpeg));
    let (_, by_sha256) = ask(sha256).await;
    assert_eq!(by_sha256["blobs"][0]["blake3"], stored["blake3"], "{by_sha256}");
    let (_, unknown) = ask("https://files.found.test/never.jpg".into()).await;
    assert_eq!(unknown["blobs"], serde_json::json!([]));
    for bad in ["", "abc", "ftp://x.test/a"] {
        assert_eq!(ask(bad.to_string()).await.0, 400, "{bad:?}");
    }
    // `parasol lookup` prints the same, and the URLs viewers reach the file by.
    let file = running_config(dir.path(), &toml, &p);
    let json: serde_json::Value =
        serde_json::from_str(&cli(&file, &["lookup", &source, "--json"]).await).unwrap();
    assert_eq!(without_ages(&json["blobs"]), without_ages(&by_url["blobs"]));
    let text = cli(&file, &["lookup", &source]).await;
    assert!(text.contains(&format!("blob {}", stored["blake3"].as_str().unwrap())), "{text}");
    assert!(text.contains("[preview]") && text.contains("[original]"), "{text}");
    assert!(text.contains("origin: found.test") && text.contains("pinned: until"), "{text}");
    let native = parasol::api::native::sign_url(
        &parasol::Config::default().server.public_base_url,
        &signer,
        &source,
        Some("preview"),
    );
    assert!(text.contains(&native), "{text}");
    assert!(text.contains("misskey  "), "{text}");
    p.stop().await;
}

#[tokio::test]
async fn origin_rules_reload_with_the_policy() {
    let origin = Origin::start("127.0.0.11").await;
    let img = png_bytes(5_000, 900);
    origin.route("/r.png", Route::ok(img.clone()).header("content-type", "image/png"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let rule = "[[policy.origin]]\ndomains = [\"reload.test\"]\nmax_object_bytes = \"1000\"\n";
    std::fs::write(&file, config_toml(dir.path(), &["127.0.0.11/32"], rule)).unwrap();
    let lookup: std::sync::Arc<dyn parasol::fetch::guard::Lookup> = std::sync::Arc::new(
        parasol::fetch::guard::StaticLookup::default().with("a.reload.test", &[ip("127.0.0.11")]),
    );
    let config = parasol::Config::load(Some(&file)).unwrap();
    let p = Parasol::start_opts(config, options(lookup, Some(file.clone()))).await;
    let url = p.url(&named(&origin, "a.reload.test", "/r.png"));
    assert_eq!(get(&url).await.status(), 413);
    // The rule goes; after a reload, the file is fetched within the default limit.
    std::fs::write(&file, config_toml(dir.path(), &["127.0.0.11/32"], "")).unwrap();
    let reload = |p| admin_post(p, "/admin/reload", Some(ADMIN_TOKEN), serde_json::json!({}));
    assert_eq!(reload(&p).await.0, 200);
    // (413 is remembered per URL for cache.negative_ttl: ask by another spelling of the file.)
    let again = p.url(&named(&origin, "a.reload.test", "/r.png?v=2"));
    origin.route("/r.png", Route::ok(img.clone()).header("content-type", "image/png"));
    let r = get(&again).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, img);
    // A rule that does not check is refused whole: the running policy stays.
    let bad = "[[policy.origin]]\ndomains = []\n";
    std::fs::write(&file, config_toml(dir.path(), &["127.0.0.11/32"], bad)).unwrap();
    let (status, answer) = reload(&p).await;
    assert_eq!(status, 400);
    assert!(answer.to_string().contains("policy.origin[0]"), "{answer}");
    p.stop().await;
}
