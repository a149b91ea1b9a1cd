//! Tiny hand-made guests for VMM tests: ~160 bytes of 64-bit ring-3 code
//! that speaks the mailbox protocol (no kernel at all), snapshotted at its
//! READY doorbell exactly like the real template.
//!
//! The agent loop (assembled with GNU as, intel syntax):
//! ```text
//! start: movabs rbx, 0xd0000000            ; doorbell page
//!        mov dword [rbx], READY             ; snapshot point
//! loop:  mov rax, [REQ_SEQ] ; mov [RESP_SEQ], rax
//!        mov dword [RESP_STATUS], 0 ; [RESP_STDERR_LEN] = 0 ; [RESP_FLAGS] = 0
//!        movzx eax, byte [CODE]             ; first byte of the code
//!        mov [RESP_EXIT_CODE], eax ; mov [STDOUT], al
//!        inc qword [0x300000]               ; a counter in guest RAM
//!        mov rcx, [0x300000] ; mov [STDOUT+1], cl ; [RESP_STDOUT_LEN] = 2
//!        mov r15, 0x1234                    ; dirty a register
//!        cmp al,'X' ; jne 1f ; [RESP_STDOUT_LEN] = 0xffffffff   ; hostile length
//! 1:     cmp al,'L' ; jne 2f ; 3: jmp 3b    ; infinite loop
//! 2:     cmp al,'C' ; jne 4f ; ud2          ; crash (no IDT: triple fault)
//! 4:     mov dword [rbx], DONE ; jmp loop
//! ```
#![allow(dead_code)]

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::Kvm;
use kvmfork::template::Template;
use kvmfork::vmm::cpuid;
use kvmfork::vmm::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use kvmfork::vmm::host::HostCaps;
use kvmfork::vmm::memory::{GuestRam, Sharing};
use kvmfork::vmm::snapshot::{ArtifactInfo, MachineState, TemplateMeta};
use kvmfork::vmm::vcpu::{RunOutcome, Vcpu};
use kvmfork::vmm::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

pub const CODE_GPA: u64 = 0x200000;
pub const COUNTER_GPA: u64 = 0x300000;
pub const RAM_SIZE: usize = 160 << 20;

pub const TINY_AGENT: [u8; 166] = [
    0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x59, 0x44, 0x45, 0x52,
    0x48, 0x8b, 0x04, 0x25, 0x80, 0x00, 0x00, 0x08, 0x48, 0x89, 0x04, 0x25, 0x00, 0x01, 0x00, 0x08,
    0xc7, 0x04, 0x25, 0x08, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x04, 0x25, 0x14, 0x01,
    0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x04, 0x25, 0x18, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00,
    0x00, 0x0f, 0xb6, 0x04, 0x25, 0x00, 0x10, 0x00, 0x08, 0x89, 0x04, 0x25, 0x0c, 0x01, 0x00, 0x08,
    0x88, 0x04, 0x25, 0x00, 0x10, 0x10, 0x08, 0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x48,
    0x8b, 0x0c, 0x25, 0x00, 0x00, 0x30, 0x00, 0x88, 0x0c, 0x25, 0x01, 0x10, 0x10, 0x08, 0xc7, 0x04,
    0x25, 0x10, 0x01, 0x00, 0x08, 0x02, 0x00, 0x00, 0x00, 0x49, 0xc7, 0xc7, 0x34, 0x12, 0x00, 0x00,
    0x3c, 0x58, 0x75, 0x0b, 0xc7, 0x04, 0x25, 0x10, 0x01, 0x00, 0x08, 0xff, 0xff, 0xff, 0xff, 0x3c,
    0x4c, 0x75, 0x02, 0xeb, 0xfe, 0x3c, 0x43, 0x75, 0x02, 0x0f, 0x0b, 0xc7, 0x03, 0x44, 0x4f, 0x4e,
    0x45, 0xe9, 0x6a, 0xff, 0xff, 0xff,
];

/// Opens /dev/kvm or fails the test loudly: these tests must never pass
/// silently on a machine without KVM.
pub fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm and could not open it: {e}"))
}

/// A second agent for the TLB test (GNU as, intel syntax): VA `REMAP_VA`
/// is mapped by a 4 KiB page table entry at `REMAP_PTE_GPA`, which the
/// identity map lets ring 3 write (there is no kernel to ask).
/// ```text
/// start: movabs rbx, 0xd0000000 ; mov dword [rbx], READY
/// loop:  mov rax, [REQ_SEQ] ; mov [RESP_SEQ], rax
///        [RESP_STATUS] = [RESP_STDERR_LEN] = [RESP_FLAGS] = [RESP_EXIT_CODE] = 0
///        movzx eax, byte [CODE]
///        cmp al, 'R' ; jne 1f
///        mov qword [0x6000], 0x501007     ; PTE: REMAP_VA -> PAGE_P, no invlpg
/// 1:     mov cl, byte [0x40000000]        ; read REMAP_VA (fills the TLB)
///        mov [STDOUT], cl ; [RESP_STDOUT_LEN] = 1
///        mov dword [rbx], DONE ; jmp loop
/// ```
pub const REMAP_AGENT: [u8; 133] = [
    0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x59, 0x44, 0x45, 0x52,
    0x48, 0x8b, 0x04, 0x25, 0x80, 0x00, 0x00, 0x08, 0x48, 0x89, 0x04, 0x25, 0x00, 0x01, 0x00, 0x08,
    0xc7, 0x04, 0x25, 0x08, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x04, 0x25, 0x14, 0x01,
    0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x04, 0x25, 0x18, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00,
    0x00, 0xc7, 0x04, 0x25, 0x0c, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x0f, 0xb6, 0x04, 0x25,
    0x00, 0x10, 0x00, 0x08, 0x3c, 0x52, 0x75, 0x0c, 0x48, 0xc7, 0x04, 0x25, 0x00, 0x60, 0x00, 0x00,
    0x07, 0x10, 0x50, 0x00, 0x8a, 0x0c, 0x25, 0x00, 0x00, 0x00, 0x40, 0x88, 0x0c, 0x25, 0x00, 0x10,
    0x10, 0x08, 0xc7, 0x04, 0x25, 0x10, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x44,
    0x4f, 0x4e, 0x45, 0xeb, 0x8b,
];
pub const REMAP_VA: u64 = 0x4000_0000;
pub const REMAP_PD_GPA: u64 = 0x5000;
pub const REMAP_PTE_GPA: u64 = 0x6000;
/// What the template's page table maps `REMAP_VA` to; filled with b'A'.
pub const PAGE_A: u64 = 0x50_0000;
/// Where the 'R' request points it (the agent's constant); filled with b'P'.
pub const PAGE_P: u64 = 0x50_1000;

/// Boots the tiny agent to its READY doorbell and returns it as a template.
pub fn tiny_template() -> Template {
    tiny_template_with(&TINY_AGENT, |_| {})
}

/// The REMAP_AGENT template: `REMAP_VA` -> `PAGE_A` in its page tables.
pub fn remap_template() -> Template {
    tiny_template_with(&REMAP_AGENT, |ram| {
        ram.write_u64(0x2000 + 8, REMAP_PD_GPA | 7).unwrap();
        ram.write_u64(REMAP_PD_GPA, REMAP_PTE_GPA | 7).unwrap();
        ram.write_u64(REMAP_PTE_GPA, PAGE_A | 7).unwrap();
        ram.write(PAGE_A, &[b'A'; 4096]).unwrap();
        ram.write(PAGE_P, &[b'P'; 4096]).unwrap();
    })
}

/// Boots `agent` (ring-3 code at `CODE_GPA`) to its READY doorbell after
/// `setup` has written anything else it needs into RAM.
pub fn tiny_template_with(agent: &[u8], setup: impl Fn(&GuestRam)) -> Template {
    let kvm = kvm();
    let memfd = GuestRam::create_memfd("tiny-template", RAM_SIZE).unwrap();
    let ram = GuestRam::map(&memfd, RAM_SIZE, Sharing::Shared).unwrap();
    // Identity map of the first GiB (user-accessible 2 MiB pages) plus the doorbell page.
    ram.write_u64(0x1000, 0x2000 | 7).unwrap();
    ram.write_u64(0x2000, 0x3000 | 7).unwrap();
    for i in 0..512u64 {
        ram.write_u64(0x3000 + i * 8, (i << 21) | 0x87).unwrap();
    }
    ram.write_u64(0x2000 + 3 * 8, 0x4000 | 7).unwrap();
    ram.write_u64(0x4000 + 128 * 8, 0xd000_0000 | 0x87).unwrap();
    ram.write(CODE_GPA, agent).unwrap();
    setup(&ram);

    let caps = HostCaps::current();
    let mut vm = Vm::new(&kvm).unwrap();
    if caps.disable_pmu {
        vm.disable_pmu().unwrap();
    }
    if caps.msr_filter {
        vm.enable_msr_filter().unwrap();
    }
    vm.set_ram(&ram, false).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, COM1_IRQ).unwrap();
    let mut vcpu = Vcpu::new(&vm, 0).unwrap();
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    cpuid::filter(&mut cpuid, caps.cpuid);
    vcpu.set_cpuid(&cpuid).unwrap();
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    let cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x2b,
        present: 1,
        type_: 11,
        dpl: 3,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let ds = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x23,
        present: 1,
        type_: 3,
        dpl: 3,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.cr3 = 0x1000;
    sregs.cr4 = 0x20;
    sregs.cr0 = 0x8000_0011;
    sregs.efer = 0x500;
    vcpu.fd().set_sregs(&sregs).unwrap();
    vcpu.fd()
        .set_regs(&kvm_regs {
            rip: CODE_GPA,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    let mut devices = LegacyDevices::new(irq, ConsoleSink::new(1024, false, None));
    let outcome = vcpu.run(&mut devices, &ram).unwrap();
    assert_eq!(
        outcome,
        RunOutcome::Doorbell(kvmfork::contract::DOORBELL_READY as u32),
        "tiny agent did not ring READY"
    );
    vcpu.complete_pending_io().unwrap();
    let vcpu_state = vcpu.save_state(&kvm).unwrap();
    assert_eq!(
        vcpu_state.sregs.cs.dpl, 3,
        "snapshot must be taken in user mode"
    );
    let vm_state = vm.save_state().unwrap();
    let state = MachineState {
        vcpu: vcpu_state,
        vm: vm_state,
        serial: devices.serial.state(),
    };
    drop(vcpu);
    drop(vm);
    drop(ram);
    let meta = tiny_meta(&state);
    Template::from_parts("/nonexistent/tiny".into(), meta, state, memfd).unwrap()
}

pub fn tiny_meta(state: &MachineState) -> TemplateMeta {
    let none = ArtifactInfo {
        path: String::new(),
        cache_key: String::new(),
        size: 0,
    };
    TemplateMeta {
        language: "python".into(),
        kvmfork_version: "test".into(),
        host_kind: HostCaps::current().kind,
        cpu_vendor: kvmfork::template::cpu_identity().0,
        cpu_model: String::new(),
        ram_size: RAM_SIZE as u64,
        cmdline: String::new(),
        kernel: none.clone(),
        rootfs: none,
        packages: vec![],
        boot_to_ready_seconds: 0.0,
        built_at_unix: 0,
        snapshot_rip: state.vcpu.regs.rip,
        snapshot_cpl: state.vcpu.sregs.cs.dpl,
        memory: Default::default(),
        xsave_size: 0,
        pmu_disabled: HostCaps::current().disable_pmu,
        msr_filtered: HostCaps::current().msr_filter,
    }
}
