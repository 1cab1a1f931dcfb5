//! Inside a media worker: raise the sandbox, say so, then take jobs from stdin and answer each
//! on stdout until the server closes the pipe. This is the only code in parasol that calls a
//! decoder, and it runs only in a process started as `parasol media-worker`.
//!
//! A job that runs out of memory aborts the process, one that runs out of CPU is killed by the
//! kernel, one that runs too long is killed by the server: in every case the worker is gone
//! and the server starts another. A decoder that panics is answered as a refusal and the
//! worker retires, since its state is no longer trusted.

use std::io::{BufReader, BufWriter, Write};
use std::process::ExitCode;

use super::protocol::{self, Answer, Job, Reply, SelfReport, Task};
use super::sandbox::{self, Limits};
use crate::error::ProxyError;

/// Runs a worker until its input ends. `max_input`: largest job body accepted.
pub fn run(limits: Limits, max_input: u64) -> ExitCode {
    keep_freed_memory();
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let entered = match sandbox::enter(&limits) {
        Ok(entered) => entered,
        Err(why) => {
            let _ = protocol::write_frame(&mut out, &answer(0, Reply::Unsafe { why }), &[]);
            return ExitCode::from(3);
        }
    };
    let ready = Reply::Ready {
        version: env!("CARGO_PKG_VERSION").into(),
        landlock: entered.landlock.clone(),
    };
    if protocol::write_frame(&mut out, &answer(0, ready), &[]).is_err() {
        return ExitCode::FAILURE;
    }
    let mut input = BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    loop {
        let (job, body): (Job, Vec<u8>) = match protocol::read_frame(&mut input, max_input) {
            Ok(Some(job)) => job,
            Ok(None) => return ExitCode::SUCCESS,
            Err(_) => return ExitCode::FAILURE,
        };
        // The job's own budget (shorter for an SVG), never more than the worker's.
        if sandbox::arm_cpu(job.cpu_seconds.clamp(1, limits.cpu_seconds)).is_err() {
            // The lifetime budget is spent: say so and exit; the server sends the job to a
            // fresh worker.
            let _ = protocol::write_frame(&mut out, &answer(job.id, Reply::Retired), &[]);
            return ExitCode::SUCCESS;
        }
        let task = &job.task;
        let outcome = std::panic::catch_unwind(|| execute(task, body, &entered, &limits));
        let (reply, result) = outcome.unwrap_or_else(|_| {
            let reply = Reply::Refused { reason: "decoder panicked".into(), retire: true };
            (reply, Vec::new())
        });
        let retire = matches!(reply, Reply::Refused { retire: true, .. });
        if protocol::write_frame(&mut out, &answer(job.id, reply), &result).is_err() || retire {
            let _ = out.flush();
            return ExitCode::FAILURE;
        }
    }
}

/// The reply to job `job` with the CPU time used so far.
fn answer(job: u64, reply: Reply) -> Answer {
    Answer { job, reply, cpu_ms: sandbox::cpu_ms() }
}

/// Lets the allocator keep what a job freed for the next one. glibc's default gives the top of
/// the heap back to the kernel as soon as 128 KiB of it is free, so every job of a worker
/// (one thread, one heap) page-faults its buffers in again: on a 128 px emoji that was 40-60%
/// of the render (0.17 ms in process, 0.25 ms in a worker), and with this 0-5%
/// (`cargo bench --bench media_worker`, 2026-12-01). A worker then keeps at most about 32 MiB
/// it is not using, and buffers up to 16 MiB come from that heap instead of fresh mappings.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt takes two integers and only sets allocator parameters; it is called
    // before anything else in the process allocates from another thread (there is none).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TOP_PAD, 4 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
fn keep_freed_memory() {}

fn execute(
    task: &Task,
    body: Vec<u8>,
    entered: &sandbox::Entered,
    limits: &Limits,
) -> (Reply, Vec<u8>) {
    let refused = |e: ProxyError| {
        let reply = match e {
            ProxyError::NoRendition(why) => Reply::NoRendition { reason: why.to_string() },
            ProxyError::BadImage(why) => Reply::Refused { reason: why.to_string(), retire: false },
            other => Reply::Refused { reason: other.to_string(), retire: false },
        };
        (reply, Vec::new())
    };
    match task {
        // Akkoma's preview of an animation is the animation itself: the input stands.
        Task::Render { spec, max_pixels, .. }
            if spec.animation == crate::config::AnimationPolicy::Original
                && crate::media::animation::is_animated(&body, *max_pixels) =>
        {
            (Reply::Unchanged, Vec::new())
        }
        Task::Render { spec, max_pixels, animation } => {
            let animated = animation.as_ref().map(|limits| {
                crate::media::animation::render_animated(&body, spec, *max_pixels, limits)
            });
            let rendered = match animated {
                Some(Ok(Some(rendered))) => Ok(rendered),
                Some(Err(e)) => Err(e),
                Some(Ok(None)) | None => crate::media::variants::render(&body, spec, *max_pixels),
            };
            match rendered {
                Ok(r) => (Reply::Done { width: r.width, height: r.height }, r.bytes),
                Err(e) => refused(e),
            }
        }
        Task::Details { max_pixels, animation } => {
            match crate::media::details::measure(&body, *max_pixels, animation) {
                Ok(d) => {
                    let json = serde_json::to_vec(&d).unwrap_or_default();
                    (Reply::Done { width: d.width, height: d.height }, json)
                }
                Err(e) => refused(e),
            }
        }
        Task::Rasterize { max_pixels } => match crate::media::svg::rasterize(&body, *max_pixels) {
            Ok(png) => (Reply::Done { width: 0, height: 0 }, png),
            Err(e) => refused(e),
        },
        Task::Strip { content_type } => match crate::media::strip::plan(&body, content_type) {
            Ok(Some(cuts)) => (Reply::Cut(cuts), Vec::new()),
            Ok(None) => (Reply::Unchanged, Vec::new()),
            Err(why) => refused(ProxyError::bad_image(why)),
        },
        Task::SelfCheck { open, connect } => {
            (Reply::Report(Box::new(self_check(open, *connect, entered, limits))), Vec::new())
        }
    }
}

/// Tries, from inside the sandbox, each thing it must refuse.
fn self_check(
    open: &std::path::Path,
    connect: std::net::SocketAddr,
    entered: &sandbox::Entered,
    limits: &Limits,
) -> SelfReport {
    fn verdict<T, E: std::fmt::Display>(r: Result<T, E>, done: &str) -> String {
        match r {
            Ok(_) => done.to_string(),
            Err(e) => format!("refused: {e}"),
        }
    }
    use nix::sys::resource::{Resource, setrlimit};
    use std::os::fd::AsFd;
    let timeout = std::time::Duration::from_secs(2);
    let (_, hard_as) = sandbox::limit(Resource::RLIMIT_AS);
    let mut byte = [0u8; 1];
    let mut allocation: Vec<u8> = Vec::new();
    let allocate = verdict(allocation.try_reserve_exact(limits.memory as usize), "allocated");
    drop(allocation);
    SelfReport {
        open: verdict(std::fs::File::open(open), "opened"),
        connect: verdict(std::net::TcpStream::connect_timeout(&connect, timeout), "connected"),
        exec: verdict(std::process::Command::new("/bin/true").status(), "ran /bin/true"),
        thread: verdict(std::thread::Builder::new().spawn(|| ()), "started a thread"),
        allocate,
        signal_parent: verdict(nix::sys::signal::kill(nix::unistd::getppid(), None), "signalled"),
        raise_limit: verdict(
            setrlimit(Resource::RLIMIT_AS, hard_as.saturating_add(1 << 20), hard_as + (1 << 20)),
            "raised",
        ),
        read_stdout: verdict(nix::unistd::read(std::io::stdout().as_fd(), &mut byte), "read"),
        uid: entered.uid,
        descriptors: entered.descriptors.clone(),
        environment: std::env::vars_os().count(),
        landlock: entered.landlock.clone(),
        address_space: sandbox::limit(Resource::RLIMIT_AS),
        cpu_seconds: sandbox::limit(Resource::RLIMIT_CPU),
    }
}
