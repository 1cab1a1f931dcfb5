//! The moderation log: one JSON object per line for every moderation decision (`ts`, `rule`,
//! `action`, `hash`, `host`, `reason`), and `parasol_moderation_total{rule,action}`. It holds
//! nothing of any viewer: the host is the source's, the hash the file's. `parasol audit
//! --moderation` summarises it.

use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

pub use crate::telemetry::ModerationLabels;

/// One decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Decision {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `url`, `hash`, `sha256`, `domain` (bans), `hash_list`, `scanner`.
    pub rule: String,
    /// `refused` (a fill or a request), `purged` (cached entries removed), `banned`, `lifted`,
    /// `allowed` (a scanner's yes), `unscanned` (the scanner could not be asked).
    pub action: String,
    /// The file's blake3, when the decision is about a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The host, when the decision is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Why, in the operator's (or the scanner's) words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The moderation log (`moderation.log`), and its metric.
pub struct ModerationLog {
    path: PathBuf,
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
    metric: Family<ModerationLabels, Counter>,
    /// Viewers' requests refused lately, by rule and file or host: each is written once a
    /// minute at most (and counted every time), so asking for a banned URL in a loop cannot
    /// grow the log without bound.
    recent: moka::sync::Cache<(&'static str, String), ()>,
}

impl ModerationLog {
    /// A log written to `path`, counting into `metric`.
    pub fn new(path: PathBuf, metric: Family<ModerationLabels, Counter>) -> Self {
        let recent = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(std::time::Duration::from_secs(60))
            .build();
        Self { path, file: tokio::sync::Mutex::new(None), metric, recent }
    }

    /// A viewer's request refused by a rule: counted each time, logged once a minute per
    /// rule and file (or host).
    pub async fn record_refusal(
        &self,
        rule: &'static str,
        hash: Option<&blake3::Hash>,
        host: Option<&str>,
    ) {
        let what =
            hash.map(|h| h.to_hex().to_string()).or(host.map(String::from)).unwrap_or_default();
        if self.recent.contains_key(&(rule, what.clone())) {
            self.metric.get_or_create(&ModerationLabels { rule, action: "refused" }).inc();
            return;
        }
        self.recent.insert((rule, what), ());
        self.record(rule, "refused", hash, host, None).await;
    }

    /// Logs and counts one decision. A log that cannot be written is reported, and the
    /// decision stands.
    pub async fn record(
        &self,
        rule: &'static str,
        action: &'static str,
        hash: Option<&blake3::Hash>,
        host: Option<&str>,
        reason: Option<&str>,
    ) {
        self.metric.get_or_create(&ModerationLabels { rule, action }).inc();
        tracing::info!(rule, action, hash = ?hash.map(|h| h.to_hex().to_string()), host, "moderation");
        let decision = Decision {
            ts: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            rule: rule.into(),
            action: action.into(),
            hash: hash.map(|h| h.to_hex().to_string()),
            host: host.map(String::from),
            reason: reason.map(String::from),
        };
        let Ok(mut line) = serde_json::to_vec(&decision) else { return };
        line.push(b'\n');
        let mut file = self.file.lock().await;
        if file.is_none() {
            match open(&self.path).await {
                Ok(f) => *file = Some(f),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot open the moderation log");
                    return;
                }
            }
        }
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(&line).await {
                tracing::error!(error = %e, "cannot write the moderation log");
            }
        }
    }
}

async fn open(path: &Path) -> std::io::Result<tokio::fs::File> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await?;
    }
    let file =
        tokio::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).await?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).await?;
    Ok(file)
}

/// Counts of a moderation log by rule and action, and its first and last decision.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Decisions counted by rule, then action.
    pub decisions: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// When the first decision was made.
    pub first: Option<String>,
    /// When the last decision was made.
    pub last: Option<String>,
    /// Line numbers that are not decisions.
    pub unreadable_lines: Vec<usize>,
}

/// Counts the decisions of a moderation log's `text` (`parasol audit --moderation`).
pub fn summarize(text: &str) -> Summary {
    let mut summary = Summary::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Ok(d) = serde_json::from_str::<Decision>(line) else {
            summary.unreadable_lines.push(n + 1);
            continue;
        };
        *summary.decisions.entry(d.rule).or_default().entry(d.action).or_default() += 1;
        summary.first.get_or_insert_with(|| d.ts.clone());
        summary.last = Some(d.ts);
    }
    summary
}
