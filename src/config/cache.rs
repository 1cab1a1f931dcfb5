//! `[cache]`, `[shared]` and `[[upstream]]`: where files are kept, the bucket nodes share, and the
//! buckets parasol stands in front of.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// `[cache]`: the memory and disk tiers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Holds the blob store, the index, the generated signing key and (by default) the audit log.
    pub dir: PathBuf,
    /// Budget of the in-memory tier, weighed in body bytes.
    pub memory_bytes: Size,
    /// Objects larger than this are served from disk and never enter memory, so one video cannot
    /// push out thousands of avatars.
    pub memory_max_object_bytes: Size,
    /// Budget of the disk tier.
    pub disk_bytes: Size,
    /// Files up to this size (and up to `memory_max_object_bytes`) are kept in a few large
    /// segment files under `<dir>/segments` instead of a file each: storing one is a write
    /// into an open file, evicting one frees its blocks without an unlink. 1 MiB by default
    /// (bodies above 1 MiB are received into a file of their own, which they keep); 0 keeps
    /// a file per blob.
    pub segment_max_object_bytes: Size,
    /// Larger origin bodies are refused with 413 (checked on Content-Length and while streaming).
    pub max_object_bytes: Size,
    /// Entries nobody asked for in this long may be dropped.
    pub retention: Dur,
    /// How long a failed fetch is remembered, so a dead origin is not hammered by every viewer.
    pub negative_ttl: Dur,
    /// fsync each blob above `memory_max_object_bytes` before it is renamed into place (smaller
    /// ones are re-hashed on every load, so a torn one is refetched, never served). Off trades
    /// crash safety for fill speed: after a power cut a large blob may hold wrong bytes.
    pub fsync: bool,
    /// Share of `disk_bytes` that files pinned by a `[[policy.origin]]` rule's `keep_at_least`
    /// may hold; pinned files beyond it are evicted as usual, oldest first.
    pub pinned_share: f64,
    /// What becomes of a file over `max_object_bytes` (or its origin rule's): `refuse` (413,
    /// the default) or `stream` (streamed to its viewers, never kept).
    pub oversize: Oversize,
}

/// What becomes of a file over its size limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Oversize {
    /// 413 `too_large`.
    #[default]
    Refuse,
    /// Streamed to its viewers as it arrives and never kept.
    Stream,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("cache"),
            memory_bytes: Size(256 << 20),
            memory_max_object_bytes: Size(8 << 20),
            disk_bytes: Size(10 << 30),
            segment_max_object_bytes: Size(1 << 20),
            max_object_bytes: Size(100 << 20),
            retention: Dur(Duration::from_secs(30 * 86_400)),
            negative_ttl: Dur(Duration::from_secs(30)),
            fsync: true,
            pinned_share: 0.5,
            oversize: Oversize::Refuse,
        }
    }
}

/// `[shared]`: an S3-compatible bucket (AWS S3, Garage, MinIO, Ceph RGW, R2) that several
/// parasol nodes share. Off until `endpoint` is set. Blobs keep their blake3 names there, so any
/// node can serve what another fetched: a node that lost its disk refills from the bucket, not
/// from the origin. The bucket is the operator's own storage, so it is not subject to
/// `fetch.allow_networks` and its requests are not in the outbound audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharedConfig {
    /// `http(s)://host:port` of the S3 API; empty turns the shared tier off.
    pub endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// Its region (`us-east-1` when empty).
    pub region: String,
    /// The access key id to sign requests with.
    pub access_key_id: String,
    /// Its secret (redacted wherever the configuration is shown).
    #[serde(serialize_with = "redact_str")]
    pub secret_access_key: String,
    /// Prefix of every object name, so one bucket can hold other things too.
    pub prefix: String,
    /// Longest wait for one request to the bucket; beyond it parasol goes on without it.
    pub timeout: Dur,
    /// `bucket.host` addressing instead of `host/bucket` (AWS needs it for new buckets).
    pub virtual_hosted_style: bool,
}

impl Default for SharedConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            prefix: "parasol/".into(),
            timeout: Dur(Duration::from_secs(5)),
            virtual_hosted_style: false,
        }
    }
}

/// One `[[upstream]]`: requests on `server.listen` whose path starts with `prefix` (and, when
/// `host` is set, whose `Host` is `host`) are files of one fixed origin: `origin`, a plain
/// http(s) base URL, or the S3 bucket in `s3` (private buckets: requests are signed). What
/// follows the prefix is the object's path below the origin; the query is not passed on.
/// Fetched through the same guard as any source (a bucket on a private network needs
/// `fetch.allow_networks`), cached and served like everything else.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Starts and ends with `/`; `/` takes every path the built-in routes do not.
    pub prefix: String,
    /// Only requests for this host name (the `Host` header, port ignored). Empty: any host;
    /// then the built-in routes (`/m/`, `/proxy/`, ...) are matched first.
    pub host: String,
    /// Base URL the rest of the path is appended to, e.g. `https://files.example.social/`.
    pub origin: String,
    /// Or an S3-compatible bucket, read with credentials.
    pub s3: Option<UpstreamS3>,
}

impl UpstreamConfig {
    /// Checks the entry's settings (at load).
    pub fn check(&self) -> Result<(), String> {
        let u = self;
        if !u.prefix.starts_with('/') || !u.prefix.ends_with('/') {
            return Err(format!("prefix {:?} must start and end with '/'", u.prefix));
        }
        if u.prefix.contains("//") || u.prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(format!("prefix {:?} has an empty, '.' or '..' segment", u.prefix));
        }
        if !u.host.is_empty() && normalize_domain(&u.host).is_none() {
            return Err(format!("host {:?} is not a host name", u.host));
        }
        match (&u.s3, u.origin.is_empty()) {
            (Some(_), false) => Err("set origin or s3, not both".into()),
            (None, true) => Err("needs origin (a URL) or s3 (a bucket)".into()),
            (None, false) => {
                let url = http_url("origin", &u.origin)?;
                let ok =
                    url.username().is_empty() && url.password().is_none() && url.query().is_none();
                match ok {
                    true => Ok(()),
                    false => Err(format!(
                        "origin {:?} must be an http(s) URL without credentials or query",
                        u.origin
                    )),
                }
            }
            (Some(s3), true) => {
                http_url("s3.endpoint", &s3.endpoint)?;
                if s3.bucket.is_empty()
                    || s3.access_key_id.is_empty()
                    || s3.secret_access_key.is_empty()
                {
                    return Err("s3 needs bucket, access_key_id and secret_access_key".into());
                }
                Ok(())
            }
        }
    }
}

/// An S3-compatible bucket an `[[upstream]]` reads with signed requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamS3 {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// Its region (`us-east-1` when empty).
    pub region: String,
    /// The access key id to sign requests with.
    pub access_key_id: String,
    /// Its secret (redacted wherever the configuration is shown).
    #[serde(serialize_with = "redact_str")]
    pub secret_access_key: String,
    /// Prepended to the path to name the object, e.g. `mastodon/` when the files sit there.
    pub key_prefix: String,
    /// `bucket.host` addressing instead of `host/bucket`.
    pub virtual_hosted_style: bool,
}

impl CacheConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.memory_bytes.0 == 0 || self.max_object_bytes.0 == 0 {
            return bad("cache", "memory_bytes and max_object_bytes must be above zero");
        }
        if !(0.0..=1.0).contains(&self.pinned_share) {
            return bad("cache.pinned_share", "must be between 0 and 1");
        }
        Ok(())
    }
}

impl SharedConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if self.endpoint.is_empty() {
            return Ok(());
        }
        if let Err(message) = http_url("shared.endpoint", &self.endpoint) {
            return bad("shared.endpoint", message);
        }
        if self.bucket.is_empty() {
            return bad("shared.bucket", "must be set when shared.endpoint is");
        }
        if self.timeout.0.is_zero() {
            return bad("shared.timeout", "must be above zero");
        }
        Ok(())
    }
}
