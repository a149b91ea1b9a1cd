//! One sandbox: a VM whose RAM is a private copy-on-write view of the
//! template and whose vCPU starts from the template's state.
//!
//! Fork paths:
//! - fresh: create VM + vCPU, map the template privately, restore state
//!   (what Zeroboot-style engines do per request; here it is the fallback);
//! - reset: for a pooled sandbox, copy back only the pages written since the
//!   template (KVM dirty log + pages the host wrote), keep every mapping, and
//!   restore state — 10-20x cheaper on this host (kvm-host.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use super::layer::{Layer, DELTA_RUN_GAP_PAGES, RUN_GAP_PAGES};
use super::mailbox::{self, MailboxRequest, CODE_MAX};
use crate::api::{ExecFailure, ExecRequest, ExecResult};
use crate::contract as c;
use crate::template::Template;
use crate::vmm::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use crate::vmm::kick::ThreadTimer;
use crate::vmm::memory::{GuestRam, Sharing};
use crate::vmm::stats::{StatsSample, VcpuStats};
use crate::vmm::vcpu::{RunOutcome, Vcpu, VcpuState};
use crate::vmm::vm::{Vm, VmState};
use vm_superio::serial::SerialState;

/// How often a running exec is checked for cancellation, and when a long
/// exec gets its timer interrupt back.
const CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// How long a busy exec runs before it gets timer interrupts back anyway.
const TIMER_GRACE: Duration = Duration::from_millis(500);
const CONSOLE_TAIL: usize = 8 << 10;
/// Written runs at least this long (256 KiB) are reset by mapping the
/// template back rather than copying it.
const REMAP_RUN_PAGES: u64 = 64;
/// How long a timed-out session run gets to reach user mode, take the host
/// interrupt and answer, before the session is given up as wedged.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// How one run treats the guest's program state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecMode {
    /// `python -c` / `node -e` semantics in a fresh fork, RNGs reseeded.
    Stateless,
    /// A run in a live session: the namespace of earlier runs persists and
    /// the final expression's value is returned. `reseed` on the first run
    /// after the session was created, forked or restored, so every child has
    /// its own randomness while a session's own seeded streams stay its own.
    Session { reseed: bool },
}

/// The complete state of a live sandbox at its DONE doorbell, relative to
/// its template: the pages that differ, in a base [`Layer`] and an optional
/// delta layer over it, plus machine state. Forks and restores apply it onto
/// a VM that holds the template's state. Cloning is cheap (shared): every
/// child of one capture maps the same layers.
///
/// A capture from a sandbox that holds an earlier checkpoint's image copies
/// only what changed since that image's base: the new checkpoint shares the
/// base and gets a new delta (everything written since the base, so a fork
/// maps two layers, never a chain). Once the delta outgrows
/// [`DELTA_FLATTEN_PAGES`] or half the base, the capture starts a new base.
#[derive(Clone)]
pub struct Checkpoint(Arc<CheckpointData>);

struct CheckpointData {
    /// Address of the template this layer applies to (a checkpoint applied
    /// to another template's VM would be garbage: refused).
    template: *const Template,
    /// Pages that differ from the template at the base capture.
    base: Arc<Layer>,
    /// Pages that differ from the base's image (written since the base was
    /// captured); they win over the base's.
    delta: Option<Layer>,
    /// Shared by a checkpoint and its compacted copy ([`Sandbox::compact`]).
    machine: Arc<MachineState>,
}

/// The machine state of a checkpoint, beside its memory.
struct MachineState {
    vcpu: VcpuState,
    vm: VmState,
    serial: SerialState,
    seq: u64,
    generation: u64,
    timer_unmasked: bool,
}

// SAFETY: `template` is only compared, never dereferenced; every other field
// is owned data, immutable once built.
unsafe impl Send for CheckpointData {}
// SAFETY: as above; nothing in it has interior mutability.
unsafe impl Sync for CheckpointData {}

impl Checkpoint {
    /// Bytes of guest memory the checkpoint holds (its layers; a base shared
    /// with other checkpoints is counted in each).
    pub fn dirty_bytes(&self) -> u64 {
        self.layers().map(Layer::bytes).sum()
    }

    /// Runs (separate mappings) a fork of this checkpoint makes.
    pub fn runs(&self) -> usize {
        self.layers().map(|l| l.runs().len()).sum()
    }

    /// Bytes the last capture copied: the delta, or the base of a full one.
    pub fn captured_bytes(&self) -> u64 {
        self.0.delta.as_ref().unwrap_or(&self.0.base).bytes()
    }

    /// Base first, then the delta (which wins where both hold a page).
    fn layers(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&*self.0.base).chain(self.0.delta.as_ref())
    }

    /// Whether both hold the same state: one capture, or a capture and its
    /// compacted copy (which shares the machine state, see
    /// [`Sandbox::compact`]).
    fn same(&self, other: &Checkpoint) -> bool {
        Arc::ptr_eq(&self.0.machine, &other.0.machine)
    }

    /// Writes this checkpoint's contents of every page set in `pages` into
    /// `ram`: the delta's, else the base's, else the template's. Returns the
    /// pages written.
    fn write_pages(
        &self,
        t: &Template,
        ram: &GuestRam,
        pages: &[u64],
    ) -> Result<usize, SandboxError> {
        let npages = (ram.size() / crate::vmm::memory::PAGE_SIZE) as u64;
        let base = &*self.0.base;
        let delta = self.0.delta.as_ref();
        let mut n = 0;
        for (first, count) in super::layer::runs_of(pages, 0, npages) {
            let end = first + count;
            let mut p = first;
            while p < end {
                let next_delta = delta.and_then(|d| d.next_run_after(p)).unwrap_or(end);
                let k = if let Some((fp, left)) = delta.and_then(|d| d.locate(p)) {
                    let k = left.min(end - p);
                    delta
                        .expect("located in the delta")
                        .read_into(fp, p, k, ram)?;
                    k
                } else if let Some((fp, left)) = base.locate(p) {
                    let k = left.min(end - p).min(next_delta - p);
                    base.read_into(fp, p, k, ram)?;
                    k
                } else {
                    let next_base = base.next_run_after(p).unwrap_or(end);
                    let k = (end.min(next_delta).min(next_base)) - p;
                    ram.copy_pages_from(&t.source, p..p + k);
                    k
                };
                p += k;
                n += k as usize;
            }
        }
        Ok(n)
    }
}

/// A delta of more pages than this (32 MiB), or than half its base, makes
/// the next capture a full one with a new base: each capture copies its
/// whole delta, so a delta should stay small next to what it saves.
pub const DELTA_FLATTEN_PAGES: u64 = 8 << 10;

/// Layer runs mapped in all sandboxes of this process: each is a VMA, and the
/// host's `vm.max_map_count` (65530 by default) bounds VMAs per process. Past
/// half of it, forks copy a layer's pages instead of mapping them.
static MAPPED_RUNS: AtomicUsize = AtomicUsize::new(0);

fn mapped_runs_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(65530)
            / 2
    })
}

/// The guest page ranges of one sandbox that map a layer instead of the
/// template; counted in [`MAPPED_RUNS`] while they exist.
#[derive(Default)]
struct LayerMappings {
    /// Guest page ranges that map a layer (sorted, disjoint).
    runs: Vec<(u64, u64)>,
    /// Taken from [`MAPPED_RUNS`]: the mappings made (a delta's over a base's
    /// split them, so this can exceed `runs.len()`).
    reserved: usize,
    /// The checkpoint whose layer is mapped: held while any run maps it, so
    /// its file cannot be recycled and rewritten under the mapping.
    held: Option<Checkpoint>,
}

impl LayerMappings {
    /// Takes room for `n` more runs from the process budget, if there is room.
    fn reserve(n: usize) -> bool {
        let budget = mapped_runs_budget();
        MAPPED_RUNS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + n <= budget).then_some(used + n)
            })
            .is_ok()
    }

    /// The mapped runs and the checkpoint they map; the caller maps the
    /// template back over the runs before it drops the checkpoint.
    fn take(&mut self) -> (Vec<(u64, u64)>, Option<Checkpoint>) {
        MAPPED_RUNS.fetch_sub(std::mem::take(&mut self.reserved), Ordering::Relaxed);
        (std::mem::take(&mut self.runs), self.held.take())
    }
}

impl Drop for LayerMappings {
    fn drop(&mut self) {
        MAPPED_RUNS.fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

/// Sorted, merged union of page ranges `(first, count)`.
fn union_of_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, count) in ranges {
        match out.last_mut() {
            Some((f, c)) if first <= *f + *c => *c = (*c).max(first + count - *f),
            _ => out.push((first, count)),
        }
    }
    out
}

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
    #[error("restoring the serial port: {0}")]
    Serial(std::io::Error),
    #[error("checkpoint belongs to another template")]
    ForeignCheckpoint,
    #[error(transparent)]
    Layer(#[from] super::layer::LayerError),
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
    // Field order is drop order: the VM (and its memslot) goes before the RAM,
    // and the RAM (its mappings of a layer) before `layered` lets the layer go.
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
    /// KVM has built no translations for this VM's memory slot: it was
    /// (re)created and the vCPU has not run since. Guest memory may then be
    /// remapped and rewritten without re-creating the slot.
    shadow_clean: bool,
    /// Guest pages mapped from a checkpoint's layer rather than the template
    /// (a fork's inherited state, shared with its siblings).
    layered: LayerMappings,
    /// The checkpoint of this sandbox's current state, while it still is
    /// (nothing ran since it was captured or applied): forking an idle
    /// session again reuses it instead of capturing again.
    captured: Option<Checkpoint>,
    /// The checkpoint last captured from or applied to this sandbox: its
    /// memory is that checkpoint's image except on the pages in
    /// `since_image`. Lets a capture copy only a delta, and a restore of it
    /// copy back only those pages.
    image: Option<Checkpoint>,
    /// Pages written since `image` was set (guest writes from KVM's dirty
    /// log, which is re-armed then, and host writes).
    since_image: Vec<u64>,
    /// Every run since `image` was set provably stayed in guest user mode
    /// (see `user_mode_only`): restoring it needs no memory-slot cycle and
    /// only registers and FPU.
    user_only_since_image: bool,
    /// `ever_dirty`'s count at the last reset or apply (see
    /// [`Sandbox::tenant_dirty_pages`]).
    tenant_baseline: usize,
    seq: u64,
    /// Fork generation in the mailbox (the guest kernel reseeds its CRNG
    /// when it changes).
    generation: u64,
    interrupt_failure: Option<String>,
    used: bool,
    poisoned: bool,
    timer_unmasked: bool,
}

impl Sandbox {
    /// A fresh VM restored from the template. With `pooled`, KVM logs dirty
    /// pages so the sandbox can later be reset by copy-back.
    pub fn fork_fresh(kvm: &Kvm, t: &Template, pooled: bool) -> Result<Sandbox, SandboxError> {
        let mut vm = Vm::new(kvm)?;
        if t.meta.pmu_disabled {
            vm.disable_pmu()?;
        }
        if t.meta.msr_filtered {
            vm.enable_msr_filter()?;
        }
        if pooled && crate::settings::var_os("REPROTECT_DIRTY").is_none() {
            vm.enable_cumulative_dirty_log()?;
        }
        let ram = GuestRam::map(&t.memfd, t.meta.ram_size as usize, Sharing::Private)?;
        vm.set_ram(&ram, pooled)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SandboxError::EventFd)?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let mut vcpu = Vcpu::new(&vm, 0)?;
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
            shadow_clean: true,
            layered: LayerMappings::default(),
            captured: None,
            image: None,
            since_image: Vec::new(),
            user_only_since_image: false,
            tenant_baseline: 0,
            seq: 0,
            generation: 0,
            interrupt_failure: None,
            used: false,
            poisoned: false,
            timer_unmasked: false,
        })
    }

    /// Whether a checkpoint can be applied without re-creating the memory
    /// slot (see `shadow_clean`), and nothing needs reverting first.
    pub fn clean(&self) -> bool {
        self.shadow_clean && !self.used
    }

    /// Whether the next reset re-creates the memory slot (the sandbox held a
    /// layer or ran guest-kernel code since the slot was made).
    pub fn needs_slot_cycle(&self) -> bool {
        self.used && !self.shadow_clean && (self.kernel_entered || !self.layered.runs.is_empty())
    }

    /// Whether the runs since the last reset may have entered the guest
    /// kernel (the next reset then re-creates the memory slot). The start-up
    /// self-check reads it after a probe that makes a syscall.
    pub fn kernel_entered(&self) -> bool {
        self.kernel_entered
    }

    /// Whether this sandbox may be reset and reused.
    pub fn reusable(&self) -> bool {
        !self.poisoned && self.vm.dirty_logging()
    }

    pub fn used(&self) -> bool {
        self.used
    }

    /// The sandbox failed (timeout without recovery, crash, bad response)
    /// and must be destroyed.
    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Guest memory the current tenant wrote since the last reset or apply
    /// (what its memory limit counts).
    pub fn tenant_dirty_bytes(&self) -> u64 {
        (self.tenant_dirty_pages() + self.host_pages.len()) as u64
            * crate::vmm::memory::PAGE_SIZE as u64
    }

    /// Guest memory this sandbox holds apart from its template (pages ever
    /// written since it was forked, including a checkpoint's layer).
    pub fn dirty_bytes(&self) -> u64 {
        (self.dirty_page_count() + self.host_pages.len()) as u64
            * crate::vmm::memory::PAGE_SIZE as u64
    }

    /// Captures this sandbox's state at its last DONE doorbell. The sandbox
    /// stays usable. `kvm` reads the MSR list. A sandbox that has not run
    /// since its last capture (or since a checkpoint was applied to it)
    /// returns that checkpoint again.
    pub fn checkpoint(&mut self, kvm: &Kvm, t: &Template) -> Result<Checkpoint, SandboxError> {
        if let Some(cp) = &self.captured {
            return Ok(cp.clone());
        }
        // KVM asks for one KVM_RUN with immediate_exit after an MMIO exit so
        // the doorbell store completes before state is read.
        self.shadow_clean = false;
        self.vcpu.complete_pending_io()?;
        self.note_writes()?;
        // With an earlier checkpoint's image in memory, only what changed
        // since that image's base is copied: the pages of its delta and those
        // written since.
        let incremental = self.image.as_ref().and_then(|image| {
            let base = image.0.base.clone();
            let mut changed = self.since_image.clone();
            if let Some(d) = &image.0.delta {
                d.mark_pages(&mut changed);
            }
            let pages: u64 = changed.iter().map(|w| u64::from(w.count_ones())).sum();
            let base_pages = base.bytes() / crate::vmm::memory::PAGE_SIZE as u64;
            (pages <= DELTA_FLATTEN_PAGES && pages <= base_pages / 2).then_some((base, changed))
        });
        let (base, delta) = match incremental {
            Some((base, changed)) => (
                base,
                Some(Layer::capture(&self.ram, &changed, DELTA_RUN_GAP_PAGES)?),
            ),
            None => (
                Arc::new(Layer::capture(&self.ram, &self.differ(), RUN_GAP_PAGES)?),
                None,
            ),
        };
        // vCPU before VM-wide state, as the template capture does.
        let vcpu = self.vcpu.save_state(kvm)?;
        let vm = self.vm.save_state()?;
        let cp = Checkpoint(Arc::new(CheckpointData {
            template: t as *const Template,
            base,
            delta,
            machine: Arc::new(MachineState {
                vcpu,
                vm,
                serial: self.devices.serial.state(),
                seq: self.seq,
                generation: self.generation,
                timer_unmasked: self.timer_unmasked,
            }),
        }));
        // ORDER: after the copy. From here on KVM logs the guest's writes
        // anew, so `since_image` is relative to this capture.
        self.vm.rearm_dirty_log(&self.ever_dirty)?;
        self.set_image(&cp);
        self.captured = Some(cp.clone());
        Ok(cp)
    }

    /// Everything that differs from the template: pages written since the
    /// fork, and pages inherited from a layer.
    fn differ(&self) -> Vec<u64> {
        let mut differ = self.ever_dirty.clone();
        for &(first, n) in &self.layered.runs {
            for p in first..first + n {
                set_bit(&mut differ, p);
            }
        }
        differ
    }

    /// Off the request path (an idle session): when the checkpoint of this
    /// sandbox's current state has a delta of more than `min_delta_runs`
    /// runs, captures it again as one base layer, so each later fork of the
    /// idle sandbox maps only the base's few runs. Returns whether it did.
    pub fn compact(&mut self, min_delta_runs: usize) -> Result<bool, SandboxError> {
        let Some(cp) = self.captured.clone() else {
            return Ok(false);
        };
        if cp
            .0
            .delta
            .as_ref()
            .is_none_or(|d| d.runs().len() <= min_delta_runs)
        {
            return Ok(false);
        }
        // Nothing ran since `cp` (or `captured` would be gone): memory is its
        // image, and its machine state is still the sandbox's.
        self.note_writes()?;
        let base = Arc::new(Layer::capture(&self.ram, &self.differ(), RUN_GAP_PAGES)?);
        let flat = Checkpoint(Arc::new(CheckpointData {
            template: cp.0.template,
            base,
            delta: None,
            machine: cp.0.machine.clone(),
        }));
        // The image is the same memory, with new layers: pages written since
        // (none yet) stay tracked against it.
        self.image = Some(flat.clone());
        self.captured = Some(flat);
        Ok(true)
    }

    /// Rolls this sandbox back to `cp` in place. When `cp` is the image the
    /// sandbox holds (its last capture or apply), only the pages written
    /// since are copied back — and, if every run since stayed in guest user
    /// mode, without a memory-slot cycle and with registers and FPU only.
    /// Anything else is a full [`Sandbox::apply`].
    pub fn restore(&mut self, t: &Template, cp: &Checkpoint) -> Result<(), SandboxError> {
        if !std::ptr::eq(cp.0.template, t) {
            return Err(SandboxError::ForeignCheckpoint);
        }
        let holds_image = self.image.as_ref().is_some_and(|i| i.same(cp));
        if !holds_image || !self.vm.dirty_logging() {
            return self.apply(t, cp);
        }
        if self.captured.as_ref().is_some_and(|c| c.same(cp)) {
            // Nothing ran since it was captured or applied.
            return Ok(());
        }
        self.note_writes()?;
        let user_only = self.user_only_since_image;
        // Guest-kernel code may have changed page tables the host now
        // rewrites behind KVM's back: then the slot is re-created (see
        // `reset_to`).
        let cycle = !user_only && !self.shadow_clean;
        if cycle {
            self.vm.remove_ram(&self.ram)?;
        }
        let written = cp.write_pages(t, &self.ram, &self.since_image);
        if cycle {
            self.vm.restore_ram(&self.ram)?;
            self.shadow_clean = true;
        } else {
            // The pages just rewritten must be logged again when the guest
            // next writes them (they are all in the log, or host-written).
            self.vm.rearm_dirty_log(&self.since_image)?;
        }
        written?;
        let d = &*cp.0.machine;
        if user_only {
            // Irqchips, PIT, LAPIC, MSRs and the UART only change when
            // guest-kernel code runs: none ran since the image.
            self.vcpu.restore_user_state(&d.vcpu)?;
        } else {
            // VM-wide state (PIT, clock, irqchips) before the vCPU's.
            self.vm.restore_state(&d.vm)?;
            self.devices
                .reset_to(&d.serial)
                .map_err(SandboxError::Serial)?;
            self.vcpu.restore_fast(&d.vcpu, &d.vcpu.lapic)?;
        }
        self.seq = d.seq;
        self.generation = d.generation;
        self.timer_unmasked = d.timer_unmasked;
        self.set_image(cp);
        self.captured = Some(cp.clone());
        Ok(())
    }

    /// The sandbox's memory is `cp`'s image from now on (KVM's dirty log was
    /// just re-armed or the slot re-created).
    fn set_image(&mut self, cp: &Checkpoint) {
        self.image = Some(cp.clone());
        self.since_image.iter_mut().for_each(|w| *w = 0);
        self.user_only_since_image = true;
    }

    /// Brings the written-page sets up to date: KVM's log and the host's own
    /// writes.
    fn note_writes(&mut self) -> Result<(), SandboxError> {
        self.collect_dirty()?;
        for p in std::mem::take(&mut self.host_pages) {
            set_bit(&mut self.ever_dirty, p);
            set_bit(&mut self.since_image, p);
        }
        Ok(())
    }

    /// Puts `cp` into this sandbox, fresh or used (a used one is reverted in
    /// the same pass): the layer's pages mapped over the template's, then the
    /// checkpoint's machine state.
    pub fn apply(&mut self, t: &Template, cp: &Checkpoint) -> Result<(), SandboxError> {
        self.reset_to(t, Some((cp, true))).map(|_| ())
    }

    /// [`Sandbox::apply`] that copies the layer's pages in rather than mapping
    /// them (what a restore from a full snapshot costs; `bench sessions`).
    pub fn apply_by_copy(&mut self, t: &Template, cp: &Checkpoint) -> Result<(), SandboxError> {
        self.reset_to(t, Some((cp, false))).map(|_| ())
    }

    /// Returns a used sandbox to the template's exact state: copy back every
    /// page written since, then restore VM and vCPU state.
    pub fn reset(&mut self, t: &Template) -> Result<ResetStats, SandboxError> {
        self.reset_to(t, None)
    }

    /// Puts a used (or fresh) sandbox into the template's state, or with
    /// `cp` into the checkpoint's (mapped, or copied when the flag is false),
    /// in one pass over guest memory and at most one memory-slot cycle.
    fn reset_to(
        &mut self,
        t: &Template,
        cp: Option<(&Checkpoint, bool)>,
    ) -> Result<ResetStats, SandboxError> {
        if let Some((cp, _)) = cp {
            if !std::ptr::eq(cp.0.template, t) {
                return Err(SandboxError::ForeignCheckpoint);
            }
        }
        let t0 = Instant::now();
        self.note_writes()?;
        self.captured = None;
        self.image = None;
        // The memory slot is re-created (which drops every shadow page table
        // KVM built) when the host changes guest page tables behind its back:
        // the copy-back after an exec that entered the guest kernel, or a
        // layer holding a session's page tables going or coming.
        // A slot KVM has built nothing for needs no cycle.
        let cycle = !self.shadow_clean
            && (self.kernel_entered || cp.is_some() || !self.layered.runs.is_empty());
        let t1 = Instant::now();
        let mut stats = ResetStats {
            dirty_log: t1 - t0,
            ..Default::default()
        };
        if cycle {
            self.vm.remove_ram(&self.ram)?;
        }
        // ORDER: every remap happens while the slot is gone (cheap for KVM),
        // and `ever_dirty` may lose bits only then: the re-created slot
        // starts a new dirty log, so none of them comes back stale.
        let reverted = self.revert_memory(t, cycle || self.shadow_clean, cp);
        if cycle {
            // Re-created even when reverting failed, so the VM keeps its RAM
            // (the caller destroys a sandbox whose reset failed).
            self.vm.restore_ram(&self.ram)?;
            self.shadow_clean = true;
        }
        if self.shadow_clean {
            self.kernel_entered = false;
        }
        stats.pages = reverted?;
        let t2 = Instant::now();
        stats.copy = t2 - t1;
        let t3;
        match cp {
            Some((cp, _)) => {
                let d = &*cp.0.machine;
                // VM-wide state (PIT, clock, irqchips) before the vCPU's.
                self.vm.restore_state(&d.vm)?;
                self.devices
                    .reset_to(&d.serial)
                    .map_err(SandboxError::Serial)?;
                t3 = Instant::now();
                // The vCPU already has the template's CPUID (a pooled or fresh
                // VM of the same template): only per-fork state and the MSRs
                // that differ.
                self.vcpu.restore_fast(&d.vcpu, &d.vcpu.lapic)?;
                self.seq = d.seq;
                self.generation = d.generation;
                self.timer_unmasked = d.timer_unmasked;
                // Nothing of the template's machine state can be assumed any
                // more, and the next reset must re-create the slot again (it
                // reverts the layer's page tables behind KVM's back).
                self.used = true;
                self.kernel_entered = true;
                self.user_mode_only = false;
                self.captured = Some(cp.clone());
                // Applied with the slot re-created or never run (see `cycle`):
                // KVM's log is empty, so the image is exact.
                self.set_image(cp);
            }
            None => {
                if std::mem::take(&mut self.user_mode_only) {
                    // Irqchips, PIT, LAPIC, MSRs, debug registers and the UART
                    // only change when guest-kernel code runs: none ran.
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
                self.used = false;
                self.timer_unmasked = false;
            }
        }
        self.tenant_baseline = self.dirty_page_count();
        let t4 = Instant::now();
        stats.vm_state = t3 - t2;
        stats.vcpu_state = t4 - t3;
        Ok(stats)
    }

    /// Guest memory back to the template's pages, then `cp`'s layer over
    /// them. `slot_removed`: KVM's memory slot is deleted meanwhile (or holds
    /// no translations), so mappings may be replaced cheaply. Returns the pages copied or remapped.
    fn revert_memory(
        &mut self,
        t: &Template,
        slot_removed: bool,
        cp: Option<(&Checkpoint, bool)>,
    ) -> Result<usize, SandboxError> {
        let mut n = 0;
        // A layer's pages: map the template back over them (which also drops
        // whatever the guest wrote there).
        let (runs, held) = self.layered.take();
        for (first, count) in runs {
            if let Err(e) = self.ram.map_over(first, count, &t.memfd, first) {
                // The layer may still be mapped: keep holding it (the sandbox
                // is destroyed, and its RAM unmapped before the hold goes).
                self.layered.held = held;
                return Err(e.into());
            }
            clear_bits(&mut self.ever_dirty, first, count);
            n += count as usize;
        }
        // ORDER: only now, with none of its runs mapped here.
        drop(held);
        if slot_removed {
            // Long runs of written pages: mapping the template back is cheaper
            // than copying it and gives the private pages back to the host.
            // (Only with the slot removed: otherwise the copy keeps KVM's
            // mappings warm for the next exec.)
            let npages = (self.ram.size() / crate::vmm::memory::PAGE_SIZE) as u64;
            for (first, count) in super::layer::runs_of(&self.ever_dirty, 0, npages) {
                if count >= REMAP_RUN_PAGES {
                    self.ram.map_over(first, count, &t.memfd, first)?;
                    clear_bits(&mut self.ever_dirty, first, count);
                    n += count as usize;
                }
            }
        }
        n += self
            .ram
            .copy_pages_from(&t.source, BitIter::new(&self.ever_dirty));
        let Some((cp, map)) = cp else { return Ok(n) };
        // A delta mapped over its base splits the base's mappings: count
        // each delta run as two.
        let mappings =
            cp.0.base.runs().len() + 2 * cp.0.delta.as_ref().map_or(0, |d| d.runs().len());
        if map && LayerMappings::reserve(mappings) {
            // ORDER: recorded before mapping, so after a failure half-way the
            // next reset still maps the template back over every run (and the
            // budget is returned when the sandbox goes).
            self.layered.reserved = mappings;
            self.layered.runs = union_of_ranges(
                cp.layers()
                    .flat_map(|l| l.runs().iter().map(|r| (r.guest_page, r.pages)))
                    .collect(),
            );
            self.layered.held = Some(cp.clone());
            // ORDER: base first; the delta's pages win.
            for layer in cp.layers() {
                for r in layer.runs() {
                    self.ram
                        .map_over(r.guest_page, r.pages, layer.file(), r.file_page)?;
                }
            }
        } else {
            // Out of mapping budget (or asked to): copy the pages in instead.
            for layer in cp.layers() {
                for r in layer.runs() {
                    layer.copy_run_into(r, &self.ram)?;
                    // Host writes are not in KVM's dirty log: remember them so
                    // a later reset copies the template's pages back.
                    for p in r.guest_page..r.guest_page + r.pages {
                        set_bit(&mut self.ever_dirty, p);
                    }
                }
            }
        }
        Ok(n)
    }

    /// ORs KVM's dirty bitmap into `ever_dirty`.
    fn collect_dirty(&mut self) -> Result<(), SandboxError> {
        if !self.vm.dirty_logging() {
            return Ok(());
        }
        let bitmap = self.vm.take_dirty_log()?;
        for acc in [&mut self.ever_dirty, &mut self.since_image] {
            if acc.len() < bitmap.len() {
                acc.resize(bitmap.len(), 0);
            }
            for (acc, word) in acc.iter_mut().zip(&bitmap) {
                *acc |= word;
            }
        }
        Ok(())
    }

    /// Pages written since the last reset or apply: what the current tenant
    /// (a stateless exec, or a session since it began) is held to, whatever
    /// earlier tenants of this VM wrote (their pages stay in `ever_dirty`).
    fn tenant_dirty_pages(&self) -> usize {
        self.dirty_page_count().saturating_sub(self.tenant_baseline)
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
        self.exec_in(ExecMode::Stateless, t, req, limits, timer)
    }

    /// Runs one request in `mode`; see [`ExecMode`].
    pub fn exec_in(
        &mut self,
        mode: ExecMode,
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
        let first_run = !self.used;
        // Whatever happens below, the state is no longer the captured one,
        // and KVM builds translations as the vCPU runs.
        self.captured = None;
        self.shadow_clean = false;
        self.used = true;
        self.seq += 1;
        let mut fork_seed = [0u8; 64];
        fill_random(&mut fork_seed);
        let (flags, reseed) = match mode {
            ExecMode::Stateless => (c::REQ_FLAG_RESEED as u32, true),
            ExecMode::Session { reseed: true } => {
                ((c::REQ_FLAG_SESSION | c::REQ_FLAG_RESEED) as u32, true)
            }
            ExecMode::Session { reseed: false } => (c::REQ_FLAG_SESSION as u32, false),
        };
        if reseed || self.generation == 0 {
            // A new generation makes the guest kernel reseed its CRNG the
            // next time anything asks it for randomness.
            let mut gen = [0u8; 8];
            fill_random(&mut gen);
            self.generation = u64::from_le_bytes(gen) | 1;
        }
        let mreq = MailboxRequest {
            seq: self.seq,
            language: req.language.contract_id(),
            timeout_ms: req.timeout.as_millis().min(u32::MAX as u128) as u32,
            code: req.code.as_bytes(),
            stdout_cap: limits.stdout_cap,
            stderr_cap: limits.stderr_cap,
            fork_generation: self.generation,
            fork_seed,
            flags,
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
        let mut outcome = self.run_guest(t, req, limits, timer, started, &before);
        let mut interrupted = false;
        if outcome == Err(ExecFailure::Timeout) && matches!(mode, ExecMode::Session { .. }) {
            // A session outlives a timed-out run when the agent can be
            // interrupted (KeyboardInterrupt) and answers within the grace.
            outcome = self.interrupt(t, limits, timer);
            interrupted = outcome.is_ok();
        }
        let _ = timer.disarm();
        if t.caps.counters_see_kernel_entry {
            let entered = self.left_user_mode(&before);
            // Only a clean DONE counts: anything else poisons the sandbox anyway.
            // (An exec that had its timer given back changed the LAPIC.)
            let user_only = !entered && !self.timer_unmasked && outcome.is_ok();
            if first_run {
                self.kernel_entered = entered;
                self.user_mode_only = user_only;
            } else {
                // Several runs since the last reset (a session): any one of
                // them decides.
                self.kernel_entered |= entered;
                self.user_mode_only &= user_only;
            }
            self.user_only_since_image &= user_only;
        } else {
            // Hardware KVM: a syscall or a fault the guest handles itself
            // causes no exit, so nothing proves the exec stayed in user mode.
            // The guest kernel may have rewritten page tables (a tenant is
            // root with /dev/mem): the reset must cycle the slot, which also
            // makes KVM flush the guest's TLB (HostCaps, SECURITY.md).
            self.kernel_entered = true;
            self.user_mode_only = false;
            self.user_only_since_image = false;
        }
        result.exec_time = started.elapsed();
        if outcome.is_ok() && matches!(mode, ExecMode::Session { .. }) && self.vm.dirty_logging() {
            // A session's memory is what it keeps: account for this run's
            // pages now (short runs finish before any watchdog check) and
            // hold it to the limit.
            match self.collect_dirty() {
                Ok(()) if self.tenant_dirty_pages() > limits.max_dirty_pages => {
                    outcome = Err(ExecFailure::MemoryLimit)
                }
                Ok(()) => {}
                Err(e) => outcome = Err(ExecFailure::Internal(e.to_string())),
            }
        }
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
                    result.result = resp.result;
                    result.result_truncated = resp.result_truncated;
                    match resp.status as u64 {
                        c::STATUS_OK if interrupted => {
                            result.exit_code = resp.exit_code;
                            result.failure = Some(ExecFailure::Timeout);
                        }
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

    /// Interrupts a timed-out session run the way a signal would, without
    /// the guest kernel: once the vCPU is stopped at CPL 3, push its RIP
    /// below the red zone of the user stack and jump to the agent's
    /// interrupt entry (guest/contract.h), then wait for DONE. A vCPU that is
    /// in the guest kernel (a syscall, a fault, idle) is run a little longer,
    /// with its timer, until it is back in user mode. Err(Timeout) when the
    /// agent has no entry or does not answer within the grace: the session
    /// is lost.
    fn interrupt(
        &mut self,
        t: &Template,
        limits: &Limits,
        timer: &ThreadTimer,
    ) -> Result<(), ExecFailure> {
        let outcome = self.try_interrupt(t, limits, timer);
        if let Err(why) = &outcome {
            self.interrupt_failure = Some(why.clone());
        }
        outcome.map_err(|_| ExecFailure::Timeout)
    }

    /// Why the last interrupt of a timed-out session run failed.
    pub fn interrupt_failure(&self) -> Option<&str> {
        self.interrupt_failure.as_deref()
    }

    fn try_interrupt(
        &mut self,
        t: &Template,
        limits: &Limits,
        timer: &ThreadTimer,
    ) -> Result<(), String> {
        let entry = mailbox::read_interrupt_entry(&self.ram);
        if entry == 0 {
            return Err("this template's agent has no interrupt entry".into());
        }
        let internal = |e: &dyn std::fmt::Display| format!("host error while interrupting: {e}");
        let grace_end = Instant::now() + INTERRUPT_GRACE;
        loop {
            let sregs = self.vcpu.fd().get_sregs().map_err(|e| internal(&e))?;
            if sregs.cs.dpl == 3 {
                break;
            }
            if Instant::now() >= grace_end {
                return Err("the guest did not return to user mode within the grace period".into());
            }
            if !self.timer_unmasked {
                // The kernel may be waiting for a tick (a sleep) to go back.
                self.vcpu
                    .resume_lapic_timer(&t.state.vcpu.lapic)
                    .map_err(|e| internal(&e))?;
                self.timer_unmasked = true;
            }
            timer.arm(CHECK_INTERVAL).map_err(|e| internal(&e))?;
            match self
                .vcpu
                .run(&mut self.devices, &self.ram)
                .map_err(|e| internal(&e))?
            {
                RunOutcome::Interrupted => {}
                // The run finished on its own after all.
                RunOutcome::Doorbell(v) if v as u64 == c::DOORBELL_DONE => return Ok(()),
                other => {
                    return Err(format!(
                        "the guest stopped while being interrupted: {other:?}"
                    ))
                }
            }
        }
        let mut regs = self.vcpu.fd().get_regs().map_err(|e| internal(&e))?;
        let slot = regs.rsp.wrapping_sub(c::INTERRUPT_RED_ZONE + 8);
        self.write_guest_virtual(slot, &regs.rip.to_le_bytes())
            .ok_or_else(|| format!("the user stack below {:#x} is not mapped", regs.rsp))?;
        regs.rsp = slot;
        regs.rip = entry;
        self.vcpu.fd().set_regs(&regs).map_err(|e| internal(&e))?;
        let req = ExecRequest {
            code: String::new(),
            language: crate::api::Language::Python,
            timeout: INTERRUPT_GRACE,
            cancel: crate::api::CancelToken::new(),
        };
        let restarted = Instant::now();
        self.run_guest(t, &req, limits, timer, restarted, &None)
            .map_err(|f| match f {
                ExecFailure::Timeout => {
                    "the agent did not answer the interrupt within the grace period".to_string()
                }
                other => format!("the guest failed after the interrupt: {other:?}"),
            })
    }

    /// Writes `data` at a guest virtual address of the current address
    /// space, byte by byte through KVM's translation; None if any byte is
    /// not mapped.
    fn write_guest_virtual(&mut self, gva: u64, data: &[u8]) -> Option<()> {
        for (i, byte) in data.iter().enumerate() {
            let t = self.vcpu.fd().translate_gva(gva + i as u64).ok()?;
            // KVM_TRANSLATE walks with supervisor rights and always reports
            // writeable=1, usermode=0 on x86: only `valid` means anything.
            // The address is the user stack pointer of a CPL 3 vCPU; what
            // the host writes there can only affect that guest.
            if t.valid == 0 {
                return None;
            }
            self.ram
                .write(t.physical_address, std::slice::from_ref(byte))
                .ok()?;
            self.host_pages
                .push(t.physical_address / crate::vmm::memory::PAGE_SIZE as u64);
        }
        Some(())
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
                        if self.tenant_dirty_pages() > limits.max_dirty_pages {
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

/// Clears bits `first..first + n` (those past the bitmap's end are clear).
fn clear_bits(bitmap: &mut [u64], first: u64, n: u64) {
    for bit in first..first + n {
        if let Some(w) = bitmap.get_mut((bit / 64) as usize) {
            *w &= !(1 << (bit % 64));
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
    fn union_of_ranges_merges_overlapping_and_adjacent_ranges() {
        assert_eq!(
            union_of_ranges(vec![(10, 5), (0, 2), (12, 10), (22, 1), (30, 1)]),
            vec![(0, 2), (10, 13), (30, 1)]
        );
        assert_eq!(union_of_ranges(vec![(5, 10), (6, 2)]), vec![(5, 10)]);
        assert!(union_of_ranges(Vec::new()).is_empty());
    }

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
