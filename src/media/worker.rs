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

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::Semaphore;

use crate::cache::ChunkSink;
use crate::error::ProxyError;
use crate::telemetry::OutcomeLabels;
use protocol::{Reply, SelfReport, Task};
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
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Jobs done so far; the worker is retired at `limits.jobs`.
    jobs: u32,
}

/// How an exchange with a worker failed.
enum Failure {
    /// Writing the job failed: the worker was gone before it could have read it.
    Send(std::io::Error),
    /// The job's own file could not be read (ours, not the worker's fault).
    Input(std::io::Error),
    /// The sink refused the output (disk full, say).
    Sink(std::io::Error),
    /// The reply did not arrive whole: the worker died or broke the protocol mid-job.
    Reply(std::io::Error),
}

pub struct MediaPool {
    config: PoolConfig,
    /// Jobs waiting or running; beyond it, `media_busy`.
    admitted: Semaphore,
    /// One per worker process.
    running: Semaphore,
    /// Workers between jobs. A std mutex: held only to push or pop.
    idle: Mutex<Vec<Worker>>,
    /// Files whose job ran out of time or memory or killed its worker, by blake3, with why.
    verdicts: moka::future::Cache<[u8; 32], std::sync::Arc<str>>,
    /// `parasol_media_jobs_total{outcome}`.
    jobs: Family<OutcomeLabels, Counter>,
}

impl MediaPool {
    pub fn new(config: PoolConfig, jobs: Family<OutcomeLabels, Counter>) -> Self {
        let workers = config.workers.max(1);
        Self {
            admitted: Semaphore::new(workers + config.queue),
            running: Semaphore::new(workers),
            idle: Mutex::new(Vec::new()),
            verdicts: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(86_400))
                .build(),
            jobs,
            config,
        }
    }

    /// Starts one worker and keeps it for the first job: a binary that cannot be started, or
    /// a kernel that refuses the sandbox, is found at start, not at the first thumbnail.
    /// Returns Landlock's status, for the start-up log line.
    pub async fn warm(&self) -> Result<String, ProxyError> {
        let (worker, landlock) = self.spawn().await?;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
        Ok(landlock)
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
        if let Some(hash) = content {
            if let Some(why) = self.verdicts.get(hash.as_bytes()).await {
                self.count("remembered");
                return Err(ProxyError::MediaTooCostly(why));
            }
        }
        let result = self.submit(task, &input, sink).await;
        if let (Err(ProxyError::MediaTooCostly(why)), Some(hash)) = (&result, content) {
            self.verdicts.insert(*hash.as_bytes(), why.clone()).await;
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
            Reply::Report(report) => Ok(report),
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
        let Ok(_admitted) = self.admitted.try_acquire() else {
            self.count("busy");
            return Err(ProxyError::MediaBusy);
        };
        let _running = self.running.acquire().await.map_err(|_| ProxyError::MediaBusy)?;
        // A worker kept idle may have died meanwhile (an operator, the OOM killer): when the
        // job cannot even be sent, it is sent once more to a fresh worker.
        for fresh in [false, true] {
            let mut worker = match self.take_idle().filter(|_| !fresh) {
                Some(worker) => worker,
                None => match self.spawn().await {
                    Ok((worker, _)) => worker,
                    Err(e) => {
                        self.count("error");
                        return Err(e);
                    }
                },
            };
            let exchange = exchange(&mut worker, task, input, sink, self.config.max_input);
            let failure = match tokio::time::timeout(self.config.job_timeout, exchange).await {
                Ok(Ok(reply)) => {
                    worker.jobs += 1;
                    let retire = matches!(reply, Reply::Refused { retire: true, .. })
                        || worker.jobs >= self.config.limits.jobs;
                    if !retire {
                        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
                    }
                    return self.answer(task, reply);
                }
                Ok(Err(Failure::Send(_))) if !fresh => continue,
                Ok(Err(failure)) => failure,
                Err(_) => {
                    let _ = worker.child.start_kill();
                    self.count("too_costly");
                    tracing::warn!(
                        task = task.name(),
                        "media job over media.job_timeout: worker killed"
                    );
                    return Err(ProxyError::MediaTooCostly("over media.job_timeout".into()));
                }
            };
            return Err(self.failed(task, worker, failure).await);
        }
        unreachable!("the second attempt always returns")
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
            Reply::Ready { .. } | Reply::Unsafe { .. } => {
                self.count("error");
                Err(ProxyError::internal("media worker answered out of turn"))
            }
        }
    }

    /// A job that did not get its reply: whose fault, and what the viewer gets.
    async fn failed(&self, task: &Task, mut worker: Worker, failure: Failure) -> ProxyError {
        let _ = worker.child.start_kill();
        match failure {
            Failure::Input(e) | Failure::Sink(e) => {
                self.count("error");
                crate::proxy::storage_error(e)
            }
            Failure::Send(e) | Failure::Reply(e) => {
                // Died on its own, or broke the protocol (then it was just killed, above).
                let status =
                    tokio::time::timeout(Duration::from_secs(2), worker.child.wait()).await;
                let why = match status {
                    Ok(Ok(status)) => death(status),
                    _ => format!("broke the protocol: {e}"),
                };
                self.count("too_costly");
                tracing::warn!(task = task.name(), why, "media worker failed mid-job");
                ProxyError::MediaTooCostly(why.into())
            }
        }
    }

    fn take_idle(&self) -> Option<Worker> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut worker) = idle.pop() {
            if matches!(worker.child.try_wait(), Ok(None)) {
                return Some(worker);
            }
        }
        None
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
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C meant for the server does not kill the jobs
            // it is draining.
            .process_group(0);
        let cannot = |e: &dyn std::fmt::Display| {
            ProxyError::internal(format!("cannot start media worker {}: {e}", exe.display()))
        };
        let mut child = cmd.spawn().map_err(|e| cannot(&e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(cannot(&"no pipes"));
        };
        // 1 MiB pipes (the default is 64 KiB): a 4 MB photo crosses in four wake-ups, not 64.
        // Best effort: the system's pipe-max-size may be lower.
        for fd in [stdin.as_fd(), stdout.as_fd()] {
            let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES));
        }
        let mut stdout = BufReader::with_capacity(1 << 16, stdout);
        let hello = protocol::read_header::<Reply>(&mut stdout);
        match tokio::time::timeout(Duration::from_secs(10), hello).await {
            Ok(Ok((Reply::Ready { landlock, .. }, 0))) => {
                Ok((Worker { child, stdin, stdout, jobs: 0 }, landlock))
            }
            Ok(Ok((Reply::Unsafe { why }, _))) => Err(cannot(&format!("sandbox: {why}"))),
            Ok(Ok((other, _))) => Err(cannot(&format!("unexpected greeting {other:?}"))),
            Ok(Err(e)) => Err(cannot(&e)),
            Err(_) => Err(cannot(&"no greeting within 10 s")),
        }
    }

    fn count(&self, outcome: &'static str) {
        self.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Sends one job and receives its reply, the output streamed into `sink`.
async fn exchange<S: ChunkSink>(
    worker: &mut Worker,
    task: &Task,
    input: &Input,
    sink: &mut S,
    max_output: u64,
) -> Result<Reply, Failure> {
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
    let (reply, body_len): (Reply, u64) =
        protocol::read_header(&mut worker.stdout).await.map_err(Failure::Reply)?;
    let expects_body = matches!(reply, Reply::Done { .. });
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
    Ok(reply)
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
