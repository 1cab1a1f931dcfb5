//! Nothing of the viewer reaches the origin, and only allowed destinations are dialed.

use std::time::Duration;

use parasol::fetch::guard::StaticLookup;

use crate::util::*;

/// Headers a browser or an intermediate proxy may send, each identifying the viewer.
const VIEWER_HEADERS: [(&str, &str); 20] = [
    ("x-forwarded-for", "203.0.113.77"),
    ("x-real-ip", "203.0.113.77"),
    ("forwarded", "for=203.0.113.77;proto=https"),
    ("cookie", "session=viewer-session-cookie"),
    ("authorization", "Bearer viewer-token"),
    ("referer", "https://instance.test/@alice/123"),
    ("accept-language", "de-CH,de;q=0.9"),
    ("user-agent", "Mozilla/5.0 (ViewerBrowser) Gecko/20100101 Firefox/999.0"),
    ("dnt", "1"),
    ("sec-ch-ua", "\"ViewerBrand\";v=\"1\""),
    ("sec-ch-ua-platform", "\"ViewerOS\""),
    ("sec-ch-ua-mobile", "?0"),
    ("sec-fetch-site", "same-origin"),
    ("sec-gpc", "1"),
    ("origin", "https://instance.test"),
    ("x-client-ip", "203.0.113.77"),
    ("cf-connecting-ip", "203.0.113.77"),
    ("true-client-ip", "203.0.113.77"),
    ("via", "1.1 viewer-proxy"),
    ("x-request-id", "viewer-request-42"),
];

/// DESIGN.md §1.5: what may reach an origin.
const OUTBOUND_ALLOWLIST: [&str; 5] =
    ["host", "user-agent", "accept", "accept-encoding", "connection"];

#[tokio::test]
async fn origin_sees_none_of_the_viewers_headers() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(4_000, 20);
    origin.route("/p.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    let mut request = client().get(p.url(&origin.url("/p.png")));
    for (k, v) in VIEWER_HEADERS {
        request = request.header(k, v);
    }
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, img);

    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    for name in headers.keys() {
        assert!(OUTBOUND_ALLOWLIST.contains(&name.as_str()), "origin received {name}");
    }
    assert!(headers["user-agent"].to_str().unwrap().starts_with("parasol/"));
    assert_eq!(headers["accept-encoding"], "identity");
    let all: String = headers.values().map(|v| v.to_str().unwrap_or("")).collect();
    // Values long enough to be distinctive (not "1" or "?0", which occur anywhere).
    let distinctive = || VIEWER_HEADERS.iter().map(|(_, v)| *v).filter(|v| v.len() > 4);
    for value in distinctive() {
        assert!(!all.contains(value), "viewer value {value:?} reached the origin");
    }

    // The audit log names exactly what was sent, and nothing of the viewer.
    let log_path = dir.path().join("outbound.jsonl");
    assert!(
        eventually(|| std::fs::read_to_string(&log_path).is_ok_and(|s| s.lines().count() == 1))
            .await
    );
    let line = std::fs::read_to_string(&log_path).unwrap();
    let record: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(record["trigger"], "view");
    assert_eq!(record["status"], 200);
    assert_eq!(record["bytes"], 4_000);
    assert_eq!(record["addr"], origin.addr.to_string());
    let logged: Vec<&String> = record["headers"].as_object().unwrap().keys().collect();
    for name in &logged {
        assert!(OUTBOUND_ALLOWLIST.contains(&name.as_str()), "audit lists {name}");
    }
    for value in distinctive() {
        assert!(!line.contains(value), "viewer value {value:?} is in the audit log");
    }
    p.stop().await;
}

#[tokio::test]
async fn loopback_origin_not_in_allow_networks_is_never_dialed() {
    let allowed = Origin::start("127.0.0.2").await;
    let forbidden = Origin::start("127.0.0.3").await;
    forbidden.route("/secret.png", Route::ok(png_bytes(1_000, 21)));
    // An allowed origin redirecting to the forbidden one, absolute and scheme-relative.
    let target = forbidden.url("/secret.png");
    allowed.route("/hop.png", Route::status(302).header("location", &target));
    let relative = target.trim_start_matches("http:");
    allowed.route("/hop2.png", Route::status(301).header("location", relative));
    allowed.route("/hop3.png", Route::status(307).header("location", &target));
    allowed.route("/hop4.png", Route::status(308).header("location", "http://localhost/x.png"));
    let dir = tempfile::tempdir().unwrap();
    let lookup = StaticLookup::default()
        .with("forbidden.test", &[ip("127.0.0.3")])
        .with("private.test", &[ip("10.0.0.7")])
        .with("mixed.test", &[ip("127.0.0.2"), ip("169.254.169.254")]);
    let p = Parasol::start_with(config(dir.path(), &["127.0.0.2/32"]), lookup).await;
    let port = forbidden.addr.port();
    for source in [
        target.clone(),
        format!("http://forbidden.test:{port}/secret.png"),
        format!("http://localhost:{port}/secret.png"),
        format!("http://a.localhost:{port}/secret.png"),
        format!("http://2130706435:{port}/secret.png"), // 127.0.0.3 in decimal
        format!("http://0x7f000003:{port}/secret.png"), // hex
        format!("http://0177.0.0.3:{port}/secret.png"), // octal
        format!("http://127.3:{port}/secret.png"),      // short form
        format!("http://127.0.0.3.:{port}/secret.png"), // trailing dot
        format!("http://[64:ff9b::7f00:3]:{port}/secret.png"), // NAT64
        format!("http://[2002:7f00:3::]:{port}/secret.png"), // 6to4
        format!("http://[2001:0:4136:e378:8000:63bf:80ff:fffc]:{port}/secret.png"), // Teredo
        format!("http://[::127.0.0.3]:{port}/secret.png"), // IPv4-compatible
        format!("http://[::ffff:127.0.0.3]:{port}/secret.png"),
        format!("http://private.test:{port}/secret.png"),
        format!("http://mixed.test:{port}/secret.png"),
        allowed.url("/hop.png"),
        allowed.url("/hop2.png"),
        allowed.url("/hop3.png"),
        allowed.url("/hop4.png"),
    ] {
        // One answer, the same as for an origin that does not answer: no way to tell a
        // private address from a dead one (the detail is the operator's, in the log).
        let r = get(&p.url(&source)).await;
        assert_eq!(r.status(), 502, "{source}");
        assert_eq!(r.headers()["x-parasol-error"], "origin_unreachable", "{source}");
        assert_eq!(r.text().await.unwrap(), "origin failed\n", "{source}");
    }
    assert_eq!(forbidden.connections(), 0, "the forbidden origin was never connected to");
    // A redirect into a refused destination is the origin's doing: remembered, not re-asked.
    assert_eq!(get(&p.url(&allowed.url("/hop.png"))).await.status(), 502);
    let blocked = p.metric("parasol_cache_results_total{result=\"blocked\"}").await;
    assert!(blocked >= 19, "each refusal is counted as blocked for the operator: {blocked}");
    assert_eq!(allowed.hits("/hop.png"), 1);
    assert_eq!(p.blob_count(), 0);
    p.stop().await;
}

/// Counts name lookups, answering every name with the test origin's address.
#[derive(Default)]
struct CountingLookup(std::sync::atomic::AtomicUsize);

impl parasol::fetch::guard::Lookup for CountingLookup {
    fn lookup(
        &self,
        _host: &str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<std::net::IpAddr>>> + Send>,
    > {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(vec![ip("127.0.0.2")]) })
    }
}

#[tokio::test]
async fn bad_signatures_are_refused_before_any_lookup_or_connection() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let origin = Origin::start("127.0.0.2").await;
    let dir = tempfile::tempdir().unwrap();
    let lookup = std::sync::Arc::new(CountingLookup::default());
    let options = options(lookup.clone(), None);
    let p = Parasol::start_opts(config(dir.path(), &["127.0.0.2/32"]), options).await;
    // A source whose tag holds a character the two base64 alphabets spell differently, so
    // that the standard-alphabet spelling is a different string (and a case that runs): a
    // '-' (a '+' in the standard one), never a '_' (a '/', which would split the path and be
    // refused as a malformed URL, 400, before any signature is looked at).
    let (path, good) = (0..10_000)
        .map(|n| format!("/s-{n}.png"))
        .map(|path| {
            let url = p.url(&format!("http://signed.test:{}{path}", origin.addr.port()));
            (path, url)
        })
        .find(|(_, url)| {
            url.split('/').nth(4).is_some_and(|sig| sig.contains('-') && !sig.contains('_'))
        })
        .unwrap();
    origin.route(&path, Route::ok(png_bytes(500, 24)));
    let parts: Vec<&str> = good.split('/').collect();
    let (sig, src64) = (parts[4], parts[5]);
    let other_sig = p.url(&format!("http://signed.test:{}/other.png", origin.addr.port()));
    let other_sig = other_sig.split('/').nth(4).unwrap();
    let raw = b64.decode(sig).unwrap();
    let std_b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
    let mut flipped = raw.clone();
    flipped[0] ^= 1;
    let base = format!("http://{}", p.public);
    let std_sig = std_b64.trim_end_matches('=').to_string();
    assert_ne!(std_sig, sig);
    let cases = vec![
        ("standard alphabet", format!("/m/{std_sig}/{src64}")),
        ("missing", format!("/m//{src64}")),
        ("short", format!("/m/{}/{src64}", &sig[..20])),
        ("wrong", format!("/m/{}/{src64}", b64.encode(&flipped))),
        ("padded", format!("/m/{sig}=/{src64}")),
        ("hex", format!("/m/{}/{src64}", hex::encode(&raw))),
        ("another URL's MAC", format!("/m/{other_sig}/{src64}")),
        ("padded source", format!("/m/{sig}/{src64}==")),
    ];
    for (what, path) in cases {
        let status = get(&format!("{base}{path}")).await.status().as_u16();
        assert_eq!(status, 403, "{what}");
    }
    assert_eq!(lookup.0.load(std::sync::atomic::Ordering::SeqCst), 0, "no DNS lookup");
    assert_eq!(origin.connections(), 0, "no connection");
    assert_eq!(get(&good).await.status(), 200, "the genuine URL works");
    // Two: the test origin's port is not one of fetch.ports, so the name is resolved once to
    // check that every address is an allowed one, then by the connector.
    assert_eq!(lookup.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    p.stop().await;
}

#[tokio::test]
async fn redirects_within_allowed_origins_are_followed_and_bounded() {
    let origin = Origin::start("127.0.0.2").await;
    let img = png_bytes(3_000, 22);
    origin.route("/final.png", Route::ok(img.clone()));
    origin.route("/r1", Route::status(301).header("location", "/r2"));
    origin.route("/r2", Route::status(307).header("location", "/final.png"));
    origin.route("/loop", Route::status(302).header("location", "/loop"));
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.2/32"])).await;
    assert_eq!(body(get(&p.url(&origin.url("/r1"))).await).await, img);
    assert_eq!(get(&p.url(&origin.url("/loop"))).await.status(), 502);
    assert_eq!(origin.hits("/loop"), 6, "one request plus fetch.max_redirects (5) hops");
    p.stop().await;
}

#[tokio::test]
async fn a_slow_origin_times_out_with_504() {
    let origin = Origin::start("127.0.0.2").await;
    origin.route("/stuck.png", Route::ok(png_bytes(100, 23)).delay(Duration::from_secs(30)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.2/32"]);
    cfg.fetch.timeout = parasol::config::Dur(Duration::from_millis(300));
    let p = Parasol::start(cfg).await;
    assert_eq!(get(&p.url(&origin.url("/stuck.png"))).await.status(), 504);
    // The abandoned request is still in the audit log.
    let log = dir.path().join("outbound.jsonl");
    assert!(
        eventually(|| std::fs::read_to_string(&log).is_ok_and(|s| s.contains("stuck.png"))).await
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&log).unwrap().trim()).unwrap();
    assert_eq!(line["outcome"], "origin_timeout");
    p.stop().await;
}
