//! A fill viewers read while it arrives: a large original that passes through unchanged
//! (video, audio, a picture nothing prepares), streamed from its temp file as the origin's
//! bytes land in it, so playback starts with the first bytes instead of the last.
//!
//! The fill stays the fill: it is hashed, checked and stored exactly as before. Readers get
//! the bytes that have arrived, but never the end of the response before the body is known to
//! be whole (nothing more than declared, nothing cut short): with a declared length, the last
//! byte waits; without one, the response is chunked and its closing chunk waits. A fill that
//! fails midway ends every reader's response broken, never complete with the wrong bytes.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

/// How far a growing fill is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes are in the file.
    Arrived(u64),
    /// All of the body is in (this many bytes), and it was whole.
    Complete(u64),
    /// The fill failed: readers end broken.
    Failed,
}

/// A fill's body as it arrives in its temp file, readable by viewers before it is whole.
pub struct Growing {
    /// Sniffed from the first bytes, as for any fill.
    pub content_type: &'static str,
    /// The origin's declared length, when it declared one.
    pub len: Option<u64>,
    /// The temp file, opened for reading; still readable after its rename or removal.
    file: Arc<std::fs::File>,
    progress: watch::Sender<Progress>,
}

/// Read size of a reader: small enough that a slow viewer pins little.
const CHUNK: u64 = 64 * 1024;

impl Growing {
    /// A growing body of `content_type` (`len` when the origin declared one) in `file`.
    pub fn new(
        content_type: &'static str,
        len: Option<u64>,
        file: Arc<std::fs::File>,
    ) -> Arc<Self> {
        let (progress, _) = watch::channel(Progress::Arrived(0));
        Arc::new(Self { content_type, len, file, progress })
    }

    /// `n` bytes are in the file now.
    pub fn arrived(&self, n: u64) {
        self.progress.send_if_modified(|p| match p {
            Progress::Arrived(old) if n > *old => {
                *p = Progress::Arrived(n);
                true
            }
            _ => false,
        });
    }

    /// The body is whole: `len` bytes.
    pub fn complete(&self, len: u64) {
        self.progress.send_replace(Progress::Complete(len));
    }

    /// The fill failed: readers end their responses broken.
    pub fn fail(&self) {
        self.progress.send_if_modified(|p| match p {
            Progress::Complete(_) | Progress::Failed => false,
            _ => {
                *p = Progress::Failed;
                true
            }
        });
    }

    /// How much has arrived, and whether it is whole or failed.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Bytes `start..=end` as they arrive, a chunk at a time ([`crate::cache::disk::read_chunk`]);
    /// `end` is `u64::MAX` for all of a body of unknown length.
    pub fn stream(
        self: Arc<Self>,
        start: u64,
        end: u64,
    ) -> impl futures_util::Stream<Item = std::io::Result<hyper::body::Frame<Bytes>>> + Send {
        let rx = self.progress.subscribe();
        futures_util::stream::try_unfold((start, rx, self), move |(offset, mut rx, g)| async move {
            if offset > end {
                return Ok(None);
            }
            let available = loop {
                let available = match *rx.borrow_and_update() {
                    // The last byte of a declared length waits for the verdict on the whole.
                    Progress::Arrived(n) => g.len.map_or(n, |len| n.min(len.saturating_sub(1))),
                    // Whole: a body of unknown length ends here (its closing chunk goes now).
                    Progress::Complete(len) if offset >= len => return Ok(None),
                    Progress::Complete(len) => len,
                    Progress::Failed => return Err(std::io::Error::other("the fill failed")),
                };
                if available > offset {
                    break available;
                }
                if rx.changed().await.is_err() {
                    return Err(std::io::Error::other("the fill is gone"));
                }
            };
            let n = (available.min(end.saturating_add(1)) - offset).min(CHUNK) as usize;
            // Positioned reads: every reader shares the one descriptor.
            let chunk = crate::cache::disk::read_chunk(&g.file, offset, n).await?;
            let next = offset + chunk.len() as u64;
            Ok(Some((hyper::body::Frame::data(chunk), (next, rx, g))))
        })
    }
}

/// Held by the fill while readers may read: dropped without [`Self::complete`], the fill
/// failed.
pub struct Publisher(pub Arc<Growing>);

impl Publisher {
    /// The body is whole: `len` bytes.
    pub fn complete(self, len: u64) {
        self.0.complete(len);
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.0.fail();
    }
}
