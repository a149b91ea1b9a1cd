//! One sandbox: a VM whose RAM is a private copy-on-write view of the
//! template and whose vCPU starts from the template's state.
//!
//! Fork paths:
//! - fresh: create VM + vCPU, map the template privately, restore state
//!   (what Zeroboot-style engines do per request; here it is the fallback);
//! - reset: for a pooled sandbox, copy back only the pages written since the
//!   template (KVM dirty log + pages the host wrote), keep every mapping, and
//!   restore state — 10-20x cheaper on this host (kvm-host.md).

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use super::mailbox::{self, MailboxRequest, CODE_MAX};
use crate::api::{ExecFailure, ExecRequest, ExecResult};
use crate::contract as c;
use crate::template::Template;
use crate::vmm::cpuid::HostKind;
use crate::vmm::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use crate::vmm::kick::ThreadTimer;
use crate::vmm::memory::{GuestRam, Sharing};
use crate::vmm::stats::{StatsSample, VcpuStats};
use crate::vmm::vcpu::{RunOutcome, Vcpu};
use crate::vmm::vm::Vm;

/// How often a running exec is checked for cancellation, and when a long
/// exec gets its timer interrupt back.
const CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How long a busy exec runs before it gets timer interrupts back anyway.
const TIMER_GRACE: Duration = Duration::from_millis(500);
const CONSOLE_TAIL: usize = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vm(#[from] crate::vmm::vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] crate::vmm::vcpu::VcpuError),
    #[error(transparent)]
    Memory(#[from] crate::vmm::memory::MemoryError),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Kick(#[from] crate::vmm::kick::KickError),
}

/// Where a reset's time went (for `kvmfork bench fork`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ResetStats {
    pub pages: usize,
    pub dirty_log: Duration,
    pub copy: Duration,
    pub vm_state: Duration,
    pub vcpu_state: Duration,
}

/// Limits applied to every exec of a sandbox.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub stdout_cap: u32,
    pub stderr_cap: u32,
    /// Most guest pages one exec may dirty (copy-on-write host memory).
    pub max_dirty_pages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stdout_cap: 1 << 20,
            stderr_cap: 1 << 20,
            max_dirty_pages: 64 << 8, /* 64 MiB */
        }
    }
}

pub struct Sandbox {
    // Field order is drop order: the VM (and its memslot) goes before the RAM.
    vcpu: Vcpu,
    vm: Vm,
    ram: GuestRam,
    devices: LegacyDevices,
    /// Bitmap of every guest page written since this VM was forked (guest
    /// writes from KVM's dirty log, OR-ed in; never cleared). With KVM's
    /// manual-protect mode pages stay writable once written, so an exec takes
    /// no write-protection exits on pages earlier execs already wrote; the
    /// price is that a reset copies back this whole set.
    ever_dirty: Vec<u64>,
    /// Counters that show whether an exec left guest user mode.
    stats: Option<VcpuStats>,
    /// The last exec entered the guest kernel (or we cannot tell): the next
    /// reset must also drop KVM's shadow page tables.
    kernel_entered: bool,
    /// The last exec provably never left guest user mode (PVM hosts, where
    /// every guest-kernel instruction shows up in KVM's emulation counter):
    /// nothing but memory, registers and FPU state can have changed, so the
    /// reset restores only those.
    user_mode_only: bool,
    host_pages: Vec<u64>,
    seq: u64,
    used: bool,
    poisoned: bool,
    timer_unmasked: bool,
}

impl Sandbox {
    /// A fresh VM restored from the template. With `pooled`, KVM logs dirty
    /// pages so the sandbox can later be reset by copy-back.
    pub fn fork_fresh(kvm: &Kvm, t: &Template, pooled: bool) -> Result<Sandbox, SandboxError> {
        let mut vm = Vm::new(kvm)?;
        if pooled && crate::settings::var_os("REPROTECT_DIRTY").is_none() {
            vm.enable_cumulative_dirty_log()?;
        }
        let ram = GuestRam::map(&t.memfd, t.meta.ram_size as usize, Sharing::Private)?;
        vm.set_ram(&ram, pooled)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SandboxError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let vcpu = Vcpu::new(&vm, 0)?;
        // VM-wide state (PIT, clock, irqchips) before the vCPU's.
        vm.restore_state(&t.state.vm)?;
        vcpu.restore_state(&t.state.vcpu, &t.fork_lapic)?;
        let devices = LegacyDevices::with_serial_state(
            irq,
            ConsoleSink::new(CONSOLE_TAIL, false, None),
            &t.state.serial,
        );
        let stats = if pooled {
            VcpuStats::open(vcpu.fd()).ok()
        } else {
            None
        };
        Ok(Sandbox {
            vcpu,
            vm,
            ram,
            devices,
            ever_dirty: Vec::new(),
            stats,
            kernel_entered: false,
            user_mode_only: false,
            host_pages: Vec::new(),
            seq: 0,
            used: false,
            poisoned: false,
            timer_unmasked: false,
        })
    }

    /// Whether this sandbox may be reset and reused.
    pub fn reusable(&self) -> bool {
        !self.poisoned && self.vm.dirty_logging()
    }

    pub fn used(&self) -> bool {
        self.used
    }

    /// Returns a used sandbox to the template's exact state: copy back every
    /// page written since, then restore VM and vCPU state. Returns the number
    /// of pages copied.
    pub fn reset(&mut self, t: &Template) -> Result<ResetStats, SandboxError> {
        let t0 = Instant::now();
        self.collect_dirty()?;
        for &p in &self.host_pages {
            set_bit(&mut self.ever_dirty, p);
        }
        self.host_pages.clear();
        if self.kernel_entered {
            // The exec may have changed guest page tables; the copy-back below
            // reverts them behind KVM's back, so its shadow copies must go.
            self.vm.zap_guest_mappings(&self.ram)?;
            self.kernel_entered = false;
        }
        let t1 = Instant::now();
        let n = self
            .ram
            .copy_pages_from(&t.source, BitIter::new(&self.ever_dirty));
        let t2 = Instant::now();
        let t3;
        if std::mem::take(&mut self.user_mode_only) {
            // Irqchips, PIT, LAPIC, MSRs, debug registers and the UART only
            // change when guest-kernel code runs: none ran.
            t3 = Instant::now();
            self.vcpu.restore_user_state(&t.state.vcpu)?;
        } else {
            self.vm.restore_state(&t.state.vm)?;
            self.devices
                .reset_to(&t.state.serial)
                .map_err(SandboxError::EventFd)?;
            t3 = Instant::now();
            self.vcpu.restore_fast(&t.state.vcpu, &t.fork_lapic)?;
        }
        let t4 = Instant::now();
        self.used = false;
        self.timer_unmasked = false;
        Ok(ResetStats {
            pages: n,
            dirty_log: t1 - t0,
            copy: t2 - t1,
            vm_state: t3 - t2,
            vcpu_state: t4 - t3,
        })
    }

    /// ORs KVM's dirty bitmap into `ever_dirty`.
    fn collect_dirty(&mut self) -> Result<(), SandboxError> {
        if !self.vm.dirty_logging() {
            return Ok(());
        }
        let bitmap = self.vm.take_dirty_log()?;
        if self.ever_dirty.len() < bitmap.len() {
            self.ever_dirty.resize(bitmap.len(), 0);
        }
        for (acc, word) in self.ever_dirty.iter_mut().zip(bitmap) {
            *acc |= word;
        }
        Ok(())
    }

    fn dirty_page_count(&self) -> usize {
        self.ever_dirty
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// The vCPU (tests inspect registers after a reset).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    pub fn vcpu_mut(&mut self) -> &mut Vcpu {
        &mut self.vcpu
    }

    /// The sandbox's private view of guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The guest console output of this sandbox (tail).
    pub fn console_tail(&self, lines: usize) -> String {
        self.devices.console().tail_text(lines)
    }

    /// Runs one request to completion. `timer` must belong to the calling
    /// thread (it kicks this thread's vCPU run).
    pub fn exec(
        &mut self,
        t: &Template,
        req: &ExecRequest,
        limits: &Limits,
        timer: &ThreadTimer,
    ) -> ExecResult {
        let started = Instant::now();
        let mut result = ExecResult {
            exit_code: -1,
            ..Default::default()
        };
        if req.code.len() > CODE_MAX {
            result.failure = Some(ExecFailure::Rejected(format!(
                "code is {} bytes; the limit is {CODE_MAX}",
                req.code.len()
            )));
            return result;
        }
        self.used = true;
        self.seq += 1;
        let mut fork_seed = [0u8; 64];
        fill_random(&mut fork_seed);
        let mut gen = [0u8; 8];
        fill_random(&mut gen);
        let mreq = MailboxRequest {
            seq: self.seq,
            language: req.language.contract_id(),
            timeout_ms: req.timeout.as_millis().min(u32::MAX as u128) as u32,
            code: req.code.as_bytes(),
            stdout_cap: limits.stdout_cap,
            stderr_cap: limits.stderr_cap,
            fork_generation: u64::from_le_bytes(gen) | 1,
            fork_seed,
        };
        match mailbox::write_request(&self.ram, &mreq) {
            Ok(pages) => self.host_pages.extend(pages),
            Err(e) => {
                self.poisoned = true;
                result.failure = Some(ExecFailure::Internal(e.to_string()));
                return result;
            }
        }
        self.vcpu.bind_kick_to_current_thread();
        let before = self.stats.as_ref().and_then(|s| s.sample().ok());
        let outcome = self.run_guest(t, req, limits, timer, started, &before);
        let _ = timer.disarm();
        if t.meta.host_kind == HostKind::Pvm {
            self.kernel_entered = self.left_user_mode(&before);
            // Only a clean DONE counts: anything else poisons the sandbox anyway.
            // (An exec that had its timer given back changed the LAPIC.)
            self.user_mode_only = !self.kernel_entered && !self.timer_unmasked && outcome.is_ok();
        }
        result.exec_time = started.elapsed();
        match outcome {
            Ok(()) => match mailbox::read_response(
                &self.ram,
                self.seq,
                limits.stdout_cap,
                limits.stderr_cap,
            ) {
                Ok(resp) => {
                    result.stdout = resp.stdout;
                    result.stderr = resp.stderr;
                    result.stdout_truncated = resp.stdout_truncated;
                    result.stderr_truncated = resp.stderr_truncated;
                    match resp.status as u64 {
                        c::STATUS_OK => result.exit_code = resp.exit_code,
                        c::STATUS_BAD_REQUEST => {
                            result.failure = Some(ExecFailure::Rejected(
                                String::from_utf8_lossy(&result.stderr).into_owned(),
                            ))
                        }
                        _ => {
                            result.failure = Some(ExecFailure::GuestCrashed(
                                String::from_utf8_lossy(&result.stderr).into_owned(),
                            ))
                        }
                    }
                }
                Err(e) => {
                    self.poisoned = true;
                    result.failure = Some(ExecFailure::BadResponse(e.to_string()));
                }
            },
            Err(failure) => {
                self.poisoned = true;
                result.failure = Some(failure);
            }
        }
        result
    }

    /// Whether the guest left user mode since `before`: any emulated
    /// instruction beyond the doorbell store, a fault or interrupt delivered to
    /// the guest, or a halt. Without counters the answer is "yes".
    fn left_user_mode(&self, before: &Option<StatsSample>) -> bool {
        let (Some(stats), Some(before)) = (self.stats.as_ref(), before.as_ref()) else {
            return true;
        };
        let Ok(after) = stats.sample() else {
            return true;
        };
        let delta = |name: &str| match (stats.get(before, name), stats.get(&after, name)) {
            (Some(a), Some(b)) => Some(b.wrapping_sub(a)),
            _ => None,
        };
        let (Some(emulated), Some(faults), Some(irqs), Some(halts)) = (
            delta("insn_emulation"),
            delta("pf_guest"),
            delta("irq_injections"),
            delta("halt_exits"),
        ) else {
            return true;
        };
        emulated > 1 || faults > 0 || irqs > 0 || halts > 0
    }

    /// A masked timer is given back when the guest went idle (it is waiting
    /// for time to pass: a sleep, a timer) or the exec has run long; a busy
    /// short exec keeps it masked, so it pays no ticks (~5 ms each on PVM).
    fn needs_timer(&self, started: Instant, before: &Option<StatsSample>) -> bool {
        if started.elapsed() >= TIMER_GRACE {
            return true;
        }
        let (Some(stats), Some(before)) = (self.stats.as_ref(), before.as_ref()) else {
            return true;
        };
        let Ok(now) = stats.sample() else { return true };
        match (
            stats.get(before, "halt_exits"),
            stats.get(&now, "halt_exits"),
        ) {
            (Some(a), Some(b)) => b != a,
            _ => true,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_guest(
        &mut self,
        t: &Template,
        req: &ExecRequest,
        limits: &Limits,
        timer: &ThreadTimer,
        started: Instant,
        before: &Option<StatsSample>,
    ) -> Result<(), ExecFailure> {
        let deadline = started + req.timeout;
        let arm = |now: Instant| {
            let left = deadline.saturating_duration_since(now);
            timer
                .arm(left.min(CHECK_INTERVAL))
                .map_err(|e| ExecFailure::Internal(e.to_string()))
        };
        arm(Instant::now())?;
        loop {
            let outcome = self
                .vcpu
                .run(&mut self.devices, &self.ram)
                .map_err(|e| ExecFailure::Internal(e.to_string()))?;
            match outcome {
                RunOutcome::Doorbell(v) if v as u64 == c::DOORBELL_DONE => return Ok(()),
                RunOutcome::Doorbell(v) if v as u64 == c::DOORBELL_FATAL => {
                    return Err(ExecFailure::GuestCrashed(format!(
                        "guest agent failed: {}",
                        mailbox::read_fatal_message(&self.ram)
                    )))
                }
                RunOutcome::Doorbell(v) => {
                    return Err(ExecFailure::BadResponse(format!(
                        "unexpected doorbell value {v:#x}"
                    )))
                }
                RunOutcome::Crashed(why) => {
                    let tail = self.console_tail(12);
                    return Err(ExecFailure::GuestCrashed(if tail.is_empty() {
                        why
                    } else {
                        format!("{why}; guest console:\n{tail}")
                    }));
                }
                RunOutcome::Interrupted => {
                    let now = Instant::now();
                    if req.cancel.is_cancelled() {
                        return Err(ExecFailure::Cancelled);
                    }
                    if now >= deadline {
                        return Err(ExecFailure::Timeout);
                    }
                    if self.vm.dirty_logging() {
                        self.collect_dirty()
                            .map_err(|e| ExecFailure::Internal(e.to_string()))?;
                        if self.dirty_page_count() > limits.max_dirty_pages {
                            return Err(ExecFailure::MemoryLimit);
                        }
                    }
                    if !self.timer_unmasked && self.needs_timer(started, before) {
                        // A long exec gets its timer tick back (sleeps, scheduling).
                        self.vcpu
                            .resume_lapic_timer(&t.state.vcpu.lapic)
                            .map_err(|e| ExecFailure::Internal(e.to_string()))?;
                        self.timer_unmasked = true;
                    }
                    arm(now)?;
                }
            }
        }
    }
}

fn set_bit(bitmap: &mut Vec<u64>, bit: u64) {
    let word = (bit / 64) as usize;
    if bitmap.len() <= word {
        bitmap.resize(word + 1, 0);
    }
    bitmap[word] |= 1 << (bit % 64);
}

/// Iterates the set bits of a bitmap, lowest first.
struct BitIter<'a> {
    words: &'a [u64],
    index: usize,
    current: u64,
}

impl<'a> BitIter<'a> {
    fn new(words: &'a [u64]) -> Self {
        BitIter {
            words,
            index: 0,
            current: words.first().copied().unwrap_or(0),
        }
    }
}

impl Iterator for BitIter<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            self.index += 1;
            self.current = *self.words.get(self.index)?;
        }
        let bit = self.current.trailing_zeros() as u64;
        self.current &= self.current - 1;
        Some(self.index as u64 * 64 + bit)
    }
}

/// Host randomness for per-fork reseeding (getrandom never blocks after boot).
pub fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writing into the remaining part of `buf`.
        let n = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - filled,
                0,
            )
        };
        if n > 0 {
            filled += n as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_iteration_finds_every_set_bit_in_order() {
        let mut bm = Vec::new();
        for b in [0u64, 1, 63, 64, 130, 1000] {
            set_bit(&mut bm, b);
        }
        assert_eq!(
            BitIter::new(&bm).collect::<Vec<_>>(),
            vec![0, 1, 63, 64, 130, 1000]
        );
        assert_eq!(BitIter::new(&[]).count(), 0);
        assert_eq!(BitIter::new(&[0, 0, 1 << 5]).collect::<Vec<_>>(), vec![133]);
    }
}
