//! Test harness: a recording hyper origin on 127.0.0.x, an in-process parasol on port 0, a
//! viewer client, and generated media.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parasol::Config;
use parasol::fetch::guard::{Lookup, StaticLookup};
use parasol::signing::Signer;
use tokio::net::TcpListener;

/// Signing key used by every in-process test parasol.
pub const KEY: &str = "test-key-0123456789-0123456789-0123456789";

/// Bearer token of the admin API in every test config.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// What the origin answers on one path.
#[derive(Clone)]
pub struct Route {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Wait before answering: makes concurrent viewers overlap one fill.
    pub delay: Duration,
}

impl Route {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self { status: 200, headers: vec![], body: body.into(), delay: Duration::ZERO }
    }
    pub fn status(status: u16) -> Self {
        Self { status, headers: vec![], body: Bytes::from_static(b"nope"), delay: Duration::ZERO }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    /// The query string, when there was one.
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct OriginState {
    routes: Mutex<HashMap<String, Route>>,
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A real HTTP/1.1 origin on a loopback address, recording every request.
pub struct Origin {
    pub addr: SocketAddr,
    state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Starts an origin on `ip` (one of 127.0.0.2–127.0.0.254), port 0.
    pub async fn start(ip: &str) -> Origin {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind test origin");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(OriginState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, state, task }
    }

    pub fn route(&self, path: &str, route: Route) {
        self.state.routes.lock().unwrap().insert(path.into(), route);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received for `path`.
    pub fn hits(&self, path: &str) -> usize {
        self.state.seen.lock().unwrap().iter().filter(|s| s.path == path).count()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Most requests this origin was answering at the same moment.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted, whatever was sent on them.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn answer(
    st: Arc<OriginState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    st.seen.lock().unwrap().push(Seen {
        path: path.clone(),
        query,
        headers: req.headers().clone(),
        at: std::time::Instant::now(),
    });
    let route = st.routes.lock().unwrap().get(&path).cloned().unwrap_or(Route::status(404));
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut response = Response::new(Full::new(route.body.clone()));
    *response.status_mut() = http::StatusCode::from_u16(route.status).unwrap();
    for (k, v) in &route.headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    Ok(response)
}

/// A config for an in-process parasol: ports 0, cache in `dir`, origins on `allow` reachable.
pub fn config(dir: &Path, allow: &[&str]) -> Config {
    Config::from_sources("test", &config_toml(dir, allow, ""), std::iter::empty())
        .expect("test config is valid")
}

/// `cfg` with a file per blob (`cache.segment_max_object_bytes = 0`; by default small files go
/// into segment files): for tests of what the file layout promises, whose blob files they
/// alter, count or watch.
pub fn file_each(mut cfg: Config) -> Config {
    cfg.cache.segment_max_object_bytes = parasol::config::Size(0);
    cfg
}

/// How long the tests' media jobs may wait for a worker (`media.queue_wait`): the tests of a
/// run share two cores, and one origin's jobs run one at a time, so on a machine busy beside
/// them (a build) a job can wait far longer than the default's 10 s without anything wrong.
pub const QUEUE_WAIT: Duration = Duration::from_secs(120);

/// The TOML behind [`config`], with `extra` appended (further sections).
pub fn config_toml(dir: &Path, allow: &[&str], extra: &str) -> String {
    let allow = allow.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    let toml = format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        shutdown_grace = "2s"
        admin_token = "{ADMIN_TOKEN}"
        [signing]
        keys = ["{KEY}"]
        [cache]
        dir = "{}"
        fsync = false
        [fetch]
        allow_networks = [{allow}]
        timeout = "5s"
        {extra}
        "#,
        dir.display()
    );
    toml
}

/// The options of an in-process parasol: its media workers are the built `parasol` binary
/// (the test binary itself cannot be one).
pub fn options(lookup: Arc<dyn Lookup>, config_path: Option<PathBuf>) -> parasol::Options {
    parasol::Options {
        lookup: Some(lookup),
        config_path,
        worker_exe: env!("CARGO_BIN_EXE_parasol").into(),
    }
}

/// An in-process parasol on loopback, port 0.
pub struct Parasol {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The pict-rs API's address, when `compat.pictrs_listen` is set.
    pub pictrs: Option<SocketAddr>,
    pub dir: PathBuf,
    /// Its state, not kept alive by the test (a stopped parasol closes its stores).
    proxy: std::sync::Weak<parasol::proxy::Proxy>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Parasol {
    pub async fn start(config: Config) -> Parasol {
        Self::start_with(config, StaticLookup::default()).await
    }

    /// Starts with a fixed name table, so `*.test` names resolve without DNS.
    pub async fn start_with(config: Config, lookup: StaticLookup) -> Parasol {
        let lookup: Arc<dyn Lookup> = Arc::new(lookup);
        Self::start_opts(config, options(lookup, None)).await
    }

    /// Media jobs may wait [`QUEUE_WAIT`] for a worker, unless the test set a wait of its own.
    pub async fn start_opts(mut config: Config, options: parasol::Options) -> Parasol {
        if config.media.queue_wait.0 == parasol::config::MediaConfig::default().queue_wait.0 {
            config.media.queue_wait = parasol::config::Dur(QUEUE_WAIT);
        }
        let dir = config.cache.dir.clone();
        let bound = parasol::Bound::bind(config, options).await.expect("parasol binds");
        let (public, admin, pictrs) =
            (bound.public_addr(), bound.admin_addr(), bound.pictrs_addr());
        let proxy = Arc::downgrade(&bound.public_state().proxy);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        Parasol { public, admin, pictrs, dir, proxy, stop: Some(tx), task }
    }

    /// The signed native URL for `source`.
    pub fn url(&self, source: &str) -> String {
        signed_url(self.public, source)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        get(&self.admin_url("/metrics")).await.text().await.unwrap()
    }

    /// The value of the first `/metrics` line starting with `prefix`, or 0.
    pub async fn metric(&self, prefix: &str) -> u64 {
        metric_at(self.admin, prefix).await
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Graceful shutdown; returns once the stores are closed and can be reopened.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("parasol task ends cleanly");
    }

    /// Blobs currently in the disk store: blob files, and blobs kept in segment files.
    pub fn blob_count(&self) -> usize {
        let proxy = self.proxy.upgrade().expect("blobs are counted while parasol runs");
        files_under(&self.dir.join("blobs")) + proxy.segment_blobs()
    }
}

/// The value of the first `/metrics` line starting with `prefix` of the parasol whose admin
/// listener is `admin`, or 0.
pub async fn metric_at(admin: SocketAddr, prefix: &str) -> u64 {
    let text = get(&format!("http://{admin}/metrics")).await.text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(prefix));
    let value = line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok());
    value.map_or(0, |v| v as u64)
}

/// The native URL for `source` on a parasol listening at `public`, signed with [`KEY`].
pub fn signed_url(public: SocketAddr, source: &str) -> String {
    let base = url::Url::parse(&format!("http://{public}/")).unwrap();
    parasol::api::native::sign_url(&base, &Signer::new([KEY]), source, None)
}

pub fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries.flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum()
}

/// A viewer: a plain HTTP client that never goes through a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub async fn get(url: &str) -> reqwest::Response {
    client().get(url).send().await.expect("request reaches parasol")
}

/// `n` bytes that sniff as PNG (signature and IHDR), the rest deterministic noise from `seed`.
pub fn png_bytes(n: usize, seed: u64) -> Bytes {
    let mut out = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    Bytes::from(out)
}

/// blake3 hex of `body`, as parasol's ETag should carry it.
pub fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", blake3::hash(body).to_hex())
}

pub async fn body(response: reqwest::Response) -> Bytes {
    response.bytes().await.expect("body arrives")
}

/// Waits (bounded) until `check` holds; for effects written by another task, such as the
/// audit log. Returns whether it held.
pub async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// [`eventually`] for a check that needs to await.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    mut check: impl FnMut() -> F,
) -> bool {
    for _ in 0..200 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Runs `attempt` until one begins and ends within one wall-clock minute (three tries at
/// most), and returns what it found: fill allowances count per clock minute, so a run that
/// straddles two minutes sees two allowances. Each attempt must start from fresh state (a
/// parasol of its own).
pub async fn within_one_minute<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let minute = || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.unwrap().as_secs() / 60
    };
    for _ in 0..3 {
        let started = minute();
        let found = attempt().await;
        if minute() == started {
            return found;
        }
    }
    panic!("three tries, each across the turn of a minute");
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
