//! The one vCPU of a sandbox: running it, decoding exits, and saving or
//! restoring its architectural state.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd};

use super::devices::{LegacyDevices, PortAction};
use super::layout::DOORBELL_GPA;
use super::memory::GuestRam;
use crate::contract;

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Offset of the LVT Timer register in the LAPIC register page.
const APIC_LVT_TIMER: usize = 0x320;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_GET_CPUID2 failed: {0}")]
    GetCpuid(kvm_ioctls::Error),
    #[error("KVM_GET_MP_STATE failed: {0}")]
    GetMpState(kvm_ioctls::Error),
    #[error("KVM_SET_MP_STATE failed: {0}")]
    SetMpState(kvm_ioctls::Error),
    #[error("KVM_GET_REGS failed: {0}")]
    GetRegs(kvm_ioctls::Error),
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_GET_XSAVE failed: {0}")]
    GetXsave(kvm_ioctls::Error),
    #[error("KVM_SET_XSAVE failed: {0}")]
    SetXsave(kvm_ioctls::Error),
    #[error("KVM_SET_XCRS failed: {0}")]
    SetXcrs(kvm_ioctls::Error),
    #[error("KVM_GET_DEBUGREGS failed: {0}")]
    GetDebugRegs(kvm_ioctls::Error),
    #[error("KVM_SET_DEBUGREGS failed: {0}")]
    SetDebugRegs(kvm_ioctls::Error),
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    GetMsrIndexList(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS stopped at MSR {0:#x}")]
    SetMsrsShort(u32),
    #[error("KVM_GET_VCPU_EVENTS failed: {0}")]
    GetVcpuEvents(kvm_ioctls::Error),
    #[error("KVM_SET_VCPU_EVENTS failed: {0}")]
    SetVcpuEvents(kvm_ioctls::Error),
    #[error("building an MSR list failed: {0}")]
    MsrList(String),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
}

/// Architectural state of a vCPU, enough to resume it elsewhere.
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// The LAPIC with its timer interrupt masked: a fork restored with it runs
    /// short execs without timer ticks (each costs ~5 ms of emulated kernel on
    /// PVM). The engine unmasks it only when an exec runs long.
    pub fn lapic_timer_masked(&self) -> kvm_lapic_state {
        let mut lapic = self.lapic;
        let reg = lapic_reg(&lapic, APIC_LVT_TIMER) | APIC_LVT_MASKED;
        set_lapic_reg(&mut lapic, APIC_LVT_TIMER, reg);
        lapic
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b = &lapic.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *byte as _;
    }
}

/// Why `Vcpu::run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The agent stored this value to the doorbell (from guest user mode).
    Doorbell(u32),
    /// The run was interrupted by a kick (deadline, cancellation).
    Interrupted,
    /// The guest is gone: reset request, triple fault, emulation failure…
    Crashed(String),
}

pub struct Vcpu {
    fd: VcpuFd,
    /// KVM_CAP_SYNC_REGS covers regs, sregs and events: a pooled reset hands
    /// them over in kvm_run for the next KVM_RUN instead of three ioctls
    /// (each costs ~10 µs on PVM hosts).
    sync_regs: bool,
    /// Guest MSR accesses the filter denied (#GP injected), since creation.
    msr_denied: u64,
}

/// Denied MSR accesses logged per vCPU; later ones are only counted (a
/// tenant must not be able to flood the host's log).
const MSR_DENIED_LOGGED: u64 = 16;

impl Vcpu {
    pub fn new(vm: &super::vm::Vm, id: u64) -> Result<Vcpu, VcpuError> {
        let fd = vm.fd().create_vcpu(id).map_err(VcpuError::Create)?;
        let all = (kvm_bindings::KVM_SYNC_X86_REGS
            | kvm_bindings::KVM_SYNC_X86_SREGS
            | kvm_bindings::KVM_SYNC_X86_EVENTS) as i32;
        let sync_regs = vm
            .fd()
            .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS as libc::c_ulong)
            & all
            == all;
        Ok(Vcpu {
            fd,
            sync_regs,
            msr_denied: 0,
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Guest MSR accesses the MSR filter denied on this vCPU.
    pub fn msr_denied(&self) -> u64 {
        self.msr_denied
    }

    /// A guest MSR access the filter denied (`write` with `data`): #GP, or
    /// in learning mode done host-side. Returns the error flag for kvm_run
    /// and the value read.
    fn denied_msr(&mut self, index: u32, write: Option<u64>) -> (u8, u64) {
        let op = if write.is_some() { "wrmsr" } else { "rdmsr" };
        if super::msr_filter::learning() {
            let mut one = match Msrs::from_entries(&[kvm_msr_entry {
                index,
                data: write.unwrap_or(0),
                ..Default::default()
            }]) {
                Ok(m) => m,
                Err(_) => return (1, 0),
            };
            let done = match write {
                Some(_) => self.fd.set_msrs(&one),
                None => self.fd.get_msrs(&mut one),
            };
            let ok = matches!(done, Ok(1));
            let value = one.as_slice()[0].data;
            eprintln!(
                "kvmfork: MSR filter (learn): guest {op} {index:#x} = {value:#x}, {}",
                if ok {
                    "done host-side"
                } else {
                    "refused by KVM too"
                }
            );
            return (u8::from(!ok), value);
        }
        self.msr_denied += 1;
        if self.msr_denied <= MSR_DENIED_LOGGED {
            eprintln!(
                "kvmfork: MSR filter: guest {op} {index:#x} denied (#GP injected; {} on this vCPU{})",
                self.msr_denied,
                if self.msr_denied == MSR_DENIED_LOGGED {
                    ", further ones are only counted"
                } else {
                    ""
                }
            );
        }
        (1, 0)
    }

    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(cpuid).map_err(VcpuError::SetCpuid)
    }

    /// Registers this vCPU's kvm_run with the kick handler of the calling thread.
    pub fn bind_kick_to_current_thread(&mut self) {
        super::kick::set_current_run(self.fd.get_kvm_run() as *mut _);
    }

    /// Runs until the doorbell rings, the guest dies, or a kick arrives.
    /// Port and MMIO exits in between are served by `devices`.
    pub fn run(
        &mut self,
        devices: &mut LegacyDevices,
        ram: &GuestRam,
    ) -> Result<RunOutcome, VcpuError> {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Ok(RunOutcome::Interrupted);
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(VcpuError::Run(e)),
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if devices.pio_write(port, data) == PortAction::Reset {
                        return Ok(RunOutcome::Crashed(
                            "guest requested a reset (reboot, or kernel panic with panic=-1)"
                                .into(),
                        ));
                    }
                }
                VcpuExit::IoIn(port, data) => devices.pio_read(port, data),
                VcpuExit::MmioWrite(addr, data) => {
                    if (DOORBELL_GPA..DOORBELL_GPA + contract::DOORBELL_SIZE).contains(&addr) {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        return Ok(RunOutcome::Doorbell(u32::from_le_bytes(v)));
                    }
                    // Writes to nothing are dropped, like on a real bus.
                }
                VcpuExit::MmioRead(_, data) => data.fill(0xff),
                // Only the filter's denials exit (KVM_MSR_EXIT_REASON_FILTER).
                VcpuExit::X86Rdmsr(exit) => {
                    let index = exit.index;
                    let (error, value) = self.denied_msr(index, None);
                    // SAFETY: the exit is KVM_EXIT_X86_RDMSR, so `msr` is the
                    // active member of kvm_run's exit union.
                    unsafe {
                        let msr = &mut self.fd.get_kvm_run().__bindgen_anon_1.msr;
                        msr.error = error;
                        msr.data = value;
                    }
                }
                VcpuExit::X86Wrmsr(exit) => {
                    let (index, data) = (exit.index, exit.data);
                    let (error, _) = self.denied_msr(index, Some(data));
                    // (The exit's own `error` reference borrows the vCPU fd;
                    // kvm_run is written again instead. Storing a field of
                    // the exit union needs no unsafe: the exit is
                    // KVM_EXIT_X86_WRMSR, so `msr` is the active member.)
                    self.fd.get_kvm_run().__bindgen_anon_1.msr.error = error;
                }
                VcpuExit::Hlt => {
                    return Ok(RunOutcome::Crashed(
                        "guest halted with interrupts off".into(),
                    ))
                }
                VcpuExit::Shutdown => {
                    return Ok(RunOutcome::Crashed("guest shut down (triple fault)".into()))
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return Ok(RunOutcome::Crashed(format!(
                        "guest system event {kind} (shutdown/reset)"
                    )))
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Ok(RunOutcome::Crashed(format!(
                        "KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"
                    )))
                }
                VcpuExit::InternalError => {
                    return Ok(RunOutcome::Crashed(self.describe_internal_error(ram)))
                }
                other => {
                    return Ok(RunOutcome::Crashed(format!(
                        "unexpected vCPU exit {other:?}"
                    )))
                }
            }
        }
    }

    /// Completes a pending MMIO/PIO access without running guest code, as the
    /// KVM API asks before vCPU state is saved at such an exit.
    pub fn complete_pending_io(&mut self) -> Result<(), VcpuError> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(libc::EINTR) | Ok(()) => Ok(()),
            Err(errno) => Err(VcpuError::Run(kvm_ioctls::Error::new(errno))),
        }
    }

    /// Explains an emulation failure: RIP, the instruction bytes and a hint.
    fn describe_internal_error(&mut self, ram: &GuestRam) -> String {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..ndata]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let cpl = self.fd.get_sregs().map(|s| s.cs.dpl).unwrap_or(0);
        let mut bytes = String::new();
        if let Ok(t) = self.fd.translate_gva(rip) {
            if t.valid != 0 {
                let mut buf = [0u8; 16];
                if ram.read(t.physical_address, &mut buf).is_ok() {
                    bytes = buf
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                }
            }
        }
        let hint = if internal.suberror == 1 {
            "emulation failure: the hypervisor could not emulate this guest-kernel instruction. \
             Find RIP in the kernel's System.map, then hide the CPU feature that patched it in \
             (clearcpuid= in guest/kernel/cmdline.pvm) or patch the call site (guest/kernel/patches)"
        } else {
            "KVM internal error"
        };
        format!(
            "KVM internal error suberror {} at RIP {rip:#x} (CPL {cpl}), instruction bytes [{bytes}], data [{}]: {hint}",
            internal.suberror,
            data.join(", ")
        )
    }

    /// Saves state in Firecracker's order: MP state first (it runs
    /// kvm_apic_accept_events), then regs, sregs, xsave, xcrs, debugregs,
    /// LAPIC, CPUID, MSRs, and vCPU events last.
    pub fn save_state(&self, kvm: &Kvm) -> Result<VcpuState, VcpuError> {
        let mp_state = self.fd.get_mp_state().map_err(VcpuError::GetMpState)?;
        let regs = self.fd.get_regs().map_err(VcpuError::GetRegs)?;
        let sregs = self.fd.get_sregs().map_err(VcpuError::GetSregs)?;
        let xsave = self.fd.get_xsave().map_err(VcpuError::GetXsave)?;
        // Without XSAVE (hidden on PVM) there may be no XCRs to save.
        let xcrs = self.fd.get_xcrs().ok();
        let debugregs = self.fd.get_debug_regs().map_err(VcpuError::GetDebugRegs)?;
        let lapic = self.fd.get_lapic().map_err(VcpuError::GetLapic)?;
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VcpuError::GetCpuid)?
            .as_slice()
            .to_vec();
        let msrs = self.save_msrs(kvm)?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(VcpuError::GetVcpuEvents)?;
        Ok(VcpuState {
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
        })
    }

    /// Every MSR KVM lists that this vCPU can actually read (read one by one:
    /// some listed MSRs are refused by some hosts), TSC deadline last.
    fn save_msrs(&self, kvm: &Kvm) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(VcpuError::GetMsrIndexList)?;
        let mut out = Vec::new();
        for &index in list.as_slice() {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
            if let Ok(1) = self.fd.get_msrs(&mut one) {
                out.push(one.as_slice()[0]);
            }
        }
        // TSC deadline must be written after the TSC and the LAPIC, or it is lost.
        out.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
        Ok(out)
    }

    /// Restores state in Firecracker's order, each step's reason beside it.
    /// `lapic` lets the fork engine pass a variant (timer masked).
    pub fn restore_state(
        &mut self,
        state: &VcpuState,
        lapic: &kvm_lapic_state,
    ) -> Result<(), VcpuError> {
        if self.sync_regs {
            // Registers a fast restore staged in kvm_run would be applied at
            // the next KVM_RUN, over the ones set below.
            self.fd.clear_sync_dirty_reg(SyncReg::Register);
            self.fd.clear_sync_dirty_reg(SyncReg::SystemRegister);
            self.fd.clear_sync_dirty_reg(SyncReg::VcpuEvents);
        }
        // CPUID first: later steps (xsave size, MSR validity) depend on it.
        let cpuid =
            CpuId::from_entries(&state.cpuid).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)?;
        // MP state before regs/events: it may reset pending events.
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(VcpuError::SetMpState)?;
        // Regs clear pending exceptions, so they go before vcpu events.
        self.fd.set_regs(&state.regs).map_err(VcpuError::SetRegs)?;
        // Sregs restore the APIC base; the LAPIC comes after them.
        self.fd
            .set_sregs(&state.sregs)
            .map_err(VcpuError::SetSregs)?;
        self.restore_fpu_debug_lapic(state, lapic)?;
        // All MSRs, TSC deadline last (it needs the TSC and the LAPIC first).
        self.restore_msrs(&state.msrs)?;
        // Events last: everything above may have cleared pending ones.
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(VcpuError::SetVcpuEvents)?;
        Ok(())
    }

    /// The per-fork part of a restore (CPUID never changes for a pooled vCPU,
    /// so the pool sets it once at creation). Same order as `restore_state`;
    /// with sync regs, regs/sregs/events travel in kvm_run and KVM applies
    /// them (in that order) at the next KVM_RUN — after the LAPIC and MSRs,
    /// which is fine here because a pooled vCPU returns to the very state it
    /// was created with (same APIC base, same CR3/EFER: no MMU reset).
    pub fn restore_fast(
        &mut self,
        state: &VcpuState,
        lapic: &kvm_lapic_state,
    ) -> Result<(), VcpuError> {
        // MP state before regs/events: it may reset pending events.
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(VcpuError::SetMpState)?;
        if self.sync_regs {
            self.stage_sync_regs(state);
        } else {
            // Regs clear pending exceptions, so they go before vcpu events.
            self.fd.set_regs(&state.regs).map_err(VcpuError::SetRegs)?;
            // Sregs restore the APIC base; the LAPIC comes after them.
            self.fd
                .set_sregs(&state.sregs)
                .map_err(VcpuError::SetSregs)?;
        }
        self.restore_fpu_debug_lapic(state, lapic)?;
        self.restore_changed_msrs(&state.msrs)?;
        if !self.sync_regs {
            // Events last: everything above may have cleared pending ones.
            self.fd
                .set_vcpu_events(&state.events)
                .map_err(VcpuError::SetVcpuEvents)?;
        }
        Ok(())
    }

    /// Puts regs, sregs and events into kvm_run's sync area; KVM applies them
    /// (in that order) at the next KVM_RUN. Only when `self.sync_regs`.
    fn stage_sync_regs(&mut self, state: &VcpuState) {
        let sync = self.fd.sync_regs_mut();
        sync.regs = state.regs;
        sync.sregs = state.sregs;
        sync.events = state.events;
        self.fd.set_sync_dirty_reg(SyncReg::Register);
        self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        self.fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
    }

    /// Restores only what guest user mode can change — general and segment
    /// registers, pending events and the FPU/SSE state — for a pooled vCPU
    /// whose last run provably never entered the guest kernel. Everything
    /// else (LAPIC, MSRs, debug registers, MP state) is still the template's.
    pub fn restore_user_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if self.sync_regs {
            self.stage_sync_regs(state);
        } else {
            self.fd.set_regs(&state.regs).map_err(VcpuError::SetRegs)?;
            self.fd
                .set_sregs(&state.sregs)
                .map_err(VcpuError::SetSregs)?;
            self.fd
                .set_vcpu_events(&state.events)
                .map_err(VcpuError::SetVcpuEvents)?;
        }
        // SAFETY: the xsave buffer came from KVM_GET_XSAVE on the same host kind.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(VcpuError::SetXsave)
    }

    /// The middle of both restore paths: FPU/SSE state, XCRs, debug registers,
    /// then the LAPIC (after sregs, which carry the APIC base, and before the
    /// MSRs, or the TSC deadline is lost).
    fn restore_fpu_debug_lapic(
        &self,
        state: &VcpuState,
        lapic: &kvm_lapic_state,
    ) -> Result<(), VcpuError> {
        // SAFETY: the xsave buffer came from KVM_GET_XSAVE on the same host kind
        // (compatibility is checked when a snapshot is loaded).
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(VcpuError::SetXsave)?;
        if let Some(xcrs) = &state.xcrs {
            self.fd.set_xcrs(xcrs).map_err(VcpuError::SetXcrs)?;
        }
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(VcpuError::SetDebugRegs)?;
        self.fd.set_lapic(lapic).map_err(VcpuError::SetLapic)
    }

    /// Writes back the MSRs that differ from `msrs`: one KVM_GET_MSRS of all
    /// of them, then one KVM_SET_MSRS of the changed ones, in `msrs` order so
    /// the TSC deadline stays last. Rewriting unchanged MSRs is not free: some
    /// (MTRRs, PAT) make KVM drop its shadow page tables, and the next exec
    /// then faults every page back in (~3 ms instead of ~0.2 ms measured for
    /// `print(1+1)` on PVM). The legacy kvmclock aliases (0x11/0x12) are
    /// skipped when the current ones are saved: writing both registers
    /// kvmclock twice.
    fn restore_changed_msrs(&self, msrs: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        let has_new_kvmclock = msrs.iter().any(|m| m.index == MSR_KVM_SYSTEM_TIME_NEW);
        let wanted: Vec<kvm_msr_entry> = msrs
            .iter()
            .filter(|m| {
                !(has_new_kvmclock
                    && (m.index == MSR_KVM_WALL_CLOCK || m.index == MSR_KVM_SYSTEM_TIME))
            })
            .copied()
            .collect();
        let probe: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                ..Default::default()
            })
            .collect();
        let mut current =
            Msrs::from_entries(&probe).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
        if self.fd.get_msrs(&mut current).unwrap_or(0) != wanted.len() {
            return self.restore_msrs(&wanted);
        }
        let changed: Vec<kvm_msr_entry> = wanted
            .iter()
            .zip(current.as_slice())
            .filter(|(want, now)| want.data != now.data)
            .map(|(want, _)| *want)
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        self.restore_msrs(&changed)
    }

    fn restore_msrs(&self, msrs: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        for chunk in msrs.chunks(256) {
            let list =
                Msrs::from_entries(chunk).map_err(|e| VcpuError::MsrList(format!("{e:?}")))?;
            let n = self.fd.set_msrs(&list).map_err(VcpuError::SetMsrs)?;
            if n != chunk.len() {
                return Err(VcpuError::SetMsrsShort(chunk[n].index));
            }
        }
        Ok(())
    }

    /// Gives a fork that was restored with its timer masked the template's
    /// LVT timer back, and makes the timer fire at once: an expiry missed
    /// while masked is not replayed by the LAPIC, and a guest kernel waiting
    /// for it would otherwise never tick again.
    pub fn resume_lapic_timer(&self, template_lapic: &kvm_lapic_state) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(VcpuError::GetLapic)?;
        let lvt = lapic_reg(template_lapic, APIC_LVT_TIMER);
        set_lapic_reg(&mut lapic, APIC_LVT_TIMER, lvt);
        let tsc_deadline_mode = (lvt >> 17) & 3 == 2;
        if !tsc_deadline_mode {
            set_lapic_reg(&mut lapic, APIC_TMICT, 1);
            set_lapic_reg(&mut lapic, APIC_TMCCT, 1);
        }
        self.fd.set_lapic(&lapic).map_err(VcpuError::SetLapic)?;
        if tsc_deadline_mode {
            // Any deadline in the past fires immediately.
            self.restore_msrs(&[kvm_msr_entry {
                index: MSR_IA32_TSC_DEADLINE,
                data: 1,
                ..Default::default()
            }])?;
        }
        Ok(())
    }
}

/// Default MSR maximum for `KVM_GET_CPUID2` lives in kvm-bindings; re-export for clarity.
pub use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
