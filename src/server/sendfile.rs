//! Bodies sent from the page cache: large hits go from their blob's file with `sendfile(2)`
//! instead of being copied from memory (or read from the file) into the socket.
//!
//! hyper writes a response's head and body through the connection's `Write` and knows nothing
//! of files, so the connection ([`Conn`]) recognises the body's bytes by where they are in
//! memory, through the [`Offers`] its requests carry:
//! - a body held in memory ([`Offers::memory`]): a slice inside that memory goes from the file
//!   holding the same bytes. Should the file refuse or end early, the memory is written
//!   instead, so a stale or failed offer costs only the copy, never a wrong byte;
//! - a body streamed from disk ([`Offers::placeholder`]): its frames point into a static
//!   region that holds no data, each standing for the next range of the file in the order
//!   hyper writes them. Those bytes exist only in the file: if it cannot give them, the
//!   connection fails and the response ends broken, never completed with other bytes.
//!
//! The head before such a body is sent with `MSG_MORE`, so both leave in one packet. Offers
//! are made only for ranges the page cache holds, so `sendfile` does not wait for the disk on
//! a serving thread, and for blobs whose bytes were checked: memory bodies were written or
//! re-hashed by this process, large blobs are sized on load and re-hashed by the scrub.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Memory bodies (or ranges) shorter than this are copied from memory. Measured on loopback,
/// 2 cores, one object at a time (`cargo build --release`, wrk -c64, CPU per request of the
/// server, medians of 5 alternating rounds): with the file opened for each response, its
/// open and close cost more than the copy saved up to 64 KiB (44-61 µs against 38-41 there);
/// held open by the entry ([`crate::cache::store::Store::file_now`]) the file wins from 32 KiB (30
/// against 34 µs), at 60 KiB (37 against 40) and at 200 KiB (72 against 86).
pub const MIN_LEN: u64 = 32 * 1024;

/// Longest placeholder frame: the range of a disk body one `sendfile` may be asked for.
pub const PLACEHOLDER_LEN: usize = 512 * 1024;

/// What placeholder frames point into. Never read: its bytes are zeros, and they are never
/// sent (a placeholder slice goes from its file or fails the connection).
static PLACEHOLDER: [u8; PLACEHOLDER_LEN] = [0; PLACEHOLDER_LEN];

tokio::task_local! {
    /// The offers of the connection whose task this is.
    static OFFERS: Arc<Offers>;
}

/// Runs a connection's future (`serve`) with its offers reachable by its requests'
/// handlers through [`current`], at no cost per request.
pub async fn scope<F: std::future::Future>(offers: Arc<Offers>, serve: F) -> F::Output {
    OFFERS.scope(offers, serve).await
}

/// The offers of the viewer's connection being served, if any (not outside a connection).
pub fn current() -> Option<Arc<Offers>> {
    OFFERS.try_with(Arc::clone).ok()
}

/// Whether `slice` is (part of) a placeholder frame.
fn is_placeholder(slice: &[u8]) -> bool {
    !slice.is_empty() && PLACEHOLDER.as_ptr_range().contains(&slice.as_ptr())
}

/// The bodies a connection may send from files, shared by its requests and its writes.
#[derive(Default)]
pub struct Offers {
    state: Mutex<State>,
    /// Whether `state` holds anything: most writes need not take the lock.
    active: AtomicBool,
    sent: OnceLock<Counter>,
}

#[derive(Default)]
struct State {
    /// The memory body of the latest response that offered one, until it is all sent.
    memory: Option<Memory>,
    /// The file ranges of placeholder frames made and not yet sent, in order.
    segments: VecDeque<Segment>,
}

struct Memory {
    bytes: Bytes,
    /// Where `bytes`' first byte is in a file.
    at: FileAt,
}

/// A place in a file that holds a body's bytes, and whatever keeps them there while it is
/// held (a blob's blocks leased in its segment, [`crate::cache::segments::Lent`]).
#[derive(Clone)]
pub struct FileAt {
    /// The file.
    pub file: Arc<File>,
    /// Where in it.
    pub offset: u64,
    /// Held as long as the bytes may still be sent from `file`.
    pub keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl FileAt {
    /// The same file `n` bytes further on.
    pub fn advanced(&self, n: u64) -> Self {
        Self { offset: self.offset + n, ..self.clone() }
    }
}

struct Segment {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// Where a slice about to be written is in a file.
enum Located {
    File {
        at: FileAt,
        placeholder: bool,
    },
    /// A placeholder slice that is not the next range made: its bytes are nowhere.
    Orphan,
}

impl Offers {
    /// Counts the bytes sent from files into `sent` (the first counter given stays).
    pub fn count_into(&self, sent: &Counter) {
        self.sent.get_or_init(|| sent.clone());
    }

    /// `bytes`, a body frame, may be sent from the file at `at`, which holds the same bytes.
    pub fn memory(&self, bytes: Bytes, at: FileAt) {
        let mut state = self.lock();
        state.memory = Some(Memory { bytes, at });
        self.active.store(true, Ordering::Release);
    }

    /// A body frame of `len` bytes (at most [`PLACEHOLDER_LEN`]) that stands for `file` from
    /// `offset`: the frame must be sent on this connection, after any made before it.
    pub fn placeholder(&self, file: Arc<File>, offset: u64, len: usize) -> Bytes {
        let len = len.min(PLACEHOLDER_LEN);
        self.lock().segments.push_back(Segment { file, offset, len });
        self.active.store(true, Ordering::Release);
        Bytes::from_static(&PLACEHOLDER[..len])
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first of `bufs` that goes from a file, with its index.
    fn find(&self, bufs: &[IoSlice<'_>]) -> Option<(usize, Located)> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let state = self.lock();
        bufs.iter().enumerate().find_map(|(i, b)| {
            if is_placeholder(b) {
                return Some((
                    i,
                    match state.segments.front() {
                        Some(s) if s.len == b.len() => {
                            let (file, offset) = (s.file.clone(), s.offset);
                            Located::File {
                                at: FileAt { file, offset, keep: None },
                                placeholder: true,
                            }
                        }
                        _ => Located::Orphan,
                    },
                ));
            }
            let memory = state.memory.as_ref().filter(|_| !b.is_empty())?;
            let (start, at) = (memory.bytes.as_ptr() as usize, b.as_ptr() as usize);
            if at < start || at + b.len() > start + memory.bytes.len() {
                return None;
            }
            let at = memory.at.advanced((at - start) as u64);
            Some((i, Located::File { at, placeholder: false }))
        })
    }

    /// `n` bytes of `slice` were sent from its file.
    fn sent(&self, slice: &[u8], placeholder: bool, n: usize) {
        let mut state = self.lock();
        if placeholder {
            if let Some(front) = state.segments.front_mut() {
                front.offset += n as u64;
                front.len -= n;
                if front.len == 0 {
                    state.segments.pop_front();
                }
            }
        } else if let Some(memory) = &state.memory {
            let end = memory.bytes.as_ptr() as usize + memory.bytes.len();
            if slice.as_ptr() as usize + n == end {
                state.memory = None; // all sent: the memory is not kept alive any longer
            }
        }
        self.settle(&state);
        drop(state);
        if let Some(counter) = self.sent.get() {
            counter.inc_by(n as u64);
        }
    }

    /// The memory offer given up (its file failed): its bytes go from memory.
    fn withdraw_memory(&self) {
        let mut state = self.lock();
        state.memory = None;
        self.settle(&state);
    }

    /// Keeps `active` saying whether `state` holds anything.
    fn settle(&self, state: &State) {
        if state.memory.is_none() && state.segments.is_empty() {
            self.active.store(false, Ordering::Release);
        }
    }
}

/// A viewer's TCP connection that sends offered bodies from their files.
pub struct Conn {
    io: TokioIo<TcpStream>,
    offers: Arc<Offers>,
}

impl Conn {
    /// A connection over `stream` whose bodies may go from files `offers` names.
    pub fn new(stream: TcpStream, offers: Arc<Offers>) -> Self {
        Self { io: TokioIo::new(stream), offers }
    }

    /// `call` on the socket once it is writable, until it does not find it full.
    fn poll_socket<R>(
        &self,
        cx: &mut Context<'_>,
        mut call: impl FnMut(&TcpStream) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        let stream = self.io.inner();
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_io(Interest::WRITABLE, || call(stream)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// `bufs` (the head before a body from a file) sent with `MSG_MORE`.
    fn poll_send_more(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        use rustix::net::{SendAncillaryBuffer, SendFlags};
        let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
        self.poll_socket(cx, |stream| {
            let mut control = SendAncillaryBuffer::default();
            rustix::net::sendmsg(stream, bufs, &mut control, flags).map_err(io::Error::from)
        })
    }

    /// Up to `len` bytes of `file` from `offset`; `Ok(None)` when the file cannot give them
    /// (it ends early, cannot be read, or its file system has no `sendfile`).
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<Option<usize>>> {
        use rustix::io::Errno;
        self.poll_socket(cx, |stream| {
            let mut at = offset;
            match rustix::fs::sendfile(stream, file, Some(&mut at), len) {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(n)),
                Err(Errno::INVAL | Errno::NOSYS | Errno::IO | Errno::OVERFLOW) => Ok(None),
                Err(e) => Err(io::Error::from(e)),
            }
        })
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let orphan = || io::Error::other("a placeholder frame with no range of a file behind it");
        match self.offers.find(bufs) {
            Some((0, Located::File { at, placeholder })) => {
                let slice = &bufs[0][..];
                match ready!(self.poll_sendfile(cx, &at.file, at.offset, slice.len()))? {
                    Some(n) => {
                        self.offers.sent(slice, placeholder, n);
                        return Poll::Ready(Ok(n));
                    }
                    None if placeholder => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "a blob's file ended before its body was sent",
                        )));
                    }
                    // The memory holds the same bytes.
                    None => self.offers.withdraw_memory(),
                }
            }
            Some((0, Located::Orphan)) => return Poll::Ready(Err(orphan())),
            Some((i, _)) => return self.poll_send_more(cx, &bufs[..i]),
            None => {}
        }
        // Placeholder bytes are never written from memory: they would be zeros.
        match bufs.iter().position(|b| is_placeholder(b)) {
            Some(0) => Poll::Ready(Err(orphan())),
            Some(i) => Pin::new(&mut self.io).poll_write_vectored(cx, &bufs[..i]),
            None => Pin::new(&mut self.io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
