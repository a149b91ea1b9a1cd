//! CPUID for guests, with the feature masks this host kind needs.
//!
//! On PVM hosts (software "pagetable-based" KVM, no VT-x/SVM) guest ring 0 is
//! instruction-emulated and the emulator rejects some instructions the kernel
//! would patch in (`../shared/docs/kvm-host.md`). Those features are hidden
//! here *and* on the kernel command line (`guest/kernel/cmdline.pvm`): on PVM,
//! KVM_SET_CPUID2 alone was seen not to hide XSAVE from the guest.
//!
//! On hardware KVM the CPUID is trimmed the way Firecracker's templates do:
//! no virtualization extensions (a tenant must not see VMX/SVM), no
//! performance monitoring (leaf 0xA, PDCM, AMD's perfctr/IBS/LWP), no
//! thermal, power, debug-store, SGX or processor-trace features. None of
//! them is used by the guest kernel (`guest/kernel/config.fragment`), and
//! each is host attack surface or a side channel. `HARDWARE_TRIM` lists them.

use kvm_bindings::CpuId;

/// What kind of KVM the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// VT-x / AMD-V backed KVM.
    Hardware,
    /// PVM: guest kernel mode is emulated.
    Pvm,
}

impl HostKind {
    /// Detects PVM by its module, falling back to the absence of vmx/svm.
    pub fn detect() -> HostKind {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostKind::detect_from(std::path::Path::new("/sys"), &cpuinfo)
    }

    /// [`HostKind::detect`] on a given sysfs root and /proc/cpuinfo text.
    pub fn detect_from(sys: &std::path::Path, cpuinfo: &str) -> HostKind {
        if sys.join("module/kvm_pvm").exists() {
            return HostKind::Pvm;
        }
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        if flags.split_whitespace().any(|f| f == "vmx" || f == "svm") {
            HostKind::Hardware
        } else {
            HostKind::Pvm
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware",
            HostKind::Pvm => "pvm",
        }
    }
}

// (leaf, register, bit) of features PVM's emulator cannot run in guest ring 0.
const ECX: u8 = 2;
const EBX: u8 = 1;
const PVM_HIDDEN: &[(u32, u8, u32, &str)] = &[
    (1, ECX, 13, "cx16 (lock cmpxchg16b)"),
    (1, ECX, 17, "pcid"),
    (1, ECX, 22, "movbe"),
    (1, ECX, 23, "popcnt"),
    (1, ECX, 26, "xsave (xsave/xrstor)"),
    (1, ECX, 27, "osxsave"),
    (1, ECX, 28, "avx"),
    (1, ECX, 30, "rdrand"),
    (7, EBX, 0, "fsgsbase"),
    (7, EBX, 5, "avx2"),
    (7, EBX, 7, "smep"),
    (7, EBX, 10, "invpcid"),
    (7, EBX, 20, "smap (clac/stac)"),
    (7, EBX, 23, "clflushopt"),
    (7, EBX, 24, "clwb"),
    (7, ECX, 2, "umip"),
    (7, ECX, 3, "pku"),
    (7, ECX, 22, "rdpid"),
];

const EAX: u8 = 0;
const EDX: u8 = 3;
/// Bump when `HARDWARE_TRIM` changes: it is part of the hardware template
/// cache key (a template's CPUID is fixed at its boot).
pub const HARDWARE_PROFILE_VERSION: u32 = 2;
/// (leaf, register, bit, why) hidden on hardware KVM. Whole leaves that are
/// zeroed are in `HARDWARE_ZEROED_LEAVES`.
const HARDWARE_TRIM: &[(u32, u8, u32, &str)] = &[
    (1, ECX, 2, "dtes64 (debug store)"),
    (
        1,
        ECX,
        3,
        "monitor (monitor/mwait: the guest idles with hlt)",
    ),
    (1, ECX, 4, "ds_cpl"),
    (1, ECX, 5, "vmx (no nested virtualization for tenants)"),
    (1, ECX, 6, "smx"),
    (1, ECX, 7, "est (speedstep)"),
    (1, ECX, 8, "tm2"),
    (1, ECX, 14, "xtpr"),
    (1, ECX, 15, "pdcm (perf capabilities MSR)"),
    (1, EDX, 21, "ds (debug store)"),
    (1, EDX, 22, "acpi (thermal MSRs)"),
    (1, EDX, 29, "tm"),
    (1, EDX, 31, "pbe"),
    (7, EBX, 2, "sgx"),
    (7, EBX, 25, "intel_pt"),
    (7, ECX, 30, "sgx_lc"),
    (
        0x8000_0001,
        ECX,
        2,
        "svm (no nested virtualization for tenants)",
    ),
    (0x8000_0001, ECX, 10, "ibs (instruction-based sampling)"),
    (0x8000_0001, ECX, 12, "skinit"),
    (0x8000_0001, ECX, 13, "wdt"),
    (0x8000_0001, ECX, 15, "lwp"),
    (0x8000_0001, ECX, 23, "perfctr_core"),
    (0x8000_0001, ECX, 24, "perfctr_nb"),
    (0x8000_0001, ECX, 27, "perftsc"),
    (0x8000_0001, ECX, 28, "perfctr_llc"),
];
/// Leaves zeroed on hardware KVM (all four registers, every subleaf).
const HARDWARE_ZEROED_LEAVES: &[(u32, &str)] = &[
    (5, "monitor/mwait parameters"),
    (0xa, "architectural PMU (arch_perfmon)"),
    (0x12, "SGX"),
    (0x14, "processor trace"),
    (0x8000_000a, "SVM features"),
    (0x8000_001b, "IBS features"),
    (0x8000_0022, "AMD PerfMonV2"),
];
/// Leaf 6 (thermal and power) keeps only ARAT: the kernel needs to know the
/// LAPIC timer keeps running when idle.
const LEAF6_ARAT: u32 = 1 << 2;

fn reg(entry: &mut kvm_bindings::kvm_cpuid_entry2, reg: u8) -> &mut u32 {
    match reg {
        EAX => &mut entry.eax,
        EBX => &mut entry.ebx,
        ECX => &mut entry.ecx,
        _ => &mut entry.edx,
    }
}

/// Adjusts KVM's supported CPUID for a single-vCPU guest with `host`'s
/// profile (`HostCaps::cpuid`).
pub fn filter(cpuid: &mut CpuId, host: HostKind) {
    for entry in cpuid.as_mut_slice().iter_mut() {
        if entry.function == 1 {
            // One logical processor, APIC id 0, CLFLUSH line size 8 (64 bytes).
            entry.ebx = (entry.ebx & 0x0000_ffff & !0xff00) | (8 << 8) | (1 << 16);
            // Tell the kernel it runs under a hypervisor (kvm-clock, no TSC calibration loops).
            entry.ecx |= 1 << 31;
        }
        if host == HostKind::Pvm {
            for &(leaf, reg, bit, _) in PVM_HIDDEN {
                if entry.function == leaf && (leaf != 7 || entry.index == 0) {
                    *self::reg(entry, reg) &= !(1u32 << bit);
                }
            }
            if entry.function == 0xd {
                // No XSAVE: no extended state enumeration either.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
        }
        if host == HostKind::Hardware {
            for &(leaf, r, bit, _) in HARDWARE_TRIM {
                if entry.function == leaf && (leaf != 7 || entry.index == 0) {
                    *reg(entry, r) &= !(1u32 << bit);
                }
            }
            if HARDWARE_ZEROED_LEAVES
                .iter()
                .any(|&(l, _)| l == entry.function)
            {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            if entry.function == 6 {
                entry.eax &= LEAF6_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
        }
    }
}

/// What the hardware profile hides, for `template inspect` and the docs.
pub fn hardware_hidden_features() -> Vec<&'static str> {
    HARDWARE_TRIM
        .iter()
        .map(|f| f.3)
        .chain(HARDWARE_ZEROED_LEAVES.iter().map(|l| l.1))
        .collect()
}

/// Names of the features hidden on PVM hosts (for `template inspect`).
pub fn pvm_hidden_features() -> Vec<&'static str> {
    PVM_HIDDEN.iter().map(|f| f.3).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn pvm_masks_hide_rejected_instructions_and_hardware_keeps_them() {
        let entries = [entry(1, 0), entry(7, 0), entry(0xd, 0)];
        let mut pvm = CpuId::from_entries(&entries).unwrap();
        filter(&mut pvm, HostKind::Pvm);
        let e = pvm.as_slice();
        assert_eq!(e[0].ecx & (1 << 13), 0, "cx16 hidden");
        assert_eq!(e[0].ecx & (1 << 26), 0, "xsave hidden");
        assert_eq!(e[1].ebx & (1 << 20), 0, "smap hidden");
        assert_eq!(e[2].eax, 0);
        let mut hw = CpuId::from_entries(&entries).unwrap();
        filter(&mut hw, HostKind::Hardware);
        assert_ne!(
            hw.as_slice()[0].ecx & (1 << 26),
            0,
            "xsave kept on hardware KVM"
        );
        assert_eq!((hw.as_slice()[0].ebx >> 16) & 0xff, 1, "one logical cpu");
    }

    #[test]
    fn hardware_profile_hides_virtualization_and_the_pmu() {
        let entries = [
            entry(1, 0),
            entry(6, 0),
            entry(7, 0),
            entry(7, 1),
            entry(0xa, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_000a, 0),
            entry(0x8000_0022, 0),
        ];
        let mut hw = CpuId::from_entries(&entries).unwrap();
        filter(&mut hw, HostKind::Hardware);
        let e = hw.as_slice();
        assert_eq!(e[0].ecx & (1 << 5), 0, "vmx hidden");
        assert_eq!(e[0].ecx & (1 << 15), 0, "pdcm hidden");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit kept");
        assert_ne!(e[0].ecx & (1 << 26), 0, "xsave kept");
        assert_eq!(e[1].eax, LEAF6_ARAT, "leaf 6: only ARAT");
        assert_eq!(e[2].ebx & (1 << 2), 0, "sgx hidden");
        assert_eq!(e[3].ebx, !0, "leaf 7 subleaf 1 untouched");
        assert_eq!(
            (e[4].eax, e[4].ebx, e[4].ecx, e[4].edx),
            (0, 0, 0, 0),
            "no arch PMU"
        );
        assert_eq!(e[5].ecx & (1 << 2), 0, "svm hidden");
        assert_eq!(e[5].ecx & (1 << 23), 0, "perfctr_core hidden");
        assert_ne!(e[5].ecx & 1, 0, "lahf_lm kept");
        assert_eq!(e[6].eax | e[6].edx, 0, "no SVM feature leaf");
        assert_eq!(e[7].eax | e[7].ebx, 0, "no PerfMonV2");
        // PVM's profile keeps its own masks and not these.
        let mut pvm = CpuId::from_entries(&entries).unwrap();
        filter(&mut pvm, HostKind::Pvm);
        assert_ne!(
            pvm.as_slice()[4].eax,
            0,
            "PVM profile unchanged by the hardware trim"
        );
    }
}
