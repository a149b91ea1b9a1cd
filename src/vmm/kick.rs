//! Getting a vCPU out of `KVM_RUN` on time.
//!
//! A vCPU thread blocked in `KVM_RUN` is interrupted by a signal whose handler
//! sets `kvm_run.immediate_exit`, so the run returns `EINTR` whether the signal
//! lands inside the guest or just before the ioctl (Firecracker's and
//! Hyperlight's scheme). Each vCPU thread arms a POSIX timer that signals that
//! very thread (`SIGEV_THREAD_ID`): deadlines cost two syscalls per run and no
//! watchdog thread.

use std::cell::Cell;
use std::sync::Once;
use std::time::Duration;

use kvm_bindings::kvm_run;

thread_local! {
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

#[derive(Debug, thiserror::Error)]
pub enum KickError {
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Sigaction(std::io::Error),
    #[error("timer_create for the vCPU deadline failed: {0}")]
    TimerCreate(std::io::Error),
    #[error("timer_settime for the vCPU deadline failed: {0}")]
    TimerSet(std::io::Error),
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_sig: libc::c_int) {
    // Only async-signal-safe work: one store through a thread-local pointer.
    let _ = RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run, registered by
            // `set_current_run` and cleared before the mapping goes away.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the process-wide handler for [`kick_signal`] (idempotent).
pub fn install_handler() -> Result<(), KickError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler; no SA_RESTART so KVM_RUN
        // returns EINTR instead of being restarted.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
                result = Err(KickError::Sigaction(std::io::Error::last_os_error()));
            }
        }
    });
    result
}

/// Registers (or clears, with null) the kvm_run the kick handler of this
/// thread writes to.
pub fn set_current_run(run: *mut kvm_run) {
    RUN_PTR.with(|p| p.set(run));
}

/// A one-shot timer that sends [`kick_signal`] to the thread that created it.
pub struct ThreadTimer {
    id: libc::timer_t,
}

// SAFETY: the timer id is a plain handle; arming it from another thread is
// allowed by POSIX (it still signals the creating thread).
unsafe impl Send for ThreadTimer {}

impl ThreadTimer {
    /// Creates a timer targeting the calling thread.
    pub fn for_current_thread() -> Result<ThreadTimer, KickError> {
        install_handler()?;
        // SAFETY: sigevent is plain data; zeroed is a valid starting value.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid sigevent and out-pointer.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(KickError::TimerCreate(std::io::Error::last_os_error()));
        }
        Ok(ThreadTimer { id })
    }

    /// Fires once after `after` (a zero duration disarms).
    pub fn arm(&self, after: Duration) -> Result<(), KickError> {
        let mut after = after;
        if after.is_zero() {
            after = Duration::from_nanos(1);
        }
        self.set(after)
    }

    pub fn disarm(&self) -> Result<(), KickError> {
        self.set(Duration::ZERO)
    }

    fn set(&self, after: Duration) -> Result<(), KickError> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: valid timer id and itimerspec.
        if unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(KickError::TimerSet(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: deleting our own timer.
        unsafe { libc::timer_delete(self.id) };
    }
}
