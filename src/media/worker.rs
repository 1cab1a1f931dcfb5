//! The media worker pool: every decode, render, rasterisation and metadata strip runs in a
//! separate process, the `parasol` binary started as `parasol media-worker`, never on the
//! server's own threads. A hostile file can then cost at most one worker: its memory is capped
//! by the kernel, its CPU time too, its wall-clock time by the server (which kills it), and
//! it can open no file, socket or program ([`sandbox`]).
//!
//! - **Pool**: up to `media.workers` jobs at once (and one metadata strip beyond them), each
//!   on a worker process kept between jobs of its source host; a fresh one stands by for the
//!   next new host (started in the background, about 2 ms); a worker is retired after
//!   `media.worker_jobs` jobs, or at once after any failure.
//! - **Fair queue** ([`schedule`]): one origin ([`crate::policy::origin_of`]) may hold only
//!   its share of the workers and of the queue; a job waits at most `media.queue_wait`;
//!   beyond the queue, 503 `media_busy` at once. A site ([`crate::policy::site_of`]) whose
//!   files keep ending `too_costly` gets no new jobs for a while.
//! - **A worker is trusted no more than one file**: a worker only ever runs jobs of one source
//!   host, every job carries a random id its reply must echo, and a reply of another kind or a
//!   byte more than the reply is a protocol break that ends the worker. A strip answers the
//!   byte ranges to cut, which the server checks are whole metadata segments and cuts from its
//!   own copy ([`crate::media::strip`]), so a worker can neither add a byte to an original nor
//!   choose which of its bytes remain.
//! - **Deadline in CPU time**: a job may use `media.job_timeout` of CPU (rasterising an SVG,
//!   `media.svg_timeout`); past it the kernel stops the worker and the file is answered 422
//!   `media_too_costly`, remembered by the file's blake3 for a day, so the next viewer of the
//!   same bytes does not start it again. On the wall clock a job may take as long as it keeps
//!   making progress (a busy machine slows it, no more); one that stops getting any CPU, or
//!   takes [`MAX_WALL_FACTOR`] times its budget, was starved (stopped, or a machine too
//!   busy), which says nothing about the file, and answers 503 `media_busy`.
//! - **Bytes**: a job's input is written from memory or streamed from its file, and its
//!   output is handed to a [`ChunkSink`] as it arrives, so the server holds no extra copy.
//!
//! Workers are children of the server with `kill_on_drop`; a job whose future is dropped
//! (shutdown) kills its worker, and each worker dies with the server (`PR_SET_PDEATHSIG`).

pub mod child;
mod process;
pub mod protocol;
pub mod sandbox;
pub mod schedule;
pub mod tool;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cache::ChunkSink;
use crate::error::ProxyError;
use crate::telemetry::OutcomeLabels;
use bytes::Bytes;
use process::{Failure, Worker, death, exchange, keep_idle, random_id, spawn_worker};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use protocol::{Answer, Job, Reply, SelfReport, Task};
pub use sandbox::Limits;
pub use schedule::Lane;
use tracing::Instrument;

/// How much longer than its CPU budget a job may take on the wall clock before it is asked
/// whether it still makes progress: from then on, every further budget's worth of wall time,
/// a job that used no CPU in it (stopped, blocked) is ended as starved, and one that did (a
/// busy machine, where a niced worker gets a tenth of a core beside a compiler) goes on.
pub const WALL_FACTOR: u32 = 3;

/// The most wall time a job may take, in CPU budgets, however it progresses: a viewer's
/// wait is bounded on any machine.
pub const MAX_WALL_FACTOR: u32 = 20;

/// Too-costly verdicts within [`STRIKE_WINDOW`] after which an origin gets no new jobs for
/// [`STRIKE_WINDOW`].
pub const STRIKES: u32 = 3;

/// See [`STRIKES`].
pub const STRIKE_WINDOW: Duration = Duration::from_secs(600);

/// How the pool runs its workers; from `[media]`.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The `parasol` binary to start as `parasol media-worker`.
    pub exe: PathBuf,
    /// Workers, queue, each origin's share and the longest wait ([`schedule::Shares`]).
    pub shares: schedule::Shares,
    /// The kernel limits of each worker.
    pub limits: Limits,
    /// CPU time of one job; its wall-clock deadline is [`WALL_FACTOR`] times as long.
    pub job_timeout: Duration,
    /// CPU time of rasterising one SVG (at most `job_timeout`).
    pub svg_timeout: Duration,
    /// Largest job input (`cache.max_object_bytes`).
    pub max_input: u64,
    /// ffmpeg, when there is one (`media.ffmpeg`): run through [`tool`].
    pub ffmpeg: Option<PathBuf>,
    /// heif-convert, when there is one (`media.heif_convert`): run through [`tool`].
    pub heif_convert: Option<PathBuf>,
}

/// A job's file: already in memory, or a file streamed into the worker.
pub use crate::cache::Input;

/// What came of a job whose reply was not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The result went to the sink.
    Done {
        /// The picture's width in pixels (0 when not a picture).
        width: u32,
        /// Its height.
        height: u32,
    },
    /// Nothing to change: the input stands.
    Unchanged,
}

/// The pool's metrics.
#[derive(Clone, Default)]
pub struct PoolMetrics {
    /// `parasol_media_jobs_total{outcome}`.
    pub jobs: Family<OutcomeLabels, Counter>,
    /// `parasol_media_jobs_running`: jobs on a worker now.
    pub running: Gauge,
}

/// A job's place: a slot of the fair queue, counted as running.
struct Admitted<'a> {
    _slot: schedule::Slot,
    _running: RunningJob<'a>,
}

/// Counts a job as running while it holds a worker.
struct RunningJob<'a>(&'a Gauge);

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The media worker pool (see the module).
pub struct MediaPool {
    config: Arc<PoolConfig>,
    /// Who runs next ([`schedule`]).
    schedule: schedule::Schedule,
    /// Workers between jobs, oldest first, each with the host it serves (none yet: a fresh
    /// one). A std mutex: held only to push or take.
    idle: Arc<Mutex<std::collections::VecDeque<Worker>>>,
    /// A fresh worker is being started in the background to stand by for a new host.
    refilling: Arc<std::sync::atomic::AtomicBool>,
    /// Too-costly verdicts by site ([`crate::policy::site_of`]) in the last
    /// [`STRIKE_WINDOW`], and the sites refused new jobs for having had [`STRIKES`] of them.
    strikes: moka::sync::Cache<String, std::sync::Arc<std::sync::atomic::AtomicU32>>,
    refused: moka::sync::Cache<String, ()>,
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
    /// A pool run as `config` says, counting into `metrics`.
    pub fn new(config: PoolConfig, metrics: PoolMetrics) -> Self {
        let strikes = || {
            moka::sync::Cache::builder().max_capacity(100_000).time_to_live(STRIKE_WINDOW).build()
        };
        Self {
            schedule: schedule::Schedule::new(config.shares),
            idle: Default::default(),
            refilling: Default::default(),
            strikes: strikes(),
            refused: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(STRIKE_WINDOW)
                .build(),
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
            config: Arc::new(config),
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
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push_back(worker);
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

    /// Runs `task` on `input`, the file whose blake3 is `content` (when known), of a source
    /// on `host`, sending any output to `sink`.
    pub async fn run<S: ChunkSink>(
        &self,
        task: &Task,
        input: Input,
        content: Option<&blake3::Hash>,
        host: &str,
        sink: &mut S,
    ) -> Result<Outcome, ProxyError> {
        match self.remembered(task, &input, content, host, sink).await? {
            Reply::Done { width, height } => Ok(Outcome::Done { width, height }),
            Reply::Unchanged => Ok(Outcome::Unchanged),
            other => Err(ProxyError::internal(format!("media worker answered {other:?}"))),
        }
    }

    /// [`Self::submit`], unless the same bytes (`content`) were found too costly for the same
    /// task within a day; a new such verdict is remembered. Only what a worker did on a file
    /// is: never a refusal of its site or a busy pool.
    async fn remembered<S: ChunkSink>(
        &self,
        task: &Task,
        input: &Input,
        content: Option<&blake3::Hash>,
        host: &str,
        sink: &mut S,
    ) -> Result<Reply, ProxyError> {
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
        let result = self.submit(task, input, host, sink).await;
        if let (Err(ProxyError::MediaTooCostly(why)), Some(key)) = (&result, verdict) {
            self.verdicts.insert(key, why.clone()).await;
        }
        result
    }

    /// A strip of `input` (a JPEG, PNG or WebP from `host`): the cuts that remove its
    /// metadata, which the caller makes in its own copy; `None` when there is nothing to
    /// remove.
    pub async fn strip_plan(
        &self,
        input: Input,
        content_type: &str,
        content: &blake3::Hash,
        host: &str,
    ) -> Result<Option<crate::media::strip::Cuts>, ProxyError> {
        let task = Task::Strip { content_type: content_type.into() };
        match self.remembered(&task, &input, Some(content), host, &mut Vec::new()).await? {
            Reply::Cut(cuts) => Ok(Some(cuts)),
            Reply::Unchanged => Ok(None),
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
        let input = Input::Memory(Bytes::new());
        match self.submit(&task, &input, "(self-check)", &mut Vec::new()).await? {
            Reply::Report(report) => Ok(*report),
            other => Err(ProxyError::internal(format!("media worker answered {other:?}"))),
        }
    }

    /// Refuses jobs of a site whose files were too costly [`STRIKES`] times lately: 422
    /// `media_origin_refused` (remembered for `cache.negative_ttl`, so its viewers do not
    /// refetch a file just to be refused again; never as the file's own verdict).
    fn check_site(&self, site: &str) -> Result<(), ProxyError> {
        if self.refused.contains_key(site) {
            self.count("origin_refused");
            return Err(ProxyError::MediaOriginRefused);
        }
        Ok(())
    }

    /// Counts a too-costly verdict against `site`; at [`STRIKES`], it is refused for
    /// [`STRIKE_WINDOW`].
    fn strike(&self, site: &str) {
        use std::sync::atomic::Ordering;
        let count = self.strikes.get_with(site.to_string(), Default::default);
        if count.fetch_add(1, Ordering::Relaxed) + 1 >= STRIKES && !self.refused.contains_key(site)
        {
            tracing::warn!(
                site,
                strikes = STRIKES,
                "a site's files keep being too costly: refused new media jobs for a while"
            );
            self.refused.insert(site.to_string(), ());
            self.strikes.invalidate(site);
        }
    }

    /// Origins refused new jobs now (the `parasol_media_origins_refused` gauge).
    pub fn origins_refused(&self) -> u64 {
        self.refused.run_pending_tasks();
        self.refused.entry_count()
    }

    /// The CPU budget of `task`: the job timeout, or the shorter one of rasterising.
    fn cpu_budget(&self, task: &Task) -> Duration {
        match task {
            Task::Rasterize { .. } => self.config.svg_timeout.min(self.config.job_timeout),
            _ => self.config.job_timeout,
        }
    }

    /// Queues (by the origin of `host`), runs on a worker of `host` under the deadline, and
    /// classifies what happened; traced as a media job.
    async fn submit<S: ChunkSink>(
        &self,
        task: &Task,
        input: &Input,
        host: &str,
        sink: &mut S,
    ) -> Result<Reply, ProxyError> {
        let span = crate::telemetry::traces::media_job(task.name());
        let replied = self.queue_and_run(task, input, host, sink).instrument(span.clone()).await;
        crate::telemetry::traces::outcome(&span, &replied);
        replied
    }

    /// [`Self::submit`]'s work.
    async fn queue_and_run<S: ChunkSink>(
        &self,
        task: &Task,
        input: &Input,
        host: &str,
        sink: &mut S,
    ) -> Result<Reply, ProxyError> {
        if input.len() > self.config.max_input {
            return Err(ProxyError::TooLarge);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let origin = &crate::policy::origin_of(&host);
        let site = &crate::policy::site_of(&host);
        self.check_site(site)?;
        let lane = match task {
            Task::Strip { .. } => Lane::Strip,
            _ => Lane::Decode,
        };
        let _admitted = self.admit(origin, lane).await?;
        // Refused while it waited: it does not run either.
        self.check_site(site)?;
        let budget = self.cpu_budget(task);
        let job = Job {
            id: random_id(),
            cpu_seconds: budget.as_secs_f64().ceil().max(1.0) as u64,
            task: task.clone(),
        };
        // A second worker is tried when the first could not take the job (gone while idle,
        // or retired), or died on it after earlier jobs (its own history, say a heap grown by
        // them, may be what ran out): only a fresh worker's failure is the file's.
        let mut fresh = false;
        loop {
            let mut worker = self.worker_for(&host, fresh).await?;
            // Read here, not taken from the worker's word: a worker a file took over could
            // claim any number, and always be judged starved.
            let started = self.cpu_ticks(worker.pid) * 1000 / self.ticks;
            let reused = worker.jobs > 0;
            let max = self.config.max_input;
            let pid = worker.pid;
            let exchange = exchange(&mut worker, &job, input, sink, max);
            let failure = match self.while_progressing(pid, budget, exchange).await {
                Ok(Ok(Answer { reply: Reply::Retired, .. })) if !fresh => {
                    fresh = true;
                    continue;
                }
                Ok(Ok(Answer { reply, cpu_ms, .. })) => {
                    worker.jobs += 1;
                    worker.cpu_ms = cpu_ms;
                    let retire =
                        matches!(reply, Reply::Refused { retire: true, .. } | Reply::Retired)
                            || worker.jobs >= self.config.limits.jobs;
                    if !retire {
                        self.put_idle(worker);
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
                Err(()) => return Err(self.overran(task, worker, started, budget, site)),
            };
            return Err(self.failed(task, worker, failure, site).await);
        }
    }

    /// A worker for a job of `host`: an idle one of that host, or (`fresh`, or none idle) a
    /// fresh one, then tagged with the host.
    async fn worker_for(&self, host: &str, fresh: bool) -> Result<Worker, ProxyError> {
        let mut worker = match if fresh { None } else { self.take_idle(host) } {
            Some(worker) => worker,
            None => match self.spawn().await {
                Ok((worker, _)) => worker,
                Err(e) => {
                    self.count("error");
                    return Err(e);
                }
            },
        };
        if worker.host.is_none() {
            // The fresh worker standing by is this host's now: another takes its place, so
            // the next new host need not wait for a process to start.
            self.refill();
            worker.host = Some(host.into());
        }
        Ok(worker)
    }

    /// A slot of the fair queue (or 503 `media_busy`: at once when the queue or the origin's
    /// share of it is full, after `media.queue_wait` otherwise); the job counts as running
    /// while the result is held.
    async fn admit(&self, origin: &str, lane: Lane) -> Result<Admitted<'_>, ProxyError> {
        let slot = match self.schedule.admit(origin, lane).await {
            Ok(slot) => slot,
            Err(refused) => {
                self.count(match refused {
                    schedule::Refused::Full => "busy",
                    schedule::Refused::Waited => "waited",
                });
                return Err(ProxyError::MediaBusy);
            }
        };
        self.metrics.running.inc();
        Ok(Admitted { _slot: slot, _running: RunningJob(&self.metrics.running) })
    }

    /// Waits for `work`, a job of process `pid` whose CPU time the kernel limits to `budget`,
    /// for as long as the process makes progress ([`WALL_FACTOR`], [`MAX_WALL_FACTOR`]): the
    /// deadline that counts is CPU time, so a busy machine makes a job slower, never a
    /// failure. `Err` once it made none for a budget's worth of wall time, or ran out of it.
    pub(crate) async fn while_progressing<F: std::future::Future>(
        &self,
        pid: u32,
        budget: Duration,
        work: F,
    ) -> Result<F::Output, ()> {
        let work = std::pin::pin!(work);
        let mut work = work;
        let started = tokio::time::Instant::now();
        let (mut wait, mut seen) = (budget * WALL_FACTOR, self.cpu_ticks(pid));
        loop {
            if let Ok(done) = tokio::time::timeout(wait, &mut work).await {
                return Ok(done);
            }
            let now = self.cpu_ticks(pid);
            if now == seen || started.elapsed() + budget > budget * MAX_WALL_FACTOR {
                return Err(());
            }
            (wait, seen) = (budget, now);
        }
    }

    /// A job that stopped making progress before its CPU time was spent (or ran out of wall
    /// time, [`Self::while_progressing`]): its worker is killed. With its CPU budget not
    /// spent, it was starved of the CPU (stopped, or a machine too busy, perhaps on purpose),
    /// which says nothing about the file.
    fn overran(
        &self,
        task: &Task,
        mut worker: Worker,
        started_ms: u64,
        budget: Duration,
        site: &str,
    ) -> ProxyError {
        let used_ms = (self.cpu_ticks(worker.pid) * 1000 / self.ticks).saturating_sub(started_ms);
        let _ = worker.child.start_kill();
        if u128::from(used_ms) < budget.as_millis() {
            self.count("starved");
            tracing::warn!(
                task = task.name(),
                used_ms,
                "media job over its wall-clock deadline without using its CPU time: overloaded"
            );
            return ProxyError::MediaBusy;
        }
        self.count("too_costly");
        self.strike(site);
        tracing::warn!(task = task.name(), "media job over its CPU time: worker killed");
        ProxyError::MediaTooCostly("over its CPU time".into())
    }

    /// Maps a worker's reply to the caller's result, counting it.
    fn answer(&self, task: &Task, reply: Reply) -> Result<Reply, ProxyError> {
        match reply {
            Reply::Refused { reason, .. } => {
                self.count("refused");
                tracing::debug!(task = task.name(), reason, "media worker refused the file");
                Err(ProxyError::bad_image(&reason))
            }
            Reply::Done { .. } | Reply::Report(_) | Reply::Cut(_) => {
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
    async fn failed(
        &self,
        task: &Task,
        mut worker: Worker,
        failure: Failure,
        site: &str,
    ) -> ProxyError {
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
                self.strike(site);
                tracing::warn!(task = task.name(), why, "media worker failed mid-job");
                ProxyError::MediaTooCostly(why.into())
            }
        }
    }

    /// An idle worker of `host`, else a fresh one, that is alive and has written nothing
    /// since its last reply (a worker that has is killed: it broke the protocol). (One that
    /// spins while idle, which nothing legitimate does, is stopped by its lifetime CPU
    /// limit: four jobs' worth.)
    fn take_idle(&self, host: &str) -> Option<Worker> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mine = idle.iter().rposition(|w| w.host.as_deref() == Some(host));
            let at = mine.or_else(|| idle.iter().rposition(|w| w.host.is_none()))?;
            let mut worker = idle.remove(at).expect("in range");
            if worker.clean() {
                return Some(worker);
            }
            let _ = worker.child.start_kill();
        }
    }

    /// Keeps `worker` for its host's next job. At most one worker per slot is kept: the
    /// oldest that has a host goes first (a fresh one stands by for any host).
    fn put_idle(&self, worker: Worker) {
        keep_idle(&self.idle, worker, self.config.shares.workers.max(1) + 1);
    }

    /// Starts a fresh worker in the background to stand by, unless one is idle or starting.
    fn refill(&self) {
        use std::sync::atomic::Ordering;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.iter().any(|w| w.host.is_none()) || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        drop(idle);
        let (config, idle, refilling) =
            (self.config.clone(), self.idle.clone(), self.refilling.clone());
        tokio::spawn(async move {
            if let Ok((worker, _)) = spawn_worker(&config).await {
                keep_idle(&idle, worker, config.shares.workers.max(1) + 1);
            }
            refilling.store(false, Ordering::Release);
        });
    }

    /// CPU time (user and system, clock ticks) of process `pid`, 0 when unreadable. Read at
    /// a job's start, and while it runs past its first deadline.
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
        spawn_worker(&self.config).await
    }

    fn count(&self, outcome: &'static str) {
        self.metrics.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
