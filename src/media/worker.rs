//! The media worker pool: every decode, render, rasterisation and metadata strip runs in a
//! separate process, the `parasol` binary started as `parasol media-worker`, never on the
//! server's own threads. A hostile file can then cost at most one worker: its memory is capped
//! by the kernel, its CPU time too, its wall-clock time by the server (which kills it), and
//! it can open no file, socket or program ([`sandbox`]).
//!
//! - **Pool**: up to `media.workers` processes, started on demand and kept between jobs;
//!   each is retired after `media.worker_jobs` jobs, or at once after any failure.
//! - **Queue**: at most `media.queue` jobs wait for a worker; beyond it a job is refused at
//!   once with 503 `media_busy` rather than piling up.
//! - **Deadline**: a job running longer than `media.job_timeout` has its worker killed; a
//!   worker that dies mid-job (out of memory, out of CPU, crashed, killed) answers 422
//!   `media_too_costly`. That verdict is remembered by the file's blake3 for a day, so the
//!   next viewer of the same bytes does not start it again.
//! - **Bytes**: a job's input is written from memory or streamed from its file, and its
//!   output is handed to a [`ChunkSink`] as it arrives, so the server holds no extra copy.
//!
//! Workers are children of the server with `kill_on_drop`; a job whose future is dropped
//! (shutdown) kills its worker, and each worker dies with the server (`PR_SET_PDEATHSIG`).

pub mod child;
pub mod protocol;
pub mod sandbox;
pub mod tool;

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;

use crate::cache::ChunkSink;
use crate::error::ProxyError;
use crate::telemetry::OutcomeLabels;
use protocol::{Answer, Reply, SelfReport, Task};
pub use sandbox::Limits;

/// Capacity asked for each worker pipe.
const PIPE_BYTES: i32 = 1 << 20;

/// How the pool runs its workers; from `[media]`.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The `parasol` binary to start as `parasol media-worker`.
    pub exe: PathBuf,
    pub workers: usize,
    /// Jobs that may wait for a worker.
    pub queue: usize,
    pub limits: Limits,
    /// Wall-clock deadline of one job, from sending it to the last byte of its reply.
    pub job_timeout: Duration,
    /// Largest job input (`cache.max_object_bytes`).
    pub max_input: u64,
    /// ffmpeg, when there is one (`media.ffmpeg`): run through [`tool`].
    pub ffmpeg: Option<PathBuf>,
    /// heif-convert, when there is one (`media.heif_convert`): run through [`tool`].
    pub heif_convert: Option<PathBuf>,
}

/// A job's file: already in memory, or a file streamed into the worker.
#[derive(Debug, Clone)]
pub enum Input {
    Memory(Bytes),
    File { path: PathBuf, len: u64 },
}

impl Input {
    fn len(&self) -> u64 {
        match self {
            Input::Memory(b) => b.len() as u64,
            Input::File { len, .. } => *len,
        }
    }
}

/// What came of a job whose reply was not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The result went to the sink.
    Done { width: u32, height: u32 },
    /// Nothing to change: the input stands.
    Unchanged,
}

/// One running worker process and its pipes.
struct Worker {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Jobs done so far; the worker is retired at `limits.jobs`.
    jobs: u32,
    /// The CPU time it reported with its last reply (milliseconds).
    cpu_ms: u64,
}

/// How an exchange with a worker failed.
enum Failure {
    /// Writing the job failed: the worker was gone before it could have read it.
    Send(std::io::Error),
    /// The job's own file could not be read (ours, not the worker's fault).
    Input(std::io::Error),
    /// The sink refused the output (disk full, say).
    Sink(std::io::Error),
    /// No reply came: the worker died (or broke the protocol) while on the job.
    NoReply(std::io::Error),
    /// The reply began but did not arrive whole.
    Reply(std::io::Error),
}

/// The pool's metrics.
#[derive(Clone, Default)]
pub struct PoolMetrics {
    /// `parasol_media_jobs_total{outcome}`.
    pub jobs: Family<OutcomeLabels, Counter>,
    /// `parasol_media_jobs_running`: jobs on a worker now.
    pub running: Gauge,
}

/// A job's place: in the queue, on a worker, counted as running.
struct Admitted<'a> {
    _queued: tokio::sync::SemaphorePermit<'a>,
    _slot: tokio::sync::SemaphorePermit<'a>,
    _running: RunningJob<'a>,
}

/// Counts a job as running while it holds a worker.
struct RunningJob<'a>(&'a Gauge);

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct MediaPool {
    config: PoolConfig,
    /// Jobs waiting or running; beyond it, `media_busy`.
    admitted: Semaphore,
    /// One per worker process.
    running: Semaphore,
    /// Workers between jobs. A std mutex: held only to push or pop.
    idle: Mutex<Vec<Worker>>,
    /// Files whose job ran out of time or memory or killed its worker, by blake3 of the
    /// file and the kind of task, with why. A render verdict covers every preset: they all
    /// decode the same pixels.
    verdicts: moka::future::Cache<[u8; 32], std::sync::Arc<str>>,
    metrics: PoolMetrics,
    /// Outside programs are not run: the kernel has no Landlock to confine them (found by
    /// [`MediaPool::warm`]).
    tools_off: std::sync::atomic::AtomicBool,
    /// Clock ticks per second, for reading workers' CPU time from `/proc`.
    ticks: u64,
}

impl MediaPool {
    pub fn new(config: PoolConfig, metrics: PoolMetrics) -> Self {
        let workers = config.workers.max(1);
        Self {
            admitted: Semaphore::new(workers + config.queue),
            running: Semaphore::new(workers),
            idle: Mutex::new(Vec::new()),
            verdicts: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(86_400))
                .build(),
            metrics,
            tools_off: std::sync::atomic::AtomicBool::new(false),
            ticks: nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .map_or(100, |t| t.max(1) as u64),
            config,
        }
    }

    /// Starts one worker and keeps it for the first job: a binary that cannot be started, or
    /// a kernel that refuses the sandbox, is found at start, not at the first thumbnail.
    /// Returns Landlock's status, for the start-up log line.
    /// Where the kernel has no Landlock, outside programs (ffmpeg, heif-convert) are turned
    /// off: nothing else would keep them from reading other files into their output.
    pub async fn warm(&self) -> Result<String, ProxyError> {
        let (worker, landlock) = self.spawn().await?;
        if landlock == sandbox::LANDLOCK_MISSING {
            self.tools_off.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("no Landlock in this kernel: ffmpeg and heif-convert are not run");
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
        Ok(landlock)
    }

    /// The ffmpeg program found at start, if any.
    pub fn ffmpeg(&self) -> Option<&std::path::Path> {
        self.config.ffmpeg.as_deref().filter(|_| !self.tools_off())
    }

    fn tools_off(&self) -> bool {
        self.tools_off.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The heif-convert program found at start, if any.
    pub fn heif_convert(&self) -> Option<&std::path::Path> {
        self.config.heif_convert.as_deref().filter(|_| !self.tools_off())
    }

    /// The outside program that makes a picture of a file of `content_type` the workers'
    /// own decoders do not read: heif-convert for HEIC/HEIF (and AVIF, where it is there:
    /// tiles and transparency), ffmpeg for AVIF and video. `None`: none can.
    pub fn frame_tool(&self, content_type: &str) -> Option<tool::ToolJob> {
        let heif = |program: &std::path::Path| tool::ToolJob {
            program: program.to_path_buf(),
            args: tool::heif_args(),
            name: "heif",
        };
        let ffmpeg = |program: &std::path::Path| tool::ToolJob {
            program: program.to_path_buf(),
            args: tool::frame_args(),
            name: "frame",
        };
        match content_type {
            "image/heif" => self.heif_convert().map(heif),
            "image/avif" => self.heif_convert().map(heif).or_else(|| self.ffmpeg().map(ffmpeg)),
            t if t.starts_with("video/") => self.ffmpeg().map(ffmpeg),
            _ => None,
        }
    }

    /// Runs `task` on `input`, the file whose blake3 is `content` (when known), sending any
    /// output to `sink`.
    pub async fn run<S: ChunkSink>(
        &self,
        task: &Task,
        input: Input,
        content: Option<&blake3::Hash>,
        sink: &mut S,
    ) -> Result<Outcome, ProxyError> {
        let verdict = content.map(|hash| {
            let mut key = blake3::Hasher::new();
            key.update(hash.as_bytes()).update(task.name().as_bytes());
            *key.finalize().as_bytes()
        });
        if let Some(key) = &verdict {
            if let Some(why) = self.verdicts.get(key).await {
                self.count("remembered");
                return Err(ProxyError::MediaTooCostly(why));
            }
        }
        let result = self.submit(task, &input, sink).await;
        if let (Err(ProxyError::MediaTooCostly(why)), Some(key)) = (&result, verdict) {
            self.verdicts.insert(key, why.clone()).await;
        }
        match result? {
            Reply::Done { width, height } => Ok(Outcome::Done { width, height }),
            Reply::Unchanged => Ok(Outcome::Unchanged),
            other => Err(ProxyError::internal(format!("media worker answered {other:?}"))),
        }
    }

    /// Runs the sandbox self-check in a real worker.
    pub async fn self_check(
        &self,
        open: PathBuf,
        connect: std::net::SocketAddr,
    ) -> Result<SelfReport, ProxyError> {
        let task = Task::SelfCheck { open, connect };
        match self.submit(&task, &Input::Memory(Bytes::new()), &mut Vec::new()).await? {
            Reply::Report(report) => Ok(*report),
            other => Err(ProxyError::internal(format!("media worker answered {other:?}"))),
        }
    }

    /// Queues, runs on a worker under the deadline, and classifies what happened.
    async fn submit<S: ChunkSink>(
        &self,
        task: &Task,
        input: &Input,
        sink: &mut S,
    ) -> Result<Reply, ProxyError> {
        if input.len() > self.config.max_input {
            return Err(ProxyError::TooLarge);
        }
        let _admitted = self.admit().await?;
        // A second worker is tried when the first could not take the job (gone while idle,
        // or retired), or died on it after earlier jobs (its own history, say a heap grown by
        // them, may be what ran out): only a fresh worker's failure is the file's.
        let mut fresh = false;
        loop {
            let mut worker = match if fresh { None } else { self.take_idle() } {
                Some(worker) => worker,
                None => match self.spawn().await {
                    Ok((worker, _)) => worker,
                    Err(e) => {
                        self.count("error");
                        return Err(e);
                    }
                },
            };
            let started = worker.cpu_ms;
            let reused = worker.jobs > 0;
            let max = self.config.max_input;
            let exchange = exchange(&mut worker, task, input, sink, max);
            let failure = match tokio::time::timeout(self.config.job_timeout, exchange).await {
                Ok(Ok(Answer { reply: Reply::Retired, .. })) if !fresh => {
                    fresh = true;
                    continue;
                }
                Ok(Ok(Answer { reply, cpu_ms })) => {
                    worker.jobs += 1;
                    worker.cpu_ms = cpu_ms;
                    let retire =
                        matches!(reply, Reply::Refused { retire: true, .. } | Reply::Retired)
                            || worker.jobs >= self.config.limits.jobs;
                    if !retire {
                        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
                    }
                    return self.answer(task, reply);
                }
                Ok(Err(Failure::Send(_))) if !fresh => {
                    fresh = true;
                    continue;
                }
                Ok(Err(Failure::NoReply(e))) if reused && !fresh => {
                    tracing::debug!(task = task.name(), error = %e, "worker died; trying a fresh one");
                    fresh = true;
                    continue;
                }
                Ok(Err(failure)) => failure,
                Err(_) => return Err(self.overran(task, worker, started)),
            };
            return Err(self.failed(task, worker, failure).await);
        }
    }

    /// A place in the queue (or 503 `media_busy` at once), then a worker's slot; the job
    /// counts as running while the result is held.
    async fn admit(&self) -> Result<Admitted<'_>, ProxyError> {
        let Ok(queued) = self.admitted.try_acquire() else {
            self.count("busy");
            return Err(ProxyError::MediaBusy);
        };
        let slot = self.running.acquire().await.map_err(|_| ProxyError::MediaBusy)?;
        self.metrics.running.inc();
        Ok(Admitted { _queued: queued, _slot: slot, _running: RunningJob(&self.metrics.running) })
    }

    /// A job past `media.job_timeout`: its worker is killed. The file is blamed only if the
    /// worker had at least a fifth of the deadline on the CPU and still did not finish: a
    /// file that needs that much is too costly, while a worker starved of the CPU (a machine
    /// too busy, perhaps on purpose, or input slow to arrive) says nothing about the file.
    fn overran(&self, task: &Task, mut worker: Worker, started_ms: u64) -> ProxyError {
        let used_ms = (self.cpu_ticks(worker.pid) * 1000 / self.ticks).saturating_sub(started_ms);
        let _ = worker.child.start_kill();
        if (used_ms as u128) < self.config.job_timeout.as_millis() / 5 {
            self.count("starved");
            tracing::warn!(
                task = task.name(),
                used_ms,
                "media job over media.job_timeout without using the CPU: overloaded"
            );
            return ProxyError::MediaBusy;
        }
        self.count("too_costly");
        tracing::warn!(task = task.name(), "media job over media.job_timeout: worker killed");
        ProxyError::MediaTooCostly("over media.job_timeout".into())
    }

    /// Maps a worker's reply to the caller's result, counting it.
    fn answer(&self, task: &Task, reply: Reply) -> Result<Reply, ProxyError> {
        match reply {
            Reply::Refused { reason, .. } => {
                self.count("refused");
                tracing::debug!(task = task.name(), reason, "media worker refused the file");
                Err(ProxyError::bad_image(&reason))
            }
            Reply::Done { .. } | Reply::Report(_) => {
                self.count("ok");
                Ok(reply)
            }
            Reply::Unchanged => {
                self.count("unchanged");
                Ok(reply)
            }
            Reply::NoRendition { reason } => {
                self.count("refused");
                Err(ProxyError::NoRendition(reason.into()))
            }
            Reply::Ready { .. } | Reply::Unsafe { .. } | Reply::Retired => {
                self.count("error");
                Err(ProxyError::internal("media worker answered out of turn"))
            }
        }
    }

    /// A job that did not get its reply: whose fault, and what the viewer gets.
    async fn failed(&self, task: &Task, mut worker: Worker, failure: Failure) -> ProxyError {
        match failure {
            Failure::Input(e) | Failure::Sink(e) => {
                let _ = worker.child.start_kill();
                self.count("error");
                crate::error::ProxyError::storage(e)
            }
            Failure::Send(e) | Failure::NoReply(e) | Failure::Reply(e) => {
                // Died on its own (its status says how), or is alive and broke the protocol.
                let status =
                    tokio::time::timeout(Duration::from_secs(1), worker.child.wait()).await;
                let why = match status {
                    Ok(Ok(status)) => death(status),
                    _ => {
                        let _ = worker.child.start_kill();
                        format!("broke the protocol: {e}")
                    }
                };
                self.count("too_costly");
                tracing::warn!(task = task.name(), why, "media worker failed mid-job");
                ProxyError::MediaTooCostly(why.into())
            }
        }
    }

    /// An idle worker that is still alive. (One that spins while idle, which nothing
    /// legitimate does, is stopped by its lifetime CPU limit: four jobs' worth.)
    fn take_idle(&self) -> Option<Worker> {
        loop {
            let mut worker = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if matches!(worker.child.try_wait(), Ok(None)) {
                return Some(worker);
            }
        }
    }

    /// CPU time (user and system, clock ticks) of process `pid`, 0 when unreadable. Read
    /// only when a job overran.
    fn cpu_ticks(&self, pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The name may hold spaces and parentheses: fields are counted after its last ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let mut fields = rest.split_whitespace().skip(11);
        let mut next = || fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        next() + next()
    }

    /// Starts a worker and waits for it to report its sandbox in place.
    async fn spawn(&self) -> Result<(Worker, String), ProxyError> {
        let exe = &self.config.exe;
        let limits = &self.config.limits;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("media-worker")
            .args(["--memory", &limits.memory.to_string()])
            .args(["--cpu-seconds", &limits.cpu_seconds.to_string()])
            .args(["--jobs", &limits.jobs.to_string()])
            .args(["--max-input", &self.config.max_input.to_string()])
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C meant for the server does not kill the jobs
            // it is draining.
            .process_group(0);
        let cannot = |e: &dyn std::fmt::Display| {
            ProxyError::internal(format!("cannot start media worker {}: {e}", exe.display()))
        };
        let mut child = cmd.spawn().map_err(|e| cannot(&e))?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(cannot(&"no pipes"));
        };
        tokio::spawn(relay_stderr(pid, stderr));
        // 1 MiB pipes (the default is 64 KiB): a 4 MB photo crosses in four wake-ups, not 64.
        // Best effort: the system's pipe-max-size may be lower.
        for fd in [stdin.as_fd(), stdout.as_fd()] {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
        }
        let mut stdout = BufReader::with_capacity(1 << 16, stdout);
        let hello = protocol::read_header::<Answer>(&mut stdout);
        match tokio::time::timeout(Duration::from_secs(10), hello).await {
            Ok(Ok((Answer { reply: Reply::Ready { landlock, .. }, cpu_ms }, 0))) => {
                Ok((Worker { child, pid, stdin, stdout, jobs: 0, cpu_ms }, landlock))
            }
            Ok(Ok((Answer { reply: Reply::Unsafe { why }, .. }, _))) => {
                Err(cannot(&format!("sandbox: {why}")))
            }
            Ok(Ok((other, _))) => Err(cannot(&format!("unexpected greeting {:?}", other.reply))),
            Ok(Err(e)) => Err(cannot(&e)),
            Err(_) => Err(cannot(&"no greeting within 10 s")),
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// What a worker writes to stderr (a panic message, normally nothing) goes to the log, a
/// bounded amount: a worker a file took over could otherwise flood or forge the server's log,
/// so each line is cut at 300 bytes, escaped, and marked as the worker's.
async fn relay_stderr(pid: u32, mut stderr: tokio::process::ChildStderr) {
    const LINES: usize = 32;
    let (mut buf, mut line, mut logged) = (vec![0u8; 4096], Vec::new(), 0);
    while let Ok(n @ 1..) = stderr.read(&mut buf).await {
        for &b in &buf[..n] {
            if b != b'\n' {
                if line.len() < 300 {
                    line.push(b);
                }
                continue;
            }
            if logged < LINES {
                let text = String::from_utf8_lossy(&line).escape_debug().to_string();
                tracing::warn!(worker = pid, text, "media worker stderr");
                logged += 1;
            }
            line.clear();
        }
    }
}

/// Sends one job and receives its reply, the output streamed into `sink`.
async fn exchange<S: ChunkSink>(
    worker: &mut Worker,
    task: &Task,
    input: &Input,
    sink: &mut S,
    max_output: u64,
) -> Result<Answer, Failure> {
    match input {
        // Header and file in one write: the worker wakes once for a small job.
        Input::Memory(bytes) if bytes.len() <= PIPE_BYTES as usize => {
            let frame = protocol::job_frame(task, bytes).map_err(Failure::Send)?;
            worker.stdin.write_all(&frame).await.map_err(Failure::Send)?
        }
        Input::Memory(bytes) => {
            protocol::write_header(&mut worker.stdin, task, input.len())
                .await
                .map_err(Failure::Send)?;
            worker.stdin.write_all(bytes).await.map_err(Failure::Send)?
        }
        Input::File { path, len } => {
            protocol::write_header(&mut worker.stdin, task, *len).await.map_err(Failure::Send)?;
            let file = tokio::fs::File::open(path).await.map_err(Failure::Input)?;
            let mut file = file.take(*len);
            let mut buf = vec![0u8; 1 << 16];
            let mut sent = 0u64;
            loop {
                let n = file.read(&mut buf).await.map_err(Failure::Input)?;
                if n == 0 {
                    break;
                }
                worker.stdin.write_all(&buf[..n]).await.map_err(Failure::Send)?;
                sent += n as u64;
            }
            if sent != *len {
                let short = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shrank");
                return Err(Failure::Input(short));
            }
        }
    }
    worker.stdin.flush().await.map_err(Failure::Send)?;
    let (answer, body_len): (Answer, u64) =
        protocol::read_header(&mut worker.stdout).await.map_err(Failure::NoReply)?;
    let expects_body = matches!(answer.reply, Reply::Done { .. });
    if (body_len > 0 && !expects_body) || body_len > max_output {
        let stray = std::io::Error::new(std::io::ErrorKind::InvalidData, "a body out of bounds");
        return Err(Failure::Reply(stray));
    }
    if expects_body {
        sink.begin(body_len).await.map_err(Failure::Sink)?;
        // Straight from the reader's buffer: no copy of our own.
        let mut left = body_len;
        while left > 0 {
            let chunk = worker.stdout.fill_buf().await.map_err(Failure::Reply)?;
            if chunk.is_empty() {
                let cut = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "reply cut short");
                return Err(Failure::Reply(cut));
            }
            let n = chunk.len().min(left as usize);
            sink.push(&chunk[..n]).await.map_err(Failure::Sink)?;
            worker.stdout.consume(n);
            left -= n as u64;
        }
    }
    Ok(answer)
}

/// Why a worker process ended, in words for the log and the error.
fn death(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGKILL) => "killed (out of memory, or by an operator)".into(),
        Some(libc::SIGXCPU) => "out of CPU time".into(),
        Some(libc::SIGABRT) => "aborted (out of memory)".into(),
        Some(libc::SIGSEGV) | Some(libc::SIGBUS) => "crashed".into(),
        Some(signal) => format!("ended by signal {signal}"),
        None => format!("exited with {status}"),
    }
}
