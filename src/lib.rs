//! parasol: a caching media proxy for Fediverse instances.
//!
//! An instance rewrites remote media URLs to signed parasol URLs. parasol fetches each remote
//! file once, stores it content-addressed (blake3) in memory and on disk, and serves it to the
//! instance's viewers. The origin sees parasol's address and a fixed User-Agent at the time
//! parasol chose to fetch; never a viewer's address, browser, cookies, language or time.
//!
//! # Rooms
//! Each module owns its state; a module calls only those listed after it (the layers run
//! one way: no module calls back up).
//!
//! | room | owns | calls |
//! |---|---|---|
//! | [`feed`] | the instances' timelines followed, the arrival queue and its fetcher (`lib.rs` hands the server a closure into the queue for `view_fetch = "never"`) | `proxy`, `api`, `signing` |
//! | [`server`], [`admin`] | listeners, connections, routing, the admin API (and its client for `parasol usage` and `lookup`) | `proxy`, `api`, `response`, `ledger` |
//! | [`proxy`] | the request lifecycle: the negative cache, the newest expiring URL of an entry (an expired one is not fetched), whether a fill is kept (pinned) or only streamed by its origin's rule, the ledger's handle; one room per source and job: `proxy/sources.rs` (the origin, the shared bucket), `proxy/prepare.rs` (media work) | `moderation`, `cache`, `fetch`, `media`, `api`, `ledger` |
//! | [`moderation`] | bans, hash lists, the scanner, the moderation log; checks at each checkpoint (request, fill, hit) | `cache`, `media` (an input for the scanner) |
//! | [`api`] | URL schemes → [`api::ProxyRequest`] with its canonical URL; the unsigned routes' allowances | `signing`, `policy` |
//! | [`media`] | the worker pool ([`media::worker`]: fair queue, processes, sandbox, tools) and what runs inside a worker | `cache` (sinks, inputs) |
//! | [`response`] | 200/206/304/416 and error responses from an entry | `cache` |
//! | [`fetch`] | the origin client: guard, peer check, fill slots (per-rule concurrency and pace), backoff from hosts that asked or keep failing, name resolution | `audit`, `policy`, `ledger` |
//! | [`cache`] | the store ([`cache::store::Store`]: memory tier, blobs, redb index, S3-FIFO budget, its own upkeep), the shared bucket's client ([`cache::shared`], handed to the proxy's bucket source and to moderation), coalescing of fills ([`cache::coalesce`]), bodies on their way in, digests | `telemetry`, `error` |
//! | [`policy`], [`ledger`], [`signing`], [`config`], [`telemetry`], [`audit`], [`error`] | leaves: domain policy, origins and their `[[policy.origin]]` rules, what each origin costs, HMAC, configuration by section, metrics and traces ([`telemetry::traces`]), the outbound log, the one error | — |
//!
//! # Request lifecycle
//! Hit: route → verify signature → canonical source URL and key (once) → moderation's check
//! of the URL → memory → moderation's check of the hit → response, whose headers were built
//! once when the entry was filled.
//!
//! Miss: one leader task per key ([`cache::coalesce`]), spawned so that a viewer who
//! disconnects cancels nothing: disk index → shared bucket → guarded fetch from the origin,
//! streamed to memory or a temp file while hashing, sniffing and counting → the fill slot
//! goes back → moderation's check of the origin's bytes → a media worker rasterises SVG and
//! finds the metadata to cut → moderation's check of the bytes to serve (the scanner) →
//! admit to the disk budget → rename into place → index → evict what the budget no longer
//! holds → publish to every waiting viewer (and to the shared bucket). A large original that
//! passes through unchanged is published to its waiters as soon as its type is sniffed and
//! read from the temp file as it grows ([`cache::growing`]). A variant is a second fill keyed
//! by the original's content: the original's bytes go to a worker, the rendition comes back.
//!
//! Background: at start the budget is rebuilt from the index; the store's own task reconciles
//! it with the blob files, drops idle blobs (retention) and re-hashes large blobs daily.

// One exception, with its measurement: the media worker's allocator tuning (`mallopt`, in
// `media/worker/child.rs`). Everything else is safe code.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod cache;
pub mod config;
pub mod error;
pub mod feed;
pub mod fetch;
pub mod ledger;
pub mod media;
pub mod moderation;
pub mod policy;
pub mod proxy;
pub mod response;
pub mod server;
pub mod signing;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
use fetch::guard::Lookup;

/// Why parasol could not start. Printed by `main` and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why it could not be bound.
        source: std::io::Error,
    },
    /// The cache directory could not be made or opened.
    #[error("cache directory {path}: {source}")]
    CacheDir {
        /// The directory.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The signing key could not be read or generated.
    #[error("signing key: {0}")]
    Key(std::io::Error),
    /// The index could not be opened.
    #[error("{0}")]
    Index(#[from] cache::index::IndexError),
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The log's file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// Something configured could not be set up (a bucket, a resolver, the scanner).
    #[error("{0}")]
    Setup(error::ProxyError),
    /// The media workers could not be started or sandboxed.
    #[error("media worker: {0}")]
    Media(error::ProxyError),
}

/// Hooks for embedding and tests; the defaults are what the binary uses.
#[derive(Clone)]
pub struct Options {
    /// Name resolution for origins; `None` is the built-in asynchronous resolver
    /// ([`fetch::dns`]). Tests map `*.test` names to loopback origins here.
    pub lookup: Option<Arc<dyn Lookup>>,
    /// The config file to re-read on reload (SIGHUP, `POST /admin/reload`); `None` repeats
    /// the default lookup (`config/parasol.toml` when present).
    pub config_path: Option<std::path::PathBuf>,
    /// The `parasol` binary started as the media workers. The binary itself by default
    /// (`/proc/self/exe`, which stays the running version across an upgrade on disk); a test
    /// or an embedding program names the built `parasol` binary here.
    pub worker_exe: std::path::PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lookup: None,
            config_path: None,
            worker_exe: std::path::PathBuf::from("/proc/self/exe"),
        }
    }
}

/// The media worker pool `config` asks for, starting `exe` as its workers.
pub fn media_pool(
    config: &Config,
    exe: std::path::PathBuf,
    metrics: &telemetry::Metrics,
) -> media::worker::MediaPool {
    let m = &config.media;
    let pool = media::worker::PoolConfig {
        exe,
        shares: media::worker::schedule::Shares {
            workers: m.workers as usize,
            queue: m.queue as usize,
            share: m.origin_share,
            wait: m.queue_wait.0,
        },
        limits: media::worker::Limits {
            memory: m.worker_memory.0,
            // A job's budget is its own (`job_timeout`, or the shorter `svg_timeout`), armed
            // per job; this is the most any job may ask.
            cpu_seconds: m.job_timeout.0.as_secs_f64().ceil().max(1.0) as u64,
            jobs: m.worker_jobs,
        },
        job_timeout: m.job_timeout.0,
        svg_timeout: m.svg_timeout.0,
        max_input: config.cache.max_object_bytes.0,
        ffmpeg: media::worker::tool::locate(&m.ffmpeg),
        heif_convert: media::worker::tool::locate(&m.heif_convert),
    };
    let pool_metrics = media::worker::PoolMetrics {
        jobs: metrics.media_jobs.clone(),
        running: metrics.media_running.clone(),
    };
    media::worker::MediaPool::new(pool, pool_metrics)
}

/// The public, admin and (if set) pict-rs listeners, and the addresses and host name the
/// fetcher must never reach because they are parasol's own.
async fn listeners(
    config: &Config,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>, fetch::OwnEndpoints), StartError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })
    };
    let public = bind(config.server.listen).await?;
    let admin = bind(config.server.admin_listen).await?;
    let pictrs = match config.compat.pictrs_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let own = fetch::OwnEndpoints {
        host: config.server.public_base_url.host_str().map(String::from),
        addrs: [Some(&public), Some(&admin), pictrs.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
    };
    Ok((public, admin, pictrs, own))
}

/// One line per outside program the media workers run: where it is, or what is off
/// without it.
fn log_tools(config: &Config, media: &media::worker::MediaPool) {
    let tools = [
        (
            "ffmpeg",
            media.ffmpeg(),
            &config.media.ffmpeg,
            "video posters; AVIF without heif-convert",
            "ffmpeg",
        ),
        (
            "heif-convert",
            media.heif_convert(),
            &config.media.heif_convert,
            "HEIC; AVIF (else ffmpeg: untiled, opaque only)",
            "libheif-examples",
        ),
    ];
    for (tool, found, configured, renders, package) in tools {
        match found {
            Some(path) => {
                tracing::info!(tool, path = %path.display(), renders, "media tool found")
            }
            None => tracing::warn!(
                tool,
                configured = configured.as_str(),
                renders,
                "media tool not found: these renditions answer 415 (install {package} or set media.{})",
                tool.replace('-', "_")
            ),
        }
    }
}

/// The store `config` asks for, over the opened `disk` and `index`.
fn store(
    config: &Config,
    disk: cache::disk::BlobStore,
    index: cache::index::Index,
    metrics: &telemetry::Metrics,
) -> cache::store::Store {
    let store_config = cache::store::StoreConfig {
        memory_bytes: config.cache.memory_bytes.0,
        memory_max_object_bytes: config.cache.memory_max_object_bytes.0,
        disk_bytes: config.cache.disk_bytes.0,
        fsync: config.cache.fsync,
        inflight_bytes: config.media.inflight_bytes.0,
        pinned_share: config.cache.pinned_share,
        segment_max_object_bytes: (config.cache.segment_max_object_bytes.0)
            .min(config.cache.memory_max_object_bytes.0)
            .min(cache::segments::SEGMENT_BYTES),
    };
    let store_metrics = cache::store::StoreMetrics {
        evictions: metrics.evictions.clone(),
        blobs_dropped: metrics.blobs_dropped.clone(),
    };
    cache::store::Store::new(store_config, disk, index, store_metrics)
}

/// Moderation of `store`, with its bans and hash lists loaded, and (with a shared bucket)
/// kept in step with the other nodes' bans.
async fn moderation(
    config: &Config,
    store: Arc<cache::store::Store>,
    shared: Option<cache::shared::SharedTier>,
    metrics: &telemetry::Metrics,
) -> Result<Arc<moderation::Moderation>, StartError> {
    let scanner = moderation::scanner::Scanner::from_config(&config.moderation).map_err(|e| {
        StartError::Setup(error::ProxyError::internal(format!("moderation.scanner_url: {e}")))
    })?;
    let log = moderation::log::ModerationLog::new(
        config.moderation_log_path(),
        metrics.moderation.clone(),
    );
    let syncs = shared.is_some();
    let moderation = Arc::new(
        moderation::Moderation::new(log, scanner, store)
            .with_shared(shared)
            .with_normalizer(policy::Normalizer::new(&config.policy.normalize)),
    );
    moderation.load(&config.moderation.hash_lists).await.map_err(StartError::Setup)?;
    if syncs {
        let every = config.moderation.sync_interval.0;
        tokio::spawn(moderation::Moderation::sync_bans(Arc::downgrade(&moderation), every));
    }
    Ok(moderation)
}

/// The signing keys in effect: the configured ones, or the key generated once and kept in the
/// cache directory (with a warning, since a key in the cache dir is lost with the cache).
pub fn signing_keys(config: &Config) -> Result<Vec<String>, StartError> {
    if !config.signing.keys.is_empty() {
        return Ok(config.signing.keys.clone());
    }
    let (key, created) =
        signing::load_or_generate_key(&config.cache.dir).map_err(StartError::Key)?;
    let path = signing::generated_key_path(&config.cache.dir);
    tracing::warn!(
        path = %path.display(),
        created,
        "no signing.keys configured: using a generated key kept in the cache directory; \
         set signing.keys to keep URLs valid if the cache is lost"
    );
    Ok(vec![key])
}

/// A proxy with its listeners bound and its stores open, ready to [`serve`](Bound::serve).
pub struct Bound {
    public: TcpListener,
    admin: TcpListener,
    /// The pict-rs API for Lemmy (`compat.pictrs_listen`).
    pictrs: Option<TcpListener>,
    proxy: Arc<proxy::Proxy>,
    /// Ends (`recv` is `None`) once the proxy is dropped, whoever held it last.
    proxy_closed: tokio::sync::mpsc::Receiver<()>,
    /// The unsigned routes' fill allowances, shared by the Misskey route and pict-rs API.
    unsigned: Arc<api::rate::Unsigned>,
    signer: signing::Signer,
    audit_task: tokio::task::JoinHandle<()>,
    config_path: Option<std::path::PathBuf>,
}

impl Bound {
    /// Opens the cache, index and audit log and binds both listeners.
    pub async fn bind(config: Config, options: Options) -> Result<Bound, StartError> {
        let dir = &config.cache.dir;
        let cache_err = |source| StartError::CacheDir { path: dir.display().to_string(), source };
        cache::private_dir(dir).map_err(cache_err)?;
        let signer = signing::Signer::new(signing_keys(&config)?);
        let disk = cache::disk::BlobStore::open(dir, config.cache.fsync).map_err(cache_err)?;
        let index = cache::index::Index::open(&dir.join("index.redb"))?;
        let metrics = telemetry::Metrics::new();
        let rotation = audit::Rotation {
            path: config.audit_path(),
            max_bytes: config.audit.max_bytes.0,
            keep: config.audit.keep,
        };
        let audit_path = rotation.path.display().to_string();
        let (audit, audit_task) =
            audit::AuditLog::start(rotation, metrics.audit_violations.clone())
                .await
                .map_err(|source| StartError::Audit { path: audit_path, source })?;
        let (public, admin, pictrs, own) = listeners(&config).await?;
        let upstreams = api::upstream::Upstreams::new(&config.upstream)
            .await
            .map_err(|e| StartError::Setup(error::ProxyError::internal(e)))?;
        let policy = policy::Policy::new(&config.policy);
        let lookup = match options.lookup {
            Some(lookup) => lookup,
            None => Arc::new(fetch::dns::DnsLookup::new(&config.fetch).map_err(|e| {
                StartError::Setup(error::ProxyError::internal(format!("name resolution: {e}")))
            })?),
        };
        let ledger = Arc::new(ledger::Ledger::default());
        let fetcher = fetch::Fetcher::new(&config.fetch, policy, lookup, audit.clone(), own)
            .map_err(StartError::Setup)?
            .with_ledger(ledger.clone())
            .with_backoff(fetch::backoff::Backoff::new(metrics.origin_backoffs.clone()));
        let started = std::time::SystemTime::now();
        let shared = cache::shared::SharedTier::from_config(&config.shared)
            .map_err(|e| StartError::Setup(error::ProxyError::internal(e)))?;
        let media = media_pool(&config, options.worker_exe, &metrics);
        let landlock = media.warm().await.map_err(StartError::Media)?;
        tracing::info!(workers = config.media.workers, landlock, "media workers sandboxed");
        log_tools(&config, &media);
        let store = Arc::new(store(&config, disk, index, &metrics));
        let entries = store.load_budget().await.map_err(StartError::Setup)?;
        store.start_upkeep(config.cache.retention.0, started);
        let moderation = moderation(&config, store.clone(), shared.clone(), &metrics).await?;
        let (closed, proxy_closed) = tokio::sync::mpsc::channel(1);
        let proxy = Arc::new(
            proxy::Proxy::new(config, fetcher, store, moderation, metrics, media)
                .with_upstreams(upstreams)
                .with_bucket(shared)
                .with_ledger(ledger)
                .with_closed(closed),
        );
        proxy.load_ledger().await;
        let usage = proxy.usage().await;
        let (blobs, bytes) = (usage.disk_blobs, usage.disk_bytes);
        tracing::info!(entries, blobs, bytes, "disk cache loaded");
        let unsigned = Arc::new(api::rate::Unsigned::new(&proxy.config().compat));
        Ok(Bound {
            public,
            admin,
            pictrs,
            proxy,
            proxy_closed,
            unsigned,
            signer,
            audit_task,
            config_path: options.config_path,
        })
    }

    /// Where viewers connect.
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("bound listener has an address")
    }

    /// Where probes, metrics and the admin API answer.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound listener has an address")
    }

    /// Where the pict-rs API listens, when `compat.pictrs_listen` is set.
    pub fn pictrs_addr(&self) -> Option<SocketAddr> {
        self.pictrs.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The state behind the public listener's routes (for benches that call
    /// [`server::handle_public`] directly).
    pub fn public_state(&self) -> Arc<server::Public> {
        self.public_state_with(None)
    }

    /// Starts the feeds and the arrival fetcher (when configured); what the server queues a
    /// view's file with when views may not fetch.
    fn start_feeds(&self) -> Option<server::Pending> {
        let metrics = self.proxy.metrics().feeds.clone();
        let config = self.proxy.config();
        let pending = feed::start(config, &self.proxy, self.signer.clone(), metrics)?;
        Some(Arc::new(move |request, key| pending.arrivals.push(request, key, pending.window)))
    }

    fn public_state_with(&self, pending: Option<server::Pending>) -> Arc<server::Public> {
        Arc::new(server::Public {
            proxy: self.proxy.clone(),
            signer: self.signer.clone(),
            unsigned: self.unsigned.clone(),
            native: Default::default(),
            pending,
        })
    }

    /// Applies a re-read configuration's domain policy; hand it to a SIGHUP handler.
    pub fn reloader(&self) -> admin::Reloader {
        admin::Reloader {
            proxy: Arc::downgrade(&self.proxy),
            config_path: self.config_path.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, drains in-flight requests for
    /// up to `server.shutdown_grace`, and flushes the audit log.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let reloader = self.reloader();
        let public_state = self.public_state_with(self.start_feeds());
        let Bound { public, admin, pictrs, proxy, mut proxy_closed, unsigned, audit_task, .. } =
            self;
        let server = &proxy.config().server;
        let grace = server.shutdown_grace.0;
        let limits = server::ConnLimits {
            header_timeout: server.header_timeout.0,
            grace,
            max_connections: server.max_connections as usize,
            send_timeout: server.send_timeout.0,
        };
        // The admin port is for a few operators and probes; it gets its own small cap.
        let admin_limits = server::ConnLimits { max_connections: 64, ..limits };
        // The admin listener outlives the public one, so probes see `/readyz` answer 503
        // while viewers' requests drain, rather than a refused connection.
        let (stop_public, public_rx) = watch::channel(false);
        let (stop_admin, admin_rx) = watch::channel(false);
        let admin_state =
            Arc::new(admin::Admin { proxy: proxy.clone(), ready: AtomicBool::new(true), reloader });
        let public_loop = tokio::spawn(server::serve(
            public,
            move |req| server::handle_public(public_state.clone(), req),
            public_rx.clone(),
            limits,
        ));
        // The pict-rs API drains with the public listener: both carry viewers' requests.
        let pictrs_loop = pictrs.map(|listener| {
            let state = Arc::new(server::Pictrs::new(proxy.clone(), unsigned.clone()));
            tokio::spawn(server::serve(
                listener,
                move |req| server::handle_pictrs(state.clone(), req),
                public_rx.clone(),
                limits,
            ))
        });
        let admin_for_loop = admin_state.clone();
        let admin_loop = tokio::spawn(server::serve(
            admin,
            move |req| admin::handle(admin_for_loop.clone(), req),
            admin_rx,
            admin_limits,
        ));
        let ledger_saver = tokio::spawn(save_ledger_every(Arc::downgrade(&proxy), LEDGER_EVERY));
        tracing::info!("parasol is serving");
        shutdown.await;
        // One deadline for all of the shutdown, whatever is still running.
        let deadline = tokio::time::Instant::now() + grace;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        admin_state.ready.store(false, Ordering::Release);
        let _ = stop_public.send(true);
        let _ = public_loop.await;
        if let Some(pictrs_loop) = pictrs_loop {
            let _ = pictrs_loop.await;
        }
        let _ = stop_admin.send(true);
        let _ = admin_loop.await;
        drop(admin_state);
        ledger_saver.abort();
        if let Err(e) = proxy.save_ledger().await {
            tracing::warn!(error = %e, "cannot keep the origin ledger");
        }
        // Fill tasks finishing after their viewers were answered still hold the proxy (and
        // with it the index): wait for the last of them to let go, within the grace period,
        // so that the stores are closed when this returns and the same cache can be opened
        // again at once.
        drop(proxy);
        let _ = tokio::time::timeout_at(deadline, proxy_closed.recv()).await;
        // Fills still running hold the last audit handles; they too get what is left of the
        // grace period, and past it the process ends without them.
        let _ = tokio::time::timeout_at(deadline, audit_task).await;
        tracing::info!("stopped");
    }
}

/// How often the origins' ledger is written to the index (and once more at shutdown).
const LEDGER_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Keeps the origins' ledger in the index every `every`, while the proxy lives.
async fn save_ledger_every(proxy: std::sync::Weak<proxy::Proxy>, every: std::time::Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(proxy) = proxy.upgrade() else { return };
        if let Err(e) = proxy.save_ledger().await {
            tracing::warn!(error = %e, "cannot keep the origin ledger");
        }
    }
}

/// Runs the proxy with `config` until `shutdown` completes.
pub async fn run(
    config: Config,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let bound = Bound::bind(config, options).await?;
    tracing::info!(public = %bound.public_addr(), admin = %bound.admin_addr(), pictrs = ?bound.pictrs_addr(), "listening");
    bound.serve(shutdown).await;
    Ok(())
}
