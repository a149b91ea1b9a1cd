//! kvmfork's own seccomp filters (the `seccompiler` crate of the Firecracker
//! project): default deny, one allow-list per thread kind. A filter applies
//! to the thread that installs it (and to threads it creates later), so each
//! thread of `kvmfork serve` installs its kind's filter as its first action,
//! before it touches a request or a guest.
//!
//! The lists were found by running every server suite and the real-template
//! suites with `--seccomp=log` (SECCOMP_RET_LOG: allowed, reported as
//! `audit: type=1326 ... syscall=N` in the kernel log) and reading which
//! calls were reported. Syscalls that io_uring's kernel workers make on the
//! event loop's behalf are not filtered (they are not the thread's own
//! syscalls); `io_uring_setup`, `io_uring_enter` and `io_uring_register` are.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the filters do with a syscall that is not on the thread's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// No filter is installed.
    Off,
    /// The call is allowed and reported in the kernel log (audit type 1326).
    Log,
    /// The process is killed (SIGSYS, SECCOMP_RET_KILL_PROCESS).
    #[default]
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Log => "log",
            Mode::Enforce => "enforce",
        }
    }
}

/// The kinds of threads with a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A shard's event loop: sockets, io_uring or epoll; no KVM.
    EventLoop,
    /// An exec worker: owns a lane's VMs and runs their vCPU (KVM ioctls).
    Worker,
    /// Helpers that only wait (the signal watcher).
    Helper,
}

impl ThreadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Worker => "exec worker",
            ThreadKind::Helper => "helper",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {message}")]
    Build { kind: &'static str, message: String },
    #[error("installing the {kind} seccomp filter: {message}")]
    Install { kind: &'static str, message: String },
}

/// The ioctl type of KVM's requests (`KVMIO` in linux/kvm.h): bits 8..15 of
/// the request number.
const KVMIO: u64 = 0xAE;
/// `ioctl(fd, FIONBIO)` and `FIOCLEX`: set a descriptor non-blocking or
/// close-on-exec (the standard library uses them on sockets and files).
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

/// Calls every thread of the process makes: memory, futexes, time, signals
/// delivered by the runtime, thread exit, reading and writing descriptors it
/// already holds.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

/// A shard's event loop: accepting and serving connections.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // /proc/self for the metrics page (RSS, descriptors).
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
];

/// An exec worker: creates its lane's VMs (guest memory as memfds mapped
/// over the template, KVM VMs and vCPUs), runs the vCPU, kicks it with a
/// signal on timeout.
const WORKER: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_getrusage,
    libc::SYS_prctl,
    libc::SYS_userfaultfd,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_readlinkat,
];

/// The signal watcher: waits on signal-hook's socket pair (and its signal
/// handler writes to it when a signal lands on this thread).
const HELPER: &[i64] = &[libc::SYS_recvfrom, libc::SYS_sendto];

fn rule(kind: ThreadKind, conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(|e| build_error(kind, e))
}

fn build_error(kind: ThreadKind, e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build {
        kind: kind.as_str(),
        message: e.to_string(),
    }
}

/// `ioctl(fd, request)` limited to `request` (its low 32 bits; the kernel
/// reads the request as an unsigned int).
fn ioctl_eq(kind: ThreadKind, request: u64) -> Result<SeccompRule, SeccompError> {
    let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
        .map_err(|e| build_error(kind, e))?;
    rule(kind, vec![c])
}

/// The filter of one thread kind, `mismatch` being what happens to a call
/// not on its list.
pub fn filter(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra: &[i64] = match kind {
        ThreadKind::EventLoop => EVENT_LOOP,
        ThreadKind::Worker => WORKER,
        ThreadKind::Helper => HELPER,
    };
    for &nr in COMMON.iter().chain(extra) {
        rules.insert(nr, vec![]);
    }
    let mut ioctls = vec![ioctl_eq(kind, FIONBIO)?, ioctl_eq(kind, FIOCLEX)?];
    if kind == ThreadKind::Worker {
        // Only KVM's requests: type KVMIO in bits 8..15 of the request.
        let c = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            KVMIO << 8,
        )
        .map_err(|e| build_error(kind, e))?;
        ioctls.push(rule(kind, vec![c])?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build_error(kind, e))?;
    filter.try_into().map_err(|e| build_error(kind, e))
}

/// Installs `kind`'s filter on the calling thread in `mode`.
pub fn install(kind: ThreadKind, mode: Mode) -> Result<(), SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(()),
        Mode::Log => SeccompAction::Log,
        Mode::Enforce => SeccompAction::KillProcess,
    };
    if kind != ThreadKind::Helper {
        block_shutdown_signals();
    }
    let program = filter(kind, mismatch)?;
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
        kind: kind.as_str(),
        message: e.to_string(),
    })
}

/// SIGTERM and SIGINT are caught by signal-hook, whose handler writes to a
/// socket (`sendto`) on whichever thread the kernel picks. Event loops and
/// workers block them, so the handler runs on the unfiltered main thread or
/// on the signal watcher, whose filter allows that write.
fn block_shutdown_signals() {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initializes the set; sigaddset and pthread_sigmask
    // read it; the old mask is not asked for (null).
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_in_every_mode() {
        for kind in [
            ThreadKind::EventLoop,
            ThreadKind::Worker,
            ThreadKind::Helper,
        ] {
            for action in [SeccompAction::Log, SeccompAction::KillProcess] {
                let program = filter(kind, action).unwrap();
                assert!(program.len() > COMMON.len(), "{kind:?}");
            }
        }
    }
}
