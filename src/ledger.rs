//! What each origin costs: per registrable domain ([`crate::policy::origin_of`]), the origin
//! requests made and the bytes they brought, failures, when it was last asked, and the viewers'
//! requests for its files, how many were hits and the bytes served.
//!
//! Fed from the two ends: every line of the outbound audit log counts here as it is written
//! (so `fetched_bytes` is the audit log's bytes for that domain, redirect hops included), and
//! every viewer request of a source counts once it is answered. Counting is a few relaxed
//! atomic adds on counters found by host under a read lock. Kept across restarts in the
//! index's state table ([`Ledger::to_json`], [`Ledger::load_json`]); what is stored of each
//! origin is not counted here but read from the index when asked ([`crate::cache::store`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

/// Domains counted apart at most; the rest are counted together under [`OTHER`].
const MAX_DOMAINS: usize = 50_000;
/// Hosts whose domain is remembered at most (a host's domain is looked up once).
const MAX_HOSTS: usize = 100_000;
/// Where domains beyond the first 50,000 are counted.
pub const OTHER: &str = "(other)";

/// One origin's counters.
#[derive(Debug, Default)]
pub struct Counters {
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    errors: AtomicU64,
    last_fetch: AtomicU64,
    requests: AtomicU64,
    hits: AtomicU64,
    served_bytes: AtomicU64,
}

impl Counters {
    /// One viewer request of its files: a `hit` when no origin fetch was needed for it, and
    /// the body bytes sent.
    pub fn viewed(&self, hit: bool, sent: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        self.served(sent);
    }

    /// Body bytes sent to a viewer.
    pub fn served(&self, bytes: u64) {
        self.served_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn row(&self, domain: &str) -> Row {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Row {
            domain: domain.to_string(),
            fetches: get(&self.fetches),
            fetched_bytes: get(&self.fetched_bytes),
            stored_objects: 0,
            stored_bytes: 0,
            requests: get(&self.requests),
            hits: get(&self.hits),
            served_bytes: get(&self.served_bytes),
            errors: get(&self.errors),
            last_fetch: Some(get(&self.last_fetch)).filter(|t| *t > 0),
        }
    }

    fn add(&self, row: &Row) {
        let add = |a: &AtomicU64, n: u64| a.fetch_add(n, Ordering::Relaxed);
        add(&self.fetches, row.fetches);
        add(&self.fetched_bytes, row.fetched_bytes);
        add(&self.errors, row.errors);
        add(&self.requests, row.requests);
        add(&self.hits, row.hits);
        add(&self.served_bytes, row.served_bytes);
        self.last_fetch.fetch_max(row.last_fetch.unwrap_or(0), Ordering::Relaxed);
    }
}

/// One origin's line of the ledger, as `GET /admin/origins` answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The registrable domain (or `/24`, `/56` network of an address).
    pub domain: String,
    /// Requests sent to its hosts (each redirect hop is one).
    pub fetches: u64,
    /// Body bytes they brought.
    pub fetched_bytes: u64,
    /// Entries stored now whose source is of this domain (from the index).
    #[serde(default)]
    pub stored_objects: u64,
    /// Bytes of those entries (a blob two domains share counts for each).
    #[serde(default)]
    pub stored_bytes: u64,
    /// Viewer requests of its files.
    pub requests: u64,
    /// Of those, the ones answered without an origin fetch.
    pub hits: u64,
    /// Body bytes sent to viewers.
    pub served_bytes: u64,
    /// Requests to its hosts that failed (no answer, timeout, refused, an error status).
    pub errors: u64,
    /// When it was last asked (Unix seconds).
    pub last_fetch: Option<u64>,
}

/// The ledger (see the module).
#[derive(Default)]
pub struct Ledger {
    domains: RwLock<HashMap<Arc<str>, Arc<Counters>>>,
    /// Each host's counters, found on every viewer request (foldhash: a host is hashed per
    /// request, and SipHash's cost there is measurable).
    hosts: RwLock<HashMap<Box<str>, Arc<Counters>, foldhash::fast::RandomState>>,
}

impl Ledger {
    /// One viewer request of `host`'s files: a `hit` when no origin fetch was needed, and
    /// the body bytes sent. One lookup under a read lock, then relaxed adds.
    pub fn viewed(&self, host: &str, hit: bool, sent: u64) {
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = hosts.get(host) {
            return c.viewed(hit, sent);
        }
        drop(hosts);
        self.of_host(host).viewed(hit, sent);
    }

    /// The counters of `host`'s origin.
    pub fn of_host(&self, host: &str) -> Arc<Counters> {
        if let Some(c) = self.hosts.read().unwrap_or_else(|p| p.into_inner()).get(host) {
            return c.clone();
        }
        let counters = self.of_domain(&crate::policy::origin_of(host));
        let mut hosts = self.hosts.write().unwrap_or_else(|p| p.into_inner());
        if hosts.len() < MAX_HOSTS {
            hosts.insert(host.into(), counters.clone());
        }
        counters
    }

    fn of_domain(&self, domain: &str) -> Arc<Counters> {
        if let Some(c) = self.domains.read().unwrap_or_else(|p| p.into_inner()).get(domain) {
            return c.clone();
        }
        let mut domains = self.domains.write().unwrap_or_else(|p| p.into_inner());
        let domain = if domains.len() < MAX_DOMAINS { domain } else { OTHER };
        domains.entry(domain.into()).or_default().clone()
    }

    /// One request sent to `host` (a line of the audit log): its body bytes, whether it
    /// failed, when (Unix seconds).
    pub fn fetched(&self, host: &str, bytes: u64, failed: bool, at: u64) {
        let c = self.of_host(host);
        c.fetches.fetch_add(1, Ordering::Relaxed);
        c.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
        if failed {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.last_fetch.fetch_max(at, Ordering::Relaxed);
    }

    /// Every origin's counters (stored objects and bytes left at 0 for the caller to fill).
    pub fn rows(&self) -> Vec<Row> {
        let domains = self.domains.read().unwrap_or_else(|p| p.into_inner());
        domains.iter().map(|(d, c)| c.row(d)).collect()
    }

    /// The counters as kept in the index.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.rows()).unwrap_or_default()
    }

    /// Adds counters kept by an earlier run; a value that does not parse is reported and
    /// nothing of it is taken.
    pub fn load_json(&self, bytes: &[u8]) -> Result<usize, serde_json::Error> {
        let rows: Vec<Row> = serde_json::from_slice(bytes)?;
        for row in &rows {
            self.of_domain(&row.domain).add(row);
        }
        Ok(rows.len())
    }
}

/// How `GET /admin/origins` and `parasol usage` order the rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortBy {
    /// Bytes stored now (the default).
    #[default]
    Stored,
    /// Bytes fetched.
    Fetched,
    /// Bytes served.
    Served,
    /// Viewer requests.
    Requests,
}

impl std::str::FromStr for SortBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stored" => Ok(Self::Stored),
            "fetched" => Ok(Self::Fetched),
            "served" => Ok(Self::Served),
            "requests" => Ok(Self::Requests),
            other => {
                Err(format!("sort must be stored, fetched, served or requests, not {other:?}"))
            }
        }
    }
}

/// `rows` ordered by `by` (largest first, then by domain), at most `limit` of them.
pub fn sorted(mut rows: Vec<Row>, by: SortBy, limit: usize) -> Vec<Row> {
    let key = |r: &Row| match by {
        SortBy::Stored => r.stored_bytes,
        SortBy::Fetched => r.fetched_bytes,
        SortBy::Served => r.served_bytes,
        SortBy::Requests => r.requests,
    };
    rows.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.domain.cmp(&b.domain)));
    rows.truncate(limit);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_count_under_their_domain_and_survive_a_round_trip() {
        let ledger = Ledger::default();
        ledger.fetched("scontent-a.cdninstagram.com", 100, false, 10);
        ledger.fetched("scontent-b.cdninstagram.com", 50, true, 20);
        ledger.viewed("x.cdninstagram.com", true, 150);
        ledger.fetched("files.example.test", 7, false, 5);
        let rows = sorted(ledger.rows(), SortBy::Fetched, 10);
        assert_eq!(rows.len(), 2);
        let meta = &rows[0];
        assert_eq!(meta.domain, "cdninstagram.com");
        assert_eq!((meta.fetches, meta.fetched_bytes, meta.errors), (2, 150, 1));
        assert_eq!((meta.requests, meta.hits, meta.served_bytes), (1, 1, 150));
        assert_eq!(meta.last_fetch, Some(20));
        let again = Ledger::default();
        assert_eq!(again.load_json(&ledger.to_json()).unwrap(), 2);
        assert_eq!(sorted(again.rows(), SortBy::Fetched, 10), rows);
        assert!(again.load_json(b"{not json").is_err());
        assert_eq!(sorted(ledger.rows(), SortBy::Fetched, 1).len(), 1);
    }
}
