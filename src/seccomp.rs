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
    /// `serve`'s template thread: waits for the builder process (which
    /// runs the build scripts unfiltered, see `kvmfork template provide`),
    /// then loads each template and runs its start-up probe guest.
    TemplateLoader,
    /// Helpers that only wait (the signal watcher).
    Helper,
}

impl ThreadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Worker => "exec worker",
            ThreadKind::TemplateLoader => "template loader",
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

/// The KVM requests kvmfork issues, the only ones an exec worker may make.
/// Found by reading every kvm-ioctls 0.25 method the crate calls (`Kvm`,
/// `VmFd`, `VcpuFd`: the request each wraps, from kvm-ioctls'
/// `kvm_ioctls.rs`) and the crate's own raw requests (`KVM_CLEAR_DIRTY_LOG`
/// in `vmm/vm.rs`, `KVM_GET_STATS_FD` in `vmm/stats.rs`). Calls without an
/// ioctl (`set_kvm_immediate_exit`, sync regs) need none. Any other KVM
/// request (`KVM_GET_API_VERSION`, `KVM_SET_GSI_ROUTING`, `KVM_SIGNAL_MSI`,
/// ...) kills the process.
mod kvm_requests {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // /dev/kvm: Kvm::create_vm (also KVM_CHECK_EXTENSION,
    // KVM_GET_VCPU_MMAP_SIZE), check_extension_raw, get_supported_cpuid,
    // get_msr_index_list.
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    // VM fd.
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
    ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_iow_nr!(KVM_SET_MSR_FILTER, KVMIO, 0xc6, kvm_msr_filter);
    // vCPU fd.
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

    /// Every request above. (KVM_GET_PIT2 and KVM_GET_VCPU_EVENTS share a
    /// command byte, as do the two setters, but not a number: the argument
    /// size is part of it.)
    pub fn all() -> Vec<u64> {
        // c_ulong is u64 on x86_64, the only target these filters build for.
        let mut v: Vec<u64> = [
            KVM_CREATE_VM(),
            KVM_GET_MSR_INDEX_LIST(),
            KVM_CHECK_EXTENSION(),
            KVM_GET_VCPU_MMAP_SIZE(),
            KVM_GET_SUPPORTED_CPUID(),
            KVM_CREATE_VCPU(),
            KVM_GET_DIRTY_LOG(),
            KVM_SET_USER_MEMORY_REGION(),
            KVM_SET_TSS_ADDR(),
            KVM_SET_IDENTITY_MAP_ADDR(),
            KVM_CREATE_IRQCHIP(),
            KVM_GET_IRQCHIP(),
            KVM_SET_IRQCHIP(),
            KVM_IRQFD(),
            KVM_CREATE_PIT2(),
            KVM_SET_CLOCK(),
            KVM_GET_CLOCK(),
            KVM_GET_PIT2(),
            KVM_SET_PIT2(),
            KVM_ENABLE_CAP(),
            KVM_CLEAR_DIRTY_LOG(),
            KVM_SET_MSR_FILTER(),
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_SREGS(),
            KVM_TRANSLATE(),
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
            KVM_SET_FPU(),
            KVM_GET_LAPIC(),
            KVM_SET_LAPIC(),
            KVM_SET_CPUID2(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_SET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_SET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_SET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_SET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_SET_XCRS(),
            KVM_GET_STATS_FD(),
        ]
        .to_vec();
        v.sort_unstable();
        v.dedup();
        v
    }
}
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

/// The template loader, beyond the worker's list (it loads a snapshot into
/// a memfd and runs a probe guest like a worker): waiting for and killing
/// the builder process group, and the set-id calls glibc makes on every
/// thread (its SIGSETXID broadcast) when `--user` switches the process after
/// the loader started: `initgroups` (setgroups), `setresgid`, `setresuid`
/// and the final `setuid(0)` check of `privileges::drop_to` (it must fail
/// with EPERM, not kill the process). The loader is root until then anyway,
/// and the switch cannot be undone. Worker, event-loop and helper threads
/// start after the switch, so their lists need none of these.
const TEMPLATE_LOADER: &[i64] = &[
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_setgroups,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setgid,
    libc::SYS_setuid,
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
        ThreadKind::TemplateLoader => TEMPLATE_LOADER,
        ThreadKind::Helper => HELPER,
    };
    let loader: &[i64] = if kind == ThreadKind::TemplateLoader {
        WORKER
    } else {
        &[]
    };
    for &nr in COMMON.iter().chain(extra).chain(loader) {
        rules.insert(nr, vec![]);
    }
    let mut ioctls = vec![ioctl_eq(kind, FIONBIO)?, ioctl_eq(kind, FIOCLEX)?];
    if matches!(kind, ThreadKind::Worker | ThreadKind::TemplateLoader) {
        // Exactly the KVM requests kvmfork makes.
        for request in kvm_requests::all() {
            ioctls.push(ioctl_eq(kind, request)?);
        }
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
            ThreadKind::TemplateLoader,
            ThreadKind::Helper,
        ] {
            for action in [SeccompAction::Log, SeccompAction::KillProcess] {
                let program = filter(kind, action).unwrap();
                assert!(program.len() > COMMON.len(), "{kind:?}");
            }
        }
    }

    /// glibc's set-id broadcast makes every thread repeat the calls of
    /// `privileges::drop_to`, the template loader included (it is filtered
    /// before `serve --user` switches): each must reach the kernel, not the
    /// filter. Here with an errno action so a miss is seen, not fatal; the
    /// calls keep the ids as they are (no-ops for root and anyone else).
    #[test]
    fn the_template_loader_allows_the_set_id_calls_of_drop_to() {
        const MISS: u32 = 4095;
        let errors = std::thread::spawn(|| {
            let program = filter(ThreadKind::TemplateLoader, SeccompAction::Errno(MISS)).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            let keep = u64::MAX; // -1: leave this id alone
                                 // Whether the call that returned `rc` was refused by the filter
                                 // (errno read right after it).
            let refused = |rc: libc::c_long| {
                rc == -1 && std::io::Error::last_os_error().raw_os_error() == Some(MISS as i32)
            };
            // SAFETY: no memory arguments.
            let (gid, uid) = unsafe { (libc::getegid() as u64, libc::geteuid() as u64) };
            let calls = [
                // size 0, null list: a no-op for root, refused otherwise.
                ("setgroups", libc::SYS_setgroups, [0, 0, 0]),
                ("setresgid", libc::SYS_setresgid, [keep; 3]),
                ("setresuid", libc::SYS_setresuid, [keep; 3]),
                ("setgid", libc::SYS_setgid, [gid, 0, 0]),
                ("setuid", libc::SYS_setuid, [uid, 0, 0]),
            ];
            let mut errors = Vec::new();
            for (name, nr, [a, b, c]) in calls {
                // SAFETY: set-id calls with no memory arguments, asking for
                // the ids this thread already has (and only this thread:
                // the raw call is per thread).
                if refused(unsafe { libc::syscall(nr, a, b, c) }) {
                    errors.push(name);
                }
            }
            errors
        })
        .join()
        .unwrap();
        assert!(errors.is_empty(), "refused by the filter: {errors:?}");
    }

    /// The list holds the numbers the VMM's own definitions use, and no
    /// request by its type byte alone.
    #[test]
    fn the_worker_allows_exactly_the_kvm_requests_kvmfork_makes() {
        let all = kvm_requests::all();
        assert_eq!(all.len(), 46, "46 distinct requests");
        assert!(all.contains(&(crate::vmm::vm::KVM_CLEAR_DIRTY_LOG() as u64)));
        assert!(all.contains(&(crate::vmm::stats::KVM_GET_STATS_FD() as u64)));
        assert!(all.contains(&0xAE80), "KVM_RUN");
        assert!(!all.contains(&0xAE00), "KVM_GET_API_VERSION is not used");
        assert!(all.iter().all(|r| (r >> 8) & 0xff == 0xAE));
    }
}
