//! `[moderation]`: hash lists, the scanner, the moderation log.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// `[moderation]`: bans are made through the admin API; these are the automatic rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModerationConfig {
    /// Files of SHA-256 or MD5 hex digests, one per line (`#` comments): a file whose bytes
    /// match is refused (451 `banned`) and purged. Re-read on SIGHUP and `/admin/reload`.
    pub hash_lists: Vec<PathBuf>,
    /// Each new original image or video is POSTed here before it is first served; a non-2xx
    /// answer refuses it and bans its content. Empty: off.
    pub scanner_url: String,
    /// When the scanner cannot be asked (down, timed out): `open` serves the file unscanned
    /// (and asks again next time), `closed` refuses it for now (503).
    pub scanner_fail: ScannerFail,
    /// Longest wait for the scanner's verdict.
    pub scanner_timeout: Dur,
    /// Scans in flight at once; more wait their turn (within `scanner_timeout`).
    pub scanner_concurrency: u32,
    /// How often bans are synchronised through the shared bucket (`[shared]`), when set.
    pub sync_interval: Dur,
    /// JSON lines of every moderation decision; default `<cache.dir>/moderation.jsonl`.
    pub log: Option<PathBuf>,
    /// Compute SHA-256 and MD5 of every fill's origin bytes and keep them in the index, not
    /// only while a list or a SHA-256 ban exists, so that a list loaded later also finds
    /// cached files whose metadata was stripped. Costs both digests on every miss.
    pub keep_digests: bool,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        Self {
            hash_lists: Vec::new(),
            scanner_url: String::new(),
            scanner_fail: ScannerFail::Closed,
            scanner_timeout: Dur(Duration::from_secs(10)),
            scanner_concurrency: 4,
            sync_interval: Dur(Duration::from_secs(30)),
            log: None,
            keep_digests: false,
        }
    }
}

/// What a file gets while the scanner cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScannerFail {
    /// Serve the file unscanned (and log it).
    Open,
    /// Refuse the file (503 `scanner_unavailable`) until the scanner answers.
    Closed,
}

impl ModerationConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !self.scanner_url.is_empty() {
            if let Err(message) = http_url("moderation.scanner_url", &self.scanner_url) {
                return bad("moderation.scanner_url", message);
            }
        }
        if self.scanner_concurrency == 0
            || self.scanner_timeout.0.is_zero()
            || self.sync_interval.0.is_zero()
        {
            return bad(
                "moderation",
                "scanner_concurrency, scanner_timeout and sync_interval must be above zero",
            );
        }
        Ok(())
    }
}
