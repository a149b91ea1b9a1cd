//! CPUID for guests, with the feature masks this host kind needs.
//!
//! On PVM hosts (software "pagetable-based" KVM, no VT-x/SVM) guest ring 0 is
//! instruction-emulated and the emulator rejects some instructions the kernel
//! would patch in (`../shared/docs/kvm-host.md`). Those features are hidden
//! here *and* on the kernel command line (`guest/kernel/cmdline.pvm`): on PVM,
//! KVM_SET_CPUID2 alone was seen not to hide XSAVE from the guest.

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
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            return HostKind::Pvm;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
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

/// Adjusts KVM's supported CPUID for a single-vCPU guest on `host`.
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
                    let r = match reg {
                        EBX => &mut entry.ebx,
                        _ => &mut entry.ecx,
                    };
                    *r &= !(1u32 << bit);
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
    }
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
}
