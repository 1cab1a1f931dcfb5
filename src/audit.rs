//! The outbound audit log: one JSON line for every request parasol sends to any origin,
//! redirect hops included, so an admin can prove what their server tells the outside world.
//!
//! Records are built only from what parasol itself sent and received; the viewer's address and
//! anything the viewer sent never reach this module. Lines are written by one task fed through
//! a channel, so the serving path never waits on the log file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Why parasol contacted an origin. Written as `"view"`, `"prefetch"` or `"arrival"` (an
/// arrival's drawn delay goes in the record's `delay_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "TriggerName", from = "TriggerName")]
pub enum Trigger {
    /// A viewer asked for something that was not cached.
    View,
    /// An admin asked parasol to fetch ahead of any viewer.
    Prefetch,
    /// A post arrived on a feed ([`crate::feed`]); fetched this long after its arrival, a
    /// moment drawn at random within the feed's `delay`.
    Arrival {
        /// The delay drawn, in milliseconds.
        delay_ms: u64,
    },
}

/// A trigger's name in the log.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TriggerName {
    View,
    Prefetch,
    Arrival,
}

impl From<Trigger> for TriggerName {
    fn from(t: Trigger) -> Self {
        match t {
            Trigger::View => TriggerName::View,
            Trigger::Prefetch => TriggerName::Prefetch,
            Trigger::Arrival { .. } => TriggerName::Arrival,
        }
    }
}

impl From<TriggerName> for Trigger {
    fn from(t: TriggerName) -> Self {
        match t {
            TriggerName::View => Trigger::View,
            TriggerName::Prefetch => Trigger::Prefetch,
            TriggerName::Arrival => Trigger::Arrival { delay_ms: 0 },
        }
    }
}

impl Trigger {
    /// Its name in the log and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::View => "view",
            Trigger::Prefetch => "prefetch",
            Trigger::Arrival { .. } => "arrival",
        }
    }
}

/// One outbound request, as written to the log (DESIGN.md §1.5).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 UTC time the request was sent.
    pub ts: String,
    /// Why the request was made (a viewer's miss, a scan, a refill).
    pub trigger: Trigger,
    /// The HTTP method sent.
    pub method: String,
    /// The URL requested (a signed bucket URL with its signature and credential redacted).
    pub url: String,
    /// The host connected to.
    pub host: String,
    /// The IP:port actually connected, when a connection was made.
    pub addr: Option<String>,
    /// Every header sent, by name.
    pub headers: BTreeMap<String, String>,
    /// The response's status, when one came.
    pub status: Option<u16>,
    /// Body bytes received.
    pub bytes: u64,
    /// Milliseconds from sending the request to the end of the body.
    pub ms: u64,
    /// `ok`, `redirect`, or the error code of the failure.
    pub outcome: String,
    /// For an arrival: the delay drawn after the post arrived, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

impl Record {
    /// The current time as the log writes it (RFC 3339, UTC).
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// Headers parasol may send to an origin (DESIGN.md §1.5). Anything else in a record is a
/// violation: counted in `parasol_audit_violations_total` and flagged by `parasol audit`.
pub const OUTBOUND_ALLOWLIST: [&str; 5] =
    ["host", "user-agent", "accept", "accept-encoding", "connection"];

/// Header names of `record` outside [`OUTBOUND_ALLOWLIST`].
pub fn violations(record: &Record) -> Vec<&str> {
    record
        .headers
        .keys()
        .map(String::as_str)
        .filter(|name| !OUTBOUND_ALLOWLIST.contains(&name.to_ascii_lowercase().as_str()))
        .collect()
}

/// Handle for sending records to the writer task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Record>,
    violations: Counter,
}

/// Where and how much to log.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The log file; rotated copies sit beside it.
    pub path: PathBuf,
    /// Rotate once the current file reaches this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest … `path.keep` oldest).
    pub keep: u32,
}

/// Records buffered before fills wait on the writer; fills are rare next to hits, so this only
/// fills up when the disk stalls, and then slowing fills is the right back-pressure.
const QUEUE: usize = 4096;

impl AuditLog {
    /// Opens (appending) the log and starts its writer task. The task ends, after writing
    /// everything queued, when the last `AuditLog` handle is dropped. `violations` counts
    /// records that carry a header outside the allowlist (it should stay 0).
    pub async fn start(
        rotation: Rotation,
        violations: Counter,
    ) -> std::io::Result<(AuditLog, tokio::task::JoinHandle<()>)> {
        if let Some(dir) = rotation.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = open_append(&rotation.path).await?;
        let written = file.metadata().await?.len();
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(file, written, rx, rotation));
        Ok((AuditLog { tx, violations }, task))
    }

    /// Appends `record` (in order, without waiting for the disk): every request parasol sends
    /// is one line.
    pub async fn record(&self, record: Record) {
        self.check(&record);
        if self.tx.send(record).await.is_err() {
            tracing::error!("audit writer has stopped; an outbound request went unlogged");
        }
    }

    /// Queues `record` without waiting, for callers that cannot await (a `Drop`). Only a full
    /// queue (the disk stalled for thousands of records) loses it, and that is logged.
    pub fn record_now(&self, record: Record) {
        self.check(&record);
        if self.tx.try_send(record).is_err() {
            tracing::error!(
                "audit queue full or writer stopped; an outbound request went unlogged"
            );
        }
    }

    fn check(&self, record: &Record) {
        let bad = violations(record);
        if !bad.is_empty() {
            self.violations.inc();
            tracing::error!(headers = ?bad, host = %record.host, "outbound header outside the allowlist");
        }
    }
}

/// The log names every URL fetched: created readable by parasol's user only.
async fn open_append(path: &Path) -> std::io::Result<tokio::fs::File> {
    use std::os::unix::fs::PermissionsExt;
    let file =
        tokio::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).await?;
    // One made by an earlier version keeps its mode otherwise.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).await?;
    Ok(file)
}

async fn write_loop(
    file: tokio::fs::File,
    mut written: u64,
    mut rx: mpsc::Receiver<Record>,
    rotation: Rotation,
) {
    let path = &rotation.path;
    let mut out = tokio::io::BufWriter::new(file);
    while let Some(first) = rx.recv().await {
        // Lines of the next moments gather first: one wake-up and one write for a burst of
        // fills, not a wake-up, a hand-off to the blocking pool and a write per line.
        tokio::time::sleep(GATHER).await;
        let mut next = Some(first);
        // Drain whatever is queued, then flush once: one write per burst, not per line.
        while let Some(record) = next {
            let mut line = serde_json::to_vec(&record).unwrap_or_default();
            line.push(b'\n');
            if written > 0 && written + line.len() as u64 > rotation.max_bytes {
                // Reset either way: a failed rotation is retried after another max_bytes, not on
                // every line (which would shift the rotated files once per record).
                if let Err(e) = rotate(&mut out, &rotation).await {
                    tracing::error!(path = %path.display(), error = %e, "cannot rotate audit log");
                }
                written = 0;
            }
            match out.write_all(&line).await {
                Ok(()) => written += line.len() as u64,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write audit log")
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush().await {
            tracing::error!(path = %path.display(), error = %e, "cannot flush audit log");
        }
    }
}

/// How long the writer lets lines gather before it writes them.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);

/// `log.{keep-1}` → `log.{keep}`, …, `log` → `log.1`, then a fresh `log`.
async fn rotate(
    out: &mut tokio::io::BufWriter<tokio::fs::File>,
    rotation: &Rotation,
) -> std::io::Result<()> {
    out.flush().await?;
    let numbered = |n: u32| {
        let mut name = rotation.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if rotation.keep == 0 {
        tokio::fs::remove_file(&rotation.path).await?;
    } else {
        for n in (1..rotation.keep).rev() {
            let _ = tokio::fs::rename(numbered(n), numbered(n + 1)).await;
        }
        tokio::fs::rename(&rotation.path, numbered(1)).await?;
    }
    *out = tokio::io::BufWriter::new(open_append(&rotation.path).await?);
    Ok(())
}

/// What `parasol audit` reports for one origin host.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HostSummary {
    /// Requests sent to the host.
    pub requests: u64,
    /// Of those, how many each trigger caused (`view`, `prefetch`, `arrival`).
    pub by_trigger: BTreeMap<String, u64>,
    /// Body bytes received from it.
    pub bytes: u64,
    /// Every header name sent to it.
    pub header_names: BTreeSet<String>,
    /// When the first request was sent.
    pub first: String,
    /// When the last request was sent.
    pub last: String,
}

/// One request that carried a header outside the allowlist.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Violation {
    /// The log line (1-based).
    pub line: usize,
    /// The host the request went to.
    pub host: String,
    /// The headers outside the allowlist.
    pub headers: Vec<String>,
}

/// The whole log, summarised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// What each host was sent.
    pub hosts: BTreeMap<String, HostSummary>,
    /// Requests that carried a header outside the allowlist (none, unless something is wrong).
    pub violations: Vec<Violation>,
    /// Line numbers that are not audit records (a truncated last line after a crash, say).
    pub unreadable_lines: Vec<usize>,
}

/// Summarises an audit log read from `reader`.
pub fn summarize(reader: impl std::io::BufRead) -> std::io::Result<Summary> {
    let mut summary = Summary::default();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(record) = serde_json::from_str::<Record>(&line) else {
            summary.unreadable_lines.push(i + 1);
            continue;
        };
        let bad = violations(&record);
        if !bad.is_empty() {
            let headers = bad.into_iter().map(String::from).collect();
            summary.violations.push(Violation { line: i + 1, host: record.host.clone(), headers });
        }
        let host = summary.hosts.entry(record.host.clone()).or_default();
        host.requests += 1;
        *host.by_trigger.entry(record.trigger.as_str().to_string()).or_default() += 1;
        host.bytes += record.bytes;
        host.header_names.extend(record.headers.keys().cloned());
        if host.first.is_empty() || record.ts < host.first {
            host.first = record.ts.clone();
        }
        if record.ts > host.last {
            host.last = record.ts;
        }
    }
    Ok(summary)
}
