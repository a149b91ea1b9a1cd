//! The boot path on a tiny hand-made "kernel": a 32-byte ELF whose code runs
//! at CPL0 in long mode, reads boot_params through RSI (e820 count and the
//! command line) and reports over the serial port, then asks for a reset.
//! Needs /dev/kvm and fails loudly without it.

mod common;

use common::tiny_guest::kvm;
use kvmfork::vmm::boot;
use kvmfork::vmm::cpuid;
use kvmfork::vmm::devices::{ConsoleSink, LegacyDevices, COM1_IRQ};
use kvmfork::vmm::host::HostCaps;
use kvmfork::vmm::memory::{GuestRam, Sharing};
use kvmfork::vmm::vcpu::{RunOutcome, Vcpu};
use kvmfork::vmm::vm::Vm;
use vmm_sys_util::eventfd::EventFd;

/// mov al,[rsi+0x1e8] (e820 entries); add al,'0'; out 0x3f8,al;
/// mov ebx,[rsi+0x228] (cmd_line_ptr); mov al,[rbx]; out 0x3f8,al;
/// mov al,'K'; out 0x3f8,al; mov al,0xfe; out 0x64,al (reset); hlt loop.
const TINY_KERNEL: [u8; 32] = [
    0x8a, 0x86, 0xe8, 0x01, 0x00, 0x00, 0x04, 0x30, 0x66, 0xba, 0xf8, 0x03, 0xee, 0x8b, 0x9e, 0x28,
    0x02, 0x00, 0x00, 0x8a, 0x03, 0xee, 0xb0, 0x4b, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
];
const LOAD_ADDR: u64 = 0x100_0000;

/// A minimal ELF64 executable with one PT_LOAD segment at 16 MiB.
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    f[ph + 16..ph + 24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    f[ph + 24..ph + 32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[test]
fn tiny_kernel_boots_in_long_mode_and_sees_boot_params() {
    let kvm = kvm();
    let dir = std::env::temp_dir().join(format!("kvmfork-boot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, tiny_elf(&TINY_KERNEL)).unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();

    let ram_size = 256usize << 20;
    let memfd = GuestRam::create_memfd("boot-test", ram_size).unwrap();
    let ram = GuestRam::map(&memfd, ram_size, Sharing::Shared).unwrap();
    let loaded = boot::load_linux(&ram, &kernel, Some(&initrd), "Xconsole=ttyS0").unwrap();
    assert_eq!(loaded.entry, LOAD_ADDR);
    assert_eq!(loaded.initrd_size, 10_000);
    assert_eq!(loaded.initrd_addr % 4096, 0);
    assert!(loaded.initrd_addr + loaded.initrd_size <= ram_size as u64);
    let mut byte = [0u8; 1];
    ram.read(loaded.initrd_addr, &mut byte).unwrap();
    assert_eq!(byte[0], 0x5a);

    let mut vm = Vm::new(&kvm).unwrap();
    vm.set_ram(&ram, false).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, COM1_IRQ).unwrap();
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    cpuid::filter(&mut cpuid, HostCaps::current().cpuid);
    let mut vcpu = Vcpu::new(&vm, 0).unwrap();
    vcpu.set_cpuid(&cpuid).unwrap();
    boot::setup_boot_vcpu(&vcpu, loaded.entry).unwrap();
    let sregs = vcpu.fd().get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "long mode enabled and active");
    assert_eq!(sregs.cs.l, 1);

    let mut devices = LegacyDevices::new(irq, ConsoleSink::new(256, false, None));
    let outcome = vcpu.run(&mut devices, &ram).unwrap();
    assert!(
        matches!(outcome, RunOutcome::Crashed(ref why) if why.contains("reset")),
        "{outcome:?}"
    );
    // 4 e820 entries, the first command-line byte, then the marker.
    assert_eq!(devices.console().tail_text(1), "4XK");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_kernel_images_are_refused() {
    let dir = std::env::temp_dir().join(format!("kvmfork-boot-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ram_size = 256usize << 20;
    let memfd = GuestRam::create_memfd("boot-bad", ram_size).unwrap();
    let ram = GuestRam::map(&memfd, ram_size, Sharing::Shared).unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, b"not an elf at all").unwrap();
    assert!(boot::load_linux(&ram, &garbage, None, "").is_err());
    assert!(boot::load_linux(&ram, &dir.join("missing"), None, "").is_err());
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, tiny_elf(&TINY_KERNEL)).unwrap();
    let long = "x".repeat(5000);
    assert!(matches!(
        boot::load_linux(&ram, &kernel, None, &long),
        Err(boot::BootError::CmdlineTooLong(_))
    ));
    let small = GuestRam::map(
        &GuestRam::create_memfd("small", 64 << 20).unwrap(),
        64 << 20,
        Sharing::Shared,
    )
    .unwrap();
    assert!(matches!(
        boot::load_linux(&small, &kernel, None, ""),
        Err(boot::BootError::RamTooSmall(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// mov ecx,EFER; rdmsr (allowed); mov al,'E'; mov dx,0x3f8; out dx,al;
/// mov ecx,0xc0010004 (AMD PERF_CTR0); rdmsr (denied: #GP, and with no IDT a
/// triple fault); mov al,'X'; out dx,al; hlt loop.
const MSR_KERNEL: [u8; 30] = [
    0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0xb0, 0x45, 0x66, 0xba, 0xf8, 0x03, 0xee, 0xb9, 0x04,
    0x00, 0x01, 0xc0, 0x0f, 0x32, 0xb0, 0x58, 0xee, 0xf4, 0xeb, 0xfd, 0x90, 0x90, 0x90,
];

#[test]
fn msr_filter_lets_allowed_msrs_through_and_faults_denied_ones() {
    let kvm = kvm();
    let dir = std::env::temp_dir().join(format!("kvmfork-msr-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, tiny_elf(&MSR_KERNEL)).unwrap();
    let ram_size = 256usize << 20;
    let memfd = GuestRam::create_memfd("msr-test", ram_size).unwrap();
    let ram = GuestRam::map(&memfd, ram_size, Sharing::Shared).unwrap();
    let loaded = boot::load_linux(&ram, &kernel, None, "").unwrap();
    let mut vm = Vm::new(&kvm).unwrap();
    // On every host, whatever HostCaps says: the filter itself is tested.
    vm.enable_msr_filter().unwrap();
    vm.set_ram(&ram, false).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, COM1_IRQ).unwrap();
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    cpuid::filter(&mut cpuid, HostCaps::current().cpuid);
    let mut vcpu = Vcpu::new(&vm, 0).unwrap();
    vcpu.set_cpuid(&cpuid).unwrap();
    boot::setup_boot_vcpu(&vcpu, loaded.entry).unwrap();
    let mut devices = LegacyDevices::new(irq, ConsoleSink::new(256, false, None));
    let outcome = vcpu.run(&mut devices, &ram).unwrap();
    assert!(
        matches!(outcome, RunOutcome::Crashed(_)),
        "the denied rdmsr must fault (no IDT: the guest dies): {outcome:?}"
    );
    assert_eq!(
        devices.console().tail_text(1),
        "E",
        "EFER was readable, the code after the denied rdmsr never ran"
    );
    assert_eq!(
        vcpu.msr_denied(),
        1,
        "the VMM saw exactly one denied access"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
