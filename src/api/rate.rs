//! How many origin fills the unsigned routes may cause per source origin and minute
//! (`compat.misskey_fills_per_minute`, `compat.pictrs_fills_per_minute`), and all together
//! (`compat.unsigned_fills_per_minute`). Anyone who can reach such a route can ask it for any
//! URL, so this is what stands between a stranger and parasol fetching on their behalf.
//!
//! - **By origin** ([`crate::policy::origin_of`]): `a.cdn.example`, `b.cdn.example` and
//!   `cdn.example` share one allowance, as do the addresses of one IPv4 /24 or IPv6 /56, and
//!   the names of one private suffix (`*.workers.dev`), so inventing names or addresses buys
//!   nothing; and a budget for all origins together caps what many origins can add up to.
//! - **Bounded memory**: windows live in a moka cache of at most `CAPACITY` origins that
//!   forgets an origin two minutes after its window began; a flood of distinct origins evicts
//!   old windows instead of growing a map, and nothing is ever scanned per request. Source
//!   hosts are at most 253 bytes ([`crate::api::parse_source`]), and so is an origin.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Domains with a window at once. Each costs well under 200 bytes.
const CAPACITY: u64 = 100_000;

/// One route's fill allowance per origin and minute.
pub struct DomainRate {
    per_minute: u32,
    /// Per domain, the current minute (high 32 bits) and the fills counted in it (low 32).
    windows: moka::sync::Cache<String, Arc<AtomicU64>>,
}

impl DomainRate {
    /// An allowance of `per_minute` fills per origin.
    pub fn new(per_minute: u32) -> Self {
        let windows = moka::sync::Cache::builder()
            .max_capacity(CAPACITY)
            .time_to_live(Duration::from_secs(120))
            .build();
        Self { per_minute, windows }
    }

    /// Counts one fill for `host`'s origin; false when this minute's allowance is spent.
    pub fn allow(&self, host: &str) -> bool {
        self.allow_at(host, crate::cache::evict::now_secs() / 60)
    }

    fn allow_at(&self, host: &str, minute: u64) -> bool {
        let origin = crate::policy::origin_of(host);
        let window = self.windows.get_with(origin, || Arc::new(AtomicU64::new(0)));
        count_in(&window, minute, self.per_minute)
    }

    /// Domains with a window (for tests).
    pub fn domains(&self) -> u64 {
        self.windows.run_pending_tasks();
        self.windows.entry_count()
    }
}

/// Counts one in `window` (the current minute in its high 32 bits, the count in the low 32);
/// false when `per_minute` are counted in `minute` already.
fn count_in(window: &AtomicU64, minute: u64, per_minute: u32) -> bool {
    let minute = minute & 0xffff_ffff;
    let mut current = window.load(Ordering::Relaxed);
    loop {
        let count = if current >> 32 == minute { current & 0xffff_ffff } else { 0 };
        if count >= u64::from(per_minute) {
            return false;
        }
        let next = (minute << 32) | (count + 1);
        match window.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => current = seen,
        }
    }
}

/// The allowances of the unsigned routes: each route's per origin, and one for all together.
pub struct Unsigned {
    /// The Misskey route's allowance per origin.
    pub misskey: DomainRate,
    /// The pict-rs API's allowance per origin.
    pub pictrs: DomainRate,
    all_per_minute: u32,
    all: AtomicU64,
}

impl Unsigned {
    /// The allowances `compat` sets.
    pub fn new(compat: &crate::config::CompatConfig) -> Self {
        Self {
            misskey: DomainRate::new(compat.misskey_fills_per_minute),
            pictrs: DomainRate::new(compat.pictrs_fills_per_minute),
            all_per_minute: compat.unsigned_fills_per_minute,
            all: AtomicU64::new(0),
        }
    }

    /// Counts one fill of `host` through `route`'s allowance, then the one of all origins;
    /// false when either is spent this minute.
    pub fn allow(&self, route: &DomainRate, host: &str) -> bool {
        let minute = crate::cache::evict::now_secs() / 60;
        route.allow_at(host, minute) && count_in(&self.all, minute, self.all_per_minute)
    }
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
        // One /24, one allowance; another /24, another.
        assert!(rate.allow_at("192.0.2.1", 7) && rate.allow_at("192.0.2.2", 7));
        assert!(rate.allow_at("192.0.2.3", 7) && !rate.allow_at("192.0.2.4", 7));
        assert!(rate.allow_at("198.51.100.1", 7));
        // One private suffix, one allowance.
        let rate = DomainRate::new(2);
        assert!(rate.allow_at("a.workers.dev", 7) && rate.allow_at("b.workers.dev", 7));
        assert!(!rate.allow_at("c.workers.dev", 7));
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
