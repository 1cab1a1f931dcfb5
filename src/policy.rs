//! Domain policy: which origin hosts may be fetched at all.
//!
//! Matching is by whole labels from the right, so `threads.net` covers `www.threads.net` and
//! `threads.net.` but never `notthreads.net`. The check runs on the source URL and again on every
//! redirect hop, before any DNS lookup or connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{PolicyConfig, StoreMode};
use crate::error::ProxyError;

/// The compiled `[policy]` section.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Normalised (lowercase, no trailing dot) blocked suffixes.
    blocked: Vec<String>,
    /// Normalised allowed suffixes; empty means "any domain not blocked".
    allowed: Vec<String>,
    /// `[[policy.origin]]`, in order: the first that covers a host applies.
    origins: Vec<Arc<OriginRule>>,
}

/// A compiled `[[policy.origin]]` rule.
#[derive(Debug)]
pub struct OriginRule {
    /// Normalised domains it covers.
    pub domains: Vec<String>,
    /// Kept in the cache, or streamed and never kept.
    pub store: StoreMode,
    /// Not evicted younger than this (within `cache.pinned_share`).
    pub keep_at_least: Option<Duration>,
    /// Its `cache.max_object_bytes`.
    pub max_object_bytes: Option<u64>,
    /// Its `fetch.max_per_origin`.
    pub max_concurrent: Option<usize>,
    /// Its fetches' turns, when `fetches_per_second` is set (all its hosts share them).
    pub pace: Option<Pace>,
}

/// Turns for fetches, `per_second` at most, evenly spaced (no burst): a fetch waits for the
/// next free turn, or is refused at once when that turn comes after its deadline.
#[derive(Debug)]
pub struct Pace {
    interval: Duration,
    /// When the next turn is free.
    next: Mutex<Instant>,
}

impl Pace {
    /// Turns `per_second` apart.
    pub fn new(per_second: f64) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this fetch's turn; [`ProxyError::OriginPaced`] at once (no turn taken) when
    /// it would come after `deadline`.
    pub async fn turn(&self, deadline: Instant) -> Result<(), ProxyError> {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            if at > deadline {
                return Err(ProxyError::OriginPaced);
            }
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
        Ok(())
    }
}

impl Policy {
    /// The policy `config` describes.
    pub fn new(config: &PolicyConfig) -> Self {
        let norm = |list: &[String]| list.iter().filter_map(|d| normalize_domain(d)).collect();
        let origins = config
            .origin
            .iter()
            .map(|rule| {
                Arc::new(OriginRule {
                    domains: norm(&rule.domains),
                    store: rule.store,
                    keep_at_least: rule.keep_at_least.map(|d| d.0),
                    max_object_bytes: rule.max_object_bytes.map(|s| s.0),
                    max_concurrent: rule.max_concurrent.map(|n| n as usize),
                    pace: rule.fetches_per_second.map(Pace::new),
                })
            })
            .collect();
        Self {
            blocked: norm(&config.blocked_domains),
            allowed: norm(&config.allowed_domains),
            origins,
        }
    }

    /// The `[[policy.origin]]` rule for `host`: the first whose domains cover it.
    pub fn rule(&self, host: &str) -> Option<&Arc<OriginRule>> {
        self.origins.iter().find(|r| r.domains.iter().any(|d| covers(d, host)))
    }

    /// The domains named by rules, in order (the ledger's metric labels).
    pub fn rule_domains(&self) -> impl Iterator<Item = &str> {
        self.origins.iter().flat_map(|r| r.domains.iter().map(String::as_str))
    }

    /// Ok when `host` (a domain or an IP literal as the URL spells it) may be fetched.
    pub fn check(&self, host: &str) -> Result<(), ProxyError> {
        if self.blocked.iter().any(|d| covers(d, host)) {
            return Err(ProxyError::BlockedDomain);
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|d| covers(d, host)) {
            return Err(ProxyError::BlockedDomain);
        }
        Ok(())
    }
}

/// Whether `domain` (normalised) equals `host` or is a whole-label suffix of it, ignoring
/// ASCII case and a trailing dot on `host`. Compares bytes in place: it runs on every request.
pub fn covers(domain: &str, host: &str) -> bool {
    let (h, d) = (host.trim_end_matches('.').as_bytes(), domain.as_bytes());
    h.len() >= d.len()
        && h[h.len() - d.len()..].eq_ignore_ascii_case(d)
        && (h.len() == d.len() || h[h.len() - d.len() - 1] == b'.')
}

pub use crate::config::normalize_domain;

/// The origin a host's costs are counted under: what one party controls, so that inventing
/// names or addresses buys nothing. Media jobs get a fair share of the workers per origin,
/// and the unsigned routes an allowance of fills.
///
/// - A domain name counts as its registrable domain under the ICANN section of the public
///   suffix list (`a.b.cdn.example.co.uk` → `example.co.uk`). The list's private section is
///   ignored on purpose: there, anyone can register a name (`*.workers.dev`, `*.github.io`)
///   and would get an allowance per name.
/// - An IPv4 address counts as its /24, an IPv6 address as its /56 (the smallest block an
///   ISP commonly assigns a customer), an IPv4-mapped IPv6 address as its IPv4 /24.
pub fn origin_of(host: &str) -> String {
    let host = host.trim_end_matches('.');
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        let prefix = if ip.is_ipv4() { 24 } else { 56 };
        return ipnet::IpNet::new(ip, prefix)
            .map_or_else(|_| ip.to_string(), |n| n.trunc().to_string());
    }
    let host = host.to_ascii_lowercase();
    let suffix = icann_suffix_len(host.as_bytes());
    if suffix >= host.len() {
        return host;
    }
    // One label more than the suffix.
    let rest = &host[..host.len() - suffix - 1];
    let label = rest.rsplit('.').next().unwrap_or(rest);
    host[host.len() - suffix - 1 - label.len()..].to_string()
}

/// The site a host belongs to, for penalties that must not reach other tenants of a shared
/// host: its registrable domain under the whole public suffix list, private section included
/// (each `*.r2.dev` bucket, each `*.github.io` page is a site of its own, while
/// `a.attacker.example` and `b.attacker.example` are one). An IP address is itself.
pub fn site_of(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(&host);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return bare.to_string();
    }
    psl::domain_str(&host).map_or_else(|| host.clone(), str::to_string)
}

/// Length of the public suffix of `name` (lowercase, no trailing dot) under the list's ICANN
/// section: where the longest match is a private suffix, the ICANN suffix below it. 0 when
/// the list knows none.
fn icann_suffix_len(name: &[u8]) -> usize {
    let mut tail = name;
    loop {
        let Some(suffix) = psl::suffix(tail) else { return 0 };
        let len = suffix.as_bytes().len();
        if suffix.typ() != Some(psl::Type::Private) {
            return len;
        }
        // The private suffix's parent: drop its leftmost label and look again.
        let private = &tail[tail.len() - len..];
        match private.iter().position(|b| *b == b'.') {
            Some(dot) => tail = &private[dot + 1..],
            None => return 0,
        }
    }
}

/// The compiled `[[policy.normalize]]` rules: the URL a cache key is made of.
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    rules: Vec<crate::config::NormalizeConfig>,
}

impl Normalizer {
    /// The rules `rules` describe (invalid suffixes left out).
    pub fn new(rules: &[crate::config::NormalizeConfig]) -> Self {
        let rules = rules
            .iter()
            .filter_map(|r| {
                let host_suffix = normalize_domain(&r.host_suffix)?;
                Some(crate::config::NormalizeConfig { host_suffix, ..r.clone() })
            })
            .collect();
        Self { rules }
    }

    /// The expiry `url` carries (`expiry_param`, hex Unix time), where a rule names one.
    pub fn expiry(&self, url: &url::Url) -> Option<u64> {
        let host = url.host_str()?;
        let rule = self.rules.iter().find(|r| covers(&r.host_suffix, host))?;
        let name = rule.expiry_param.as_deref()?;
        let (_, value) = url.query_pairs().find(|(k, _)| k == name)?;
        u64::from_str_radix(&value, 16).ok()
    }

    /// The form of `url` its cache key is made of: the URL itself, or where a rule covers its
    /// host, without the parameters the rule ignores (the rest sorted) and, with
    /// `merge_hosts`, with the rule's suffix as its host. A fetch always uses the URL itself.
    pub fn cache_url<'a>(&self, url: &'a url::Url) -> std::borrow::Cow<'a, str> {
        use std::borrow::Cow;
        let Some(host) = url.host_str() else { return Cow::Borrowed(url.as_str()) };
        let Some(rule) = self.rules.iter().find(|r| covers(&r.host_suffix, host)) else {
            return Cow::Borrowed(url.as_str());
        };
        let ignored = |name: &str| {
            rule.ignore_params.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            })
        };
        let mut kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| !ignored(k))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        kept.sort();
        let mut key = url.clone();
        key.set_query(None);
        if !kept.is_empty() {
            key.query_pairs_mut().extend_pairs(kept);
        }
        if rule.merge_hosts && key.set_host(Some(&rule.host_suffix)).is_err() {
            return Cow::Borrowed(url.as_str());
        }
        Cow::Owned(key.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_urls_differing_in_signature_expiry_and_edge_share_a_key() {
        let n = Normalizer::new(&crate::config::meta_cdns());
        let a = url::Url::parse(
            "https://scontent-lga3-1.cdninstagram.com/v/t51.2885-15/1_n.jpg?stp=dst-jpg_e35\
             &_nc_ht=scontent-lga3-1.cdninstagram.com&_nc_gid=abc&oh=00_AAA&oe=67A1B2C3",
        )
        .unwrap();
        let b = url::Url::parse(
            "https://scontent-iad3-2.cdninstagram.com/v/t51.2885-15/1_n.jpg?oe=67FFFFFF\
             &oh=00_BBB&_nc_gid=xyz&stp=dst-jpg_e35",
        )
        .unwrap();
        assert_eq!(n.cache_url(&a), n.cache_url(&b));
        assert_eq!(
            n.cache_url(&a),
            "https://cdninstagram.com/v/t51.2885-15/1_n.jpg?stp=dst-jpg_e35"
        );
        // Another rendition (stp) or another file stays another entry; other hosts untouched.
        let c = url::Url::parse(
            "https://scontent-x.cdninstagram.com/v/t51.2885-15/1_n.jpg?stp=s150x150",
        )
        .unwrap();
        assert_ne!(n.cache_url(&a), n.cache_url(&c));
        let other = url::Url::parse("https://media.example.test/a.jpg?oh=1&oe=2").unwrap();
        assert_eq!(n.cache_url(&other), other.as_str());
        assert!(matches!(n.cache_url(&other), std::borrow::Cow::Borrowed(_)));
    }

    fn policy(blocked: &[&str], allowed: &[&str]) -> Policy {
        Policy::new(&PolicyConfig {
            blocked_domains: blocked.iter().map(|s| s.to_string()).collect(),
            allowed_domains: allowed.iter().map(|s| s.to_string()).collect(),
            ..PolicyConfig::default()
        })
    }

    #[test]
    fn suffix_match_on_label_boundaries() {
        let p = policy(&["Threads.NET"], &[]);
        assert!(p.check("threads.net").is_err());
        assert!(p.check("www.threads.net").is_err());
        assert!(p.check("cdn.www.THREADS.net.").is_err());
        assert!(p.check("notthreads.net").is_ok());
        assert!(p.check("threads.net.example.test").is_ok());
    }

    #[test]
    fn allow_list_admits_only_listed() {
        let p = policy(&["bad.friends.test"], &["friends.test"]);
        assert!(p.check("media.friends.test").is_ok());
        assert!(p.check("bad.friends.test").is_err());
        assert!(p.check("stranger.test").is_err());
    }

    #[test]
    fn origins_are_what_one_party_controls() {
        assert_eq!(origin_of("a.b.cdn.example.co.uk"), "example.co.uk");
        assert_eq!(origin_of("Media.Threads.NET."), "threads.net");
        assert_eq!(origin_of("scontent.cdninstagram.com"), "cdninstagram.com");
        // The private section buys nothing: every worker is one origin.
        assert_eq!(origin_of("attacker-1.workers.dev"), "workers.dev");
        assert_eq!(origin_of("x.y.attacker-2.workers.dev"), "workers.dev");
        assert_eq!(origin_of("someone.github.io"), "github.io");
        assert_eq!(origin_of("files.example.test"), "example.test");
        assert_eq!(origin_of("192.0.2.1"), "192.0.2.0/24");
        assert_eq!(origin_of("192.0.2.254"), "192.0.2.0/24");
        assert_ne!(origin_of("192.0.3.1"), origin_of("192.0.2.1"));
        assert_eq!(origin_of("[2001:db8:0:12::1]"), "2001:db8::/56");
        assert_eq!(origin_of("[2001:db8:0:ff::1]"), "2001:db8::/56");
        assert_ne!(origin_of("[2001:db8:0:100::1]"), "2001:db8::/56");
        assert_eq!(origin_of("[::ffff:192.0.2.7]"), "192.0.2.0/24");
        assert_eq!(origin_of("localhost"), "localhost");
        // Sites, for penalties: tenants of a shared host are apart, an owner's names are one.
        assert_eq!(site_of("bucket-1.r2.dev"), "bucket-1.r2.dev");
        assert_ne!(site_of("bucket-1.r2.dev"), site_of("bucket-2.r2.dev"));
        assert_eq!(site_of("a.files.attacker.test"), site_of("b.attacker.test"));
        assert_eq!(site_of("192.0.2.7"), "192.0.2.7");
    }

    #[tokio::test(start_paused = true)]
    async fn paced_turns_are_spaced_and_a_turn_past_the_deadline_is_refused_at_once() {
        let pace = Pace::new(4.0);
        let start = Instant::now();
        let far = start + Duration::from_secs(60);
        for i in 0..5u32 {
            pace.turn(far).await.unwrap();
            assert_eq!(Instant::now() - start, Duration::from_millis(250) * i);
        }
        // The next turn is 250 ms away: a fill due back sooner is refused without waiting,
        // and takes no turn from the next.
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!(pace.turn(soon).await, Err(ProxyError::OriginPaced)));
        assert_eq!(Instant::now() - start, Duration::from_millis(1000));
        pace.turn(far).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(1250));
    }

    #[test]
    fn the_first_origin_rule_that_covers_a_host_applies() {
        let text = r#"
            [[policy.origin]]
            domains = ["cdn.example.test"]
            max_concurrent = 1
            [[policy.origin]]
            domains = ["example.test", "other.test"]
            store = "stream"
            keep_at_least = "7d"
        "#;
        let config = crate::Config::from_sources("t", text, std::iter::empty()).unwrap();
        let p = Policy::new(&config.policy);
        assert_eq!(p.rule("a.cdn.example.test").unwrap().max_concurrent, Some(1));
        let second = p.rule("www.example.test").unwrap();
        assert_eq!(second.store, StoreMode::Stream);
        assert_eq!(second.keep_at_least, Some(Duration::from_secs(7 * 86_400)));
        assert!(p.rule("Other.Test.").is_some());
        assert!(p.rule("notexample.test").is_none());
        let key = |text: &str| match crate::Config::from_sources("t", text, std::iter::empty()) {
            Err(crate::config::ConfigError::Key { key, message }) => format!("{key}: {message}"),
            other => panic!("{text}: {other:?}"),
        };
        for (bad, says) in [
            ("domains = []", "domains"),
            ("domains = [\"https://x.test\"]", "not a domain"),
            ("domains = [\"x.test\"]\nfetches_per_second = 0", "fetches_per_second"),
            ("domains = [\"x.test\"]\nmax_concurrent = 0", "max_concurrent"),
            ("domains = [\"x.test\"]\nstore = \"disk\"", "store"),
            ("domains = [\"x.test\"]\nkeep_at_least = \"0s\"", "keep_at_least"),
        ] {
            let message = key(&format!("[[policy.origin]]\n{bad}\n"));
            assert!(message.contains("policy.origin") && message.contains(says), "{message}");
        }
    }

    #[test]
    fn domain_validation() {
        assert_eq!(normalize_domain("Threads.net."), Some("threads.net".into()));
        assert_eq!(normalize_domain("a..b"), None);
        assert_eq!(normalize_domain("https://threads.net"), None);
    }
}
