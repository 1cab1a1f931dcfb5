//! Domain policy: which origin hosts may be fetched at all.
//!
//! Matching is by whole labels from the right, so `threads.net` covers `www.threads.net` and
//! `threads.net.` but never `notthreads.net`. The check runs on the source URL and again on every
//! redirect hop, before any DNS lookup or connection.

use crate::config::PolicyConfig;
use crate::error::ProxyError;

/// The compiled `[policy]` section.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Normalised (lowercase, no trailing dot) blocked suffixes.
    blocked: Vec<String>,
    /// Normalised allowed suffixes; empty means "any domain not blocked".
    allowed: Vec<String>,
}

impl Policy {
    /// The policy `config` describes.
    pub fn new(config: &PolicyConfig) -> Self {
        let norm = |list: &[String]| list.iter().filter_map(|d| normalize_domain(d)).collect();
        Self { blocked: norm(&config.blocked_domains), allowed: norm(&config.allowed_domains) }
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

    #[test]
    fn domain_validation() {
        assert_eq!(normalize_domain("Threads.net."), Some("threads.net".into()));
        assert_eq!(normalize_domain("a..b"), None);
        assert_eq!(normalize_domain("https://threads.net"), None);
    }
}
