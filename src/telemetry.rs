//! Logging setup and the Prometheus metrics served on the admin port.
//!
//! Every cache decision is a label here and a `cache` field in the request's log line, so an
//! operator can see why a request went to the origin. Logs and metrics never carry a viewer's
//! address or a source URL at info level.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a request was answered with respect to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    HitMemory,
    HitDisk,
    /// Not on this node, found in the shared bucket: no origin request.
    HitShared,
    /// This request's fill fetched from the origin.
    Miss,
    /// Waited on another request's fill.
    Coalesced,
    /// Answered from the negative cache: the origin failed moments ago.
    Negative,
    /// Refused by the destination guard or the domain policy, before any lookup.
    Blocked,
    /// Never looked up (refused before the cache: bad URL, signature, method).
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::HitMemory => "hit_memory",
            CacheStatus::HitDisk => "hit_disk",
            CacheStatus::HitShared => "hit_shared",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Negative => "negative",
            CacheStatus::Blocked => "blocked",
            CacheStatus::Bypass => "bypass",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// `parasol_moderation_total{rule,action}`: which rule decided what.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModerationLabels {
    pub rule: &'static str,
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharedLabels {
    /// `lookup` (a local miss asks the bucket) or `publish` (a fill is uploaded).
    pub op: &'static str,
    /// `hit`, `miss`, `ok`, `error` or `skipped` (too many uploads waiting).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

/// All metrics, registered once at start. A clone shares them (each handle is one).
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub cache: Family<CacheLabels, Counter>,
    pub origin: Family<OutcomeLabels, Counter>,
    pub origin_seconds: Histogram,
    pub bytes_served: Counter,
    /// Of those, the bytes sent from a blob's file with `sendfile` rather than from memory.
    pub bytes_sent_from_file: Counter,
    pub bytes_fetched: Counter,
    pub cache_bytes: Family<TierLabels, Gauge>,
    pub cache_entries: Family<TierLabels, Gauge>,
    pub audit_violations: Counter,
    pub evictions: Counter,
    pub renders: Counter,
    pub media_jobs: Family<OutcomeLabels, Counter>,
    pub media_running: Gauge,
    /// `parasol_media_origins_refused`, set when scraped.
    pub media_origins_refused: Gauge,
    pub moderation: Family<ModerationLabels, Counter>,
    pub inflight_bytes: Gauge,
    pub blobs_dropped: Counter,
    pub shared: Family<SharedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parasol");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Viewer requests by route and response status",
            requests.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_results",
            "Cache decisions: hit_memory, hit_disk, miss, coalesced, negative, blocked, bypass",
            cache.clone(),
        );
        let origin = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "origin_fetches",
            "Origin fetches by outcome (ok or error code)",
            origin.clone(),
        );
        let buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let origin_seconds = Histogram::new(buckets);
        registry.register(
            "origin_fetch_seconds",
            "Time from sending an origin request to the last body byte",
            origin_seconds.clone(),
        );
        let bytes_served = Counter::default();
        registry.register("served_bytes", "Body bytes sent to viewers", bytes_served.clone());
        let bytes_sent_from_file = Counter::default();
        registry.register(
            "served_from_file_bytes",
            "Body bytes sent to viewers from a blob's file (sendfile) instead of from memory",
            bytes_sent_from_file.clone(),
        );
        let bytes_fetched = Counter::default();
        registry.register(
            "fetched_bytes",
            "Body bytes received from origins",
            bytes_fetched.clone(),
        );
        let cache_bytes = Family::<TierLabels, Gauge>::default();
        registry.register("cache_bytes", "Bytes held per cache tier", cache_bytes.clone());
        let cache_entries = Family::<TierLabels, Gauge>::default();
        registry.register("cache_entries", "Entries held per cache tier", cache_entries.clone());
        let audit_violations = Counter::default();
        registry.register(
            "audit_violations",
            "Outbound requests that carried a header outside the allowlist (should stay 0)",
            audit_violations.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "evictions",
            "Blobs evicted from disk to stay within cache.disk_bytes or cache.retention",
            evictions.clone(),
        );
        let renders = Counter::default();
        registry.register(
            "renders",
            "Variant renditions computed (decode, resize, encode)",
            renders.clone(),
        );
        let media_jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "media_jobs",
            "Media worker jobs by outcome: ok, unchanged, refused (decoder said no), too_costly \
             (CPU time, memory, crash, a broken protocol), remembered (a known too-costly file), \
             origin_refused (its origin's files were too costly lately), busy (the queue or \
             the origin's share of it full), waited (no worker within media.queue_wait), \
             starved (over the wall-clock deadline without using its CPU time), error; \
             skipped: a strip not sent to a worker, no byte of the file marking metadata",
            media_jobs.clone(),
        );
        let moderation = Family::<ModerationLabels, Counter>::default();
        registry.register(
            "moderation",
            "Moderation decisions by rule (url, hash, sha256, domain, hash_list, scanner) and \
             action (refused, purged, banned, lifted, allowed, unscanned)",
            moderation.clone(),
        );
        let media_running = Gauge::default();
        registry.register(
            "media_jobs_running",
            "Media jobs on a worker now (at most media.workers, and one metadata strip)",
            media_running.clone(),
        );
        let media_origins_refused = Gauge::default();
        registry.register(
            "media_origins_refused",
            "Origins refused new media jobs now: their files were too costly three times in \
             ten minutes",
            media_origins_refused.clone(),
        );
        let inflight_bytes = Gauge::default();
        registry.register(
            "inflight_bytes",
            "Bytes of bodies held in memory on their way into the cache (media.inflight_bytes)",
            inflight_bytes.clone(),
        );
        let blobs_dropped = Counter::default();
        registry.register(
            "blobs_dropped",
            "Blobs deleted because their bytes no longer matched their hash or size (refetched on demand)",
            blobs_dropped.clone(),
        );
        let shared = Family::<SharedLabels, Counter>::default();
        registry.register(
            "shared_tier",
            "Calls to the shared bucket ([shared]) by operation and outcome",
            shared.clone(),
        );
        Self {
            shared,
            renders,
            media_jobs,
            media_running,
            media_origins_refused,
            moderation,
            inflight_bytes,
            evictions,
            blobs_dropped,
            audit_violations,
            registry: std::sync::Arc::new(registry),
            requests,
            cache,
            origin,
            origin_seconds,
            bytes_served,
            bytes_sent_from_file,
            bytes_fetched,
            cache_bytes,
            cache_entries,
        }
    }

    pub fn shared_result(&self, op: &'static str, outcome: &'static str) {
        self.shared_counter(op, outcome).inc();
    }

    /// The counter behind [`Metrics::shared_result`], for a task that outlives the borrow.
    pub fn shared_counter(&self, op: &'static str, outcome: &'static str) -> Counter {
        self.shared.get_or_create(&SharedLabels { op, outcome }).clone()
    }

    pub fn cache_result(&self, status: CacheStatus) {
        self.cache.get_or_create(&CacheLabels { result: status.as_str() }).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Installs the global tracing subscriber: human-readable by default, JSON lines when
/// `PARASOL_LOG_FORMAT=json`; filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: journald and log files get plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if std::env::var("PARASOL_LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
