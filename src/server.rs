//! Accept loops, graceful shutdown, and routing of viewer requests to the URL schemes.
//!
//! Each connection is served by hyper's HTTP/1.1 server with a header-read deadline (a
//! slowloris guard) and `TCP_NODELAY` (small responses must not wait on Nagle). On shutdown the
//! listeners close first, then in-flight connections get `server.shutdown_grace` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ProxyRequest};
use crate::audit::Trigger;
use crate::error::ProxyError;
use crate::proxy::Proxy;
use crate::response::{self, Body};
use crate::signing::Signer;
use crate::telemetry::{CacheStatus, RequestLabels, traces};
use tracing::Instrument;

pub mod sendfile;

/// Request targets longer than this are refused with 414 before routing.
pub const MAX_URI_LEN: usize = 8192;

/// State the viewer-facing routes need.
pub struct Public {
    /// The request lifecycle behind every route.
    pub proxy: Arc<Proxy>,
    /// Verifies native URLs.
    pub signer: Signer,
    /// The unsigned routes' fill allowances (shared with the pict-rs listener).
    pub unsigned: Arc<crate::api::rate::Unsigned>,
    /// Native paths already verified and parsed.
    pub native: crate::api::native::Memo,
    /// With `policy.view_fetch = "never"`: queues a view's file for a fetch later (the
    /// arrival queue's, handed in by the composition in `lib.rs`).
    pub pending: Option<Pending>,
}

/// Runs an accept loop on `listener` until `shutdown` turns true, then drains.
pub async fn serve<S, F>(
    listener: TcpListener,
    handler: S,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let ConnLimits { header_timeout, grace, max_connections, send_timeout } = limits;
    let graceful = GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // What a connection may hold in its write queue (and the longest request head): hyper asks
    // a streamed body for its next chunk only below this, so a viewer who reads slowly holds
    // at most this plus one chunk (`response::DISK_CHUNK`), not hyper's default 408 KiB.
    builder.max_buf_size(CONNECTION_BUFFER);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    tokio::spawn(refuse_overloaded(stream));
                    continue;
                };
                let handler = handler.clone();
                // What this connection may send from files: its handlers reach it through
                // `sendfile::current` (the connection's task runs in its scope).
                let offers = Arc::new(sendfile::Offers::default());
                let io = SendDeadline::new(sendfile::Conn::new(stream, offers.clone()), send_timeout);
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let conn = builder.serve_connection(io, service);
                let conn = graceful.watch(conn);
                tokio::spawn(sendfile::scope(offers, async move {
                    let _ = conn.await;
                    drop(permit);
                }));
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => tracing::warn!("shutdown grace period over; closing connections"),
    }
}

/// Bytes a connection buffers at most, each way (see [`serve`]).
pub const CONNECTION_BUFFER: usize = 64 * 1024;

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Longest time a client may take to send its request headers (slowloris guard).
    pub header_timeout: Duration,
    /// How long in-flight connections may finish after shutdown begins.
    pub grace: Duration,
    /// Open connections at most; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Longest time a write may wait on a viewer who stopped reading.
    pub send_timeout: Duration,
}

/// A connection whose writes fail once one has waited `limit` without progress: a viewer who
/// stops reading (a zero TCP window) is disconnected instead of holding a connection and its
/// response forever. The clock restarts at every write that makes progress.
struct SendDeadline<T> {
    inner: T,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> SendDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Self { inner, limit, stalled: None }
    }

    /// Turns a pending write into an error once it has been pending for `limit`.
    fn watch<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::task::Poll;
        match poll {
            Poll::Pending => {
                let limit = self.limit;
                let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "viewer stopped reading",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for SendDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for SendDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers a connection over `server.max_connections` with a fixed 503 and closes it, without
/// reading its request: cheap enough to do under a flood.
async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
        cache-control: no-store\r\nretry-after: 1\r\nconnection: close\r\n\
        content-length: 29\r\n\r\noverloaded, try again later\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BODY)).await;
    let _ = stream.shutdown().await;
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Handles one viewer request.
/// Generic over the request body, which is never read: benches call it without a socket.
pub async fn handle_public<B>(public: Arc<Public>, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let span = traces::request(req.method());
    // Traced, the request's future is boxed: one level more would be deeper than the
    // compiler lays out, and untraced requests need no allocation.
    let (route, result) = match span.is_disabled() {
        true => route(&public, &req).await,
        false => Box::pin(route(&public, &req).instrument(span.clone())).await,
    };
    let proxy = &public.proxy;
    let (response, cache, sent) = match result {
        Ok((response, cache, sent)) => (response, cache, sent),
        Err((e, cache)) => {
            log_error(&e, route, cache);
            (response::error(&e), cache, 0)
        }
    };
    proxy.metrics().cache_result(cache);
    proxy.metrics().bytes_served.inc_by(sent);
    let status = response.status().as_u16();
    proxy.metrics().requests.get_or_create(&RequestLabels { route, status }).inc();
    traces::answered(&span, route, status, cache.as_str());
    tracing::debug!(
        route,
        status,
        cache = cache.as_str(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}

type Routed = Result<(Response<Body>, CacheStatus, u64), (ProxyError, CacheStatus)>;

/// What a request path names, once its scheme has verified it.
enum Target {
    Request(ProxyRequest),
    /// Akkoma URL with the wrong filename: 301 to the canonical one.
    Redirect(String),
    Misskey(api::misskey::MisskeyRequest),
}

async fn route<B>(public: &Public, req: &Request<B>) -> (&'static str, Routed) {
    let bypass = |e| Err((e, CacheStatus::Bypass));
    let (path, query) = (req.uri().path(), req.uri().query());
    // Measured without formatting the URI: this runs on every request.
    let uri = req.uri();
    let target_len = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if target_len > MAX_URI_LEN {
        return ("none", bypass(ProxyError::UriTooLong));
    }
    let compat = &public.proxy.config().compat;
    let upstreams = public.proxy.upstreams();
    let host = || {
        let header = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
        header.or(req.uri().host())
    };
    let upstream = |named_only| match upstreams.is_empty() {
        true => None,
        false => upstreams.route(host(), path, named_only),
    };
    let as_request = |source| Target::Request(ProxyRequest::new(source, None));
    let (route, parsed) = if let Some(named) = upstream(true) {
        ("upstream", named.map(as_request))
    } else if path.starts_with(api::native::PREFIX) {
        ("native", public.native.parse(path, &public.signer).map(Target::Request))
    } else if path.starts_with(api::camo::PREFIX) && !compat.camo_key.is_empty() {
        let key = compat.camo_key.as_bytes();
        ("camo", api::camo::parse(path, query, key).map(Target::Request))
    } else if compat.misskey && api::misskey::matches(path, query) {
        ("misskey", api::misskey::parse(path, query).map(Target::Misskey))
    } else if path.starts_with(api::akkoma::PREFIX) && !compat.akkoma_secret.is_empty() {
        let (key, preview) = (compat.akkoma_secret.as_bytes(), &compat.akkoma_preview_variant);
        let parsed = api::akkoma::parse(path, key, preview).map(|p| match p {
            api::akkoma::Parsed::Request(r) => Target::Request(r),
            api::akkoma::Parsed::Redirect(location) => Target::Redirect(location),
        });
        ("akkoma", parsed)
    } else if let Some(any) = upstream(false) {
        ("upstream", any.map(as_request))
    } else {
        return ("none", bypass(ProxyError::NoRoute));
    };
    if req.method().as_str() == "PURGE" && route == "akkoma" && !compat.purge_token.is_empty() {
        return (route, purge(public, parsed, req).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return (route, bypass(ProxyError::MethodNotAllowed));
    }
    if let Some(answer) = pending_view(public, &parsed).await {
        return (route, Ok(answer));
    }
    match parsed {
        Err(e) => (route, bypass(e)),
        Ok(Target::Request(request)) if route == "akkoma" && request.variant.is_some() => {
            (route, serve_akkoma_preview(public, &request, req).await)
        }
        Ok(Target::Request(request)) => (route, serve_request(&public.proxy, &request, req).await),
        Ok(Target::Redirect(location)) => {
            (route, Ok((response::redirect(&location), CacheStatus::Bypass, 0)))
        }
        Ok(Target::Misskey(m)) => {
            let result = match misskey_allowed(public, &m.request).await {
                Ok(()) => serve_misskey(public, &m, req).await,
                Err(e) => Err(e),
            };
            match result {
                Err(_) if m.fallback => {
                    let placeholder = response::placeholder(api::misskey::placeholder_png());
                    (route, Ok((placeholder, CacheStatus::Bypass, 0)))
                }
                other => (route, other),
            }
        }
    }
}

/// Queues a request (and its cache key) for a fetch at a random later moment.
pub type Pending = Arc<dyn Fn(ProxyRequest, crate::cache::Key) + Send + Sync>;

/// With `policy.view_fetch = "never"`: a view of a file not cached (its original, for a
/// rendition) does not fetch it. It is queued for a fetch at a random moment within the
/// feeds' delay, and the viewer gets a 1×1 transparent placeholder (Misskey's `fallback`
/// image), not to be cached, marked `X-Parasol-Pending: 1`. Refusals (a blocked domain, a
/// ban) are answered as usual by the normal path.
async fn pending_view(
    public: &Public,
    parsed: &Result<Target, ProxyError>,
) -> Option<(Response<Body>, CacheStatus, u64)> {
    let pending = public.pending.as_ref()?;
    let request = match parsed {
        Ok(Target::Request(request)) => request,
        Ok(Target::Misskey(m)) => &m.request,
        _ => return None,
    };
    let proxy = &public.proxy;
    if proxy.is_cached(&request.original()).await {
        return None;
    }
    proxy.check_request(request).await.ok()?;
    pending(request.clone(), proxy.key_of(request));
    let mut response = response::placeholder(api::misskey::placeholder_png());
    let h = response.headers_mut();
    h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    h.insert("x-parasol-pending", http::HeaderValue::from_static("1"));
    Some((response, CacheStatus::Bypass, 0))
}

/// The unsigned Misskey route may cause at most `compat.misskey_fills_per_minute` origin
/// fills per source origin (and all unsigned routes `compat.unsigned_fills_per_minute`); what
/// is already cached is always served.
async fn misskey_allowed(
    public: &Public,
    request: &ProxyRequest,
) -> Result<(), (ProxyError, CacheStatus)> {
    unsigned_allowed(&public.proxy, &public.unsigned, &public.unsigned.misskey, request).await
}

/// Whether an unsigned route may fill `request`: it is cached, or `route`'s allowance for its
/// origin and the one of all unsigned fills have room.
async fn unsigned_allowed(
    proxy: &Proxy,
    unsigned: &crate::api::rate::Unsigned,
    route: &crate::api::rate::DomainRate,
    request: &ProxyRequest,
) -> Result<(), (ProxyError, CacheStatus)> {
    if proxy.is_cached(&request.original()).await {
        return Ok(());
    }
    let host = request.source.host_str().unwrap_or_default();
    match unsigned.allow(route, host) {
        true => Ok(()),
        false => Err((ProxyError::Overloaded, CacheStatus::Bypass)),
    }
}

/// As Misskey's proxy: a flag on a file it cannot make a picture of (a video, audio, a type
/// no decoder here reads) is 404, `thumbnail` takes videos too; the response names the file.
async fn serve_misskey<B>(
    public: &Public,
    m: &api::misskey::MisskeyRequest,
    req: &Request<B>,
) -> Routed {
    if let Some(name) = &m.request.variant {
        let original = m.request.original();
        let (entry, cache) = public.proxy.get(&original, Trigger::View).await?;
        let content_type = entry.content_type.to_str().unwrap_or_default();
        let video = name == "thumbnail" && content_type.starts_with("video/");
        if !video && !public.proxy.media().can_render(content_type) {
            return Err((ProxyError::NoRendition("not a picture".into()), cache));
        }
    }
    let (mut response, cache, sent) = serve_request(&public.proxy, &m.request, req).await?;
    let served = response.headers().get(http::header::CONTENT_TYPE).cloned();
    let served = served.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
    let disposition = api::content_disposition(&m.filename, served);
    if let Ok(value) = http::HeaderValue::from_str(&disposition) {
        response.headers_mut().insert(http::header::CONTENT_DISPOSITION, value);
    }
    Ok((response, cache, sent))
}

/// Akkoma's cache invalidation (`Pleroma.Web.MediaProxy.Invalidation.Http`): `PURGE` of a
/// proxied URL (plain or preview), with the configured token, drops the file and every
/// rendition of it from memory and disk, and forgets a remembered failure. The signature
/// is checked as for a view, the token in constant time.
async fn purge<B>(public: &Public, parsed: Result<Target, ProxyError>, req: &Request<B>) -> Routed {
    let refused = |e| Err((e, CacheStatus::Bypass));
    if !crate::signing::bearer_matches(req.headers(), &public.proxy.config().compat.purge_token) {
        return refused(ProxyError::BadSignature);
    }
    let source = match parsed {
        Ok(Target::Request(request)) => request.source,
        // The filename segment does not matter for a purge.
        Ok(Target::Redirect(location)) => {
            let key = public.proxy.config().compat.akkoma_secret.as_bytes();
            match api::akkoma::parse(&location, key, "") {
                Ok(api::akkoma::Parsed::Request(request)) => request.source,
                _ => return refused(ProxyError::BadUrl("not an Akkoma URL")),
            }
        }
        Ok(Target::Misskey(_)) => return refused(ProxyError::BadUrl("not an Akkoma URL")),
        Err(e) => return refused(e),
    };
    let report = public.proxy.purge_url(&source).await.map_err(|e| (e, CacheStatus::Bypass))?;
    tracing::info!(entries = report.entries, bytes = report.bytes, "purged by PURGE");
    let body = serde_json::json!({ "purged": report }).to_string() + "\n";
    let mut response = http::Response::new(response::full(body));
    let h = response.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    Ok((response, CacheStatus::Bypass, 0))
}

/// Akkoma's preview names what it serves as Akkoma does: `preview.jpg`, `preview.png`, ...
/// (the original's own name when the preset kept the original).
async fn serve_akkoma_preview<B>(
    public: &Public,
    request: &ProxyRequest,
    req: &Request<B>,
) -> Routed {
    let (mut response, cache, sent) = serve_request(&public.proxy, request, req).await?;
    let served = response.headers().get(http::header::CONTENT_TYPE).cloned();
    let served = served.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
    let renditions = ["image/jpeg", "image/png", "image/webp"];
    let name = match renditions.contains(&served) {
        true => "preview".to_string(),
        false => api::akkoma::basename(&request.source),
    };
    let disposition = api::content_disposition(&name, served);
    if let Ok(value) = http::HeaderValue::from_str(&disposition) {
        response.headers_mut().insert(http::header::CONTENT_DISPOSITION, value);
    }
    Ok((response, cache, sent))
}

/// Serves a viewer's `request` and counts it in its origin's line of the ledger.
async fn serve_request<B>(proxy: &Arc<Proxy>, request: &ProxyRequest, req: &Request<B>) -> Routed {
    serve_request_as(proxy, request, req, Trigger::View).await
}

/// [`serve_request`], a fill it causes recorded as `trigger`.
async fn serve_request_as<B>(
    proxy: &Arc<Proxy>,
    request: &ProxyRequest,
    req: &Request<B>,
    trigger: Trigger,
) -> Routed {
    let routed = find_and_serve(proxy, request, req, trigger).await;
    let (hit, sent) = match &routed {
        Ok((_, cache, sent)) => (
            matches!(cache, CacheStatus::HitMemory | CacheStatus::HitDisk | CacheStatus::HitShared),
            *sent,
        ),
        Err(_) => (false, 0),
    };
    proxy.ledger().viewed(request.source.host_str().unwrap_or_default(), hit, sent);
    routed
}

async fn find_and_serve<B>(
    proxy: &Arc<Proxy>,
    request: &ProxyRequest,
    req: &Request<B>,
    trigger: Trigger,
) -> Routed {
    let (entry, cache) = match &request.variant {
        Some(name) => proxy.get_variant(request, name, trigger).await?,
        None => match proxy.get_streaming(request, trigger).await? {
            crate::proxy::Found::Entry(entry, cache) => (entry, cache),
            // Still arriving, of unknown length, to a viewer whose framing cannot say that a
            // body ended broken (HTTP/1.0: the end of the connection is the end of the body,
            // and nginx's proxy_pass speaks HTTP/1.0 unless told otherwise): it waits for the
            // stored entry, and gets it whole with a Content-Length, or an error.
            crate::proxy::Found::Growing(growing, _)
                if growing.len.is_none() && req.version() < http::Version::HTTP_11 =>
            {
                proxy.get(request, trigger).await?
            }
            // Still arriving: read as it does.
            crate::proxy::Found::Growing(growing, cache) => {
                // Its bytes are counted as they go.
                let served = proxy.metrics().bytes_served.clone();
                let origin = proxy.ledger().of_host(request.source.host_str().unwrap_or_default());
                let count = move |n| {
                    served.inc_by(n);
                    origin.served(n);
                };
                let response = response::serve_growing(growing, req.method(), req.headers(), count);
                return Ok((response, cache, 0));
            }
        },
    };
    respond(proxy, &entry, cache, req).await
}

/// The response for a found `entry`; a blob found gone or resized meanwhile is forgotten, so
/// the next request refills it.
async fn respond<B>(
    proxy: &Proxy,
    entry: &crate::cache::Entry,
    cache: CacheStatus,
    req: &Request<B>,
) -> Routed {
    let conn = sendfile::current();
    if let Some(conn) = &conn {
        conn.count_into(&proxy.metrics().bytes_sent_from_file);
    }
    let (method, headers) = (req.method(), req.headers());
    match proxy.respond(entry, method, headers, conn.as_ref()).await {
        Ok((response, sent)) => Ok((response, cache, sent)),
        Err(e) => Err((e, cache)),
    }
}

/// State of the pict-rs listener (`compat.pictrs_listen`).
pub struct Pictrs {
    /// The request lifecycle behind every route.
    pub proxy: Arc<Proxy>,
    /// The unsigned routes' fill allowances (shared with the Misskey route).
    pub unsigned: Arc<crate::api::rate::Unsigned>,
    /// Details by the file's blake3, with when they were first measured: Lemmy asks once per
    /// post, and a measure is a media job.
    details: moka::future::Cache<blake3::Hash, Arc<serde_json::Value>>,
}

impl Pictrs {
    /// The state of a pict-rs listener over `proxy`, with the unsigned routes' allowances.
    pub fn new(proxy: Arc<Proxy>, unsigned: Arc<crate::api::rate::Unsigned>) -> Self {
        Self { proxy, unsigned, details: moka::future::Cache::new(10_000) }
    }
}

/// Handles one request on the pict-rs listener ([`api::pictrs`]).
pub async fn handle_pictrs<B>(state: Arc<Pictrs>, req: Request<B>) -> Response<Body> {
    let proxy = &state.proxy;
    let span = traces::request(req.method());
    let secret = &proxy.config().compat.pictrs_secret;
    let guarded = secret.is_empty() || {
        let sent = req.headers().get("x-parasol-secret").map_or(&b""[..], |v| v.as_bytes());
        crate::signing::secret_matches(sent, secret)
    };
    let result = match req.method() == Method::GET || req.method() == Method::HEAD {
        _ if !guarded => Err((ProxyError::BadSignature, CacheStatus::Bypass)),
        false => Err((ProxyError::MethodNotAllowed, CacheStatus::Bypass)),
        true => {
            let max = proxy.config().compat.pictrs_max_thumbnail;
            match api::pictrs::parse(req.uri().path(), req.uri().query(), max) {
                Err(e) => Err((e, CacheStatus::Bypass)),
                Ok(parsed) if span.is_disabled() => serve_pictrs(&state, parsed, &req).await,
                Ok(parsed) => {
                    Box::pin(serve_pictrs(&state, parsed, &req).instrument(span.clone())).await
                }
            }
        }
    };
    let (response, cache, sent) = match result {
        Ok(done) => done,
        Err((e, cache)) => {
            log_error(&e, "pictrs", cache);
            let status = e.to_viewer().status();
            (response::json(status, api::pictrs::error_body(&e)), cache, 0)
        }
    };
    // Every error of the pict-rs API is its JSON, a range it cannot satisfy too (its
    // Content-Range kept).
    let response = match response.status() {
        http::StatusCode::RANGE_NOT_SATISFIABLE => {
            let body = "{\"msg\":\"range not satisfiable\",\"code\":\"range_not_satisfiable\"}\n";
            let mut json = response::json(http::StatusCode::RANGE_NOT_SATISFIABLE, body.into());
            if let Some(range) = response.headers().get(http::header::CONTENT_RANGE) {
                json.headers_mut().insert(http::header::CONTENT_RANGE, range.clone());
            }
            json
        }
        _ => response,
    };
    proxy.metrics().cache_result(cache);
    proxy.metrics().bytes_served.inc_by(sent);
    let status = response.status().as_u16();
    proxy.metrics().requests.get_or_create(&RequestLabels { route: "pictrs", status }).inc();
    traces::answered(&span, "pictrs", status, cache.as_str());
    response
}

async fn serve_pictrs<B>(
    state: &Pictrs,
    parsed: api::pictrs::PictrsRequest,
    req: &Request<B>,
) -> Routed {
    use api::pictrs::PictrsRequest;
    let proxy = &state.proxy;
    let original = |source| ProxyRequest::new(source, None);
    // Unsigned: fills count against the pict-rs allowance of their origin.
    let allowed = |source: &url::Url| {
        let request = original(source.clone());
        async move {
            let unsigned = &state.unsigned;
            unsigned_allowed(proxy, unsigned, &unsigned.pictrs, &request).await
        }
    };
    match &parsed {
        PictrsRequest::Original(source)
        | PictrsRequest::Process(source, _)
        | PictrsRequest::Details(source) => allowed(source).await?,
        PictrsRequest::Healthz => {}
    }
    match parsed {
        PictrsRequest::Healthz => {
            Ok((response::json(http::StatusCode::OK, "{}\n".into()), CacheStatus::Bypass, 0))
        }
        // Lemmy asks for the `original` and `details` of every image as a post is received
        // (LemmyNet/lemmy `crates/api/api_utils/src/utils.rs`, `proxy_image_link_internal`),
        // itself; a viewer's request it relays carries the X-Forwarded-For it adds
        // (`crates/routes/src/images/download.rs`), which the recipe in front of parasol
        // turns into `X-Parasol-Viewer: 1`. Lemmy's own are arrivals, recorded so.
        PictrsRequest::Original(source)
            if !req.headers().contains_key("x-forwarded-for")
                && !req.headers().contains_key("x-parasol-viewer") =>
        {
            let arrival = Trigger::Arrival { delay_ms: 0 };
            serve_request_as(proxy, &original(source), req, arrival).await
        }
        PictrsRequest::Original(source) => serve_request(proxy, &original(source), req).await,
        PictrsRequest::Process(source, rendition) => {
            let name = rendition.name();
            let request = ProxyRequest::new(source, Some(name.clone()));
            let (entry, cache) =
                proxy.get_rendition(&request, &name, rendition.spec(), Trigger::View).await?;
            respond(proxy, &entry, cache, req).await
        }
        PictrsRequest::Details(source) => pictrs_details(state, source).await,
    }
}

/// pict-rs's `details` of `source`: what Lemmy asks as a post arrives (fetched as an arrival),
/// measured once per file.
async fn pictrs_details(state: &Pictrs, source: url::Url) -> Routed {
    let proxy = &state.proxy;
    let original = |source| ProxyRequest::new(source, None);
    let host = source.host_str().unwrap_or_default().to_string();
    let arrival = Trigger::Arrival { delay_ms: 0 };
    let (entry, cache) = proxy.get(&original(source), arrival).await?;
    let content_type = entry.content_type.to_str().unwrap_or_default().to_string();
    if !content_type.starts_with("video/") && !proxy.media().can_render(&content_type) {
        return Err((ProxyError::NoRendition("not a picture".into()), cache));
    }
    let measured = state
        .details
        .try_get_with(entry.hash, async {
            let d = proxy.media().measure(&entry, &host).await?;
            let format = match (content_type.starts_with("video/"), d.frames) {
                (true, _) => "Video",
                (false, Some(_)) => "Animation",
                (false, None) => "Image",
            };
            let created_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            Ok::<_, ProxyError>(Arc::new(serde_json::json!({
                "width": d.width,
                "height": d.height,
                "frames": d.frames,
                "content_type": content_type,
                "created_at": created_at.to_string(),
                "format": format,
                "blurhash": d.blurhash,
            })))
        })
        .await
        .map_err(|e| ((*e).clone(), cache))?;
    let body = measured.to_string() + "\n";
    Ok((response::json(http::StatusCode::OK, body), cache, 0))
}

fn log_error(e: &ProxyError, route: &str, cache: CacheStatus) {
    match e.cause() {
        crate::error::Cause::Us => {
            tracing::error!(route, code = e.code(), cache = cache.as_str(), detail = %e, "request failed")
        }
        cause => tracing::debug!(
            route,
            code = e.code(),
            cause = cause.as_str(),
            cache = cache.as_str(),
            "request refused"
        ),
    }
}
