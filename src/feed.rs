//! Fetching when a post arrives, never when someone looks: parasol follows the instance's own
//! timeline of arriving posts (`[[feed]]`) and fetches their media at a moment drawn at
//! random within the feed's `delay` after arrival, so an origin's logs tell when a post
//! reached the instance (within that window) and never when anyone looked at it.
//!
//! - [`mastodon`]: the Mastodon API's `public:remote` stream, as server-sent events.
//! - [`misskey`]: Misskey's streaming API, `globalTimeline`.
//! - [`extract`]: the media URLs of a post, as the requests a viewer's browser would make.
//! - [`Arrivals`]: the bounded queue of files due for a fetch, and the task that fetches them
//!   through the normal fill (guard, policy, bans, audit), as trigger `arrival`.
//!
//! A feed that fails never affects serving: it reconnects with a capped backoff, and catches
//! up on what it missed with the timeline's REST endpoint.

pub mod extract;
pub mod mastodon;
pub mod misskey;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::api::ProxyRequest;
use crate::audit::Trigger;
use crate::config::FeedConfig;
use crate::proxy::Proxy;
pub use crate::telemetry::FeedMetrics;

/// Files waiting for their fetch, at most; beyond it the oldest arrival is dropped (counted).
pub const MAX_QUEUED: usize = 100_000;
/// Arrival fetches running at once.
const FETCHES_AT_ONCE: usize = 4;
/// The longest pause between a feed's reconnections.
pub const MAX_RECONNECT: Duration = Duration::from_secs(60);

struct Item {
    request: ProxyRequest,
    /// The delay drawn after arrival.
    delay: Duration,
    key: crate::cache::Key,
}

#[derive(Default)]
struct Queue {
    /// By due time, then arrival order.
    due: BTreeMap<(Instant, u64), Item>,
    /// Arrival order, for dropping the oldest.
    order: VecDeque<(Instant, u64)>,
    /// Keys queued now: a file that arrives twice (a boost, an edit) is queued once.
    queued: HashSet<crate::cache::Key>,
    seq: u64,
}

/// The files due for an arrival fetch (see the module).
pub struct Arrivals {
    queue: Mutex<Queue>,
    wake: Notify,
    max: usize,
    metrics: FeedMetrics,
}

impl Arrivals {
    /// A queue of at most `max` files, counting into `metrics`.
    pub fn new(max: usize, metrics: FeedMetrics) -> Self {
        Self { queue: Mutex::default(), wake: Notify::new(), max: max.max(1), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files waiting now.
    pub fn len(&self) -> usize {
        self.lock().due.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `request` (whose cache key is `key`) for a fetch at a moment drawn uniformly
    /// within `window` from now.
    pub fn push(&self, request: ProxyRequest, key: crate::cache::Key, window: Duration) {
        let delay = uniform(window);
        let mut q = self.lock();
        if !q.queued.insert(key) {
            self.metrics.arrival("known");
            return;
        }
        q.seq += 1;
        let at = (Instant::now() + delay, q.seq);
        q.due.insert(at, Item { request, delay, key });
        q.order.push_back(at);
        while q.due.len() > self.max {
            let Some(oldest) = q.order.pop_front() else { break };
            if let Some(item) = q.due.remove(&oldest) {
                q.queued.remove(&item.key);
                self.metrics.arrival("dropped");
            }
        }
        drop(q);
        self.metrics.arrival("queued");
        self.wake.notify_one();
    }

    /// The items due now, and when the next one is.
    fn take_due(&self) -> (Vec<Item>, Option<Instant>) {
        let mut q = self.lock();
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some(entry) = q.due.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let item = entry.remove();
            q.queued.remove(&item.key);
            due.push(item);
        }
        if q.order.len() > 2 * q.due.len() + 1024 {
            let live: HashSet<(Instant, u64)> = q.due.keys().copied().collect();
            q.order.retain(|k| live.contains(k));
        }
        (due, q.due.first_key_value().map(|(k, _)| k.0))
    }

    /// Fetches each file when it is due, `FETCHES_AT_ONCE` at a time, while the proxy lives.
    pub async fn run(self: Arc<Self>, proxy: Weak<Proxy>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(FETCHES_AT_ONCE));
        loop {
            let (due, next) = self.take_due();
            for item in due {
                let Some(proxy) = proxy.upgrade() else { return };
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let outcome = fetch(&proxy, &item).await;
                    metrics.arrival(outcome);
                });
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
            if proxy.strong_count() == 0 {
                return;
            }
        }
    }
}

/// One arrival fetch through the normal fill; what came of it.
async fn fetch(proxy: &Arc<Proxy>, item: &Item) -> &'static str {
    if proxy.is_cached(&item.request).await {
        return "cached";
    }
    let trigger = Trigger::Arrival { delay_ms: item.delay.as_millis() as u64 };
    let fetched = match &item.request.variant {
        Some(name) => proxy.get_variant(&item.request, name, trigger).await.map(|_| ()),
        None => proxy.get(&item.request, trigger).await.map(|_| ()),
    };
    match fetched {
        Ok(()) => "fetched",
        Err((e, _)) => {
            tracing::debug!(error = %e, "arrival fetch failed");
            "failed"
        }
    }
}

/// A duration drawn uniformly in `[0, window)`.
fn uniform(window: Duration) -> Duration {
    let nanos = window.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    let mut bytes = [0u8; 8];
    // The OS's generator; should it fail, no delay rather than a predictable one.
    if getrandom::fill(&mut bytes).is_err() {
        return Duration::ZERO;
    }
    Duration::from_nanos(u64::from_le_bytes(bytes) % nanos)
}

/// What every feed of a running proxy shares: where arrivals go, how parasol's own URLs read,
/// the client that talks to the instance, and the metrics.
pub struct Feeds {
    /// The queue of files due for a fetch.
    pub arrivals: Arc<Arrivals>,
    /// parasol's own URL forms.
    pub ours: extract::Ours,
    /// The client for the instance's API (the instance is the operator's own server: not
    /// subject to `fetch.allow_networks`, and its requests are not in the audit log).
    pub client: reqwest::Client,
    /// The proxy, for cache keys and the cached check.
    pub proxy: Weak<Proxy>,
    /// What the feeds count.
    pub metrics: FeedMetrics,
}

impl Feeds {
    /// Queues every media file of an arriving post (`urls`, as found by [`extract`]) within
    /// `window`.
    pub async fn arrived(&self, urls: Vec<String>, window: Duration) {
        let Some(proxy) = self.proxy.upgrade() else { return };
        for url in urls {
            let Some(request) = extract::request_for(&url, &self.ours) else { continue };
            if proxy.is_cached(&request).await {
                self.metrics.arrival("known");
                continue;
            }
            let key = proxy.key_of(&request);
            self.arrivals.push(request, key, window);
        }
    }
}

/// Where views that may not fetch (`policy.view_fetch = "never"`) queue their file, and the
/// window its fetch is drawn in.
pub struct Pending {
    /// The queue.
    pub arrivals: Arc<Arrivals>,
    /// The feeds' longest `delay`, or 5 minutes without a feed.
    pub window: Duration,
}

/// Starts the arrival fetcher and one follower per `[[feed]]` of `config`, all ending with
/// the proxy. Nothing starts when no feed is configured and views may fetch. With
/// `policy.view_fetch = "never"`, answers where views queue their files.
pub fn start(
    config: &crate::config::Config,
    proxy: &Arc<Proxy>,
    signer: crate::signing::Signer,
    metrics: FeedMetrics,
) -> Option<Pending> {
    let never = config.policy.view_fetch == crate::config::ViewFetch::Never;
    if config.feed.is_empty() && !never {
        return None;
    }
    let arrivals = Arc::new(Arrivals::new(MAX_QUEUED, metrics.clone()));
    tokio::spawn(arrivals.clone().run(Arc::downgrade(proxy)));
    let window = config.feed.iter().map(|f| f.delay.0).max().unwrap_or(Duration::from_secs(300));
    let pending = never.then(|| Pending { arrivals: arrivals.clone(), window });
    let client = match reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(config.fetch.user_agent.clone())
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "feeds not started: cannot build their client");
            return pending;
        }
    };
    let feeds = Arc::new(Feeds {
        arrivals,
        ours: extract::Ours::new(config, signer),
        client,
        proxy: Arc::downgrade(proxy),
        metrics,
    });
    for (i, feed) in config.feed.iter().enumerate() {
        let (feeds, feed) = (feeds.clone(), feed.clone());
        tokio::spawn(async move {
            match feed.kind {
                crate::config::FeedKind::Mastodon => follow(i, feed, feeds, mastodon::Api).await,
                crate::config::FeedKind::Misskey => follow(i, feed, feeds, misskey::Api).await,
            }
        });
    }
    pending
}

/// A timeline a feed follows: its stream, and how it catches up after a reconnection.
pub(crate) trait Timeline {
    /// Reads the stream of the instance at `base` until it ends; `newest` follows the newest
    /// post id seen, and `attempt` starts again once the stream answers.
    async fn stream(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        newest: &mut Option<String>,
        attempt: &mut u32,
    ) -> Result<(), String>;

    /// Queues what arrived since `since`; answers the newest id seen.
    async fn catch_up(
        &self,
        base: &str,
        feed: &FeedConfig,
        feeds: &Feeds,
        since: &str,
    ) -> Result<Option<String>, String>;
}

/// Follows feed `index` (`feed`, read through `timeline`) until the proxy is gone: the stream,
/// and after each reconnection (1 s, doubling to [`MAX_RECONNECT`]) a catch-up from the
/// newest post seen.
async fn follow(index: usize, feed: FeedConfig, feeds: Arc<Feeds>, timeline: impl Timeline) {
    let base = feed.url.trim_end_matches('/').to_string();
    let mut newest: Option<String> = None;
    let mut attempt = 0u32;
    loop {
        if feeds.proxy.strong_count() == 0 {
            return;
        }
        if let Some(since) = newest.clone() {
            match timeline.catch_up(&base, &feed, &feeds, &since).await {
                Ok(Some(id)) => newest = Some(id),
                Ok(None) => {}
                Err(e) => tracing::warn!(feed = index, error = e, "feed catch-up failed"),
            }
        }
        match timeline.stream(&base, &feed, &feeds, &mut newest, &mut attempt).await {
            Ok(()) => tracing::info!(feed = index, "feed stream ended; reconnecting"),
            Err(e) => tracing::warn!(feed = index, error = e, "feed stream failed; reconnecting"),
        }
        feeds.metrics.event("disconnect");
        tokio::time::sleep(reconnect_pause(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// How one API writes a post: where its creation time is, the media URLs it holds, and
/// whether it came from another server (only those are warmed).
pub(crate) struct Shape {
    /// The creation time's field (RFC 3339).
    pub created: &'static str,
    /// Its media URLs ([`extract`]).
    pub media: fn(&serde_json::Value, &mut Vec<String>),
    /// Whether it is a remote post.
    pub remote: fn(&serde_json::Value) -> bool,
}

impl Feeds {
    /// A post arrived, on the stream (`live`) or read in a catch-up: counted, its id kept in
    /// `newest`, and the media of a remote one queued.
    pub(crate) async fn received(
        &self,
        feed: &FeedConfig,
        shape: &Shape,
        post: &serde_json::Value,
        newest: &mut Option<String>,
        live: bool,
    ) {
        if live {
            self.metrics.event("post");
            self.metrics.arrived_at(post[shape.created].as_str());
        } else {
            self.metrics.event("caught_up");
        }
        keep_newer(newest, post["id"].as_str());
        if !(shape.remote)(post) {
            return;
        }
        let mut urls = Vec::new();
        (shape.media)(post, &mut urls);
        self.arrived(urls, feed.delay.0).await;
    }
}

/// Keeps in `newest` the newer of it and `id`. Both APIs' ids sort by time: Mastodon's
/// decimal snowflakes (longer is newer, then by digits) and Misskey's ids of one length.
pub(crate) fn keep_newer(newest: &mut Option<String>, id: Option<&str>) {
    let Some(id) = id else { return };
    if newest.as_deref().is_none_or(|n| (id.len(), id) > (n.len(), n)) {
        *newest = Some(id.to_string());
    }
}

/// The pause before reconnection `attempt` (0 for the first): 1 s doubling to
/// [`MAX_RECONNECT`].
pub fn reconnect_pause(attempt: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(attempt.min(16))).min(MAX_RECONNECT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u32) -> (ProxyRequest, crate::cache::Key) {
        let url = url::Url::parse(&format!("https://media.test/{n}.png")).unwrap();
        let key = crate::cache::Key::new(url.as_str(), None);
        (ProxyRequest::new(url, None), key)
    }

    #[tokio::test(start_paused = true)]
    async fn arrivals_fall_due_within_their_window_once_each_and_the_queue_stays_bounded() {
        let arrivals = Arrivals::new(50, FeedMetrics::default());
        let window = Duration::from_secs(300);
        for n in 0..40 {
            let (r, k) = request(n);
            arrivals.push(r, k, window);
        }
        let (r, k) = request(3);
        arrivals.push(r, k, window);
        assert_eq!(arrivals.len(), 40, "a file queued twice is queued once");
        let mut seen = 0;
        let mut delays = Vec::new();
        for _ in 0..301 {
            let (due, _) = arrivals.take_due();
            seen += due.len();
            delays.extend(due.iter().map(|i| i.delay));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(seen, 40);
        assert!(delays.iter().all(|d| *d < window));
        // Drawn, not fixed: forty draws over 300 s do not all fall in one minute.
        let spread = delays.iter().max().unwrap().saturating_sub(*delays.iter().min().unwrap());
        assert!(spread > Duration::from_secs(60), "{delays:?}");
        // A flood keeps at most the bound, dropping the oldest arrivals.
        for n in 100..1100 {
            let (r, k) = request(n);
            arrivals.push(r, k, window);
        }
        assert_eq!(arrivals.len(), 50);
        let q = arrivals.lock();
        assert!(q.queued.len() == 50 && q.due.values().all(|i| i.request.source.path() >= "/1050"));
    }

    #[test]
    fn reconnecting_backs_off_to_a_cap() {
        let pauses: Vec<u64> = (0..9).map(|a| reconnect_pause(a).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
