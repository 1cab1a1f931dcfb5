//! The outbound audit log: one JSON line for every request parasol sends to any origin,
//! redirect hops included, so an admin can prove what their server tells the outside world.
//!
//! Records are built only from what parasol itself sent and received; the viewer's address and
//! anything the viewer sent never reach this module. Lines are written by one task fed through
//! a channel, so the serving path never waits on the log file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Why parasol contacted an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// A viewer asked for something that was not cached.
    View,
    /// An admin asked parasol to fetch ahead of any viewer.
    Prefetch,
}

/// One outbound request, as written to the log (DESIGN.md §1.5).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 UTC time the request was sent.
    pub ts: String,
    pub trigger: Trigger,
    pub method: String,
    pub url: String,
    pub host: String,
    /// The IP:port actually connected, when a connection was made.
    pub addr: Option<String>,
    /// Every header sent, by name.
    pub headers: BTreeMap<String, String>,
    pub status: Option<u16>,
    /// Body bytes received.
    pub bytes: u64,
    pub ms: u64,
    /// `ok`, `redirect`, or the error code of the failure.
    pub outcome: String,
}

impl Record {
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// Handle for sending records to the writer task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Record>,
    path: PathBuf,
}

/// Records buffered before fills wait on the writer; fills are rare next to hits, so this only
/// fills up when the disk stalls, and then slowing fills is the right back-pressure.
const QUEUE: usize = 4096;

impl AuditLog {
    /// Opens (appending) the log at `path` and starts its writer task. The task ends, after
    /// writing everything queued, when the last `AuditLog` handle is dropped.
    pub async fn start(path: &Path) -> std::io::Result<(AuditLog, tokio::task::JoinHandle<()>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write_loop(file, rx, path.to_path_buf()));
        Ok((
            AuditLog {
                tx,
                path: path.to_path_buf(),
            },
            task,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn record(&self, record: Record) {
        if self.tx.send(record).await.is_err() {
            tracing::error!("audit writer has stopped; an outbound request went unlogged");
        }
    }
}

async fn write_loop(file: tokio::fs::File, mut rx: mpsc::Receiver<Record>, path: PathBuf) {
    let mut out = tokio::io::BufWriter::new(file);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        // Drain whatever is queued, then flush once: one write per burst, not per line.
        while let Some(record) = next {
            let mut line = serde_json::to_vec(&record).unwrap_or_default();
            line.push(b'\n');
            if let Err(e) = out.write_all(&line).await {
                tracing::error!(path = %path.display(), error = %e, "cannot write audit log");
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush().await {
            tracing::error!(path = %path.display(), error = %e, "cannot flush audit log");
        }
    }
}
