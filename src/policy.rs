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

/// Lowercases and checks a configured domain; `None` when it is not a plausible domain name.
pub fn normalize_domain(d: &str) -> Option<String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!d.is_empty() && d.len() <= 253 && d.split('.').all(label_ok)).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(blocked: &[&str], allowed: &[&str]) -> Policy {
        Policy::new(&PolicyConfig {
            blocked_domains: blocked.iter().map(|s| s.to_string()).collect(),
            allowed_domains: allowed.iter().map(|s| s.to_string()).collect(),
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
    fn domain_validation() {
        assert_eq!(normalize_domain("Threads.net."), Some("threads.net".into()));
        assert_eq!(normalize_domain("a..b"), None);
        assert_eq!(normalize_domain("https://threads.net"), None);
    }
}
