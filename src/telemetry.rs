//! Logging setup and the Prometheus metrics served on the admin port.
//!
//! Every cache decision is a label here and a `cache` field in the request's log line, so an
//! operator can see why a request went to the origin. Logs and metrics never carry a viewer's
//! address or a source URL at info level.

pub mod traces;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a request was answered with respect to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Found in the memory tier.
    HitMemory,
    /// Found on disk.
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
    /// The decision as a label.
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

/// `parasol_requests_total{route,status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The URL scheme (native, camo, misskey, akkoma, upstream, pictrs, none).
    pub route: &'static str,
    /// The response's status.
    pub status: u16,
}

/// `parasol_cache_results_total{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// The cache decision ([`CacheStatus::as_str`]).
    pub result: &'static str,
}

/// An outcome label (`ok`, or an error code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The outcome.
    pub outcome: &'static str,
}

/// `parasol_moderation_total{rule,action}`: which rule decided what.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModerationLabels {
    /// The rule that decided.
    pub rule: &'static str,
    /// What it decided.
    pub action: &'static str,
}

/// `parasol_shared_tier_total{op,outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharedLabels {
    /// `lookup` (a local miss asks the bucket) or `publish` (a fill is uploaded).
    pub op: &'static str,
    /// `hit`, `miss`, `ok`, `error` or `skipped` (too many uploads waiting).
    pub outcome: &'static str,
}

/// `parasol_cache_bytes{tier}` and `parasol_cache_entries{tier}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// `memory` or `disk`.
    pub tier: &'static str,
}

/// `parasol_origin_backoffs_total{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `retry_after` (the origin asked) or `failures` (it kept failing).
    pub reason: &'static str,
}

/// `parasol_origin_fetch_triggers_total{trigger}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `view`, `prefetch` or `arrival`.
    pub trigger: &'static str,
}

/// The per-origin series: a domain named by a `[[policy.origin]]` rule, or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    /// The rule's domain, or `other` for every origin no rule names.
    pub domain: String,
}

/// What the feeds ([`crate::feed`]) count.
#[derive(Clone, Default)]
pub struct FeedMetrics {
    /// `parasol_feed_events_total{outcome}`: posts received (`post`), caught up
    /// (`caught_up`), connections lost (`disconnect`), messages not understood (`bad`).
    pub events: Family<OutcomeLabels, Counter>,
    /// `parasol_arrivals_total{outcome}`: files queued (`queued`), already cached or queued
    /// (`known`), dropped from a full queue (`dropped`), fetched (`fetched`), failed
    /// (`failed`), found cached when due (`cached`).
    pub arrivals: Family<OutcomeLabels, Counter>,
    /// `parasol_feed_lag_seconds`: how long before its arrival here the last post received
    /// was created (the instance's and the feed's delay together).
    pub lag: prometheus_client::metrics::gauge::Gauge,
}

impl FeedMetrics {
    pub(crate) fn event(&self, outcome: &'static str) {
        self.events.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(crate) fn arrival(&self, outcome: &'static str) {
        self.arrivals.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A post created at `created` (RFC 3339, as both APIs write it) arrived now.
    pub(crate) fn arrived_at(&self, created: Option<&str>) {
        let Some(created) = created.and_then(|c| humantime::parse_rfc3339_weak(c).ok()) else {
            return;
        };
        let lag = std::time::SystemTime::now().duration_since(created).unwrap_or_default();
        self.lag.set(lag.as_secs() as i64);
    }
}

/// All metrics, registered once at start. A clone shares them (each handle is one).
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    /// `parasol_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `parasol_cache_results_total`.
    pub cache: Family<CacheLabels, Counter>,
    /// `parasol_origin_fetches_total`.
    pub origin: Family<OutcomeLabels, Counter>,
    /// `parasol_origin_fetch_seconds`.
    pub origin_seconds: Histogram,
    /// `parasol_served_bytes_total`.
    pub bytes_served: Counter,
    /// Of those, the bytes sent from a blob's file with `sendfile` rather than from memory.
    pub bytes_sent_from_file: Counter,
    /// `parasol_fetched_bytes_total`.
    pub bytes_fetched: Counter,
    /// `parasol_cache_bytes`, set when scraped.
    pub cache_bytes: Family<TierLabels, Gauge>,
    /// `parasol_cache_entries`, set when scraped.
    pub cache_entries: Family<TierLabels, Gauge>,
    /// `parasol_audit_violations_total`.
    pub audit_violations: Counter,
    /// `parasol_evictions_total`.
    pub evictions: Counter,
    /// `parasol_renders_total`.
    pub renders: Counter,
    /// `parasol_media_jobs_total`.
    pub media_jobs: Family<OutcomeLabels, Counter>,
    /// `parasol_media_jobs_running`.
    pub media_running: Gauge,
    /// `parasol_media_origins_refused`, set when scraped.
    pub media_origins_refused: Gauge,
    /// `parasol_moderation_total`.
    pub moderation: Family<ModerationLabels, Counter>,
    /// `parasol_inflight_bytes`, set when scraped.
    pub inflight_bytes: Gauge,
    /// `parasol_blobs_dropped_total`.
    pub blobs_dropped: Counter,
    /// `parasol_shared_tier_total`.
    pub shared: Family<SharedLabels, Counter>,
    /// `parasol_origin_backoffs_total`.
    pub origin_backoffs: Family<ReasonLabels, Counter>,
    /// `parasol_origin_fetch_triggers_total`.
    pub fetch_triggers: Family<TriggerLabels, Counter>,
    /// `parasol_cache_capacity_bytes{tier}`: the configured budgets, set when scraped.
    pub cache_capacity: Family<TierLabels, Gauge>,
    /// `parasol_media_workers`: the configured `media.workers`, set when scraped.
    pub media_workers: Gauge,
    /// `parasol_ready`: 1 while the listeners accept (as `/readyz`), set when scraped.
    pub ready: Gauge,
    /// `parasol_feed_events_total` and `parasol_arrivals_total`.
    pub feeds: FeedMetrics,
    /// `parasol_origins_backing_off`, set when scraped.
    pub origins_backing_off: Gauge,
    /// `parasol_origin_requests_total{domain}`, brought up to the ledger when scraped.
    pub origin_requests: Family<DomainLabels, Counter>,
    /// `parasol_origin_fetched_bytes_total{domain}`, likewise.
    pub origin_fetched_bytes: Family<DomainLabels, Counter>,
    /// `parasol_origin_served_bytes_total{domain}`, likewise.
    pub origin_served_bytes: Family<DomainLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Each metric's name (after the `parasol_` prefix) and help text.
const HELP: &[(&str, &str)] = &[
    ("requests", "Viewer requests by route and response status"),
    (
        "cache_results",
        "Cache decisions: hit_memory, hit_disk, miss, coalesced, negative, blocked, bypass",
    ),
    ("origin_fetches", "Origin fetches by outcome (ok or error code)"),
    ("origin_fetch_seconds", "Time from sending an origin request to the last body byte"),
    ("served_bytes", "Body bytes sent to viewers"),
    (
        "served_from_file_bytes",
        "Body bytes sent to viewers from a blob's file (sendfile) instead of from memory",
    ),
    ("fetched_bytes", "Body bytes received from origins"),
    ("cache_bytes", "Bytes held per cache tier"),
    ("cache_entries", "Entries held per cache tier"),
    (
        "audit_violations",
        "Outbound requests that carried a header outside the allowlist (should stay 0)",
    ),
    ("evictions", "Blobs evicted from disk to stay within cache.disk_bytes or cache.retention"),
    ("renders", "Variant renditions computed (decode, resize, encode)"),
    (
        "media_jobs",
        "Media worker jobs by outcome: ok, unchanged, refused (decoder said no), too_costly \
             (CPU time, memory, crash, a broken protocol), remembered (a known too-costly file), \
             origin_refused (its origin's files were too costly lately), busy (the queue or \
             the origin's share of it full), waited (no worker within media.queue_wait), \
             starved (over the wall-clock deadline without using its CPU time), error; \
             skipped: a strip not sent to a worker, no byte of the file marking metadata",
    ),
    (
        "moderation",
        "Moderation decisions by rule (url, hash, sha256, domain, hash_list, scanner) and \
             action (refused, purged, banned, lifted, allowed, unscanned)",
    ),
    (
        "media_jobs_running",
        "Media jobs on a worker now (at most media.workers, and one metadata strip)",
    ),
    (
        "media_origins_refused",
        "Origins refused new media jobs now: their files were too costly three times in \
             ten minutes",
    ),
    (
        "inflight_bytes",
        "Bytes of bodies held in memory on their way into the cache (media.inflight_bytes)",
    ),
    (
        "blobs_dropped",
        "Blobs deleted because their bytes no longer matched their hash or size (refetched on demand)",
    ),
    ("shared_tier", "Calls to the shared bucket ([shared]) by operation and outcome"),
    (
        "origin_backoffs",
        "Pauses begun toward an origin host: retry_after (a 429 or 503 asked) or failures",
    ),
    ("origins_backing_off", "Origin hosts parasol leaves alone now (no new fills)"),
    (
        "origin_fetch_triggers",
        "Fills that went to an origin, by what caused them: view, prefetch or arrival",
    ),
    ("feed_events", "Feed events: post, caught_up (read after a reconnection), disconnect, bad"),
    (
        "feed_lag_seconds",
        "How long before it reached parasol the last post a feed delivered was created",
    ),
    (
        "arrivals",
        "Files of arriving posts: queued, known (cached or queued already), dropped (queue \
             full), fetched, cached (cached by then), failed",
    ),
    (
        "origin_requests",
        "Viewer requests by origin: each domain a [[policy.origin]] rule names, other for the rest",
    ),
    ("origin_fetched_bytes", "Body bytes fetched by origin (as origin_requests)"),
    (
        "cache_capacity_bytes",
        "The configured budget per cache tier (cache.memory_bytes, cache.disk_bytes)",
    ),
    ("media_workers", "The configured media workers (media.workers)"),
    ("ready", "1 while parasol accepts viewers (as /readyz answers), 0 while it drains"),
    ("origin_served_bytes", "Body bytes served to viewers by origin (as origin_requests)"),
];

/// Registers `metric` as `name` with its help from [`HELP`], and hands it back.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    metric: M,
) -> M {
    let help = HELP.iter().find(|(n, _)| *n == name).map_or("", |(_, h)| h);
    debug_assert!(!help.is_empty(), "metric {name} has no help text");
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("parasol");
        Self {
            requests: register(&mut registry, "requests", Family::default()),
            cache: register(&mut registry, "cache_results", Family::default()),
            origin: register(&mut registry, "origin_fetches", Family::default()),
            origin_seconds: register(
                &mut registry,
                "origin_fetch_seconds",
                Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            ),
            bytes_served: register(&mut registry, "served_bytes", Counter::default()),
            bytes_sent_from_file: register(
                &mut registry,
                "served_from_file_bytes",
                Counter::default(),
            ),
            bytes_fetched: register(&mut registry, "fetched_bytes", Counter::default()),
            cache_bytes: register(&mut registry, "cache_bytes", Family::default()),
            cache_entries: register(&mut registry, "cache_entries", Family::default()),
            audit_violations: register(&mut registry, "audit_violations", Counter::default()),
            evictions: register(&mut registry, "evictions", Counter::default()),
            renders: register(&mut registry, "renders", Counter::default()),
            media_jobs: register(&mut registry, "media_jobs", Family::default()),
            moderation: register(&mut registry, "moderation", Family::default()),
            media_running: register(&mut registry, "media_jobs_running", Gauge::default()),
            media_origins_refused: register(
                &mut registry,
                "media_origins_refused",
                Gauge::default(),
            ),
            inflight_bytes: register(&mut registry, "inflight_bytes", Gauge::default()),
            blobs_dropped: register(&mut registry, "blobs_dropped", Counter::default()),
            shared: register(&mut registry, "shared_tier", Family::default()),
            origin_backoffs: register(&mut registry, "origin_backoffs", Family::default()),
            origins_backing_off: register(&mut registry, "origins_backing_off", Gauge::default()),
            fetch_triggers: register(&mut registry, "origin_fetch_triggers", Family::default()),
            feeds: FeedMetrics {
                events: register(&mut registry, "feed_events", Family::default()),
                arrivals: register(&mut registry, "arrivals", Family::default()),
                lag: register(&mut registry, "feed_lag_seconds", Default::default()),
            },
            origin_requests: register(&mut registry, "origin_requests", Family::default()),
            origin_fetched_bytes: register(
                &mut registry,
                "origin_fetched_bytes",
                Family::default(),
            ),
            origin_served_bytes: register(&mut registry, "origin_served_bytes", Family::default()),
            cache_capacity: register(&mut registry, "cache_capacity_bytes", Family::default()),
            media_workers: register(&mut registry, "media_workers", Gauge::default()),
            ready: register(&mut registry, "ready", Gauge::default()),
            registry: std::sync::Arc::new(registry),
        }
        .with_known_series()
    }

    /// Every series a dashboard or an alert names exists from the start, at 0, rather than
    /// only after its first event (a rate over a series that does not exist is no data, not
    /// zero).
    fn with_known_series(self) -> Self {
        use CacheStatus::*;
        for status in [HitMemory, HitDisk, HitShared, Miss, Coalesced, Negative, Blocked, Bypass] {
            let _ = self.cache.get_or_create(&CacheLabels { result: status.as_str() });
        }
        for outcome in ["ok", "origin_timeout", "origin_unreachable", "origin_status"] {
            let _ = self.origin.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "unchanged", "refused", "too_costly", "busy", "error"] {
            let _ = self.media_jobs.get_or_create(&OutcomeLabels { outcome });
        }
        for (op, outcome) in [("lookup", "hit"), ("lookup", "miss"), ("lookup", "error")]
            .into_iter()
            .chain([("publish", "ok"), ("publish", "error"), ("publish", "skipped")])
        {
            let _ = self.shared.get_or_create(&SharedLabels { op, outcome });
        }
        for reason in ["retry_after", "failures"] {
            let _ = self.origin_backoffs.get_or_create(&ReasonLabels { reason });
        }
        for trigger in ["view", "prefetch", "arrival"] {
            let _ = self.fetch_triggers.get_or_create(&TriggerLabels { trigger });
        }
        self
    }

    /// Counts one call of the shared bucket (`op`, `outcome`).
    pub fn shared_result(&self, op: &'static str, outcome: &'static str) {
        self.shared_counter(op, outcome).inc();
    }

    /// The counter behind [`Metrics::shared_result`], for a task that outlives the borrow.
    pub fn shared_counter(&self, op: &'static str, outcome: &'static str) -> Counter {
        self.shared.get_or_create(&SharedLabels { op, outcome }).clone()
    }

    /// Counts one cache decision.
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

/// Installs the global tracing subscriber: the log, human-readable by default, JSON lines when
/// `PARASOL_LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`); beside it `traces`,
/// the exporter's layer when `[telemetry]` has one ([`traces::layer`]).
pub fn init_logging(traces: Option<traces::Layer>) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The spans made for traces are never logged.
    let filter = match format!("{}=off", traces::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // Colour only on a terminal: journald and log files get plain text.
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let log = if std::env::var("PARASOL_LOG_FORMAT").is_ok_and(|v| v == "json") {
        log.json().with_filter(filter).boxed()
    } else {
        log.with_filter(filter).boxed()
    };
    let _ = tracing_subscriber::registry().with(traces).with(log).try_init();
}
