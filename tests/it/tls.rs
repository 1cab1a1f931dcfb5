//! Origins over TLS, as every real origin is: Debian's nginx (installed by `.ci/run`) serving
//! certificates from a CA this test makes, trusted through `fetch.ca_file`. A valid chain is
//! fetched (over HTTP/2, which nginx offers by ALPN); a certificate for another name, an
//! expired one and one from an unknown CA are 502 for the viewer, `origin_tls` in the
//! operator's metrics; nothing is ever tried over plain HTTP instead, and an https source
//! cannot redirect to http.

use std::path::Path;
use std::time::Duration;

use parasol::fetch::guard::StaticLookup;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::recipes::{free_port, launch_nginx};
use crate::util::*;

/// A CA, and certificates it (or another CA) issues, written as PEM files into `dir`.
struct Pki {
    ca: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki { ca: Issuer::new(params, key), ca_pem }
    }

    /// Writes `<stem>.crt` and `<stem>.key` for `name`, valid until `until` (year).
    fn issue(&self, dir: &Path, stem: &str, name: &str, until: i32) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(has_nginx), ignore = "needs nginx and openssl: apt-get install nginx-light openssl")]
async fn origins_over_tls_are_verified_and_never_downgraded() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (trusted, stranger) = (Pki::new("parasol test CA"), Pki::new("someone else's CA"));
    trusted.issue(work, "good", "tls.test", 2100);
    trusted.issue(work, "wrong-name", "elsewhere.test", 2100);
    trusted.issue(work, "expired", "tls.test", 2021);
    stranger.issue(work, "untrusted", "tls.test", 2100);
    std::fs::write(work.join("ca.pem"), &trusted.ca_pem).unwrap();
    std::fs::create_dir(work.join("www")).unwrap();
    let img = png_bytes(40_000, 900);
    std::fs::write(work.join("www/a.png"), &img).unwrap();

    let plain = Origin::start("127.0.0.31").await;
    plain.route("/a.png", Route::ok(img.clone()));
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let server = |port: u16, stem: &str, extra: &str| {
        format!(
            "server {{\n listen 127.0.0.30:{port} ssl http2;\n ssl_certificate {dir}/{stem}.crt;\n \
             ssl_certificate_key {dir}/{stem}.key;\n access_log {dir}/access.log protocol;\n \
             root {dir}/www;\n{extra}\n}}\n",
            dir = work.display()
        )
    };
    let downgrade = format!(
        " location = /moved.png {{ return 302 http://plain.test:{}/a.png; }}",
        plain.addr.port()
    );
    let block = [
        "log_format protocol '$server_port $server_protocol $request_uri';\n".to_string(),
        server(ports[0], "good", ""),
        server(ports[1], "wrong-name", ""),
        server(ports[2], "expired", ""),
        server(ports[3], "untrusted", ""),
        server(ports[4], "good", &downgrade),
    ]
    .concat();
    let _nginx = launch_nginx(work, &block);
    for port in &ports {
        let up = eventually(|| std::net::TcpStream::connect(("127.0.0.30", *port)).is_ok()).await;
        assert!(up, "nginx listens on {port}");
    }

    let lookup = || {
        StaticLookup::default()
            .with("tls.test", &[ip("127.0.0.30")])
            .with("plain.test", &[ip("127.0.0.31")])
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.30/32", "127.0.0.31/32"]);
    cfg.fetch.ca_file = Some(work.join("ca.pem"));
    let p = Parasol::start_with(cfg, lookup()).await;
    let at = |port: u16, path: &str| p.url(&format!("https://tls.test:{port}{path}"));

    let r = get(&at(ports[0], "/a.png")).await;
    assert_eq!(
        r.status(),
        200,
        "a chain from the configured CA: {:?}",
        r.headers().get("x-parasol-error")
    );
    assert_eq!(body(r).await, img);
    let log = std::fs::read_to_string(work.join("access.log")).unwrap_or_default();
    assert!(log.contains(&format!("{} HTTP/2.0 /a.png", ports[0])), "over HTTP/2: {log}");

    for (port, what) in
        [(ports[1], "another name"), (ports[2], "expired"), (ports[3], "unknown CA")]
    {
        // Viewers get the one answer for a destination not used; the operator's metrics
        // say why.
        let r = get(&at(port, "/a.png")).await;
        assert_eq!(r.status(), 502, "{what}");
        assert_eq!(r.headers()["x-parasol-error"], "origin_unreachable", "{what}");
    }
    let tls = "parasol_origin_fetches_total{outcome=\"origin_tls\"}";
    assert_eq!(p.metric(tls).await, 3);
    // An https URL to a port that speaks plain HTTP is a failed handshake, never a plain
    // request; an https source that redirects to http is refused before the http hop.
    let r = get(&p.url(&format!("https://plain.test:{}/a.png", plain.addr.port()))).await;
    assert_eq!(r.status(), 502);
    assert_eq!(p.metric(tls).await, 4, "a failed handshake");
    let r = get(&at(ports[4], "/moved.png")).await;
    assert_eq!(r.status(), 502);
    let downgrade = "parasol_origin_fetches_total{outcome=\"insecure_redirect\"}";
    assert_eq!(p.metric(downgrade).await, 1);
    assert_eq!(plain.seen().len(), 0, "nothing went over plain http");
    p.stop().await;

    // An operator may allow the downgrade; then it is followed.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["127.0.0.30/32", "127.0.0.31/32"]);
    cfg.fetch.ca_file = Some(work.join("ca.pem"));
    cfg.fetch.allow_insecure_redirects = true;
    let p = Parasol::start_with(cfg, lookup()).await;
    let r = get(&p.url(&format!("https://tls.test:{}/moved.png", ports[4]))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(plain.hits("/a.png"), 1);
    p.stop().await;

    // Without fetch.ca_file the test CA is unknown, as it would be to any web client.
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start_with(config(dir.path(), &["127.0.0.30/32"]), lookup()).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        get(&p.url(&format!("https://tls.test:{}/a.png", ports[0]))),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(p.metric("parasol_origin_fetches_total{outcome=\"origin_tls\"}").await, 1);
    p.stop().await;
}
