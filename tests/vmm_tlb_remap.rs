//! A tenant's page-table change must not survive a pooled reset: neither in
//! KVM's shadow page tables (PVM, hardware with npt=0/ept=0) nor in the
//! guest TLB (hardware: translations tagged with the VM's ASID/VPID
//! outlive a VM exit). The guest remaps a page, reads it (the translation
//! is now cached), rings the doorbell; the reset puts the template's page
//! table back; the next tenant must read the template's page.
//!
//! tests/hw-kvm runs this binary inside the nested guest too, once with
//! nested paging and once with kvm_amd npt=0 (`--exact` on the test name).

mod common;

use std::time::Duration;

use common::tiny_guest::*;
use kvmfork::api::{CancelToken, ExecRequest, Language};
use kvmfork::engine::sandbox::{Limits, Sandbox};
use kvmfork::vmm::kick::ThreadTimer;

fn req(code: &str) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        language: Language::Python,
        timeout: Duration::from_secs(30),
        cancel: CancelToken::new(),
    }
}

#[test]
fn pooled_reset_drops_translations_of_a_page_the_guest_remapped() {
    let mut t = remap_template();
    // The hardware rule on every host: exit counters are not trusted to see
    // page-table writes, so every exec counts as kernel-entering. (On PVM
    // the tiny guest's page tables are user-writable, which the real
    // template's are not: there the counters' verdict would not hold.)
    t.caps.counters_see_kernel_entry = false;
    let kvm = kvm();
    let timer = ThreadTimer::for_current_thread().unwrap();
    let mut sb = Sandbox::fork_fresh(&kvm, &t, true).unwrap();
    let limits = Limits::default();
    for round in 0..3 {
        let r = sb.exec(&t, &req("R"), &limits, &timer);
        assert_eq!(r.failure, None, "round {round}: remap exec");
        assert_eq!(
            r.stdout, b"P",
            "round {round}: the guest sees its own remap"
        );
        assert!(
            sb.needs_slot_cycle(),
            "round {round}: the reset must drop translations"
        );
        sb.reset(&t).unwrap();
        assert_eq!(
            sb.ram().read_u64(REMAP_PTE_GPA).unwrap(),
            PAGE_A | 7,
            "round {round}: the reset put the template's PTE back"
        );
        let r = sb.exec(&t, &req("N"), &limits, &timer);
        assert_eq!(r.failure, None, "round {round}: next tenant");
        assert_eq!(
            r.stdout, b"A",
            "round {round}: the next tenant read the previous tenant's page through a stale translation"
        );
        sb.reset(&t).unwrap();
    }
}
