//! The one host seam: what this host's KVM is and can do, decided once at
//! start-up and carried by every loaded template (`Template::caps`). Every
//! "PVM or hardware?" question of the engine and the template code is a
//! field here, so tests can hand a template the other host's answers and
//! exercise both reset paths on either host.
//!
//! | field | PVM | hardware (NPT/EPT) | hardware, shadow paging |
//! |---|---|---|---|
//! | `shadow_paging` | yes | no | yes (`npt=0` / `ept=0`) |
//! | `counters_see_kernel_entry` | yes (ring 0 is emulated) | no | no |
//! | CPUID profile | PVM masks | trimmed like Firecracker | trimmed |
//! | extra kernel command line | `cmdline.pvm` | none | none |
//! | vPMU | left as KVM has it | disabled (`KVM_CAP_PMU_CAPABILITY`) | disabled |
//! | MSR filter | none | default deny, `msr_filter::ALLOWED` | same |
//! | fork timer | masked until the first kick | same | same |

use std::path::Path;
use std::sync::OnceLock;

use super::cpuid::HostKind;

/// How forks get their LAPIC timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerHandling {
    /// Forks start with the timer masked and get it back at the first 20 ms
    /// kick (a short exec takes no tick: ~5 ms each on PVM, and no
    /// interrupt means nothing disturbs the user-mode-only reasoning).
    MaskedUntilKick,
    /// Forks start with the template's timer (`KVMFORK_KEEP_TIMER`, for
    /// experiments).
    Template,
}

/// What the host can do; see the module table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCaps {
    pub kind: HostKind,
    /// KVM builds shadow page tables from the guest's own (PVM, or hardware
    /// KVM with nested paging off). Host writes to guest page tables (a
    /// copy-back reset, a layer) are then invisible to KVM until the memory
    /// slot is cycled.
    pub shadow_paging: bool,
    /// KVM's per-vCPU counters see every entry into the guest kernel
    /// (`insn_emulation`, `pf_guest`, `irq_injections`, `halt_exits`): true on
    /// PVM, where guest ring 0 is emulated. On hardware a syscall or a fault
    /// the guest handles itself causes no exit, so no exec can be proven to
    /// have stayed in user mode. Start-up verifies it
    /// (`Template::verify_user_mode_probe`) and clears it if the counters
    /// missed a probe syscall.
    pub counters_see_kernel_entry: bool,
    /// CPUID masks: the PVM emulator's, or the hardware trim (`cpuid.rs`).
    pub cpuid: HostKind,
    /// Append `guest/kernel/cmdline.pvm` to the template kernel command line.
    pub pvm_cmdline: bool,
    /// Turn KVM's virtual PMU off for every VM (`KVM_CAP_PMU_CAPABILITY`):
    /// tenants get no performance counters (a side channel and attack
    /// surface). Hardware only: PVM templates were snapshotted with it on.
    pub disable_pmu: bool,
    /// Default-deny MSR filter (`msr_filter.rs`), denied accesses #GP and
    /// logged by the VMM. Hardware only: PVM templates were snapshotted
    /// without one (see `msr_filter.rs` for why).
    pub msr_filter: bool,
    pub timer: TimerHandling,
    /// Why each answer was chosen, for the one log line.
    pub why: Vec<String>,
}

static CURRENT: OnceLock<HostCaps> = OnceLock::new();

impl HostCaps {
    /// This host's capabilities, detected once. `serve` logs them at
    /// start-up, `template build` and `bench fork` print them; `run` stays
    /// silent (its stderr is the guest's).
    pub fn current() -> &'static HostCaps {
        CURRENT.get_or_init(|| HostCaps::detect(Path::new("/sys"), &read("/proc/cpuinfo")))
    }

    /// Decides from sysfs (`sys`, normally `/sys`) and `/proc/cpuinfo`'s
    /// text; separate from `current` so tests can feed other hosts.
    pub fn detect(sys: &Path, cpuinfo: &str) -> HostCaps {
        let kind = HostKind::detect_from(sys, cpuinfo);
        let mut why = Vec::new();
        let shadow_paging = match kind {
            HostKind::Pvm => {
                why.push("PVM: shadow paging, guest ring 0 emulated".to_string());
                true
            }
            HostKind::Hardware => {
                // The module parameters say whether nested paging is in use;
                // "Y"/"1" means on. Neither module loaded (kvm built in, an
                // unusual setup): assume shadow paging, the safe answer.
                let param = [
                    "module/kvm_amd/parameters/npt",
                    "module/kvm_intel/parameters/ept",
                ]
                .iter()
                .find_map(|p| {
                    std::fs::read_to_string(sys.join(p))
                        .ok()
                        .map(|v| (*p, v.trim().to_string()))
                });
                match param {
                    Some((p, v)) => {
                        let on = v == "Y" || v == "1";
                        why.push(format!("/sys/{p} = {v}"));
                        !on
                    }
                    None => {
                        why.push(
                            "no kvm_amd npt / kvm_intel ept parameter: assuming shadow paging"
                                .into(),
                        );
                        true
                    }
                }
            }
        };
        let counters_see_kernel_entry = kind == HostKind::Pvm;
        if !counters_see_kernel_entry {
            why.push(
                "guest-kernel entries cause no exit: every exec counts as kernel-entering".into(),
            );
        }
        let timer = if crate::settings::var_os("KEEP_TIMER").is_some() {
            TimerHandling::Template
        } else {
            TimerHandling::MaskedUntilKick
        };
        HostCaps {
            kind,
            shadow_paging,
            counters_see_kernel_entry,
            cpuid: kind,
            pvm_cmdline: kind == HostKind::Pvm,
            disable_pmu: kind == HostKind::Hardware,
            msr_filter: kind == HostKind::Hardware
                && crate::settings::var("MSR_FILTER").as_deref() != Some("off"),
            timer,
            why,
        }
    }

    /// The one start-up log line.
    pub fn describe(&self) -> String {
        format!(
            "KVM kind {}, {} paging, exit counters {} a user-mode-only exec, CPUID profile {}, \
             {} kernel command line, vPMU {}, MSR filter {}, fork timer {:?} ({})",
            self.kind.as_str(),
            if self.shadow_paging {
                "shadow"
            } else {
                "nested (NPT/EPT)"
            },
            if self.counters_see_kernel_entry {
                "prove"
            } else {
                "cannot prove"
            },
            self.cpuid.as_str(),
            if self.pvm_cmdline { "PVM" } else { "base" },
            if self.disable_pmu {
                "off"
            } else {
                "as KVM has it"
            },
            if !self.msr_filter {
                "off"
            } else if super::msr_filter::learning() {
                "learning (denied accesses done host-side and logged)"
            } else {
                "default deny"
            },
            self.timer,
            self.why.join("; ")
        )
    }

    /// What of these capabilities a template's snapshot depends on, for the
    /// template cache key. PVM keeps its old key ("pvm"), so its cached
    /// templates stay valid; the hardware profile changed with the CPUID
    /// trim and the vPMU switch.
    pub fn template_key(&self) -> String {
        match self.kind {
            HostKind::Pvm => "pvm".into(),
            HostKind::Hardware => format!(
                "hardware cpuid={} pmu-off={} msr-filter={}",
                super::cpuid::HARDWARE_PROFILE_VERSION,
                self.disable_pmu,
                if self.msr_filter {
                    super::msr_filter::VERSION
                } else {
                    0
                }
            ),
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysfs(files: &[(&str, &str)]) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        for (p, v) in files {
            let f = d.0.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, v).unwrap();
        }
        d
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let mut b = [0u8; 8];
                crate::engine::sandbox::fill_random(&mut b);
                let p = std::env::temp_dir().join(format!(
                    "kvmfork-hostcaps-{}",
                    b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const SVM: &str = "flags\t\t: fpu sse2 svm npt\n";

    #[test]
    fn pvm_module_means_pvm_with_shadow_paging_and_trusted_counters() {
        let d = sysfs(&[("module/kvm_pvm/initstate", "live")]);
        let c = HostCaps::detect(&d.0, SVM);
        assert_eq!(c.kind, HostKind::Pvm);
        assert!(c.shadow_paging && c.counters_see_kernel_entry && c.pvm_cmdline);
        assert!(!c.disable_pmu && !c.msr_filter);
        assert_eq!(c.template_key(), "pvm", "PVM's cache key must not change");
    }

    #[test]
    fn hardware_with_npt_is_nested_paging_and_blind_counters() {
        let d = sysfs(&[("module/kvm_amd/parameters/npt", "1\n")]);
        let c = HostCaps::detect(&d.0, SVM);
        assert_eq!(c.kind, HostKind::Hardware);
        assert!(!c.shadow_paging);
        assert!(
            !c.counters_see_kernel_entry,
            "hardware exits do not see syscalls"
        );
        assert!(!c.pvm_cmdline && c.disable_pmu && c.msr_filter);
        assert!(c.template_key().starts_with("hardware"));
    }

    #[test]
    fn hardware_with_npt_or_ept_off_is_shadow_paging() {
        for (p, v) in [
            ("module/kvm_amd/parameters/npt", "0\n"),
            ("module/kvm_intel/parameters/ept", "N\n"),
        ] {
            let d = sysfs(&[(p, v)]);
            let c = HostCaps::detect(&d.0, "flags : vmx svm\n");
            assert_eq!(c.kind, HostKind::Hardware, "{p}");
            assert!(c.shadow_paging, "{p}={v} must mean shadow paging");
            assert!(c.describe().contains("shadow paging"), "{}", c.describe());
        }
        let d = sysfs(&[("module/kvm_intel/parameters/ept", "Y\n")]);
        assert!(!HostCaps::detect(&d.0, "flags : vmx\n").shadow_paging);
        // No parameter to read: the safe answer.
        let d = sysfs(&[]);
        assert!(HostCaps::detect(&d.0, "flags : vmx\n").shadow_paging);
    }
}
