//! A worker process as the pool sees it: starting one (and waiting for its sandbox), one
//! job's exchange over its pipes (the job's id echoed, a reply of the task's kind, nothing
//! after it), its stderr relayed a bounded amount, and why it ended.

use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::protocol::{self, Answer, Job, Reply};
use super::{Input, PoolConfig};
use crate::cache::ChunkSink;
use crate::error::ProxyError;

/// Capacity asked for each worker pipe.
const PIPE_BYTES: i32 = 1 << 20;

/// One running worker process and its pipes.
pub(super) struct Worker {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: BufReader<ChildStdout>,
    /// Jobs done so far; the worker is retired at `limits.jobs`.
    pub(super) jobs: u32,
    /// The CPU time it reported with its last reply (milliseconds).
    pub(super) cpu_ms: u64,
    /// The source host whose jobs it runs, from its first job on: a worker a file took over
    /// can reach only later jobs of the same host, never another's renditions.
    pub(super) host: Option<std::sync::Arc<str>>,
}

impl Worker {
    /// Whether it may take another job: alive, with nothing written since its last reply.
    pub(super) fn clean(&mut self) -> bool {
        use futures_util::FutureExt;
        if !matches!(self.child.try_wait(), Ok(None)) || !self.stdout.buffer().is_empty() {
            return false;
        }
        // Pending is clean; bytes, an end or an error are not.
        self.stdout.fill_buf().now_or_never().is_none()
    }
}

/// How an exchange with a worker failed.
pub(super) enum Failure {
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

/// Keeps `worker` among the idle ones, at most `most` of them: the oldest that has a host goes
/// first, a fresh one last.
pub(super) fn keep_idle(
    idle: &Mutex<std::collections::VecDeque<Worker>>,
    worker: Worker,
    most: usize,
) {
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    idle.push_back(worker);
    while idle.len() > most {
        let at = idle.iter().position(|w| w.host.is_some()).unwrap_or(0);
        if let Some(mut gone) = idle.remove(at) {
            let _ = gone.child.start_kill();
        }
    }
}

/// Starts a worker of `config` and waits for it to report its sandbox in place.
pub(super) async fn spawn_worker(config: &PoolConfig) -> Result<(Worker, String), ProxyError> {
    let exe = &config.exe;
    let limits = &config.limits;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("media-worker")
        .args(["--memory", &limits.memory.to_string()])
        .args(["--cpu-seconds", &limits.cpu_seconds.to_string()])
        .args(["--jobs", &limits.jobs.to_string()])
        .args(["--max-input", &config.max_input.to_string()])
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
        Ok(Ok((Answer { reply: Reply::Ready { landlock, .. }, cpu_ms, .. }, 0))) => {
            let worker = Worker { child, pid, stdin, stdout, jobs: 0, cpu_ms, host: None };
            Ok((worker, landlock))
        }
        Ok(Ok((Answer { reply: Reply::Unsafe { why }, .. }, _))) => {
            Err(cannot(&format!("sandbox: {why}")))
        }
        Ok(Ok((other, _))) => Err(cannot(&format!("unexpected greeting {:?}", other.reply))),
        Ok(Err(e)) => Err(cannot(&e)),
        Err(_) => Err(cannot(&"no greeting within 10 s")),
    }
}

/// What a worker writes to stderr (a panic message, normally nothing) goes to the log, a
/// bounded amount: a worker a file took over could otherwise flood or forge the server's log,
/// so each line is cut at 300 bytes, escaped, and marked as the worker's.
pub(super) async fn relay_stderr(pid: u32, mut stderr: tokio::process::ChildStderr) {
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

/// A job id no file can guess: its reply must echo it.
pub(super) fn random_id() -> u64 {
    let mut id = [0u8; 8];
    // Without the system's randomness (never seen), a clock's nanoseconds still differ.
    if getrandom::fill(&mut id).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        id = (now.map_or(0, |d| d.as_nanos()) as u64).to_le_bytes();
    }
    u64::from_le_bytes(id)
}

/// Sends one job and receives its reply, the output streamed into `sink`. The reply must
/// name the job and be all the worker wrote.
pub(super) async fn exchange<S: ChunkSink>(
    worker: &mut Worker,
    job: &Job,
    input: &Input,
    sink: &mut S,
    max_output: u64,
) -> Result<Answer, Failure> {
    match input {
        // Header and file in one write: the worker wakes once for a small job.
        Input::Memory(bytes) if bytes.len() <= PIPE_BYTES as usize => {
            let frame = protocol::job_frame(job, bytes).map_err(Failure::Send)?;
            worker.stdin.write_all(&frame).await.map_err(Failure::Send)?
        }
        Input::Memory(bytes) => {
            protocol::write_header(&mut worker.stdin, job, input.len())
                .await
                .map_err(Failure::Send)?;
            worker.stdin.write_all(bytes).await.map_err(Failure::Send)?
        }
        Input::File { path, len } => {
            protocol::write_header(&mut worker.stdin, job, *len).await.map_err(Failure::Send)?;
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
    let broken = |why: &'static str| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let (answer, body_len): (Answer, u64) =
        protocol::read_header(&mut worker.stdout).await.map_err(Failure::NoReply)?;
    if answer.job != job.id {
        return Err(Failure::Reply(broken("an answer to another job")));
    }
    if !job.task.accepts(&answer.reply) {
        return Err(Failure::Reply(broken("an answer of another kind")));
    }
    let expects_body = matches!(answer.reply, Reply::Done { .. });
    if (body_len > 0 && !expects_body) || body_len > max_output {
        return Err(Failure::Reply(broken("a body out of bounds")));
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
    // A worker writes its reply and waits: anything after it was not asked for.
    if !worker.stdout.buffer().is_empty() {
        return Err(Failure::Reply(broken("bytes after the reply")));
    }
    Ok(answer)
}

/// Why a worker process ended, in words for the log and the error.
pub(super) fn death(status: std::process::ExitStatus) -> String {
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
