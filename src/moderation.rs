//! Moderation in one place. parasol keys every blob by its content, so a rule about a file
//! holds across every URL and every URL scheme (native, camo, Akkoma, Misskey, variants) that
//! leads to it, including URLs never seen before:
//!
//! - **bans** made through the admin API, by URL, by content (blake3 or SHA-256) or by domain,
//!   kept in the index (they survive restarts) and shared through the bucket (`[shared]`);
//! - **hash lists** (`moderation.hash_lists`): SHA-256 and MD5 digests of known files, in the
//!   forms shared lists come in;
//! - an outside **scanner** (`moderation.scanner_url`) that sees each new original before it
//!   is first served and can veto it ([`scanner`]).
//!
//! A request is checked before any lookup (URL, domain); a fill after hashing and before
//! anything is stored or served (content: the origin's bytes and the bytes served); a hit by
//! its content (a ban made since). Everything refused is 451 `banned`. Every decision is a line
//! of the moderation log and a count in `parasol_moderation_total{rule,action}` ([`log`]).

mod bans;
pub mod lists;
pub mod log;
pub mod scanner;

pub use bans::BanReport;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::ProxyError;
use lists::HashLists;

/// What a ban names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum BanKind {
    /// A canonical source URL.
    Url,
    /// The blake3 of a file's bytes (parasol's ETag): the origin's bytes or the served ones.
    Hash,
    /// The SHA-256 of the origin's bytes (the digest shared lists use).
    Sha256,
    /// A domain and its subdomains, as the source's host or where a redirect led.
    Domain,
}

impl BanKind {
    /// The kind as the API and the log name it.
    pub fn as_str(self) -> &'static str {
        match self {
            BanKind::Url => "url",
            BanKind::Hash => "hash",
            BanKind::Sha256 => "sha256",
            BanKind::Domain => "domain",
        }
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// What the ban names.
    pub kind: BanKind,
    /// The canonical URL, lowercase hex digest, or normalised domain.
    pub value: String,
    /// Why, in the operator's words (at most 500 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// Learned from the shared bucket (lifted here when it is gone from there).
    #[serde(default)]
    pub shared: bool,
}

impl Ban {
    /// A ban of `kind` on `value`, checked and put in its one spelling.
    pub fn new(kind: BanKind, value: &str, reason: Option<String>) -> Result<Ban, String> {
        let value = match kind {
            BanKind::Url => crate::api::parse_source(value)
                .map_err(|e| format!("url: {}", e.public_message()))?
                .to_string(),
            BanKind::Hash | BanKind::Sha256 => {
                let hex = value.trim().to_ascii_lowercase();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("{}: 64 hex digits", kind.as_str()));
                }
                hex
            }
            BanKind::Domain => crate::policy::normalize_domain(value)
                .ok_or_else(|| "domain: not a domain name".to_string())?,
        };
        if reason.as_ref().is_some_and(|r| r.len() > 500) {
            return Err("reason: at most 500 bytes".into());
        }
        let created_at = crate::cache::evict::now_secs();
        Ok(Ban { kind, value, reason, created_at, shared: false })
    }

    /// Its key in the index and the bucket.
    pub fn id(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }
}

pub use crate::cache::digests::{Digester, Digests};

/// The rules in force, swapped whole when they change, so a check never waits on a writer.
#[derive(Default)]
struct Rules {
    urls: HashSet<String>,
    hashes: HashSet<[u8; 32]>,
    sha256: HashSet<[u8; 32]>,
    domains: Vec<String>,
    lists: Arc<HashLists>,
}

/// The moderation state of a running proxy.
pub struct Moderation {
    rules: RwLock<Arc<Rules>>,
    /// Whether any URL or domain ban, or any content ban, exists: the checks on every
    /// request and every hit cost one atomic load while there is none.
    any_request_rule: AtomicBool,
    any_content_rule: AtomicBool,
    /// Whether a SHA-256 ban or a hash list exists (digests are computed and checked).
    any_digest_rule: AtomicBool,
    /// Every ban, by id; the source of `rules`.
    bans: std::sync::Mutex<BTreeMap<String, Ban>>,
    /// The moderation log: every decision, one JSON line.
    pub log: log::ModerationLog,
    /// The outside scanner, when `moderation.scanner_url` is set.
    pub scanner: Option<scanner::Scanner>,
    /// `[[policy.normalize]]`: a URL ban covers every URL that is the same cache entry (a
    /// re-signed CDN URL of the banned one).
    normalizer: crate::policy::Normalizer,
    /// Where bans are kept and what they purge (the index, every tier, the bucket).
    store: Arc<crate::cache::store::Store>,
    /// The bucket other nodes share, when `[shared]` is set: bans are kept in step through it,
    /// and a banned blob leaves it.
    shared: Option<crate::cache::shared::SharedTier>,
    /// Called when a ban is lifted: the refusals remembered elsewhere (the proxy's negative
    /// cache) are forgotten, so the lift applies at once.
    on_lift: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Moderation {
    /// Moderation of what `store` holds, logging to `log`, with the `scanner` if any.
    pub fn new(
        log: log::ModerationLog,
        scanner: Option<scanner::Scanner>,
        store: Arc<crate::cache::store::Store>,
    ) -> Self {
        Self {
            rules: RwLock::default(),
            any_request_rule: AtomicBool::new(false),
            any_content_rule: AtomicBool::new(false),
            any_digest_rule: AtomicBool::new(false),
            bans: std::sync::Mutex::default(),
            log,
            scanner,
            normalizer: Default::default(),
            store,
            shared: None,
            on_lift: std::sync::OnceLock::new(),
        }
    }

    /// With the bucket other nodes share (`[shared]`), if any.
    pub fn with_shared(mut self, shared: Option<crate::cache::shared::SharedTier>) -> Self {
        self.shared = shared;
        self
    }

    /// Has `forget` called whenever a ban is lifted (once set, for good).
    pub fn on_lift(&self, forget: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_lift.set(Box::new(forget));
    }

    /// The checkpoint of a hit (an entry found stored, whose bytes came from `host`): a ban
    /// made since it was cached of its host, its bytes, or the origin's bytes it was prepared
    /// from. A refusal is logged.
    pub async fn check_hit(
        &self,
        entry: &crate::cache::Entry,
        host: Option<&str>,
    ) -> Result<(), ProxyError> {
        let banned = host.map_or(Ok(()), |h| self.check_host(h));
        let banned = banned.and_then(|()| self.check_hash(&entry.hash));
        let origin = entry.origin_blake3.as_ref();
        let banned = banned.and_then(|()| origin.map_or(Ok(()), |h| self.check_hash(h)));
        // A SHA-256 ban or list made since a prepared file was stored names the origin's bytes.
        let digests = entry.origin.as_deref();
        let banned = banned.and_then(|()| digests.map_or(Ok(()), |o| self.check_origin_digests(o)));
        if let Err(ProxyError::Banned(rule)) = &banned {
            self.log.record_refusal(rule, Some(&entry.hash), host).await;
        }
        banned
    }

    /// The checkpoint of a request, before any lookup: its URL (`cache_url`, the form its
    /// key is made of) and its host. A refusal is logged.
    pub async fn check_url(&self, source: &url::Url, cache_url: &str) -> Result<(), ProxyError> {
        let checked = self.check_request(source, cache_url);
        if let Err(ProxyError::Banned(rule)) = &checked {
            self.log.record_refusal(rule, None, source.host_str()).await;
        }
        checked
    }

    /// With `[[policy.normalize]]`: a URL ban covers every URL of the same entry.
    pub fn with_normalizer(mut self, normalizer: crate::policy::Normalizer) -> Self {
        self.normalizer = normalizer;
        self
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the bans in force (at start, from the index).
    fn set_rules(&self, bans: impl IntoIterator<Item = Ban>) {
        let mut all = self.bans.lock().unwrap_or_else(|p| p.into_inner());
        *all = bans.into_iter().map(|b| (b.id(), b)).collect();
        self.rebuild(&all);
    }

    /// Adds (or replaces) a ban. Whether it is new.
    fn add_rule(&self, ban: Ban) -> bool {
        let mut all = self.bans.lock().unwrap_or_else(|p| p.into_inner());
        let new = all.insert(ban.id(), ban).is_none();
        self.rebuild(&all);
        new
    }

    /// Lifts the ban `id`; the ban, if there was one.
    fn remove_rule(&self, id: &str) -> Option<Ban> {
        let mut all = self.bans.lock().unwrap_or_else(|p| p.into_inner());
        let lifted = all.remove(id);
        self.rebuild(&all);
        lifted
    }

    /// Every ban in force.
    pub fn bans(&self) -> Vec<Ban> {
        self.bans.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Replaces the hash lists.
    pub fn set_lists(&self, lists: HashLists) {
        let all = self.bans.lock().unwrap_or_else(|p| p.into_inner());
        let mut rules = self.build(&all);
        rules.lists = Arc::new(lists);
        self.install(rules);
    }

    /// The hash lists in force.
    pub fn lists(&self) -> Arc<HashLists> {
        self.rules().lists.clone()
    }

    fn rebuild(&self, all: &BTreeMap<String, Ban>) {
        let mut rules = self.build(all);
        rules.lists = self.rules().lists.clone();
        self.install(rules);
    }

    fn install(&self, rules: Rules) {
        let request = !rules.urls.is_empty() || !rules.domains.is_empty();
        self.any_request_rule.store(request, Ordering::Release);
        self.any_content_rule.store(!rules.hashes.is_empty(), Ordering::Release);
        let digests = !rules.sha256.is_empty() || !rules.lists.is_empty();
        self.any_digest_rule.store(digests, Ordering::Release);
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    fn build(&self, all: &BTreeMap<String, Ban>) -> Rules {
        let mut rules = Rules::default();
        let hex32 = |v: &str| -> Option<[u8; 32]> { hex::decode(v).ok()?.try_into().ok() };
        for ban in all.values() {
            match ban.kind {
                // In today's canonical form, whatever form it was kept in.
                BanKind::Url => match crate::api::parse_source(&ban.value) {
                    Ok(url) => {
                        rules.urls.insert(self.normalizer.cache_url(&url).into_owned());
                    }
                    Err(_) => {
                        rules.urls.insert(ban.value.clone());
                    }
                },
                BanKind::Hash => rules.hashes.extend(hex32(&ban.value)),
                BanKind::Sha256 => rules.sha256.extend(hex32(&ban.value)),
                BanKind::Domain => rules.domains.push(ban.value.clone()),
            }
        }
        rules
    }

    /// Whether anything must see a new file's bytes before it is served: the scanner, or a
    /// rule by content (bans by hash, hash lists).
    pub fn inspects_content(&self) -> bool {
        self.scanner.is_some()
            || self.any_content_rule.load(Ordering::Acquire)
            || self.wants_digests()
    }

    /// Before any lookup: the source URL (and `cache_url`, the form its cache key is made of,
    /// [`crate::api::ProxyRequest::cache_url`]) and its host.
    pub fn check_request(&self, source: &url::Url, cache_url: &str) -> Result<(), ProxyError> {
        if !self.any_request_rule.load(Ordering::Acquire) {
            return Ok(());
        }
        let rules = self.rules();
        if rules.urls.contains(cache_url) {
            return Err(ProxyError::Banned("url"));
        }
        self.check_host_in(&rules, source.host_str().unwrap_or_default())
    }

    /// A host the bytes came from (the source's, or where a redirect led).
    pub fn check_host(&self, host: &str) -> Result<(), ProxyError> {
        if !self.any_request_rule.load(Ordering::Acquire) {
            return Ok(());
        }
        self.check_host_in(&self.rules(), host)
    }

    fn check_host_in(&self, rules: &Rules, host: &str) -> Result<(), ProxyError> {
        if rules.domains.iter().any(|d| crate::policy::covers(d, host)) {
            return Err(ProxyError::Banned("domain"));
        }
        Ok(())
    }

    /// Content, by its blake3.
    pub fn check_hash(&self, hash: &blake3::Hash) -> Result<(), ProxyError> {
        if !self.any_content_rule.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.rules().hashes.contains(hash.as_bytes()) {
            return Err(ProxyError::Banned("hash"));
        }
        Ok(())
    }

    /// Whether a fill must compute [`Digests`] (a SHA-256 ban or a hash list exists).
    pub fn wants_digests(&self) -> bool {
        self.any_digest_rule.load(Ordering::Acquire)
    }

    /// The origin's bytes, by the digests kept of them (a hit on a prepared entry: a ban
    /// or list made since it was stored); one atomic load while no such rule exists.
    pub fn check_origin_digests(
        &self,
        origin: &crate::cache::index::OriginDigests,
    ) -> Result<(), ProxyError> {
        if !self.wants_digests() {
            return Ok(());
        }
        Digests::of_origin(origin).map_or(Ok(()), |digests| self.check_digests(&digests))
    }

    /// The origin's bytes, by their digests; the rule that refuses them, if any.
    pub fn check_digests(&self, digests: &Digests) -> Result<(), ProxyError> {
        let rules = self.rules();
        if rules.sha256.contains(&digests.sha256) {
            return Err(ProxyError::Banned("sha256"));
        }
        if rules.lists.contains(digests) {
            return Err(ProxyError::Banned("hash_list"));
        }
        Ok(())
    }
}
