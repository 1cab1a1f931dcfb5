//! How many origin fills the unsigned Misskey route may cause per source domain and minute
//! (`compat.misskey_fills_per_minute`). Anyone can ask that route for any URL, so this is what
//! stands between a stranger and parasol fetching on their behalf.
//!
//! - **By registrable domain** (the public suffix list, through `psl`): `a.cdn.example`,
//!   `b.cdn.example` and `cdn.example` share one allowance, so inventing subdomains buys
//!   nothing. IP addresses and names the list does not know count as themselves.
//! - **Bounded memory**: windows live in a moka cache of at most `CAPACITY` domains that
//!   forgets a domain two minutes after its window began; a flood of distinct domains evicts
//!   old windows instead of growing a map, and nothing is ever scanned per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Domains with a window at once. Each costs well under 200 bytes.
const CAPACITY: u64 = 100_000;

pub struct DomainRate {
    per_minute: u32,
    /// Per domain, the current minute (high 32 bits) and the fills counted in it (low 32).
    windows: moka::sync::Cache<String, Arc<AtomicU64>>,
}

impl DomainRate {
    pub fn new(per_minute: u32) -> Self {
        let windows = moka::sync::Cache::builder()
            .max_capacity(CAPACITY)
            .time_to_live(Duration::from_secs(120))
            .build();
        Self { per_minute, windows }
    }

    /// Counts one fill for `host`'s domain; false when this minute's allowance is spent.
    pub fn allow(&self, host: &str) -> bool {
        self.allow_at(host, crate::cache::evict::now_secs() / 60)
    }

    fn allow_at(&self, host: &str, minute: u64) -> bool {
        let window = self.windows.get_with(domain_of(host), || Arc::new(AtomicU64::new(0)));
        let minute = minute & 0xffff_ffff;
        let mut current = window.load(Ordering::Relaxed);
        loop {
            let count = if current >> 32 == minute { current & 0xffff_ffff } else { 0 };
            if count >= u64::from(self.per_minute) {
                return false;
            }
            let next = (minute << 32) | (count + 1);
            match window.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Domains with a window (for tests).
    pub fn domains(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }
}

/// The registrable domain of `host` (`b.cdn.example.co.uk` → `example.co.uk`), or `host`
/// itself for an IP address or a name outside the list.
fn domain_of(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return host;
    }
    psl::domain_str(&host).map(str::to_string).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_share_their_domain_s_allowance() {
        let rate = DomainRate::new(3);
        assert!(rate.allow_at("a.cdn.example.com", 7));
        assert!(rate.allow_at("b.cdn.example.com", 7));
        assert!(rate.allow_at("EXAMPLE.com.", 7));
        assert!(!rate.allow_at("c.example.com", 7), "one allowance for example.com");
        assert!(rate.allow_at("x.example.co.uk", 7), "another domain");
        assert!(rate.allow_at("a.example.com", 8), "a new minute");
        assert!(rate.allow_at("192.0.2.1", 7) && rate.allow_at("192.0.2.2", 7));
        assert_eq!(domain_of("media.threads.net"), "threads.net");
        assert_eq!(domain_of("scontent.cdninstagram.com"), "cdninstagram.com");
    }

    #[test]
    fn a_flood_of_domains_stays_within_the_capacity() {
        let rate = DomainRate::new(1);
        for n in 0..(CAPACITY + 20_000) {
            rate.allow_at(&format!("d{n}.test"), 1);
        }
        assert!(rate.domains() <= CAPACITY, "{} windows", rate.domains());
    }
}
