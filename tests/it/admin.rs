//! Privacy operations: prefetch, purge, domain policy and its reload, the audit log.

use std::path::Path;
use std::process::Command;

use parasol::fetch::guard::StaticLookup;
use serde_json::{Value, json};

use crate::util::*;

pub(crate) async fn admin_post(
    p: &Parasol,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = client()
        .post(p.admin_url(path))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null))
}

pub(crate) fn audit_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("outbound.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn prefetch_then_view_makes_one_origin_request_marked_prefetch() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(8_000, 40);
    origin.route("/post.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let urls =
        [origin.url("/post.png"), "ftp://files.test/x.png".into(), origin.url("/missing.png")];
    let (status, answer) =
        admin_post(&p, "/admin/prefetch", Some(ADMIN_TOKEN), json!({ "urls": urls })).await;
    assert_eq!(status, 200);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["outcome"], "stored");
    assert_eq!(results[1]["outcome"], "error");
    assert_eq!(results[1]["status"], 403);
    assert_eq!(results[2]["outcome"], "error");
    assert_eq!(results[2]["code"], "origin_not_found");
    let (_, again) =
        admin_post(&p, "/admin/prefetch", Some(ADMIN_TOKEN), json!({ "urls": [urls[0]] })).await;
    assert_eq!(again["results"][0]["outcome"], "cached");

    for _ in 0..3 {
        assert_eq!(body(get(&p.url(&origin.url("/post.png"))).await).await, img);
    }
    assert_eq!(origin.hits("/post.png"), 1, "the view never reached the origin");
    assert!(eventually(|| audit_lines(dir.path()).len() == 2).await);
    let lines = audit_lines(dir.path());
    let post: Vec<_> = lines.iter().filter(|l| l["url"] == urls[0].as_str()).collect();
    assert_eq!(post.len(), 1);
    assert_eq!(post[0]["trigger"], "prefetch");
    assert!(
        lines.iter().all(|l| l["trigger"] == "prefetch"),
        "no view-triggered request: {lines:?}"
    );
    p.stop().await;
}

#[tokio::test]
async fn admin_writes_need_the_token_and_a_wrong_one_changes_nothing() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/keep.png", Route::ok(png_bytes(3_000, 41)));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    assert_eq!(get(&p.url(&origin.url("/keep.png"))).await.status(), 200);
    let purge = json!({ "domain": "127.0.0.2" });
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, _) = admin_post(&p, "/admin/purge", token, purge.clone()).await;
        assert_eq!(status, 401, "{token:?}");
    }
    let (status, _) =
        admin_post(&p, "/admin/prefetch", Some("nope"), json!({"urls": [origin.url("/x.png")]}))
            .await;
    assert_eq!(status, 401);
    assert_eq!(origin.hits("/x.png"), 0);
    assert_eq!(p.blob_count(), 1, "nothing was purged");
    assert_eq!(client().get(p.admin_url("/admin/purge")).send().await.unwrap().status(), 405);
    let (status, answer) =
        admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), json!({"bogus": 1})).await;
    assert_eq!(status, 400, "{answer}");
    p.stop().await;

    // No token configured: admin writes are refused outright, whatever is offered.
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    cfg.server.admin_token.clear();
    let p = Parasol::start(cfg).await;
    let (status, answer) = admin_post(&p, "/admin/purge", Some(""), purge).await;
    assert_eq!(status, 403);
    assert!(answer["error"].as_str().unwrap().contains("admin_token"));
    assert_eq!(p.blob_count(), 1);
    p.stop().await;
}

/// Files of this process open under `dir`'s blobs (what `/proc/self/fd` points at).
fn blobs_held_open(dir: &Path) -> usize {
    let blobs = dir.join("blobs");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.starts_with(&blobs))
        .count()
}

/// A hit sent with sendfile leaves its entry holding the blob's file open (no open and close
/// per response); a purge closes it, so a file gone from the store keeps no disk space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_blob_is_no_longer_held_open() {
    let origin = Origin::start("127.0.0.2").await;
    let big = png_bytes(200_000, 47);
    origin.route("/held.png", Route::ok(big.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(file_each(config(dir.path(), &["127.0.0.2/32"]))).await;
    let url = p.url(&origin.url("/held.png"));
    for _ in 0..3 {
        assert_eq!(body(get(&url).await).await, big);
    }
    assert!(eventually(|| blobs_held_open(dir.path()) == 1).await, "held by the entry");
    let purge = json!({ "url": origin.url("/held.png") });
    let (status, answer) = admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), purge).await;
    assert_eq!((status, &answer["purged"]["blobs"]), (200, &json!(1)), "{answer}");
    assert!(eventually(|| blobs_held_open(dir.path()) == 0).await, "closed with the purge");
    assert_eq!(body(get(&url).await).await, big, "refetched");
    assert_eq!(origin.hits("/held.png"), 2);
    p.stop().await;
}

#[tokio::test]
async fn purge_by_domain_and_by_url_removes_the_bytes() {
    let origin = Origin::start("127.0.0.2").await;
    let shared = png_bytes(6_000, 42);
    origin.route("/a.png", Route::ok(png_bytes(5_000, 43)));
    origin.route("/b.png", Route::ok(shared.clone()));
    let lookup = StaticLookup::default()
        .with("media.one.test", &[ip("127.0.0.2")])
        .with("cdn.two.test", &[ip("127.0.0.2")]);
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start_with(config(dir.path(), &["127.0.0.2/32"]), lookup).await;
    let port = origin.addr.port();
    let one_a = format!("http://media.one.test:{port}/a.png");
    let one_b = format!("http://media.one.test:{port}/b.png");
    let two_b = format!("http://cdn.two.test:{port}/b.png");
    for u in [&one_a, &one_b, &two_b] {
        assert_eq!(get(&p.url(u)).await.status(), 200);
    }
    assert_eq!(p.blob_count(), 2, "b.png is stored once for both hosts");

    let (status, answer) =
        admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), json!({"domain": "one.test"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["purged"]["entries"], 2);
    assert_eq!(answer["purged"]["blobs"], 1, "b.png's blob stays: cdn.two.test still uses it");
    assert_eq!(answer["purged"]["bytes"], 5_000);
    assert_eq!(p.blob_count(), 1);
    assert_eq!(body(get(&p.url(&two_b)).await).await, shared, "the other domain still served");
    assert_eq!(origin.hits("/b.png"), 2);

    let (_, answer) =
        admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), json!({"url": two_b})).await;
    assert_eq!(answer["purged"]["entries"], 1);
    assert_eq!(p.blob_count(), 0);
    assert_eq!(get(&p.url(&one_a)).await.status(), 200, "refetched after the purge");
    assert_eq!(origin.hits("/a.png"), 2);
    p.stop().await;
}

#[tokio::test]
async fn blocked_domains_never_reach_the_origin_also_via_redirect() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/cat.png", Route::ok(png_bytes(2_000, 44)));
    let port = origin.addr.port();
    let blocked = format!("http://www.threads.test:{port}/cat.png");
    origin.route("/hop", Route::status(302).header("location", &blocked));
    let lookup = StaticLookup::default()
        .with("www.threads.test", &[ip("127.0.0.2")])
        .with("notthreads.test", &[ip("127.0.0.2")])
        .with("friendly.test", &[ip("127.0.0.2")]);
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &["127.0.0.2/32"],
        "[policy]\nblocked_domains = [\"threads.test\"]",
    );
    let cfg = parasol::Config::from_sources("t", &toml, std::iter::empty()).unwrap();
    let p = Parasol::start_with(cfg, lookup).await;
    let r = get(&p.url(&blocked)).await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), "domain blocked by this server's policy\n");
    // Redirected into it: the viewer gets the one answer for a destination not used.
    assert_eq!(get(&p.url(&format!("http://friendly.test:{port}/hop"))).await.status(), 502);
    assert_eq!(origin.hits("/cat.png"), 0, "the blocked domain was never asked");
    assert_eq!(origin.hits("/hop"), 1);
    let r = get(&p.url(&format!("http://notthreads.test:{port}/cat.png"))).await;
    assert_eq!(r.status(), 200, "suffix match is on whole labels");
    let metrics = p.metrics().await;
    assert!(metrics.contains("parasol_cache_results_total{result=\"blocked\"} 2"), "{metrics}");
    assert!(metrics.contains("parasol_audit_violations_total 0"), "{metrics}");
    p.stop().await;
}

#[tokio::test]
async fn reload_applies_a_new_block_list_and_purges_what_it_blocks() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(7_000, 45);
    origin.route("/p.png", Route::ok(img.clone()));
    let lookup = StaticLookup::default().with("media.threads.test", &[ip("127.0.0.2")]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    std::fs::write(&file, config_toml(&cache, &["127.0.0.2/32"], "")).unwrap();
    let cfg = parasol::Config::load(Some(&file)).unwrap();
    let options = options(std::sync::Arc::new(lookup), Some(file.clone()));
    let p = Parasol::start_opts(cfg, options).await;
    let source = format!("http://media.threads.test:{}/p.png", origin.addr.port());
    assert_eq!(body(get(&p.url(&source)).await).await, img);
    assert_eq!(p.blob_count(), 1);

    let blocked =
        config_toml(&cache, &["127.0.0.2/32"], "[policy]\nblocked_domains = [\"threads.test\"]");
    std::fs::write(&file, blocked).unwrap();
    let (status, answer) = admin_post(&p, "/admin/reload", Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["purged"]["entries"], 1);
    assert_eq!(answer["purged"]["bytes"], 7_000);
    assert_eq!(p.blob_count(), 0, "the bytes are gone from disk");
    assert_eq!(get(&p.url(&source)).await.status(), 403, "and it is not served from memory");

    std::fs::write(&file, "[cache]\nnot_a_key = 1\n").unwrap();
    let (status, answer) = admin_post(&p, "/admin/reload", Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("not_a_key"), "{answer}");
    assert_eq!(get(&p.url(&source)).await.status(), 403, "a bad reload keeps the running policy");
    assert_eq!(origin.hits("/p.png"), 1);
    p.stop().await;
}

fn parasol_audit(file: &Path, json: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parasol"));
    cmd.arg("audit").arg(file);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[tokio::test]
async fn audit_log_holds_exactly_the_requests_sent_and_parasol_audit_checks_it() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/pre.png", Route::ok(png_bytes(1_000, 46)));
    origin.route("/final.png", Route::ok(png_bytes(2_000, 47)));
    origin.route("/r1", Route::status(301).header("location", "/final.png"));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let (status, _) = admin_post(
        &p,
        "/admin/prefetch",
        Some(ADMIN_TOKEN),
        json!({"urls": [origin.url("/pre.png")]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(get(&p.url(&origin.url("/r1"))).await.status(), 200);
    assert_eq!(get(&p.url(&origin.url("/r1"))).await.status(), 200, "a hit sends nothing");
    p.stop().await;

    let lines = audit_lines(dir.path());
    let summary: Vec<(String, String, u64, String, u64)> = lines
        .iter()
        .map(|l| {
            let path = l["url"].as_str().unwrap().rsplit('/').next().unwrap().to_string();
            let trigger = l["trigger"].as_str().unwrap().to_string();
            (
                trigger,
                path,
                l["status"].as_u64().unwrap(),
                l["outcome"].as_str().unwrap().into(),
                l["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("prefetch", "pre.png", 200, "ok", 1_000),
        ("view", "r1", 301, "redirect", 0),
        ("view", "final.png", 200, "ok", 2_000),
    ]
    .map(|(t, p, s, o, b)| (t.to_string(), p.to_string(), s, o.to_string(), b));
    assert_eq!(summary, expected);
    for l in &lines {
        assert_eq!(l["addr"], origin.addr.to_string());
        assert_eq!(l["host"], "127.0.0.2");
        assert_eq!(l["method"], "GET");
    }

    let log = dir.path().join("outbound.jsonl");
    let out = parasol_audit(&log, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("127.0.0.2") && text.contains("3000"),
        "requests and bytes per host: {text}"
    );
    let out = parasol_audit(&log, true);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["hosts"]["127.0.0.2"]["requests"], 3);
    assert_eq!(summary["violations"], json!([]));

    // Plant a request that carried a cookie: the audit fails and names the line.
    let mut planted = lines[1].clone();
    planted["headers"]["cookie"] = json!("session=leaked");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&format!("{planted}\n"));
    std::fs::write(&log, text).unwrap();
    let out = parasol_audit(&log, false);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("VIOLATION line 4: sent cookie to 127.0.0.2"), "{stdout}");
    let out = parasol_audit(&dir.path().join("missing.jsonl"), false);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open audit log"));
}

#[tokio::test]
async fn audit_log_rotates_within_its_size_bound() {
    let origin = Origin::start("127.0.0.2").await;
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(dir.path(), &["127.0.0.2/32"], "[audit]\nmax_bytes = 1500\nkeep = 2");
    let p = Parasol::start(parasol::Config::from_sources("t", &toml, std::iter::empty()).unwrap())
        .await;
    for i in 0..12 {
        let path = format!("/f{i}.png");
        origin.route(&path, Route::ok(png_bytes(100, i)));
        assert_eq!(get(&p.url(&origin.url(&path))).await.status(), 200);
    }
    p.stop().await;
    let log = dir.path().join("outbound.jsonl");
    let sizes: Vec<u64> = ["", ".1", ".2"]
        .iter()
        .map(|s| std::fs::metadata(format!("{}{s}", log.display())).unwrap().len())
        .collect();
    assert!(sizes.iter().all(|s| *s <= 1500), "{sizes:?}");
    assert!(!Path::new(&format!("{}.3", log.display())).exists(), "only `keep` rotated files");
    // `parasol audit` reads the rotated files with the current one.
    let kept_lines: usize = ["", ".1", ".2"]
        .iter()
        .map(|s| std::fs::read_to_string(format!("{}{s}", log.display())).unwrap().lines().count())
        .sum();
    let out = parasol_audit(&log, true);
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["hosts"]["127.0.0.2"]["requests"], kept_lines as u64);
}

/// Content that reached parasol through a redirect into a domain belongs to that domain too:
/// purging the domain removes it, and blocking the domain purges it and refuses it, also
/// from a node that restarted in between (the final host is in the index record).
#[tokio::test]
async fn purges_and_blocks_apply_to_where_a_redirect_led() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(6_000, 46);
    origin.route("/real.png", Route::ok(img.clone()));
    let port = origin.addr.port();
    let target = format!("http://cdn.blocked.test:{port}/real.png");
    origin.route("/short", Route::status(302).header("location", &target));
    let lookup = || {
        StaticLookup::default()
            .with("links.friendly.test", &[ip("127.0.0.2")])
            .with("cdn.blocked.test", &[ip("127.0.0.2")])
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    std::fs::write(&file, config_toml(&cache, &["127.0.0.2/32"], "")).unwrap();
    let start = || async {
        let cfg = parasol::Config::load(Some(&file)).unwrap();
        Parasol::start_opts(cfg, options(std::sync::Arc::new(lookup()), Some(file.clone()))).await
    };
    let p = start().await;
    let source = format!("http://links.friendly.test:{port}/short");
    assert_eq!(body(get(&p.url(&source)).await).await, img);
    let (status, answer) =
        admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), json!({"domain": "blocked.test"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["purged"]["entries"], 1, "purged by the host the bytes came from");
    assert_eq!(body(get(&p.url(&source)).await).await, img, "fetched again");
    assert_eq!(origin.hits("/real.png"), 2);
    p.stop().await;

    // After a restart the record still knows where the bytes came from.
    let p = start().await;
    let blocked =
        config_toml(&cache, &["127.0.0.2/32"], "[policy]\nblocked_domains = [\"blocked.test\"]");
    std::fs::write(&file, blocked).unwrap();
    let (status, answer) = admin_post(&p, "/admin/reload", Some(ADMIN_TOKEN), json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["purged"]["entries"], 1);
    assert_eq!(p.blob_count(), 0);
    assert_ne!(get(&p.url(&source)).await.status(), 200, "and it is not served again");
    assert_eq!(origin.hits("/real.png"), 2, "the blocked domain was not asked");
    p.stop().await;
}

/// `[[policy.normalize]]`: a CDN that re-signs its URLs (Meta's `oh`/`oe`/`_nc_*`, another
/// edge host each time) gets one entry and one fetch per file, not one per signature; a
/// parameter the rule keeps (`stp`, the rendition) is another file; purging one spelling
/// purges the entry.
#[tokio::test]
async fn re_signed_cdn_urls_share_one_entry_and_one_fetch() {
    let origin = Origin::start("127.0.0.2").await;
    let jpeg = crate::variants::gradient_jpeg(64, 48);
    origin.route("/v/t51/1_n.jpg", Route::ok(jpeg.clone()));
    let lookup = StaticLookup::default()
        .with("edge-a.cdn.test", &[ip("127.0.0.2")])
        .with("edge-b.cdn.test", &[ip("127.0.0.2")]);
    let dir = tempfile::tempdir().unwrap();
    let rule = "[[policy.normalize]]\nhost_suffix = \"cdn.test\"\n\
                ignore_params = [\"oh\", \"oe\", \"_nc_*\"]\nmerge_hosts = true\n\
                expiry_param = \"oe\"\n";
    let toml = config_toml(dir.path(), &["127.0.0.2/32"], rule);
    let cfg = parasol::Config::from_sources("t", &toml, std::iter::empty()).unwrap();
    let options = options(std::sync::Arc::new(lookup), None);
    let p = Parasol::start_opts(cfg, options).await;
    let port = origin.addr.port();
    let url =
        |edge: &str, query: &str| format!("http://{edge}.cdn.test:{port}/v/t51/1_n.jpg?{query}");
    // Expiries in 2034, hex Unix time as Meta writes them: b expires after a.
    let a = url("edge-a", "stp=s1&oh=00_A&oe=7A0000A1&_nc_gid=first");
    let b = url("edge-b", "oe=7A0000FF&oh=00_B&stp=s1&_nc_gid=second");
    let (ra, rb) = (get(&p.url(&a)).await, get(&p.url(&b)).await);
    assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (200, 200));
    assert_eq!(ra.headers()["etag"], rb.headers()["etag"]);
    assert_eq!(origin.hits("/v/t51/1_n.jpg"), 1, "one fetch for both signatures");
    assert_eq!(get(&p.url(&url("edge-a", "stp=s2&oh=00_C"))).await.status(), 200);
    assert_eq!(origin.hits("/v/t51/1_n.jpg"), 2, "another rendition is another file");
    let (status, answer) =
        admin_post(&p, "/admin/purge", Some(ADMIN_TOKEN), json!({ "url": b })).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["purged"]["entries"].as_u64().unwrap() >= 1);
    // Asked for through the older URL after the purge: fetched with the newest seen (b's
    // expiry is later), as an expired signature would fail at the CDN.
    assert_eq!(body(get(&p.url(&a)).await).await, jpeg);
    assert_eq!(origin.hits("/v/t51/1_n.jpg"), 3, "fetched again after the purge");
    let last = origin.seen().pop().unwrap();
    assert!(last.query.unwrap().contains("oh=00_B"), "the newest URL seen was fetched");
    // A ban of one signature of the file is a ban of every signature of it (checked before
    // any fetch: no origin request).
    let (status, answer) =
        admin_post(&p, "/admin/ban", Some(ADMIN_TOKEN), json!({ "url": a })).await;
    assert_eq!(status, 200, "{answer}");
    let resigned = url("edge-c", "stp=s1&oh=00_D&oe=7A000100&_nc_gid=third");
    assert_eq!(get(&p.url(&resigned)).await.status(), 451);
    assert_eq!(get(&p.url(&b)).await.status(), 451);
    assert_eq!(origin.hits("/v/t51/1_n.jpg"), 3);
    assert_eq!(
        get(&p.url(&url("edge-a", "stp=s2&oh=00_C"))).await.status(),
        200,
        "not the other rendition"
    );
    p.stop().await;
    // Meta's CDNs are built in.
    let defaults = parasol::Config::from_sources("t", "", std::iter::empty()).unwrap();
    assert!(defaults.policy.normalize.iter().any(|r| r.host_suffix == "cdninstagram.com"));
}
