//! An outside scanner's veto (`moderation.scanner_url`): each new original image or video is
//! POSTed to it before it is first served, with its sniffed type and its source host, never
//! anything of a viewer. A 2xx answer lets it through; 403 or 451 refuses it, and the caller
//! bans its content; any other answer counts as a scanner that could not be asked. Each file is asked about once: a yes is remembered by blake3 (a
//! no becomes a ban), so a thousand URLs of one file cost one scan.
//!
//! Scans run `moderation.scanner_concurrency` at a time, each within
//! `moderation.scanner_timeout` (waiting for a turn included). A scanner that cannot be asked
//! leaves the file to `moderation.scanner_fail`: `open` serves and stores it unscanned (it is
//! scanned when it is next fetched from its origin), `closed` refuses it for now (503), so
//! nothing unscanned is served.

use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::{ModerationConfig, ScannerFail};
use crate::media::worker::Input;

/// What the scanner said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The scanner had no objection.
    Allowed,
    /// The scanner's status.
    Refused(u16),
    /// It could not be asked; why.
    Unavailable(String),
}

/// The outside scanner each new original is shown to before it is first served.
pub struct Scanner {
    client: reqwest::Client,
    url: url::Url,
    slots: Semaphore,
    timeout: Duration,
    /// What to do when it cannot be asked.
    pub fail: ScannerFail,
    /// Files it let through, by blake3.
    allowed: moka::future::Cache<[u8; 32], ()>,
}

impl Scanner {
    /// The configured scanner, or `None` when `moderation.scanner_url` is empty.
    pub fn from_config(config: &ModerationConfig) -> Result<Option<Scanner>, String> {
        if config.scanner_url.is_empty() {
            return Ok(None);
        }
        let url = url::Url::parse(&config.scanner_url).map_err(|e| e.to_string())?;
        // The operator's own service (often on loopback): not an origin, so not behind the
        // origin guard, and nothing of an origin's client is shared with it.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.scanner_timeout.0)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Some(Scanner {
            client,
            url,
            slots: Semaphore::new(config.scanner_concurrency as usize),
            timeout: config.scanner_timeout.0,
            fail: config.scanner_fail,
            allowed: moka::future::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(7 * 86_400))
                .build(),
        }))
    }

    /// Whether the file `hash` was let through before.
    pub async fn known_allowed(&self, hash: &blake3::Hash) -> bool {
        self.allowed.contains_key(hash.as_bytes())
    }

    /// Asks about the file `hash` (`content_type`, from `host`), whose bytes are `input`.
    pub async fn scan(
        &self,
        hash: &blake3::Hash,
        content_type: &str,
        host: &str,
        input: Input,
    ) -> Verdict {
        let asked = tokio::time::timeout(self.timeout, async {
            let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
            let body = match input {
                Input::Memory(bytes) => reqwest::Body::from(bytes),
                Input::File { path, len } => {
                    use tokio::io::AsyncReadExt;
                    let file = tokio::fs::File::open(&path).await.map_err(|e| e.to_string())?;
                    let stream = tokio_util::io::ReaderStream::new(file.take(len));
                    reqwest::Body::wrap_stream(stream)
                }
            };
            self.client
                .post(self.url.clone())
                .header("content-type", content_type)
                .header("x-parasol-blake3", hash.to_hex().as_str())
                .header("x-parasol-source-host", host)
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        match asked {
            Ok(Ok(answer)) if answer.status().is_success() => {
                self.allowed.insert(*hash.as_bytes(), ()).await;
                Verdict::Allowed
            }
            // Only a clear no is a veto: 403 or 451. Anything else (429, 5xx, a wrong path's
            // 404) is a scanner that cannot answer, not a verdict on the file.
            Ok(Ok(answer)) if matches!(answer.status().as_u16(), 403 | 451) => {
                Verdict::Refused(answer.status().as_u16())
            }
            Ok(Ok(answer)) => Verdict::Unavailable(format!("scanner answered {}", answer.status())),
            Ok(Err(e)) => Verdict::Unavailable(e),
            Err(_) => Verdict::Unavailable("no answer within moderation.scanner_timeout".into()),
        }
    }
}
