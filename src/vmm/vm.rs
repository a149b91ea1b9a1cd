//! A KVM VM: its fd, its one memory slot, the in-kernel irqchip and PIT, and
//! saving/restoring VM-wide state.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};

use super::memory::GuestRam;

/// Where KVM puts the real-mode TSS (3 pages) — below the 4 GiB boundary,
/// away from RAM and from the doorbell.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqChip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetMemoryRegion(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    GetDirtyLog(kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed: {0}")]
    ClearDirtyLog(std::io::Error),
    #[error("KVM_IRQFD failed: {0}")]
    RegisterIrqFd(kvm_ioctls::Error),
    #[error("KVM_GET_IRQCHIP failed: {0}")]
    GetIrqChip(kvm_ioctls::Error),
    #[error("KVM_SET_IRQCHIP failed: {0}")]
    SetIrqChip(kvm_ioctls::Error),
    #[error("KVM_GET_PIT2 failed: {0}")]
    GetPit(kvm_ioctls::Error),
    #[error("KVM_SET_PIT2 failed: {0}")]
    SetPit(kvm_ioctls::Error),
    #[error("KVM_GET_CLOCK failed: {0}")]
    GetClock(kvm_ioctls::Error),
    #[error("KVM_SET_CLOCK failed: {0}")]
    SetClock(kvm_ioctls::Error),
    #[error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) failed: {0}")]
    EnableManualDirtyProtect(kvm_ioctls::Error),
    #[error("KVM_ENABLE_CAP(PMU_CAPABILITY, DISABLE) failed: {0}")]
    DisablePmu(kvm_ioctls::Error),
    #[error("KVM_ENABLE_CAP(X86_USER_SPACE_MSR) failed: {0}")]
    EnableUserSpaceMsr(kvm_ioctls::Error),
    #[error("KVM_X86_SET_MSR_FILTER failed: {0}")]
    SetMsrFilter(kvm_ioctls::Error),
    #[error("eventfd for the serial IRQ failed: {0}")]
    EventFd(std::io::Error),
}

/// VM-wide device state that lives in KVM (irqchips, PIT, kvmclock).
#[derive(Clone)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

pub struct Vm {
    fd: VmFd,
    ram_size: u64,
    dirty_logging: bool,
    /// The dirty log accumulates until cleared ([`Vm::enable_cumulative_dirty_log`]).
    cumulative_log: bool,
}

// KVM_CLEAR_DIRTY_LOG (linux/kvm.h): not wrapped by kvm-ioctls.
vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

impl Vm {
    /// Creates a VM with the in-kernel irqchip (PIC + IOAPIC + LAPIC) and PIT.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmError::SetTssAddress)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Vm {
            fd,
            ram_size: 0,
            dirty_logging: false,
            cumulative_log: false,
        })
    }

    /// Turns KVM's virtual PMU off for this VM: performance-counter MSRs then
    /// #GP in the guest and its kernel falls back to software events. Must
    /// run before the vCPU is created (KVM refuses it afterwards). A KVM
    /// without the capability (before 5.18, or `enable_pmu=0`, where there
    /// is no vPMU anyway) is not an error.
    pub fn disable_pmu(&self) -> Result<(), VmError> {
        let cap = kvm_bindings::KVM_CAP_PMU_CAPABILITY;
        let supported = self.fd.check_extension_raw(cap as libc::c_ulong);
        if supported & kvm_bindings::KVM_PMU_CAP_DISABLE as i32 == 0 {
            return Ok(());
        }
        let mut enable = kvm_bindings::kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = kvm_bindings::KVM_PMU_CAP_DISABLE as u64;
        self.fd.enable_cap(&enable).map_err(VmError::DisablePmu)
    }

    /// Installs the default-deny MSR filter (`msr_filter::ALLOWED`) and has
    /// KVM hand every denied access to the VMM (`Vcpu::run` injects #GP and
    /// counts it) instead of injecting #GP silently. Before the vCPU exists.
    pub fn enable_msr_filter(&self) -> Result<(), VmError> {
        let mut enable = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        enable.args[0] = kvm_bindings::KVM_MSR_EXIT_REASON_FILTER as u64;
        self.fd
            .enable_cap(&enable)
            .map_err(VmError::EnableUserSpaceMsr)?;
        super::msr_filter::install(&self.fd).map_err(VmError::SetMsrFilter)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Asks KVM not to write-protect pages again when the dirty log is read
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 without INITIALLY_SET). The log then
    /// accumulates every page the guest ever wrote, and a page costs one
    /// write-protection exit the first time only — not on every exec. Must be
    /// called before the memory slot is created. Returns false where the host
    /// lacks the capability.
    pub fn enable_cumulative_dirty_log(&mut self) -> Result<bool, VmError> {
        let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        if self.fd.check_extension_raw(cap as libc::c_ulong)
            & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as i32
            == 0
        {
            return Ok(false);
        }
        let mut enable = kvm_bindings::kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64;
        self.fd
            .enable_cap(&enable)
            .map_err(VmError::EnableManualDirtyProtect)?;
        self.cumulative_log = true;
        Ok(true)
    }

    /// Starts a new round of the cumulative dirty log for the pages set in
    /// `pages` (KVM_CLEAR_DIRTY_LOG): their bits are cleared and they are
    /// write-protected again, so the guest's next write to each is logged
    /// (one write-protection exit). Bits KVM has not set are ignored, so a
    /// superset of the log is fine. Without the cumulative log every
    /// [`Vm::take_dirty_log`] starts a new round already: nothing to do.
    pub fn rearm_dirty_log(&self, pages: &[u64]) -> Result<(), VmError> {
        if !self.cumulative_log || !self.dirty_logging {
            return Ok(());
        }
        let npages = self.ram_size / super::memory::PAGE_SIZE as u64;
        let words = npages.div_ceil(64) as usize;
        let mut bitmap = vec![0u64; words];
        let n = words.min(pages.len());
        bitmap[..n].copy_from_slice(&pages[..n]);
        let clear = kvm_bindings::kvm_clear_dirty_log {
            slot: 0,
            // The whole slot: first_page 0, and a count that ends at the
            // slot's end (KVM wants multiples of 64 otherwise).
            num_pages: npages as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: KVM reads `num_pages` bits from `dirty_bitmap`, which holds
        // `words * 64 >= num_pages` bits and outlives the call; the struct
        // matches the kernel's `kvm_clear_dirty_log`.
        let rc =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(VmError::ClearDirtyLog(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Maps `ram` as slot 0 at guest address 0. With `log_dirty`, KVM records
    /// every page the guest writes (read back with [`Vm::take_dirty_log`]).
    pub fn set_ram(&mut self, ram: &GuestRam, log_dirty: bool) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: ram.size() as u64,
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: the mapping outlives the slot: callers keep `ram` alive as long
        // as this VM (the engine stores both in one sandbox struct).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::SetMemoryRegion)?;
        self.ram_size = ram.size() as u64;
        self.dirty_logging = log_dirty;
        Ok(())
    }

    /// Deletes guest RAM's memory slot; KVM zaps all of a deleted slot's
    /// mappings, so with [`Vm::restore_ram`] this drops every shadow page
    /// table KVM built for guest RAM. Needed after the host rewrote guest
    /// page-table pages behind KVM's back (copy-back reset after an exec that
    /// entered the guest kernel, a layer mapped in): on shadow-paging hosts
    /// (PVM) KVM would otherwise keep using stale translations. While the slot
    /// is gone, remapping parts of the host mapping costs KVM's MMU notifier
    /// nothing (with the slot present it walks KVM's mappings for every
    /// range). The vCPU must not run until [`Vm::restore_ram`].
    pub fn remove_ram(&mut self, ram: &GuestRam) -> Result<(), VmError> {
        let delete = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: ram.host_addr(),
        };
        // SAFETY: deleting slot 0; the mapping stays alive and is re-added by
        // `restore_ram` before the vCPU runs again.
        unsafe { self.fd.set_user_memory_region(delete) }.map_err(VmError::SetMemoryRegion)
    }

    /// Re-creates the slot [`Vm::remove_ram`] deleted; the dirty log restarts
    /// empty.
    pub fn restore_ram(&mut self, ram: &GuestRam) -> Result<(), VmError> {
        let log = self.dirty_logging;
        self.set_ram(ram, log)
    }

    /// Returns KVM's bitmap of written pages: those written since the last
    /// call, or — with [`Vm::enable_cumulative_dirty_log`] — every page ever
    /// written.
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(0, self.ram_size as usize)
            .map_err(VmError::GetDirtyLog)
    }

    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Wires an eventfd to a GSI (used for the serial IRQ).
    pub fn register_irqfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        gsi: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(VmError::RegisterIrqFd)
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(VmError::GetIrqChip)?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(VmError::GetPit)?,
            clock: self.fd.get_clock().map_err(VmError::GetClock)?,
        })
    }

    /// Restores VM-wide state. Order (Firecracker's): PIT, then kvmclock, then
    /// the three irqchips. Done before any vCPU state is restored.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(VmError::SetPit)?;
        // Only the clock value is restored; flags from GET_CLOCK (e.g.
        // KVM_CLOCK_TSC_STABLE) are refused by SET_CLOCK.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd.set_clock(&clock).map_err(VmError::SetClock)?;
        self.fd
            .set_irqchip(&state.pic_master)
            .map_err(VmError::SetIrqChip)?;
        self.fd
            .set_irqchip(&state.pic_slave)
            .map_err(VmError::SetIrqChip)?;
        self.fd
            .set_irqchip(&state.ioapic)
            .map_err(VmError::SetIrqChip)?;
        Ok(())
    }
}
