//! Fetching when a post arrives: test servers that speak each feed's protocol deliver posts
//! whose media live on a recording origin; parasol fetches each file once, after arrival and
//! within the feed's delay, before any view, and the views are hits.
//!
//! The Mastodon stand-in follows mastodon/mastodon `streaming/index.js` (`streamToHttp`:
//! `text/event-stream`, a `:)` comment on connect, `event: update` + `data: <Status JSON>` +
//! blank line per status, the token as `Authorization: Bearer`) and
//! `app/controllers/api/v1/timelines/public_controller.rb` with `concerns/paginable.rb`
//! (`remote=true&since_id=`, newest first, at most 40). The Misskey stand-in follows
//! misskey-dev/misskey `server/api/StreamingApiServerService.ts` (`/streaming?i=TOKEN`),
//! `stream/Connection.ts` (`{"type":"connect","body":{"channel","id","params"}}`) and
//! `stream/channel.ts` (`{"type":"channel","body":{"id","type":"note","body":<Note>}}`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::admin::audit_lines;
use crate::util::*;

/// Serves `answer` over HTTP/1.1 on `ip`, port 0 (connections may be upgraded, for a
/// WebSocket); its address.
pub(crate) async fn serve_on<F, Fut, B>(ip: &str, answer: F) -> std::net::SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A Mastodon API stand-in: the public remote stream and the public timeline.
#[derive(Default)]
struct Mastodon {
    /// Every status posted, oldest first.
    statuses: Mutex<Vec<serde_json::Value>>,
    /// The open stream's sender, if a client is connected.
    stream: Mutex<Option<tokio::sync::mpsc::Sender<Bytes>>>,
    /// Requests seen: path and query, and the Authorization header.
    seen: Mutex<Vec<(String, Option<String>)>>,
}

impl Mastodon {
    async fn start(ip: &str) -> (Arc<Mastodon>, std::net::SocketAddr) {
        let state = Arc::new(Mastodon::default());
        let st = state.clone();
        let addr = serve_on(ip, move |req| st.clone().answer(req)).await;
        (state, addr)
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
        let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        let auth = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_string());
        self.seen.lock().unwrap().push((target.clone(), auth.clone()));
        if auth.as_deref() != Some("Bearer feed-token") {
            let body = Full::new(Bytes::from_static(b"{\"error\":\"Missing access token\"}"));
            let mut r = Response::new(body.boxed());
            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
            return Ok(r);
        }
        if req.uri().path() == "/api/v1/streaming/public/remote" {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
            let _ = tx.send(Bytes::from_static(b":)\n")).await;
            *self.stream.lock().unwrap() = Some(tx);
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            });
            let mut r = Response::new(StreamBody::new(frames).boxed());
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            return Ok(r);
        }
        if req.uri().path() == "/api/v1/timelines/public" {
            let query: Vec<(String, String)> =
                form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let since: u64 = param("since_id").and_then(|s| s.parse().ok()).unwrap_or(0);
            let limit: usize = param("limit").and_then(|s| s.parse().ok()).unwrap_or(20).min(40);
            let statuses = self.statuses.lock().unwrap();
            let mut page: Vec<&serde_json::Value> = statuses
                .iter()
                .filter(|s| s["id"].as_str().unwrap().parse::<u64>().unwrap() > since)
                .collect();
            page.reverse();
            page.truncate(limit);
            let body = serde_json::to_vec(&page).unwrap();
            return Ok(Response::new(Full::new(Bytes::from(body)).boxed()));
        }
        let mut r = Response::new(Full::new(Bytes::from_static(b"{}")).boxed());
        *r.status_mut() = http::StatusCode::NOT_FOUND;
        Ok(r)
    }

    /// Posts `status`: kept for the timeline, and sent on the stream if one is open.
    async fn post(&self, status: serde_json::Value) {
        self.statuses.lock().unwrap().push(status.clone());
        let tx = self.stream.lock().unwrap().clone();
        if let Some(tx) = tx {
            let event = format!("event: update\ndata: {status}\n\n");
            let _ = tx.send(Bytes::from(event)).await;
        }
    }

    /// Sends `status` on the open stream only (a flood the timeline need not keep).
    async fn send_live(&self, status: String) {
        let tx = self.stream.lock().unwrap().clone();
        if let Some(tx) = tx {
            let _ = tx.send(Bytes::from(format!("event: update\ndata: {status}\n\n"))).await;
        }
    }

    /// Ends the open stream, as a restarted streaming server would.
    fn drop_stream(&self) {
        self.stream.lock().unwrap().take();
    }

    fn connected(&self) -> bool {
        self.stream.lock().unwrap().as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

/// A remote status whose media, avatar and emoji are files on `origin` (reached as
/// `files.remote.test`).
fn status(id: u64, origin: &Origin) -> serde_json::Value {
    let file = |name: &str| format!("http://files.remote.test:{}/{name}", origin.addr.port());
    serde_json::json!({
        "id": id.to_string(),
        "content": format!("<p>post {id}</p>"),
        "media_attachments": [{
            "url": file(&format!("m{id}.png")),
            "preview_url": file(&format!("m{id}s.png")),
            "remote_url": file(&format!("m{id}.png")),
        }],
        "account": {"avatar": file("avatar.png"), "avatar_static": file("avatar.png"),
                    "header": null, "header_static": null, "emojis": []},
        "emojis": [{"shortcode": "blob", "url": file(&format!("e{id}.png")), "static_url": file(&format!("e{id}.png"))}],
        "card": null,
        "reblog": null,
    })
}

fn serve_files(origin: &Origin, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let body = png_bytes(3_000 + i * 100, 1_000 + i as u64);
        origin.route(&format!("/{name}"), Route::ok(body).header("content-type", "image/png"));
    }
}

fn feed_config(dir: &std::path::Path, kind: &str, base: &str, delay: &str) -> parasol::Config {
    let extra = format!(
        "[[feed]]\nkind = \"{kind}\"\nurl = \"{base}\"\ntoken = \"feed-token\"\ndelay = \"{delay}\"\n"
    );
    let toml = config_toml(dir, &["127.0.0.13/32"], &extra);
    parasol::Config::from_sources("test", &toml, std::iter::empty()).expect("valid config")
}

#[tokio::test]
async fn a_mastodon_feed_fetches_each_file_once_after_arrival_and_catches_up_after_a_drop() {
    let origin = Origin::start("127.0.0.13").await;
    let names: Vec<String> = (1..=3)
        .flat_map(|i| [format!("m{i}.png"), format!("m{i}s.png"), format!("e{i}.png")])
        .chain(["avatar.png".to_string()])
        .collect();
    serve_files(&origin, &names);
    let (mastodon, addr) = Mastodon::start("127.0.0.12").await;
    let dir = tempfile::tempdir().unwrap();
    let config = feed_config(dir.path(), "mastodon", &format!("http://{addr}"), "2s");
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("files.remote.test", &[ip("127.0.0.13")]);
    let p = Parasol::start_with(config, lookup).await;
    assert!(eventually(|| mastodon.connected()).await, "parasol connects to the stream");
    // A status arrives: its four files are fetched once each, after arrival, within 2 s.
    let arrived = Instant::now();
    mastodon.post(status(1, &origin)).await;
    let first = ["m1.png", "m1s.png", "e1.png", "avatar.png"];
    let fetched = |names: &[&str]| names.iter().all(|n| origin.hits(&format!("/{n}")) == 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fetched(&first) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fetched(&first), "{:?}", origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>());
    for seen in origin.seen() {
        let after = seen.at - arrived;
        assert!(after < Duration::from_secs(2) + Duration::from_millis(1500), "{after:?}");
    }
    // The audit log says why, and the delay drawn (its lines are written a moment after the
    // origin saw the requests).
    assert!(eventually(|| audit_lines(dir.path()).len() == 4).await, "four audit lines");
    let records = audit_lines(dir.path());
    for r in &records {
        assert_eq!(r["trigger"], "arrival", "{r}");
        assert!(r["delay_ms"].as_u64().unwrap() < 2_000, "{r}");
    }
    // Views are hits: no origin request.
    for name in first {
        let source = format!("http://files.remote.test:{}/{name}", origin.addr.port());
        assert_eq!(get(&p.url(&source)).await.status(), 200);
    }
    assert!(fetched(&first), "a view after arrival asks the origin nothing");
    // The stream drops; two statuses arrive meanwhile; parasol reconnects and catches up.
    mastodon.drop_stream();
    mastodon.post(status(2, &origin)).await;
    mastodon.post(status(3, &origin)).await;
    let rest = ["m2.png", "m2s.png", "e2.png", "m3.png", "m3s.png", "e3.png"];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fetched(&rest) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fetched(&rest),
        "caught up: {:?}",
        origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    assert_eq!(origin.hits("/avatar.png"), 1, "the avatar they share is fetched once");
    let seen = mastodon.seen.lock().unwrap().clone();
    let catch_up = seen.iter().find(|(t, _)| t.starts_with("/api/v1/timelines/public")).unwrap();
    assert!(
        catch_up.0.contains("remote=true") && catch_up.0.contains("since_id=1"),
        "{catch_up:?}"
    );
    assert!(seen.iter().all(|(t, auth)| !t.contains("feed-token") && auth.is_some()), "{seen:?}");
    // `parasol audit` says no fetch of this host was caused by a view.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_parasol"))
        .arg("audit")
        .arg(dir.path().join("outbound.jsonl"))
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table.lines().find(|l| l.starts_with("files.remote.test")).unwrap();
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((columns[1], columns[2]), ("10", "0%"), "{table}");
    let metrics = p.metrics().await;
    assert!(metrics.contains("parasol_feed_events_total{outcome=\"post\"} 1"), "{metrics}");
    assert!(metrics.contains("parasol_feed_events_total{outcome=\"caught_up\"} 2"), "{metrics}");
    assert!(
        metrics.contains("parasol_origin_fetch_triggers_total{trigger=\"arrival\"} 10"),
        "{metrics}"
    );
    p.stop().await;
}

/// A Misskey streaming stand-in: accepts `/streaming?i=feed-token`, waits for the client to
/// connect `globalTimeline`, then sends each note pushed into it on that channel.
#[allow(clippy::result_large_err)] // tungstenite's handshake callback returns its own type
async fn misskey(
    ip: &str,
) -> (std::net::SocketAddr, tokio::sync::mpsc::Sender<serde_json::Value>, Arc<Mutex<Vec<String>>>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(16);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else { return };
        let check =
            |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
             resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                log.lock().unwrap().push(req.uri().to_string());
                Ok(resp)
            };
        let mut ws = tokio_tungstenite::accept_hdr_async(stream, check).await.unwrap();
        let connect = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    break serde_json::from_str::<serde_json::Value>(&t).unwrap();
                }
                Some(Ok(_)) => continue,
                _ => return,
            }
        };
        assert_eq!(connect["type"], "connect");
        assert_eq!(connect["body"]["channel"], "globalTimeline");
        let id = connect["body"]["id"].clone();
        while let Some(note) = rx.recv().await {
            let message = serde_json::json!({"type": "channel", "body": {"id": id, "type": "note", "body": note}});
            if ws.send(Message::text(message.to_string())).await.is_err() {
                return;
            }
        }
    });
    (addr, tx, seen)
}

#[tokio::test]
async fn a_misskey_feed_warms_remote_notes_and_leaves_local_ones() {
    let origin = Origin::start("127.0.0.13").await;
    origin.route("/avatar.png", Route::ok(crate::variants::gradient_jpeg(256, 256)));
    let names: Vec<String> =
        ["f.webp", "t.webp", "x.png", "local.png"].iter().map(|s| s.to_string()).collect();
    serve_files(&origin, &names);
    let (addr, notes, seen) = misskey("127.0.0.14").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = feed_config(dir.path(), "misskey", &format!("http://{addr}"), "1s");
    // Misskey hands out parasol's URLs (`mediaProxy`): such a URL names the rendition to warm.
    config.server.public_base_url = url::Url::parse("https://media.parasol.test/").unwrap();
    config.compat.misskey = true;
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("files.remote.test", &[ip("127.0.0.13")]);
    let p = Parasol::start_with(config, lookup).await;
    let file = |name: &str| format!("http://files.remote.test:{}/{name}", origin.addr.port());
    let local = serde_json::json!({"id": "9zz01", "user": {"host": null, "avatarUrl": file("local.png")}, "files": []});
    let proxied_avatar = format!(
        "https://media.parasol.test/proxy/avatar.webp?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("url", &file("avatar.png"))
            .append_pair("avatar", "1")
            .finish()
    );
    let remote = serde_json::json!({
        "id": "9zz02",
        "user": {"host": "remote.test", "avatarUrl": proxied_avatar, "emojis": {}},
        "files": [{"url": file("f.webp"), "thumbnailUrl": file("t.webp")}],
        "emojis": {"x": file("x.png")},
        "reactionEmojis": {},
    });
    // (The channel buffers until parasol has connected.)
    notes.send(local).await.unwrap();
    notes.send(remote).await.unwrap();
    let wanted = ["f.webp", "t.webp", "avatar.png", "x.png"];
    let fetched = || wanted.iter().all(|n| origin.hits(&format!("/{n}")) == 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !fetched() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fetched(), "{:?}", origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>());
    assert_eq!(origin.hits("/local.png"), 0, "a local note's files are the instance's own");
    assert_eq!(seen.lock().unwrap().as_slice(), ["/streaming?i=feed-token"]);
    assert!(audit_lines(dir.path()).iter().all(|r| r["trigger"] == "arrival"));
    let r = get(&p.url(&file("f.webp"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(origin.hits("/f.webp"), 1, "the view is a hit");
    // The avatar rendition was made at arrival: the viewer's request renders nothing.
    assert!(eventually_async(|| async { p.metric("parasol_renders_total").await == 1 }).await);
    let view =
        proxied_avatar.replace("https://media.parasol.test", &format!("http://{}", p.public));
    let r = get(&view).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/webp");
    assert_eq!(p.metric("parasol_renders_total").await, 1, "the view was a hit");
    p.stop().await;
}

#[tokio::test]
async fn feed_secrets_are_redacted_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = feed_config(dir.path(), "mastodon", "https://secret-instance.test", "5m");
    let shown = config.to_redacted_toml();
    assert!(!shown.contains("secret-instance") && !shown.contains("feed-token"), "{shown}");
    let bad =
        config_toml(dir.path(), &[], "[[feed]]\nkind = \"mastodon\"\nurl = \"ftp://x.test\"\n");
    let e = parasol::Config::from_sources("t", &bad, std::iter::empty()).unwrap_err().to_string();
    assert!(e.contains("feed[0]") && !e.contains("x.test"), "{e}");
}

#[tokio::test]
async fn with_view_fetch_never_a_view_gets_a_placeholder_and_the_fetch_comes_later() {
    let origin = Origin::start("127.0.0.13").await;
    let img = png_bytes(4_000, 77);
    origin.route("/late.png", Route::ok(img.clone()).header("content-type", "image/png"));
    let (_mastodon, addr) = Mastodon::start("127.0.0.12").await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[policy]\nview_fetch = \"never\"\n[[feed]]\nkind = \"mastodon\"\nurl = \"http://{addr}\"\n\
         token = \"feed-token\"\ndelay = \"2s\"\n"
    );
    let toml = config_toml(dir.path(), &["127.0.0.13/32"], &extra);
    let config = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let p = Parasol::start(config).await;
    let url = p.url(&origin.url("/late.png"));
    let viewed = Instant::now();
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-parasol-pending"], "1");
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_ne!(body(r).await, img, "a placeholder, not the file");
    assert_eq!(origin.hits("/late.png"), 0, "the view fetched nothing");
    // Fetched later, within the window, as an arrival; then served.
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.hits("/late.png") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(origin.hits("/late.png"), 1);
    let at = origin.seen()[0].at - viewed;
    assert!(at < Duration::from_millis(3_500), "fetched {at:?} after the view");
    assert!(eventually(|| audit_lines(dir.path()).len() == 1).await);
    assert_eq!(audit_lines(dir.path())[0]["trigger"], "arrival");
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-parasol-pending").is_none());
    assert_eq!(body(r).await, img);
    assert_eq!(origin.hits("/late.png"), 1);
    // A refused destination is answered as usual (one answer for every unusable
    // destination), not queued.
    let refused = get(&p.url("http://127.0.0.1:9/secret.png")).await;
    assert_eq!(refused.status(), 502);
    assert!(refused.headers().get("x-parasol-pending").is_none());
    p.stop().await;
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A parasol of its own (a child process, so the memory measured is its alone, not that of
/// the tests running beside it) takes a flood of posts: its arrival queue stays bounded,
/// dropping the oldest, and so does its memory.
#[tokio::test]
async fn a_flood_of_posts_keeps_the_queue_and_memory_bounded() {
    let origin = Origin::start("127.0.0.13").await;
    let (mastodon, addr) = Mastodon::start("127.0.0.12").await;
    let dir = tempfile::tempdir().unwrap();
    // A day's delay: almost nothing falls due while the test runs; the rest waits.
    let feed = format!(
        "[[feed]]\nkind = \"mastodon\"\nurl = \"http://{addr}\"\ntoken = \"feed-token\"\n\
         delay = \"24h\"\n"
    );
    let file = dir.path().join("parasol.toml");
    std::fs::write(&file, config_toml(&dir.path().join("cache"), &["127.0.0.13/32"], &feed))
        .unwrap();
    let quiet = [("RUST_LOG", "parasol=info")];
    let (child, _, admin) = crate::cli::spawn_serving(dir.path(), &quiet, Some(&file));
    let metric = |name: String| async move { metric_at(admin, &name).await };
    assert!(eventually(|| mastodon.connected()).await);
    let pid = child.0.id();
    let before = rss_kib(pid);
    let posts = parasol::feed::MAX_QUEUED + 10_000;
    let base = origin.url("/flood");
    for i in 0..posts {
        let status = format!(
            "{{\"id\":\"{}\",\"created_at\":\"2026-12-07T10:00:00Z\",\"account\":{{}},\
             \"media_attachments\":[{{\"url\":\"{base}/{i}.png\"}}]}}",
            1_000_000 + i
        );
        mastodon.send_live(status).await;
    }
    let received = || metric("parasol_feed_events_total{outcome=\"post\"}".into());
    let deadline = Instant::now() + Duration::from_secs(120);
    while received().await < posts as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(received().await, posts as u64);
    let arrivals =
        |outcome: &str| metric(format!("parasol_arrivals_total{{outcome=\"{outcome}\"}}"));
    assert_eq!(arrivals("queued").await, posts as u64);
    // The queue ends full: what did not fit was dropped, oldest first, or fell due (a delay
    // drawn within the seconds this takes) and was taken out.
    let dropped = arrivals("dropped").await;
    let mut taken = 0;
    for outcome in ["fetched", "failed", "cached"] {
        taken += arrivals(outcome).await;
    }
    // queued = dropped + taken out + left, and at most MAX_QUEUED are left (a few taken out
    // may still be on their way to a count).
    assert!(dropped <= 10_000 && taken < 100, "dropped {dropped}, taken {taken}");
    assert!(dropped + taken + 32 >= 10_000, "dropped {dropped}, taken {taken}");
    assert!(origin.seen().len() < 100, "only what fell due was fetched");
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!("flood: RSS grew {grown} KiB with {} files queued", parasol::feed::MAX_QUEUED);
    assert!(
        grown < 100 << 10,
        "a queue of {} files grew RSS by {grown} KiB",
        parasol::feed::MAX_QUEUED
    );
    assert!(metric("parasol_feed_lag_seconds".into()).await > 0);
    child.sigterm();
    assert!(child.wait().await.success());
}

/// A Misskey stand-in that also answers the catch-up endpoint: the streaming socket at
/// `/streaming?i=feed-token` (upgraded by hyper) and `POST /api/notes/global-timeline`
/// (`{"i", "sinceId", "limit"}`, oldest first after `sinceId`, as
/// `QueryService.makePaginationQuery` orders it).
#[derive(Default)]
struct MisskeyServer {
    notes: Mutex<Vec<serde_json::Value>>,
    socket: Mutex<Option<tokio::sync::mpsc::Sender<Option<serde_json::Value>>>>,
    catch_ups: Mutex<Vec<serde_json::Value>>,
}

impl MisskeyServer {
    async fn start(ip: &str) -> (Arc<MisskeyServer>, std::net::SocketAddr) {
        let state = Arc::new(MisskeyServer::default());
        let st = state.clone();
        let addr = serve_on(ip, move |req| st.clone().answer(req)).await;
        (state, addr)
    }

    async fn answer(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, protocol::Role};
        if req.uri().path() == "/api/notes/global-timeline" {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let asked: serde_json::Value = serde_json::from_slice(&body).unwrap();
            self.catch_ups.lock().unwrap().push(asked.clone());
            let since = asked["sinceId"].as_str().unwrap_or("").to_string();
            let limit = asked["limit"].as_u64().unwrap_or(10) as usize;
            let notes = self.notes.lock().unwrap();
            let page: Vec<&serde_json::Value> = notes
                .iter()
                .filter(|n| n["id"].as_str().unwrap() > since.as_str())
                .take(limit)
                .collect();
            return Ok(Response::new(Full::new(Bytes::from(serde_json::to_vec(&page).unwrap()))));
        }
        let key = req.headers().get("sec-websocket-key").cloned();
        if req.uri() != "/streaming?i=feed-token" || key.is_none() {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = http::StatusCode::UNAUTHORIZED;
            return Ok(r);
        }
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.unwrap().as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<serde_json::Value>>(64);
        *self.socket.lock().unwrap() = Some(tx);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            let id = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                        if m["type"] == "connect" && m["body"]["channel"] == "globalTimeline" {
                            break m["body"]["id"].clone();
                        }
                    }
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            };
            while let Some(Some(note)) = rx.recv().await {
                let message = serde_json::json!({"type": "channel", "body": {"id": id, "type": "note", "body": note}});
                if ws.send(Message::text(message.to_string())).await.is_err() {
                    return;
                }
            }
            let _ = ws.close(None).await;
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("sec-websocket-accept", accept.parse().unwrap());
        Ok(r)
    }

    /// Posts `note`: kept for catch-up, and sent on the socket if one is open.
    async fn post(&self, note: serde_json::Value) {
        self.notes.lock().unwrap().push(note.clone());
        let tx = self.socket.lock().unwrap().clone();
        if let Some(tx) = tx {
            let _ = tx.send(Some(note)).await;
        }
    }

    /// Closes the socket, as a restarted Misskey would.
    async fn drop_socket(&self) {
        let tx = self.socket.lock().unwrap().take();
        if let Some(tx) = tx {
            let _ = tx.send(None).await;
        }
    }

    fn connected(&self) -> bool {
        self.socket.lock().unwrap().as_ref().is_some_and(|tx| !tx.is_closed())
    }
}

#[tokio::test]
async fn a_misskey_feed_that_drops_is_caught_up_without_losing_a_note() {
    let origin = Origin::start("127.0.0.13").await;
    let names: Vec<String> = (1..=3).map(|i| format!("n{i}.webp")).collect();
    serve_files(&origin, &names);
    let (misskey, addr) = MisskeyServer::start("127.0.0.15").await;
    let dir = tempfile::tempdir().unwrap();
    let config = feed_config(dir.path(), "misskey", &format!("http://{addr}"), "1s");
    let lookup = parasol::fetch::guard::StaticLookup::default()
        .with("files.remote.test", &[ip("127.0.0.13")]);
    let p = Parasol::start_with(config, lookup).await;
    assert!(eventually(|| misskey.connected()).await, "parasol connects");
    let note = |i: u32| {
        let file = format!("http://files.remote.test:{}/n{i}.webp", origin.addr.port());
        serde_json::json!({"id": format!("9zz0{i}"), "user": {"host": "remote.test"},
                           "files": [{"url": file, "thumbnailUrl": null}]})
    };
    misskey.post(note(1)).await;
    let hit = |i: u32| origin.hits(&format!("/n{i}.webp")) == 1;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hit(1) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hit(1));
    misskey.drop_socket().await;
    misskey.post(note(2)).await;
    misskey.post(note(3)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(hit(2) && hit(3)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hit(2) && hit(3), "{:?}", origin.seen().iter().map(|s| &s.path).collect::<Vec<_>>());
    let asked = misskey.catch_ups.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0]["sinceId"], "9zz01");
    assert_eq!(asked[0]["i"], "feed-token");
    assert_eq!(origin.hits("/n1.webp"), 1);
    p.stop().await;
}
