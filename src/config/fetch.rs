//! `[fetch]` and `[policy]`: how parasol talks to origins, and which of them it may.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::*;

/// `[fetch]`: how parasol talks to origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// The one User-Agent every origin sees; never the viewer's.
    pub user_agent: String,
    /// Longest time to open a connection to an origin.
    pub connect_timeout: Dur,
    /// Total deadline of one origin fetch, headers and body: the only guard against an origin
    /// that drips a byte at a time.
    pub timeout: Dur,
    /// Deadline for an origin's response headers, per request (redirect hops included).
    pub header_timeout: Dur,
    /// Redirects followed at most, each hop checked like the first.
    pub max_redirects: u32,
    /// CIDRs exempt from the private-address block (exact networks, e.g. `127.0.0.2/32`).
    pub allow_networks: Vec<IpNet>,
    /// Fills from one origin host at once; more wait their turn (within `fetch.timeout`), so a
    /// burst of viewers cannot turn parasol into a flood against one origin.
    pub max_per_origin: u32,
    /// Fills in progress across all origins; beyond this a new fill is refused with 503.
    pub max_fills: u32,
    /// Follow an `https` source's redirect to plain `http`. Off: such a downgrade is refused
    /// (502 `insecure_redirect`).
    pub allow_insecure_redirects: bool,
    /// PEM file of further certificate authorities trusted for origins, besides the usual
    /// web roots (a private CA's origin, or a test's).
    pub ca_file: Option<PathBuf>,
    /// The only ports dialled, except on `allow_networks` addresses (any port there).
    pub ports: Vec<u16>,
    /// Longest wait for a name lookup, answer or not.
    pub dns_timeout: Dur,
    /// Nameservers to ask (`ip:port`); empty: those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            user_agent: concat!("parasol/", env!("CARGO_PKG_VERSION"), " (media proxy)").into(),
            connect_timeout: Dur(Duration::from_secs(5)),
            timeout: Dur(Duration::from_secs(30)),
            header_timeout: Dur(Duration::from_secs(10)),
            max_redirects: 5,
            allow_networks: Vec::new(),
            max_per_origin: 8,
            max_fills: 256,
            allow_insecure_redirects: false,
            ca_file: None,
            ports: vec![80, 443],
            dns_timeout: Dur(Duration::from_secs(5)),
            nameservers: Vec::new(),
        }
    }
}

/// `[policy]`: which origin domains may be fetched at all, and how URLs become cache keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Suffix match on label boundaries: `threads.net` blocks `www.threads.net`.
    pub blocked_domains: Vec<String>,
    /// When non-empty, only these domains (and their subdomains) are fetched.
    pub allowed_domains: Vec<String>,
    /// `[[policy.normalize]]`: URLs that differ only in what a rule ignores share one cache
    /// entry (and one fetch). The default holds Meta's CDNs; a configured list replaces it.
    pub normalize: Vec<NormalizeConfig>,
    /// `[[policy.origin]]`: rules per origin (how its files are kept, how politely it is
    /// asked); the first rule whose domains cover a host applies to it.
    pub origin: Vec<OriginRuleConfig>,
    /// Whether a view may fetch: `allow` (the default), or `never`: a view of a file not
    /// cached yet answers a placeholder and queues the file for a fetch at a random moment
    /// within the feeds' `delay` (5 minutes without a feed), so an origin never sees a fetch
    /// at a moment a viewer chose. Read at start.
    pub view_fetch: ViewFetch,
}

/// Whether a view may fetch from an origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewFetch {
    /// A view of a file not cached fetches it at once (as every media proxy does).
    #[default]
    Allow,
    /// It answers a placeholder and queues the file for a fetch at a random later moment.
    Never,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            blocked_domains: Vec::new(),
            allowed_domains: Vec::new(),
            normalize: meta_cdns(),
            origin: Vec::new(),
            view_fetch: ViewFetch::Allow,
        }
    }
}

/// How an origin's files are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreMode {
    /// Stored in the cache like any other (the default).
    #[default]
    Cache,
    /// Served to its viewers as it arrives (one fetch for all who ask at once) and never
    /// kept: nothing of it is written to the cache's disk or kept in memory.
    Stream,
}

/// One `[[policy.origin]]` rule: what parasol does differently for the hosts under `domains`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginRuleConfig {
    /// Domains the rule covers, matched on whole labels as `blocked_domains` are.
    pub domains: Vec<String>,
    /// `cache` (default) or `stream` (served as it arrives, never kept).
    #[serde(default)]
    pub store: StoreMode,
    /// Its files are not evicted younger than this, within `cache.pinned_share` of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_at_least: Option<Dur>,
    /// Overrides `cache.max_object_bytes` for these origins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_bytes: Option<Size>,
    /// Fetches started per second at most, all its hosts together (politeness): more wait
    /// their turn within `fetch.timeout`, and are answered 503 when that would not do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetches_per_second: Option<f64>,
    /// Overrides `fetch.max_per_origin` for its hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

/// One cache-key rule: for hosts under `host_suffix`, the query parameters named in
/// `ignore_params` (exact names, or prefixes ending in `*`) are not part of the key, and with
/// `merge_hosts` neither is which host under the suffix served it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizeConfig {
    /// The host suffix the rule covers (`cdninstagram.com`).
    pub host_suffix: String,
    /// Query parameters left out of the key (`oh`, `oe`, a `_nc_` prefix as `_nc_*`).
    #[serde(default)]
    pub ignore_params: Vec<String>,
    /// Whether every host under the suffix is one entry (CDN edges of one file).
    #[serde(default)]
    pub merge_hosts: bool,
    /// A query parameter holding the URL's expiry (Unix time, hex): of the URLs seen for one
    /// entry, a fill uses the one that expires last, so a viewer holding an expired URL
    /// still gets the file once a newer URL has been seen.
    #[serde(default)]
    pub expiry_param: Option<String>,
}

/// Meta's CDNs (Threads, Instagram, Facebook media): every re-federation of a post brings the
/// same file under a new signature (`oh`), expiry (`oe`), routing and session hints (`_nc_*`,
/// `ccb`, `edm`, `ig_cache_key`) and often another edge host (`scontent-…`). `stp`, which
/// picks the rendition, stays part of the key.
pub fn meta_cdns() -> Vec<NormalizeConfig> {
    let ignore: Vec<String> = ["oh", "oe", "_nc_*", "ccb", "edm", "ig_cache_key"]
        .into_iter()
        .map(str::to_string)
        .collect();
    ["cdninstagram.com", "fbcdn.net"]
        .into_iter()
        .map(|suffix| NormalizeConfig {
            host_suffix: suffix.into(),
            ignore_params: ignore.clone(),
            merge_hosts: true,
            expiry_param: Some("oe".into()),
        })
        .collect()
}

impl FetchConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.user_agent.is_empty() || http::HeaderValue::from_str(&self.user_agent).is_err() {
            return bad("fetch.user_agent", "must be a non-empty header value");
        }
        if self.dns_timeout.0 < Duration::from_millis(10) {
            return bad("fetch.dns_timeout", "must be at least 10 ms");
        }
        if self.nameservers.iter().any(|a| a.port() != self.nameservers[0].port()) {
            return bad("fetch.nameservers", "all on one port");
        }
        if self.ports.is_empty() || self.ports.contains(&0) {
            return bad("fetch.ports", "needs at least one port, each 1-65535");
        }
        Ok(())
    }
}

impl PolicyConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (key, list) in [
            ("policy.blocked_domains", &self.blocked_domains),
            ("policy.allowed_domains", &self.allowed_domains),
        ] {
            if let Some(d) = list.iter().find(|d| normalize_domain(d).is_none()) {
                return bad(key, format!("{d:?} is not a domain name"));
            }
        }
        for (i, rule) in self.origin.iter().enumerate() {
            rule.check().or_else(|message| bad(&format!("policy.origin[{i}]"), message))?;
        }
        Ok(())
    }
}

impl OriginRuleConfig {
    /// What is wrong with the rule, said as `policy.origin[i]`'s complaint.
    fn check(&self) -> Result<(), String> {
        if self.domains.is_empty() {
            return Err("domains: name at least one domain".into());
        }
        if let Some(d) = self.domains.iter().find(|d| normalize_domain(d).is_none()) {
            return Err(format!("domains: {d:?} is not a domain name"));
        }
        if let Some(rate) = self.fetches_per_second {
            if !(rate.is_finite() && rate > 0.0 && rate <= 10_000.0) {
                return Err("fetches_per_second: must be above 0 and at most 10000".into());
            }
        }
        if self.max_concurrent == Some(0) {
            return Err("max_concurrent: must be at least 1".into());
        }
        if self.max_object_bytes.is_some_and(|s| s.0 == 0) {
            return Err("max_object_bytes: must be above 0".into());
        }
        if self.keep_at_least.is_some_and(|d| d.0.is_zero()) {
            return Err("keep_at_least: must be above 0 (leave it out for no pin)".into());
        }
        Ok(())
    }
}
