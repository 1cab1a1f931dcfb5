//! What passes between the server and a media worker over the worker's stdin and stdout: one
//! job, then one reply, each a frame of
//!
//! ```text
//! u32 LE header length | header (JSON) | u64 LE body length | body bytes
//! ```
//!
//! The header says what to do (or what came of it); the body is the file, or the result. JSON
//! for the header because it is small, already a dependency and readable in a hex dump; the
//! body is raw so a 50 MiB photo is not escaped. Both sides bound every length before they
//! allocate: the server trusts a worker no more than the file it is chewing on.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VariantConfig;

/// Largest header either side accepts. Headers are a few hundred bytes.
pub const MAX_HEADER: u32 = 64 << 10;

/// A job as it crosses the pipe: the task, an id its reply must echo (random, so a worker a
/// file took over cannot answer a job before it has read it), and the CPU seconds it may use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    /// Random: the reply must echo it.
    pub id: u64,
    /// The CPU seconds the job may use.
    pub cpu_seconds: u64,
    /// What to do.
    #[serde(flatten)]
    pub task: Task,
}

/// What a worker is asked to do with the body of a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    /// Decode the body, fit it to the preset, encode it as the preset says.
    Render {
        /// The preset.
        spec: VariantConfig,
        /// Largest picture decoded.
        max_pixels: u64,
        /// Budgets for keeping an animation, when the preset does.
        #[serde(default)]
        animation: Option<crate::media::animation::AnimationLimits>,
    },
    /// Measure the picture: its size, frame count and blurhash ([`crate::media::details`]),
    /// answered as a JSON body.
    Details {
        /// The most pixels to decode.
        max_pixels: u64,
        /// The limits an animation is measured within.
        animation: crate::media::animation::AnimationLimits,
    },
    /// Draw an SVG document to a PNG.
    Rasterize {
        /// The most pixels the PNG may have.
        max_pixels: u64,
    },
    /// Find the personal metadata of a JPEG, PNG or WebP: answered as the cuts that remove
    /// it ([`Reply::Cut`]), which the server makes.
    Strip {
        /// The file's type (`image/jpeg`, `image/png`, `image/webp`).
        content_type: String,
    },
    /// Try what the sandbox must refuse, from inside a worker, and report what happened.
    SelfCheck {
        /// A file the worker must not be able to open.
        open: PathBuf,
        /// An address it must not be able to reach.
        connect: SocketAddr,
    },
}

impl Task {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Task::Render { .. } => "render",
            Task::Details { .. } => "details",
            Task::Rasterize { .. } => "rasterize",
            Task::Strip { .. } => "strip",
            Task::SelfCheck { .. } => "self_check",
        }
    }

    /// Whether `reply` answers this task: a worker answering a strip with a picture, or a
    /// render with cuts, is not doing the job it was given.
    pub fn accepts(&self, reply: &Reply) -> bool {
        match reply {
            Reply::Refused { .. } | Reply::Retired => !matches!(self, Task::SelfCheck { .. }),
            Reply::Done { .. } => {
                matches!(self, Task::Render { .. } | Task::Details { .. } | Task::Rasterize { .. })
            }
            Reply::NoRendition { .. } => matches!(self, Task::Render { .. }),
            Reply::Unchanged => matches!(self, Task::Render { .. } | Task::Strip { .. }),
            Reply::Cut(_) => matches!(self, Task::Strip { .. }),
            Reply::Report(_) => matches!(self, Task::SelfCheck { .. }),
            Reply::Ready { .. } | Reply::Unsafe { .. } => false,
        }
    }
}

/// A worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Sent once, right after start: the sandbox is in place and jobs may come.
    Ready {
        /// The worker's version.
        version: String,
        /// Landlock's status in the worker.
        landlock: String,
    },
    /// The sandbox could not be installed; the worker exits after saying so.
    Unsafe {
        /// Why the sandbox could not be raised.
        why: String,
    },
    /// The job's result is the body.
    Done {
        /// The result's width in pixels (0 when not a picture).
        width: u32,
        /// Its height.
        height: u32,
    },
    /// The preset has nothing to show for this file (a badge whose mask is empty).
    NoRendition {
        /// Why.
        reason: String,
    },
    /// Nothing to change (a strip that found no metadata): the input stands. No body.
    Unchanged,
    /// A strip's answer: where to cut the input. No body.
    Cut(crate::media::strip::Cuts),
    /// The decoder refused the file (unreadable, over the limits its header declares).
    /// `retire`: the worker will exit after this reply (a decoder panicked; its state is
    /// not trusted for another job).
    Refused {
        /// Why.
        reason: String,
        /// Whether the worker exits after this reply.
        retire: bool,
    },
    /// The worker did not run the job and is exiting: its lifetime CPU budget is spent. The
    /// server sends the job to a fresh worker.
    Retired,
    /// What a [`Task::SelfCheck`] saw.
    Report(Box<SelfReport>),
}

/// A reply as it crosses the pipe: what the worker says, and the CPU time it has used in all
/// so far, so the server can tell a job that burned its deadline from one that was starved
/// without reading `/proc` for every job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Answer {
    /// The [`Job::id`] answered (0 for the greeting).
    #[serde(default)]
    pub job: u64,
    /// What the worker says.
    #[serde(flatten)]
    pub reply: Reply,
    /// CPU time it has used in all, in milliseconds.
    #[serde(default)]
    pub cpu_ms: u64,
}

/// The self-check's findings: each probe is `refused: <error>` or what it managed to do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SelfReport {
    /// Opening a file.
    pub open: String,
    /// Connecting to an address.
    pub connect: String,
    /// Running a program.
    pub exec: String,
    /// Starting a thread.
    pub thread: String,
    /// An allocation the size of the memory limit.
    pub allocate: String,
    /// A signal (0, the existence probe) to the server.
    pub signal_parent: String,
    /// Raising its own address-space limit.
    pub raise_limit: String,
    /// Reading from stdout (a worker reads only its jobs, on stdin).
    pub read_stdout: String,
    /// The user the worker runs as.
    pub uid: u32,
    /// Descriptors open in the worker once the sandbox was in place.
    pub descriptors: Vec<i32>,
    /// Environment variables the worker was started with.
    pub environment: usize,
    /// Landlock's status.
    pub landlock: String,
    /// Soft and hard address-space limit, bytes.
    pub address_space: (u64, u64),
    /// Soft and hard CPU-time limit, seconds.
    pub cpu_seconds: (u64, u64),
}

impl SelfReport {
    /// Whether every probe that must fail did, and the process holds only its pipes, has no
    /// environment and is not root.
    pub fn is_sandboxed(&self) -> bool {
        let refused = |s: &str| s.starts_with("refused");
        [
            &self.open,
            &self.connect,
            &self.exec,
            &self.thread,
            &self.allocate,
            &self.signal_parent,
            &self.raise_limit,
            &self.read_stdout,
        ]
        .iter()
        .all(|s| refused(s))
            && self.descriptors.iter().all(|fd| (0..=2).contains(fd))
            && self.environment == 0
            && self.uid != 0
    }
}

/// Writes one frame (blocking; the worker's side).
pub fn write_frame(out: &mut impl Write, header: &impl Serialize, body: &[u8]) -> io::Result<()> {
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    out.write_all(&(header.len() as u32).to_le_bytes())?;
    out.write_all(&header)?;
    out.write_all(&(body.len() as u64).to_le_bytes())?;
    out.write_all(body)?;
    out.flush()
}

/// Reads one frame (blocking; the worker's side). `None` at a clean end of input: the server
/// closed the pipe, which is how it retires a worker.
pub fn read_frame<H: serde::de::DeserializeOwned>(
    input: &mut impl Read,
    max_body: u64,
) -> io::Result<Option<(H, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let header_len = u32::from_le_bytes(len);
    if header_len > MAX_HEADER {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame header too long"));
    }
    let mut header = vec![0u8; header_len as usize];
    input.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut len = [0u8; 8];
    input.read_exact(&mut len)?;
    let body_len = u64::from_le_bytes(len);
    if body_len > max_body {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame body too long"));
    }
    let mut body = Vec::new();
    body.try_reserve_exact(body_len as usize).map_err(io::Error::other)?;
    input.take(body_len).read_to_end(&mut body)?;
    if body.len() as u64 != body_len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "frame body cut short"));
    }
    Ok(Some((header, body)))
}

/// The server's side: the header of a frame, leaving the body length and body to the caller,
/// which streams them.
pub async fn read_header<H: serde::de::DeserializeOwned>(
    input: &mut (impl tokio::io::AsyncRead + Unpin),
) -> io::Result<(H, u64)> {
    use tokio::io::AsyncReadExt;
    let header_len = input.read_u32_le().await?;
    if header_len > MAX_HEADER {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame header too long"));
    }
    let mut header = vec![0u8; header_len as usize];
    input.read_exact(&mut header).await?;
    let header = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let body_len = input.read_u64_le().await?;
    Ok((header, body_len))
}

/// The server's side: a whole job frame in one buffer, for one write.
pub fn job_frame(header: &impl Serialize, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(body.len() + 512);
    write_frame(&mut frame, header, body)?;
    Ok(frame)
}

/// The server's side: the header and body length of a job; the caller writes the body.
pub async fn write_header(
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    header: &impl Serialize,
    body_len: u64,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(header.len() + 12);
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(&body_len.to_le_bytes());
    out.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_lengths_are_bounded() {
        let task = Task::Strip { content_type: "image/png".into() };
        let job = Job { id: 7, cpu_seconds: 2, task };
        let mut wire = Vec::new();
        write_frame(&mut wire, &job, b"body").unwrap();
        let (back, body): (Job, Vec<u8>) =
            read_frame(&mut wire.as_slice(), 1 << 20).unwrap().unwrap();
        assert_eq!((back, body.as_slice()), (job, &b"body"[..]));
        assert!(read_frame::<Task>(&mut &b""[..], 10).unwrap().is_none(), "clean end");
        assert!(read_frame::<Task>(&mut wire.as_slice(), 3).is_err(), "body over the bound");
        let mut huge = (MAX_HEADER + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(read_frame::<Task>(&mut huge.as_slice(), 10).is_err(), "header over the bound");
        assert!(read_frame::<Task>(&mut &wire[..wire.len() - 1], 1 << 20).is_err(), "cut short");

        let answer = Answer { job: 7, reply: Reply::Done { width: 3, height: 4 }, cpu_ms: 17 };
        let mut wire = Vec::new();
        write_frame(&mut wire, &answer, b"px").unwrap();
        let (back, _): (Answer, Vec<u8>) = read_frame(&mut wire.as_slice(), 10).unwrap().unwrap();
        assert_eq!(back, answer);
        let cuts = crate::media::strip::Cuts {
            remove: vec![(2, 40)],
            fix: crate::media::strip::Fix::Orientation { at: 2, orientation: 6 },
        };
        let answer = Answer { job: 9, reply: Reply::Cut(cuts), cpu_ms: 1 };
        let mut wire = Vec::new();
        write_frame(&mut wire, &answer, b"").unwrap();
        let (back, _): (Answer, Vec<u8>) = read_frame(&mut wire.as_slice(), 10).unwrap().unwrap();
        assert_eq!(back, answer);
    }
}
