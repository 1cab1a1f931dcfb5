//! A cold file reaches its viewers as the origin's bytes arrive: a trickling origin (its own
//! hyper server here, sending 64 KiB every 40 ms), viewers who ask at once and who join later,
//! a Range inside what has arrived, a fill that fails midway, and types that must be prepared
//! before anyone sees them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::util::*;

const PIECE: usize = 64 << 10;

/// An origin that sends `body` in 64 KiB pieces, one every 40 ms, declaring its full length
/// (or, with [`Trickle::chunked`], none); with `cut_at`, it closes the connection after that
/// many bytes.
struct Trickle {
    addr: std::net::SocketAddr,
    /// Set once the last byte is sent.
    done: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Trickle {
    async fn start(ip: &str, body: Bytes, cut_at: Option<usize>) -> Trickle {
        Self::serve(ip, body, cut_at, true).await
    }

    /// The same origin declaring no length: its body goes chunked.
    async fn chunked(ip: &str, body: Bytes, cut_at: Option<usize>) -> Trickle {
        Self::serve(ip, body, cut_at, false).await
    }

    async fn serve(ip: &str, body: Bytes, cut_at: Option<usize>, declare: bool) -> Trickle {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (done, requests) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (d, r) = (done.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (body, d, r) = (body.clone(), d.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let (body, d) = (body.clone(), d.clone());
                        let total = body.len();
                        let send = cut_at.unwrap_or(total);
                        let pieces = futures_util::stream::unfold(0usize, move |at| {
                            let (body, d) = (body.clone(), d.clone());
                            async move {
                                if at >= send {
                                    d.store(true, Ordering::SeqCst);
                                    return if send < total {
                                        // Cut short: the connection ends mid-body.
                                        Some((Err(std::io::Error::other("cut")), usize::MAX))
                                    } else {
                                        None
                                    };
                                }
                                if at > 0 {
                                    tokio::time::sleep(Duration::from_millis(40)).await;
                                }
                                let end = (at + PIECE).min(send);
                                if end == total {
                                    // hyper does not poll a body again once its declared
                                    // length is written.
                                    d.store(true, Ordering::SeqCst);
                                }
                                let frame = Frame::data(body.slice(at..end));
                                Some((Ok::<_, std::io::Error>(frame), end))
                            }
                        });
                        let mut response = http::Response::new(StreamBody::new(pieces));
                        if declare {
                            response.headers_mut().insert("content-length", total.into());
                        }
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Trickle { addr, done, requests, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// An MP4-looking body (an ISO BMFF `ftyp` box, then noise) of `n` bytes.
fn video(n: usize) -> Bytes {
    let mut v = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom".to_vec();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}

/// The rest of a response's body after `got`: the bytes, and whether it ended complete
/// (`Ok`) or broken.
async fn read_rest(
    r: &mut reqwest::Response,
    mut got: Vec<u8>,
) -> (Vec<u8>, Result<(), reqwest::Error>) {
    loop {
        match r.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => return (got, Ok(())),
            Err(e) => return (got, Err(e)),
        }
    }
}

#[tokio::test]
async fn viewers_of_a_cold_video_get_its_bytes_as_they_arrive() {
    let original = video(6 << 20); // about 3.8 s at the origin's pace
    let origin = Trickle::start("127.0.0.87", original.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.87/32"])).await;
    let url = p.url(&origin.url("/clip.mp4"));

    // The first viewer has headers and the first bytes while the origin is still sending.
    let mut first = client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["content-type"], "video/mp4");
    assert_eq!(first.headers()["content-length"], (6u64 << 20).to_string().as_str());
    assert!(first.headers().get("etag").is_none(), "no hash yet");
    let opening = first.chunk().await.unwrap().unwrap();
    assert!(!origin.done.load(Ordering::SeqCst), "the first bytes came before the last was sent");

    // A viewer joining midway, and a Range inside what has arrived.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let late = client().get(&url).send().await.unwrap();
    assert_eq!(late.status(), 200);
    let ranged = client().get(&url).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.headers()["content-range"], format!("bytes 100-199/{}", 6 << 20).as_str());
    assert!(!origin.done.load(Ordering::SeqCst), "joined while the fill was arriving");
    assert!(body(ranged).await == original[100..200]);

    // Everyone gets exactly the origin's bytes, from one origin request.
    let (rest, ended) = read_rest(&mut first, opening.to_vec()).await;
    if let Err(e) = ended {
        panic!("after {} bytes: {e:?}", rest.len());
    }
    let diff = rest.iter().zip(original.iter()).position(|(a, b)| a != b);
    assert!(
        rest == original,
        "the first viewer's body is the origin's: {} vs {}, first difference at {diff:?}",
        rest.len(),
        original.len()
    );
    assert!(body(late).await == original, "so is the late viewer's");
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1);

    // Stored once whole: from now on a hit with its ETag.
    let stored = eventually(|| p.blob_count() == 1).await;
    assert!(stored, "the fill was stored");
    let r = get(&url).await;
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&original));
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    p.stop().await;
}

#[tokio::test]
async fn a_fill_cut_short_ends_its_viewers_broken_and_stores_nothing() {
    let original = video(4 << 20);
    let origin = Trickle::start("127.0.0.88", original.clone(), Some(1 << 20)).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.88/32"])).await;
    let url = p.url(&origin.url("/cut.mp4"));
    let mut viewer = client().get(&url).send().await.unwrap();
    assert_eq!(viewer.status(), 200, "streaming had begun");
    let (got, ended) = read_rest(&mut viewer, Vec::new()).await;
    assert!(ended.is_err(), "the response ends broken, not complete");
    assert!(
        got.len() < original.len() && got[..] == original[..got.len()],
        "only true bytes were sent"
    );
    assert!(got.len() <= 1 << 20);
    // The failure is remembered like any origin failure (so the fill has ended: it remembers
    // before it publishes), and nothing was stored.
    assert_eq!(get(&url).await.status(), 502);
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1, "remembered, not asked again");
    assert_eq!(p.blob_count(), 0);
    p.stop().await;
}

/// An origin that declares no length streams too, once its body outgrows memory (1 MiB): the
/// viewer's response is chunked, without a length, and ends only when the fill is whole, with
/// exactly the origin's bytes. Cut short, it ends broken, and nothing is stored.
#[tokio::test]
async fn a_fill_of_unknown_length_streams_chunked_and_ends_only_when_whole() {
    let original = video(4 << 20); // about 2.5 s at the origin's pace
    let origin = Trickle::chunked("127.0.0.91", original.clone(), None).await;
    let cut = Trickle::chunked("127.0.0.92", original.clone(), Some(2 << 20)).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.91/32", "127.0.0.92/32"])).await;
    let url = p.url(&origin.url("/chunked.mp4"));

    let mut viewer = client().get(&url).send().await.unwrap();
    assert_eq!(viewer.status(), 200);
    assert_eq!(viewer.headers()["content-type"], "video/mp4");
    assert!(viewer.headers().get("content-length").is_none(), "no length known yet");
    assert_eq!(viewer.headers()["transfer-encoding"], "chunked");
    let opening = viewer.chunk().await.unwrap().unwrap().to_vec();
    assert!(!origin.done.load(Ordering::SeqCst), "the first bytes came before the last was sent");
    let head = client().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert!(!origin.done.load(Ordering::SeqCst), "asked while the fill was arriving");
    assert!(head.headers().get("content-length").is_none(), "HEAD claims no length either");
    let (got, ended) = read_rest(&mut viewer, opening).await;
    if let Err(e) = ended {
        panic!("after {} bytes: {e:?}", got.len());
    }
    assert!(got == original, "{} bytes of {}, the origin's", got.len(), original.len());
    assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
    let served = p.metric("parasol_served_bytes_total").await;
    assert_eq!(served, original.len() as u64, "counted as they went, though no length was known");
    assert!(eventually(|| p.blob_count() == 1).await, "the fill was stored");
    let r = get(&url).await;
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag_of(&original));
    assert_eq!(r.headers()["content-length"], (4u64 << 20).to_string().as_str());

    let mut viewer = client().get(p.url(&cut.url("/cut.mp4"))).send().await.unwrap();
    assert_eq!(viewer.status(), 200, "streaming had begun");
    let (got, ended) = read_rest(&mut viewer, Vec::new()).await;
    assert!(ended.is_err(), "the response ends broken, not complete, after {} bytes", got.len());
    assert!(got.len() <= 2 << 20 && got[..] == original[..got.len()], "only true bytes");
    // Remembered as failed (the fill has ended), and not stored.
    assert_eq!(get(&p.url(&cut.url("/cut.mp4"))).await.status(), 502);
    assert_eq!(cut.requests.load(Ordering::SeqCst), 1);
    assert_eq!(p.blob_count(), 1, "the cut fill is not stored");
    p.stop().await;
}

#[tokio::test]
async fn what_is_prepared_before_serving_is_not_streamed() {
    // A large "JPEG" (signature, then noise) is stripped of metadata before it is stored:
    // nobody sees it before that, so the response comes once the origin is done.
    let mut jpeg = b"\xff\xd8\xff\xe0".to_vec();
    jpeg.extend_from_slice(&video(2 << 20)[4..]);
    let origin = Trickle::start("127.0.0.89", Bytes::from(jpeg), None).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.89/32"])).await;
    let r = get(&p.url(&origin.url("/big.jpg"))).await;
    assert!(origin.done.load(Ordering::SeqCst), "answered only after the last byte");
    assert!(r.status() == 200 || r.status() == 415, "{}", r.status());
    p.stop().await;

    // With a content rule in force (a ban by hash), a video waits for its whole body too.
    let video_origin = Trickle::start("127.0.0.89", video(2 << 20), None).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.89/32"])).await;
    let ban = serde_json::json!({ "hash": "ab".repeat(32) }).to_string();
    let r = client()
        .post(p.admin_url("/admin/ban"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(ban)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get(&p.url(&video_origin.url("/v.mp4"))).await;
    assert!(video_origin.done.load(Ordering::SeqCst), "answered only after the last byte");
    assert!(r.headers().get("etag").is_some(), "a stored entry, not a growing one");
    p.stop().await;
}

/// An HTTP/1.0 response can only end by closing its connection, which is also how a broken
/// one ends (nginx's `proxy_pass` speaks HTTP/1.0 unless told otherwise): such a viewer never
/// reads a fill of unknown length as it arrives. It gets the stored file whole, with a
/// Content-Length, or an error; never a cut body that looks whole.
#[tokio::test]
async fn an_http_1_0_viewer_never_reads_a_fill_of_unknown_length_as_it_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let original = video(3 << 20);
    let whole = Trickle::chunked("127.0.0.93", original.clone(), None).await;
    let cut = Trickle::chunked("127.0.0.94", original.clone(), Some(9 << 18)).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Parasol::start(config(dir.path(), &["127.0.0.93/32", "127.0.0.94/32"])).await;
    let http10 = |url: String| async move {
        let url = url::Url::parse(&url).unwrap();
        let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {} HTTP/1.0\r\nHost: media.test\r\n\r\n", url.path());
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        let at = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
        (String::from_utf8_lossy(&answer[..at]).to_ascii_lowercase(), answer[at..].to_vec())
    };

    let (head, got) = http10(p.url(&cut.url("/cut.mp4"))).await;
    assert!(head.starts_with("http/1.0 502"), "{head}");
    assert_ne!(got.len(), 9 << 18, "not the origin's first bytes as if whole");
    assert_eq!(p.blob_count(), 0);

    let (head, got) = http10(p.url(&whole.url("/whole.mp4"))).await;
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains(&format!("content-length: {}", 3 << 20)), "{head}");
    assert!(got == original, "{} bytes of {}", got.len(), original.len());
    p.stop().await;
}
