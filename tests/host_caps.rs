//! The start-up self-check of the registers-and-FPU-only reset on the real
//! Python template (built by tests/run.sh; a missing template fails).

use kvmfork::api::Language;
use kvmfork::template::{self, Template};
use kvmfork::vmm::cpuid::HostKind;
use kvmfork::vmm::host::HostCaps;

fn load() -> Template {
    let dir = std::env::var_os("KVMFORK_TEMPLATE")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| template::find_cached(Language::Python))
        .expect("no Python template: run `kvmfork template build` (tests/run.sh does)");
    Template::load(&dir).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

#[test]
fn load_keeps_the_fast_reset_only_where_the_counters_saw_the_probe_syscall() {
    let t = load();
    match HostCaps::current().kind {
        // PVM: the probe's syscall is emulated guest-kernel code, which the
        // counters must have seen, so the fast reset stays on.
        HostKind::Pvm => assert!(
            t.caps.counters_see_kernel_entry,
            "the probe syscall was not seen on PVM: {:?}",
            t.caps.why
        ),
        HostKind::Hardware => assert!(!t.caps.counters_see_kernel_entry),
    }
}

#[test]
fn blind_counters_turn_the_fast_reset_off() {
    let mut t = load();
    // Counters that miss guest-kernel entries, injected: claim they see
    // everything, then hand the self-check a "kernel-entering" probe that
    // never leaves user mode. The verdict must be "not seen" and the fast
    // path must be off afterwards.
    t.caps.counters_see_kernel_entry = true;
    let why = t
        .verify_user_mode_probe("x = 1")
        .expect_err("a probe the counters did not see must fail the self-check");
    assert!(why.contains("did not see"), "{why}");
    assert!(!t.caps.counters_see_kernel_entry, "fast reset still on");
    // With the real syscall probe the verdict follows the host: seen on PVM.
    let mut t = load();
    t.caps.counters_see_kernel_entry = true;
    let seen = t
        .verify_user_mode_probe(template::kernel_probe_code(Language::Python))
        .is_ok();
    assert_eq!(seen, HostCaps::current().kind == HostKind::Pvm);
}
