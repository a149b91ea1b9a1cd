//! The guest's MSR allow-list on hardware hosts (`KVM_X86_SET_MSR_FILTER`,
//! default deny). With `KVM_CAP_X86_USER_SPACE_MSR` (filter reason only) a
//! denied access exits to the VMM, which injects #GP, counts it and logs it
//! (`Vcpu::run`); the guest kernel's `rdmsr_safe`/`wrmsr_safe` probes take
//! the #GP as "not there", a plain access warns ("unchecked MSR access
//! error") and reads 0. Host-initiated accesses (KVM_GET/SET_MSRS for
//! snapshots and resets) are not filtered. x2APIC MSRs (0x800-0x8ff) are
//! never filtered by KVM; the LAPIC is emulated in the kernel.
//!
//! `ALLOWED` is every MSR the guest kernel (`guest/kernel/config.fragment`,
//! one vCPU, no ACPI/MCE/perf hardware) touches with a plain access, with the
//! reason; everything else (PMU counters, SVM/VMX control MSRs, power and
//! thermal, debug store, microcode loading, platform info) is denied. The
//! nested hardware-KVM suite (tests/hw-kvm) prints every MSR denied while
//! the templates boot and serve; `KVMFORK_MSR_FILTER=learn` performs denied
//! accesses host-side instead and logs them, to find what a new guest
//! kernel needs.
//!
//! PVM hosts run without a filter: their templates are snapshotted without
//! one (a filter must be in place from boot, and a PVM template boot takes
//! ~15 minutes), PVM guest ring 0 is emulated by the host anyway, and PVM
//! hosts are development hosts (SECURITY.md).

use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

/// Bump when `ALLOWED` changes: part of the hardware template cache key.
pub const VERSION: u32 = 1;

/// One allowed MSR.
pub struct Allowed {
    pub index: u32,
    pub read: bool,
    pub write: bool,
    pub why: &'static str,
}

const fn rw(index: u32, why: &'static str) -> Allowed {
    Allowed {
        index,
        read: true,
        write: true,
        why,
    }
}

const fn ro(index: u32, why: &'static str) -> Allowed {
    Allowed {
        index,
        read: true,
        write: false,
        why,
    }
}

const fn wo(index: u32, why: &'static str) -> Allowed {
    Allowed {
        index,
        read: false,
        write: true,
        why,
    }
}

/// The allow-list (SECURITY.md repeats it).
pub const ALLOWED: &[Allowed] = &[
    ro(0x10, "IA32_TSC: TSC reads (tsc.c, kvmclock fallback)"),
    rw(0x11, "MSR_KVM_WALL_CLOCK (legacy kvmclock)"),
    rw(0x12, "MSR_KVM_SYSTEM_TIME (legacy kvmclock)"),
    rw(0x1b, "IA32_APIC_BASE: LAPIC set-up (apic.c)"),
    ro(
        0x3a,
        "IA32_FEATURE_CONTROL: read at Intel CPU init (feat_ctl.c)",
    ),
    rw(0x3b, "IA32_TSC_ADJUST: TSC sync check (tsc_sync.c)"),
    rw(
        0x48,
        "IA32_SPEC_CTRL: read at boot when enumerated (bugs.c)",
    ),
    wo(0x49, "IA32_PRED_CMD: IBPB"),
    rw(
        0x8b,
        "IA32_UCODE_REV: microcode revision (Intel writes 0, then reads)",
    ),
    ro(0x10a, "IA32_ARCH_CAPABILITIES: vulnerability enumeration"),
    wo(0x10b, "IA32_FLUSH_CMD: L1D flush"),
    wo(0x174, "IA32_SYSENTER_CS: syscall_init() clears it"),
    wo(0x175, "IA32_SYSENTER_ESP: syscall_init() clears it"),
    wo(0x176, "IA32_SYSENTER_EIP: syscall_init() clears it"),
    rw(0x1a0, "IA32_MISC_ENABLE: Intel CPU init (intel.c)"),
    ro(0xfe, "MTRRcap: MTRR init"),
    ro(0x200, "MTRRphysBase0"),
    ro(0x201, "MTRRphysMask0"),
    ro(0x202, "MTRRphysBase1"),
    ro(0x203, "MTRRphysMask1"),
    ro(0x204, "MTRRphysBase2"),
    ro(0x205, "MTRRphysMask2"),
    ro(0x206, "MTRRphysBase3"),
    ro(0x207, "MTRRphysMask3"),
    ro(0x208, "MTRRphysBase4"),
    ro(0x209, "MTRRphysMask4"),
    ro(0x20a, "MTRRphysBase5"),
    ro(0x20b, "MTRRphysMask5"),
    ro(0x20c, "MTRRphysBase6"),
    ro(0x20d, "MTRRphysMask6"),
    ro(0x20e, "MTRRphysBase7"),
    ro(0x20f, "MTRRphysMask7"),
    ro(0x250, "MTRRfix64K_00000"),
    ro(0x258, "MTRRfix16K_80000"),
    ro(0x259, "MTRRfix16K_A0000"),
    ro(0x268, "MTRRfix4K_C0000"),
    ro(0x269, "MTRRfix4K_C8000"),
    ro(0x26a, "MTRRfix4K_D0000"),
    ro(0x26b, "MTRRfix4K_D8000"),
    ro(0x26c, "MTRRfix4K_E0000"),
    ro(0x26d, "MTRRfix4K_E8000"),
    ro(0x26e, "MTRRfix4K_F0000"),
    ro(0x26f, "MTRRfix4K_F8000"),
    rw(0x277, "IA32_PAT: pat_init()"),
    ro(0x2ff, "MTRRdefType: MTRR init"),
    rw(
        0x6e0,
        "IA32_TSC_DEADLINE: the LAPIC timer in TSC-deadline mode",
    ),
    rw(0xda0, "IA32_XSS: XSAVES supervisor state (fpu/xstate.c)"),
    rw(0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW: kvmclock"),
    rw(0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW: kvmclock"),
    rw(0x4b56_4d02, "MSR_KVM_ASYNC_PF_EN: KVM PV async page faults"),
    rw(0x4b56_4d03, "MSR_KVM_STEAL_TIME: KVM PV steal time"),
    rw(0x4b56_4d04, "MSR_KVM_PV_EOI_EN: KVM PV end-of-interrupt"),
    rw(0x4b56_4d05, "MSR_KVM_POLL_CONTROL: KVM PV halt polling"),
    rw(
        0x4b56_4d06,
        "MSR_KVM_ASYNC_PF_INT: KVM PV async page faults",
    ),
    rw(
        0x4b56_4d07,
        "MSR_KVM_ASYNC_PF_ACK: KVM PV async page faults",
    ),
    rw(0xc000_0080, "EFER: long mode, NX, SYSCALL"),
    rw(0xc000_0081, "STAR: syscall_init()"),
    rw(0xc000_0082, "LSTAR: syscall_init()"),
    rw(0xc000_0083, "CSTAR: syscall_init()"),
    rw(0xc000_0084, "SFMASK: syscall_init()"),
    rw(0xc000_0100, "FS_BASE: thread-local storage, context switch"),
    rw(0xc000_0101, "GS_BASE: per-CPU base"),
    rw(0xc000_0102, "KERNEL_GS_BASE: swapgs"),
    rw(
        0xc000_0103,
        "TSC_AUX: rdtscp/rdpid CPU number (setup_getcpu)",
    ),
    ro(0xc001_0015, "AMD HWCR: AMD CPU init (amd.c)"),
    rw(
        0xc001_1029,
        "AMD DE_CFG: LFENCE made dispatch-serializing (amd.c)",
    ),
];

/// The index ranges the filter covers, each with a read and a write bitmap
/// (16 ranges at most; these are 8). Outside them everything is denied.
const REGIONS: &[(u32, u32)] = &[
    (0, 0x1000),
    (0x4b56_4d00, 0x10),
    (0xc000_0000, 0x200),
    (0xc001_0000, 0x2000),
];

/// Bitmaps per region: (base, count, read bitmap, write bitmap).
pub fn bitmaps() -> Vec<(u32, u32, Vec<u8>, Vec<u8>)> {
    REGIONS
        .iter()
        .map(|&(base, count)| {
            let mut r = vec![0u8; count.div_ceil(8) as usize];
            let mut w = r.clone();
            for a in ALLOWED {
                if a.index >= base && a.index - base < count {
                    let bit = (a.index - base) as usize;
                    if a.read {
                        r[bit / 8] |= 1 << (bit % 8);
                    }
                    if a.write {
                        w[bit / 8] |= 1 << (bit % 8);
                    }
                }
            }
            (base, count, r, w)
        })
        .collect()
}

/// Installs the default-deny filter with `ALLOWED` on `vm`.
pub fn install(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    let maps = bitmaps();
    let mut ranges = Vec::new();
    for (base, count, r, w) in &maps {
        ranges.push(MsrFilterRange {
            flags: MsrFilterRangeFlags::READ,
            base: *base,
            msr_count: *count,
            bitmap: r,
        });
        ranges.push(MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: *base,
            msr_count: *count,
            bitmap: w,
        });
    }
    vm.set_msr_filter(MsrFilterDefaultAction::DENY, &ranges)
}

/// `KVMFORK_MSR_FILTER=learn`: denied accesses are logged and performed
/// host-side (KVM_GET/SET_MSRS) instead of failing, to find what a guest
/// needs. Never for production: it turns the filter into a log.
pub fn learning() -> bool {
    static LEARN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LEARN.get_or_init(|| crate::settings::var("MSR_FILTER").as_deref() == Some("learn"))
}

/// Whether `index` may be read (or written, with `write`) by the guest.
pub fn allowed(index: u32, write: bool) -> bool {
    ALLOWED
        .iter()
        .any(|a| a.index == index && if write { a.write } else { a.read })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowed_msr_is_in_a_region_and_in_its_bitmap() {
        let maps = bitmaps();
        for a in ALLOWED {
            let (base, _, r, w) = maps
                .iter()
                .find(|(b, c, _, _)| a.index >= *b && a.index - b < *c)
                .unwrap_or_else(|| panic!("MSR {:#x} ({}) is in no filter region", a.index, a.why));
            let bit = (a.index - base) as usize;
            assert_eq!(r[bit / 8] & (1 << (bit % 8)) != 0, a.read, "{:#x}", a.index);
            assert_eq!(
                w[bit / 8] & (1 << (bit % 8)) != 0,
                a.write,
                "{:#x}",
                a.index
            );
        }
        assert!(REGIONS.len() * 2 <= kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize);
    }

    #[test]
    fn pmu_and_virtualization_msrs_are_denied() {
        for (index, what) in [
            (0xc001_0000, "AMD PERF_CTL0"),
            (0xc001_0004, "AMD PERF_CTR0"),
            (0xc001_0200, "AMD PERF_CTL0 (core ext)"),
            (0x186, "IA32_PERFEVTSEL0"),
            (0xc1, "IA32_PMC0"),
            (0x38f, "IA32_PERF_GLOBAL_CTRL"),
            (0x345, "IA32_PERF_CAPABILITIES"),
            (0xc001_0117, "VM_HSAVE_PA"),
            (0xc001_0114, "VM_CR"),
            (0x480, "IA32_VMX_BASIC"),
            (0x79, "IA32_BIOS_UPDT_TRIG"),
        ] {
            assert!(!allowed(index, false), "{what} readable");
            assert!(!allowed(index, true), "{what} writable");
        }
        assert!(allowed(0xc000_0080, true), "EFER");
        assert!(!allowed(0x10, true), "the guest may not write the TSC");
    }

    #[test]
    fn allowed_msrs_are_listed_once() {
        let mut seen: Vec<u32> = ALLOWED.iter().map(|a| a.index).collect();
        seen.sort();
        let n = seen.len();
        seen.dedup();
        assert_eq!(seen.len(), n);
    }
}
