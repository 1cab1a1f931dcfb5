//! Outside programs (ffmpeg: video posters; heif-convert: HEIC, AVIF) run the way a media
//! worker does: the `parasol` binary is started as `parasol media-worker --tool PROGRAM`,
//! raises the same walls a worker raises (kernel limits, no inherited descriptor, Landlock,
//! `nobody`, death with the server, seccomp) and then becomes the program, which inherits all
//! of them:
//!
//! - its only input is the cached file, handed over as stdin and opened by the program as
//!   `/dev/stdin` (a real file, so it can seek: an MP4 whose index sits at its end needs
//!   that); Landlock lets it read that one file and the system's library directories, and
//!   write nothing but the one empty output file the server made for it (heif-convert), or
//!   nothing at all (`RLIMIT_FSIZE` 0). Run by root, the program runs as `nobody`, which may
//!   not read the cache's files: it then gets a copy of the file, its own to read, in its
//!   scratch directory; the cache's files are never opened to others;
//! - its result is stdout (ffmpeg) or that file (opened without following links, checked to
//!   be a regular file within the limit, and read a bounded amount into the in-flight
//!   budget), taken by the server as a job's result and sniffed like one;
//! - seccomp refuses sockets, new processes (threads stay allowed), ptrace, signals,
//!   scheduling and pidfds aimed at other processes, leaving the server's death behind, mounts,
//!   namespaces, BPF and keyrings, and every call of another ABI (x32);
//! - `media.worker_memory` of address space, `media.job_timeout` of CPU time, and the
//!   server's wall-clock deadline (three times that), past which it is killed.
//!
//! Where the kernel has no Landlock the programs are not run at all (nothing else would keep
//! a hostile video from having them read other files into the picture they return): the
//! pool turns them off at start, says so once, and those renditions answer 415.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use nix::sys::resource::{Resource, setrlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpOp, SeccompFilter, SeccompRule, TargetArch,
};
use tokio::io::AsyncReadExt;

use super::process::{death, relay_stderr};
use super::{Lane, Limits, MediaPool};
use crate::cache::ChunkSink;
use crate::error::ProxyError;

/// Exit status of a tool process whose sandbox could not be raised (no program was run).
pub const UNSAFE_EXIT: u8 = 97;

/// Finds `name` (a path, or a program name looked up on `PATH`) as an executable file.
pub fn locate(name: &str) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then(|| p.canonicalize().unwrap_or(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| executable(p))
}

/// The child's side: raise the walls, then become `program`. Returns only on failure.
/// `scratch`: a directory the program may write its result into (heif-convert writes files).
pub fn exec(
    limits: &Limits,
    program: &Path,
    scratch: Option<&Path>,
    args: &[OsString],
) -> ExitCode {
    if let Err(why) = enter(limits, program, scratch) {
        eprintln!("parasol media tool: sandbox: {why}");
        return ExitCode::from(UNSAFE_EXIT);
    }
    use std::os::unix::process::CommandExt;
    let e = std::process::Command::new(program).args(args).env_clear().exec();
    eprintln!("parasol media tool: cannot run {}: {e}", program.display());
    ExitCode::from(UNSAFE_EXIT)
}

fn enter(limits: &Limits, program: &Path, scratch: Option<&Path>) -> Result<(), String> {
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let _ = rustix::process::setpriority_process(None, super::sandbox::NICE);
    let set = |resource, soft, hard| {
        setrlimit(resource, soft, hard).map_err(|e| format!("setrlimit {resource:?}: {e}"))
    };
    set(Resource::RLIMIT_AS, limits.memory, limits.memory)?;
    set(Resource::RLIMIT_CORE, 0, 0)?;
    // Files are written only into the scratch directory, and no larger than memory allows.
    let fsize = if scratch.is_some() { limits.memory } else { 0 };
    set(Resource::RLIMIT_FSIZE, fsize, fsize)?;
    set(Resource::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)?;
    super::sandbox::close_inherited()?;
    landlock(program, scratch)?;
    super::sandbox::drop_root()?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    // The loader opens the program's libraries one at a time.
    set(Resource::RLIMIT_NOFILE, 64, 64)?;
    seccompiler::apply_filter(&no_other_abi()).map_err(|e| format!("seccomp: {e}"))?;
    seccompiler::apply_filter(&filter()?).map_err(|e| format!("seccomp: {e}"))
}

/// A filter of its own, before the deny-list: on x86-64 a call numbered for the x32 ABI
/// (bit 30 set) would match none of the deny-list's numbers and be allowed, so every such
/// call is refused. (The workers' allowlist refuses them by default.) Written as BPF by
/// hand: seccompiler compares call numbers for equality only.
fn no_other_abi() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const X32_BIT: u32 = 0x4000_0000;
    let errno = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let allow = libc::SECCOMP_RET_ALLOW;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    match std::env::consts::ARCH {
        // seccomp_data.nr is at offset 0.
        "x86_64" => vec![
            op(LD_W_ABS, 0, 0, 0),
            op(JGE_K, 0, 1, X32_BIT),
            op(RET_K, 0, 0, errno),
            op(RET_K, 0, 0, allow),
        ],
        _ => vec![op(RET_K, 0, 0, allow)],
    }
}

/// Read access to the libraries, execution of the program and its loader, reading of stdin
/// (the one input file), and nothing else: no writes, no TCP, no signals or abstract sockets
/// outside. Refused (an error) where the kernel cannot enforce it.
fn landlock(program: &Path, scratch: Option<&Path>) -> Result<(), String> {
    use landlock::{AccessFs, BitFlags, PathBeneath, PathFd, RulesetCreatedAttr, RulesetStatus};
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let read: BitFlags<AccessFs> = AccessFs::ReadFile | AccessFs::ReadDir;
    let mut ruleset = super::sandbox::closed_ruleset()?;
    // The libraries, not all of /usr (/usr/local may hold an operator's files).
    for dir in ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache"] {
        if let Ok(fd) = PathFd::new(dir) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, read)).map_err(err)?;
        }
    }
    // The program and the ELF interpreter the kernel loads for it.
    let exec = AccessFs::Execute | AccessFs::ReadFile;
    for file in
        [program, Path::new("/lib64/ld-linux-x86-64.so.2"), Path::new("/lib/ld-linux-aarch64.so.1")]
    {
        if let Ok(fd) = PathFd::new(file) {
            ruleset = ruleset.add_rule(PathBeneath::new(fd, exec)).map_err(err)?;
        }
    }
    // The one output file the server made for it: written over, never a new file.
    if let Some(dir) = scratch {
        let write = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
        let fd = PathFd::new(dir.join(OUTPUT_NAME)).map_err(|e| format!("landlock: {e}"))?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, write)).map_err(err)?;
    }
    let input = std::io::stdin().as_fd().try_clone_to_owned().map_err(|e| format!("stdin: {e}"))?;
    ruleset = ruleset.add_rule(PathBeneath::new(input, AccessFs::ReadFile)).map_err(err)?;
    match ruleset.restrict_self().map_err(err)?.ruleset {
        RulesetStatus::NotEnforced => Err("Landlock is not available in this kernel".into()),
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
    }
}

/// The calls a media program is refused outright (see [`filter`]).
const REFUSED: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_clone3,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_setrlimit,
    libc::SYS_personality,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pidfd_getfd,
    libc::SYS_setsid,
    libc::SYS_setpgid,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_ioprio_set,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    libc::SYS_kcmp,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
];

/// The calls a media program never needs, refused (`ENOSYS`, which the C library treats as
/// "not there"): sockets, new processes (threads stay allowed), tracing, other processes'
/// memory, signals and scheduling, leaving the server's death behind (`PR_SET_PDEATHSIG`,
/// a new session), mounts and namespaces, BPF, keyrings, module and kernel loading. And
/// before it, [`no_other_abi`]: a call by another ABI's numbers matches none of these.
fn filter() -> Result<BpfProgram, String> {
    use super::sandbox::{cond, rule};
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().copied().map(|nr| (nr, Vec::new())).collect();
    // A clone without CLONE_THREAD is a new process; threads are allowed.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(thread), 0)?])?]);
    // Limits may be read, never raised or set (pid 0 and no new limit: a read).
    rules.insert(libc::SYS_prlimit64, vec![rule(vec![cond(2, SeccompCmpOp::Ne, 0)?])?]);
    // Signals only to itself (abort): tgkill of another thread group is refused.
    let own = std::process::id() as u64;
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, SeccompCmpOp::Ne, own)?])?]);
    rules.insert(libc::SYS_rt_tgsigqueueinfo, vec![rule(vec![cond(0, SeccompCmpOp::Ne, own)?])?]);
    // Its own affinity and priority only (pid or who 0, or its own pid).
    let others = || -> Result<Vec<SeccompRule>, String> {
        Ok(vec![rule(vec![cond(0, SeccompCmpOp::Ne, 0)?, cond(0, SeccompCmpOp::Ne, own)?])?])
    };
    rules.insert(libc::SYS_sched_setaffinity, others()?);
    let who = |arg| -> Result<Vec<SeccompRule>, String> {
        Ok(vec![rule(vec![cond(arg, SeccompCmpOp::Ne, 0)?, cond(arg, SeccompCmpOp::Ne, own)?])?])
    };
    rules.insert(libc::SYS_setpriority, who(1)?);
    // The death signal stays: the program dies with the server.
    let pdeathsig = libc::PR_SET_PDEATHSIG as u64;
    rules.insert(libc::SYS_prctl, vec![rule(vec![cond(0, SeccompCmpOp::Eq, pdeathsig)?])?]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp: {e}"))
}

/// Where a program that writes files (heif-convert) puts its result, in a job's scratch
/// directory: the argument naming it.
pub const OUTPUT: &str = "{output}";

/// The output file's name in the scratch directory: made by the server, empty, before the
/// program starts; the only file the program may write (and no larger than the limit).
const OUTPUT_NAME: &str = "out.png";

/// The input's copy in the scratch directory, when the program runs as another user than
/// the server.
const INPUT_NAME: &str = "in";

/// heif-convert's arguments: the primary image of its HEIF/HEIC/AVIF input as a PNG (alpha
/// kept), written to the job's scratch directory.
pub fn heif_args() -> Vec<String> {
    vec!["/dev/stdin".into(), OUTPUT.into()]
}

/// ffmpeg's arguments for the first picture of its input (a video's first frame, an AVIF's
/// image) as a PNG on stdout: one thread, nothing read but the input, no other stream.
pub fn frame_args() -> Vec<String> {
    let args = "-hide_banner -nostdin -loglevel error -threads 1 -filter_threads 1 \
        -protocol_whitelist file -i /dev/stdin -map 0:v:0 -frames:v 1 -f image2pipe -c:v png -";
    args.split_whitespace().map(str::to_string).collect()
}

/// One run of an outside program: which, with what arguments.
#[derive(Debug, Clone)]
pub struct ToolJob {
    /// The program.
    pub program: PathBuf,
    /// Its arguments ([`OUTPUT`] stands for the result file).
    pub args: Vec<String>,
    /// A short name for logs, metrics and remembered verdicts (`frame`, `heif`).
    pub name: &'static str,
}

/// A job's scratch directory, removed with everything in it when dropped. Under the system's
/// temp directory (the cache directory is 0700, closed to `nobody`), 0700 and owned by the
/// user the program runs as.
struct Scratch(PathBuf);

impl Scratch {
    /// A job's scratch directory, when it needs one, and the file it reads: the program
    /// reopens its stdin (`/dev/stdin`). Run as parasol's own user, it may read the blob at
    /// `path` itself; as `nobody` (parasol runs as root), it reads a copy of its own in its
    /// scratch directory, so no cached file is ever opened to other users. `writes`: the
    /// program writes its result into a file.
    async fn for_job(writes: bool, path: &Path) -> Result<(Option<Scratch>, PathBuf), ProxyError> {
        let as_nobody = nix::unistd::geteuid().is_root();
        if !writes && !as_nobody {
            return Ok((None, path.to_path_buf()));
        }
        let blob = path.to_path_buf();
        let made = tokio::task::spawn_blocking(move || {
            Scratch::new(writes, as_nobody.then_some(blob.as_path()))
        });
        let scratch = made.await.map_err(ProxyError::internal)?.map_err(ProxyError::storage)?;
        let input = match as_nobody {
            true => scratch.0.join(INPUT_NAME),
            false => path.to_path_buf(),
        };
        Ok((Some(scratch), input))
    }

    /// A scratch directory with an empty output file (`output`) and, given `input`, a copy
    /// of that file for the program to read.
    fn new(output: bool, input: Option<&Path>) -> std::io::Result<Scratch> {
        let mut name = [0u8; 12];
        getrandom::fill(&mut name).map_err(std::io::Error::other)?;
        let dir = std::env::temp_dir().join(format!("parasol-tool-{}", hex::encode(name)));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let scratch = Scratch(dir);
        let mut made = vec![scratch.0.clone()];
        if output {
            let out = scratch.0.join(OUTPUT_NAME);
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&out)?;
            made.push(out);
        }
        if let Some(input) = input {
            let copy = scratch.0.join(INPUT_NAME);
            let mut to =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(&copy)?;
            std::io::copy(&mut std::fs::File::open(input)?, &mut to)?;
            made.push(copy);
        }
        if nix::unistd::geteuid().is_root() {
            let (uid, gid) = (nix::unistd::Uid::from_raw(65534), nix::unistd::Gid::from_raw(65534));
            for path in &made {
                nix::unistd::chown(path, Some(uid), Some(gid)).map_err(std::io::Error::other)?;
            }
        }
        Ok(scratch)
    }
}

/// What a program's exit (`status`, having written `total` bytes) says of the job.
fn judge(job: &ToolJob, status: std::process::ExitStatus, total: u64) -> Result<(), ProxyError> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) if total > 0 => Ok(()),
        (Some(code), _) if code == i32::from(UNSAFE_EXIT) => {
            Err(ProxyError::internal("the media tool's sandbox could not be raised"))
        }
        // The program said no (it could not read the file): the file's fault, not a costly
        // one.
        (Some(_), _) => Err(ProxyError::bad_image("the file has no picture to take")),
        (None, signal) => {
            let why = death(status);
            tracing::warn!(tool = job.name, ?signal, why, "media tool failed");
            Err(ProxyError::MediaTooCostly(why.into()))
        }
    }
}

/// Reads the program's result file into `sink`: opened without following a link the program
/// may have put there, and only a regular file of at most `max` bytes, a chunk at a time.
async fn read_output<S: ChunkSink>(path: &Path, max: u64, sink: &mut S) -> Result<u64, ProxyError> {
    let path = path.to_path_buf();
    let file = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
    })
    .await
    .map_err(ProxyError::internal)?
    .map_err(|_| ProxyError::bad_image("the program left no readable result"))?;
    let meta = file.metadata().map_err(ProxyError::storage)?;
    if !meta.is_file() {
        return Err(ProxyError::bad_image("the program's result is not a file"));
    }
    if meta.len() > max {
        return Err(ProxyError::MediaTooCostly("output over the limit".into()));
    }
    let mut file = tokio::fs::File::from_std(file).take(meta.len());
    sink.begin(meta.len()).await.map_err(ProxyError::storage)?;
    let (mut buf, mut total) = (vec![0u8; 1 << 16], 0u64);
    loop {
        let n = file.read(&mut buf).await.map_err(ProxyError::storage)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        sink.push(&buf[..n]).await.map_err(ProxyError::storage)?;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl MediaPool {
    /// Runs `job` on the file at `path` (hashing to `content`, of a source on `host`), its
    /// result into `sink`. Shares the workers' fair queue and slots, deadline and remembered
    /// verdicts. (Each run is a process of its own.)
    pub async fn run_tool<S: ChunkSink>(
        &self,
        job: &ToolJob,
        path: &Path,
        content: &blake3::Hash,
        host: &str,
        sink: &mut S,
    ) -> Result<(), ProxyError> {
        let origin = &crate::policy::origin_of(host);
        let site = &crate::policy::site_of(host);
        let mut key = blake3::Hasher::new();
        key.update(content.as_bytes()).update(job.name.as_bytes());
        let verdict = *key.finalize().as_bytes();
        if let Some(why) = self.verdicts.get(&verdict).await {
            self.count("remembered");
            return Err(ProxyError::MediaTooCostly(why));
        }
        self.check_site(site)?;
        let _admitted = self.admit(origin, Lane::Decode).await?;
        let result = self.tool_exchange(job, path, sink).await;
        match &result {
            Ok(()) => self.count("ok"),
            Err(ProxyError::MediaTooCostly(why)) => {
                self.count("too_costly");
                self.strike(site);
                self.verdicts.insert(verdict, why.clone()).await;
            }
            Err(ProxyError::BadImage(_)) => self.count("refused"),
            // Counted as `starved` where it happened.
            Err(ProxyError::MediaBusy) => {}
            Err(_) => self.count("error"),
        }
        result
    }

    /// The command that runs `job` sandboxed on `input` (its stdin): `parasol media-worker
    /// --tool`, which raises the walls and then becomes the program; with `scratch`, the
    /// directory it may write `output` into.
    fn tool_command(
        &self,
        job: &ToolJob,
        input: std::fs::File,
        scratch: Option<&Path>,
        output: Option<&Path>,
    ) -> tokio::process::Command {
        let limits = &self.config.limits;
        let args = job.args.iter().map(|a| match (output, a.as_str()) {
            (Some(out), OUTPUT) => out.as_os_str().to_owned(),
            _ => OsString::from(a),
        });
        let mut cmd = tokio::process::Command::new(&self.config.exe);
        cmd.arg("media-worker")
            .args(["--memory", &limits.memory.to_string()])
            .args(["--cpu-seconds", &limits.cpu_seconds.to_string()]);
        if let Some(scratch) = scratch {
            cmd.arg("--scratch").arg(scratch);
        }
        cmd.arg("--tool")
            .arg(&job.program)
            .arg("--")
            .args(args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(input))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        cmd
    }

    async fn tool_exchange<S: ChunkSink>(
        &self,
        job: &ToolJob,
        path: &Path,
        sink: &mut S,
    ) -> Result<(), ProxyError> {
        let writes = job.args.iter().any(|a| a == OUTPUT);
        let (scratch, input) = Scratch::for_job(writes, path).await?;
        let file = std::fs::File::open(&input).map_err(crate::error::ProxyError::storage)?;
        let output = writes.then(|| scratch.as_ref().map(|s| s.0.join(OUTPUT_NAME))).flatten();
        // The directory it may write its result into (not where its input copy is).
        let writable = scratch.as_ref().filter(|_| writes).map(|s| s.0.as_path());
        let mut cmd = self.tool_command(job, file, writable, output.as_deref());
        let mut child = cmd.spawn().map_err(|e| {
            ProxyError::internal(format!("cannot start {}: {e}", self.config.exe.display()))
        })?;
        let pid = child.id().unwrap_or(0);
        let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ProxyError::internal("media tool without pipes"));
        };
        tokio::spawn(relay_stderr(pid, stderr));
        let max = self.config.max_input;
        let work = async {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            // The length is not known: up to 1 MiB in memory, then a temp file. (A program
            // that writes a file: begun when that file is read.)
            if output.is_none() {
                sink.begin(1 << 20).await.map_err(crate::error::ProxyError::storage)?;
            }
            loop {
                let n = stdout.read(&mut buf).await.map_err(ProxyError::internal)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > max {
                    return Err(ProxyError::MediaTooCostly("output over the limit".into()));
                }
                // A program that writes its result to a file only chats on stdout.
                if output.is_none() {
                    sink.push(&buf[..n]).await.map_err(crate::error::ProxyError::storage)?;
                }
            }
            let status = child.wait().await.map_err(ProxyError::internal)?;
            Ok((status, total))
        };
        let (status, mut total) =
            match self.while_progressing(pid, self.config.job_timeout, work).await {
                Ok(result) => result?,
                Err(()) => {
                    // As for a worker: the kernel stops a program at its CPU time; one that
                    // stopped making progress before it was spent was starved of the CPU.
                    let used_ms = self.cpu_ticks(pid) * 1000 / self.ticks;
                    let _ = child.start_kill();
                    if u128::from(used_ms) < self.config.job_timeout.as_millis() {
                        self.count("starved");
                        tracing::warn!(tool = job.name, used_ms, "media tool starved of the CPU");
                        return Err(ProxyError::MediaBusy);
                    }
                    tracing::warn!(tool = job.name, "media tool over its CPU time: killed");
                    return Err(ProxyError::MediaTooCostly("over its CPU time".into()));
                }
            };
        // A program that wrote its result to a file: that file is the result.
        if let (Some(out), Some(0)) = (&output, status.code()) {
            total = read_output(out, max, sink).await?;
        }
        drop(scratch);
        judge(job, status, total)
    }
}
