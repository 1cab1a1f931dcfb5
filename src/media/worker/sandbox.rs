//! The walls a media worker raises around itself before it reads its first job. A worker needs
//! its pipes, memory and the CPU; it gets nothing else:
//!
//! 1. it is the first process the kernel kills when memory runs out (`oom_score_adj` 1000),
//!    and the last to get the CPU (nice 10);
//! 2. kernel limits: address space (`media.worker_memory`), CPU time per job (re-armed before
//!    each job; past it the kernel sends `SIGXCPU`) and in all (a few jobs' worth, then the
//!    worker retires), no core dumps, no file writes;
//! 3. every descriptor but stdin, stdout and stderr is closed, and no new one can be opened
//!    (`RLIMIT_NOFILE` 3);
//! 4. Landlock, where the kernel has it: no file system access, no TCP, no signals or abstract
//!    sockets outside the worker;
//! 5. started as root, it becomes `nobody` (uid and gid 65534, no groups, no capabilities),
//!    so no limit above can be lifted; then it dies with the server (`PR_SET_PDEATHSIG`, set
//!    after the change of user, which would clear it);
//! 6. a seccomp filter that allows only the calls a decoder needs (read on stdin, write on
//!    stdout and stderr, memory, futexes, clocks, its own CPU limit, exit) and makes every
//!    other fail with `EPERM`: no `open`, `socket`, `connect`, `execve`, `fork`, `clone`,
//!    `ptrace`, `kill` of another process, and no new executable memory.
//!
//! The server starts the worker with an empty environment, `/` as its directory, stderr on a
//! pipe of its own (read by the server, a bounded number of lines) and its own process
//! group, so none of the server's state leaks in either.

use std::collections::BTreeMap;

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The limits the server asks a worker to live under (passed on its command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Address-space limit, bytes.
    pub memory: u64,
    /// CPU seconds one job may use.
    pub cpu_seconds: u64,
    /// Jobs before the server retires the worker: bounds the CPU the worker may use in all.
    pub jobs: u32,
}

/// The worker's nice value: on a busy machine the server gets about nine times the CPU a
/// worker does.
pub const NICE: i32 = 10;

/// Landlock's status where the kernel has none.
pub const LANDLOCK_MISSING: &str = "not available in this kernel";

/// What [`enter`] managed.
#[derive(Debug, Clone)]
pub struct Entered {
    /// Landlock's verdict: `fully enforced`, `partially enforced` or why it is not.
    pub landlock: String,
    /// Descriptors still open once the sandbox is in place (0, 1, 2).
    pub descriptors: Vec<i32>,
    /// The user it runs as from then on.
    pub uid: u32,
}

/// Raises every wall, in the order that keeps each possible: limits first, inherited
/// descriptors closed while `/proc` can still list them, Landlock while a descriptor may
/// still be made, the change of user, then seccomp (which forbids most of the above).
pub fn enter(limits: &Limits) -> Result<Entered, String> {
    // The kernel's choice when memory runs out: a worker, never the server. Raising one's
    // own score needs no privilege. And the CPU's last choice: serving cached files comes
    // before decoding new ones, so a burst of renders (or a bomb) slows renders, not hits.
    // Both are priorities, not walls: where /proc is read-only or priorities are fixed, the
    // worker runs without them.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let _ = rustix::process::setpriority_process(None, NICE);
    let set = |resource, soft, hard| {
        setrlimit(resource, soft, hard).map_err(|e| format!("setrlimit {resource:?}: {e}"))
    };
    set(Resource::RLIMIT_AS, limits.memory, limits.memory)?;
    set(Resource::RLIMIT_CORE, 0, 0)?;
    set(Resource::RLIMIT_FSIZE, 0, 0)?;
    set(Resource::RLIMIT_CPU, limits.cpu_seconds, lifetime_cpu(limits))?;
    // Landlock's ruleset is a descriptor of its own (closed once applied), and once applied
    // /proc/self/fd can no longer be listed: close and list first.
    let descriptors = close_inherited()?;
    let landlock = landlock()?;
    drop_root()?;
    let uid = nix::unistd::geteuid().as_raw();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("PR_SET_PDEATHSIG: {e}"))?;
    set(Resource::RLIMIT_NOFILE, 3, 3)?;
    let filter = filter()?;
    seccompiler::apply_filter(&filter).map_err(|e| format!("seccomp: {e}"))?;
    Ok(Entered { landlock, descriptors, uid })
}

/// CPU seconds a worker may use in its life: four jobs at their limit. A worker that has
/// used that much retires (its next job goes to a fresh one), so even a worker whose decoder
/// was taken over cannot burn the CPU for long.
fn lifetime_cpu(limits: &Limits) -> u64 {
    limits.cpu_seconds.saturating_mul(4)
}

/// Started as root: become `nobody`, with no groups. Otherwise nothing to drop.
pub(super) fn drop_root() -> Result<(), String> {
    use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (uid, gid) = (Uid::from_raw(65534), Gid::from_raw(65534));
    setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    setresgid(gid, gid, gid).map_err(|e| format!("setresgid: {e}"))?;
    setresuid(uid, uid, uid).map_err(|e| format!("setresuid: {e}"))?;
    Ok(())
}

/// Before each job: this job may use `seconds` of CPU from now, whatever earlier ones used.
pub fn arm_cpu(seconds: u64) -> Result<(), String> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).map_err(|e| format!("getrusage: {e}"))?;
    let used = (usage.user_time().tv_sec() + usage.system_time().tv_sec() + 1) as u64;
    let (_, hard) = getrlimit(Resource::RLIMIT_CPU).map_err(|e| format!("getrlimit: {e}"))?;
    let soft = used.saturating_add(seconds);
    if soft > hard {
        return Err("the worker's lifetime CPU budget is spent".into());
    }
    setrlimit(Resource::RLIMIT_CPU, soft, hard).map_err(|e| format!("setrlimit CPU: {e}"))
}

/// CPU time (user and system) this process has used, in milliseconds.
pub fn cpu_ms() -> u64 {
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else { return 0 };
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1000 + t.tv_usec() as u64 / 1000;
    ms(usage.user_time()) + ms(usage.system_time())
}

/// Soft and hard limits of `resource`, for the self-check.
pub fn limit(resource: Resource) -> (u64, u64) {
    getrlimit(resource).unwrap_or((0, 0))
}

/// A Landlock ruleset that handles every file system and network access and every scope
/// the crate knows, allowing nothing until rules are added. Best effort (the crate's
/// default): a kernel without Landlock, or an older ABI, enforces what it can.
pub(super) fn closed_ruleset() -> Result<landlock::RulesetCreated, String> {
    use landlock::{ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, Scope};
    let abi = ABI::V6;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)
}

fn landlock() -> Result<String, String> {
    use landlock::RulesetStatus;
    // Nothing allowed; seccomp below holds where Landlock does not.
    let status = closed_ruleset()?.restrict_self().map_err(|e| format!("landlock: {e}"))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced".into(),
        RulesetStatus::PartiallyEnforced => "partially enforced".into(),
        RulesetStatus::NotEnforced => LANDLOCK_MISSING.into(),
    })
}

/// Closes every descriptor above 2. The server opens everything close-on-exec, so normally
/// there is none; this makes it so whatever a library or a future change leaks.
pub(super) fn close_inherited() -> Result<Vec<i32>, String> {
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // The directory listing's own descriptor is in the list and already closed: EBADF.
    for fd in listed.iter().copied().filter(|fd| *fd > 2) {
        let _ = nix::unistd::close(fd);
    }
    let left: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // Again, the listing's own descriptor (the highest) was open only while listing.
    let mut left: Vec<i32> = left.into_iter().filter(|fd| *fd <= 2).collect();
    left.sort_unstable();
    Ok(left)
}

/// A seccomp condition on a call's argument `arg` (64-bit).
pub(super) fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| format!("seccomp: {e}"))
}

/// A seccomp rule: all of `conditions` hold.
pub(super) fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| format!("seccomp: {e}"))
}

/// The seccomp allowlist. Everything not named fails with `EPERM` rather than killing the
/// worker, so a decoder that tries something unexpected reports an error the server can see.
fn filter() -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: {e}"))?;
    let own_pid = std::process::id() as u64;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_close,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_getrusage,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    // Jobs come in on stdin; replies go out on stdout, panics on stderr. Nothing else.
    let fd = |n: u64| cond(0, SeccompCmpOp::Eq, n);
    rules.insert(libc::SYS_read, vec![rule(vec![fd(0)?])?]);
    rules.insert(libc::SYS_write, vec![rule(vec![fd(1)?])?, rule(vec![fd(2)?])?]);
    rules.insert(libc::SYS_writev, vec![rule(vec![fd(1)?])?, rule(vec![fd(2)?])?]);
    // Memory, but never executable: a decoder exploit cannot map new code.
    let no_exec = || cond(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(libc::SYS_mmap, vec![rule(vec![no_exec()?])?]);
    rules.insert(libc::SYS_mprotect, vec![rule(vec![no_exec()?])?]);
    // Its own limits only (pid 0): any may be read (no new limit given), only the CPU limit
    // set, as it is before each job, and never above the hard limit (no privilege left).
    let cpu = libc::RLIMIT_CPU as u64;
    rules.insert(
        libc::SYS_prlimit64,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, 0)?, cond(2, SeccompCmpOp::Eq, 0)?])?,
            rule(vec![cond(0, SeccompCmpOp::Eq, 0)?, cond(1, SeccompCmpOp::Eq, cpu)?])?,
        ],
    );
    // abort() signals itself; no other process may be signalled.
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, SeccompCmpOp::Eq, own_pid)?])?]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| format!("seccomp: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp: {e}"))
}
